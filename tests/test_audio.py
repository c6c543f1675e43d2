"""Audio loading: every kind of bad or unusual file gives the right result or a clear error."""

import resource
import wave as wavelib

import numpy as np
import pytest
import soundfile as sf

from sertool.audio import AudioError, audio_info, is_silent, load_audio

from conftest import tone


def dominant_frequency(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.argmax(spectrum) * sr / len(x))


def test_plain_wav_roundtrip(tmp_path):
    x = tone(440, 1.0)
    sf.write(tmp_path / "a.wav", x, 16000, subtype="FLOAT")
    y, sr = load_audio(tmp_path / "a.wav", 16000)
    assert sr == 16000 and y.dtype == np.float32
    np.testing.assert_allclose(y, x, atol=1e-6)


def test_missing_file(tmp_path):
    with pytest.raises(AudioError, match="does not exist"):
        load_audio(tmp_path / "nope.wav")


def test_empty_file(tmp_path):
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(AudioError, match=r"empty.wav: empty file \(0 bytes\)"):
        load_audio(tmp_path / "empty.wav")


def test_zero_length_wav(tmp_path):
    sf.write(tmp_path / "zero.wav", np.zeros(0, np.float32), 16000)
    assert audio_info(tmp_path / "zero.wav").frames == 0
    with pytest.raises(AudioError, match="zero-length"):
        load_audio(tmp_path / "zero.wav")


def test_silent_file_loads_and_is_flagged(tmp_path):
    sf.write(tmp_path / "silent.wav", np.zeros(8000, np.float32), 16000)
    y, _ = load_audio(tmp_path / "silent.wav")
    assert len(y) == 8000 and is_silent(y)
    with pytest.raises(AudioError, match="silent"):
        load_audio(tmp_path / "silent.wav", allow_silent=False)


def test_nan_samples(tmp_path):
    x = tone(200, 0.5)
    x[1234] = np.nan
    sf.write(tmp_path / "nan.wav", x, 16000, subtype="FLOAT")
    with pytest.raises(AudioError, match="NaN or infinite"):
        load_audio(tmp_path / "nan.wav")


def test_non_audio_file(tmp_path):
    (tmp_path / "notes.wav").write_text("this is not audio\n" * 20)
    with pytest.raises(AudioError, match="not a readable audio file"):
        load_audio(tmp_path / "notes.wav")


def test_truncated_wav(tmp_path):
    sf.write(tmp_path / "full.wav", tone(300, 1.0), 16000, subtype="PCM_16")
    data = (tmp_path / "full.wav").read_bytes()
    (tmp_path / "cut.wav").write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="truncated"):
        load_audio(tmp_path / "cut.wav")


def test_truncated_flac(tmp_path):
    sf.write(tmp_path / "full.flac", np.random.default_rng(0).normal(0, 0.1, 16000).astype(np.float32), 16000)
    data = (tmp_path / "full.flac").read_bytes()
    (tmp_path / "cut.flac").write_bytes(data[: len(data) // 2])
    with pytest.raises(AudioError, match="truncated|corrupt"):
        load_audio(tmp_path / "cut.flac")


def test_8bit_wav(tmp_path):
    sf.write(tmp_path / "u8.wav", tone(250, 0.5, amp=0.5), 16000, subtype="PCM_U8")
    y, _ = load_audio(tmp_path / "u8.wav")
    assert np.abs(y).max() == pytest.approx(0.5, abs=0.02)
    assert dominant_frequency(y, 16000) == pytest.approx(250, abs=3)


def test_96khz_is_resampled(tmp_path):
    sf.write(tmp_path / "hi.wav", tone(1000, 2.0, sr=96000), 96000, subtype="PCM_24")
    y, sr = load_audio(tmp_path / "hi.wav", 16000)
    assert sr == 16000 and len(y) == 32000
    assert dominant_frequency(y, 16000) == pytest.approx(1000, abs=2)
    assert np.abs(y[1000:-1000]).max() == pytest.approx(0.3, abs=0.01)


def test_multichannel_is_mixed_to_mono(tmp_path):
    t = np.arange(16000) / 16000
    left, right = 0.4 * np.sin(2 * np.pi * 300 * t), np.zeros_like(t)
    stereo4 = np.stack([left, right, left, right], axis=1).astype(np.float32)
    sf.write(tmp_path / "multi.wav", stereo4, 16000, subtype="FLOAT")
    y, _ = load_audio(tmp_path / "multi.wav")
    np.testing.assert_allclose(y, (left / 2).astype(np.float32), atol=1e-6)


@pytest.mark.parametrize("fmt", ["flac", "ogg", "mp3"])
def test_compressed_formats(tmp_path, fmt):
    sf.write(tmp_path / f"x.{fmt}", tone(440, 1.0), 16000)
    y, _ = load_audio(tmp_path / f"x.{fmt}")
    assert abs(len(y) - 16000) < 1200  # codecs may pad a frame
    assert dominant_frequency(y, 16000) == pytest.approx(440, abs=3)


def test_segment(tmp_path):
    x = np.arange(32000, dtype=np.float32) / 32000
    sf.write(tmp_path / "ramp.wav", x, 16000, subtype="FLOAT")
    y, _ = load_audio(tmp_path / "ramp.wav", None, start=0.5, end=1.0)
    np.testing.assert_allclose(y, x[8000:16000])
    with pytest.raises(AudioError, match="outside"):
        load_audio(tmp_path / "ramp.wav", start=3.0, end=4.0)


def test_hour_long_file_streams_in_bounded_memory(tmp_path):
    """One hour of 8 kHz audio resampled to 16 kHz: right length, memory ~ the result only."""
    path = tmp_path / "hour.wav"
    sr, seconds = 8000, 3600
    with wavelib.open(str(path), "wb") as w:  # written in blocks: the test itself stays small
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(sr)
        block = (np.stack([tone(100, 60, sr=sr)] * 2, axis=1) * 32767).astype("<i2").tobytes()
        for _ in range(seconds // 60):
            w.writeframes(block)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    y, out_sr = load_audio(path, 16000)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert out_sr == 16000 and len(y) == seconds * 16000
    assert y.dtype == np.float32
    # result is 230 MB; reading the whole stereo file as float64 first would need ~1.2 GB more
    assert grown_mb < 700, f"peak memory grew by {grown_mb:.0f} MB"


def test_text_posing_as_mp3_is_reported_as_bad_data_not_a_missing_file(tmp_path):
    p = tmp_path / "notes.mp3"
    p.write_bytes(b"this is not audio at all")
    with pytest.raises(AudioError) as e:
        audio_info(p)
    assert str(p) in str(e.value) and "unrecognised or corrupt audio data" in str(e.value)
    assert "does not exist" not in str(e.value)
