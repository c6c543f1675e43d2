#!/usr/bin/env python3
"""Print one markdown table of the `sertool evaluate` results of several experiments.

    python recipes/utils/results_table.py [--title T] [--eval eval] EXP [EXP ...]

Reads EXP/<eval>/metrics.json (written by `sertool evaluate`; `--eval eval-crop30` for a
cropped evaluation) and EXP/config.yaml; classification rows give WA, UA, macro-F1 and
weighted-F1, regression rows MAE, corr, acc7 and acc2/F1 (non0): mean ± sample std over
folds x seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

CLASSIFICATION = ("WA", "UA", "macro_f1", "weighted_f1")
REGRESSION = ("MAE", "corr", "acc7", "acc2_non0", "f1_non0")


def cell(v) -> str:
    if isinstance(v, dict):
        mean, std = v.get("mean"), v.get("std")
        if mean is None:
            return "n/a"
        return f"{mean:.3f}" if std is None or std != std else f"{mean:.3f} ± {std:.3f}"
    return f"{v:.3f}" if isinstance(v, (int, float)) else str(v)


def row(exp: Path, eval_name: str) -> tuple[tuple[str, ...], str]:
    m = json.loads((exp / eval_name / "metrics.json").read_text())
    s = m.get("summary", m)
    cfg = yaml.safe_load((exp / "config.yaml").read_text()) if (exp / "config.yaml").exists() else {}
    model = (cfg.get("model") or {}).get("name", "?")
    data = cfg.get("data") or {}
    inputs = " + ".join(dict.fromkeys(str(data[k]) for k in ("audio", "text", "visual") if data.get(k)))
    protocol = (cfg.get("protocol") or {}).get("name", "?")
    runs = len(m.get("runs", [])) or "?"
    keys = REGRESSION if "MAE" in s else CLASSIFICATION
    return keys, f"| {exp.name} | {model} | {inputs} | {protocol} | {runs} | " + " | ".join(
        cell(s.get(k)) for k in keys
    ) + " |"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("exps", nargs="+", type=Path)
    ap.add_argument("--title", default="")
    ap.add_argument("--eval", default="eval", help="evaluation folder inside EXP")
    args = ap.parse_args()
    rows = [row(e, args.eval) for e in args.exps if (e / args.eval / "metrics.json").exists()]
    if args.title:
        print(f"\n{args.title}")
    for keys in dict.fromkeys(k for k, _ in rows):
        print("| experiment | model | inputs | protocol | runs | " + " | ".join(keys) + " |")
        print("|---" * (5 + len(keys)) + "|")
        for k, line in rows:
            if k == keys:
                print(line)


if __name__ == "__main__":
    main()
