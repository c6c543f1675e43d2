"""kill -9 at a random (seeded) point of extract, align, train and predict, then a re-run: the
result equals that of an uninterrupted run (stores bit-equal, weights within 1e-6, same rows)."""

import json
import os
import random

import numpy as np
import pytest
import soundfile as sf
from safetensors.torch import load_file

from sertool.align import run_align
from sertool.distill import run_distill
from sertool.extract import run_extract
from sertool.predict import iter_rows
from sertool.train import run_train

from conftest import make_distill_feats, tone
from fault_helpers import env_one_thread, h5_contents, kill_when, make_align_feats, make_train_feats, sertool_cmd

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SEED = int(os.environ.get("SERTOOL_FAULT_SEED", "12"))  # the random kill points; set it to explore others


def quiet(*a, **k):
    pass


def make_corpus(root, n):
    root.mkdir(parents=True)
    rows = ["file,label,speaker"]
    for i in range(n):
        sf.write(root / f"u{i:02d}.wav", tone(120 + 13 * i, 0.25 + 0.01 * (i % 5)), 16000)
        rows.append(f"u{i:02d}.wav,{('low', 'high')[i % 2]},spk{i % 4}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


def test_extract(tmp_path, plugin_env):
    corpus = make_corpus(tmp_path / "c", 24)
    out = tmp_path / "f"
    features = ["-f", "mfcc:n_mfcc=13", "-f", "toy:sleep=0.04"]
    cmd = sertool_cmd("extract", corpus, "-o", out, "-q", "--flush-every", "2", *features)
    env = env_one_thread(SERTOOL_PLUGINS=plugin_env["SERTOOL_PLUGINS"], PYTHONPATH=plugin_env["PYTHONPATH"])
    parts = out / "toy.h5.parts"
    assert kill_when(cmd, lambda: parts.is_dir() and any(parts.glob("part-*.h5")), seed=SEED, env=env) is None
    assert not (out / "toy.h5").exists(), "killed too late to test anything"
    again = kill_when(cmd, lambda: False, seed=SEED, env=env)
    assert again.returncode == 0, again.stderr
    run_extract(corpus, tmp_path / "ref", ["mfcc:n_mfcc=13", "toy:sleep=0"], progress=False, log=quiet)
    for name in ("mfcc", "toy"):
        got, ref = h5_contents(out / f"{name}.h5"), h5_contents(tmp_path / "ref" / f"{name}.h5")
        if name == "toy":  # the sleep parameter is part of the recorded extractor config
            got["/"].pop("extractor"), ref["/"].pop("extractor")
        assert got == ref, name
    assert not list(out.glob("*.parts")) and not list(out.glob("*.tmp*"))
    assert (out / "manifest.jsonl").read_text() == (tmp_path / "ref" / "manifest.jsonl").read_text()


def test_align(tmp_path):
    feats = make_align_feats(tmp_path / "f", n=1200)
    ref = run_align(
        feats, "aud", "txt", out=tmp_path / "ref.h5", timings="corpus", length=4, progress=False, log=quiet
    ).path
    cmd = sertool_cmd("align", feats, "--audio", "aud", "--text", "txt", "--timings", "corpus", "--length", "4", "-q")
    out = feats / "aligned-aud-txt-4.h5"
    killed = kill_when(cmd, lambda: any(feats.glob("aligned-aud-txt-4.h5.tmp*")), seed=SEED, max_delay=0.2)
    assert killed is None and not out.exists(), "killed too late to test anything"
    again = kill_when(cmd, lambda: False, seed=SEED)
    assert again.returncode == 0, again.stderr
    assert h5_contents(out) == h5_contents(ref)
    assert not list(feats.glob("*.tmp*"))


TRAIN = [
    "data.audio=fa",
    "protocol.name=speaker-kfold:2",
    "train.epochs=40",
    "train.batch_size=4",
    "optim.lr=0.01",
    "run.threads=1",
]


def test_train(tmp_path):
    feats = make_train_feats(tmp_path / "f", per=16)
    ref = tmp_path / "ref"
    run_train("probe", feats, ref, overrides=TRAIN, progress=False, log=quiet)
    exp = tmp_path / "exp"
    cmd = sertool_cmd("train", feats, "-m", "probe", "-o", exp, "-q", *sum((["--set", s] for s in TRAIN), []))
    epochs_at_kill = random.Random(SEED).randint(2, 60)  # of 2 folds x 40 epochs, one log line each

    _kill_then_resume(cmd, exp, epochs_at_kill)
    _same_weights(ref, exp)
    ma, mb = json.loads((ref / "metrics.json").read_text()), json.loads((exp / "metrics.json").read_text())
    for key, value in ma["summary"].items():
        assert value["mean"] == pytest.approx(mb["summary"][key]["mean"], abs=1e-6), key


def test_train_lbfgs(tmp_path):
    """Full-batch L-BFGS on a weight-decay path (one solve per epoch, no optimiser state between
    epochs), killed and resumed: the weights of an uninterrupted run."""
    feats = make_train_feats(tmp_path / "f", per=16)
    settings = [
        *TRAIN[:2],
        "optim.name=lbfgs",
        "optim.lr=1.0",
        "optim.max_iter=20",
        "optim.weight_decay_path=[1.0,0.3,0.1,0.03,0.01,0.003]",
        "train.epochs=6",
        "train.batch_size=4",
        "run.threads=1",
    ]
    ref = tmp_path / "ref"
    run_train("probe", feats, ref, overrides=settings, progress=False, log=quiet)
    exp = tmp_path / "exp"
    cmd = sertool_cmd("train", feats, "-m", "probe", "-o", exp, "-q", *sum((["--set", s] for s in settings), []))
    _kill_then_resume(cmd, exp, random.Random(SEED).randint(2, 10))  # of 2 folds x 6 epochs
    _same_weights(ref, exp)


def _kill_then_resume(cmd, exp, epochs_at_kill):
    """Kill the train command once ``epochs_at_kill`` epoch lines are logged, then finish it with --resume."""

    def started():
        return sum(p.read_bytes().count(b"\n") for p in exp.glob("folds/*/seed0/log.jsonl")) >= epochs_at_kill

    assert kill_when(cmd, started, seed=SEED, max_delay=0.05) is None
    assert not (exp / "predictor.json").exists(), "killed too late to test anything"
    again = kill_when(cmd + ["--resume"], lambda: False, seed=SEED)
    assert again.returncode == 0, again.stderr


def _same_weights(ref, exp):
    weights = sorted(p.relative_to(ref) for p in ref.rglob("*.safetensors") if p.name != "checkpoint.safetensors")
    assert len([w for w in weights if w.name == "model.safetensors"]) >= 2
    assert weights == sorted(
        p.relative_to(exp) for p in exp.rglob("*.safetensors") if p.name != "checkpoint.safetensors"
    )
    for w in weights:
        a, b = load_file(str(ref / w)), load_file(str(exp / w))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=1e-6, rtol=0, err_msg=f"{w} {k}")


def test_train_cmd_finetuning(tmp_path):
    """CMD fine-tuning is an ordinary train-stage model: killed and resumed, same weights."""
    feats = make_distill_feats(tmp_path / "f")
    dexp = tmp_path / "dexp"
    run_distill(
        feats,
        dexp,
        teacher_audio="ta",
        teacher_text="tt",
        progress=False,
        log=quiet,
        overrides=[
            "distill.epochs=1",
            "distill.budget=24000",
            "student.stem_channels=8",
            "student.text_embed_dim=8",
            "student.ffn_dim=32",
            "distill.dev_fraction=0.25",
        ],
    )
    sets = ["protocol.name=kfold:2", "train.epochs=6", "train.max_batch_frames=16000", "optim.lr=1e-3", "run.threads=1"]
    ref = tmp_path / "ref"
    run_train("cmd", feats, ref, overrides=[f"model.init={dexp}", *sets], progress=False, log=quiet)
    exp = tmp_path / "exp"
    cmd = sertool_cmd(
        "train", feats, "-m", "cmd", "--init", dexp, "-o", exp, "-q", *sum((["--set", s] for s in sets), [])
    )
    epochs_at_kill = random.Random(SEED).randint(1, 10)  # of 2 folds x 6 epochs, one log line each

    _kill_then_resume(cmd, exp, epochs_at_kill)
    _same_weights(ref, exp)


def test_predict(tmp_path):
    clips = make_corpus(tmp_path / "clips", 40)
    ref = tmp_path / "ref.csv"
    done = kill_when(sertool_cmd("predict", clips, "-o", ref, "-q", "--batch-size", "1"), lambda: False, seed=SEED)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "p.csv"
    cmd = sertool_cmd("predict", clips, "-o", out, "-q", "--batch-size", "1")

    rows_at_kill = random.Random(SEED).randint(3, 30)  # the kill point: after this many rows were written

    def started():
        return out.exists() and out.read_bytes().count(b"\n") >= rows_at_kill

    assert kill_when(cmd, started, seed=SEED, max_delay=0.0) is None
    n_before = len(list(iter_rows(out)))
    assert 2 <= n_before < 40, "killed too late to test anything"
    again = kill_when(cmd + ["--resume"], lambda: False, seed=SEED)
    assert again.returncode == 0, again.stderr
    assert list(iter_rows(out)) == list(iter_rows(ref))
