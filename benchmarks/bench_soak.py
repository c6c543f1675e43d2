"""Long-run soak: extract + train + predict in one process, round after round, with memory and
open files sampled after each round; both must stay flat (a leak grows them every round).

    python benchmarks/bench_soak.py                        # 5 rounds, 40 RAVDESS files
    python benchmarks/bench_soak.py --rounds 20 --limit 120 --epochs 5 --json soak.json

Each round, through the library functions the CLI calls (no subprocess):
1. `run_extract` of `mfcc` on a RAVDESS subset (the first `--limit` files, spread over the
   actors, linked into a temporary corpus) into a fresh features folder;
2. `run_train` of a `probe` on fold 1 of kfold:2 for `--epochs` epochs;
3. `run_predict` with that experiment over the same files into a CSV;
then the round's folders are deleted, `gc.collect()` runs, and the resident memory (psutil, or
/proc/self/status) and the number of open file descriptors (/proc/self/fd) are recorded.

The slope of each over the rounds after the first (warm-up: imports, caches, allocator pools)
is a least-squares fit; the script exits with status 1 when memory grows by more than
`--max-rss-slope-mb` per round or the open files by more than `--max-fd-slope` per round.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ravdess"


def rss_mb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**20
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def slope(ys: list[float]) -> float:
    n = len(ys)
    if n < 2:
        return 0.0
    mx, my = (n - 1) / 2, sum(ys) / n
    return sum((i - mx) * (y - my) for i, y in enumerate(ys)) / sum((i - mx) ** 2 for i in range(n))


def subset_corpus(data: Path, limit: int, dest: Path) -> int:
    """Link `limit` RAVDESS files, spread over the actors and emotions, into dest/."""
    from sertool.corpora.base import AUDIO_EXTENSIONS

    actors = sorted(p for p in data.rglob("Actor_*") if p.is_dir())
    per_actor = [sorted(f for f in a.iterdir() if f.suffix.lower() in AUDIO_EXTENSIONS) for a in actors]
    if not any(per_actor):
        raise SystemExit(f"no RAVDESS Actor_* folders with audio under {data}")
    n_actors = min(len(actors), max(2, limit // 10))
    picked = []
    for files in per_actor[:n_actors]:
        k = max(1, len(files) * n_actors // limit)
        picked += files[::k][: -(-limit // n_actors)]
    for f in picked[:limit]:
        (dest / f.parent.name).mkdir(parents=True, exist_ok=True)
        (dest / f.parent.name / f.name).symlink_to(f)
    return len(picked[:limit])


def one_round(corpus: Path, work: Path, epochs: int, threads: int) -> dict:
    from sertool.extract import run_extract
    from sertool.predict import run_predict
    from sertool.train import run_train

    quiet = lambda *a, **k: None  # noqa: E731
    t0 = time.perf_counter()
    rep = run_extract(corpus, work / "feats", ["mfcc"], progress=False, log=quiet)
    t1 = time.perf_counter()
    out = run_train(
        "probe",
        work / "feats",
        work / "exp",
        progress=False,
        log=quiet,
        folds_only=["fold1"],
        overrides=[
            "data.audio=mfcc",
            "protocol.name=kfold:2",
            f"train.epochs={epochs}",
            f"run.threads={threads}",
            "train.batch_size=8",
        ],
    )
    t2 = time.perf_counter()
    pred = run_predict(work / "exp", corpus, work / "pred.csv", progress=False, log=quiet)
    t3 = time.perf_counter()
    return {
        "extract_s": t1 - t0,
        "train_s": t2 - t1,
        "predict_s": t3 - t2,
        "n_extracted": rep.n_utterances,
        "n_predicted": pred.n_done,
        "n_failed": pred.n_failed + len(rep.errors),
        "test_UA": out["summary"]["UA"]["mean"],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="RAVDESS copy (default: ../shared/data/ravdess)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--limit", type=int, default=40, help="files per round")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-rss-slope-mb", type=float, default=5.0, help="allowed memory growth, MB per round")
    ap.add_argument("--max-fd-slope", type=float, default=0.25, help="allowed open-file growth per round")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    if args.rounds < 3:
        ap.error("--rounds must be at least 3 (the first is a warm-up)")

    import torch

    torch.set_num_threads(args.threads)
    base = Path(tempfile.mkdtemp(prefix="sertool-soak-"))
    rows = []
    try:
        corpus = base / "corpus"
        n_files = subset_corpus(args.data, args.limit, corpus)
        gc.collect()
        start = {"rss_mb": rss_mb(), "fds": open_fds()}
        print(
            f"soak: {args.rounds} rounds of extract(mfcc) + train(probe, fold 1, {args.epochs} epochs) + predict "
            f"on {n_files} files of {args.data}; before: RSS {start['rss_mb']:.1f} MB, {start['fds']} open fds"
        )
        print(f"{'round':>5} {'rss_mb':>8} {'fds':>4} {'extract_s':>9} {'train_s':>7} {'predict_s':>9} {'UA':>6}")
        for r in range(args.rounds):
            work = base / f"round{r}"
            info = one_round(corpus, work, args.epochs, args.threads)
            shutil.rmtree(work)
            gc.collect()
            info.update(round=r + 1, rss_mb=rss_mb(), fds=open_fds())
            rows.append(info)
            print(
                f"{r + 1:>5} {info['rss_mb']:>8.1f} {info['fds']:>4} {info['extract_s']:>9.2f} {info['train_s']:>7.2f} "
                f"{info['predict_s']:>9.2f} {info['test_UA']:>6.3f}",
                flush=True,
            )
            if info["n_failed"]:
                print(f"  {info['n_failed']} file(s) failed in round {r + 1}")
    finally:
        shutil.rmtree(base, ignore_errors=True)
    steady = rows[1:]
    result = {
        "rounds": args.rounds,
        "files": n_files,
        "epochs": args.epochs,
        "start": start,
        "rows": rows,
        "rss_slope_mb_per_round": slope([x["rss_mb"] for x in steady]),
        "fd_slope_per_round": slope([x["fds"] for x in steady]),
        "rss_growth_mb_after_warmup": steady[-1]["rss_mb"] - steady[0]["rss_mb"],
        "fd_growth_after_warmup": steady[-1]["fds"] - steady[0]["fds"],
    }
    print(
        f"after warm-up (rounds 2-{args.rounds}): RSS slope {result['rss_slope_mb_per_round']:+.2f} MB/round "
        f"(total {result['rss_growth_mb_after_warmup']:+.1f} MB), open fds slope {result['fd_slope_per_round']:+.2f}"
        f"/round (total {result['fd_growth_after_warmup']:+d})"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    bad = []
    if result["rss_slope_mb_per_round"] > args.max_rss_slope_mb:
        bad.append(f"memory grows {result['rss_slope_mb_per_round']:.2f} MB/round (> {args.max_rss_slope_mb})")
    if result["fd_slope_per_round"] > args.max_fd_slope:
        bad.append(f"open files grow {result['fd_slope_per_round']:.2f}/round (> {args.max_fd_slope})")
    print("FAIL: " + "; ".join(bad) if bad else "OK: memory and open files are flat")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
