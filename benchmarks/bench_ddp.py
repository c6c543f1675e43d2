"""Training throughput (samples/s) with 1 process vs N processes (torchrun + DDP, gloo on CPU).

    python benchmarks/bench_ddp.py                        # 1 x 1 thread, 2 x 1 (torchrun), 1 x 2 threads
    python benchmarks/bench_ddp.py --utts 3000 --epochs 2 --nproc 1 2 4

A synthetic corpus (IEMOCAP-like: audio 120-d with 50-300 frames, text 300-d with 5-40 tokens,
4 classes, train : dev : test = 8 : 1 : 1) is written to a temporary folder, then the real
command line is timed: ``sertool train`` for one process, ``torchrun --nproc_per_node=N -m
sertool train`` for N.  Every configuration trains the same model (Rajan's self_attn, audio +
text, local convolutions) with the same *global* batch, so they do the same optimiser steps.
Samples/s = training utterances x epochs / the summed per-epoch training time from
EXP/log.jsonl (``seconds``: the training loop only, not start-up, dev evaluation or writing);
the wall time of the whole command is shown too.  The load average is printed before and after,
because on a shared machine other jobs take cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sertool.corpora.base import Utterance, write_manifest  # noqa: E402
from sertool.store import StoreWriter  # noqa: E402

CLASSES = ("angry", "happy", "neutral", "sad")


def make_corpus(root: Path, n: int, seed: int = 0) -> int:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    wa = StoreWriter(
        root / "audio.h5",
        {"feature": "audio", "kind": "audio", "dim": 120, "frame_rate_hz": 100, "extractor": {"name": "synthetic"}},
    )
    wt = StoreWriter(
        root / "text.h5",
        {"feature": "text", "kind": "text", "dim": 300, "unit": "token", "extractor": {"name": "synthetic"}},
    )
    utts = []
    n_train = 0
    for i in range(n):
        c = i % 4
        split = "test" if i % 10 == 9 else "dev" if i % 10 == 8 else "train"
        n_train += split == "train"
        uid = f"u{i:06d}"
        utts.append(Utterance(id=uid, text="x", label=CLASSES[c], speaker=f"s{i % 20}", split=split))
        wa.add(uid, (rng.standard_normal((int(rng.integers(50, 301)), 120), dtype=np.float32) + 0.3 * c))
        wt.add(uid, (rng.standard_normal((int(rng.integers(5, 41)), 300), dtype=np.float32) + 0.3 * c))
    wa.finalize()
    wt.finalize()
    write_manifest(utts, root / "manifest.jsonl")
    return n_train


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(feats: Path, exp: Path, nproc: int, threads: int, epochs: int, batch: int) -> dict:
    args = [
        "train",
        str(feats),
        "-m",
        "self_attn",
        "--audio",
        "audio",
        "--text",
        "text",
        "--protocol",
        "corpus",
        "--epochs",
        str(epochs),
        "--threads",
        str(threads),
        "-o",
        str(exp),
        "-q",
        "--overwrite",
        "--set",
        "model.conv=local",
        "--set",
        "model.modalities=[audio,text]",
        "--set",
        f"train.batch_size={batch}",
        "--set",
        "train.early_stopping=0",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "sertool", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={nproc}",
            "--nnodes=1",
            "--master_addr=127.0.0.1",
            f"--master_port={_port()}",
            "-m",
            "sertool",
            *args,
        ]
    t0 = time.time()
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    log = [json.loads(l) for l in (exp / "log.jsonl").read_text().splitlines()]
    metrics = json.loads((exp / "metrics.json").read_text())
    return {
        "train_s": sum(r["seconds"] for r in log),
        "wall_s": wall,
        "epochs": len(log),
        "test_UA": metrics["runs"][0]["test"]["UA"],
        "last_train_loss": log[-1]["train_loss"],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utts", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32, help="global batch (split across the processes)")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument(
        "--single-threads",
        type=int,
        nargs="*",
        default=[2],
        help="extra one-process rows with these thread counts (the same cores as N processes)",
    )
    a = ap.parse_args(argv)
    print(f"load average before: {os.getloadavg()}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        feats = Path(tmp) / "feats"
        n_train = make_corpus(feats, a.utts)
        rows = [(n, a.threads) for n in a.nproc] + [(1, t) for t in a.single_threads if t != a.threads]
        print(
            f"{a.utts} utterances ({n_train} train), self_attn audio+text, global batch {a.batch}, {a.epochs} epochs\n"
        )
        print(
            "| processes x threads | train time (s) | samples/s | speed-up | whole command, wall (s) | "
            "last train loss |"
        )
        print("|---|---|---|---|---|---|")
        base = None
        for nproc, threads in rows:
            r = run(feats, Path(tmp) / f"exp{nproc}x{threads}", nproc, threads, a.epochs, a.batch)
            sps = n_train * r["epochs"] / r["train_s"]
            base = base or sps
            print(
                f"| {nproc} x {threads} | {r['train_s']:.1f} | {sps:.1f} | {sps / base:.2f} | {r['wall_s']:.1f} | "
                f"{r['last_train_loss']:.4f} |",
                flush=True,
            )
    print(f"\nload average after: {os.getloadavg()}", file=sys.stderr)


if __name__ == "__main__":
    main()
