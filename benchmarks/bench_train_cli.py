"""Training throughput of ``sertool train`` on real stores, at an older revision and now: items
per CPU second and the share of the time spent loading data.

    python benchmarks/bench_train_cli.py FEATS [--rev 028fed6] [--models self_attn cma lgcct]
        [--epochs 3] [--fold fold1] [--ssl whisper] [--lm bert] [--aligned aligned.h5]

FEATS is a RAVDESS features folder of the recipe (``recipes/ravdess/run.sh`` stages 0-2): the
Whisper and MiniLM stores for ``self_attn``/``cma``, the word-aligned COVAREP + GloVe file for
``lgcct``; each model gets its recipe configuration (``recipes/ravdess/conf/MODEL.yaml``). For each
model, one whole ``sertool train`` command per revision (OLD from a temporary git worktree, then
the working tree; model by model, so both see the same load), one thread, one fold, one seed,
``--epochs`` epochs (3: too few for early stopping to end a run), in a child process that times
``SERDataset.collate``: reading the preloaded stores, padding, masking and normalising, i.e. the
data loading of a ``data.workers: 0`` run. Printed per model and revision: wall and CPU seconds
of the command (start-up, training, dev and test passes), items collated, items per CPU second,
collate seconds and their share of the wall time, and the ratio of the two revisions' CPU times.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# the child: sertool from PYTHONPATH, SERDataset.collate timed, the CLI run in-process
DRIVER = r"""
import json, resource, sys, time
from sertool import data
spent, items = [0.0], [0]
collate = data.SERDataset.collate
def timed(self, idx):
    t = time.perf_counter()
    out = collate(self, idx)
    spent[0] += time.perf_counter() - t
    items[0] += len(idx)
    return out
data.SERDataset.collate = timed
from sertool.cli import cli
start = time.perf_counter()
try:
    cli(sys.argv[2:], prog_name="sertool", standalone_mode=False)
finally:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    json.dump({"wall_s": time.perf_counter() - start, "cpu_s": ru.ru_utime + ru.ru_stime,
               "collate_s": spent[0], "items": items[0]}, open(sys.argv[1], "w"))
"""


def model_args(model: str, args) -> list[str]:
    conf = ["--config", str(ROOT / "recipes" / "ravdess" / "conf" / f"{model}.yaml")]
    if model == "lgcct":
        return ["--audio", args.aligned, "--text", args.aligned, *conf]
    return ["--audio", args.ssl, "--text", args.lm, *conf]


def run(tree: Path, model: str, args, work: Path) -> dict:
    out = work / f"{model}-{tree.name}.json"
    cmd = [sys.executable, "-P", "-c", DRIVER, str(out), "train", str(args.feats), "-m", model]
    cmd += model_args(model, args)
    cmd += ["--labels", args.labels, "--protocol", args.protocol, "--fold", args.fold, "--seeds", "1"]
    cmd += ["--threads", "1", "-q", "--overwrite", "--epochs", str(args.epochs)]
    cmd += ["-o", str(work / f"exp-{model}-{tree.name}")]
    env = os.environ | {"PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, cwd=work, env=env, check=True)  # cwd: not the repository, whose sertool would win
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("feats", type=Path)
    ap.add_argument("--rev", default="028fed6", help="the older revision (default: before issue 22's changes)")
    ap.add_argument("--models", nargs="+", default=["self_attn", "cma", "lgcct"])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--fold", default="fold1")
    ap.add_argument("--protocol", default="speaker-kfold:6")
    ap.add_argument("--labels", default="ravdess8")
    ap.add_argument("--ssl", default="whisper", help="audio store of self_attn / cma")
    ap.add_argument("--lm", default="bert", help="text store of self_attn / cma")
    ap.add_argument("--aligned", default="aligned-covarep-glove-50.h5", help="lgcct's aligned file")
    args = ap.parse_args()
    args.feats = args.feats.resolve()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        old = work / "old"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), args.rev], check=True)
        try:
            for model in args.models:
                for tree, label in ((old, args.rev), (ROOT, "working tree")):
                    r = run(tree, model, args, work)
                    rows.append({"model": model, "revision": label, **r})
                    print(f"{model} at {label}: {json.dumps(r)}", file=sys.stderr)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    load = os.getloadavg()[0]
    print(
        f"\n{args.feats}, {args.protocol} {args.fold}, {args.epochs} epochs, 1 thread; load average {load:.1f} at end\n"
    )
    print("| model | revision | wall s | CPU s | items | items / CPU s | collating s (share of wall) | CPU new/old |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for i, r in enumerate(rows):
        ratio = f"{r['cpu_s'] / rows[i - 1]['cpu_s']:.2f}" if i % 2 else ""
        print(
            f"| {r['model']} | {r['revision']} | {r['wall_s']:.1f} | {r['cpu_s']:.1f} | {r['items']} | "
            f"{r['items'] / r['cpu_s']:.1f} | {r['collate_s']:.1f} ({100 * r['collate_s'] / r['wall_s']:.1f} %) | "
            f"{ratio} |"
        )


if __name__ == "__main__":
    main()
