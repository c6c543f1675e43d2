"""Glottal-source analysis following COVAREP's methods, batched over frames with numpy/scipy.

No maintained Python library implements these COVAREP methods (SRH pitch, RESKEW polarity,
SEDREAMS-like GCIs, IAIF, NAQ/QOQ/H1-H2/PSP, MDQ, peakSlope), so they are written here from
the papers and the public COVAREP MATLAB sources (read, not copied); every per-frame step is a
batched array operation, and the only Python loops run over LPC orders or glottal cycles.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.signal
import scipy.sparse

TINY = 1e-12


def levinson(r: np.ndarray, order: int) -> np.ndarray:
    """Batched Levinson-Durbin: autocorrelations [T, >=order+1] -> LPC polynomials [T, order+1]."""
    T = r.shape[0]
    a = np.zeros((T, order + 1))
    a[:, 0] = 1.0
    err = r[:, 0] * (1 + 1e-9) + TINY
    for i in range(1, order + 1):
        acc = r[:, i] + np.einsum("tj,tj->t", a[:, 1:i], r[:, i - 1:0:-1]) if i > 1 else r[:, 1].copy()
        k = -acc / err
        prev = a[:, :i + 1].copy()
        a[:, 1:i + 1] = prev[:, 1:i + 1] + k[:, None] * prev[:, i - 1::-1]
        err = np.maximum(err * (1 - k * k), TINY)
    return a


def lpc(frames: np.ndarray, order: int) -> np.ndarray:
    """LPC polynomials [T, order+1] of already windowed frames [T, L] (autocorrelation method)."""
    n = scipy.fft.next_fast_len(frames.shape[1] + order + 1, real=True)
    spec = scipy.fft.rfft(frames, n=n, axis=1)
    r = scipy.fft.irfft(spec.real ** 2 + spec.imag ** 2, n=n, axis=1)[:, :order + 1]
    return levinson(r, order)


def fir_frames(padded: np.ndarray, starts: np.ndarray, length: int, a: np.ndarray) -> np.ndarray:
    """Per-frame FIR filtering: frame t is padded[starts[t]:starts[t]+length] filtered by a[t]
    with the true signal history (starts[t] >= order)."""
    order = a.shape[1] - 1
    need = int(starts.max()) + length
    if padded.size < need:
        padded = np.pad(padded, (0, need - padded.size))
    win = np.lib.stride_tricks.sliding_window_view(padded, length + order)[starts - order]  # [T, L+p]
    out = a[:, :1] * win[:, order:]
    for k in range(1, order + 1):
        out += a[:, k:k + 1] * win[:, order - k:order - k + length]
    return out


def frame_view(x: np.ndarray, length: int, hop: int) -> np.ndarray:
    if x.size < length:
        x = np.pad(x, (0, length - x.size))
    return np.lib.stride_tricks.sliding_window_view(x, length)[::hop]


def overlap_add(frames: np.ndarray, hop: int, n: int) -> np.ndarray:
    T, L = frames.shape
    out = np.zeros(max(n, (T - 1) * hop + L))
    for q in range(0, L, hop):
        block = frames[:, q:q + hop]
        w = block.shape[1]
        if w == hop:
            out[q:q + T * hop] += block.reshape(-1)
        else:
            for t in range(T):
                out[q + t * hop:q + t * hop + w] += block[t]
    return out[:n]


def lpc_residual(x: np.ndarray, length: int, hop: int, order: int, lpc_source: np.ndarray | None = None) -> np.ndarray:
    """COVAREP's lpcresidual: Hann frames, LPC per frame (of `lpc_source` when given), inverse
    filtering within the frame, energy matching, overlap-add, peak normalisation."""
    src = x if lpc_source is None else lpc_source
    length = max(hop, hop * int(round(length / hop)))
    n = x.size
    win = np.hanning(length)
    seg = frame_view(x, length, hop) * win
    a = lpc(frame_view(src, length, hop) * win, order)
    padded = np.pad(seg, ((0, 0), (order, 0)))
    res = fir_frames(padded.reshape(-1), np.arange(seg.shape[0]) * (length + order) + order, length, a)
    res *= np.sqrt((seg ** 2).sum(1) / ((res ** 2).sum(1) + TINY))[:, None]
    out = overlap_add(res, hop, n)
    return out / (np.max(np.abs(out)) + TINY)


def polarity_reskew(x: np.ndarray, fs: int, residual: np.ndarray | None = None) -> float:
    """RESKEW (Drugman 2013): sign of skew(residual) - skew(residual with LPC from >500 Hz)."""
    import scipy.stats
    if x.size < 0.05 * fs or np.max(np.abs(x)) < 1e-6:
        return 1.0
    order, wn = scipy.signal.ellipord(480 / (fs / 2), 500 / (fs / 2), 3, 60)
    sos = scipy.signal.ellip(order, 3, 60, wn, "high", output="sos")
    xh = scipy.signal.sosfiltfilt(sos, x)
    L, hop, p = round(0.025 * fs), round(0.005 * fs), round(fs / 1000) + 2
    v1 = scipy.stats.skew(lpc_residual(x, L, hop, p, lpc_source=xh))
    v2 = scipy.stats.skew(lpc_residual(x, L, hop, p) if residual is None else residual)
    s = np.sign(v2 - v1)
    return float(s) if s != 0 and np.isfinite(s) else 1.0


def gather_frames(x: np.ndarray, centres: np.ndarray, length: int) -> np.ndarray:
    """[T, length] frames starting length//2 before each centre, zero outside the signal."""
    half = length // 2
    padded = np.pad(x, (half, length))
    return padded[centres[:, None] + np.arange(length)[None, :]]


class SRH:
    """Summation of Residual Harmonics pitch and voicing (Drugman & Alwan 2011), COVAREP
    settings: 100 ms Blackman frames of the LP residual, 5 harmonics, two passes that narrow
    the range to [F0med/2, 2 F0med], voicing threshold 0.07 (0.085 when std(SRH) > 0.05).

    COVAREP takes a 1 Hz-resolution FFT (size fs) per frame; the same spectrum values are
    read here from a 2048-point FFT by linear interpolation (the 100 ms window's main lobe is
    60 Hz wide), with the spectrum norm computed by Parseval, so thresholds keep their meaning.
    """

    def __init__(self, fs: int, f0min: float = 50, f0max: float = 500, n_harm: int = 5):
        self.fs, self.f0min, self.f0max = fs, int(f0min), int(f0max)
        self.length = int(round(0.1 * fs)) - 2
        self.nfft = scipy.fft.next_fast_len(self.length, real=True)
        self.win = np.blackman(self.length)
        self.cands = np.arange(self.f0min, self.f0max + 1, dtype=float)
        k = np.arange(1, n_harm + 1)
        plus = k[:, None] * self.cands[None, :]  # [5, F]
        minus = np.round((k[:-1, None] + 0.5) * self.cands[None, :])
        # SRH(f) = sum_k E(k f) - sum_k E((k + 1/2) f) as one sparse [bins, F] matrix of
        # linear-interpolation weights: srh = spec @ W
        n_bins = self.nfft // 2 + 1
        rows, cols, vals = [], [], []
        for freqs, sign in ((plus, 1.0), (minus, -1.0)):
            b = freqs * self.nfft / self.fs
            i0 = np.floor(b).astype(int)
            w = b - i0
            col = np.broadcast_to(np.arange(self.cands.size), freqs.shape)
            for i, ww in ((i0, 1 - w), (i0 + 1, w)):
                ok = i < n_bins
                rows.append(i[ok]); cols.append(col[ok]); vals.append(sign * ww[ok])

        self._weights = scipy.sparse.csr_matrix(
            (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(n_bins, self.cands.size))

    def __call__(self, residual: np.ndarray, centres: np.ndarray):
        frames = gather_frames(residual, centres, self.length) * self.win
        frames -= frames.mean(1, keepdims=True)
        spec = np.abs(scipy.fft.rfft(frames, n=self.nfft, axis=1))
        # sum over 0..fs/2 of |X|^2 at 1 Hz resolution = (fs/2) * sum(x^2) (Parseval, half)
        denom = np.sqrt(self.fs / 2 * (frames ** 2).sum(1)) + TINY
        spec /= denom[:, None]
        srh = np.asarray((self._weights.T @ spec.T).T)  # [T, F]
        lo, hi = self.f0min, self.f0max
        for _ in range(2):
            sel = srh[:, lo - self.f0min:hi - self.f0min + 1]
            f0 = lo + sel.argmax(1).astype(float)
            val = sel.max(1)
            if val.size and val.max() > 0.1:
                med = np.median(f0[val > 0.1])
                if round(0.5 * med) > lo:
                    lo = int(round(0.5 * med))
                if round(2 * med) < hi:
                    hi = int(round(2 * med))
        thresh = 0.085 if val.size > 1 and val.std() > 0.05 else 0.07
        return f0, (val > thresh), val, spec


def mean_based_gcis(x: np.ndarray, res: np.ndarray, fs: int, f0_mean: float) -> np.ndarray:
    """SEDREAMS-style GCIs (Drugman et al. 2012): the mean-based signal (Blackman window of
    1.75 mean periods) gives one interval per cycle, from each minimum to the next maximum,
    and the GCI is the largest LP-residual peak in that interval."""
    T0 = fs / max(f0_mean, 30.0)
    half = int(round(1.75 * T0 / 2))
    win = np.blackman(2 * half + 1)
    mbs = scipy.signal.fftconvolve(x, win / win.sum(), mode="same")
    b, a = scipy.signal.butter(2, 50 / (fs / 2), "high")
    mbs = scipy.signal.filtfilt(b, a, mbs) if mbs.size > 15 else mbs
    d = np.diff(mbs)
    mins = np.nonzero((d[:-1] < 0) & (d[1:] >= 0))[0] + 1
    maxs = np.nonzero((d[:-1] > 0) & (d[1:] <= 0))[0] + 1
    if mins.size == 0 or maxs.size == 0:
        return np.zeros(0, int)
    nxt = np.searchsorted(maxs, mins)
    ok = nxt < maxs.size
    starts, stops = mins[ok], maxs[nxt[ok]]
    gcis = np.empty(starts.size, int)
    for i, (s, e) in enumerate(zip(starts, stops)):
        gcis[i] = s + int(np.argmax(res[s:e + 1]))
    return np.unique(gcis)


def iaif(x: np.ndarray, fs: int, win_ms: float = 30.0, hop_ms: float = 10.0, d: float = 0.99):
    """Iterative Adaptive Inverse Filtering (Alku 1992) frame by frame with overlap-add, as
    COVAREP's iaif_ola: returns (glottal flow, glottal flow derivative)."""
    p_vt, p_gl = 2 * round(fs / 2000) + 4, 2 * round(fs / 4000)
    b, a = scipy.signal.butter(4, 40 / (fs / 2), "high")  # COVAREP hpfilt: remove < 40 Hz
    x = scipy.signal.filtfilt(b, a, x) if x.size > 27 else x
    L, hop = int(round(win_ms * fs / 1000)), int(round(hop_ms * fs / 1000))
    L = hop * int(round(L / hop))
    pre = p_vt + 1
    padded = np.pad(x, (pre, L))
    n_frames = max(1, int(np.ceil(x.size / hop)))
    starts = np.arange(n_frames) * hop + pre
    frames = padded[starts[:, None] + np.arange(L)[None, :]]
    win = np.hanning(L)
    integ = ([1.0], [1.0, -d])

    def inv(poly):
        return fir_frames(padded, starts, L, poly)
    g1 = lpc(frames * win, 1)
    y = inv(g1)
    hvt1 = lpc(y * win, p_vt)
    g = scipy.signal.lfilter(*integ, inv(hvt1), axis=1)
    hg1 = lpc(g * win, p_gl)
    y = scipy.signal.lfilter(*integ, inv(hg1), axis=1)
    hvt2 = lpc(y * win, p_vt)
    dg = inv(hvt2)
    dg_sig = overlap_add(dg * win, hop, x.size + L)
    norm = overlap_add(np.broadcast_to(win, dg.shape).copy(), hop, x.size + L)
    dg_sig = (dg_sig / np.maximum(norm, 1e-3))[:x.size]
    gf = scipy.signal.lfilter(*integ, dg_sig)
    return gf, dg_sig


def _psp_a(X: np.ndarray, ne_min: float = 0.01) -> np.ndarray:
    """Alku 1997 PSP 'a' for many spectra at once: the largest N (from 3) for which the
    parabola a k^2 + b fits the first N dB bins with normalised error < ne_min."""
    M, K = X.shape
    k2 = np.arange(K, dtype=float) ** 2
    N = np.arange(1, K + 1, dtype=float)
    s_k2, s_k4 = np.cumsum(k2), np.cumsum(k2 * k2)
    s_x, s_xk2, s_x2 = np.cumsum(X, 1), np.cumsum(X * k2, 1), np.cumsum(X * X, 1)
    den = N * s_k4 - s_k2 ** 2
    a = (N * s_xk2 - s_x * s_k2) / np.where(den == 0, 1, den)
    b = (s_x - a * s_k2) / N
    sse = s_x2 - 2 * a * s_xk2 - 2 * b * s_x + a * a * s_k4 + 2 * a * b * s_k2 + N * b * b
    ne = sse / np.maximum(s_x2, TINY)
    ne[:, :2] = 0  # N starts at 3
    stop = np.argmax(ne >= ne_min, axis=1)  # first N (index) that fails
    stop[~(ne >= ne_min).any(1)] = K - 1
    return a[np.arange(M), stop]


_PSP_AMAX: dict[tuple[int, int], float] = {}


def vq_params(gf: np.ndarray, dgf: np.ndarray, fs: int, gcis: np.ndarray):
    """NAQ, QOQ, H1-H2 and PSP per glottal cycle (COVAREP get_vq_params): returns times (s)
    and a [M, 4] array; cycles with F0 outside 20-500 Hz give NaN."""
    M = gcis.size
    out = np.full((M, 4), np.nan)
    if M < 2:
        return gcis / fs, out
    shift = int(round(0.5e-3 * fs))
    nfft = 2048
    pulses, psp_rows, psp_t0 = [], [], []
    for n in range(1, M):
        start, stop = gcis[n - 1], gcis[n]
        T0 = stop - start
        if T0 <= 0 or not (20 < fs / T0 < 500):
            continue
        seg = gf[start:stop + 1]
        seg_c = seg - np.linspace(seg[0], seg[-1], seg.size)  # zero-line drift
        d_peak = np.max(np.abs(dgf[start:min(stop + shift, dgf.size - 1) + 1]))
        imax = int(np.argmax(seg_c))
        f_ac = seg_c[imax]
        above = seg_c > f_ac * 0.5
        lo = imax
        while lo > 0 and above[lo - 1]:
            lo -= 1
        hi = imax
        while hi < seg_c.size - 1 and above[hi + 1]:
            hi += 1
        out[n, 0] = (f_ac / (d_peak + TINY)) / T0
        out[n, 1] = (hi - lo + 1) / T0
        p = seg - seg.min()
        p = p / (p.max() + TINY)
        pulses.append(p[:nfft])
        psp_rows.append(n)
        psp_t0.append(T0)
    if pulses:
        P = np.zeros((len(pulses), nfft))
        for i, p in enumerate(pulses):
            P[i, :p.size] = p
        X = 20 * np.log10(np.abs(scipy.fft.rfft(P, axis=1)) + TINY)
        a = _psp_a(X)
        amax = np.array([_psp_amax(int(round(t0)), nfft) for t0 in psp_t0])
        out[psp_rows, 3] = a / amax
    return gcis / fs, out


def _psp_amax(T0: int, nfft: int) -> float:
    key = (T0, nfft)
    if key not in _PSP_AMAX:
        sig = np.zeros(nfft)
        sig[:min(T0, nfft)] = 1.0 / T0
        X = 20 * np.log10(np.abs(np.fft.rfft(sig)) + TINY)
        _PSP_AMAX[key] = float(_psp_a(X[None])[0]) or -TINY
    return _PSP_AMAX[key]


def wavelet_bank(fs: int, n_scales: int = 6) -> list[np.ndarray]:
    """Kane & Gobl's mother wavelet g(t) = -cos(2 pi f_n t) exp(-t^2 / (2 tau^2)),
    tau = 1 / (2 f_n), at f_n = fs/2, fs/4, ... (one octave per scale)."""
    bank = []
    for i in range(n_scales):
        fn = fs / 2 / 2 ** i
        tau = 1 / (2 * fn)
        t = np.arange(-int(np.ceil(5 * tau * fs)), int(np.ceil(5 * tau * fs)) + 1) / fs
        bank.append(-np.cos(2 * np.pi * fn * t) * np.exp(-t ** 2 / (2 * tau ** 2)))
    return bank


def wavelet_decompose(x: np.ndarray, bank: list[np.ndarray]) -> np.ndarray:
    """[S, N] responses of x to the wavelet bank, all scales in one batched FFT convolution."""
    longest = max(len(h) for h in bank)
    n = scipy.fft.next_fast_len(x.size + longest, real=True)
    X = scipy.fft.rfft(x, n=n)
    H = np.stack([scipy.fft.rfft(h, n=n) for h in bank])
    y = scipy.fft.irfft(X[None] * H, n=n, axis=1)
    offs = [len(h) // 2 for h in bank]
    return np.stack([y[i, o:o + x.size] for i, o in enumerate(offs)])


def peak_slope(wav_resp: np.ndarray, fs: int, centres: np.ndarray, win_ms: float = 40.0) -> np.ndarray:
    """peakSlope (Kane & Gobl 2011): slope of the regression line of log10 of the per-scale
    maximum amplitude (within 40 ms around each frame) against the scale index."""
    size = int(round(win_ms * fs / 1000))
    env = scipy.ndimage.maximum_filter1d(np.abs(wav_resp), size=size, axis=1, mode="constant")
    peaks = np.log10(env[:, np.clip(centres, 0, wav_resp.shape[1] - 1)] + TINY)  # [S, T]
    s = np.arange(peaks.shape[0], dtype=float)
    s -= s.mean()
    return (s[:, None] * (peaks - peaks.mean(0))).sum(0) / (s * s).sum()


def mdq(res_resp: np.ndarray, fs: int, gcis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maxima Dispersion Quotient (Kane & Gobl 2013): mean distance of each wavelet scale's
    LP-residual maximum (searched within half a period around the GCI) from the GCI, over T0."""
    vals = np.full(gcis.size, np.nan)
    if gcis.size < 2:
        return gcis / fs, vals
    mag = np.abs(res_resp)
    N = mag.shape[1]
    for i in range(1, gcis.size):
        T0 = gcis[i] - gcis[i - 1]
        if T0 <= 0 or not (20 < fs / T0 < 500):
            continue
        lo, hi = max(0, gcis[i] - T0 // 4), min(N, gcis[i] + T0 // 4 + 1)
        loc = lo + mag[:, lo:hi].argmax(1)
        vals[i] = np.mean(np.abs(loc - gcis[i])) / T0
    return gcis / fs, vals


def residual_peak_prominence(res: np.ndarray, centres: np.ndarray, fs: int, win_ms: float = 30.0) -> np.ndarray:
    """Ratio (dB) of the largest LP-residual peak in a 30 ms frame to the largest one at least
    2.5 ms away: high in creaky voice's sparse, isolated excitations (Drugman et al. 2014)."""
    L = int(round(win_ms * fs / 1000))
    fr = np.abs(gather_frames(res, centres, L))
    top = fr.argmax(1)
    guard = int(round(2.5e-3 * fs))
    idx = np.arange(L)[None, :]
    masked = np.where(np.abs(idx - top[:, None]) <= guard, 0, fr)
    return 20 * np.log10((fr.max(1) + TINY) / (masked.max(1) + TINY))


def interp_events(times: np.ndarray, values: np.ndarray, frame_times: np.ndarray) -> np.ndarray:
    """Linear interpolation of per-cycle values to frame times; NaN (-> 0 later) outside."""
    ok = np.isfinite(values)
    if ok.sum() < 1:
        return np.full(frame_times.size, np.nan)
    if ok.sum() == 1:
        out = np.full(frame_times.size, np.nan)
        out[np.argmin(np.abs(frame_times - times[ok][0]))] = values[ok][0]
        return out
    return np.interp(frame_times, times[ok], values[ok], left=np.nan, right=np.nan)
