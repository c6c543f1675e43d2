"""MFCC extractor: equality with librosa (mfcc) and torchaudio's pipeline (mfcc80), shapes, edges."""

from __future__ import annotations

import json
import pickle

import librosa
import numpy as np
import pytest

from sertool.features.base import build_extractor, list_extractors

from acoustic_synth import silence, speech_like, white_noise


@pytest.fixture(scope="module")
def wave():
    return speech_like(2.0) + white_noise(2.0, amp=0.003, seed=3)


def test_registered_with_presets():
    names = list_extractors()
    assert "mfcc" in names and "mfcc80" in names
    assert names["mfcc"]  # a description for `sertool extract --list`


def test_mfcc_matches_librosa(wave):
    ex = build_extractor("mfcc")
    out = ex.extract(None, wave).data
    ref = librosa.feature.mfcc(
        y=wave, sr=16000, n_mfcc=40, n_fft=512, win_length=400, hop_length=160, window="hamming", n_mels=40
    )
    ref = np.concatenate([ref, librosa.feature.delta(ref), librosa.feature.delta(ref, order=2)]).T
    assert out.shape == ref.shape == (1 + wave.size // 160, 120)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=2e-3 * np.abs(ref).max())
    attrs = ex.file_attrs()
    assert attrs["dim"] == 120 and attrs["frame_rate_hz"] == 100.0 and len(attrs["columns"]) == 120
    assert (
        attrs["columns"][0] == "mfcc_0" and attrs["columns"][40] == "d_mfcc_0" and attrs["columns"][-1] == "dd_mfcc_39"
    )


def torchaudio_mfcc_reference(wave: np.ndarray) -> np.ndarray:
    """torchaudio.transforms.MFCC(sample_rate=16000, n_mfcc=80, melkwargs={"n_fft": 400}) written
    out with torch ops and torchaudio's defaults (torchaudio itself is not installable here)."""
    torch = pytest.importorskip("torch")
    x = torch.from_numpy(wave.astype(np.float32))
    spec = (
        torch.stft(
            x,
            n_fft=400,
            hop_length=200,
            win_length=400,
            window=torch.hann_window(400),
            center=True,
            pad_mode="reflect",
            return_complex=True,
        ).abs()
        ** 2
    )
    # melscale_fbanks(201, 0, 8000, 128, 16000, norm=None, mel_scale="htk")
    all_freqs = torch.linspace(0, 8000, 201)
    m_pts = torch.linspace(0, 2595.0 * np.log10(1 + 8000 / 700.0), 130)
    f_pts = 700.0 * (10 ** (m_pts / 2595.0) - 1)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts[None, :] - all_freqs[:, None]
    fb = torch.clamp(torch.minimum(-slopes[:, :-2] / f_diff[:-1], slopes[:, 2:] / f_diff[1:]), min=0)  # [201, 128]
    mel = fb.T @ spec
    db = 10 * torch.log10(torch.clamp(mel, min=1e-10))
    db = torch.maximum(db, db.max() - 80)
    n = torch.arange(128.0)
    k = torch.arange(80.0)[:, None]
    dct = torch.cos(np.pi / 128 * (n + 0.5) * k)
    dct[0] *= 1 / np.sqrt(2.0)
    dct *= np.sqrt(2.0 / 128)
    return (dct @ db).T.numpy()


def test_mfcc80_mirrors_torchaudio(wave):
    ex = build_extractor("mfcc80")
    out = ex.extract(None, wave).data
    ref = torchaudio_mfcc_reference(wave)
    assert out.shape == ref.shape == (1 + wave.size // 200, 80)
    np.testing.assert_allclose(out, ref, atol=2e-3 * np.abs(ref).max())
    assert ex.file_attrs()["frame_rate_hz"] == 80.0 and ex.file_attrs()["dim"] == 80


@pytest.mark.parametrize("name", ["mfcc", "mfcc80"])
def test_rebuild_from_config_and_pickle(name, wave):
    ex = build_extractor(name)
    config = json.loads(json.dumps(ex.config()))
    again = build_extractor(config)
    assert again.params() == ex.params()
    np.testing.assert_array_equal(again.extract(None, wave).data, ex.extract(None, wave).data)
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(ex)).extract(None, wave).data, ex.extract(None, wave).data)


@pytest.mark.parametrize("name", ["mfcc", "mfcc80"])
@pytest.mark.parametrize("n", [1, 50, 399, 400, 401, 1600, 16000])
def test_any_length_and_silence_finite(name, n):
    ex = build_extractor(name)
    hop = ex.hop_length
    for w in (silence(n / 16000), white_noise(n / 16000, amp=0.1)):
        w = w[:n] if w.size >= n else np.pad(w, (0, n - w.size))
        out = ex.extract(None, w).data
        assert out.shape == (1 + n // hop, ex.file_attrs()["dim"])
        assert np.isfinite(out).all()


def test_param_overrides_and_errors():
    ex = build_extractor("mfcc", {"n_mfcc": 13, "deltas": 1, "log": "log", "preemphasis": 0.97, "lifter": 22})
    out = ex.extract(None, white_noise(0.5)).data
    assert out.shape == (51, 26) and np.isfinite(out).all()
    from sertool.features.base import ExtractorError

    with pytest.raises(ExtractorError):
        build_extractor("mfcc", {"deltas": 3})
    with pytest.raises(ExtractorError):
        build_extractor("mfcc", {"n_mfcc": 80, "n_mels": 40})
    with pytest.raises(ExtractorError):
        build_extractor("mfcc", {"no_such": 1})
