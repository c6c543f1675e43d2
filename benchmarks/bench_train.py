"""Data-loading overhead of the train stage: time per epoch through sertool's data path
(features preloaded from the HDF5 files, batches collated, padded, masked and normalised on the
fly) against the pure compute time of the very same batches already held in memory.

    python benchmarks/bench_train.py                       # both cases, full sizes, markdown table
    python benchmarks/bench_train.py --batches 100 --threads 2 --cases lgcct

Cases (synthetic stores written to a temporary folder, the sizes of the issue):

* ``lgcct``: 16,000 CMU-MOSEI-style aligned samples (n = 50, COVAREP 74 + GloVe 300) in an
  aligned file; LGCCT at its paper configuration (batch 24).
* ``self_attn``: 7,500 utterances (IEMOCAP size) in two feature stores, audio 120-d with 100-500
  frames, text 300-d with 5-60 tokens, batch 32; Rajan's self-attention model (audio + text).

For each case ``--batches`` training steps (forward, backward, Adam step) are timed ``--repeats``
times; every step through the data path (collate from the preloaded store: slice, pad, mask,
normalise) is immediately followed by the same step on the same batch collated beforehand and
held in memory, so both see the same load from other processes on a shared machine.  Wall and
CPU (process) time are both reported; with one thread the CPU time is the robust figure on a
loaded machine.  Epoch times are extrapolated from the per-step times to the full number of
batches.  Overhead = (data path - in memory) / in memory; the target is < 20 %.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sertool.data import Normalizer, SERDataset, open_sources  # noqa: E402
from sertool.store import StoreWriter  # noqa: E402
from sertool.train import build, compute_loss, make_optimizer, resolve_config  # noqa: E402


def make_aligned(path: Path, n: int, L: int = 50, da: int = 74, dt: int = 300, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    ids = [f"seg{i:06d}" for i in range(n)]
    with h5py.File(path, "w") as f:
        f["ids"] = np.array(ids, dtype="S")
        a = f.create_dataset("audio", (n, L, da), dtype="f4")
        t = f.create_dataset("text", (n, L, dt), dtype="f4")
        m = f.create_dataset("mask", (n, L), dtype=bool)
        for s in range(0, n, 2000):
            e = min(n, s + 2000)
            lens = rng.integers(5, L + 1, e - s)
            mask = np.arange(L)[None, :] < lens[:, None]
            a[s:e] = rng.standard_normal((e - s, L, da), dtype=np.float32) * mask[..., None]
            t[s:e] = rng.standard_normal((e - s, L, dt), dtype=np.float32) * mask[..., None]
            m[s:e] = mask
    return ids


def make_stores(root: Path, n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    ids = [f"utt{i:05d}" for i in range(n)]
    wa = StoreWriter(
        root / "audio120.h5",
        {"feature": "audio120", "kind": "audio", "dim": 120, "frame_rate_hz": 100, "extractor": {"name": "synthetic"}},
        flush_every=500,
    )
    wt = StoreWriter(
        root / "text300.h5",
        {"feature": "text300", "kind": "text", "dim": 300, "unit": "word", "extractor": {"name": "synthetic"}},
        flush_every=500,
    )
    for uid in ids:
        wa.add(uid, rng.standard_normal((int(rng.integers(100, 501)), 120), dtype=np.float32))
        wt.add(uid, rng.standard_normal((int(rng.integers(5, 61)), 300), dtype=np.float32))
    wa.finalize()
    wt.finalize()
    return ids


def step_fn(cfg, model, optimizer):
    def step(batch):
        out = model(batch)
        loss = compute_loss(cfg, out, batch["target"], None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def measure(name: str, cfg: dict, ds: SERDataset, n_batches: int, repeats: int = 2) -> dict:
    """Per step, interleaved: (collate + train step) then (train step on the same batch held in
    memory), so both see the same load from other processes; wall and CPU (process) time."""
    bs = cfg["train"]["batch_size"]
    all_batches = ds.batch_indices(bs, shuffle=True, seed=0, epoch=0)
    idx = all_batches[:n_batches]
    torch.manual_seed(0)
    model = build(cfg)
    model.train()
    optimizer = make_optimizer(cfg, model)
    step = step_fn(cfg, model, optimizer)
    for i in idx[:3]:  # warm-up
        step(ds.collate(i))
    t0 = time.perf_counter()
    held = [ds.collate(i) for i in idx]
    collate_s = time.perf_counter() - t0
    wall = {"pipe": 0.0, "mem": 0.0}
    cpu = {"pipe": 0.0, "mem": 0.0}
    for _ in range(repeats):
        for k, i in enumerate(idx):
            w, c = time.perf_counter(), time.process_time()
            step(ds.collate(i))
            wall["pipe"] += time.perf_counter() - w
            cpu["pipe"] += time.process_time() - c
            w, c = time.perf_counter(), time.process_time()
            step(held[k])
            wall["mem"] += time.perf_counter() - w
            cpu["mem"] += time.process_time() - c
    scale = len(all_batches) / (len(idx) * repeats)
    return {
        "case": name,
        "items": len(ds),
        "batches": len(all_batches),
        "timed": len(idx) * repeats,
        "epoch_pipeline_s": wall["pipe"] * scale,
        "epoch_memory_s": wall["mem"] * scale,
        "epoch_pipeline_cpu_s": cpu["pipe"] * scale,
        "epoch_memory_cpu_s": cpu["mem"] * scale,
        "collate_epoch_s": collate_s * len(all_batches) / len(idx),
        "overhead": (wall["pipe"] - wall["mem"]) / wall["mem"],
        "overhead_cpu": (cpu["pipe"] - cpu["mem"]) / cpu["mem"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", nargs="+", default=["lgcct", "self_attn"])
    ap.add_argument("--n-lgcct", type=int, default=16000)
    ap.add_argument("--n-self", type=int, default=7500)
    ap.add_argument("--batches", type=int, default=120, help="training steps timed per repeat (then extrapolated)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--workdir", type=Path, help="where to write the synthetic stores (default: a temporary folder)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        if "lgcct" in args.cases:
            t0 = time.perf_counter()
            ids = make_aligned(tmp / "aligned.h5", args.n_lgcct)
            cfg = resolve_config("lgcct", overrides=["data.audio=aligned.h5", "data.text=aligned.h5"])
            t1 = time.perf_counter()
            src = open_sources(tmp, {"audio": "aligned.h5", "text": "aligned.h5"})
            load_s = time.perf_counter() - t1
            targets = np.random.default_rng(1).uniform(-3, 3, len(ids)).astype(np.float32)
            norm = Normalizer.fit(src, ids[: int(0.8 * len(ids))], {"audio": "global", "text": "none"})
            ds = SERDataset(src, ids, targets, norm, regression=True)
            r = measure(
                "lgcct, 16k aligned x 50 (COVAREP 74 + GloVe 300), batch 24", cfg, ds, args.batches, args.repeats
            )
            r["load_s"] = load_s
            rows.append(r)
            print(f"lgcct done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
            del src, ds
        if "self_attn" in args.cases:
            t0 = time.perf_counter()
            ids = make_stores(tmp, args.n_self)
            cfg = resolve_config(
                "self_attn",
                overrides=[
                    "model.modalities=[audio,text]",
                    "model.audio_dim=120",
                    "model.text_dim=300",
                    "model.n_classes=4",
                ],
            )
            t1 = time.perf_counter()
            src = open_sources(tmp, {"audio": "audio120", "text": "text300"})
            load_s = time.perf_counter() - t1
            targets = np.random.default_rng(1).integers(0, 4, len(ids))
            norm = Normalizer.fit(src, ids[: int(0.8 * len(ids))], {"audio": "global", "text": "none"})
            ds = SERDataset(src, ids, targets, norm)
            r = measure(
                "self_attn, 7.5k utts (audio 120-d 100-500 frames, text 300-d), batch 32",
                cfg,
                ds,
                args.batches,
                args.repeats,
            )
            r["load_s"] = load_s
            rows.append(r)
            print(f"self_attn done ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {args.batches} steps x {args.repeats} "
        "repeats timed, each step interleaved with the same step on a batch held in memory; extrapolated to an epoch\n"
    )
    print(
        "| case | items | batches/epoch | epoch, data path: wall / CPU (s) | epoch, batches in memory: wall / CPU (s) | "  # noqa: E501
        "overhead wall | overhead CPU | collate alone (s/epoch) | preload from HDF5 (s) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['case']} | {r['items']} | {r['batches']} | {r['epoch_pipeline_s']:.1f} / {r['epoch_pipeline_cpu_s']:.1f} | "  # noqa: E501
            f"{r['epoch_memory_s']:.1f} / {r['epoch_memory_cpu_s']:.1f} | {100 * r['overhead']:+.1f} % | "
            f"{100 * r['overhead_cpu']:+.1f} % | {r['collate_epoch_s']:.2f} | {r['load_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
