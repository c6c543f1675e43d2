"""Distillation throughput with cached teacher states versus a live teacher, in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_distill.py [--utts 16] [--seconds 3] [--size base|small]

A randomly initialised wav2vec2 teacher (``--size base``: wav2vec2-base, 94M parameters;
``small``: 2 layers of 256) is saved to a temporary folder; its last-layer states for a
synthetic corpus (noise wavs) are written once to a feature store (as ``sertool extract`` would;
not timed).  Then an audio student is distilled for ``--epochs`` epochs twice: from the store
(cached) and from the model folder (live).  Each mode runs in its own process so that the peak
resident memory (ru_maxrss) is its own.  Reported: utterances per second of the training epochs
(the validation pass excluded), the speed-up, and the peak memory of each mode.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

ROOT = Path(__file__).resolve().parents[1]


def make_corpus(root: Path, n: int, seconds: float, size: str) -> None:
    import numpy as np
    import soundfile as sf
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from sertool.corpora.base import Utterance, write_manifest
    from sertool.store import StoreWriter

    torch.manual_seed(0)
    cfg = (
        Wav2Vec2Config()
        if size == "base"
        else Wav2Vec2Config(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512)
    )
    model = Wav2Vec2Model(cfg).eval()
    model.save_pretrained(root / "teacher")
    Wav2Vec2FeatureExtractor().save_pretrained(root / "teacher")
    rng = np.random.default_rng(0)
    (root / "wav").mkdir(parents=True, exist_ok=True)
    utts = []
    w = StoreWriter(
        root / "feats" / "teacher.h5",
        {
            "feature": "teacher",
            "kind": "audio",
            "dim": cfg.hidden_size,
            "frame_rate_hz": 50.0,
            "extractor": {"name": "bench"},
        },
    )
    for i in range(n):
        x = (0.1 * rng.normal(size=int(seconds * 16000))).astype(np.float32)
        path = root / "wav" / f"u{i:03d}.wav"
        sf.write(path, x, 16000)
        utts.append(Utterance(id=f"u{i:03d}", audio=str(path), duration=len(x) / 16000, sample_rate=16000))
        xn = (x - x.mean()) / (x.std() + 1e-7)
        with torch.no_grad():
            states = model(torch.from_numpy(xn)[None]).last_hidden_state[0].numpy()
        w.add(utts[-1].id, states)
    w.finalize()
    write_manifest(utts, root / "feats" / "manifest.jsonl")


def run_mode(root: Path, mode: str, epochs: int) -> dict:
    import resource

    import torch

    from sertool.distill import run_distill

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    teacher = "teacher" if mode == "cached" else str(root / "teacher")
    m = run_distill(
        root / "feats",
        root / f"exp-{mode}",
        teacher_audio=teacher,
        overwrite=True,
        progress=False,
        log=lambda s: None,
        overrides=[
            "student.modalities=[audio]",
            f"distill.epochs={epochs}",
            "distill.warmup_epochs=0",
            "distill.dev_fraction=0.125",
            "distill.budget=320000",
        ],
    )
    rows = [json.loads(l) for l in (root / f"exp-{mode}" / "distill_log.jsonl").read_text().splitlines()]
    return {
        "mode": mode,
        "utts_per_s": sum(r["utts_per_s"] for r in rows) / len(rows),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "student_parameters": m["parameters"]["student"],
        "teacher_parameters": m["parameters"]["teacher"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--utts", type=int, default=16)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--size", choices=["base", "small"], default="base")
    p.add_argument("--mode", choices=["cached", "live"], help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.mode:  # child process
        print(json.dumps(run_mode(Path(args.root), args.mode, args.epochs)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_corpus(root, args.utts, args.seconds, args.size)
        results = {}
        for mode in ("cached", "live"):
            out = subprocess.run(
                [sys.executable, __file__, "--mode", mode, "--root", str(root), "--epochs", str(args.epochs)],
                check=True,
                capture_output=True,
                text=True,
            )
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    c, l = results["cached"], results["live"]
    print(
        f"# distill throughput, {args.utts} utterances x {args.seconds:.1f} s, teacher wav2vec2-{args.size} "
        f"({l['teacher_parameters']['audio'] / 1e6:.1f}M), student audio {c['student_parameters']['audio'] / 1e6:.2f}M / "  # noqa: E501
        f"{l['student_parameters']['audio'] / 1e6:.2f}M (stem / teacher CNN)"
    )
    print(f"# {platform.processor() or platform.machine()}, OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}")
    print("| teacher | utt/s | peak RSS (MB) |\n|---|---|---|")
    for r in (c, l):
        print(f"| {r['mode']} | {r['utts_per_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    print(f"speed-up cached / live: {c['utts_per_s'] / l['utts_per_s']:.1f}x")


if __name__ == "__main__":
    main()
