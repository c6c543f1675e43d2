"""The train stage on small synthetic stores: EXP layout, learning, resume after kill -9, bad inputs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from sertool.cli import cli
from sertool.corpora.base import Utterance, write_manifest
from sertool.data import Normalizer, SERDataset, open_sources
from sertool.store import StoreWriter
from sertool.train import Schedule, TrainError, load_inputs, resolve_config, run_train

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("angry", "happy", "neutral", "sad")
TINY_RAJAN = [
    "model.conv=local",
    "model.modalities=[audio,text]",
    "model.gru_hidden=8",
    "model.num_heads=2",
    "model.fc_hidden=8",
]


def make_feats(root, n_spk=4, per=12, seed=0, da=6, dt=5, score=False, drop_from_text=(), splits=True, label_of=None):
    """Manifest + audio store `fa` (dim da) + text store `ft` (dim dt); class c shifts the features by c."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    utts = []
    wa = StoreWriter(
        root / "fa.h5",
        {"feature": "fa", "kind": "audio", "dim": da, "frame_rate_hz": 100, "extractor": {"name": "fa", "param": 1}},
    )
    wt = StoreWriter(
        root / "ft.h5", {"feature": "ft", "kind": "text", "dim": dt, "unit": "token", "extractor": {"name": "ft"}}
    )
    for s in range(n_spk):
        for i in range(per):
            c = i % len(CLASSES)
            uid = f"s{s}_u{i:03d}"
            label = label_of(s, i) if label_of else CLASSES[c]
            utts.append(
                Utterance(
                    id=uid,
                    text="hello",
                    label=label,
                    speaker=f"spk{s + 1}",
                    session=f"ses{s // 2 + 1}",
                    split=["train", "train", "dev", "test"][s % 4] if splits else None,
                    score=float(c) - 1.5 if score else None,
                )
            )
            T = int(rng.integers(5, 20))
            wa.add(uid, ((rng.normal(size=(T, da)) + c) * 2 + 3).astype(np.float32))
            if uid not in drop_from_text:
                wt.add(uid, (rng.normal(size=(int(rng.integers(3, 8)), dt)) + 0.5 * c).astype(np.float32))
    wa.finalize()
    wt.finalize()
    write_manifest(utts, root / "manifest.jsonl")
    return root


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    return make_feats(tmp_path_factory.mktemp("feats") / "f")


def invoke(args):
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    return res


# ----------------------------------------------------------------------------------- a full run
def test_probe_trains_and_writes_the_experiment(feats, tmp_path):
    exp = tmp_path / "exp"
    res = invoke(
        [
            "train",
            str(feats),
            "-m",
            "probe",
            "--audio",
            "fa",
            "--protocol",
            "speaker-kfold:4",
            "--seeds",
            "2",
            "--epochs",
            "12",
            "--set",
            "optim.lr=0.05",
            "--set",
            "train.batch_size=8",
            "--set",
            "schedule.name=cosine",
            "-o",
            str(exp),
            "-q",
        ]
    )
    assert res.exit_code == 0, res.output
    for name in (
        "config.yaml",
        "folds.json",
        "metrics.json",
        "log.jsonl",
        "model.safetensors",
        "norm.safetensors",
        "predictor.json",
    ):
        assert (exp / name).exists(), name
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    assert cfg["model"]["input_dim"] == 6 and cfg["model"]["n_classes"] == 4
    assert cfg["data"]["audio"] == "fa" and cfg["protocol"]["name"] == "speaker-kfold:4"
    assert cfg["features"]["audio"]["extractor"] == {"name": "fa", "param": 1}  # feature provenance
    assert cfg["label_set"]["classes"] == list(CLASSES)
    assert cfg["experiment"]["seeds"] == [0, 1] and cfg["experiment"]["selected_on"] == "dev UA"
    metrics = json.loads((exp / "metrics.json").read_text())
    assert len(metrics["runs"]) == 8
    assert metrics["summary"]["UA"]["mean"] > 0.8, metrics["summary"]
    for fold in [f"fold{i}" for i in range(1, 5)]:
        for seed in (0, 1):
            rd = exp / "folds" / fold / f"seed{seed}"
            assert (rd / "model.safetensors").exists() and not (rd / "checkpoint.safetensors").exists()
            log = [json.loads(l) for l in (rd / "log.jsonl").read_text().splitlines()]
            assert [r["epoch"] for r in log] == list(range(len(log))) and "dev_UA" in log[0]
    # normalisation statistics come from the fold's training split only
    folds = json.loads((exp / "folds.json").read_text())["folds"]
    src = open_sources(feats, {"audio": "fa"})
    frames = np.concatenate([src["audio"].get(u) for u in folds[0]["train"]])
    norm = Normalizer.load(exp / "folds" / "fold1" / "norm.safetensors")
    assert np.allclose(norm.stats["audio"][0], frames.mean(0), atol=1e-4)
    everything = np.concatenate([src["audio"].get(u) for f in folds for u in f["test"]])
    assert not np.allclose(norm.stats["audio"][0], everything.mean(0), atol=1e-3)
    # the deployment model is chosen on dev scores
    pred = json.loads((exp / "predictor.json").read_text())
    best = max(metrics["runs"], key=lambda r: r["dev"]["UA"])
    assert pred["selection"]["dev_UA"] == pytest.approx(best["dev"]["UA"])
    assert pred["features"]["audio"]["extractor"]["name"] == "fa" and pred["classes"] == list(CLASSES)
    # an existing EXP is not overwritten silently
    res = CliRunner().invoke(cli, ["train", str(feats), "-m", "probe", "--audio", "fa", "-o", str(exp)])
    assert res.exit_code != 0 and "--resume" in res.output


# ----------------------------------------------------------------------------------- resume
def _weights(exp):
    return {p.relative_to(exp): load_file(str(p)) for p in sorted(exp.glob("folds/*/seed*/model.safetensors"))}


def test_kill_mid_epoch_and_resume_gives_the_same_weights(feats, tmp_path):
    args = [
        "-m",
        "self_attn",
        "--audio",
        "fa",
        "--text",
        "ft",
        "--protocol",
        "speaker-kfold:2",
        "--epochs",
        "3",
        "--threads",
        "1",
        "--set",
        "train.batch_size=8",
        "--set",
        "optim.lr=0.01",
        "--set",
        "schedule.name=plateau",
        "--set",
        "schedule.patience=0",
        "--set",
        "schedule.gamma=0.5",
        *sum([["--set", s] for s in TINY_RAJAN], []),
    ]
    ref = tmp_path / "ref"
    run_train(
        "self_attn",
        feats,
        ref,
        overrides=[
            *TINY_RAJAN,
            "data.audio=fa",
            "data.text=ft",
            "protocol.name=speaker-kfold:2",
            "train.epochs=3",
            "train.batch_size=8",
            "optim.lr=0.01",
            "schedule.name=plateau",
            "schedule.patience=0",
            "schedule.gamma=0.5",
            "run.threads=1",
        ],
        progress=False,
        log=lambda s: None,
    )
    exp = tmp_path / "exp"
    env = {**os.environ, "SERTOOL_TEST_KILL_AFTER_STEPS": "5", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "sertool", "train", str(feats), *args, "-o", str(exp), "-q"]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr  # SIGKILL in the middle of epoch 3 of fold 1 (2 steps/epoch)
    assert (exp / "folds/fold1/seed0/checkpoint.safetensors").exists()
    assert not (exp / "folds/fold1/seed0/model.safetensors").exists()
    env.pop("SERTOOL_TEST_KILL_AFTER_STEPS")
    resumed = subprocess.run(cmd + ["--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    a, b = _weights(ref), _weights(exp)
    assert sorted(a) == sorted(b) and len(a) == 2
    for key in a:
        for name in a[key]:
            assert np.allclose(a[key][name].numpy(), b[key][name].numpy(), atol=1e-6), (key, name)
    la = (ref / "log.jsonl").read_text().splitlines()
    lb = (exp / "log.jsonl").read_text().splitlines()
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        x, y = json.loads(x), json.loads(y)
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-6) and x["lr"] == y["lr"]
    # resuming with other settings is refused
    res = CliRunner().invoke(cli, ["train", str(feats), *args, "--set", "optim.lr=0.5", "-o", str(exp), "--resume"])
    assert res.exit_code != 0 and "settings differ" in res.output


def test_resume_an_experiment_from_before_a_model_option_existed(feats, tmp_path):
    """A model option added by a newer sertool (absent from the old config.yaml, at its default
    now) does not block --resume; a changed setting still does."""
    exp = tmp_path / "exp"
    args = [
        "train",
        str(feats),
        "-m",
        "probe",
        "--audio",
        "fa",
        "--protocol",
        "speaker-kfold:2",
        "--epochs",
        "1",
        "--threads",
        "1",
        "-o",
        str(exp),
        "-q",
    ]
    assert CliRunner().invoke(cli, args).exit_code == 0
    cfg_file = exp / "config.yaml"
    cfg = yaml.safe_load(cfg_file.read_text())
    assert cfg["model"].pop("hidden") == 0  # as written before model.hidden existed
    cfg_file.write_text(yaml.safe_dump(cfg, sort_keys=False))
    res = CliRunner().invoke(cli, args + ["--resume"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, args + ["--resume", "--set", "model.hidden=8"])
    assert res.exit_code != 0 and "settings differ" in res.output and "model" in res.output


# ----------------------------------------------------------------------------------- bad input
def _bad(feats, exp, *extra, model="probe"):
    res = CliRunner().invoke(cli, ["train", str(feats), "-m", model, "-o", str(exp), "-q", *extra])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    assert not (exp / "folds").exists()  # nothing was trained
    return res.output


def test_missing_feature_store(feats, tmp_path):
    out = _bad(feats, tmp_path / "e", "--audio", "covarep")
    assert "covarep" in out and "fa, ft" in out
    out = _bad(feats, tmp_path / "e", model="self_attn", *["--audio", "fa", "--set", "model.modalities=[audio,text]"])
    assert "no feature store is named for text" in out  # modalities set explicitly: the store is missing
    out = _bad(feats, tmp_path / "e", model="cross_attn", *["--audio", "fa"])
    assert "cross_attn" in out and "cannot run without text, visual" in out and "--text STORE" in out


def test_modalities_follow_the_inputs_given(feats):
    """The README's example: `-m self_attn --audio mfcc` is the audio-only model."""
    assert resolve_config("self_attn", overrides=["data.audio=fa"])["model"]["modalities"] == ["audio"]
    cfg = resolve_config("self_attn", overrides=["data.audio=fa", "data.text=ft"])
    assert cfg["model"]["modalities"] == ["audio", "text"]
    assert resolve_config("cma", overrides=["data.text=ft"])["model"]["modalities"] == ["text"]
    assert resolve_config("self_attn", overrides=["data.audio=fa", "model.modalities=[audio,text]"])["model"][
        "modalities"
    ] == ["audio", "text"]  # explicit: kept


def test_unknown_fold_name(feats, tmp_path):
    """`--fold 0` (folds are named fold1..foldK) must not silently train nothing."""
    out = _bad(feats, tmp_path / "e", "--audio", "fa", "--protocol", "speaker-kfold:2", "--fold", "0")
    assert "--fold 0: no such fold" in out and "fold1, fold2" in out


def test_label_absent_from_training(tmp_path):
    # "sad" only spoken by speaker 1, who is the test speaker of fold 1
    f = make_feats(tmp_path / "f", label_of=lambda s, i: "sad" if s == 0 and i % 4 == 3 else CLASSES[i % 3])
    out = _bad(f, tmp_path / "e", "--audio", "fa", "--protocol", "speaker-kfold:4")
    assert "fold 'fold1'" in out and "['sad']" in out and "no training example" in out


def test_empty_split(tmp_path):
    f = make_feats(tmp_path / "f", n_spk=3)  # speakers 1-3 are train, train, dev: no test split
    out = _bad(f, tmp_path / "e", "--audio", "fa", "--protocol", "corpus")
    assert "test split is empty" in out


def test_mismatched_ids_between_stores(tmp_path):
    f = make_feats(tmp_path / "f", drop_from_text=("s1_u003", "s2_u004"))
    out = _bad(
        f,
        tmp_path / "e",
        "--audio",
        "fa",
        "--text",
        "ft",
        *sum([["--set", s] for s in TINY_RAJAN], []),
        model="self_attn",
    )
    assert "2 of 48 utterances are missing from the text store" in out and "s1_u003" in out


def test_unknown_keys_and_wrong_task(feats, tmp_path):
    out = _bad(feats, tmp_path / "e", "--audio", "fa", "--set", "train.epochz=3")
    assert "train.epochz" in out
    user = tmp_path / "u.yaml"
    user.write_text("data:\n  audio: fa\n  normalise: none\n")
    out = _bad(feats, tmp_path / "e", "--config", str(user))
    assert "data.normalise" in out
    out = _bad(feats, tmp_path / "e", "--audio", "fa", "--labels", "mosei")
    assert "model.task" in out
    out = _bad(feats, tmp_path / "e", "--audio", "fa", "--labels", "ravdess8")
    assert "['calm', 'fearful', 'disgust', 'surprised'] have no training example" in out


# ----------------------------------------------------------------------------------- pieces
def test_schedules():
    def lrs(name, **kw):
        cfg = {"name": name, "step_size": 2, "gamma": 0.1, "warmup_epochs": 0, "patience": 1, "min_lr": 0.0, **kw}
        s = Schedule(cfg, 1.0, steps_per_epoch=10, epochs=6, higher_is_better=True)
        return s, [s.lr(e * 10) for e in range(6)]

    assert lrs("none")[1] == [1.0] * 6
    assert lrs("step")[1] == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])
    assert lrs("halving")[1] == pytest.approx([1, 1, 0.5, 0.5, 0.25, 0.25])
    s, v = lrs("warmup_linear", warmup_epochs=1)
    assert s.lr(0) == pytest.approx(0.1) and s.lr(9) == pytest.approx(1.0) and s.lr(35) == pytest.approx(0.5)
    s, v = lrs("cosine")
    assert v[0] == 1.0 and s.lr(30) == pytest.approx(0.5) and s.lr(59) < 0.01
    s, _ = lrs("plateau", gamma=0.5)
    for score in (0.5, 0.6, 0.6, 0.6, 0.7):
        s.end_epoch(score)
    assert s.lr(0) == pytest.approx(0.5)  # reduced once after patience 1 was exceeded
    with pytest.raises(TrainError, match="step_size"):
        Schedule({"name": "step", "step_size": 0, "gamma": 0.1}, 1.0, 10, 5, True)


def test_padding_masks_and_dynamic_batching(feats):
    src = open_sources(feats, {"audio": "fa", "text": "ft"})
    ids = src["audio"].ids
    ds = SERDataset(src, ids, [0] * len(ids), crop={"audio": 12})
    b = ds.collate([0, 1, 2])
    for m in ("audio", "text"):
        lens = b[f"{m}_mask"].sum(1).numpy()
        assert b[m].shape[1] == lens.max()
        for i, uid in enumerate(b["ids"]):
            real = src[m].get(uid)[: (12 if m == "audio" else None)]
            assert np.allclose(b[m][i, : lens[i]].numpy(), real) and not b[m][i, lens[i] :].any()
    batches = ds.batch_indices(batch_size=16, max_frames=40, shuffle=True, seed=1, epoch=2)
    assert sorted(np.concatenate(batches).tolist()) == list(range(len(ids)))
    assert all(len(x) * ds.max_length[x].max() <= 40 or len(x) == 1 for x in batches)
    again = ds.batch_indices(batch_size=16, max_frames=40, shuffle=True, seed=1, epoch=2)
    assert all(np.array_equal(x, y) for x, y in zip(batches, again))


def test_regression_on_an_aligned_file(tmp_path):
    """LGCCT (tiny) on a CMU-MOSEI-style aligned file, scores as targets, sentiment metrics."""
    f = make_feats(tmp_path / "f", score=True)
    from sertool.corpora.base import read_manifest

    utts = read_manifest(f / "manifest.jsonl")
    rng = np.random.default_rng(0)
    n, L = len(utts), 10
    mask = np.zeros((n, L), dtype=bool)
    audio = np.zeros((n, L, 4), dtype=np.float32)
    text = np.zeros((n, L, 3), dtype=np.float32)
    for i, u in enumerate(utts):
        k = int(rng.integers(4, L + 1))
        mask[i, :k] = True
        audio[i, :k] = rng.normal(size=(k, 4)) + u.score
        text[i, :k] = rng.normal(size=(k, 3)) + u.score
    with h5py.File(f / "aligned-test.h5", "w") as h:
        h["ids"] = np.array([u.id for u in utts], dtype="S")
        h["audio"], h["text"], h["mask"] = audio, text, mask
    exp = tmp_path / "exp"
    tiny = [
        "model.d=10",
        "model.num_heads=2",
        "model.cross_layers=1",
        "model.transformer_layers=1",
        "model.rnn_hidden=4",
        "model.audio_conv=[[8,3,1]]",
        "train.epochs=2",
        "train.batch_size=16",
    ]
    out = run_train(
        "lgcct",
        f,
        exp,
        overrides=[*tiny, "data.audio=aligned-test.h5", "data.text=aligned-test.h5", "protocol.name=corpus"],
        progress=False,
        log=lambda s: None,
    )
    assert out["task"] == "regression"
    for k in ("MAE", "corr", "acc7", "acc5", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0"):
        assert k in out["summary"], k
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    assert cfg["model"]["audio_dim"] == 4 and cfg["model"]["text_dim"] == 3 and cfg["label_set"]["regression"]
    assert cfg["experiment"]["selected_on"] == "dev loss"


def test_class_weights_selection_metric_and_dynamic_batches(feats, tmp_path):
    out = run_train(
        "probe",
        feats,
        tmp_path / "e",
        overrides=[
            "data.audio=fa",
            "protocol.name=loso",
            "train.epochs=2",
            "train.class_weights=true",
            "train.select_on=macro_f1",
            "train.max_batch_frames=60",
            "schedule.name=warmup_linear",
            "schedule.warmup_epochs=0.5",
            "optim.name=adamw",
        ],
        progress=False,
        log=lambda s: None,
    )
    assert out["selected_on"] == "dev macro_f1" and len(out["runs"]) == 4
    pred = json.loads((tmp_path / "e" / "predictor.json").read_text())
    assert "dev_macro_f1" in pred["selection"]


# ----------------------------------------------------------------------------------- run.final
FINAL_ARGS = [
    "data.audio=fa",
    "protocol.name=speaker-kfold:4",
    "train.epochs=4",
    "train.early_stopping=0",
    "train.batch_size=8",
    "optim.lr=0.001",
    "run.threads=1",
]


def _counting_hook(counter, stop_at=None):
    def make():
        def step():
            counter[0] += 1
            if stop_at is not None and counter[0] >= stop_at:
                raise KeyboardInterrupt("test: interrupted")

        return step

    return make


def test_final_all_trains_the_deployment_model_on_every_utterance(feats, tmp_path, monkeypatch):
    import sertool.train as T

    ref = tmp_path / "bestdev"
    out_ref = run_train("probe", feats, ref, overrides=FINAL_ARGS, progress=False, log=lambda s: None)
    assert json.loads((ref / "predictor.json").read_text())["selection"]["final"] == "best-dev"
    assert not (ref / "final").exists() and "final" not in out_ref
    # the same experiment with run.final=all; count optimiser steps to interrupt the final training later
    counter, at_final = [0], []
    monkeypatch.setattr(T, "_kill_hook", _counting_hook(counter))
    real_final = T.train_final
    monkeypatch.setattr(T, "train_final", lambda *a, **k: (at_final.append(counter[0]), real_final(*a, **k))[1])
    exp = tmp_path / "all"
    out = run_train("probe", feats, exp, overrides=[*FINAL_ARGS, "run.final=all"], progress=False, log=lambda s: None)
    # the cross-validation figures are those of the folds, as with best-dev
    strip = lambda runs: [{k: v for k, v in r.items() if k != "seconds"} for r in runs]
    assert out["summary"] == out_ref["summary"] and strip(out["runs"]) == strip(out_ref["runs"])
    epochs_sel = sorted(r["best_epoch"] + 1 for r in out["runs"])
    expected = max(1, int(np.floor(np.median(epochs_sel) + 0.5)))
    assert expected >= 2  # (these settings select epochs [1, 2, 2, 3]) so that resuming can use a checkpoint
    fin = out["final"]
    assert fin["final"] == "all" and fin["epochs"] == expected and fin["n_utterances"] == 48
    assert sorted(fin["selected_epoch_counts"]) == epochs_sel
    ids = json.loads((exp / "final" / "ids.json").read_text())["ids"]
    assert sorted(ids) == sorted(json.loads(l)["id"] for l in (feats / "manifest.jsonl").read_text().splitlines())
    log = [json.loads(l) for l in (exp / "final" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == list(range(expected)) and not any("dev_UA" in r for r in log)
    assert json.loads((exp / "final" / "metrics.json").read_text())["epochs"] == expected
    # EXP/model.safetensors + norm.safetensors are the final model, normalised with statistics of all data
    a, b = load_file(str(exp / "model.safetensors")), load_file(str(exp / "final" / "model.safetensors"))
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    src = open_sources(feats, {"audio": "fa"})
    norm = Normalizer.load(exp / "norm.safetensors")
    assert np.allclose(norm.stats["audio"][0], np.concatenate([src["audio"].get(u) for u in ids]).mean(0), atol=1e-4)
    pred = json.loads((exp / "predictor.json").read_text())
    assert pred["selection"]["final"] == "all" and pred["selection"]["n_utterances"] == 48
    assert pred["selection"]["epochs"] == expected
    assert yaml.safe_load((exp / "config.yaml").read_text())["experiment"]["final"]["epochs"] == expected
    # interrupted inside the final training: --resume redoes only that part, with the same result
    fold_steps, final_spe = at_final[0], -(-48 // 8)
    stop = fold_steps + final_spe + 2  # in the middle of the final model's epoch 2, after its first checkpoint
    exp2 = tmp_path / "resumed"
    counter[0] = 0
    monkeypatch.setattr(T, "_kill_hook", _counting_hook(counter, stop_at=stop))
    with pytest.raises(KeyboardInterrupt):
        run_train("probe", feats, exp2, overrides=[*FINAL_ARGS, "run.final=all"], progress=False, log=lambda s: None)
    assert (exp2 / "folds/fold4/seed0/model.safetensors").exists() and not (exp2 / "final/model.safetensors").exists()
    assert (exp2 / "final" / "checkpoint.safetensors").exists()
    counter[0] = 0
    monkeypatch.setattr(T, "_kill_hook", _counting_hook(counter))
    lines = []
    out2 = run_train(
        "probe", feats, exp2, overrides=[*FINAL_ARGS, "run.final=all"], resume=True, progress=False, log=lines.append
    )
    assert sum("already done" in l for l in lines) == 4 and any("resuming at epoch 1" in l for l in lines)
    assert counter[0] == final_spe * (expected - 1)  # only the final model's remaining epochs were trained
    assert out2["final"]["epochs"] == expected
    c = load_file(str(exp2 / "model.safetensors"))
    assert all(np.allclose(a[k].numpy(), c[k].numpy(), atol=1e-6) for k in a)


def test_final_rejects_unknown_modes(feats, tmp_path):
    out = _bad(feats, tmp_path / "e", "--audio", "fa", "--set", "run.final=last")
    assert "run.final 'last'" in out and "all" in out


# ----------------------------------------------------------------------------------- speaker normalisation
def _speaker_offset_feats(root: Path) -> Path:
    """3 classes (shift c) under large per-speaker offsets and scales: only speaker-level
    normalisation makes the held-out speakers' features comparable to the training ones."""
    rng = np.random.default_rng(3)
    root.mkdir(parents=True)
    w = StoreWriter(
        root / "fa.h5", {"feature": "fa", "kind": "audio", "dim": 4, "frame_rate_hz": 100, "extractor": {"name": "fa"}}
    )
    utts = []
    for s in range(6):
        offset, scale = rng.normal(scale=6.0, size=4), 1.0 + s * 0.5
        for i in range(18):
            c = i % 3
            uid = f"s{s}_u{i:02d}"
            utts.append(Utterance(id=uid, text="x", label=CLASSES[c], speaker=f"spk{s}"))
            w.add(uid, ((rng.normal(size=(8, 4)) * 0.3 + c) * scale + offset).astype(np.float32))
    w.finalize()
    write_manifest(utts, root / "manifest.jsonl")
    return root


def test_speaker_normalisation(tmp_path):
    feats = _speaker_offset_feats(tmp_path / "f")
    base = [
        "data.audio=fa",
        "protocol.name=speaker-kfold:3",
        "train.epochs=30",
        "optim.lr=0.05",
        "run.threads=1",
        "train.batch_size=16",
    ]
    # every speaker's frames: zero mean, unit std per dimension, whatever subset is loaded
    cfg = resolve_config("probe", overrides=[*base, "data.normalize.audio=speaker"])
    full = load_inputs(cfg, feats)
    part = load_inputs(cfg, feats, make_protocol=False, only={"s2_u00", "s2_u01"})
    x = np.concatenate([full.sources["audio"].get(f"s2_u{i:02d}") for i in range(18)])
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-4)
    np.testing.assert_allclose(x.std(0), 1, atol=1e-3)
    np.testing.assert_allclose(part.sources["audio"].get("s2_u01"), full.sources["audio"].get("s2_u01"), atol=1e-6)
    ua = {}
    for mode in ("global", "speaker"):
        exp = tmp_path / mode
        out = run_train(
            "probe", feats, exp, overrides=[*base, f"data.normalize.audio={mode}"], progress=False, log=lambda s: None
        )
        ua[mode] = out["summary"]["UA"]["mean"]
    assert ua["speaker"] > 0.9 and ua["speaker"] > ua["global"] + 0.2, ua
    # evaluate recomputes the same speaker statistics and scores
    from sertool.evaluate import run_evaluate

    assert run_evaluate(tmp_path / "speaker", feats, log=lambda s: None)["UA"]["mean"] == pytest.approx(
        ua["speaker"], abs=1e-6
    )
    # predict and export cannot know a new recording's speaker statistics: refused, naming the option
    from sertool.predict import PredictError, load_predictor

    with pytest.raises(PredictError, match="data.normalize.audio=global"):
        load_predictor(tmp_path / "speaker", "cpu")
