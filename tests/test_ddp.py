"""Distributed training: `torchrun --nproc_per_node=2 -m sertool train` (gloo, CPU, 127.0.0.1) equals
one process with the same global batch; rank 0 alone writes EXP; a DDP checkpoint resumes."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.torch import load_file

from sertool.corpora.base import Utterance, write_manifest
from sertool.data import SERDataset, distributed_batch_indices, shard_batch
from sertool.store import StoreWriter
from sertool.train import run_train

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ("angry", "happy", "neutral", "sad")
# a small GRU + attention model, no dropout (dropout masks differ per rank); SGD, because Adam turns
# the float noise of gradients that are zero in theory (attention key biases) into lr-sized steps;
# a frame budget small enough that some global batches hold a single utterance (one rank idle)
SETTINGS = [
    "model.conv=local",
    "model.modalities=[audio,text]",
    "model.gru_hidden=8",
    "model.num_heads=2",
    "model.fc_hidden=8",
    "model.dropout=0",
    "data.audio=fa",
    "data.text=ft",
    "protocol.name=corpus",
    "train.epochs=3",
    "train.batch_size=8",
    "train.max_batch_frames=100",
    "train.class_weights=true",
    "optim.name=sgd",
    "optim.lr=0.1",
    "optim.momentum=0.9",
    "optim.grad_clip=5",
    "run.threads=1",
]


def make_feats(root, n_spk=4, per=12, seed=0, da=6, dt=5):
    """Manifest + audio store `fa` + text store `ft`; class c shifts the features by c (unbalanced classes)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    utts = []
    wa = StoreWriter(
        root / "fa.h5", {"feature": "fa", "kind": "audio", "dim": da, "frame_rate_hz": 100, "extractor": {"name": "fa"}}
    )
    wt = StoreWriter(
        root / "ft.h5", {"feature": "ft", "kind": "text", "dim": dt, "unit": "token", "extractor": {"name": "ft"}}
    )
    for s in range(n_spk):
        for i in range(per):
            c = min(i % 5, 3)
            uid = f"s{s}_u{i:03d}"
            utts.append(
                Utterance(
                    id=uid,
                    text="hi",
                    label=CLASSES[c],
                    speaker=f"spk{s + 1}",
                    split=["train", "train", "dev", "test"][s % 4],
                )
            )
            wa.add(uid, ((rng.normal(size=(int(rng.integers(5, 40)), da)) + c) * 2 + 3).astype(np.float32))
            wt.add(uid, (rng.normal(size=(int(rng.integers(3, 8)), dt)) + 0.5 * c).astype(np.float32))
    wa.finalize()
    wt.finalize()
    write_manifest(utts, root / "manifest.jsonl")
    return root


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(feats, exp, *extra, env_extra=None, nproc=2):
    args = sum([["--set", s] for s in SETTINGS], [])
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        "--nnodes=1",
        "--master_addr=127.0.0.1",
        f"--master_port={_free_port()}",
        "-m",
        "sertool",
        "train",
        str(feats),
        "-m",
        "self_attn",
        "-o",
        str(exp),
        "-q",
        *args,
        *extra,
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
        **(env_extra or {}),
    }
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    return make_feats(tmp_path_factory.mktemp("ddp") / "f")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """run.threads=1 sets torch's threads in this process: restore them afterwards."""
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(feats, tmp_path_factory):
    """The single-process run."""
    exp = tmp_path_factory.mktemp("ref") / "exp"
    run_train("self_attn", feats, exp, overrides=SETTINGS, progress=False, log=lambda s: None)
    return exp


def _weights(exp):
    return load_file(str(exp / "folds/corpus/seed0/model.safetensors"))


def _log(exp):
    return [json.loads(l) for l in (exp / "folds/corpus/seed0/log.jsonl").read_text().splitlines()]


def test_shards_cover_every_global_batch_once(feats):
    from sertool.data import open_sources

    src = open_sources(feats, {"audio": "fa"})
    ds = SERDataset(src, src["audio"].ids, [0] * len(src["audio"].ids))
    single = ds.batch_indices(8, 60, True, 3, 2)
    assert any(len(b) == 1 for b in single)  # the idle-rank case is exercised
    per_rank = [distributed_batch_indices(ds, 8, 60, True, 3, 2, rank=r, world_size=2) for r in range(2)]
    for k, g in enumerate(single):
        assert all(np.array_equal(per_rank[r][k][0], g) for r in range(2))
        real = [per_rank[r][k][1] for r in range(2) if per_rank[r][k][2]]
        assert sorted(np.concatenate(real).tolist()) == sorted(g.tolist())
    local, real = shard_batch(np.array([7]), 1, 2)
    assert not real and local.tolist() == [7]


def test_two_gloo_processes_match_one(feats, reference, tmp_path):
    exp = tmp_path / "ddp"
    res = torchrun(feats, exp)
    assert res.returncode == 0, res.stderr[-3000:]
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    assert cfg["experiment"]["world_size"] == 2 and cfg["experiment"]["backend"] == "gloo"
    a, b = _weights(reference), _weights(exp)
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.allclose(a[name].numpy(), b[name].numpy(), atol=1e-5, rtol=1e-4), name
    la, lb = _log(reference), _log(exp)
    assert len(la) == len(lb) == 3
    for x, y in zip(la, lb):
        assert x["train_loss"] == pytest.approx(y["train_loss"], abs=1e-5)
        assert x["dev_loss"] == pytest.approx(y["dev_loss"], abs=1e-5)
        assert x["dev_UA"] == pytest.approx(y["dev_UA"]) and x["best"] == y["best"]
    ma, mb = (json.loads((e / "metrics.json").read_text()) for e in (reference, exp))
    assert ma["runs"][0]["best_epoch"] == mb["runs"][0]["best_epoch"]
    for k in ("WA", "UA", "macro_f1"):
        assert ma["runs"][0]["test"][k] == pytest.approx(mb["runs"][0]["test"][k]), k
    assert ma["runs"][0]["test"]["loss"] == pytest.approx(mb["runs"][0]["test"]["loss"], abs=1e-5)
    # written once, by rank 0: no temporary files of a second writer, one line per epoch
    assert not [p for p in exp.rglob("*") if ".tmp" in p.name]
    assert len((exp / "log.jsonl").read_text().splitlines()) == 3
    assert (exp / "predictor.json").exists()


def test_a_killed_ddp_run_resumes_to_the_same_weights(feats, reference, tmp_path):
    exp = tmp_path / "ddp"
    killed = torchrun(feats, exp, env_extra={"SERTOOL_TEST_KILL_AFTER_STEPS": "11"})
    assert killed.returncode != 0
    assert (exp / "folds/corpus/seed0/checkpoint.safetensors").exists()
    assert not (exp / "folds/corpus/seed0/model.safetensors").exists()
    # resumed by one process: the checkpoint does not depend on the number of processes
    run_train("self_attn", feats, exp, overrides=SETTINGS, resume=True, progress=False, log=lambda s: None)
    a, b = _weights(reference), _weights(exp)
    for name in a:
        assert np.allclose(a[name].numpy(), b[name].numpy(), atol=1e-5, rtol=1e-4), name
    assert [r["epoch"] for r in _log(exp)] == [0, 1, 2]


# ----------------------------------------------------------------------------------- large stores
def test_memory_budget_reads_lazily_and_workers_open_their_own_handles(feats, reference, tmp_path):
    import pickle

    from sertool.data import open_sources

    # a budget that holds the text store but not the audio store (filled in order: audio first)
    small = open_sources(feats, {"text": "ft"}, preload=True)["text"].nbytes
    big = open_sources(feats, {"audio": "fa"}, preload=True)["audio"].nbytes
    assert small < big
    src = open_sources(feats, {"audio": "fa", "text": "ft"}, preload=small / 2**30)
    assert not src["audio"].preloaded and src["text"].preloaded
    lazy = open_sources(feats, {"audio": "fa"}, preload=0)["audio"]
    assert not lazy.preloaded
    copy = pickle.loads(pickle.dumps(lazy))  # what a spawned worker gets: no handle, reopened on use
    assert copy.store is None and np.array_equal(copy.get("s0_u000"), lazy.get("s0_u000"))
    with pytest.raises(Exception, match="memory budget"):
        open_sources(feats, {"audio": "fa"}, preload="lots")
    # training from lazily read stores through 2 DataLoader workers gives the preloaded result
    exp = tmp_path / "lazy"
    run_train(
        "self_attn",
        feats,
        exp,
        overrides=[*SETTINGS, "data.preload=0", "data.workers=2"],
        progress=False,
        log=lambda s: None,
    )
    a, b = _weights(reference), _weights(exp)
    for name in a:
        assert np.allclose(a[name].numpy(), b[name].numpy(), atol=1e-6), name
