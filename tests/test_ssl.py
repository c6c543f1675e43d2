"""wav2vec2-family frame states on tiny random models: frame counts, layers, masks, chunking, batching."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sertool.corpora.base import Utterance
from sertool.features.base import ExtractorError, build_extractor

SR = 16000


def save_tiny(kind: str, path, layer_norm: bool):
    from transformers import (
        Data2VecAudioConfig,
        Data2VecAudioModel,
        HubertConfig,
        HubertModel,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Model,
        WavLMConfig,
        WavLMModel,
    )

    torch.manual_seed(0)
    common = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16,) * 7,
        num_conv_pos_embedding_groups=4,
    )
    if kind == "data2vec-audio":
        model = Data2VecAudioModel(
            Data2VecAudioConfig(**{**common, "conv_pos_kernel_size": 5, "num_conv_pos_embeddings": 5})
        )
    else:
        norm = dict(feat_extract_norm="layer" if layer_norm else "group", do_stable_layer_norm=layer_norm)
        cls, cfg = {
            "wav2vec2": (Wav2Vec2Model, Wav2Vec2Config),
            "hubert": (HubertModel, HubertConfig),
            "wavlm": (WavLMModel, WavLMConfig),
        }[kind]
        extra = {"num_buckets": 8, "max_bucket_distance": 50} if kind == "wavlm" else {}
        model = cls(cfg(**common, **norm, **extra))
    model.save_pretrained(path)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SR, padding_value=0.0, do_normalize=True, return_attention_mask=layer_norm
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def w2v_layer(tmp_path_factory):  # wav2vec2 with layer-normalised CNN (like large-lv60): batched with a mask
    return save_tiny("wav2vec2", tmp_path_factory.mktemp("w2v-layer"), True)


@pytest.fixture(scope="module")
def hubert_group(tmp_path_factory):  # HuBERT with group norm (like the base models): one chunk at a time
    return save_tiny("hubert", tmp_path_factory.mktemp("hubert-group"), False)


def waves(*lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


def direct(model_dir, wave):
    from transformers import AutoFeatureExtractor, AutoModel

    fe = AutoFeatureExtractor.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    x = fe(wave, sampling_rate=SR, return_tensors="pt")["input_values"]
    with torch.no_grad():
        return [h[0].numpy() for h in model(x, output_hidden_states=True).hidden_states]


def test_frame_count_layers_and_values(w2v_layer):
    ex = build_extractor("wav2vec2", {"model": str(w2v_layer), "layer": "all"})
    attrs = ex.file_attrs()
    assert attrs["frame_rate_hz"] == 50.0 and attrs["dim"] == 96 and attrs["layers"] == [0, 1, 2]
    assert attrs["layer_dim"] == 32
    # the model's own frame count: 1 s -> 49 frames, 400 samples (one window) -> 1 frame
    assert [ex.n_frames(n) for n in (399, 400, 719, 720, SR, 2 * SR)] == [0, 1, 1, 2, 49, 99]
    wave = waves(SR + 123)[0]
    res = ex.extract(Utterance("u", audio="x"), wave)
    states = direct(w2v_layer, wave)
    assert res.data.shape == (ex.n_frames(len(wave)), 96) == (states[0].shape[0], 96)
    np.testing.assert_allclose(res.data, np.concatenate(states, -1), atol=1e-5)
    for layer, expected in [(-1, states[2]), (1, states[1]), ([0, 2], (states[0] + states[2]) / 2)]:
        out = build_extractor("wav2vec2", {"model": str(w2v_layer), "layer": layer}).extract(Utterance("u"), wave)
        np.testing.assert_allclose(out.data, expected, atol=1e-5, err_msg=str(layer))


@pytest.mark.parametrize("fixture", ["w2v_layer", "hubert_group"])
def test_batch_with_padding_mask_equals_single(fixture, request):
    model_dir = request.getfixturevalue(fixture)
    ex = build_extractor("wav2vec2", {"model": str(model_dir), "layer": "all", "batch_size": 4})
    assert ex.can_pad == (fixture == "w2v_layer")
    ws = waves(SR, 3 * SR // 2 + 77, 400, 300, 2 * SR + 5)
    batch = ex.extract_batch([(Utterance(f"u{i}", audio="x"), w) for i, w in enumerate(ws)])
    assert isinstance(batch[3], ExtractorError) and "too short" in str(batch[3])
    for w, r in zip(ws, batch):
        if len(w) < 400:
            continue
        single = ex.extract(Utterance("s", audio="x"), w)
        assert r.data.shape == single.data.shape == (ex.n_frames(len(w)), ex.dim)
        np.testing.assert_allclose(r.data, single.data, atol=1e-5)


def test_chunking_keeps_frame_indices_exact(w2v_layer):
    whole = build_extractor("wav2vec2", {"model": str(w2v_layer), "layer": "all"})
    # 0.5 s chunks with 1.5 s context each side: the positional convolution (128 frames = 1.28 s,
    # i.e. 64 frames each side) sees the same input, so layer 0 is identical; deeper layers
    # only lose far attention context
    chunked = build_extractor("wav2vec2", {"model": str(w2v_layer), "layer": "all", "chunk_s": 0.5, "context_s": 1.5})
    wave = waves(4 * SR + 321, seed=3)[0]
    a = whole.extract(Utterance("u", audio="x"), wave)
    b = chunked.extract(Utterance("u", audio="x"), wave)
    assert a.attrs["n_chunks"] == 1 and b.attrs["n_chunks"] == 8  # 200 frames, 25 per chunk
    assert b.data.shape == a.data.shape
    np.testing.assert_allclose(b.data[:, :32], a.data[:, :32], atol=1e-5)
    assert np.abs(b.data[:, -32:] - a.data[:, -32:]).mean() < 0.05 * np.abs(a.data[:, -32:]).mean()
    # the pieces tile the frames without gaps or overlaps
    pieces = chunked._pieces(len(wave))
    kept = [(s // chunked.stride + lo, s // chunked.stride + hi) for s, e, lo, hi in pieces]
    assert kept[0][0] == 0 and kept[-1][1] == whole.n_frames(len(wave))
    assert all(x[1] == y[0] for x, y in zip(kept, kept[1:]))
    for s, e, lo, hi in pieces:  # each piece is long enough for its last kept frame
        assert chunked.n_frames(e - s) >= hi


@pytest.mark.parametrize("kind", ["wavlm", "data2vec-audio"])
def test_other_audio_encoders_load_through_automodel(kind, tmp_path):
    model_dir = save_tiny(kind, tmp_path / kind, True)
    ex = build_extractor("wav2vec2", {"model": str(model_dir), "layer": -1})
    ws = waves(SR, SR // 2 + 999)
    out = ex.extract_batch([(Utterance("a"), ws[0]), (Utterance("b"), ws[1])])
    for w, r in zip(ws, out):
        assert r.data.shape == (ex.n_frames(len(w)), 32)
        np.testing.assert_allclose(r.data, direct(model_dir, w)[-1], atol=1e-4)


def test_params_rebuild_and_errors(hubert_group):
    ex = build_extractor("wav2vec2", {"model": str(hubert_group), "layer": [1, 2], "combine": "stack"})
    assert ex.dim == 64
    again = build_extractor(ex.config())
    assert again.params() == ex.params()
    w = waves(SR)[0]
    np.testing.assert_array_equal(again.extract(Utterance("u"), w).data, ex.extract(Utterance("u"), w).data)
    with pytest.raises(ExtractorError, match="layer 5"):
        build_extractor("wav2vec2", {"model": str(hubert_group), "layer": 5})
    with pytest.raises(ExtractorError, match="CUDA is not available"):
        if torch.cuda.is_available():
            raise ExtractorError("CUDA is not available (skipped: there is CUDA)")
        build_extractor("wav2vec2", {"model": str(hubert_group), "device": "cuda"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_on_cuda_is_close_to_fp32(w2v_layer):
    fp16 = build_extractor("wav2vec2", {"model": str(w2v_layer), "device": "cuda"})
    fp32 = build_extractor("wav2vec2", {"model": str(w2v_layer), "device": "cpu"})
    assert fp16.torch_dtype == torch.float16
    ws = waves(SR, 2 * SR)
    for a, b in zip(
        fp16.extract_batch([(Utterance("a"), w) for w in ws]), fp32.extract_batch([(Utterance("a"), w) for w in ws])
    ):
        assert a.data.dtype == np.float32 and a.data.shape == b.data.shape
        np.testing.assert_allclose(a.data, b.data, atol=5e-2, rtol=5e-2)
