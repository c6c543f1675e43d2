"""Soak of killed and concurrent runs (issue 20): no lost or mixed rows after any of them.

    python benchmarks/bench_kill_soak.py                      # 20 rounds on the demo corpus
    python benchmarks/bench_kill_soak.py --rounds 3 --limit 60 --json soak.json

First one clean `sertool extract -f mfcc` and one clean `sertool predict` (the packaged model) of
the demo corpus (recipes/demo/data, 240 clips; `--limit` links the first N into a temporary
corpus) give the reference store and rows.  Then, each round, as subprocesses (as a user runs
them):

1. `extract --overwrite` into one features folder; once it is writing, a second extract into the
   same folder starts (it must be refused, naming the first, or, when the first is already gone,
   finish the work); the first is killed with -9 at a random point (seeded, `--seed`) of the
   work left (its reference duration less its start-up); a plain re-run then resumes.
   Counted: utterances in the store, missing, extra, and different from the reference (bit for
   bit), lines of the manifest.
2. The same for `predict --overwrite` into one CSV, resumed with `--resume`.  Counted: rows,
   files missing, duplicated, and rows whose label or probabilities differ from the reference
   (more than 1e-5).

One line per round and a total; exit status 1 when any round lost or mixed a row or utterance.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "recipes" / "demo" / "data"


def sertool(*args) -> list[str]:
    return [sys.executable, "-m", "sertool", *map(str, args)]


def env() -> dict:
    e = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def timed(cmd) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"reference run failed: {' '.join(cmd)}\n{r.stderr}")
    return time.perf_counter() - t0


def store_items(path: Path) -> dict[str, bytes]:
    with h5py.File(path, "r") as f:
        return {uid: f["utts"][uid][()].tobytes() for uid in f["utts"]}


def csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def kill_round(cmd, resume_cmd, started, seconds: float, rng: random.Random) -> dict:
    """Run cmd; when it has begun writing start the same command again (the second writer), kill
    the first at a random point of ``seconds``, then run ``resume_cmd``; what each did."""
    out = {"killed": False, "second": None}
    t0 = time.perf_counter()
    first = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while first.poll() is None and not started() and time.perf_counter() - t0 < 10 * seconds:
        time.sleep(0.01)
    begun = time.perf_counter() - t0  # start-up over: kill somewhere in the work left
    kill_at = begun + rng.uniform(0.05, 1.0) * max(seconds - begun, 0.5)
    second = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while first.poll() is None and time.perf_counter() - t0 < kill_at:
        time.sleep(0.01)
    if first.poll() is None:
        first.kill()
        out["killed"] = True
    first.wait()
    _, err = second.communicate()
    out["second"] = "refused" if second.returncode == 1 and "another sertool" in err else f"exit {second.returncode}"
    r = subprocess.run(resume_cmd, env=env(), capture_output=True, text=True)
    out["resume_exit"] = r.returncode
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--limit", type=int, default=0, help="use the first N clips of the demo corpus (0 = all 240)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write the per-round counts here")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="sertool-kill-soak-"))
    corpus = DEMO
    if args.limit:
        corpus = tmp / "corpus"
        lines = (DEMO / "metadata.csv").read_text(encoding="utf-8").splitlines(keepends=True)
        step = max(1, (len(lines) - 1) // args.limit)  # spread over the actors
        keep = lines[1::step][: args.limit]
        for line in keep:
            rel = line.split(",")[0]
            (corpus / rel).parent.mkdir(parents=True, exist_ok=True)
            (corpus / rel).symlink_to(DEMO / rel)
        (corpus / "metadata.csv").write_text(lines[0] + "".join(keep), encoding="utf-8")

    ref_feats, ref_csv = tmp / "ref-feats", tmp / "ref.csv"
    t_extract = timed(sertool("extract", corpus, "-o", ref_feats, "-f", "mfcc", "-q", "--flush-every", "8"))
    t_predict = timed(sertool("predict", corpus, "-o", ref_csv, "-q"))
    ref_store = store_items(ref_feats / "mfcc.h5")
    ref_rows = {r["file"]: r for r in csv_rows(ref_csv)}
    n_manifest = len((ref_feats / "manifest.jsonl").read_text().splitlines())
    print(
        f"reference: {len(ref_store)} utterances (extract {t_extract:.1f} s), {len(ref_rows)} rows "
        f"(predict {t_predict:.1f} s); {args.rounds} rounds, seed {args.seed}"
    )

    feats, out = tmp / "feats", tmp / "p.csv"
    rounds, bad = [], 0
    for k in range(args.rounds):
        ex = kill_round(
            sertool("extract", corpus, "-o", feats, "-f", "mfcc", "-q", "--flush-every", "8", "--overwrite"),
            sertool("extract", corpus, "-o", feats, "-f", "mfcc", "-q", "--flush-every", "8"),
            lambda: (feats / "mfcc.h5.parts").is_dir(),
            t_extract,
            rng,
        )
        got = store_items(feats / "mfcc.h5") if (feats / "mfcc.h5").exists() else {}
        ex.update(
            utterances=len(got),
            missing=len(set(ref_store) - set(got)),
            extra=len(set(got) - set(ref_store)),
            different=sum(got[u] != ref_store[u] for u in set(got) & set(ref_store)),
            manifest=len((feats / "manifest.jsonl").read_text().splitlines()),
        )
        pr = kill_round(
            sertool("predict", corpus, "-o", out, "-q", "--overwrite"),
            sertool("predict", corpus, "-o", out, "-q", "--resume"),
            lambda: out.exists() and out.stat().st_size > 200,
            t_predict,
            rng,
        )
        rows = csv_rows(out)
        files = [r["file"] for r in rows]
        mixed = 0
        for r in rows:
            ref = ref_rows.get(r["file"])
            probs = [c for c in r if c.startswith("p_")]
            if ref is None or r["label"] != ref["label"]:
                mixed += 1
            elif not np.allclose([float(r[c]) for c in probs], [float(ref[c]) for c in probs], atol=1e-5):
                mixed += 1
        pr.update(
            rows=len(rows),
            missing=len(set(ref_rows) - set(files)),
            duplicated=len(files) - len(set(files)),
            mixed=mixed,
        )
        lost = ex["missing"] + ex["extra"] + ex["different"] + pr["missing"] + pr["duplicated"] + pr["mixed"]
        lost += (ex["manifest"] != n_manifest) + (ex["resume_exit"] != 0) + (pr["resume_exit"] != 0)
        bad += lost > 0
        rounds.append({"extract": ex, "predict": pr})
        print(
            f"round {k + 1:2d}: extract {'killed' if ex['killed'] else 'finished'}, second {ex['second']}, "
            f"store {ex['utterances']}/{len(ref_store)} (missing {ex['missing']}, extra {ex['extra']}, "
            f"different {ex['different']}), manifest {ex['manifest']}; predict "
            f"{'killed' if pr['killed'] else 'finished'}, second {pr['second']}, rows {pr['rows']}/{len(ref_rows)} "
            f"(missing {pr['missing']}, duplicated {pr['duplicated']}, mixed {pr['mixed']})"
            + ("" if lost == 0 else "  <-- LOST OR MIXED"),
            flush=True,
        )
    killed = sum(r["extract"]["killed"] for r in rounds), sum(r["predict"]["killed"] for r in rounds)
    refused = (
        sum(r["extract"]["second"] == "refused" for r in rounds),
        sum(r["predict"]["second"] == "refused" for r in rounds),
    )
    print(
        f"total: {args.rounds} rounds, killed extract {killed[0]} / predict {killed[1]}, second writer refused "
        f"extract {refused[0]} / predict {refused[1]}; rounds with lost or mixed rows: {bad}"
    )
    if args.json:
        args.json.write_text(json.dumps({"rounds": rounds, "bad_rounds": bad}, indent=1))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
