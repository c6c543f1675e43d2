"""Frame-level fusion (``concat``): the frame-rate alignment on hand-made cases; the fused store
built from existing stores equals what the recorded extractor recomputes (what predict runs);
a probe trains on it and predict rebuilds its features; bad inputs are refused by name."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from sertool.cli import cli
from sertool.corpora.base import Utterance
from sertool.extract import run_extract
from sertool.features.base import ExtractorError, build_extractor
from sertool.features.fusion import align_frames, concat_frames, concat_stores
from sertool.predict import _features, _File, load_predictor
from sertool.store import StoreError, open_store
from sertool.train import run_train

SR = 16000
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_align_frames_averages_repeats_and_clips():
    x = np.arange(10, dtype=np.float32)[:, None]
    # 100 Hz onto 50 Hz: each reference frame averages the two frames inside its 20 ms
    np.testing.assert_array_equal(align_frames(x, 100, 5, 50).ravel(), [0.5, 2.5, 4.5, 6.5, 8.5])
    # 25 Hz onto 50 Hz: each frame covers two reference frames
    np.testing.assert_array_equal(align_frames(x, 25, 8, 50).ravel(), [0, 0, 1, 1, 2, 2, 3, 3])
    # a part one frame short at the end: the last reference frame takes the part's last frame
    np.testing.assert_array_equal(align_frames(x, 100, 6, 50).ravel(), [0.5, 2.5, 4.5, 6.5, 8.5, 9])
    # same rate: unchanged; several columns kept apart
    y = np.stack([np.arange(4.0), -np.arange(4.0)], 1).astype(np.float32)
    np.testing.assert_array_equal(align_frames(y, 50, 4, 50), y)
    fused = concat_frames([np.ones((3, 2)), x], [50, 100])
    assert fused.shape == (3, 3) and fused[:, 2].tolist() == [0.5, 2.5, 4.5]
    with pytest.raises(ValueError, match="non-empty"):
        align_frames(np.zeros((0, 2)), 100, 3, 50)


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    base = tmp_path_factory.mktemp("fusion")
    corpus = base / "corpus"
    rows = ["file,label,speaker"]
    rng = np.random.default_rng(0)
    for s in range(4):
        for i in range(6):
            label = ("low", "high")[i % 2]
            t = np.arange(int((0.5 + 0.05 * i) * SR)) / SR
            x = 0.3 * np.sin(2 * np.pi * ((150 if label == "low" else 400) + 7 * s) * t) + 0.01 * rng.normal(
                size=t.size
            )
            path = corpus / f"spk{s}" / f"u{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, x.astype(np.float32), SR)
            rows.append(f"spk{s}/u{i}.wav,{label},spk{s}")
    (corpus / "metadata.csv").write_text("\n".join(rows) + "\n")
    feats = base / "feats"
    run_extract(
        corpus,
        feats,
        ["m50=mfcc:n_mfcc=8,deltas=0,hop_ms=20", "m100=mfcc:n_mfcc=5,deltas=0,hop_ms=10"],
        progress=False,
        log=lambda s: None,
    )
    path = concat_stores(feats, ["m50", "m100"], log=lambda s: None)
    return {"corpus": corpus, "feats": feats, "path": path, "base": base}


def test_fused_store_matches_parts_and_recorded_extractor(fused):
    with (
        open_store(fused["path"]) as s,
        open_store(fused["feats"], "m50") as a,
        open_store(fused["feats"], "m100") as b,
    ):
        assert s.attrs["dim"] == 13 and s.attrs["frame_rate_hz"] == 50 and s.attrs["parts"] == ["m50", "m100"]
        assert len(s.attrs["columns"]) == 13 and s.attrs["kind"] == "audio"
        uid = "spk2__u3"
        x, xa, xb = s[uid], a[uid], b[uid]
        assert x.shape[0] == xa.shape[0]
        np.testing.assert_array_equal(x[:, :8], xa)
        np.testing.assert_allclose(x[:, 8:], align_frames(xb, 100, xa.shape[0], 50), rtol=1e-6)
        # the provenance rebuilds the fusion for new audio: same numbers as the store
        ex = build_extractor(s.attrs["extractor"])
        wave, _ = sf.read(fused["corpus"] / "spk2" / "u3.wav", dtype="float32")
        np.testing.assert_allclose(ex.extract(Utterance(id=uid, audio=""), wave).data, x, atol=1e-5)
        assert ex.file_attrs()["dim"] == 13


def test_probe_on_fused_store_and_predict_rebuilds_it(fused):
    exp = fused["base"] / "exp"
    run_train(
        "probe",
        fused["feats"],
        exp,
        overrides=[
            "data.audio=m50+m100",
            "protocol.name=speaker-kfold:2",
            "train.epochs=10",
            "optim.lr=0.05",
            "run.threads=1",
            "train.batch_size=8",
        ],
        progress=False,
        log=lambda s: None,
    )
    pred = load_predictor(exp, "cpu")
    assert pred.extractors["audio"].name == "concat"
    with open_store(fused["path"]) as s:
        stored = s["spk1__u4"]
    got = _features(_File(fused["corpus"] / "spk1" / "u4.wav", "x"), pred, 30.0)[0]["audio"]
    np.testing.assert_allclose(got, stored, atol=1e-5)


def test_resume_and_bad_inputs(fused, tmp_path):
    # a second run finds everything done
    lines = []
    concat_stores(fused["feats"], ["m50", "m100"], log=lines.append)
    assert "0 written, 24 already done" in lines[0]
    with pytest.raises(StoreError, match="nope"):
        concat_stores(fused["feats"], ["m50", "nope"])
    with pytest.raises(StoreError, match="at least two"):
        concat_stores(fused["feats"], ["m50"])
    with pytest.raises((ValueError, ExtractorError), match="at least two parts"):
        build_extractor({"name": "concat", "params": {"parts": "mfcc"}})
    res = CliRunner().invoke(cli, ["store", "concat", str(fused["feats"]), "m50", "m100", "-o", "both"])
    assert res.exit_code == 0, res.output
    assert (fused["feats"] / "both.h5").exists()


def test_text_store_is_refused(tmp_path):
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(2):
        sf.write(corpus / f"u{i}.wav", (0.1 * np.sin(np.arange(8000) / 9)).astype(np.float32), SR)
        (corpus / f"u{i}.txt").write_text("hello world")
    run_extract(corpus, tmp_path / "f", ["mfcc:n_mfcc=5,deltas=0"], progress=False, log=lambda s: None)
    from sertool.store import StoreWriter

    with StoreWriter(tmp_path / "f" / "words.h5", {"feature": "words", "kind": "text", "dim": 2, "unit": "word"}) as w:
        for i in range(2):
            w.add(f"u{i}", np.ones((2, 2), np.float32))
    with pytest.raises(StoreError, match=r"words\.h5: holds text features"):
        concat_stores(tmp_path / "f", ["mfcc", "words"])
    assert not Path(tmp_path / "f" / "mfcc+words.h5").exists()


def test_extract_concat_equals_store_concat(fused, tmp_path):
    """`-f NAME=concat:parts=A+B` in one extraction gives the numbers of `store concat` of A and B."""
    feats = tmp_path / "feats"
    run_extract(
        fused["corpus"], feats, ["mfcc", "mfcc80", "both=concat:parts=mfcc80+mfcc"], progress=False, log=lambda s: None
    )
    concat_stores(feats, ["mfcc80", "mfcc"], "from_stores", log=lambda s: None)
    with open_store(feats, "both") as a, open_store(feats, "from_stores") as b:
        assert a.attrs["dim"] == b.attrs["dim"] == 80 + 120 and a.attrs["frame_rate_hz"] == 80  # mfcc: 40 + deltas
        assert a.attrs["extractor"] == b.attrs["extractor"]
        assert sorted(a.ids) == sorted(b.ids) and len(a.ids) == 24
        for uid in a.ids[:5]:
            np.testing.assert_allclose(a[uid], b[uid], atol=1e-5)
