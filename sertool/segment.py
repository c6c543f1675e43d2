"""Cutting long recordings where people speak: voice activity detection (VAD) for `sertool predict`.

    spans = speech_spans(wave, 16000)                    # [(start_s, end_s), ...] of speech
    segments = prediction_segments(spans, duration, window=30.0)

Two detectors, both on 16 kHz mono:

* ``silero``: Silero VAD's ONNX model as the ``silero-vad`` package ships it (``pip install
  silero-vad``; run with onnxruntime, one thread, 32 ms frames).  A neural speech/non-speech
  classifier: music, tones, steady noise and clicks are not speech to it.
* ``energy``: frames (25 ms, 10 ms hop) whose level is well above the recording's noise floor
  (10th percentile of the frame levels + 12 dB, and within 45 dB of the loudest frame); no model,
  no dependency, but any loud sound counts as speech.

``energy`` is the default: on a synthesised 6-minute recording (40 espeak-ng sentences between
2-12 s pauses) both find the speech (recall 1.000 / 0.999, false alarms 3 % of the pauses), also
at 10 dB SNR white noise, but Silero runs at ~45x real time on one core against ~1,700x, which
alone would spend the whole 50x budget of `sertool predict` on long files.  Silero is the one for
recordings with music or other loud non-speech sounds: with a tone burst in every long pause
the energy detector's false alarms rise to 16 %, Silero's stay at 3 % (docs/predict.md).
``auto`` is ``silero`` when the package is installed, else ``energy``.
Both results are smoothed the same way: pauses shorter than ``MIN_PAUSE_S`` are bridged, bursts
shorter than ``MIN_SPEECH_S`` dropped and every span padded by ``PAD_S``.  ``prediction_segments``
then joins spans separated by short pauses into utterance-like segments of at most ``window``
seconds, splits longer speech into equal parts no longer than the window, and drops what is
shorter than the model's minimum clip length.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np

SAMPLE_RATE = 16000
METHODS = ("energy", "silero", "auto", "off")
DEFAULT_METHOD = "energy"
MIN_PAUSE_S = 0.3  # a shorter pause is part of the utterance (stops, breaths)
MIN_SPEECH_S = 0.2  # a shorter burst is a click or a cough
PAD_S = 0.1  # keep the onsets and trailing consonants
JOIN_GAP_S = 1.0  # prediction segments: spans closer than this are one segment (up to the window)


class VADError(RuntimeError):
    """The voice activity detector cannot run (e.g. --vad silero without the silero-vad package)."""


def silero_available() -> bool:
    try:
        import silero_vad  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_method(method: str) -> str:
    """``auto`` -> ``silero`` when the package is installed, else ``energy``."""
    method = str(method).lower()
    if method not in METHODS:
        raise VADError(f"--vad {method!r}: choose {', '.join(METHODS)}")
    if method == "auto":
        return "silero" if silero_available() else "energy"
    if method == "silero" and not silero_available():
        raise VADError("--vad silero needs the silero-vad package: pip install silero-vad (or use --vad energy)")
    return method


def speech_spans(wave: np.ndarray, sr: int = SAMPLE_RATE, method: str = DEFAULT_METHOD) -> list[tuple[float, float]]:
    """Speech spans (start, end) in seconds of a mono 16 kHz waveform, smoothed (see the module doc)."""
    if sr != SAMPLE_RATE:
        raise ValueError(f"VAD runs on {SAMPLE_RATE} Hz audio, got {sr}")
    wave = np.asarray(wave, dtype=np.float32)
    method = resolve_method(method)
    raw = _silero_spans(wave) if method == "silero" else _energy_spans(wave)
    return smooth_spans(raw, len(wave) / SAMPLE_RATE)


def smooth_spans(
    spans: list[tuple[float, float]],
    duration: float,
    min_pause: float = MIN_PAUSE_S,
    min_speech: float = MIN_SPEECH_S,
    pad: float = PAD_S,
) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(spans):
        if merged and a - merged[-1][1] < min_pause:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out: list[tuple[float, float]] = []
    for a, b in merged:
        if b - a < min_speech:
            continue
        a, b = max(0.0, a - pad), min(duration, b + pad)
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return [(round(a, 3), round(b, 3)) for a, b in out]


def _energy_spans(wave: np.ndarray) -> list[tuple[float, float]]:
    frame, hop = int(0.025 * SAMPLE_RATE), int(0.010 * SAMPLE_RATE)
    if len(wave) < frame:
        return []
    n = 1 + (len(wave) - frame) // hop
    # frame energies from a cumulative sum of squares: one pass, no frame matrix for long files
    cumulative = np.concatenate([[0.0], np.cumsum(wave.astype(np.float64) ** 2)])
    starts = np.arange(n) * hop
    energy = (cumulative[starts + frame] - cumulative[starts]) / frame
    level = 10 * np.log10(energy + 1e-12)
    floor, peak = np.percentile(level, 10), level.max()
    threshold = max(floor + 12.0, peak - 45.0)
    active = level > threshold
    if not active.any():
        return []
    edges = np.flatnonzero(np.diff(np.concatenate([[0], active.astype(np.int8), [0]])))
    return [(s * hop / SAMPLE_RATE, ((e - 1) * hop + frame) / SAMPLE_RATE) for s, e in zip(edges[::2], edges[1::2])]


@lru_cache(maxsize=1)
def _silero_model():
    from silero_vad import load_silero_vad

    return load_silero_vad(onnx=True)


def _silero_spans(wave: np.ndarray) -> list[tuple[float, float]]:
    import torch
    from silero_vad import get_speech_timestamps

    try:
        model = _silero_model()
    except Exception as e:  # noqa: BLE001 - a broken install: one clear message
        raise VADError(f"silero-vad cannot load its ONNX model ({type(e).__name__}: {e}); use --vad energy") from None
    model.reset_states()
    stamps = get_speech_timestamps(
        torch.from_numpy(wave),
        model,
        sampling_rate=SAMPLE_RATE,
        min_speech_duration_ms=int(MIN_SPEECH_S * 1000),
        min_silence_duration_ms=int(MIN_PAUSE_S * 1000),
        speech_pad_ms=0,  # padded by smooth_spans, as the energy spans
    )
    return [(s["start"] / SAMPLE_RATE, s["end"] / SAMPLE_RATE) for s in stamps]


def prediction_segments(
    spans: list[tuple[float, float]],
    window: float,
    min_length: float = 0.25,
    join_gap: float = JOIN_GAP_S,
) -> list[tuple[float, float]]:
    """Speech spans -> the segments predicted one by one: neighbours closer than ``join_gap`` joined
    while the result fits in ``window``, longer speech cut into equal parts no longer than the
    window, parts shorter than ``min_length`` dropped."""
    joined: list[tuple[float, float]] = []
    for a, b in spans:
        if joined and a - joined[-1][1] < join_gap and b - joined[-1][0] <= window:
            joined[-1] = (joined[-1][0], b)
        else:
            joined.append((a, b))
    out: list[tuple[float, float]] = []
    for a, b in joined:
        n = max(1, int(math.ceil((b - a) / window - 1e-9)))
        step = (b - a) / n
        for i in range(n):
            s, e = a + i * step, (b if i == n - 1 else a + (i + 1) * step)
            if e - s >= min_length:
                out.append((round(s, 3), round(e, 3)))
    return out


def speech_seconds(spans: list[tuple[float, float]]) -> float:
    return float(sum(b - a for a, b in spans))


def plot_timeline(
    path,
    wave: np.ndarray,
    sr: int,
    segments: list[tuple[float, float]],
    probabilities: list[np.ndarray],
    classes: list[str],
    title: str = "",
) -> None:
    """One PNG: each class's probability per speech segment over time, above the waveform with the
    speech segments shaded (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    duration = len(wave) / sr
    fig, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=(12, 5), gridspec_kw={"height_ratios": [3, 1.2]}, constrained_layout=True
    )
    colours = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    probs = np.stack([np.asarray(p, dtype=float) for p in probabilities]) if probabilities else np.zeros((0, 0))
    for j, name in enumerate(classes):
        xs, ys = [], []
        for (a, b), p in zip(segments, probs):
            xs += [a, b, np.nan]  # a flat line over each segment, gaps left blank
            ys += [p[j], p[j], np.nan]
        top.plot(xs, ys, color=colours(j), lw=2, label=name)
    top.set_ylim(0, 1)
    top.set_ylabel("probability")
    top.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
    top.grid(alpha=0.3)
    top.set_title(title, fontsize=10)
    # waveform as a min/max envelope over ~4,000 columns: a 10-minute file stays light
    n_cols = min(4000, max(1, len(wave)))
    edges = np.linspace(0, len(wave), n_cols + 1).astype(int)
    lo = np.minimum.reduceat(wave, edges[:-1]) if len(wave) else np.zeros(1)
    hi = np.maximum.reduceat(wave, edges[:-1]) if len(wave) else np.zeros(1)
    t = edges[:-1] / sr
    bottom.fill_between(t, lo, hi, color="0.35", lw=0)
    for a, b in segments:
        bottom.axvspan(a, b, color="tab:green", alpha=0.15, lw=0)
    bottom.set_xlim(0, duration)
    bottom.set_xlabel("time (s)")
    bottom.set_yticks([])
    bottom.set_ylabel("speech")
    fig.savefig(path, dpi=100)
    plt.close(fig)
