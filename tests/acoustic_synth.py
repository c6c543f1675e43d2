"""Synthetic test signals with known acoustics (pitch, formants, voicing) for the acoustic tests.

`vowel` is a source-filter vowel: a Rosenberg-like glottal pulse train at a known f0 (with
optional jitter) through a cascade of second-order resonators at known formant frequencies.
"""

from __future__ import annotations

import numpy as np
import scipy.signal

SR = 16000


def glottal_train(f0: float | np.ndarray, duration: float, sr: int = SR, open_quotient: float = 0.6,
                  seed: int = 0, jitter: float = 0.0) -> np.ndarray:
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
        pulse = np.where(k < n_rise, 0.5 * (1 - np.cos(np.pi * k / max(n_rise, 1))),
                         np.cos(0.5 * np.pi * (k - n_rise) / max(n_open - n_rise, 1)))
        flow[start:start + n_open] += pulse
        t += period
    return np.diff(flow, prepend=0.0)


def resonators(x: np.ndarray, formants=(700, 1220, 2600), bandwidths=(80, 90, 120), sr: int = SR) -> np.ndarray:
    y = x
    for f, b in zip(formants, bandwidths):
        r = np.exp(-np.pi * b / sr)
        a = [1, -2 * r * np.cos(2 * np.pi * f / sr), r * r]
        y = scipy.signal.lfilter([sum(a)], a, y)
    return y


def vowel(f0: float | np.ndarray = 120.0, duration: float = 1.0, formants=(700, 1220, 2600),
          bandwidths=(80, 90, 120), sr: int = SR, jitter: float = 0.0, noise: float = 0.0, seed: int = 0) -> np.ndarray:
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
        parts.append(vowel(f0, 0.3, formants=(rng.uniform(300, 800), rng.uniform(900, 2200), 2700), seed=int(rng.integers(1 << 30))))
        parts.append(white_noise(0.08, sr, 0.05, seed=int(rng.integers(1 << 30))))
        parts.append(silence(0.07, sr))
    return np.concatenate(parts)[: int(duration * sr)].astype(np.float32)
