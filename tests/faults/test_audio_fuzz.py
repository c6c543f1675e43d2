"""Fuzz the audio loader over mutated WAV/FLAC/OGG bytes for a bounded, seeded time: it returns
finite float32 mono audio or raises AudioError, never another exception, a hang or a crash."""

import io
import os
import random
import signal
import struct
import time

import numpy as np
import pytest
import soundfile as sf

from sertool.audio import AudioError, audio_info, load_audio

SECONDS = float(os.environ.get("SERTOOL_FUZZ_SECONDS", "10"))
SEED = int(os.environ.get("SERTOOL_FUZZ_SEED", "1234"))
PER_FILE_LIMIT_S = 10


def encode(fmt, subtype, sr=16000, channels=1, seconds=0.3):
    t = np.arange(int(sr * seconds)) / sr
    x = 0.3 * np.sin(2 * np.pi * 220 * t)
    x = np.stack([x, -x], 1) if channels == 2 else x
    buf = io.BytesIO()
    sf.write(buf, x.astype(np.float32), sr, format=fmt, subtype=subtype)
    return buf.getvalue()


SEEDS = {
    "pcm16.wav": encode("WAV", "PCM_16"),
    "float.wav": encode("WAV", "FLOAT"),
    "u8-stereo.wav": encode("WAV", "PCM_U8", sr=8000, channels=2),
    "pcm24-48k.wav": encode("WAV", "PCM_24", sr=48000),
    "a.flac": encode("FLAC", "PCM_16"),
    "a.ogg": encode("OGG", "VORBIS"),
}
# offsets of WAV header fields worth corrupting: RIFF size, fmt size, format tag, channels,
# sample rate, byte rate, block align, bits per sample, data size
WAV_FIELDS = [(4, "<I"), (16, "<I"), (20, "<H"), (22, "<H"), (24, "<I"), (28, "<I"), (32, "<H"), (34, "<H"), (40, "<I")]
EXTREMES = [0, 1, 2, 3, 7, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF, 8000, 44100, 1 << 20]


def mutate(data: bytes, rng: random.Random, name: str) -> tuple[bytes, str]:
    b = bytearray(data)
    kind = rng.choice(["flip", "flip", "bytes", "truncate", "header", "header", "splice", "zero-run", "nan"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            i = rng.randrange(min(len(b), 200) if rng.random() < 0.7 else len(b))
            b[i] ^= 1 << rng.randrange(8)
    elif kind == "bytes":
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(len(b))] = rng.randrange(256)
    elif kind == "truncate":
        b = b[: rng.randrange(0, len(b))]
    elif kind == "header" and name.endswith(".wav"):
        off, fmt = rng.choice(WAV_FIELDS)
        limit = 0xFFFF if fmt == "<H" else 0xFFFFFFFF
        struct.pack_into(fmt, b, off, min(rng.choice(EXTREMES), limit))
    elif kind == "splice":
        i, j = sorted(rng.randrange(len(b)) for _ in range(2))
        b = b[:i] + b[j:] + b[i:j]
    elif kind == "zero-run":
        i = rng.randrange(len(b))
        b[i : i + rng.randint(1, 64)] = bytes(len(b[i : i + 64]))
    elif kind == "nan" and name == "float.wav":
        i = 44 + 4 * rng.randrange((len(b) - 44) // 4)
        b[i : i + 4] = struct.pack("<f", rng.choice([float("nan"), float("inf"), -float("inf"), 3e38]))
    else:
        kind = "flip"
        b[rng.randrange(len(b))] ^= 0xFF
    return bytes(b), kind


class Hang(Exception):
    pass


def _alarm(*_):
    raise Hang()


def test_seed_files_load():
    for name, data in SEEDS.items():
        assert len(data) > 100, name


def test_mutated_files_give_audio_or_audio_error(tmp_path):
    rng = random.Random(SEED)
    path = tmp_path / "x"
    counts: dict[str, int] = {}
    old = signal.signal(signal.SIGALRM, _alarm)
    deadline = time.monotonic() + SECONDS
    n = 0
    try:
        while time.monotonic() < deadline:
            name = rng.choice(sorted(SEEDS))
            data, kind = mutate(SEEDS[name], rng, name)
            target = path.with_name(f"fuzz-{name}")
            target.write_bytes(data)
            signal.alarm(PER_FILE_LIMIT_S)
            try:
                wave, sr = load_audio(target, 16000)
                outcome = "audio"
                assert isinstance(wave, np.ndarray) and wave.dtype == np.float32 and wave.ndim == 1, (name, kind)
                assert wave.size > 0 and np.isfinite(wave).all() and sr == 16000, (name, kind)
            except AudioError as e:
                outcome = "AudioError"
                assert str(e).startswith(str(target) + ": "), e  # the message names the file
            except Hang:
                (tmp_path / f"hang-{n}-{name}").write_bytes(data)
                pytest.fail(f"load_audio took over {PER_FILE_LIMIT_S} s on a mutated {name} ({kind})")
            except Exception as e:  # noqa: BLE001 - the point of the test
                keep = tmp_path / f"crash-{n}-{name}"
                keep.write_bytes(data)
                pytest.fail(f"load_audio raised {type(e).__name__} on a mutated {name} ({kind}), kept in {keep}: {e}")
            finally:
                signal.alarm(0)
            counts[outcome] = counts.get(outcome, 0) + 1
            n += 1
    finally:
        signal.signal(signal.SIGALRM, old)
    print(f"fuzz: {n} mutated files in {SECONDS:.0f} s: {counts}")
    assert n >= 50 and counts.get("AudioError", 0) > 0 and counts.get("audio", 0) > 0, counts


@pytest.mark.parametrize("rate", [1, 100, 999])
def test_implausible_sample_rate_is_refused_not_resampled(tmp_path, rate):
    """A header claiming 1 Hz would otherwise make 0.3 s of samples into hours of 16 kHz audio."""
    data = bytearray(SEEDS["pcm16.wav"])
    struct.pack_into("<I", data, 24, rate)
    struct.pack_into("<I", data, 28, rate * 2)
    (tmp_path / "slow.wav").write_bytes(bytes(data))
    with pytest.raises(AudioError, match=rf"slow.wav: implausible sample rate {rate} Hz"):
        load_audio(tmp_path / "slow.wav", 16000)
    with pytest.raises(AudioError, match="implausible sample rate"):
        audio_info(tmp_path / "slow.wav")
