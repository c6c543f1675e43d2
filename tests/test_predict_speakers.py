"""``sertool predict --speaker-from``: per-speaker normalisation for models trained with
``data.normalize.audio=speaker``, checked against the train/evaluate stages on the demo corpus."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sertool.cli import cli
from sertool.data import frame_moments
from sertool.predict import (
    MIN_SPEAKER_RECORDINGS,
    Predictor,
    SpeakerMap,
    _InMemoryFeatures,
    iter_rows,
    load_predictor,
    speaker_group_is_enough,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo" / "data"
TEST_SPEAKER = "Actor_02"


@pytest.fixture(scope="module")
def speaker_exp(tmp_path_factory):
    """A probe on 13 MFCCs with per-speaker normalisation, one leave-one-speaker-out fold (test
    speaker Actor_02), and its evaluate predictions."""
    from sertool.evaluate import run_evaluate
    from sertool.extract import run_extract
    from sertool.train import run_train

    base = tmp_path_factory.mktemp("spk")
    feats = base / "feats"
    run_extract(DEMO, feats, ["mfcc:n_mfcc=13,deltas=0"], progress=False, log=lambda s: None)
    exp = base / "exp"
    overrides = [
        "data.audio=mfcc",
        "data.normalize.audio=speaker",
        "data.labels=ravdess8",
        "protocol.name=loso",
        "train.epochs=4",
        "optim.lr=0.05",
        "run.threads=1",
    ]
    run_train(
        "probe", feats, exp, overrides=overrides, progress=False, log=lambda s: None, folds_only=[f"spk-{TEST_SPEAKER}"]
    )
    # evaluate writes uncalibrated probabilities: compare the model and its normalisation without the
    # temperature (checked on its own in test_predict/test_export)
    spec = json.loads((exp / "predictor.json").read_text())
    spec.pop("temperature", None)
    (exp / "predictor.json").write_text(json.dumps(spec))
    run_evaluate(exp, feats, log=lambda s: None)
    with open(exp / "eval" / "predictions.csv", newline="") as f:
        evaluated = {r["id"]: r for r in csv.DictReader(f)}
    return {"exp": exp, "feats": feats, "base": base, "eval": evaluated, "classes": spec["classes"]}


def run(args):
    return CliRunner().invoke(cli, ["predict", *map(str, args)], catch_exceptions=False)


def probabilities(row, classes):
    return np.array([float(row[f"p_{c}"]) for c in classes])


def assert_matches_evaluate(rows, ctx):
    assert len(rows) == 60
    for r in rows:
        expected = probabilities(ctx["eval"][Path(r["file"]).stem], ctx["classes"])
        np.testing.assert_allclose(probabilities(r, ctx["classes"]), expected, atol=1e-5)
        assert r["speaker"] == TEST_SPEAKER and r["normalization"] == "speaker" and r["error"] == ""


def test_parent_folder_reproduces_the_evaluated_predictions(speaker_exp, tmp_path):
    out = tmp_path / "p.csv"
    res = run([speaker_exp["exp"], DEMO / "audio" / TEST_SPEAKER, "-o", out, "-q", "--speaker-from", "parent"])
    assert res.exit_code == 0, res.output
    assert_matches_evaluate(list(iter_rows(out)), speaker_exp)


def test_csv_and_regex_give_the_same_groups(speaker_exp, tmp_path):
    audio = DEMO / "audio"
    table = tmp_path / "speakers.csv"
    files = sorted((audio / TEST_SPEAKER).glob("*.flac"))
    table.write_text("path,speaker\n" + "".join(f"{TEST_SPEAKER}/{f.name},{TEST_SPEAKER}\n" for f in files))
    for option in (f"csv:{table}", r"regex:(?P<speaker>Actor_\d+)/", r"regex:^([^/]+)/"):
        out = tmp_path / "p.csv"
        # the whole demo corpus is scanned: only Actor_02's rows are compared
        res = run([speaker_exp["exp"], audio, "-o", out, "-q", "--overwrite", "--speaker-from", option])
        assert res.exit_code == 0, res.output
        rows = [r for r in iter_rows(out) if f"/{TEST_SPEAKER}/" in r["file"]]
        assert_matches_evaluate(rows, speaker_exp)
        others = [r for r in iter_rows(out) if f"/{TEST_SPEAKER}/" not in r["file"]]
        if option.startswith("csv"):  # not in the table: unknown speaker, global fallback
            assert {r["speaker"] for r in others} == {""} and {r["normalization"] for r in others} == {
                "global-fallback"
            }
        else:
            assert {r["normalization"] for r in others} == {"speaker"} and len({r["speaker"] for r in others}) == 3


def test_speaker_map_forms(tmp_path):
    root = tmp_path / "w"
    (root / "a").mkdir(parents=True)
    x = root / "a" / "spk7_001.wav"
    assert SpeakerMap("parent", root)(x) == "a"
    assert SpeakerMap(r"regex:spk(\d+)_", root)(x) == "7"
    assert SpeakerMap(r"regex:nomatch", root)(x) is None
    table = tmp_path / "t.tsv"
    table.write_text("file\tspeaker\na/spk7_001\tbob\n")
    assert SpeakerMap(f"csv:{table}", root)(x) == "bob"
    from sertool.predict import PredictError

    for bad in ("speaker", "regex:(", f"csv:{tmp_path / 'none.csv'}", "csv:"):
        with pytest.raises(PredictError, match="--speaker-from"):
            SpeakerMap(bad, root)
    assert speaker_group_is_enough(MIN_SPEAKER_RECORDINGS, 17.0) and not speaker_group_is_enough(4, 17.0)
    assert not speaker_group_is_enough(5, 10.0) and speaker_group_is_enough(1, 61.0)


@pytest.fixture(scope="module")
def mixed_dir(speaker_exp):
    """Actor_02's 60 clips plus a 'guest' folder with 3 clips of Actor_03 (too few for own statistics)."""
    d = speaker_exp["base"] / "mixed"
    shutil.copytree(DEMO / "audio" / TEST_SPEAKER, d / TEST_SPEAKER)
    (d / "guest").mkdir()
    for f in sorted((DEMO / "audio" / "Actor_03").glob("*.flac"))[:3]:
        shutil.copy(f, d / "guest" / f.name)
    return d


def test_small_group_falls_back_to_the_statistics_of_the_run(speaker_exp, mixed_dir, tmp_path):
    out = tmp_path / "p.csv"
    res = run([speaker_exp["exp"], mixed_dir, "-o", out, "--speaker-from", "parent", "-q"])
    assert res.exit_code == 0, res.output
    rows = list(iter_rows(out))
    assert_matches_evaluate([r for r in rows if r["speaker"] == TEST_SPEAKER], speaker_exp)
    guests = [r for r in rows if r["speaker"] == "guest"]
    assert len(guests) == 3 and {r["normalization"] for r in guests} == {"global-fallback"}
    # the fallback: the training split's global statistics, which the train stage stores beside the
    # per-speaker ones (norm.safetensors audio.fallback.*): frames of the raw training features pooled
    from safetensors.numpy import load_file

    from sertool.store import open_store

    exp = speaker_exp["exp"]
    norm = load_file(str(exp / "norm.safetensors"))
    fold = next(f for f in json.loads((exp / "folds.json").read_text())["folds"] if f["name"] == f"spk-{TEST_SPEAKER}")
    store = open_store(speaker_exp["feats"], "mfcc")
    raw = _InMemoryFeatures({u: store[u] for u in fold["train"]})
    mean, std = frame_moments(raw, fold["train"])
    np.testing.assert_allclose(norm["audio.fallback.mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(norm["audio.fallback.std"], std, rtol=1e-5, atol=1e-6)
    pred = load_predictor(speaker_exp["exp"], "cpu", speaker_adaptive=True)
    ex = pred.extractors["audio"]
    from sertool.audio import load_audio
    from sertool.corpora.base import Utterance

    feats = {}
    for f in sorted(mixed_dir.rglob("*.flac")):
        wave, _ = load_audio(f, ex.sample_rate)
        feats[str(f)] = np.asarray(ex.extract(Utterance(id=f.stem, audio=str(f)), wave).data, np.float32)
    view = Predictor(pred.path, pred.spec, pred.model, {}, pred.extractors, pred.device)
    for r in guests:
        (p,) = view.predict_features([{"audio": (feats[r["file"]] - mean) / std}])
        np.testing.assert_allclose(probabilities(r, speaker_exp["classes"]), p, atol=1e-5)


def test_kill_then_resume_keeps_the_statistics(speaker_exp, mixed_dir, tmp_path):
    whole = tmp_path / "whole.csv"
    assert run([speaker_exp["exp"], mixed_dir, "-o", whole, "--speaker-from", "parent", "-q"]).exit_code == 0
    out = tmp_path / "p.csv"
    cmd = [sys.executable, "-m", "sertool", "predict", str(speaker_exp["exp"]), str(mixed_dir), "-o", str(out), "-q"]
    env = {**os.environ, "SERTOOL_TEST_KILL_AFTER_FILES": "60", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([*cmd, "--speaker-from", "parent"], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert len(list(iter_rows(out))) == 60  # Actor_02 done, the guests (deferred to the end) not
    res = run([speaker_exp["exp"], mixed_dir, "-o", out, "--speaker-from", "regex:(Actor)", "--resume", "-q"])
    assert res.exit_code == 1 and "--speaker-from parent" in res.output  # other groups: refused
    res = run([speaker_exp["exp"], mixed_dir, "-o", out, "--speaker-from", "parent", "--resume", "-q"])
    assert res.exit_code == 0, res.output
    resumed, expected = list(iter_rows(out)), list(iter_rows(whole))
    assert [r["file"] for r in resumed] == [r["file"] for r in expected]  # nothing lost, nothing twice
    for r, e in zip(resumed, expected):  # another process: the last rounded digit may differ
        np.testing.assert_allclose(
            probabilities(r, speaker_exp["classes"]), probabilities(e, speaker_exp["classes"]), atol=2e-6
        )
        assert (r["speaker"], r["normalization"], r["label"]) == (e["speaker"], e["normalization"], e["label"])


def test_speaker_model_needs_speaker_from(speaker_exp, tmp_path):
    res = run([speaker_exp["exp"], DEMO / "audio" / TEST_SPEAKER, "-o", tmp_path / "p.csv"])
    assert res.exit_code == 1 and "--speaker-from" in res.output and "data.normalize.audio=speaker" in res.output


def test_global_model_ignores_speaker_from(tmp_path):
    out = tmp_path / "p.csv"
    clip = DEMO / "audio" / "Actor_01" / "03-01-01-01-01-01-01.flac"
    res = run(["--model", "ravdess-mfcc", clip, "-o", out, "--speaker-from", "parent"])
    assert res.exit_code == 0, res.output
    assert "--speaker-from parent ignored" in res.output
    (row,) = iter_rows(out)
    assert "speaker" not in row and row["label"]


def test_export_of_a_speaker_model_takes_speaker_normalised_features(speaker_exp, tmp_path):
    pytest.importorskip("onnxruntime")
    from sertool.export import run_exported

    out = tmp_path / "m.onnx"
    res = CliRunner().invoke(cli, ["export", str(speaker_exp["exp"]), "-o", str(out)])
    assert res.exit_code == 0, res.output
    info = json.loads(out.with_name("m.onnx.json").read_text())
    assert "per speaker" in info["normalisation"]["audio"]
    pred = load_predictor(speaker_exp["exp"], "cpu", speaker_adaptive=True)
    x = np.random.default_rng(0).normal(size=(1, 50, 13)).astype(np.float32)  # already speaker-normalised
    mask = np.ones((1, 50), bool)
    view = Predictor(pred.path, pred.spec, pred.model, {}, pred.extractors, pred.device)
    np.testing.assert_allclose(run_exported(out, (x, mask)), view.predict_features([{"audio": x[0]}]), atol=1e-5)
