"""Harmonic analysis, Rd by Mean Squared Phase (MSP), HMPD phase statistics and warped
cepstra, batched over frames (COVAREP's sin_analysis, rd_msp, hmpd_*, hspec2fwcep methods).

No Python library implements these; they follow Degottex et al. (IEEE TASLP 2011, MSP;
Degottex & Erro, EURASIP JASMP 2014, HMPD) and Fant (1995, Rd). The MSP search is
reformulated so that one table per harmonic count holds everything that depends on the
glottal model: the minimum-phase operator is linear in the log amplitudes, so the residual
phase for every Rd candidate is one broadcast subtraction.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.fft
import scipy.optimize

TINY = 1e-12
RD_GRID = np.round(np.arange(0.3, 2.5001, 0.01), 4)
MSP_ORDER = 8  # harmonics used by MSPD2 (rd_msp: o = min(K, 8))


def wrap(p):
    return np.mod(p + np.pi, 2 * np.pi) - np.pi


def wrap_fast(p):
    """wrap() by rounding to the nearest multiple of 2 pi (cheaper than mod; for squared phase
    errors: it differs from wrap() only at +-pi and by rounding)."""
    return p - (2 * np.pi) * np.rint(p * (0.5 / np.pi))


def harmonic_analysis(
    x: np.ndarray,
    fs: int,
    centres: np.ndarray,
    f0: np.ndarray,
    n_periods: float = 3.0,
    nfft: int = 2048,
    max_harm: int | None = None,
    phase_rows: np.ndarray | None = None,
):
    """Amplitudes and phases of harmonics k*f0 (k = 1..K) at each frame centre.

    Zero-phase Blackman window of `n_periods` periods centred on the frame, one batched rFFT,
    peak picking within +-f0/4 of each harmonic, quadratic interpolation of the log
    magnitude; phases are read at the peak bin (exact inside the main lobe of a zero-phase
    window). Returns (amp [T, Kmax], phase [T, Kmax], nharm [T]); harmonics above Nyquist
    minus f0/2 are masked by nharm. `phase_rows` (a boolean per frame): phases only for those
    frames, 0 elsewhere (the angle and wrap are a fifth of the work; unvoiced frames' are unused).
    """
    T = centres.size
    half = nfft // 2
    # frames centred on each centre (sample offsets -half..half-1), float32 for the FFT; the
    # zero-phase layout's phases are the centred frame's plus pi k (a circular shift by half)
    padded = np.pad(np.asarray(x, dtype=np.float32), (half, half))
    frames = np.lib.stride_tricks.sliding_window_view(padded, nfft)[centres]
    uf0, inv = np.unique(f0, return_inverse=True)  # SRH F0s lie on a 1 Hz grid: few windows
    wins = np.stack([_blackman_window(float(f), fs, n_periods, nfft) for f in uf0])
    spec = scipy.fft.rfft(frames * wins[inv], axis=1)
    nharm = np.floor((fs / 2 - f0 / 2) / f0).astype(int)
    kmax = int(nharm.max()) if max_harm is None else max_harm
    # only the bins the peak picking can read (all of them unless max_harm is small)
    n_read = min(spec.shape[1], int(np.ceil(kmax * f0.max() * nfft / fs + f0.max() / 4 * nfft / fs)) + 3)
    spec = spec[:, :n_read]
    mag = np.abs(spec) * (2 / np.maximum(wins.sum(1), TINY))[inv][:, None]
    nharm = np.minimum(nharm, kmax)
    k = np.arange(1, kmax + 1)
    df = fs / nfft
    centre_bin = np.round(k[None, :] * f0[:, None] / df).astype(int)  # [T, K]
    reach_t = (f0 / 4 / df)[:, None]
    reach = int(np.ceil(f0.max() / 4 / df))
    r2 = np.arange(T)[:, None]
    best = np.clip(centre_bin, 1, half - 1)
    best_val = mag[r2, best]
    # offsets o = -reach..reach (first maximum wins), each only for the frames whose reach
    # f0/4 covers |o|: with frames sorted by F0, those are a leading block
    perm = np.argsort(-f0, kind="stable")
    reach_sorted = reach_t[perm, 0]
    for o in range(-reach, reach + 1):
        if o == 0:
            continue
        n_o = int(np.count_nonzero(abs(o) <= reach_sorted))
        if n_o == 0:
            continue
        rows = perm[:n_o]
        b = np.clip(centre_bin[rows] + o, 1, half - 1)
        v = mag[rows[:, None], b]
        better = v > best_val[rows]
        best[rows] = np.where(better, b, best[rows])
        best_val[rows] = np.where(better, v, best_val[rows])
    lm, l0, lp = (np.log(mag[r2, best + o].astype(np.float64) + TINY) for o in (-1, 0, 1))
    den = lm - 2 * l0 + lp
    delta = np.where(np.abs(den) > TINY, 0.5 * (lm - lp) / np.where(den == 0, 1, den), 0.0)
    delta = np.clip(delta, -0.5, 0.5)
    amp = np.exp(l0 - 0.25 * (lm - lp) * delta)
    valid = k[None, :] <= nharm[:, None]
    if phase_rows is None:
        phase = wrap(np.angle(spec[r2, best]).astype(np.float64) + np.pi * best)
    else:
        phase = np.zeros(best.shape)
        rows = np.nonzero(phase_rows)[0]
        sel = best[rows]
        phase[rows] = wrap(np.angle(spec[rows[:, None], sel]).astype(np.float64) + np.pi * sel)
    return np.where(valid, amp, 0.0), np.where(valid, phase, 0.0), nharm


@lru_cache(maxsize=2048)
def _blackman_window(f0: float, fs: int, n_periods: float, nfft: int) -> np.ndarray:
    """harmonic_analysis' zero-phase Blackman window of n_periods periods of f0, float32, as
    laid out in its centred nfft-sample frames (cached: F0s repeat across frames and files)."""
    half = nfft // 2
    offs = (np.arange(nfft) - half).astype(np.float32)
    hw = np.minimum(n_periods * fs / np.array([f0]) / 2, half - 1)
    u = offs[None, :] / hw[:, None].astype(np.float32)
    w = np.where(np.abs(u) <= 1, 0.42 + 0.5 * np.cos(np.pi * u) + 0.08 * np.cos(2 * np.pi * u), 0.0).astype(np.float32)[
        0
    ]
    w.setflags(write=False)
    return w


# ---- Liljencrants-Fant model -------------------------------------------------------------


def rd_to_tetpta(rd: float) -> tuple[float, float, float]:
    """Fant (1995) Rd -> (te, tp, ta) for T0 = 1."""
    rap = (-1 + 4.8 * rd) / 100
    rkp = (22.4 + 11.8 * rd) / 100
    rgp = 1 / (4 * ((0.11 * rd / (0.5 + 1.2 * rkp)) - rap) / rkp)
    tp = 1 / (2 * rgp)
    te = min(tp * (1 + rkp), 0.999)
    return te, tp, max(rap, 1e-4)


def lf_period(rd: float, n: int = 4096) -> np.ndarray:
    """One period (T0 = 1, Ee = 1) of the LF glottal flow derivative, `n` samples."""
    te, tp, ta = rd_to_tetpta(rd)
    tc = 1.0
    wg = np.pi / tp
    eps = scipy.optimize.brentq(lambda e: e * ta - 1 + np.exp(-e * (tc - te)), 1e-6, 1e6)
    ret = -(1 / (eps * ta)) * ((1 - np.exp(-eps * (tc - te))) / eps - (tc - te) * np.exp(-eps * (tc - te)))

    def net_flow(alpha):
        e0 = -1 / (np.exp(alpha * te) * np.sin(wg * te))
        opn = e0 * (np.exp(alpha * te) * (alpha * np.sin(wg * te) - wg * np.cos(wg * te)) + wg) / (alpha**2 + wg**2)
        return opn + ret

    lo, hi = -50.0, 200.0
    try:
        alpha = scipy.optimize.brentq(net_flow, lo, hi)
    except ValueError:
        alpha = 0.0
    t = np.arange(n) / n
    e0 = -1 / (np.exp(alpha * te) * np.sin(wg * te))
    g = np.where(
        t <= te,
        e0 * np.exp(alpha * t) * np.sin(wg * t),
        -(1 / (eps * ta)) * (np.exp(-eps * (t - te)) - np.exp(-eps * (tc - te))),
    )
    return g


@lru_cache(maxsize=1)
def lf_harmonics(kmax: int = 400) -> np.ndarray:
    """[len(RD_GRID), kmax + 1] complex LF spectrum at harmonics 0..kmax (depends on Rd and
    the harmonic number only, since the model is defined in time normalised by T0)."""
    n = 8192
    return np.stack([np.fft.rfft(lf_period(rd, n))[: kmax + 1] / n for rd in RD_GRID])


@lru_cache(maxsize=512)
def minphase_operator(K: int, rows: int) -> np.ndarray:
    """[rows, K+1] matrix: log amplitudes at harmonics 0..K (half of a 2K-point hermitian
    spectrum) -> minimum-phase phase at harmonics 0..rows-1 (real-cepstrum folding)."""
    n = 2 * K
    eye = np.eye(K + 1)
    full = np.concatenate([eye, eye[:, K - 1 : 0 : -1]], axis=1)  # [K+1, 2K]
    c = np.fft.ifft(full, axis=1).real
    fold = np.zeros(n)
    fold[0] = 1
    fold[1:K] = 2
    fold[K] = 1
    ph = np.fft.fft(c * fold, axis=1).imag  # [K+1, 2K]
    return np.ascontiguousarray(ph[:, :rows].T)


@lru_cache(maxsize=512)
def msp_table(K: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q [o+1, K+1], A [nRd, o+1]) for K harmonics: residual phase P = phi - Q log|M| + A."""
    o = min(K - 1, MSP_ORDER)
    Q = minphase_operator(K, o + 1)
    # log|N| edge fix-up of rd_msp: N(0) := |N(1)|, N(K) := |N(K-1)|
    E = np.eye(K + 1)
    E[0] = 0
    E[0, 1] = 1
    E[K] = 0
    E[K, K - 1] = 1
    Q = Q @ E
    G = lf_harmonics()[:, : K + 1].copy()
    G[:, 0] = TINY
    lg = np.log(np.abs(G) + TINY)
    ang = np.angle(G[:, : o + 1])
    ang[:, 0] = 0.0
    A = -ang + lg @ Q.T
    return Q, A


def _second_diff_op(P: np.ndarray) -> np.ndarray:
    """The MSPD2 phase differences P[k+1] - P[k] - P[1] for k = 2..o (last axis), the ones
    rd_msp's error averages (k = 1 is P[2] - 2 P[1], also used; index 0 of diff is unused)."""
    return P[..., 2:] - P[..., 1:-1] - P[..., 1:2]


@lru_cache(maxsize=512)
def _msp_table2(K: int) -> tuple[np.ndarray, np.ndarray]:
    """(Q restricted to harmonics 1..K [o+1, K], D = second differences of A [nRd, o-1])."""
    Q, A = msp_table(K)
    return np.ascontiguousarray(Q[:, 1:]), np.ascontiguousarray(_second_diff_op(A))


def rd_msp(amp: np.ndarray, phase: np.ndarray, nharm: np.ndarray, voiced: np.ndarray):
    """Rd (grid 0.3..2.5 step 0.01 + parabolic refinement, instead of Brent's search) and its
    confidence 1 - sqrt(err)/pi per frame; NaN where unvoiced or fewer than 3 harmonics.

    MSPD2 error of candidate Rd for a frame: mean over k = 2..o of wrap(P[k+1] - P[k] - P[1])^2
    with P = phi - Q log|M| + A_Rd, i.e. wrap(b + D_Rd)^2 with b the second differences of
    phi - Q log|M| (per frame) and D_Rd those of A (per harmonic count, tabled): frames of
    every harmonic count are searched in one broadcast (Q's column for harmonic 0 multiplies
    log(0 + TINY), a constant, folded into b)."""
    T = amp.shape[0]
    rd = np.full(T, np.nan)
    conf = np.full(T, np.nan)
    usable = voiced & (nharm >= 3)
    idx = np.nonzero(usable)[0]
    if idx.size == 0:
        return rd, conf
    Ks = nharm[idx]
    uK, inv = np.unique(Ks, return_inverse=True)
    orders = np.array([min(int(K) - 1, MSP_ORDER) for K in uK])
    o = int(orders.max())
    if np.any(orders != o) or o < 2:  # rare (F0 above fs/2/10): search each harmonic count alone
        for K in uK:
            sel = np.nonzero(usable & (nharm == K))[0]
            r, c = _rd_msp_group(amp, phase, int(K), sel)
            rd[sel], conf[sel] = r[sel], c[sel]
        return rd, conf
    kmax = int(uK.max())
    lm = np.log(amp[idx, :kmax] + TINY)
    lm = np.where(np.arange(kmax)[None, :] < Ks[:, None], lm, 0.0)
    Qs = np.zeros((uK.size, o + 1, kmax))
    Ds = np.empty((uK.size, len(RD_GRID), o - 1))
    for i, K in enumerate(uK):
        Q1, D = _msp_table2(int(K))
        Qs[i, :, :K] = Q1
        Ds[i] = D
    q0 = np.stack([msp_table(int(K))[0][:, 0] for K in uK])  # [U, o+1] column of harmonic 0
    ph = np.concatenate([np.zeros((idx.size, 1)), phase[idx, :o]], axis=1)
    base = ph - np.einsum("nk,nqk->nq", lm, Qs[inv]) - q0[inv] * np.log(TINY)
    b = _second_diff_op(base)  # [n, o-1]
    W = (b[:, None, :] + Ds[inv]).astype(np.float32)
    W = wrap_fast(W)
    err = np.einsum("nrj,nrj->nr", W, W, dtype=np.float64) / (o - 1)
    _refine(err, idx, rd, conf)
    return rd, conf


def _rd_msp_group(amp, phase, K, idx):
    """MSP search for frames `idx` that share harmonic count K (the reference formulation)."""
    T = amp.shape[0]
    rd = np.full(T, np.nan)
    conf = np.full(T, np.nan)
    Q, A = msp_table(int(K))
    o = A.shape[1] - 1
    lm = np.log(np.concatenate([np.zeros((idx.size, 1)), amp[idx, :K]], axis=1) + TINY)
    ph = np.concatenate([np.zeros((idx.size, 1)), phase[idx, :o]], axis=1)
    base = ph - lm @ Q.T  # [n, o+1]
    P = base[:, None, :] + A[None]  # [n, nRd, o+1]
    pd2 = wrap(np.diff(P, axis=2) - P[:, :, 1:2])
    err = (pd2[:, :, 1:o] ** 2).mean(2) if o > 1 else np.zeros(P.shape[:2])
    _refine(err, idx, rd, conf)
    return rd, conf


def _refine(err: np.ndarray, idx: np.ndarray, rd: np.ndarray, conf: np.ndarray) -> None:
    """Grid minimum of err [n, nRd] + parabolic refinement, written to rd/conf at idx."""
    best = err.argmin(1)
    b = np.clip(best, 1, len(RD_GRID) - 2)
    e_m, e_0, e_p = (err[np.arange(idx.size), b + s] for s in (-1, 0, 1))
    den = e_m - 2 * e_0 + e_p
    shift = np.where(den > TINY, 0.5 * (e_m - e_p) / np.where(den == 0, 1, den), 0.0)
    shift = np.where(best == b, np.clip(shift, -0.5, 0.5), 0.0)
    step = RD_GRID[1] - RD_GRID[0]
    rd[idx] = RD_GRID[best] + shift * step
    conf[idx] = 1 - np.sqrt(err[np.arange(idx.size), best]) / np.pi


# ---- HMPD ------------------------------------------------------------------------------------


def _circ_moving(z: np.ndarray, w: np.ndarray, size: int) -> np.ndarray:
    """Weighted moving average over time (axis 0) of complex values with weights w."""
    import scipy.ndimage

    num = scipy.ndimage.uniform_filter1d(
        z.real * w, size, axis=0, mode="nearest"
    ) + 1j * scipy.ndimage.uniform_filter1d(z.imag * w, size, axis=0, mode="nearest")
    den = scipy.ndimage.uniform_filter1d(w, size, axis=0, mode="nearest")
    return num / np.maximum(den, TINY)


def phase_distortion(amp: np.ndarray, phase: np.ndarray, nharm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Phase distortion PD_k = RPS_{k+1} - RPS_k (k = 1..K-1) with the vocal-tract minimum
    phase (from the harmonic amplitudes) removed first; returns (PD [T, Kmax-1], mask)."""
    T, kmax = amp.shape
    vt = np.zeros_like(phase)
    for K in np.unique(nharm):
        if K < 2:
            continue
        idx = np.nonzero(nharm == K)[0]
        L = minphase_operator(int(K), int(K) + 1)
        lm = np.log(np.concatenate([amp[idx, :1], amp[idx, :K]], axis=1) + TINY)
        vt[idx, :K] = (lm @ L.T)[:, 1:]
    ph = phase - vt
    k = np.arange(1, kmax + 1)
    rps = ph - k[None, :] * ph[:, :1]
    pd = wrap(np.diff(rps, axis=1))
    mask = (k[None, 1:] <= nharm[:, None]).astype(float)
    return pd, mask


def hmpd_stats(pd: np.ndarray, mask: np.ndarray, mean_frames: int, dev_frames: int):
    """PDM (circular mean over `mean_frames`) and PDD (circular std over `dev_frames` after
    removing the circular trend), per harmonic."""
    z = np.exp(1j * pd)
    pdm = np.angle(_circ_moving(z, mask, mean_frames))
    trend = np.angle(_circ_moving(z, mask, dev_frames))
    zr = np.exp(1j * wrap(pd - trend))
    R = np.abs(_circ_moving(zr, mask, dev_frames))
    pdd = np.sqrt(-2 * np.log(np.clip(R, 1e-6, 1.0)))
    return pdm * mask, pdd * mask


def loglin_harmonic_positions(n: int = 25, hb: float = 8.0, hmax: float = 160.0) -> np.ndarray:
    """`n` harmonic numbers (from 1) uniform on a scale linear below `hb`, logarithmic above."""

    def fwd(h):
        return np.where(h <= hb, h, hb * (1 + np.log(h / hb)))

    grid = np.linspace(fwd(1.0), fwd(hmax), n)
    return np.where(grid <= hb, grid, hb * np.exp(grid / hb - 1))


def sample_harmonics(values: np.ndarray, positions: np.ndarray, nharm: np.ndarray, circular: bool) -> np.ndarray:
    """Linear interpolation of per-harmonic values (index 0 = harmonic 1) at fractional
    harmonic `positions`; 0 beyond each frame's last harmonic."""
    T, K = values.shape
    p = positions - 1
    i0 = np.clip(np.floor(p).astype(int), 0, K - 1)
    i1 = np.clip(i0 + 1, 0, K - 1)
    w = np.clip(p - i0, 0, 1)
    if circular:
        z = np.exp(1j * values)
        out = np.angle(z[:, i0] * (1 - w) + z[:, i1] * w)
    else:
        out = values[:, i0] * (1 - w) + values[:, i1] * w
    return np.where(positions[None, :] <= nharm[:, None], out, 0.0)


@lru_cache(maxsize=16)
def warped_cepstrum_matrix(n_bins: int, order: int, alpha: float) -> np.ndarray:
    """[n_bins, order+1] matrix: log amplitude on a uniform 0..pi grid -> frequency-warped
    (all-pass, `alpha`) cepstrum, as COVAREP's hspec2fwcep: the log spectrum is resampled on
    the warped frequency axis, then its cosine transform gives c_0 and c_m (m >= 1) =
    2 x the real cepstrum, so that log|H| = c_0 + sum c_m cos(m w~) (SPTK's mel-cepstrum
    convention)."""
    M = 4 * n_bins
    wt = np.linspace(0, np.pi, M)  # warped axis, uniform
    # inverse all-pass warping: w = wt - 2 atan(alpha sin wt / (1 + alpha cos wt))
    w = wt - 2 * np.arctan(alpha * np.sin(wt) / (1 + alpha * np.cos(wt)))
    pos = w / np.pi * (n_bins - 1)
    i0 = np.clip(np.floor(pos).astype(int), 0, n_bins - 2)
    frac = pos - i0
    interp = np.zeros((M, n_bins))
    interp[np.arange(M), i0] = 1 - frac
    interp[np.arange(M), i0 + 1] += frac
    trap = np.full(M, 1.0 / (M - 1))
    trap[[0, -1]] *= 0.5
    m = np.arange(order + 1)
    cosm = np.cos(np.outer(m, wt)) * trap[None, :]  # [order+1, M]
    cosm[1:] *= 2
    return np.ascontiguousarray((cosm @ interp).T)
