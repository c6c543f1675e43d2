"""Glottal-source analysis following COVAREP's methods, batched over frames with numpy/scipy.

No maintained Python library implements these COVAREP methods (SRH pitch, RESKEW polarity,
SEDREAMS-like GCIs, IAIF, NAQ/QOQ/H1-H2/PSP, MDQ, peakSlope), so they are written here from
the papers and the public COVAREP MATLAB sources (read, not copied); every per-frame step is a
batched array operation; the Python loops run over LPC orders, groups of glottal cycles of
similar length, and the voiced-to-voiced steps of the F0 Viterbi search.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import scipy.fft
import scipy.ndimage
import scipy.signal
import scipy.sparse

TINY = 1e-12


@lru_cache(maxsize=32)
def _butter(order: int, cutoff_hz: float, fs: int, btype: str) -> tuple[np.ndarray, np.ndarray]:
    """scipy.signal.butter(order, cutoff / (fs/2), btype), designed once per setting."""
    return scipy.signal.butter(order, cutoff_hz / (fs / 2), btype)


@lru_cache(maxsize=8)
def _reskew_sos(fs: int) -> np.ndarray:
    order, wn = scipy.signal.ellipord(480 / (fs / 2), 500 / (fs / 2), 3, 60)
    return scipy.signal.ellip(order, 3, 60, wn, "high", output="sos")


def _skew(a: np.ndarray) -> float:
    """scipy.stats.skew(a) (biased moments; NaN for a constant signal) without its overhead."""
    mean = a.mean()
    d = a - mean
    d2 = d * d
    m2 = d2.mean()
    m3 = (d2 * d).mean()
    if m2 <= (np.finfo(np.float64).resolution * mean) ** 2:
        return float("nan")
    return float(m3 / m2**1.5)


def levinson(r: np.ndarray, order: int) -> np.ndarray:
    """Batched Levinson-Durbin: autocorrelations [T, >=order+1] -> LPC polynomials [T, order+1]."""
    T = r.shape[0]
    a = np.zeros((T, order + 1))
    a[:, 0] = 1.0
    err = r[:, 0] * (1 + 1e-6) + TINY  # white-noise correction (-60 dB): float32 spectra
    for i in range(1, order + 1):
        acc = r[:, i] + np.einsum("tj,tj->t", a[:, 1:i], r[:, i - 1 : 0 : -1]) if i > 1 else r[:, 1].copy()
        k = np.minimum(np.maximum(-acc / err, -0.99999), 0.99999)  # keep the filter minimum-phase
        a[:, 1 : i + 1] += k[:, None] * a[:, i - 1 :: -1]  # the product is formed first: old values
        err = np.maximum(err * (1 - k * k), TINY)
    return a


def lpc(frames: np.ndarray, order: int) -> np.ndarray:
    """LPC polynomials [T, order+1] of already windowed frames [T, L] (autocorrelation method)."""
    if order == 1:  # two lags: direct products
        r = np.stack(
            [np.einsum("ij,ij->i", frames, frames), np.einsum("ij,ij->i", frames[:, 1:], frames[:, :-1])], axis=1
        )
        return levinson(r.astype(np.float64), 1)
    n = scipy.fft.next_fast_len(frames.shape[1] + order + 1, real=True)
    spec = scipy.fft.rfft(frames, n=n, axis=1)
    r = scipy.fft.irfft(spec.real**2 + spec.imag**2, n=n, axis=1)[:, : order + 1]
    return levinson(r.astype(np.float64), order)


def frame_view(x: np.ndarray, length: int, hop: int) -> np.ndarray:
    if x.size < length:
        x = np.pad(x, (0, length - x.size))
    return np.lib.stride_tricks.sliding_window_view(x, length)[::hop]


def overlap_add(frames: np.ndarray, hop: int, n: int) -> np.ndarray:
    T, L = frames.shape
    out = np.zeros(max(n, (T - 1) * hop + L))
    for q in range(0, L, hop):
        block = frames[:, q : q + hop]
        w = block.shape[1]
        if w == hop:
            out[q : q + T * hop] += block.reshape(-1)
        else:
            for t in range(T):
                out[q + t * hop : q + t * hop + w] += block[t]
    return out[:n]


def _overlap_add_rows(frames: np.ndarray, rows: np.ndarray, hop: int, n: int) -> np.ndarray:
    """overlap_add of a [n_frames, L] array (L a multiple of hop) that is zero except for the
    given (distinct) rows, from those rows only."""
    m, L = frames.shape
    n_frames = int(rows.max()) + 1 if rows.size else 0
    nb = max(-(-n // hop), n_frames + L // hop)
    out = np.zeros((nb, hop))
    for j in range(L // hop):
        out[rows + j] += frames[:, j * hop : (j + 1) * hop]
    return out.reshape(-1)[:n]


def lpc_residual(x: np.ndarray, length: int, hop: int, order: int, lpc_source: np.ndarray | None = None) -> np.ndarray:
    """COVAREP's lpcresidual: Hann frames, LPC per frame (of `lpc_source` when given), inverse
    filtering within the frame (zero history), energy matching, overlap-add, peak
    normalisation. Filtering is done in the frequency domain with the frame spectrum that
    also gives the autocorrelation."""
    return lpc_residuals(x, length, hop, (order,), lpc_source)[0]


def lpc_residuals(
    x: np.ndarray,
    length: int,
    hop: int,
    orders: tuple[int, ...],
    lpc_source: np.ndarray | None = None,
    extra_source: np.ndarray | None = None,
) -> list[np.ndarray]:
    """lpc_residual for several LPC orders from one pass (one Levinson recursion, one frame
    FFT). With `extra_source`, one more residual of x is appended whose LPC comes from
    `extra_source` at the highest order (RESKEW's high-passed analysis)."""
    length = max(hop, hop * int(round(length / hop)))
    n = x.size
    win = np.hanning(length).astype(np.float32)
    seg = frame_view(x.astype(np.float32), length, hop) * win  # float32 FFTs, float64 Levinson
    p = max(orders)
    nfft = scipy.fft.next_fast_len(length + p + 1, real=True)
    S = scipy.fft.rfft(seg, n=nfft, axis=1)
    energy = np.square(seg, dtype=np.float64).sum(1)  # no float64 copy first

    def autocorr(spec):
        return scipy.fft.irfft(spec.real**2 + spec.imag**2, n=nfft, axis=1)[:, : p + 1].astype(np.float64)

    src_spec = (
        S
        if lpc_source is None
        else scipy.fft.rfft(frame_view(lpc_source.astype(np.float32), length, hop) * win, n=nfft, axis=1)
    )
    polys = levinson_orders(autocorr(src_spec), orders)
    if extra_source is not None:
        xs = scipy.fft.rfft(frame_view(extra_source.astype(np.float32), length, hop) * win, n=nfft, axis=1)
        polys.append(levinson_orders(autocorr(xs), (p,))[0])
    outs = []
    for a in polys:
        res = scipy.fft.irfft(S * scipy.fft.rfft(a.astype(np.float32), n=nfft, axis=1), n=nfft, axis=1)[:, :length]
        res *= np.sqrt(energy / (np.square(res, dtype=np.float64).sum(1) + TINY)).astype(np.float32)[:, None]
        out = overlap_add(res, hop, n).astype(np.float64)
        outs.append(out / (np.max(np.abs(out)) + TINY))
    return outs


def levinson_orders(r: np.ndarray, orders: tuple[int, ...]) -> list[np.ndarray]:
    """Batched Levinson-Durbin returning the polynomials of every order in `orders`."""
    T = r.shape[0]
    top = max(orders)
    a = np.zeros((T, top + 1))
    a[:, 0] = 1.0
    err = r[:, 0] * (1 + 1e-6) + TINY  # white-noise correction (-60 dB): float32 spectra
    out = {}
    for i in range(1, top + 1):
        acc = r[:, i] + np.einsum("tj,tj->t", a[:, 1:i], r[:, i - 1 : 0 : -1]) if i > 1 else r[:, 1].copy()
        k = np.minimum(np.maximum(-acc / err, -0.99999), 0.99999)  # keep the filter minimum-phase
        a[:, 1 : i + 1] += k[:, None] * a[:, i - 1 :: -1]  # the product is formed first: old values
        err = np.maximum(err * (1 - k * k), TINY)
        if i in orders:
            out[i] = a[:, : i + 1].copy()
    return [out[o] for o in orders]


def reskew_highpass(x: np.ndarray, fs: int) -> np.ndarray:
    """The > 500 Hz elliptic high-passed signal RESKEW takes its LPC from."""
    return scipy.signal.sosfilt(_reskew_sos(fs), x)  # one pass: only the frames' power spectra (LPC) use it


def polarity_reskew(
    x: np.ndarray, fs: int, residual: np.ndarray | None = None, residual_hp: np.ndarray | None = None
) -> float:
    """RESKEW (Drugman 2013): sign of skew(residual) - skew(residual with LPC from >500 Hz)."""
    if x.size < 0.05 * fs or np.max(np.abs(x)) < 1e-6:
        return 1.0
    L, hop, p = round(0.025 * fs), round(0.005 * fs), round(fs / 1000) + 2
    if residual is None or residual_hp is None:
        residual, residual_hp = lpc_residuals(x, L, hop, (p,), extra_source=reskew_highpass(x, fs))
    v1 = _skew(residual_hp)
    v2 = _skew(residual)
    s = np.sign(v2 - v1)
    return float(s) if s != 0 and np.isfinite(s) else 1.0


def gather_frames(x: np.ndarray, centres: np.ndarray, length: int) -> np.ndarray:
    """[T, length] frames starting length//2 before each centre, zero outside the signal."""
    half = length // 2
    padded = np.pad(x, (half, length))
    return np.lib.stride_tricks.sliding_window_view(padded, length)[centres]


class SRH:
    """Summation of Residual Harmonics pitch and voicing (Drugman & Alwan 2011), COVAREP
    settings: 100 ms Blackman frames of the LP residual, 5 harmonics, two passes that narrow
    the range to [F0med/2, 2 F0med], voicing threshold 0.07 (0.085 when std(SRH) > 0.05).

    COVAREP takes a 1 Hz-resolution FFT (size fs) per frame; the same spectrum values are
    read here from a 1600-point FFT (10 Hz bins) by linear interpolation (the 100 ms window's
    main lobe is 60 Hz wide), with the spectrum norm computed by Parseval, so thresholds keep
    their meaning. Only the bins up to n_harm x f0max are kept (the normalised magnitude
    spectrum returned as the 4th value has `n_bins` columns).
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
                rows.append(i[ok])
                cols.append(col[ok])
                vals.append(sign * ww[ok])

        rows = np.concatenate(rows)
        self.n_bins = int(rows.max()) + 1  # spectrum bins SRH reads (up to n_harm x f0max)
        self._weights = scipy.sparse.csr_matrix(
            (np.concatenate(vals), (rows, np.concatenate(cols))), shape=(self.n_bins, self.cands.size)
        )

    def __call__(self, residual: np.ndarray, centres: np.ndarray):
        frames = gather_frames(residual.astype(np.float32), centres, self.length)  # a copy: scaled in place
        frames *= self.win.astype(np.float32)
        frames -= frames.mean(1, keepdims=True)
        spec = np.abs(scipy.fft.rfft(frames, n=self.nfft, axis=1)[:, : self.n_bins])
        # sum over 0..fs/2 of |X|^2 at 1 Hz resolution = (fs/2) * sum(x^2) (Parseval, half)
        denom = np.sqrt(self.fs / 2 * np.square(frames, dtype=np.float64).sum(1)) + TINY
        spec /= denom[:, None]
        srh = np.asarray(spec @ self._weights)  # [T, F]
        lo, hi = self.f0min, self.f0max
        for _ in range(2):
            sel = srh[:, lo - self.f0min : hi - self.f0min + 1]
            f0 = self._odd_multiple_check(srh, lo + sel.argmax(1).astype(float), self.f0min)
            val = sel.max(1)
            if val.size and val.max() > 0.1:
                med = np.median(f0[val > 0.1])
                if round(0.5 * med) > lo:
                    lo = int(round(0.5 * med))
                if round(2 * med) < hi:
                    hi = int(round(2 * med))
        thresh = 0.085 if val.size > 1 and val.std() > 0.05 else 0.07
        voiced = val > thresh
        f0 = self.track(srh, lo, hi, voiced)
        return f0, voiced, val, spec

    # -- tracking (sertool addition; COVAREP takes the per-frame argmax) --------------------
    OCTAVE_COST = 0.2  # SRH units per octave of frame-to-frame F0 change (voiced runs only)
    N_CANDS = 5

    def _value(self, srh: np.ndarray, f: np.ndarray) -> np.ndarray:
        """SRH at (fractional) frequencies f [T, ...]: max over the two neighbouring 1 Hz bins."""
        i = np.clip(np.floor(f).astype(int) - self.f0min, 0, srh.shape[1] - 2)
        r = np.arange(srh.shape[0]).reshape((-1,) + (1,) * (f.ndim - 1))
        return np.maximum(srh[r, i], srh[r, i + 1])

    def track(self, srh: np.ndarray, lo: int, hi: int, voiced: np.ndarray) -> np.ndarray:
        """F0 path through the SRH local maxima in [lo, hi]: Viterbi over the N_CANDS best peaks
        per frame, score = SRH - OCTAVE_COST |log2 jump| within voiced runs, then the odd-
        multiple check: a perfectly harmonic flat residual spectrum gives SRH(3 F0) and
        SRH(5 F0) the same value as SRH(F0) (the subtracted (k - 1/2) f bins fall between
        harmonics), so f/3 or f/5 is taken when its SRH is within 15 % of SRH(f)."""
        sel = srh[:, lo - self.f0min : hi - self.f0min + 1]
        T, F = sel.shape
        if F < 3:
            return lo + sel.argmax(1).astype(float)
        peak = np.zeros_like(sel, dtype=bool)
        peak[:, 1:-1] = (sel[:, 1:-1] >= sel[:, :-2]) & (sel[:, 1:-1] > sel[:, 2:])
        peak[np.arange(T), sel.argmax(1)] = True
        K = min(self.N_CANDS, F)
        score = np.where(peak, sel, -np.inf)
        idx = np.argpartition(-score, K - 1, axis=1)[:, :K]
        v = np.take_along_axis(score, idx, 1)
        f = (lo + idx).astype(float)
        lf = np.log2(f)
        acc = v[0].copy()
        back = np.zeros((T, K), dtype=int)
        # transition costs of all voiced-to-voiced steps at once; the loop only accumulates
        both = np.nonzero(voiced[1:] & voiced[:-1])[0] + 1
        cost = np.zeros((T, K, K))
        cost[both] = self.OCTAVE_COST * np.abs(lf[both][:, :, None] - lf[both - 1][:, None, :])
        is_both = np.zeros(T, bool)
        is_both[both] = True
        rows = np.arange(K)
        # a run of steps that are not voiced-to-voiced (t = i..j-1) only carries the best score
        # on: acc_t = v[t] + max(acc_{t-1}), back_t = argmax(acc_{t-1}); its maxima are the
        # running sums of the per-frame maxima (fl(a + m) is monotone in a), so the run is
        # done at once with the same roundings as step by step
        run_end = np.r_[both, T]  # first voiced-to-voiced step at or after each t
        t = 1
        while t < T:
            if is_both[t]:
                trans = acc[None, :] - cost[t]
                bt = trans.argmax(1)
                back[t] = bt
                acc = v[t] + trans[rows, bt]
                t += 1
            else:
                j = int(run_end[np.searchsorted(run_end, t)])
                m = np.cumsum(np.r_[acc.max(), v[t : j - 1].max(1)])
                accs = v[t:j] + m[:, None]
                back[t] = int(acc.argmax())
                back[t + 1 : j] = accs[:-1].argmax(1)[:, None]
                acc = accs[-1]
                t = j
        path = np.empty(T, dtype=int)
        path[-1] = int(acc.argmax())
        back_l = back.tolist()
        p = int(path[-1])
        for t in range(T - 1, 0, -1):
            p = back_l[t][p]
            path[t - 1] = p
        return self._odd_multiple_check(srh, f[np.arange(T), path], lo)

    def _odd_multiple_check(self, srh: np.ndarray, f0: np.ndarray, lo: float) -> np.ndarray:
        ref = self._value(srh, f0)
        out = f0.copy()
        for k in (5, 3):
            sub = f0 / k
            ok = (sub >= lo) & (self._value(srh, np.maximum(sub, self.f0min)) >= 0.85 * ref) & (out == f0)
            out = np.where(ok, np.round(sub), out)
        return out


def mean_based_gcis(
    x: np.ndarray, res: np.ndarray, fs: int, f0_mean: float, active: np.ndarray | None = None
) -> np.ndarray:
    """SEDREAMS-style GCIs (Drugman et al. 2012): the mean-based signal (Blackman window of
    1.75 mean periods) gives one interval per cycle, from each minimum to the next maximum,
    and the GCI is the largest LP-residual peak in that interval. With `active` (a boolean
    per sample), only intervals containing an active sample are searched (the others' GCIs
    would fall on inactive samples)."""
    T0 = fs / max(f0_mean, 30.0)
    half = int(round(1.75 * T0 / 2))
    win = np.blackman(2 * half + 1)
    mbs = scipy.signal.fftconvolve(x, win / win.sum(), mode="same")
    b, a = _butter(2, 50.0, fs, "high")
    mbs = scipy.signal.filtfilt(b, a, mbs) if mbs.size > 15 else mbs
    d = np.diff(mbs)
    mins = np.nonzero((d[:-1] < 0) & (d[1:] >= 0))[0] + 1
    maxs = np.nonzero((d[:-1] > 0) & (d[1:] <= 0))[0] + 1
    if mins.size == 0 or maxs.size == 0:
        return np.zeros(0, int)
    nxt = np.searchsorted(maxs, mins)
    ok = nxt < maxs.size
    starts, stops = mins[ok], maxs[nxt[ok]]
    if active is not None:
        csum = np.concatenate([[0], np.cumsum(active[: x.size], dtype=np.int64)])
        hit = csum[np.minimum(stops + 1, csum.size - 1)] > csum[np.minimum(starts, csum.size - 1)]
        starts, stops = starts[hit], stops[hit]
    gcis = starts + _segment_argmax(res, starts, stops - starts + 1)
    return np.unique(gcis)


def _segment_argmax(v: np.ndarray, starts: np.ndarray, lengths: np.ndarray, cap: int = 1024) -> np.ndarray:
    """argmax of v[s:s+n] for every (s, n) (first maximum, as np.argmax): segments up to `cap`
    samples in one padded gather, longer ones one by one."""
    out = np.zeros(starts.size, int)
    short = np.nonzero(lengths <= cap)[0]
    for sel in _length_buckets(lengths[short], 2.0):
        s, n = starts[short[sel]], lengths[short[sel]]
        L = int(n.max())
        j = np.arange(L)[None, :]
        seg = v[np.minimum(s[:, None] + j, v.size - 1)]
        seg = np.where(j < n[:, None], seg, -np.inf)
        out[short[sel]] = seg.argmax(1)
    for i in np.nonzero(lengths > cap)[0]:
        out[i] = int(np.argmax(v[starts[i] : starts[i] + lengths[i]]))
    return out


def iaif(
    x: np.ndarray,
    fs: int,
    win_ms: float = 30.0,
    hop_ms: float = 10.0,
    d: float = 0.99,
    active: np.ndarray | None = None,
):
    """Iterative Adaptive Inverse Filtering (Alku 1992) frame by frame with overlap-add, as
    COVAREP's iaif_ola: returns (glottal flow, glottal flow derivative). With `active` (a
    boolean per sample), only frames within 20 ms of an active sample are analysed (the flow
    derivative is 0 elsewhere)."""
    p_vt, p_gl = 2 * round(fs / 2000) + 4, 2 * round(fs / 4000)
    b, a = _butter(4, 40.0, fs, "high")  # COVAREP hpfilt: remove < 40 Hz
    x = scipy.signal.filtfilt(b, a, x) if x.size > 27 else x
    L, hop = int(round(win_ms * fs / 1000)), int(round(hop_ms * fs / 1000))
    L = hop * int(round(L / hop))
    pre = p_vt + 1
    padded = np.pad(x, (pre, L))
    n_frames = max(1, int(np.ceil(x.size / hop)))
    starts_all = np.arange(n_frames) * hop + pre
    keep = np.ones(n_frames, bool)
    if active is not None:
        margin = int(0.02 * fs)
        pos = np.flatnonzero(active[: x.size])  # sorted active samples
        s0 = np.clip(starts_all - pre - margin, 0, x.size)
        s1 = np.clip(starts_all - pre + L + margin, 0, x.size)
        keep = np.searchsorted(pos, s1) > np.searchsorted(pos, s0)  # an active sample in [s0, s1)
    starts = starts_all[keep]
    if starts.size == 0:
        return np.zeros(x.size), np.zeros(x.size)
    ext = padded[(starts - pre)[:, None] + np.arange(L + pre)[None, :]]  # frames with `pre` samples of history
    frames = ext[:, pre:]
    win = np.hanning(L)
    integ = ([1.0], [1.0, -d])
    nfft = scipy.fft.next_fast_len(L + pre + p_vt + 1, real=True)
    E = scipy.fft.rfft(ext.astype(np.float32), n=nfft, axis=1)  # one spectrum serves the four inverse filters

    def inv(poly):
        y = scipy.fft.irfft(E * scipy.fft.rfft(poly.astype(np.float32), n=nfft, axis=1), n=nfft, axis=1)
        return y[:, pre : pre + L].astype(np.float64)

    g1 = lpc(frames * win, 1)
    y = inv(g1)
    hvt1 = lpc(y * win, p_vt)
    g = scipy.signal.lfilter(*integ, inv(hvt1), axis=1)
    hg1 = lpc(g * win, p_gl)
    y = scipy.signal.lfilter(*integ, inv(hg1), axis=1)
    hvt2 = lpc(y * win, p_vt)
    kept = np.nonzero(keep)[0]
    dg_sig = _overlap_add_rows(inv(hvt2) * win, kept, hop, x.size + L)  # frames not analysed are 0
    norm = _overlap_add_rows(np.broadcast_to(win, (n_frames, L)), np.arange(n_frames), hop, x.size + L)
    dg_sig = (dg_sig / np.maximum(norm, 1e-3))[: x.size]
    gf = scipy.signal.lfilter(*integ, dg_sig)
    return gf, dg_sig


_PSP_BINS = 256  # bins of the 2048-point pulse spectrum that PSP's parabola fit reads


def _psp_a(X: np.ndarray, ne_min: float = 0.01, first: int = 128) -> np.ndarray:
    """Alku 1997 PSP 'a' for many spectra at once: the largest N (from 3) for which the
    parabola a k^2 + b fits the first N dB bins with normalised error < ne_min. The fit is
    tried on the first `first` bins (the fit stops there for ~99 % of pulses; the running sums
    are prefixes, so the result is the same), then on all _PSP_BINS for the pulses that fit
    further."""
    X = X[:, :_PSP_BINS]  # the fit stops within the first few dozen bins of a 2048-point spectrum
    if first < X.shape[1]:
        a, fits_on = _psp_a_bins(X[:, :first], ne_min)
        if fits_on.any():
            a[fits_on] = _psp_a_bins(X[fits_on], ne_min)[0]
        return a
    return _psp_a_bins(X, ne_min)[0]


def _psp_a_bins(X: np.ndarray, ne_min: float) -> tuple[np.ndarray, np.ndarray]:
    """(_psp_a over the given bins, rows where no N up to the last bin fails)."""
    M, K = X.shape
    k2 = np.arange(K, dtype=float) ** 2
    N = np.arange(1, K + 1, dtype=float)
    s_k2, s_k4 = np.cumsum(k2), np.cumsum(k2 * k2)
    s_x, s_xk2, s_x2 = np.cumsum(X, 1), np.cumsum(X * k2, 1), np.cumsum(X * X, 1)
    den = N * s_k4 - s_k2**2
    a = (N * s_xk2 - s_x * s_k2) / np.where(den == 0, 1, den)
    b = (s_x - a * s_k2) / N
    sse = s_x2 - 2 * a * s_xk2 - 2 * b * s_x + a * a * s_k4 + 2 * a * b * s_k2 + N * b * b
    ne = sse / np.maximum(s_x2, TINY)
    ne[:, :2] = 0  # N starts at 3
    fail = ne >= ne_min
    stop = np.argmax(fail, axis=1)  # first N (index) that fails
    never = ~fail.any(1)
    stop[never] = K - 1
    return a[np.arange(M), stop], never


def vq_params(gf: np.ndarray, dgf: np.ndarray, fs: int, gcis: np.ndarray):
    """NAQ, QOQ, H1-H2 (unused: NaN) and PSP per glottal cycle (COVAREP get_vq_params), all
    cycles at once: returns times (s) and a [M, 4] array; cycles with F0 outside 20-500 Hz
    give NaN. Cycle n runs from GCI n-1 to GCI n; the flow pulse is compensated for zero-line
    drift (the line through its end points). QOQ's two 50 % crossings around the flow maximum
    are linearly interpolated between samples (COVAREP counts whole samples)."""
    M = gcis.size
    out = np.full((M, 4), np.nan)
    if M < 2:
        return gcis / fs, out
    shift = int(round(0.5e-3 * fs))
    start, stop = gcis[:-1], gcis[1:]
    T0 = stop - start
    ok = (T0 > 0) & (fs / np.maximum(T0, 1) > 20) & (fs / np.maximum(T0, 1) < 500)
    rows = np.nonzero(ok)[0]
    if rows.size == 0:
        return gcis / fs, out
    start, stop, T0 = start[rows], stop[rows], T0[rows]
    # cycles in buckets of similar length (each padded to its own longest: exact, and far
    # less padding than one [m, longest] array when a few cycles are long)
    for sel in _length_buckets(T0):
        _vq_cycles(gf, dgf, fs, shift, rows[sel], start[sel], stop[sel], T0[sel], out)
    return gcis / fs, out


def _length_buckets(lengths: np.ndarray, ratio: float = 1.5) -> list[np.ndarray]:
    """Indices of `lengths` (> 0) grouped so that within a group the longest is at most `ratio`
    times the shortest (for padded per-row batches: little padding, few batches)."""
    order = np.argsort(lengths, kind="stable")
    if order.size == 0:
        return []
    ls = lengths[order]
    edges = np.searchsorted(ls, max(int(ls[0]), 1) * ratio ** np.arange(1, 64), side="right")
    edges = np.unique(np.concatenate([[0], edges[edges < order.size], [order.size]]))
    return [order[b0:b1] for b0, b1 in zip(edges[:-1], edges[1:])]


def _vq_cycles(gf, dgf, fs, shift, rows, start, stop, T0, out) -> None:
    """vq_params for the given cycles (rows of `out` minus 1), written into out."""
    L = int(T0.max()) + 1
    j = np.arange(L)[None, :]
    inside = j <= T0[:, None]
    idx = np.minimum(start[:, None] + j, gf.size - 1)
    seg = np.where(inside, gf[idx], 0.0)  # [m, L], samples start..stop
    endv = seg[np.arange(rows.size), T0]
    line = seg[:, :1] + (endv - seg[:, 0])[:, None] * (j / T0[:, None])
    seg_c = np.where(inside, seg - line, -np.inf)
    jd = np.arange(L + shift)[None, :]
    stop2 = np.where(stop + shift <= dgf.size - 1, stop + shift, stop)
    didx = np.minimum(start[:, None] + jd, dgf.size - 1)
    d_peak = np.where(jd <= (stop2 - start)[:, None], np.abs(dgf[didx]), 0.0).max(1)
    imax = seg_c.argmax(1)
    r = np.arange(rows.size)
    f_ac = seg_c[r, imax]
    half = 0.5 * f_ac[:, None]
    below = (seg_c <= half) & inside
    # last sample at or below half before the maximum, first one after it
    left = np.where(below & (j < imax[:, None]), j, -1).max(1)
    right = np.where(below & (j > imax[:, None]), j, L + 1).min(1)
    sc = np.where(inside, seg_c, 0.0)

    def cross(i0):  # fractional position of the half-level crossing between i0 and i0 + 1
        i0c = np.clip(i0, 0, L - 2)
        y0, y1 = sc[r, i0c], sc[r, i0c + 1]
        return i0c + np.clip((half[:, 0] - y0) / np.where(y1 == y0, 1, y1 - y0), 0, 1)

    t1 = np.where(left >= 0, cross(left), 0.0)
    t2 = np.where(right <= T0, cross(right - 1), T0)
    out[rows + 1, 0] = (f_ac / (d_peak + TINY)) / T0
    out[rows + 1, 1] = (t2 - t1) / T0
    # PSP (Alku et al. 1997) of each min-max normalised flow pulse, 2048-point FFT
    nfft = 2048
    p = np.where(inside, seg - np.where(inside, seg, np.inf).min(1, keepdims=True), 0.0)
    p = p / (p.max(1, keepdims=True) + TINY)
    # float32 FFT (the pulse is normalised to [0, 1]; the fit reads dB values of the first bins)
    spec = scipy.fft.rfft(p[:, :nfft].astype(np.float32), n=nfft, axis=1)[:, :_PSP_BINS]
    X = 20 * np.log10(np.abs(spec).astype(np.float64) + TINY)
    a = _psp_a(X)
    out[rows + 1, 3] = a / _psp_amax_table(int(T0.max()), nfft)[T0]


_PSP_AMAX_TABLES: dict[int, np.ndarray] = {}


def _psp_amax_table(longest: int, nfft: int) -> np.ndarray:
    """PSP's a_max (the 'a' of a flat pulse of T0 samples) for T0 = 0..longest (0 unused) as an
    array indexed by T0, grown on demand: one gather per file, and the pulses of all new T0s
    analysed in one batch (row by row the same FFT and fit as one at a time)."""
    table = _PSP_AMAX_TABLES.get(nfft)
    if table is None or table.size <= longest:
        have = 1 if table is None else table.size
        t0 = np.arange(have, max(longest + 1, 2 * have))
        sig = np.where(np.arange(nfft)[None, :] < np.minimum(t0, nfft)[:, None], 1.0 / t0[:, None], 0.0)
        a = _psp_a(20 * np.log10(np.abs(np.fft.rfft(sig, axis=1)) + TINY))
        a[a == 0] = -TINY  # a flat fit: keep the sign of a / a_max
        table = np.concatenate([np.ones(1) if table is None else table, a])
        _PSP_AMAX_TABLES[nfft] = table
    return table


def wavelet_bank(fs: int, n_scales: int = 6) -> list[np.ndarray]:
    """Kane & Gobl's mother wavelet g(t) = -cos(2 pi f_n t) exp(-t^2 / (2 tau^2)),
    tau = 1 / (2 f_n), at f_n = fs/2, fs/4, ... (one octave per scale)."""
    bank = []
    for i in range(n_scales):
        fn = fs / 2 / 2**i
        tau = 1 / (2 * fn)
        t = np.arange(-int(np.ceil(5 * tau * fs)), int(np.ceil(5 * tau * fs)) + 1) / fs
        bank.append(-np.cos(2 * np.pi * fn * t) * np.exp(-(t**2) / (2 * tau**2)))
    return bank


def wavelet_decompose(x: np.ndarray, bank: list[np.ndarray]) -> np.ndarray:
    """[S, N] responses of x to the wavelet bank, all scales in one batched FFT convolution
    (x may be [B, N]: then [B, S, N], sharing the filters' spectra)."""
    x = np.asarray(x)
    single = x.ndim == 1
    x2 = np.atleast_2d(x).astype(np.float32)
    N = x2.shape[1]
    longest = max(len(h) for h in bank)
    n = scipy.fft.next_fast_len(N + longest, real=True)
    X = scipy.fft.rfft(x2, n=n, axis=1)
    y = scipy.fft.irfft(X[:, None, :] * _bank_spectra(bank, longest, n)[None], n=n, axis=2)
    out = y[:, :, longest // 2 : longest // 2 + N]
    return out[0] if single else out


_BANK_SPECTRA: dict[tuple, np.ndarray] = {}
_BANK_SPECTRA_KEPT = 16  # ~2 MB each at RAVDESS lengths; next_fast_len maps most files to few sizes


def _bank_spectra(bank: list[np.ndarray], longest: int, n: int) -> np.ndarray:
    """rfft of the bank matrix at size n, kept for the last few sizes (utterances of similar
    length share a 5-smooth FFT size, so most files reuse one)."""
    key = (n, tuple(h.tobytes() for h in bank))
    H = _BANK_SPECTRA.pop(key, None)
    if H is None:
        H = scipy.fft.rfft(_bank_matrix(tuple(len(h) for h in bank), bank, longest), n=n, axis=1)
        H.setflags(write=False)
        while len(_BANK_SPECTRA) >= _BANK_SPECTRA_KEPT:
            del _BANK_SPECTRA[next(iter(_BANK_SPECTRA))]  # least recently used first
    _BANK_SPECTRA[key] = H
    return H


def _bank_matrix(lengths, bank, longest) -> np.ndarray:
    """The bank as one [S, longest] float32 array, each filter centred at longest // 2."""
    M = np.zeros((len(bank), longest), np.float32)
    for i, h in enumerate(bank):
        o = longest // 2 - len(h) // 2
        M[i, o : o + len(h)] = h
    return M


def peak_slope(wav_resp: np.ndarray, fs: int, centres: np.ndarray, win_ms: float = 40.0) -> np.ndarray:
    """peakSlope (Kane & Gobl 2011): slope of the regression line of log10 of the per-scale
    maximum amplitude (within 40 ms around each frame) against the scale index."""
    size = int(round(win_ms * fs / 1000))
    S, N = wav_resp.shape
    hop = int(centres[1] - centres[0]) if centres.size > 1 else size
    if centres.size > 1 and size % hop == 0 and np.all(np.diff(centres) == hop):
        # max over [c - size/2, c + size/2) as the max of size/hop blocks of `hop` samples
        nb = size // hop
        first = int(centres[0]) - size // 2
        n_blocks = centres.size + nb - 1
        pad_l = max(0, -first)
        total = n_blocks * hop
        a = np.zeros((S, total), np.float32)
        lo, hi = first + pad_l, min(N, first + total)
        if hi > lo:
            a[:, pad_l : pad_l + hi - lo] = np.abs(wav_resp[:, lo:hi])
        blocks = a.reshape(S, n_blocks, hop).max(2)
        env = np.lib.stride_tricks.sliding_window_view(blocks, nb, axis=1).max(2)  # [S, T]
        peaks = np.log10(env.astype(np.float64) + TINY)
    else:
        env = scipy.ndimage.maximum_filter1d(np.abs(wav_resp), size=size, axis=1, mode="constant")
        peaks = np.log10(env[:, np.clip(centres, 0, N - 1)] + TINY)  # [S, T]
    s = np.arange(peaks.shape[0], dtype=float)
    s -= s.mean()
    return (s[:, None] * (peaks - peaks.mean(0))).sum(0) / (s * s).sum()


def mdq(res_resp: np.ndarray, fs: int, gcis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Maxima Dispersion Quotient (Kane & Gobl 2013): mean distance of each wavelet scale's
    LP-residual maximum (searched within half a period around the GCI) from the GCI, over T0."""
    vals = np.full(gcis.size, np.nan)
    if gcis.size < 2:
        return gcis / fs, vals
    N = res_resp.shape[1]
    T0 = np.diff(gcis)
    g = gcis[1:]
    ok = (T0 > 0) & (fs / np.maximum(T0, 1) > 20) & (fs / np.maximum(T0, 1) < 500)
    rows = np.nonzero(ok)[0]
    if rows.size == 0:
        return gcis / fs, vals
    T0, g = T0[rows], g[rows]
    for sel in _length_buckets(T0):
        t0, gg = T0[sel], g[sel]
        lo, hi = np.maximum(0, gg - t0 // 4), np.minimum(N, gg + t0 // 4 + 1)
        W = int((hi - lo).max())
        j = np.arange(W)[None, :]
        idx = np.minimum(lo[:, None] + j, N - 1)
        mag = np.abs(res_resp[:, idx])  # [S, m, W]
        mag = np.where((j < (hi - lo)[:, None])[None], mag, -1.0)
        loc = lo[None, :] + mag.argmax(2)  # [S, m]
        vals[rows[sel] + 1] = np.mean(np.abs(loc - gg[None, :]), axis=0) / t0
    return gcis / fs, vals


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


# ---- creaky voice cues (Kane, Drugman & Gobl 2013; Drugman, Kane & Gobl 2014; Ishi et al. 2008)


def _resonator(x: np.ndarray, f: float, rho: float, fs: int) -> np.ndarray:
    phi = 2 * np.pi * f / fs
    return scipy.signal.lfilter([1.0], [1.0, -2 * rho * np.cos(phi), rho * rho], x)


def _unit_acf(frames: np.ndarray, max_lag: int, n: int | None = None) -> np.ndarray:
    """Autocorrelation [T, max_lag+1] of frames via one FFT, divided by the lag-0 value."""
    n = n or scipy.fft.next_fast_len(frames.shape[1] + max_lag + 1, real=True)
    spec = scipy.fft.rfft(frames, n=n, axis=1)
    acf = scipy.fft.irfft(spec.real**2 + spec.imag**2, n=n, axis=1)[:, : max_lag + 1]
    return acf / (acf[:, :1] + TINY)


def kd_h2h1(
    res: np.ndarray,
    fs: int,
    centres: np.ndarray,
    f0_mean: float,
    need: np.ndarray | None = None,
    resonated: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Kane-Drugman H2-H1 (dB) of the residual through a resonator at the mean F0 (get_creak_h2h1):
    50 ms Hann frames; the 'creak F0' is the autocorrelation peak after the first zero
    crossing of the rho = 0.8 resonator output, H1 and H2 are read at 1 and 2 x that F0 on the
    power spectrum (= spectrum of the two-sided autocorrelation; COVAREP takes the one-sided
    one) of the rho = 0.97 output; 100 ms moving average. Computed every 20 ms and linearly
    interpolated to the frames (the contour is smoothed over 100 ms anyway).
    With `need` (a boolean per frame), only the 20 ms analyses that reach those frames through
    the interpolation and the smoothing are made; the other frames' values are then not valid.
    `resonated`: the rho = 0.8 resonator output when already computed (kd_peak_prominence's).
    Returns (H2H1, creak F0)."""
    L = int(round(0.05 * fs))
    win = np.hanning(L).astype(np.float32)
    n_sub = (centres.size + 1) // 2
    calc = np.ones(n_sub, bool)
    if need is not None:  # the 10-frame moving average and the interpolation reach 6 frames
        calc = scipy.ndimage.maximum_filter1d(need.astype(np.uint8), size=17, mode="constant")[::2] > 0
    sub = centres[::2][calc]
    rep = _resonator(res, f0_mean, 0.97, fs).astype(np.float32)
    rep2 = (_resonator(res, f0_mean, 0.8, fs) if resonated is None else resonated).astype(np.float32)
    nfft = scipy.fft.next_fast_len(2 * L, real=True)
    acf2 = _unit_acf(gather_frames(rep2, sub, L) * win, L - 1, nfft)
    k = np.arange(L)
    acf2 = acf2 * (L / (L - k))[None, :]
    neg = acf2 <= 0
    first = np.argmax(neg, axis=1)
    first[~neg.any(1)] = L - 1
    lag = np.where(k[None, :] >= first[:, None], acf2, -np.inf).argmax(1)
    lag = np.maximum(lag, 5)
    f0c = fs / lag
    spec = scipy.fft.rfft(gather_frames(rep, sub, L) * win, n=nfft, axis=1)  # power read at 4 bins per frame
    b1 = f0c * nfft / fs
    rows = np.arange(sub.size)

    def at(b):
        i = np.clip(np.floor(b).astype(int), 0, spec.shape[1] - 2)
        w = np.clip(b - i, 0, 1)
        return np.abs(spec[rows, i]) ** 2 * (1 - w) + np.abs(spec[rows, i + 1]) ** 2 * w

    h2h1_c, f0c_c = np.zeros(n_sub), np.full(n_sub, fs / 5.0)
    h2h1_c[calc] = 10 * np.log10((at(2 * b1) + TINY) / (at(b1) + TINY))
    f0c_c[calc] = f0c
    t = np.arange(centres.size)
    h2h1 = np.interp(t, t[::2], h2h1_c)
    f0c = np.interp(t, t[::2], f0c_c)
    return scipy.ndimage.uniform_filter1d(h2h1, 10, mode="nearest"), f0c


def kd_peak_prominence(
    res: np.ndarray,
    fs: int,
    centres: np.ndarray,
    f0_mean: float,
    energy_db: np.ndarray,
    resonated: np.ndarray | None = None,
) -> np.ndarray:
    """Residual peak prominence (res_peak / get_res_peak_prom): the residual through a rho = 0.8
    resonator at the mean F0; in a window of two periods of the highest plausible creak F0
    (90, 65 or 55 Hz by the mean F0) re-centred on its largest peak, 1 - (largest positive
    value outside +-20 % of the window around the peak) / peak; 0 where the frame energy is
    more than 4 dB below the maximum within 400 ms; median filter over 5 frames."""
    max_creak_f0 = 90.0 if f0_mean > 100 else (65.0 if f0_mean >= 85 else 55.0)
    W = 2 * int(round(fs / max_creak_f0))
    half = W // 2
    rep = _resonator(res, f0_mean, 0.8, fs) if resonated is None else resonated
    n = rep.size
    fr = gather_frames(np.abs(rep), centres, W)
    m = centres - half + fr.argmax(1)  # peak sample
    padded = np.pad(rep, (W, W))
    seg = padded[(m + W - half)[:, None] + np.arange(W + 1)[None, :]]
    pk = seg[:, half]
    seg = seg * np.sign(pk + TINY)[:, None] / (np.abs(pk) + TINY)[:, None]
    rem = int(round(0.2 * W))
    seg[:, half - rem : half + rem + 1] = 0.0
    prom = 1.0 - np.clip(seg.max(1), 0, 1)
    prom[(m - half < 0) | (m + half >= n)] = 0.0
    local_max = scipy.ndimage.maximum_filter1d(energy_db, size=81, mode="nearest")
    prom[energy_db < local_max - 4] = 0.0
    return scipy.ndimage.median_filter(prom, size=5, mode="nearest")


def ishi_cues(x: np.ndarray, fs: int, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ishi et al. (2008) vocal-fry cues at the frame centres, as COVAREP's ishi_creak_detection:
    on the 100-1500 Hz band, the very-short-term power contour (4 ms / 2 ms, 20 log10 of the
    mean square) gives power peaks (2 dB above the contour 6 ms either side, within 30 dB of
    the largest); PwP = min(rise, fall) of each peak over 10 ms; IPS = largest normalised
    cross-correlation (+-15 ms) of 15 ms segments around consecutive peaks < 100 ms apart;
    IFP = intra-frame periodicity, the smallest normalised autocorrelation over the multiples
    of the best lag (32 ms frames, lags 1-15 ms). PwP and IPS are read from the next peak within
    35 ms of each frame centre (0 when none). Returns (PwP, IFP, IPS) per frame."""
    T = centres.size
    sos = _ishi_band(fs)
    xf = _sosfiltfilt(sos, _ishi_zi(fs), x) if x.size > 60 else x
    L4, h2 = int(round(0.004 * fs)), int(round(0.002 * fs))
    n_pow = max(1, (xf.size - L4) // h2 + 1)
    csum = np.concatenate([[0.0], np.cumsum(xf**2)])
    starts = np.arange(n_pow) * h2
    pw = (csum[np.minimum(starts + L4, xf.size)] - csum[starts]) / L4
    pdb = 20 * np.log10(pw + 1e-20)
    t_pow = starts + L4 / 2
    pwp = np.zeros(T)
    ips_f = np.zeros(T)
    if n_pow > 12:
        pk = np.nonzero((pdb[1:-1] > pdb[:-2]) & (pdb[1:-1] >= pdb[2:]))[0] + 1
        lo, hi = np.maximum(pk - 3, 0), np.minimum(pk + 3, n_pow - 1)
        pk = pk[(pdb[pk] - 2 >= pdb[lo]) & (pdb[pk] - 2 >= pdb[hi])]
        if pk.size:
            pk = pk[pdb[pk] >= pdb[pk].max() - 30]
        if pk.size > 1:
            off = np.arange(-5, 6)
            ctx = pdb[np.clip(pk[:, None] + off[None, :], 0, n_pow - 1)]
            rise = (pdb[pk][:, None] - ctx[:, :5]).max(1)
            fall = (pdb[pk][:, None] - ctx[:, 6:]).max(1)
            p_val = np.minimum(rise, fall)
            ps = np.round(t_pow[pk]).astype(int)
            N = int(round(0.015 * fs))
            hN = N // 2
            padded = np.pad(xf, (hN, hN + 1))
            segs = padded[ps[:, None] + np.arange(N + 1)[None, :]]
            nfft = scipy.fft.next_fast_len(2 * (N + 1), real=True)
            S = scipy.fft.rfft(segs, n=nfft, axis=1)
            xc = scipy.fft.irfft(S[1:] * np.conj(S[:-1]), n=nfft, axis=1)
            en = np.sqrt((segs[1:] ** 2).sum(1) * (segs[:-1] ** 2).sum(1)) + TINY
            ips = np.r_[0.0, xc.max(1) / en]
            ips[1:][np.diff(ps) > 0.1 * fs] = 0.0
            nxt = np.searchsorted(ps, centres)
            ok = nxt < ps.size
            near = ok & ((ps[np.minimum(nxt, ps.size - 1)] - centres) < 0.035 * fs)
            idx = np.minimum(nxt, ps.size - 1)
            pwp = np.where(near, p_val[idx], 0.0)
            ips_f = np.where(near, ips[idx], 0.0)
    # IFP on 32 ms frames of the band-passed signal
    N = int(round(0.032 * fs))
    max_lag = int(round(0.015 * fs))
    tol = int(round(0.001 * fs))
    fr = gather_frames(xf.astype(np.float32), centres, N)
    acf = _unit_acf(fr, max_lag)
    k = np.arange(max_lag + 1)
    acf = acf * (N / (N - k))[None, :]
    acf[:, :tol] = 0.0
    best = acf.argmax(1)
    ifp = acf.max(1)
    # the smallest peak (+-tol) at the multiples 2..max_lag/tol of the best lag below max_lag,
    # all multiples in one gather (a minimum: the order does not matter)
    c = best[:, None] * np.arange(2, max_lag // tol + 1)[None, :]  # [T, M]
    win = np.clip(c[:, :, None] + np.arange(-tol, tol + 1), 0, max_lag)  # [T, M, 2 tol + 1]
    vals = acf[np.arange(acf.shape[0])[:, None, None], win].max(2)
    ifp = np.minimum(ifp, np.where(c < max_lag, vals, np.inf).min(1, initial=np.inf))
    ifp = np.clip(np.where(best > 0, ifp, 0.0), 0, 1)
    low = ifp < 0.5
    nxt1 = np.r_[low[1:], False]
    nxt2 = np.r_[low[2:], False, False]
    ifp = np.where(nxt1 | nxt2, 0.0, ifp)
    return pwp, ifp, ips_f


def _sosfiltfilt(sos: np.ndarray, zi: np.ndarray, x: np.ndarray) -> np.ndarray:
    """scipy.signal.sosfiltfilt(sos, x) for a 1-d x (odd padding of the default length) with
    its sosfilt_zi(sos) given: the same steps and values, without solving for zi every call."""
    ntaps = 2 * sos.shape[0] + 1 - min(int((sos[:, 2] == 0).sum()), int((sos[:, 5] == 0).sum()))
    edge = 3 * ntaps
    ext = np.concatenate((2 * x[:1] - x[edge:0:-1], x, 2 * x[-1:] - x[-2 : -(edge + 2) : -1]))  # odd_ext
    y, _ = scipy.signal.sosfilt(sos, ext, zi=zi * ext[:1])
    y, _ = scipy.signal.sosfilt(sos, y[::-1], zi=zi * y[-1:])
    return y[::-1][edge:-edge]


_ISHI_SOS: dict[int, np.ndarray] = {}
_ISHI_ZI: dict[int, np.ndarray] = {}


def _ishi_zi(fs: int) -> np.ndarray:
    if fs not in _ISHI_ZI:
        _ISHI_ZI[fs] = scipy.signal.sosfilt_zi(_ishi_band(fs))
    return _ISHI_ZI[fs]


def _ishi_band(fs: int) -> np.ndarray:
    if fs not in _ISHI_SOS:
        order, wn = scipy.signal.buttord([100 / (fs / 2), 1500 / (fs / 2)], [50 / (fs / 2), 3000 / (fs / 2)], 3, 40)
        _ISHI_SOS[fs] = scipy.signal.butter(order, wn, "band", output="sos")
    return _ISHI_SOS[fs]
