"""The evaluate stage: predictions.csv, metrics recomputed from it, report, plots, compare, crop, attention."""

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from test_train import CLASSES, TINY_RAJAN, make_feats

from sertool.cli import cli
from sertool.train import run_train

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exps(tmp_path_factory):
    """Two probes (different learning rates) and a tiny self_attn, same protocol and seeds."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("eval")
    feats = make_feats(root / "f")
    common = ["data.audio=fa", "protocol.name=kfold:3", "run.seeds=2", "train.epochs=4", "train.batch_size=8"]
    quiet = dict(progress=False, log=lambda s: None)
    run_train("probe", feats, root / "a", overrides=[*common, "optim.lr=0.05"], **quiet)
    run_train("probe", feats, root / "b", overrides=[*common, "optim.lr=0.0005"], **quiet)
    run_train(
        "self_attn",
        feats,
        root / "c",
        overrides=[*TINY_RAJAN, *common, "data.text=ft", "run.seeds=1", "train.epochs=1"],
        **quiet,
    )
    torch.set_num_threads(n)
    return root


def test_predictions_and_metrics(exps):
    exp = exps / "a"
    res = CliRunner().invoke(cli, ["evaluate", str(exp), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    out = exp / "eval"
    for name in ("predictions.csv", "metrics.json", "report.md", "confusion.png", "curves.png"):
        assert (out / name).exists(), name
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert list(rows[0]) == ["id", "fold", "seed", "true", "pred", *[f"p_{c}" for c in CLASSES]]
    assert len(rows) == 48 * 2  # every utterance tested once per seed
    probs = np.array([[float(r[f"p_{c}"]) for c in CLASSES] for r in rows])
    assert np.allclose(probs.sum(1), 1, atol=1e-4)
    assert all(r["pred"] == CLASSES[int(p.argmax())] for r, p in zip(rows, probs))
    m = json.loads((out / "metrics.json").read_text())
    # WA / UA / macro-F1 mean and std over folds x seeds, recomputed from predictions.csv
    sk = pytest.importorskip("sklearn.metrics")
    per = {}
    for r in rows:
        per.setdefault((r["fold"], r["seed"]), []).append(r)
    ua = [sk.balanced_accuracy_score([r["true"] for r in v], [r["pred"] for r in v]) for v in per.values()]
    wa = [sk.accuracy_score([r["true"] for r in v], [r["pred"] for r in v]) for v in per.values()]
    f1 = [sk.f1_score([r["true"] for r in v], [r["pred"] for r in v], average="macro") for v in per.values()]
    assert len(per) == 6 and m["n_runs"] == 6
    assert m["UA"]["mean"] == pytest.approx(np.mean(ua)) and m["UA"]["std"] == pytest.approx(np.std(ua, ddof=1))
    assert m["WA"]["mean"] == pytest.approx(np.mean(wa)) and m["macro_f1"]["mean"] == pytest.approx(np.mean(f1))
    assert np.array(m["confusion"]).sum() == 96
    # the same models give the same test scores as at training time
    trained = {(r["fold"], r["seed"]): r["test"] for r in json.loads((exp / "metrics.json").read_text())["runs"]}
    for r in m["runs"]:
        assert r["UA"] == pytest.approx(trained[(r["fold"], int(r["seed"]))]["UA"])
    report = (out / "report.md").read_text()
    assert "| WA | UA | macro_f1 | weighted_f1 |" in report and "fold3 | 1 |" in report


def test_compare_and_crop(exps):
    a, b = exps / "a", exps / "b"
    res = CliRunner().invoke(cli, ["evaluate", str(a), "--compare", str(b), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    m = json.loads((a / "eval" / "metrics.json").read_text())
    comp = m["compare"]
    assert comp["matched_runs"] == 6
    for k in ("WA", "UA", "macro_f1"):
        assert 0 <= comp[k]["p_ttest"] <= 1 and 0 <= comp[k]["p_wilcoxon"] <= 1
    assert "p (Wilcoxon)" in (a / "eval" / "report.md").read_text() and "p(t)" in res.output
    same = CliRunner().invoke(cli, ["evaluate", str(a), "--compare", str(a), "-q", "-o", str(exps / "same")])
    assert same.exit_code == 0, same.output
    assert json.loads((exps / "same" / "metrics.json").read_text())["compare"]["UA"]["p_ttest"] == 1.0
    res = CliRunner().invoke(cli, ["evaluate", str(a), "--crop-length", "2", "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    cropped = json.loads((a / "eval-crop2" / "metrics.json").read_text())
    assert cropped["crop_length"] == 2
    full = list(csv.DictReader(open(a / "eval" / "predictions.csv")))
    crop = list(csv.DictReader(open(a / "eval-crop2" / "predictions.csv")))
    assert [r["id"] for r in full] == [r["id"] for r in crop]
    assert any(x["p_angry"] != y["p_angry"] for x, y in zip(full, crop))


def test_attention_maps(exps):
    c = exps / "c"
    folds = json.loads((c / "folds.json").read_text())["folds"]
    uid = folds[1]["test"][0]
    res = CliRunner().invoke(cli, ["evaluate", str(c), "--attention", uid, "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert (c / "eval" / f"attention-{uid}.png").stat().st_size > 1000
    res = CliRunner().invoke(cli, ["evaluate", str(exps / "a"), "--attention", uid, "-q", "-o", str(exps / "x")])
    assert res.exit_code == 1 and "no attention maps" in res.output
    res = CliRunner().invoke(cli, ["evaluate", str(c), "--attention", "nope", "-q"])
    assert res.exit_code == 1 and "no test split" in res.output


def test_bad_experiment(tmp_path, exps):
    res = CliRunner().invoke(cli, ["evaluate", str(tmp_path)])
    assert res.exit_code == 1 and "not an experiment directory" in res.output
    res = CliRunner().invoke(cli, ["evaluate", str(exps / "a"), str(tmp_path / "nofeats")])
    assert res.exit_code == 1 and "does not exist" in res.output
