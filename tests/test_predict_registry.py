"""Packaged models: pretrained/DEFAULT, ``--model NAME``, ``--list-models`` from card.json."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

import sertool.predict as predict_mod
from sertool.cli import cli
from sertool.predict import PRETRAINED_DIR, iter_rows, model_cards, packaged_models, resolve_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SHIPPED = PRETRAINED_DIR / "ravdess-mfcc"


def test_shipped_registry():
    assert "ravdess-mfcc" in packaged_models()
    assert (PRETRAINED_DIR / "DEFAULT").read_text().strip() in packaged_models()
    assert not (PRETRAINED_DIR / "ravdess-default").exists()
    card = json.loads((SHIPPED / "card.json").read_text())
    assert card["ua_cv"] == pytest.approx(0.370, abs=5e-4)


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """Two packaged models (copies of ravdess-mfcc), the second the default, one with a card."""
    root = tmp_path / "pretrained"
    for name in ("light", "heavy"):
        shutil.copytree(SHIPPED, root / name, ignore=shutil.ignore_patterns("card.json"))
    (root / "DEFAULT").write_text("heavy\n")
    (root / "light" / "card.json").write_text(json.dumps({"summary": "small", "ua_cv": 0.37, "x_real_time": 812.4}))
    monkeypatch.setattr(predict_mod, "PRETRAINED_DIR", root)
    return root


def test_list_models_marks_the_default_and_dashes_missing_keys(registry):
    res = CliRunner().invoke(cli, ["predict", "--list-models"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    heavy = next(line for line in lines if line.startswith("heavy"))
    light = next(line for line in lines if line.startswith("light "))
    assert "(default)" in heavy and "(default)" not in light
    assert "0.370" in light and "812" in light and "—" in light  # 8 kHz / SNR / ECE missing
    assert heavy.count("—") >= 5
    cards = {c["name"]: c for c in model_cards()}
    assert cards["heavy"]["default"] and cards["light"]["ua_cv_8khz"] is None


def test_model_name_picks_a_packaged_model(registry, tmp_path):
    assert resolve_model(None) == (registry / "heavy", True)
    assert resolve_model("light") == (registry / "light", True)
    d = tmp_path / "w"
    d.mkdir()
    t = np.arange(16000) / 16000
    sf.write(d / "x.wav", (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    out = tmp_path / "p.csv"
    res = CliRunner().invoke(cli, ["predict", "--model", "light", str(d), "-o", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert len(list(iter_rows(out))) == 1
    assert json.loads(out.with_name("p.csv.model.json").read_text())["experiment"] == str(
        (registry / "light").resolve()
    )
    res = CliRunner().invoke(cli, ["predict", "--model", "nosuch", str(d), "-o", str(out), "--overwrite"])
    assert res.exit_code == 1 and "packaged model" in res.output and "heavy" in res.output
    res = CliRunner().invoke(cli, ["predict", "light", str(d), "--model", "heavy"])
    assert res.exit_code == 2 and "not both" in res.output
