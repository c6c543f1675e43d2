"""COVAREP-like 74-d acoustic features (the CMU-MOSEI / LGCCT audio input), 100 frames/s.

Columns, in COVAREP's `COVAREP_feature_extraction.m` order (Degottex et al., ICASSP 2014):
F0, VUV, NAQ, QOQ, H1H2, PSP, MDQ, peakSlope, Rd, Rd_conf, creak, MCEP_0..24, HMPDM_0..24,
HMPDD_0..12. Frame t is centred on sample 80 + 160 t at 16 kHz (5 ms + 10 ms t), as COVAREP's
`feature_sampling`, so T = (N - 80) // 160 + 1. The methods and every deviation from the
MATLAB reference are listed in docs/features-acoustic.md; the main ones:

- F0 is SRH (as COVAREP) and is 0 in unvoiced frames (COVAREP leaves SRH's unvoiced F0
  guesses in); NAQ, QOQ, H1H2, PSP, MDQ, Rd, Rd_conf, HMPDM, HMPDD are 0 in unvoiced frames
  (COVAREP interpolates glottal parameters across unvoiced gaps, then NaN -> 0).
- IAIF is frame-wise with overlap-add (COVAREP's iaif_ola) instead of GCI-synchronous.
- Rd is searched on a 0.01 grid with parabolic refinement instead of Brent's method.
- creak is a rule-based stand-in for COVAREP's trained ANN (weights not reproduced): the
  Kane-Drugman cues (residual H2-H1, residual peak prominence) and Ishi's (PwP, IFP, IPS),
  each a logistic indicator at its published threshold, combined as
  sqrt(noisy-OR(KD) x product(Ishi)); see `creak_probability`.
- F0: SRH candidates are tracked (Viterbi over the 5 best peaks, octave-jump cost) and
  checked for odd-multiple (3 F0, 5 F0) errors; COVAREP takes the per-frame argmax.
- MCEP: log harmonic-peak envelope, cepstrally smoothed to order 0.5 fs/F0 (the True
  Envelope's order), then all-pass warped cepstrum (alpha 0.42 at 16 kHz) of order 24.
- HMPD statistics are taken over 10 ms frames (PDM over ~6 periods, PDD over 3 frames);
  PDD is encoded as a warped cepstrum (order 12), PDM sampled at 25 lin/log harmonic numbers.

Everything is numpy/scipy (see glottal.py and phase.py for why these are written here); the
per-frame work is batched, so the extractor runs well above real time on one core.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.fft
import scipy.ndimage

from sertool.corpora.base import Utterance
from sertool.features import glottal, phase
from sertool.features.base import Extractor, ExtractorError, FeatureResult, register_extractor

N_MCEP, N_PDM, N_PDD = 25, 25, 13
COLUMNS = (
    ["F0", "VUV", "NAQ", "QOQ", "H1H2", "PSP", "MDQ", "peakSlope", "Rd", "Rd_conf", "creak"]
    + [f"MCEP_{i}" for i in range(N_MCEP)]
    + [f"HMPDM_{i}" for i in range(N_PDM)]
    + [f"HMPDD_{i}" for i in range(N_PDD)]
)
assert len(COLUMNS) == 74


def creak_probability(h2h1, prom, pwp, ifp, ips):
    """Creak score in [0, 1] from the Kane-Drugman and Ishi cues (sertool's rule, not COVAREP's
    trained ANN, whose weights are not reproduced here).

    Each cue becomes a soft indicator s(z) = 1 / (1 + exp(-z)) centred on its published
    threshold: H2-H1 > -6 dB (scale 2 dB), residual peak prominence > 0.3 (scale 0.1), power
    peak PwP > 7 dB (scale 2 dB), intra-frame periodicity IFP < 0.5 and inter-pulse similarity
    IPS > 0.5 (scale 0.1; the three thresholds of Ishi et al. 2008). The Kane-Drugman cues
    are combined by noisy-OR (either kind of creak: H2-H1 for low-F0 creak, prominence for
    isolated pulses), Ishi's by product (his detector needs all three), and the score is the
    geometric mean of the two: creak needs a KD cue and an irregular, pulse-like excitation
    (unvoiced noise has a high H2-H1 but neither power peaks nor similar pulses)."""

    def s(z):
        return 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))

    kd = 1 - (1 - s((h2h1 + 6.0) / 2.0)) * (1 - s((prom - 0.3) / 0.1))
    ishi = s((pwp - 7.0) / 2.0) * s((0.5 - ifp) / 0.1) * s((ips - 0.5) / 0.1)
    return np.sqrt(kd * ishi)


@register_extractor("covarep")
class Covarep(Extractor):
    """COVAREP-like 74-d glottal, spectral-envelope and phase features at 100 frames/s."""

    kind = "audio"
    needs_audio = True

    def __init__(
        self,
        f0min: float = 50.0,
        f0max: float = 500.0,
        hop_ms: float = 10.0,
        alpha: float = 0.42,
        polarity: str = "auto",
        sample_rate: int = 16000,
    ):
        if polarity not in ("auto", "keep", "invert"):
            raise ExtractorError(f"polarity must be auto, keep or invert, got {polarity!r}")
        if not 0 < f0min < f0max:
            raise ExtractorError(f"need 0 < f0min < f0max, got {f0min}, {f0max}")
        self.f0min, self.f0max, self.hop_ms = float(f0min), float(f0max), float(hop_ms)
        self.alpha, self.polarity, self.sample_rate = float(alpha), polarity, int(sample_rate)
        self.hop = int(round(self.hop_ms * self.sample_rate / 1000))
        self._srh = glottal.SRH(self.sample_rate, self.f0min, self.f0max)
        self._bank = glottal.wavelet_bank(self.sample_rate)
        self._nfft_env = 1024
        self._nfft_harm = scipy.fft.next_fast_len(int(np.ceil(3 * self.sample_rate / self.f0min)) + 2, real=True)
        self._fwcep = phase.warped_cepstrum_matrix(self._nfft_env // 2 + 1, N_MCEP - 1, self.alpha)
        self._fwcep_pdd = phase.warped_cepstrum_matrix(self._nfft_env // 2 + 1, N_PDD - 1, self.alpha)
        self._pdm_pos = phase.loglin_harmonic_positions(N_PDM, 8.0, self.sample_rate / 2 / self.f0min)
        self._mcep_maps: dict[float, np.ndarray] = {}  # F0 -> [K, N_MCEP] (see _mcep)
        self._lifter_maps: dict[int, np.ndarray] = {}  # smoothing order -> [bins, N_MCEP]
        self._cep_basis = None

    def params(self) -> dict[str, Any]:
        return {
            "f0min": self.f0min,
            "f0max": self.f0max,
            "hop_ms": self.hop_ms,
            "alpha": self.alpha,
            "polarity": self.polarity,
            "sample_rate": self.sample_rate,
        }

    def file_attrs(self) -> dict[str, Any]:
        return {
            "dim": 74,
            "frame_rate_hz": self.sample_rate / self.hop,
            "columns": list(COLUMNS),
            "frame_centre": f"frame t is centred on sample {self.hop // 2} + {self.hop} t",
            "unvoiced": "zeros (F0 and the glottal/phase columns)",
            "reference": "COVAREP 1.4 (Degottex et al. 2014)",
        }

    def centres(self, n: int) -> np.ndarray:
        first = self.hop // 2
        count = max(1, (n - first) // self.hop + 1)
        return np.minimum(first - 1 + self.hop * np.arange(count), max(n - 1, 0))

    def extract(self, utt: Utterance | None, wave: np.ndarray | None) -> FeatureResult:
        if wave is None:
            raise ExtractorError("covarep needs audio")
        return FeatureResult(self.compute(wave), {})

    def compute(self, wave: np.ndarray) -> np.ndarray:
        fs = self.sample_rate
        x = np.asarray(wave, dtype=np.float64).reshape(-1)
        if x.size == 0:
            raise ExtractorError("empty waveform")
        centres = self.centres(x.size)
        T = centres.size
        out = np.zeros((T, 74))
        peak = np.max(np.abs(x))
        if peak < 1e-6 or x.size < 0.03 * fs:
            return out.astype(np.float32)  # silence / too short: all zeros (COVAREP: NaN -> 0)
        x = x / peak  # level-independent analysis (MCEP_0 restored below)
        times = (centres + 1) / fs
        p = fs // 1000 + 2
        hp = glottal.reskew_highpass(x, fs) if self.polarity == "auto" and x.size >= 0.05 * fs else None
        res, *rest = glottal.lpc_residuals(x, round(0.025 * fs), round(0.005 * fs), (p,), extra_source=hp)
        if self.polarity == "invert" or (
            self.polarity == "auto" and hp is not None and glottal.polarity_reskew(x, fs, res, rest[0]) < 0
        ):
            x, res = -x, -res

        # pitch and voicing: SRH on the LP residual (order fs/1000 + 2 for both SRH and GCIs;
        # COVAREP's SRH uses order 3/4 fs/1000, one more LPC pass for little difference)
        f0, vuv, _, res_spec = self._srh(res, centres)
        voiced = vuv.astype(bool)
        out[:, 0] = np.where(voiced, f0, 0.0)
        out[:, 1] = voiced

        # GCIs, glottal flow (IAIF) and per-cycle voice-quality parameters
        f0_med = float(np.median(f0[voiced])) if voiced.any() else 100.0
        # GCIs are kept in voiced frames only (sample n belongs to the first frame centred at or after it)
        act_gci = np.repeat(voiced, np.diff(np.concatenate([[-1], centres])))
        act_gci = np.concatenate([act_gci, np.full(max(0, x.size - act_gci.size), voiced[-1])])
        gcis = glottal.mean_based_gcis(x, res, fs, f0_med, active=act_gci)
        if gcis.size:
            frame_of = np.clip(np.searchsorted(centres, gcis), 0, T - 1)
            gcis = gcis[voiced[frame_of]]
        act = np.zeros(x.size, bool)
        act[centres[voiced]] = True
        gf, dgf = glottal.iaif(x, fs, active=act)  # the flow is only read in voiced frames
        t_g, vq = glottal.vq_params(gf, dgf, fs, gcis)
        for j, col in ((0, 2), (1, 3), (3, 5)):
            out[:, col] = glottal.interp_events(t_g, vq[:, j], times)
        # wavelet-based MDQ (on the residual) and peakSlope (on the speech)
        res_resp, x_resp = glottal.wavelet_decompose(np.stack([res, x]), self._bank)
        t_m, mdq = glottal.mdq(res_resp, fs, gcis)
        out[:, 6] = glottal.interp_events(t_m, mdq, times)
        out[:, 7] = glottal.peak_slope(x_resp, fs, centres)

        # harmonic analysis (unvoiced frames analysed at 100 Hz, as COVAREP)
        f0_h = np.where(voiced, f0, 100.0)
        amp, ph, nharm = phase.harmonic_analysis(x, fs, centres, f0_h, nfft=self._nfft_harm, phase_rows=voiced)
        # H1-H2 of the glottal flow derivative over 3 periods (COVAREP get_vq_params), per frame
        if voiced.any():
            n_voiced = int(voiced.sum())
            gamp, _, _ = phase.harmonic_analysis(
                dgf,
                fs,
                centres[voiced],
                f0_h[voiced],
                nfft=self._nfft_harm,
                max_harm=2,
                phase_rows=np.zeros(n_voiced, bool),  # amplitudes only
            )
            out[voiced, 4] = 20 * np.log10((gamp[:, 0] + 1e-9) / (gamp[:, 1] + 1e-9))
        rd, conf = phase.rd_msp(amp, ph, nharm, voiced)
        out[:, 8], out[:, 9] = rd, conf

        # creak (rule-based stand-in for COVAREP's ANN, see creak_probability)
        out[:, 10] = self._creak(x, res, centres, f0[voiced] if voiced.any() else f0[:0])

        # MCEP: warped cepstrum of the cepstrally smoothed harmonic envelope
        out[:, 11 : 11 + N_MCEP] = self._mcep(amp, nharm, f0_h) + np.r_[np.log(peak), np.zeros(N_MCEP - 1)]

        # HMPD: phase distortion mean and deviation (only voiced frames carry them; the
        # moving statistics give unvoiced frames zero weight, so they are taken over the frames
        # from the first to the last voiced one plus a margin of zero-weight frames wider than
        # the windows: the running sums reach the first voiced frame at exactly 0 either way)
        vi = np.nonzero(voiced)[0]
        if vi.size:
            kv = max(int(nharm[vi].max()), 2)  # harmonics beyond the voiced frames' last are masked
            mean_frames = max(3, int(round(6 / f0_med / (self.hop / fs))) | 1)
            margin = mean_frames + 3
            a, b = max(0, int(vi[0]) - margin), min(T, int(vi[-1]) + 1 + margin)
            rv = vi - a
            pd = np.zeros((b - a, kv - 1))
            mask = np.zeros_like(pd)
            pd[rv], mask[rv] = phase.phase_distortion(amp[vi, :kv], ph[vi, :kv], nharm[vi])
            pdm, pdd = phase.hmpd_stats(pd, mask, mean_frames, 3)
            n_pd = np.maximum(nharm[vi] - 1, 0)
            out[vi, 36 : 36 + N_PDM] = phase.sample_harmonics(pdm[rv], self._pdm_pos, n_pd, circular=True)
            out[vi, 61 : 61 + N_PDD] = self._pdd_cepstrum(pdd[rv], n_pd, f0_h[vi])
        unv = ~voiced
        out[unv, 2:10] = 0.0
        out[unv, 36:] = 0.0
        out[np.isnan(out) | np.isinf(out)] = 0.0
        return out.astype(np.float32)

    def _creak(self, x: np.ndarray, res: np.ndarray, centres: np.ndarray, f0_voiced: np.ndarray) -> np.ndarray:
        fs = self.sample_rate
        f0_mean = float(np.median(f0_voiced)) if f0_voiced.size >= 3 else 100.0
        energy = scipy.ndimage.uniform_filter1d(x * x, size=round(0.03 * fs), mode="constant")[centres]
        energy_db = 10 * np.log10(energy + 1e-12)
        act = energy_db > energy_db.max() - 40  # creak is 0 below (silence, pauses)
        out = np.zeros(centres.size)
        if not act.any():
            return out
        rep08 = glottal._resonator(res, f0_mean, 0.8, fs)  # shared by both Kane-Drugman cues
        h2h1, _ = glottal.kd_h2h1(res, fs, centres, f0_mean, need=act, resonated=rep08)
        prom = glottal.kd_peak_prominence(res, fs, centres[act], f0_mean, energy_db[act], resonated=rep08)
        pwp, ifp, ips = glottal.ishi_cues(x, fs, centres[act])
        out[act] = creak_probability(h2h1[act], prom, pwp, ifp, ips)
        return out

    def _envelope_grid(self, values: np.ndarray, nharm: np.ndarray, f0: np.ndarray) -> np.ndarray:
        """Per-harmonic values (index 0 = harmonic 1) -> [T, nfft/2+1] by linear interpolation
        over frequency, held constant below f0 and above the last harmonic."""
        T, K = values.shape
        nb = self._nfft_env // 2 + 1
        freqs = np.linspace(0, self.sample_rate / 2, nb)
        h = freqs[None, :] / f0[:, None]  # fractional harmonic number
        h = np.clip(h, 1, np.maximum(nharm, 1)[:, None])
        i0 = np.clip(np.floor(h).astype(int) - 1, 0, K - 1)
        i1 = np.clip(i0 + 1, 0, np.maximum(nharm - 1, 0)[:, None])
        w = h - np.floor(h)
        r = np.arange(T)[:, None]
        return values[r, i0] * (1 - w) + values[r, i1] * w

    def _mcep(self, amp: np.ndarray, nharm: np.ndarray, f0: np.ndarray) -> np.ndarray:
        la = np.log(amp + 1e-9)
        uf0, inv = np.unique(f0, return_inverse=True)
        if not np.array_equal(uf0, np.round(uf0)):
            return self._mcep_direct(la, nharm, f0)
        # log harmonic amplitudes -> envelope grid -> cepstral smoothing -> warped cepstrum is
        # linear for a given F0 (the grid and the smoothing order depend on F0 only): one
        # [K, N_MCEP] matrix per F0 value (SRH F0s lie on a 1 Hz grid), applied per group
        out = np.empty((f0.size, N_MCEP))
        order = np.argsort(inv, kind="stable")
        bounds = np.searchsorted(inv[order], np.arange(uf0.size + 1))
        for i, f in enumerate(uf0):
            rows = order[bounds[i] : bounds[i + 1]]
            P = self._mcep_map(float(f))
            out[rows] = la[rows, : P.shape[0]] @ P
        return out

    def _mcep_map(self, f0: float) -> np.ndarray:
        """[K, N_MCEP]: _mcep_direct as a matrix for one F0, W_f0 @ S_order, where W_f0 [K, bins]
        is the envelope-grid interpolation and S_order [bins, N_MCEP] the liftering + warped
        cepstrum (sum over kept quefrencies q of outer(irfft row q, (rfft.real @ fwcep) row q))."""
        P = self._mcep_maps.get(f0)
        if P is None:
            fs, n = self.sample_rate, self._nfft_env
            K = max(int(np.floor((fs / 2 - f0 / 2) / f0)), 1)  # harmonic_analysis' nharm
            # _envelope_grid's interpolation weights as a matrix (row k: harmonic k + 1)
            nb = n // 2 + 1
            h = np.clip(np.linspace(0, fs / 2, nb) / f0, 1, K)
            i0 = np.clip(np.floor(h).astype(int) - 1, 0, K - 1)
            i1 = np.clip(i0 + 1, 0, K - 1)
            w = h - np.floor(h)
            W = np.zeros((K, nb))
            cols = np.arange(nb)
            W[i0, cols] = 1 - w
            W[i1, cols] += w
            order = int(np.round(0.5 * fs / f0))
            if self._cep_basis is None:
                R = scipy.fft.irfft(np.eye(n // 2 + 1), n=n, axis=1)  # [bins, n]: log spectrum -> cepstrum
                G = scipy.fft.rfft(np.eye(n), axis=1).real @ self._fwcep  # [n, N_MCEP]
                self._cep_basis = (R, G)
            S = self._lifter_maps.get(order)  # shared by the F0s with the same order
            if S is None:
                R, G = self._cep_basis
                q = np.minimum(np.arange(n), n - np.arange(n))
                keep = q <= order
                S = self._lifter_maps[order] = R[:, keep] @ G[keep]  # liftering + warped cepstrum [bins, N_MCEP]
            P = self._mcep_maps[f0] = W @ S
        return P

    def _mcep_direct(self, logamp: np.ndarray, nharm: np.ndarray, f0: np.ndarray) -> np.ndarray:
        logenv = self._envelope_grid(logamp, nharm, f0)
        # cepstral smoothing to the True Envelope's order round(0.5 fs / f0)
        n = self._nfft_env
        cep = scipy.fft.irfft(logenv, n=n, axis=1)
        order = np.round(0.5 * self.sample_rate / f0).astype(int)
        q = np.minimum(np.arange(n), n - np.arange(n))
        cep = np.where(q[None, :] <= order[:, None], cep, 0.0)
        smooth = scipy.fft.rfft(cep, axis=1).real
        return smooth @ self._fwcep

    def _pdd_cepstrum(self, pdd: np.ndarray, n_pd: np.ndarray, f0: np.ndarray) -> np.ndarray:
        X = self._envelope_grid(pdd, np.maximum(n_pd, 1), f0)
        X = np.where(X <= 0, 0.001, X)
        return np.log(X) @ self._fwcep_pdd
