"""`sertool predict` with a model on Whisper encoder states (the `whisper` extractor, window=utterance):
a clip under the minimum length gets a too_short error row, a longer one a label."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
from test_predict import run, write_exp  # noqa: F401
from whisper_synth import SR, speechlike, tiny_whisper_config

from sertool.predict import MIN_CLIP_S, iter_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def whisper_exp(tmp_path_factory):
    from transformers import WhisperModel

    base = tmp_path_factory.mktemp("wexp")
    WhisperModel(tiny_whisper_config()).save_pretrained(base / "tiny")
    extractor = {"name": "whisper", "params": {"model": str(base / "tiny"), "window": "utterance", "layer": -1}}
    return write_exp(
        base / "exp",
        {"name": "probe", "modality": "audio", "input_dim": 32, "n_classes": 3},
        {"audio": {"feature": "whisper", "kind": "audio", "dim": 32, "extractor": extractor}},
        ["a", "b", "c"],
    )


def test_whisper_model_flags_too_short_clips(whisper_exp, tmp_path):
    d = tmp_path / "clips"
    d.mkdir()
    sf.write(d / "ok.wav", speechlike(SR), SR)
    sf.write(d / "short.wav", speechlike(int(0.05 * SR)), SR)
    sf.write(d / "one_sample.wav", np.zeros(1, np.float32), SR)
    out = tmp_path / "p.csv"
    res = run([whisper_exp, d, "-o", out, "-q", "--device", "cpu"])
    assert res.exit_code == 3, res.output
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in iter_rows(out)}
    assert rows["ok.wav"]["label"] in ("a", "b", "c") and rows["ok.wav"]["error"] == ""
    for name in ("short.wav", "one_sample.wav"):
        assert rows[name]["label"] == "" and "too short" in rows[name]["error"], rows[name]
        assert f"at least {MIN_CLIP_S:g} s" in rows[name]["error"]


def test_a_model_can_ask_for_longer_clips(whisper_exp, tmp_path):
    import json
    import shutil

    exp = tmp_path / "exp"
    shutil.copytree(whisper_exp, exp)
    spec = json.loads((exp / "predictor.json").read_text())
    (exp / "predictor.json").write_text(json.dumps({**spec, "min_clip_s": 2.0}))
    d = tmp_path / "clips"
    d.mkdir()
    sf.write(d / "one_second.wav", speechlike(SR), SR)
    out = tmp_path / "p.csv"
    assert run([exp, d, "-o", out, "-q", "--device", "cpu"]).exit_code == 3
    (row,) = iter_rows(out)
    assert "too short" in row["error"] and "at least 2 s" in row["error"]


def test_whisper_model_on_a_long_recording_predicts_its_speech(whisper_exp, tmp_path):
    """window=utterance on VAD segments: each speech segment is encoded on its own."""
    d = tmp_path / "clips"
    d.mkdir()
    rng = np.random.default_rng(0)
    x = 0.002 * rng.standard_normal(40 * SR).astype(np.float32)
    for a, b in ((3, 8), (20, 24)):
        x[a * SR : b * SR] += speechlike((b - a) * SR, seed=a)
    sf.write(d / "long.wav", x, SR)
    out = tmp_path / "p.csv"
    res = run([whisper_exp, d, "-o", out, "-q", "--device", "cpu", "--segments"])
    assert res.exit_code == 0, res.output
    rows = list(iter_rows(out))
    spans = [(float(r["start"]), float(r["end"])) for r in rows if r["segment"]]
    assert len(spans) == 2 and abs(spans[0][0] - 3) < 0.2 and abs(spans[1][1] - 24) < 0.2, spans
    assert rows[-1]["n_segments"] == "2" and rows[-1]["label"] in ("a", "b", "c")
