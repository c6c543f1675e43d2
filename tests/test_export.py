"""`sertool export`: TorchScript and ONNX of an experiment's classifier give the same outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_predict import MFCC13, write_exp  # noqa: F401  (the helper that writes an EXP folder)

from sertool.cli import cli
from sertool.export import example_inputs, run_exported
from sertool.predict import collate, load_predictor

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exps(tmp_path_factory):
    base = tmp_path_factory.mktemp("export")
    probe = write_exp(
        base / "probe",
        {"name": "probe", "modality": "audio", "input_dim": 13, "n_classes": 4},
        {"audio": {"feature": "mfcc", "kind": "audio", "dim": 13, "extractor": MFCC13}},
        ["a", "b", "c", "d"],
        stats={"audio": (np.linspace(-5, 5, 13).astype(np.float32), np.linspace(1, 3, 13).astype(np.float32))},
    )
    cfg = {
        "name": "self_attn",
        "modalities": ["audio", "text"],
        "audio_dim": 13,
        "text_dim": 3,
        "n_classes": 3,
        "conv": "local",
        "gru_hidden": 4,
        "num_heads": 2,
        "fc_hidden": 4,
    }
    bimodal = write_exp(
        base / "bimodal",
        cfg,
        {
            "audio": {"feature": "mfcc", "kind": "audio", "dim": 13, "extractor": MFCC13},
            "text": {"feature": "chars", "kind": "text", "dim": 3, "extractor": {"name": "test_chars", "params": {}}},
        },
        ["x", "y", "z"],
        stats={"audio": (np.zeros(13, np.float32), np.full(13, 2.0, np.float32))},
    )
    return {"probe": probe, "bimodal": bimodal}


def _reference(exp, inputs):
    """What `sertool predict` computes for the same raw features (its collate + model + softmax)."""
    pred = load_predictor(exp, "cpu")
    items = []
    for b in range(inputs[0].shape[0]):
        item = {}
        for i, m in enumerate(pred.modalities):
            x, mask = inputs[2 * i][b], inputs[2 * i + 1][b]
            item[m] = x[mask].numpy()
        items.append(item)
    return pred.predict_features(items)


@pytest.mark.parametrize("name", ["probe", "bimodal"])
@pytest.mark.parametrize("suffix", [".pt", ".onnx"])
def test_export_matches_predict(exps, tmp_path, name, suffix):
    if suffix == ".onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    out = tmp_path / f"model{suffix}"
    res = CliRunner().invoke(cli, ["export", str(exps[name]), "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    info = json.loads((tmp_path / f"model{suffix}.json").read_text())
    assert info["check"]["max_abs_diff"] < 1e-4
    spec = json.loads((exps[name] / "predictor.json").read_text())
    assert info["classes"] == spec["classes"] and info["features"] == spec["features"]
    # new batch size and lengths (dynamic axes), items of different lengths in one batch
    inputs = example_inputs(spec, batch=3, frames=tuple([23] * len(spec["inputs"])), seed=5)
    got = run_exported(out, inputs, info["input_names"])
    np.testing.assert_allclose(got, _reference(exps[name], inputs), atol=1e-4)
    assert got.shape == (3, len(spec["classes"]))


def test_export_errors(exps, tmp_path):
    res = CliRunner().invoke(cli, ["export", str(exps["probe"]), "-o", str(tmp_path / "m.bin")])
    assert res.exit_code == 1 and ".onnx" in res.output and ".pt" in res.output
    res = CliRunner().invoke(cli, ["export", str(tmp_path), "-o", str(tmp_path / "m.pt")])
    assert res.exit_code == 1 and "predictor.json" in res.output


def test_collate_matches_training_dataset():
    """predict's batch equals the train stage's SERDataset batch for the same features."""
    from sertool.data import Normalizer, SERDataset, Source

    rng = np.random.default_rng(0)
    feats = {"u1": rng.normal(size=(5, 3)).astype(np.float32), "u2": rng.normal(size=(9, 3)).astype(np.float32)}

    class Mem(Source):
        dim, attrs, name, path = 3, {}, "m", "mem"
        _index = {"u1": 0, "u2": 1}

        def get(self, uid):
            return feats[uid]

        def length(self, uid):
            return len(feats[uid])

        @property
        def ids(self):
            return list(feats)

    norm = Normalizer({"audio": (np.array([1, 2, 3], np.float32), np.array([2, 2, 4], np.float32))})
    ds = SERDataset({"audio": Mem()}, ["u1", "u2"], [0, 1], norm, crop={"audio": 7})
    want = ds.collate([0, 1])
    got = collate([{"audio": feats["u1"]}, {"audio": feats["u2"]}], norm.stats, {"audio": 7})
    for k in ("audio", "audio_mask"):
        assert torch.equal(got[k], want[k])


@pytest.mark.parametrize("suffix", [".pt", ".onnx"])
def test_calibration_temperature_in_export_and_predict(exps, tmp_path, suffix):
    """predictor.json ``temperature``: predict and the exported graph both give softmax(logits / T)."""
    import shutil

    exp = tmp_path / "calibrated"
    shutil.copytree(exps["probe"], exp)
    spec = json.loads((exp / "predictor.json").read_text())
    (exp / "predictor.json").write_text(json.dumps({**spec, "temperature": 2.5}))
    inputs = example_inputs(spec, batch=3, frames=9, seed=4)
    calibrated, plain = _reference(exp, inputs), _reference(exps["probe"], inputs)
    np.testing.assert_allclose(calibrated.sum(1), 1.0, atol=1e-5)
    # the same order of classes, flatter: log-probabilities scale by 1/T around their mean
    logits = np.log(plain)
    expected = np.exp(logits / 2.5) / np.exp(logits / 2.5).sum(1, keepdims=True)
    np.testing.assert_allclose(calibrated, expected, atol=1e-5)
    out = tmp_path / f"m{suffix}"
    res = CliRunner().invoke(cli, ["export", str(exp), "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert json.loads(out.with_name(out.name + ".json").read_text())["temperature"] == 2.5
    np.testing.assert_allclose(run_exported(out, inputs), calibrated, atol=1e-5)


def test_export_a_packaged_model_by_name(tmp_path):
    out = tmp_path / "mfcc.pt"
    res = CliRunner().invoke(cli, ["export", "ravdess-mfcc", "-o", str(out)])
    assert res.exit_code == 0, res.output
    info = json.loads(out.with_name("mfcc.pt.json").read_text())
    assert info["source"].endswith("ravdess-mfcc") and len(info["classes"]) == 8
