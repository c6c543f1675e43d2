"""Degraded copies of a corpus: the recording conditions users' audio brings and studio corpora lack.

``sertool extract CORPUS -o OUT --degrade SPEC`` applies SPEC to every clip after it is decoded and
before any feature is computed, so OUT is a store of the same utterances (same ids, labels and
speakers) heard through another channel. Such stores serve twice: as extra training copies
(``sertool train FEATS --set 'data.augment=[OUT]'``: the training split gets every degraded copy,
dev and test stay clean) and as degraded test sets (``sertool evaluate EXP OUT``: the folds' models
on the degraded copies of their test speakers).

SPEC is one or more steps joined by ``+``, applied left to right:

``telephone``       narrow-band telephone channel: 300-3400 Hz band-pass, 8 kHz, G.711 mu-law (8 bit)
``noise:SNR``       white Gaussian noise at SNR dB (signal power over the whole clip)
``pink:SNR``        pink (1/f) noise at SNR dB
``gain:DB``         gain in dB; samples beyond full scale are clipped (overdriven recordings)
``reverb:RT60``     a synthetic room: exponentially decaying noise tail with RT60 seconds
``random:A|B|...``  one of the given steps per clip, chosen by the clip's seed

Every random choice is seeded by the utterance id (and ``seed``), so a store is reproducible and
a resumed extraction recomputes the same copy. The steps are a few lines of numpy/scipy each,
written here rather than taken from ``audiomentations``: they must be exactly reproducible per
utterance and stay dependency-free; the G.711 curve and the band edges are the ITU-T ones.
"""

from __future__ import annotations

import re
import zlib
from dataclasses import dataclass

import numpy as np

_STEP = re.compile(r"^(telephone|noise|pink|gain|reverb)(?::(-?[0-9.]+))?$")


class DegradeError(ValueError):
    """A degradation spec that cannot be parsed, or audio a step cannot take (e.g. below 8 kHz)."""


@dataclass(frozen=True)
class Step:
    name: str
    value: float | None = None
    choices: tuple["Step", ...] = ()

    def __str__(self) -> str:
        if self.name == "random":
            return "random:" + "|".join(str(c) for c in self.choices)
        return self.name if self.value is None else f"{self.name}:{self.value:g}"


def _parse_step(text: str) -> Step:
    m = _STEP.match(text.strip())
    if not m:
        raise DegradeError(
            f"--degrade: unknown step {text!r}; steps are telephone, noise:SNR, pink:SNR, gain:DB, reverb:RT60, "
            "random:A|B (joined by '+')"
        )
    name, value = m.group(1), m.group(2)
    if name == "telephone":
        if value is not None:
            raise DegradeError(f"--degrade: telephone takes no value, got {text!r}")
        return Step(name)
    if value is None:
        raise DegradeError(f"--degrade: {name} needs a value, e.g. {name}:10")
    v = float(value)
    if name == "reverb" and not 0.05 <= v <= 3.0:
        raise DegradeError(f"--degrade: reverb RT60 must be 0.05-3 s, got {v:g}")
    return Step(name, v)


def parse_degradation(spec: str | None) -> tuple[Step, ...]:
    """``"telephone+noise:10"`` -> its steps; None or "" -> no step."""
    if not spec:
        return ()
    steps = []
    for part in spec.split("+"):
        part = part.strip()
        if part.startswith("random:"):
            choices = tuple(_parse_step(c) for c in part[len("random:") :].split("|") if c.strip())
            if len(choices) < 2:
                raise DegradeError(f"--degrade: random needs at least two steps, got {part!r}")
            steps.append(Step("random", None, choices))
        else:
            steps.append(_parse_step(part))
    return tuple(steps)


def utterance_rng(uid: str, seed: int = 0) -> np.random.Generator:
    """A generator fixed by the utterance id (crc32, stable across runs and platforms)."""
    return np.random.default_rng([zlib.crc32(uid.encode("utf-8")), int(seed)])


def degrade(wave: np.ndarray, sample_rate: int, spec: str | tuple[Step, ...], uid: str, seed: int = 0) -> np.ndarray:
    """The clip ``wave`` (mono float, ``sample_rate`` Hz) through the steps of ``spec``; float32, same length."""
    steps = parse_degradation(spec) if isinstance(spec, str) else spec
    rng = utterance_rng(uid, seed)
    x = np.asarray(wave, dtype=np.float64)
    for step in steps:
        if step.name == "random":
            step = step.choices[int(rng.integers(len(step.choices)))]
        x = _apply(step, x, sample_rate, rng)
    return x.astype(np.float32)


def _apply(step: Step, x: np.ndarray, sr: int, rng: np.random.Generator) -> np.ndarray:
    if step.name == "telephone":
        return telephone(x, sr)
    if step.name in ("noise", "pink"):
        noise = rng.standard_normal(len(x)) if step.name == "noise" else pink_noise(len(x), rng)
        return add_noise(x, noise, step.value)
    if step.name == "gain":
        return np.clip(x * 10.0 ** (step.value / 20.0), -1.0, 1.0)
    if step.name == "reverb":
        return reverberate(x, sr, step.value, rng)
    raise DegradeError(f"unknown degradation step {step.name!r}")


def telephone(x: np.ndarray, sr: int) -> np.ndarray:
    """300-3400 Hz band (4th-order Butterworth), resampled to 8 kHz, G.711 mu-law 8-bit, back to ``sr``."""
    from math import gcd

    from scipy.signal import butter, resample_poly, sosfiltfilt

    if sr < 8000:
        raise DegradeError(f"telephone: the audio is at {sr} Hz, below the 8 kHz telephone rate")
    g = gcd(8000, sr)
    narrow = resample_poly(x, 8000 // g, sr // g)
    sos = butter(4, [300.0, 3400.0], btype="bandpass", fs=8000, output="sos")
    narrow = sosfiltfilt(sos, narrow)
    mu = 255.0
    compressed = np.sign(narrow) * np.log1p(mu * np.minimum(np.abs(narrow), 1.0)) / np.log1p(mu)
    quantised = np.round((compressed + 1.0) * 127.5) / 127.5 - 1.0  # 256 levels
    expanded = np.sign(quantised) * ((1.0 + mu) ** np.abs(quantised) - 1.0) / mu
    wide = resample_poly(expanded, sr // g, 8000 // g)
    out = np.zeros(len(x))
    out[: min(len(x), len(wide))] = wide[: len(x)]
    return out


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """1/f noise: white noise shaped by 1/sqrt(f) in the frequency domain."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    f = np.arange(len(spectrum), dtype=np.float64)
    f[0] = 1.0
    return np.fft.irfft(spectrum / np.sqrt(f), n)


def add_noise(x: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """``x`` plus ``noise`` scaled to ``snr_db`` (powers over the whole clip); a silent clip is left as is."""
    signal_power = float(np.mean(x**2))
    noise_power = float(np.mean(noise**2))
    if signal_power <= 0 or noise_power <= 0:
        return x
    return x + noise * np.sqrt(signal_power / (noise_power * 10.0 ** (snr_db / 10.0)))


def reverberate(x: np.ndarray, sr: int, rt60: float, rng: np.random.Generator) -> np.ndarray:
    """Convolution with a synthetic room response (Gaussian noise under a decay of 60 dB in ``rt60`` s,
    a unit direct path first), rescaled to the clip's peak level and cut to its length."""
    from scipy.signal import fftconvolve

    n = max(int(rt60 * sr), 1)
    t = np.arange(n) / sr
    rir = rng.standard_normal(n) * 10.0 ** (-3.0 * t / rt60)
    rir[0] = 1.0
    rir /= np.sqrt(np.sum(rir**2))
    y = fftconvolve(x, rir)[: len(x)]
    peak_in, peak_out = np.max(np.abs(x), initial=0.0), np.max(np.abs(y), initial=0.0)
    return y * (peak_in / peak_out) if peak_out > 0 else y
