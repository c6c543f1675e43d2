"""Audio loading with explicit checks: soundfile to read, soxr to resample, mono mix.

Every failure is an `AudioError` whose message names the file and what is wrong, so the
extract stage can list it in errors.tsv and carry on with the other files. Files are read in
blocks, mixed to mono and resampled as a stream, so an hour of 96 kHz multi-channel audio
never needs more memory than its mono 16 kHz float32 result.

torchaudio is deliberately not used: its PyPI wheels need CUDA libraries beside the CPU torch
build and its I/O has moved to torchcodec; soundfile (libsndfile) reads wav/flac/mp3/ogg.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

BLOCK_FRAMES = 1 << 18  # frames read per block when streaming a file
SILENCE_PEAK = 1e-6  # peak amplitude below which a file is reported as silent
# Sample rates outside this range are a corrupt header, not a recording: a file claiming 1 Hz
# would be "resampled" into hours of 16 kHz audio (gigabytes) from a few kilobytes.
MIN_SAMPLE_RATE, MAX_SAMPLE_RATE = 1000, 768000


class AudioError(RuntimeError):
    """An audio file that cannot be used; the message names the file and the reason."""


@dataclass
class AudioInfo:
    path: str
    sample_rate: int
    frames: int
    channels: int
    duration: float
    format: str
    subtype: str


def audio_info(path: str | os.PathLike) -> AudioInfo:
    path = os.fspath(path)
    _check_file(path)
    try:
        info = sf.info(path)
    except Exception as e:  # soundfile raises LibsndfileError / RuntimeError for non-audio
        raise AudioError(f"{path}: not a readable audio file ({_short(e)})") from None
    frames = int(info.frames)
    if not MIN_SAMPLE_RATE <= int(info.samplerate) <= MAX_SAMPLE_RATE:
        raise AudioError(
            f"{path}: implausible sample rate {int(info.samplerate)} Hz (the header may be corrupt; "
            f"accepted {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz)"
        )
    if info.format == "WAV":
        _check_wav_truncation(path)
    return AudioInfo(
        path,
        int(info.samplerate),
        frames,
        int(info.channels),
        frames / info.samplerate if info.samplerate else 0.0,
        info.format,
        info.subtype,
    )


def load_audio(
    path: str | os.PathLike,
    sample_rate: int | None = 16000,
    *,
    start: float | None = None,
    end: float | None = None,
    allow_silent: bool = True,
) -> tuple[np.ndarray, int]:
    """Read `path` as mono float32 at `sample_rate` (None keeps the file's rate).

    `start`/`end` (seconds) select a segment. Raises AudioError for missing, empty,
    zero-length, non-audio, truncated or non-finite files (and silent ones unless allowed).
    """
    info = audio_info(path)
    path = info.path
    if info.frames <= 0 or info.sample_rate <= 0:
        raise AudioError(f"{path}: zero-length audio (0 samples)")
    first = 0 if start is None else int(round(start * info.sample_rate))
    last = info.frames if end is None else min(info.frames, int(round(end * info.sample_rate)))
    if first < 0 or first >= last:
        raise AudioError(f"{path}: segment {start}-{end} s is empty or outside the file ({info.duration:.3f} s)")
    target = sample_rate or info.sample_rate
    resampler = None
    if target != info.sample_rate:
        resampler = soxr.ResampleStream(info.sample_rate, target, 1, dtype="float32", quality="HQ")
    pieces = []
    read = 0
    try:
        with sf.SoundFile(path) as f:
            f.seek(first)
            while read < last - first:
                block = f.read(min(BLOCK_FRAMES, last - first - read), dtype="float32", always_2d=True)
                if block.shape[0] == 0:
                    break
                read += block.shape[0]
                mono = block.mean(axis=1) if block.shape[1] > 1 else block[:, 0]
                if not np.isfinite(mono).all():
                    raise AudioError(
                        f"{path}: contains NaN or infinite samples near {(first + read) / info.sample_rate:.2f} s"
                    )
                if resampler is not None:
                    mono = resampler.resample_chunk(mono, last=False)
                pieces.append(np.ascontiguousarray(mono, dtype=np.float32))
    except AudioError:
        raise
    except Exception as e:
        raise AudioError(
            f"{path}: failed while reading after {read} of {last - first} samples, "
            f"the file may be truncated or corrupt ({_short(e)})"
        ) from None
    if read < last - first:
        raise AudioError(f"{path}: truncated: header says {last - first} samples, only {read} could be read")
    if resampler is not None:
        pieces.append(resampler.resample_chunk(np.zeros(0, np.float32), last=True).astype(np.float32))
    wave = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if wave.size == 0:
        raise AudioError(f"{path}: zero-length audio after reading")
    if not allow_silent and float(np.max(np.abs(wave))) < SILENCE_PEAK:
        raise AudioError(f"{path}: silent (peak amplitude below {SILENCE_PEAK:g})")
    return wave, target


def is_silent(wave: np.ndarray) -> bool:
    return wave.size == 0 or float(np.max(np.abs(wave))) < SILENCE_PEAK


def file_checksum(path: str | os.PathLike, algorithm: str = "blake2b") -> str:
    """Content checksum recorded with each utterance's features (provenance)."""
    h = hashlib.new(algorithm, digest_size=16) if algorithm == "blake2b" else hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return f"{algorithm}:{h.hexdigest()}"


def _check_wav_truncation(path: str) -> None:
    """Compare a WAV header's data size with the file size.

    libsndfile silently shortens a truncated WAV to the bytes present, so a cut-off download
    would pass unnoticed; reading the RIFF chunk header ourselves is the only way to tell.
    """
    import struct

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
            return  # RF64/W64 and friends: leave to libsndfile
        offset = 12
        while offset + 8 <= size:
            f.seek(offset)
            chunk_id, chunk_size = struct.unpack("<4sI", f.read(8))
            if chunk_id == b"data":
                if chunk_size in (0, 0xFFFFFFFF):  # streaming writers leave the size open
                    return
                if offset + 8 + chunk_size > size:
                    raise AudioError(
                        f"{path}: truncated: the header announces {chunk_size} bytes of audio, "
                        f"the file holds {size - offset - 8}"
                    )
                return
            offset += 8 + chunk_size + (chunk_size & 1)


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise AudioError(f"{path}: file does not exist")
    if os.path.isdir(path):
        raise AudioError(f"{path}: is a directory, not an audio file")
    if os.path.getsize(path) == 0:
        raise AudioError(f"{path}: empty file (0 bytes)")


def _short(e: Exception) -> str:
    msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # libsndfile says this of an existing regular file whose MP3 data it cannot parse (the file
    # was checked by _check_file first), which misleads users into looking for a missing file
    msg = msg.replace(
        "File does not exist or is not a regular file (possibly a pipe?)", "unrecognised or corrupt audio data"
    )
    return msg[:200]
