"""MFCC extractor (vectorised numpy/scipy) and its presets.

One class covers the two MFCC recipes the paper models use, as named presets:

`mfcc` (Rajan et al., ICASSP 2022: 40 MFCC + delta + delta-delta = 120-d)
    25 ms Hamming window, 10 ms hop (100 frames/s), 512-point FFT, 40 mel bands (Slaney mel
    scale, area-normalised filters, 0-8 kHz), power spectrum, dB with top_db = 80, orthonormal
    DCT-II; deltas by librosa's 9-frame Savitzky-Golay regression. Frame `t` is centred on
    sample `t * hop` (zero padding at the ends), exactly as `librosa.feature.mfcc(y, sr=16000,
    n_mfcc=40, n_fft=512, win_length=400, hop_length=160, window="hamming", n_mels=40)`
    followed by `librosa.feature.delta` (order 1 and 2); the tests check this equality. The
    paper does not give its mel-band count; 40 is the usual choice for 40 cepstra (one cepstrum
    per band) and avoids the empty bands that librosa's default of 128 bands leaves at a
    512-point FFT.

`mfcc80` mirrors `torchaudio.transforms.MFCC(sample_rate=16000, n_mfcc=80,
    melkwargs={"n_fft": 400})` with torchaudio's defaults (torchaudio is not a dependency: its
    wheels need CUDA libraries beside a CPU torch). The defaults mirrored are
    `win_length = n_fft = 400`, `hop_length = win_length // 2 = 200` (80 frames/s), periodic
    Hann window, `center=True` with reflect padding, `power = 2`, `n_mels = 128`,
    `f_min = 0`, `f_max = sr / 2`, HTK mel scale, no filter normalisation (`norm=None`),
    `log_mels=False` so the log is `amplitude_to_DB(x, multiplier=10, amin=1e-10,
    db_multiplier=0, top_db=80)` (the 80 dB floor is taken from the maximum over the whole
    utterance), then `create_dct(80, 128, norm="ortho")` (orthonormal DCT-II); no deltas.
    With 201 FFT bins and 128 HTK bands the lowest bands are empty (torchaudio warns); they sit
    at the -100 dB floor, exactly as in torchaudio.

Why not just call librosa: the whole pipeline is four vectorised steps (strided framing,
one batched rFFT, one mel matrix product, one DCT matrix product) with the filter bank and
DCT matrix built once per extractor, which is several times faster than re-deriving them per
call, and it lets one class reproduce both librosa's and torchaudio's conventions.
"""

from __future__ import annotations

import warnings
from typing import Any

import librosa
import numpy as np
import scipy.fft
import scipy.signal

from sertool.corpora.base import Utterance
from sertool.features.base import Extractor, ExtractorError, FeatureResult, register_extractor, register_preset

AMIN = 1e-10  # power floor before the log (librosa / torchaudio amin)


def _bad(feature: str, message: str) -> ExtractorError:
    return ExtractorError(f"feature {feature!r}: {message}")


def _positive_int(feature: str, name: str, value: Any) -> int:
    """`value` as an int >= 1, or an ExtractorError naming the feature and the parameter.

    A value that is not a number at all (``'abc'``) is left to ``int()``, whose ValueError the
    registry reports as a bad parameter."""
    if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
        raise _bad(feature, f"{name} must be a positive integer, got {value!r}")
    number = int(value)
    if number < 1:
        raise _bad(feature, f"{name} must be a positive integer, got {value}")
    return number


def _number(
    feature: str, name: str, value: Any, *, low: float = 0.0, strict: bool = True, high: float | None = None
) -> float:
    """`value` as a finite float > low (>= low when not `strict`, and <= high when given)."""
    if isinstance(value, bool):
        raise _bad(feature, f"{name} must be a number, got {value!r}")
    number = float(value)
    if not np.isfinite(number) or number < low or (strict and number == low) or (high is not None and number > high):
        bound = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise _bad(feature, f"{name} must be a finite number {bound}, got {value}")
    return number


class MelCepstrum:
    """Precomputed window, mel filter bank and DCT matrix: wave -> [T, n_mfcc] cepstra."""

    def __init__(
        self,
        sample_rate: int,
        n_mfcc: int,
        n_fft: int,
        win_length: int,
        hop_length: int,
        window: str,
        n_mels: int,
        fmin: float,
        fmax: float | None,
        mel_scale: str,
        mel_norm: str | None,
        power: float,
        log: str,
        top_db: float | None,
        center: bool,
        pad_mode: str,
        preemphasis: float,
        lifter: float,
    ):
        if win_length > n_fft:
            raise ExtractorError(f"win_length {win_length} > n_fft {n_fft}")
        if n_mfcc > n_mels:
            raise ExtractorError(f"n_mfcc {n_mfcc} > n_mels {n_mels}")
        self.n_fft, self.win, self.hop = n_fft, win_length, hop_length
        self.center, self.pad_mode, self.preemphasis = center, pad_mode, preemphasis
        self.power, self.log, self.top_db = power, log, top_db
        # periodic ("fftbins") windows, as librosa and torch use
        self.window = scipy.signal.get_window(window, win_length, fftbins=True).astype(np.float32)
        with warnings.catch_warnings():
            # empty bands (e.g. mfcc80's 128 HTK bands on 201 bins) are intended: torchaudio
            # keeps them too, and they sit at the dB floor
            warnings.filterwarnings("ignore", message="Empty filters detected")
            fb = librosa.filters.mel(
                sr=sample_rate,
                n_fft=n_fft,
                n_mels=n_mels,
                fmin=fmin,
                fmax=fmax,
                htk=(mel_scale == "htk"),
                norm=mel_norm,
                dtype=np.float32,
            )
        self.mel_t = np.ascontiguousarray(fb.T)
        dct = scipy.fft.dct(np.eye(n_mels), type=2, norm="ortho", axis=0)[:n_mfcc]  # [C, M]
        if lifter > 0:
            dct = dct * (1 + (lifter / 2) * np.sin(np.pi * np.arange(1, n_mfcc + 1) / lifter))[:, None]
        self.dct_t = np.ascontiguousarray(dct.T.astype(np.float32))  # [M, C]

    def frames(self, wave: np.ndarray) -> np.ndarray:
        wave = np.asarray(wave, dtype=np.float32)
        if self.preemphasis:
            wave = np.concatenate([wave[:1], wave[1:] - self.preemphasis * wave[:-1]])
        if self.center:
            # librosa/torch pad n_fft // 2, take n_fft frames and centre the window in them
            # (offset (n_fft - win) // 2): the same samples as this win_length frame starting
            # `pad` samples before t*hop; frame count 1 + len // hop either way.
            pad = self.n_fft // 2 - (self.n_fft - self.win) // 2
            n_frames = 1 + wave.size // self.hop
            mode = self.pad_mode
            if mode == "reflect" and wave.size <= pad:
                mode = "constant"  # torch would refuse; zeros are the only defined choice
            right = max(0, (n_frames - 1) * self.hop + self.win - pad - wave.size)
            padded = np.pad(wave, (pad, right), mode=mode)
        else:
            n_frames = max(1, 1 + (wave.size - self.win) // self.hop)
            padded = wave
            need = (n_frames - 1) * self.hop + self.win
            if padded.size < need:
                padded = np.pad(padded, (0, need - padded.size))
        return np.lib.stride_tricks.sliding_window_view(padded, self.win)[:: self.hop][:n_frames]

    def mel_power(self, wave: np.ndarray) -> np.ndarray:
        frames = self.frames(wave) * self.window
        spec = np.abs(scipy.fft.rfft(frames, n=self.n_fft, axis=1))
        if self.power == 2:
            spec = spec * spec
        elif self.power != 1:
            spec = spec**self.power
        return spec.astype(np.float32, copy=False) @ self.mel_t  # [T, M]

    def __call__(self, wave: np.ndarray) -> np.ndarray:
        mel = self.mel_power(wave)
        if self.log == "db":
            logmel = (10.0 if self.power == 2 else 20.0) * np.log10(np.maximum(mel, AMIN))
            if self.top_db is not None:
                logmel = np.maximum(logmel, logmel.max() - self.top_db)
        else:  # natural log, Kaldi/HTK style
            logmel = np.log(np.maximum(mel, AMIN))
        return logmel.astype(np.float32, copy=False) @ self.dct_t


def deltas(feats: np.ndarray, order: int, width: int = 9) -> list[np.ndarray]:
    """[delta, delta-delta, ...] of a [T, D] matrix by librosa's Savitzky-Golay regression.

    librosa's "interp" edge mode needs at least `width` frames; shorter inputs fall back to
    "nearest" edges so that any length works.
    """
    # librosa's order-2 delta is the second derivative of a local quadratic fit (one savgol
    # call), not the delta of the delta; call it per order as librosa users do.
    mode = "interp" if feats.shape[0] >= width else "nearest"
    return [
        librosa.feature.delta(feats, width=width, order=k, axis=0, mode=mode).astype(np.float32)
        for k in range(1, order + 1)
    ]


@register_extractor("mfcc")
class MFCC(Extractor):
    """MFCC (+ deltas): vectorised librosa/torchaudio-compatible mel cepstra."""

    kind = "audio"
    needs_audio = True

    def __init__(
        self,
        n_mfcc: int = 40,
        deltas: int = 2,
        window: str = "hamming",
        win_ms: float = 25.0,
        hop_ms: float = 10.0,
        n_fft: int = 512,
        n_mels: int = 40,
        fmin: float = 0.0,
        fmax: float | None = None,
        mel_scale: str = "slaney",
        mel_norm: str | None = "slaney",
        power: float = 2.0,
        log: str = "db",
        top_db: float | None = 80.0,
        center: bool = True,
        pad_mode: str = "constant",
        preemphasis: float = 0.0,
        lifter: float = 0.0,
        delta_width: int = 9,
        sample_rate: int = 16000,
    ):
        # every parameter is checked here, when the extractor is built: before `sertool extract`
        # writes anything (a negative n_mfcc used to surface only as "store dim is -9")
        f = self.name or "mfcc"
        if isinstance(deltas, bool) or deltas not in (0, 1, 2):
            raise _bad(f, f"deltas must be 0, 1 or 2, got {deltas!r}")
        if mel_scale not in ("slaney", "htk"):
            raise _bad(f, f"mel_scale must be 'slaney' or 'htk', got {mel_scale!r}")
        if log not in ("db", "log"):
            raise _bad(f, f"log must be 'db' or 'log', got {log!r}")
        if pad_mode not in ("constant", "reflect"):
            raise _bad(f, f"pad_mode must be 'constant' or 'reflect', got {pad_mode!r}")
        if delta_width < 3 or delta_width % 2 != 1:
            raise _bad(f, f"delta_width must be odd and >= 3, got {delta_width}")
        self.n_mfcc, self.deltas, self.window = _positive_int(f, "n_mfcc", n_mfcc), int(deltas), window
        self.n_fft, self.n_mels = _positive_int(f, "n_fft", n_fft), _positive_int(f, "n_mels", n_mels)
        self.win_ms, self.hop_ms = _number(f, "win_ms", win_ms), _number(f, "hop_ms", hop_ms)
        self.sample_rate = _positive_int(f, "sample_rate", sample_rate)
        nyquist = self.sample_rate / 2
        self.fmin = _number(f, "fmin", fmin, strict=False, high=nyquist)
        self.fmax = None if fmax is None else _number(f, "fmax", fmax, high=nyquist)
        if self.fmax is not None and self.fmax <= self.fmin:
            raise _bad(f, f"fmax ({fmax}) must be greater than fmin ({fmin})")
        if self.fmax is None and self.fmin >= nyquist:
            raise _bad(f, f"fmin ({fmin}) must be below fmax (default sample_rate / 2 = {nyquist:g})")
        if self.n_mfcc > self.n_mels:
            raise _bad(f, f"n_mfcc ({self.n_mfcc}) must not exceed n_mels ({self.n_mels})")
        self.mel_scale, self.mel_norm, self.log = mel_scale, mel_norm, log
        self.power = _number(f, "power", power)
        self.top_db = None if top_db is None else _number(f, "top_db", top_db)
        self.center, self.pad_mode = bool(center), pad_mode
        self.preemphasis = _number(f, "preemphasis", preemphasis, strict=False, high=1.0)
        self.lifter, self.delta_width = _number(f, "lifter", lifter, strict=False), int(delta_width)
        self.win_length = int(round(self.win_ms * self.sample_rate / 1000))
        self.hop_length = int(round(self.hop_ms * self.sample_rate / 1000))
        if self.hop_length < 1 or self.win_length < 2:
            raise _bad(f, f"window {win_ms} ms / hop {hop_ms} ms too short at {sample_rate} Hz")
        if self.win_length > self.n_fft:
            raise _bad(
                f,
                f"window of {win_ms} ms ({self.win_length} samples at {self.sample_rate} Hz) is longer "
                f"than n_fft {self.n_fft}",
            )
        self._cepstrum = MelCepstrum(
            self.sample_rate,
            self.n_mfcc,
            self.n_fft,
            self.win_length,
            self.hop_length,
            window,
            self.n_mels,
            self.fmin,
            self.fmax,
            mel_scale,
            mel_norm,
            self.power,
            log,
            self.top_db,
            self.center,
            pad_mode,
            self.preemphasis,
            self.lifter,
        )

    def params(self) -> dict[str, Any]:
        return {
            "n_mfcc": self.n_mfcc,
            "deltas": self.deltas,
            "window": self.window,
            "win_ms": self.win_ms,
            "hop_ms": self.hop_ms,
            "n_fft": self.n_fft,
            "n_mels": self.n_mels,
            "fmin": self.fmin,
            "fmax": self.fmax,
            "mel_scale": self.mel_scale,
            "mel_norm": self.mel_norm,
            "power": self.power,
            "log": self.log,
            "top_db": self.top_db,
            "center": self.center,
            "pad_mode": self.pad_mode,
            "preemphasis": self.preemphasis,
            "lifter": self.lifter,
            "delta_width": self.delta_width,
            "sample_rate": self.sample_rate,
        }

    def columns(self) -> list[str]:
        base = [f"mfcc_{i}" for i in range(self.n_mfcc)]
        prefixes = ["", "d_", "dd_"][: self.deltas + 1]
        return [p + c for p in prefixes for c in base]

    def file_attrs(self) -> dict[str, Any]:
        return {
            "dim": self.n_mfcc * (self.deltas + 1),
            "frame_rate_hz": self.sample_rate / self.hop_length,
            "columns": self.columns(),
            "hop_length": self.hop_length,
            "win_length": self.win_length,
            "frame_centre": "frame t is centred on sample t * hop_length"
            if self.center
            else "frame t starts at sample t * hop_length",
        }

    def compute(self, wave: np.ndarray) -> np.ndarray:
        """[T, D] float32 from a mono waveform at `sample_rate`."""
        wave = np.asarray(wave, dtype=np.float32).reshape(-1)
        if wave.size == 0:
            raise ExtractorError("empty waveform")
        cep = self._cepstrum(wave)
        parts = [cep]
        if self.deltas:
            parts += deltas(cep, self.deltas, self.delta_width)
        out = np.concatenate(parts, axis=1) if len(parts) > 1 else cep
        out = np.ascontiguousarray(out, dtype=np.float32)
        if not np.isfinite(out).all():  # cannot happen with the amin floor; keep the contract anyway
            out = np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0)
        return out

    def extract(self, utt: Utterance | None, wave: np.ndarray | None) -> FeatureResult:
        if wave is None:
            raise ExtractorError("mfcc needs audio")
        return FeatureResult(self.compute(wave), {})


register_preset(
    "mfcc80",
    "mfcc",
    n_mfcc=80,
    deltas=0,
    window="hann",
    win_ms=25.0,
    hop_ms=12.5,
    n_fft=400,
    n_mels=128,
    fmin=0.0,
    fmax=None,
    mel_scale="htk",
    mel_norm=None,
    power=2.0,
    log="db",
    top_db=80.0,
    center=True,
    pad_mode="reflect",
)
