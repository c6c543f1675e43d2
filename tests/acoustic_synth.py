"""Synthetic test signals with known acoustics (pitch, formants, voicing) for the acoustic tests.

`vowel` is a source-filter vowel: a Rosenberg-like glottal pulse train at a known f0 (with
optional jitter) through a cascade of second-order resonators at known formant frequencies.
"""

from __future__ import annotations

import numpy as np
import scipy.signal

SR = 16000


def glottal_train(
    f0: float | np.ndarray,
    duration: float,
    sr: int = SR,
    open_quotient: float = 0.6,
    seed: int = 0,
    jitter: float = 0.0,
) -> np.ndarray:
    """Derivative of a Rosenberg glottal flow pulse train (the excitation seen at the lips)."""
    rng = np.random.default_rng(seed)
    n = int(round(duration * sr))
    f0 = np.broadcast_to(np.asarray(f0, dtype=float), (n,))
    flow = np.zeros(n)
    t = 0.0
    while True:
        period = 1.0 / f0[min(int(t * sr), n - 1)] * (1 + jitter * rng.standard_normal())
        start = int(round(t * sr))
        length = int(round(period * sr))
        if start + length >= n:
            break
        n_open = int(open_quotient * length)
        n_rise = int(0.66 * n_open)
        k = np.arange(n_open)
        pulse = np.where(
            k < n_rise,
            0.5 * (1 - np.cos(np.pi * k / max(n_rise, 1))),
            np.cos(0.5 * np.pi * (k - n_rise) / max(n_open - n_rise, 1)),
        )
        flow[start : start + n_open] += pulse
        t += period
    return np.diff(flow, prepend=0.0)


def resonators(x: np.ndarray, formants=(700, 1220, 2600), bandwidths=(80, 90, 120), sr: int = SR) -> np.ndarray:
    y = x
    for f, b in zip(formants, bandwidths):
        r = np.exp(-np.pi * b / sr)
        a = [1, -2 * r * np.cos(2 * np.pi * f / sr), r * r]
        y = scipy.signal.lfilter([sum(a)], a, y)
    return y


def vowel(
    f0: float | np.ndarray = 120.0,
    duration: float = 1.0,
    formants=(700, 1220, 2600),
    bandwidths=(80, 90, 120),
    sr: int = SR,
    jitter: float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """A float32 vowel at peak 0.5 with a known f0 and formants."""
    y = resonators(glottal_train(f0, duration, sr, seed=seed, jitter=jitter), formants, bandwidths, sr)
    y = y / (np.max(np.abs(y)) + 1e-12) * 0.5
    if noise:
        y = y + noise * np.random.default_rng(seed + 1).standard_normal(y.size)
    return y.astype(np.float32)


def sine(freq: float = 440.0, duration: float = 1.0, sr: int = SR, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(duration * sr))) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def white_noise(duration: float = 1.0, sr: int = SR, amp: float = 0.1, seed: int = 0) -> np.ndarray:
    return (amp * np.random.default_rng(seed).standard_normal(int(round(duration * sr)))).astype(np.float32)


def silence(duration: float = 1.0, sr: int = SR) -> np.ndarray:
    return np.zeros(int(round(duration * sr)), np.float32)


def speech_like(duration: float = 2.0, sr: int = SR, seed: int = 0) -> np.ndarray:
    """Alternating voiced vowels (gliding f0), fricative noise and silence."""
    rng = np.random.default_rng(seed)
    parts = []
    while sum(p.size for p in parts) < duration * sr:
        f0 = np.linspace(rng.uniform(100, 140), rng.uniform(150, 220), int(0.3 * sr))
        parts.append(
            vowel(
                f0, 0.3, formants=(rng.uniform(300, 800), rng.uniform(900, 2200), 2700), seed=int(rng.integers(1 << 30))
            )
        )
        parts.append(white_noise(0.08, sr, 0.05, seed=int(rng.integers(1 << 30))))
        parts.append(silence(0.07, sr))
    return np.concatenate(parts)[: int(duration * sr)].astype(np.float32)


# ---- Liljencrants-Fant (LF) glottal model, Rd parametrisation -------------------------------
# Written from the papers (Fant, Liljencrants & Lin, STL-QPSR 1985; Fant, "The LF-model
# revisited", STL-QPSR 1995), independently of sertool.features.phase, so that the tests do not
# check the extractor against its own model code.


def lf_rd_to_times(rd: float) -> tuple[float, float, float]:
    """Fant (1995) Rd -> (tp, te, ta) as fractions of T0 (eqs. for Rap, Rkp, Rgp)."""
    rap = (-1.0 + 4.8 * rd) / 100.0
    rkp = (22.4 + 11.8 * rd) / 100.0
    rgp = 0.25 * rkp / (0.11 * rd / (0.5 + 1.2 * rkp) - rap)
    tp = 1.0 / (2.0 * rgp)
    te = tp * (1.0 + rkp)
    return tp, te, rap


def lf_derivative(rd: float, n: int) -> np.ndarray:
    """One period (n samples, T0 = 1, Ee = 1) of the LF glottal flow derivative.

    Open phase E0 exp(a t) sin(pi t / tp) up to te (where it reaches -Ee), exponential return
    phase with time constant ta (eps ta = 1 - exp(-eps (1 - te))); `a` makes the net flow over
    the period zero. Both constraints are solved numerically on the sampled waveform."""
    import scipy.optimize

    tp, te, ta = lf_rd_to_times(rd)
    t = (np.arange(n) + 0.5) / n
    eps = scipy.optimize.brentq(lambda e: e * ta - 1 + np.exp(-e * (1 - te)), 1e-3 / ta, 1e3 / ta)
    ret = np.where(t > te, -(np.exp(-eps * (t - te)) - np.exp(-eps * (1 - te))) / (eps * ta), 0.0)
    wg = np.pi / tp

    def period(a):
        e0 = -1.0 / (np.exp(a * te) * np.sin(wg * te))
        return np.where(t <= te, e0 * np.exp(a * t) * np.sin(wg * t), ret)

    a = scipy.optimize.brentq(lambda a: period(a).sum(), -200.0, 200.0)
    return period(a)


def lf_truth(rd: float, n: int = 20000) -> dict[str, float]:
    """Known voice-quality values of the LF flow with shape Rd (flow = integral of the
    derivative): NAQ = f_ac / (d_peak T0) (Alku et al. 2002), QOQ = fraction of the period with
    flow above 50 % of its maximum (quasi-open quotient), OQ = te + ta-ish open quotient."""
    d = lf_derivative(rd, n)
    flow = np.cumsum(d) / n
    flow -= flow.min()
    naq = flow.max() / (np.max(-d) * 1.0)
    qoq = float(np.mean(flow > 0.5 * flow.max()))
    return {"Rd": rd, "NAQ": float(naq), "QOQ": qoq}


def lf_train(
    rd: float,
    f0: float = 120.0,
    duration: float = 0.6,
    sr: int = SR,
    formants=(700, 1220, 2600),
    bandwidths=(80, 90, 120),
    jitter: float = 0.0,
    seed: int = 0,
) -> np.ndarray:
    """Speech-like signal: a train of LF flow-derivative periods of shape `rd` (period lengths
    rounded to samples) through the formant resonators (radiation is already in the flow
    derivative), float32 at peak 0.5."""
    rng = np.random.default_rng(seed)
    n = int(round(duration * sr))
    out, pos = [], 0
    cache: dict[int, np.ndarray] = {}
    while pos < n:
        T = int(round(sr / f0 * (1 + jitter * rng.standard_normal())))
        if T not in cache:
            cache[T] = lf_derivative(rd, T)
        out.append(cache[T])
        pos += T
    y = np.concatenate(out)[:n]
    if formants:
        y = resonators(y, formants, bandwidths, sr)
    return (0.5 * y / np.max(np.abs(y))).astype(np.float32)


def impulse_vowel(
    f0: float = 120.0, duration: float = 0.6, formants=(700, 1220, 2600), bandwidths=(80, 90, 120), sr: int = SR
) -> np.ndarray:
    """Unit impulse train through the formant resonators: a flat source, so the harmonic
    amplitudes sample exactly the resonators' response (known spectral envelope)."""
    x = np.zeros(int(round(duration * sr)))
    x[:: int(round(sr / f0))] = 1.0
    y = resonators(x, formants, bandwidths, sr)
    return (0.5 * y / np.max(np.abs(y))).astype(np.float32)


def resonator_response_db(
    n_bins: int, formants=(700, 1220, 2600), bandwidths=(80, 90, 120), sr: int = SR
) -> np.ndarray:
    """|H| in dB of the resonator cascade at n_bins frequencies uniform on 0..sr/2."""
    h = np.zeros(8192)
    h[0] = 1.0
    h = resonators(h, formants, bandwidths, sr)
    return 20 * np.log10(np.abs(np.fft.rfft(h, 2 * (n_bins - 1))) + 1e-12)


def harmonic_signal(
    f0: float = 150.0, duration: float = 0.8, random_phase: bool = False, hop: float = 0.01, sr: int = SR, seed: int = 0
) -> np.ndarray:
    """Sum of harmonics (amplitude 1/k) through the formant resonators. Phase-coherent: every
    harmonic keeps a fixed phase. Random: each harmonic's phase is a random walk with uniform
    steps in [-pi, pi] every `hop` s, linearly interpolated (the frequency stays near k f0,
    so the signal stays voiced, but the phase relations between harmonics are lost)."""
    rng = np.random.default_rng(seed)
    n = int(round(duration * sr))
    t = np.arange(n) / sr
    nodes = np.arange(0, duration + 2 * hop, hop)
    x = np.zeros(n)
    for k in range(1, int((sr / 2 - f0 / 2) // f0) + 1):
        ph = np.interp(t, nodes, np.cumsum(rng.uniform(-np.pi, np.pi, nodes.size))) if random_phase else 0.3 * k
        x += np.cos(2 * np.pi * k * f0 * t + ph) / k
    x = resonators(x, (700, 1220, 2600), (80, 90, 120), sr)
    return (0.5 * x / np.max(np.abs(x))).astype(np.float32)


def creaky_train(
    f0: float = 50.0, duration: float = 1.0, sr: int = SR, jitter: float = 0.15, secondary: float = 0.5, seed: int = 0
) -> np.ndarray:
    """Creaky (vocal fry) excitation: tense LF pulses (Rd 0.3) at a low, irregular F0 (period
    jitter `jitter`, relative std), each followed by a weaker secondary pulse (`secondary` x the
    amplitude, 25-40 % of the period later), through formants with wide bandwidths (strongly
    damped: the response dies out well within the long periods)."""
    rng = np.random.default_rng(seed)
    n = int(round(duration * sr))
    x = np.zeros(n + sr)
    pulse = lf_derivative(0.3, int(round(sr / 120)))  # short, tense pulse
    pos = 0
    while pos < n:
        amp = rng.uniform(0.6, 1.0)
        x[pos : pos + pulse.size] += amp * pulse
        if secondary:
            p2 = pos + int(rng.uniform(0.25, 0.4) * sr / f0)
            x[p2 : p2 + pulse.size] += secondary * amp * pulse
        pos += int(round(sr / f0 * (1 + jitter * rng.standard_normal())))
    y = resonators(x[:n], (700, 1220, 2600), (200, 250, 300), sr)
    return (0.5 * y / np.max(np.abs(y))).astype(np.float32)
