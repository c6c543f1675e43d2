"""The evaluate stage: EXP (+ FEATS) -> EXP/eval/ predictions, metrics, report and plots.

    run_evaluate("exp/lgcct")                          # features from the path in EXP/config.yaml
    run_evaluate("exp/a", compare="exp/b")             # paired tests over matched folds x seeds
    run_evaluate("exp/a", crop_length=20)              # test on sequences cut to 20 steps
    run_evaluate("exp/a", attention="03-01-05-02-01-01-12")

1. Rebuild every run (fold x seed) from EXP alone: the resolved config, the fold's
   normalisation statistics, the selected weights, and the fold's test ids from EXP/folds.json.
2. Predict the test split of every run; write ``predictions.csv`` (id, fold, seed, true label,
   predicted label, one probability column per class; scores for regression).
3. Compute every metric from those predictions (sertool.metrics): per run, mean +/- std over
   runs, the confusion matrix summed over runs; ``metrics.json``, ``report.md``,
   ``confusion.png``, ``curves.png`` (training curves from the runs' logs).
4. ``compare``: EXP_B is evaluated the same way (unless it already has eval/metrics.json) and
   the runs are matched by (fold, seed); a paired two-tailed t-test and a Wilcoxon signed-rank
   test per metric go into metrics.json and the report.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from sertool import metrics as M
from sertool.data import Normalizer, SERDataset
from sertool.train import (
    RECORD_KEYS,
    TrainError,
    build,
    crop_lengths,
    load_experiment,
    load_inputs,
    load_weights,
    model_modalities,
    predict,
    run_dir_of,
)
from sertool.utils import pick_device, write_csv, write_json, write_text

CLASS_METRICS = ("WA", "UA", "macro_f1", "weighted_f1")
REG_METRICS = ("MAE", "corr", "acc7", "acc5", "acc2_has0", "f1_has0", "acc2_non0", "f1_non0")


class EvaluateError(ValueError):
    pass


def _settings(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in RECORD_KEYS}


def _runs(exp: Path, folds, seeds) -> list[tuple]:
    runs = []
    for fold in folds:
        for seed in seeds:
            rd = run_dir_of(exp, fold.name, seed)
            if (rd / "model.safetensors").exists():
                runs.append((fold, seed, rd))
    if not runs:
        raise EvaluateError(
            f"{exp}: no trained run (folds/<fold>/seed<s>/model.safetensors); finish `sertool train` first"
        )
    return runs


def _open(exp: Path, feats, crop_length: int | None, only: set[str] | None = None):
    cfg, folds = load_experiment(exp)
    settings = _settings(cfg)
    feats = feats or settings["data"].get("feats")
    try:
        inputs = load_inputs(settings, feats, make_protocol=False, only=only)
    except TrainError as e:
        raise EvaluateError(f"{exp}: {e}") from None
    recorded = cfg.get("label_set", {}).get("classes")
    if recorded is not None and list(recorded) != list(inputs.labels.classes):
        raise EvaluateError(f"{exp}: classes {recorded} recorded at training, but FEATS gives {inputs.labels.classes}")
    crop = crop_lengths(settings)
    if crop_length:
        crop = {m: int(crop_length) for m in model_modalities(settings)}
    return cfg, settings, folds, inputs, crop


def evaluate_experiment(
    exp: str | os.PathLike,
    feats=None,
    *,
    crop_length: int | None = None,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> tuple[dict, list[dict]]:
    """Predict every run's test split; returns (metrics, prediction rows)."""
    exp = Path(exp)
    cfg0, folds0 = load_experiment(exp)
    test_ids = {u for f in folds0 for u in f.test}
    cfg, settings, folds, inputs, crop = _open(exp, feats, crop_length, only=test_ids)
    seeds = cfg.get("experiment", {}).get("seeds") or [int(settings["run"]["seed"])]
    regression = inputs.labels.regression
    classes = inputs.labels.classes
    target = inputs.target_of
    dev = pick_device(device)
    if int(settings["run"].get("threads") or 0) > 0:
        torch.set_num_threads(int(settings["run"]["threads"]))
    rows: list[dict] = []
    dominance: list[dict] = []
    layer_weights: list[dict] = []
    calibration: list[dict] = []
    for fold, seed, rd in _runs(exp, folds, seeds):
        missing = [u for u in fold.test if u not in target]
        if missing:
            raise EvaluateError(
                f"fold {fold.name}: {len(missing)} test utterances are not in FEATS (e.g. {missing[0]})"
            )
        norm = Normalizer.load(exp / "folds" / fold.name / "norm.safetensors")
        ds = SERDataset(inputs.sources, fold.test, [target[u] for u in fold.test], norm, crop, regression)
        model = build(settings).to(dev)
        load_weights(model, rd / "model.safetensors")
        preds, loss = predict(settings, model, ds, dev)
        if hasattr(model, "modality_logits") and not regression:
            dominance.append(modality_dominance(settings, model, ds, dev))
        if hasattr(model, "learned_layer_weights"):
            layer_weights.append(model.learned_layer_weights())
        if not regression:
            calibration.append(run_calibration(rd, preds, ds.targets))
        for i, uid in enumerate(fold.test):
            if regression:
                rows.append(
                    {"id": uid, "fold": fold.name, "seed": seed, "true": float(ds.targets[i]), "pred": float(preds[i])}
                )
            else:
                row = {
                    "id": uid,
                    "fold": fold.name,
                    "seed": seed,
                    "true": classes[int(ds.targets[i])],
                    "pred": classes[int(preds[i].argmax())],
                }
                row.update({f"p_{c}": float(preds[i, j]) for j, c in enumerate(classes)})
                rows.append(row)
        log(f"[{fold.name} seed {seed}] {len(fold.test)} test utterances")
    metrics = metrics_from_predictions(rows, classes, regression)
    metrics["crop_length"] = crop_length
    metrics["selected_on"] = cfg.get("experiment", {}).get("selected_on")
    if dominance:
        metrics["dominance"] = {m: M.summarize([d[m] for d in dominance]) for m in dominance[0]}
    if calibration and all(calibration):
        metrics["calibration"] = {k: M.summarize([c[k] for c in calibration]) for k in calibration[0]}
    if layer_weights and layer_weights[0]:
        metrics["layer_weights"] = summarize_layer_weights(layer_weights, cfg.get("features") or {})
    for src in inputs.sources.values():
        if getattr(src, "store", None) is not None:
            src.store.close()
    return metrics, rows


def run_calibration(run_dir: Path, preds, targets) -> dict:
    """ECE of a run's test predictions before and after the temperature its training fitted on dev
    (``metrics.json`` ``calibration``); {} for a run trained before calibration was recorded."""
    from sertool import calibration as C

    path = run_dir / "metrics.json"
    t = (json.loads(path.read_text()).get("calibration") or {}).get("temperature") if path.exists() else None
    if not t:
        return {}
    return {
        "temperature": float(t),
        "ece_before": C.expected_calibration_error(preds, targets),
        "ece_after": C.expected_calibration_error(C.scaled(preds, t), targets),
    }


def summarize_layer_weights(per_run: list[dict[str, list[float]]], features: dict) -> dict:
    """The learned softmax weights over a stacked-layer store's layers (SUPERB), per modality: the
    layer ids (hidden-state indices of the store's ``layers`` attr, 0 = embeddings) and the mean and
    sample std of each layer's weight over the runs."""
    out = {}
    for m in per_run[0]:
        w = np.array([r[m] for r in per_run], dtype=np.float64)  # [runs, layers]
        ids = (features.get(m) or {}).get("layers") or list(range(w.shape[1]))
        out[m] = {
            "layers": [int(i) for i in ids],
            "mean": w.mean(0).tolist(),
            "std": (w.std(0, ddof=1) if len(w) > 1 else np.zeros(w.shape[1])).tolist(),
            "runs": len(w),
        }
    return out


def modality_dominance(cfg: dict, model, ds: SERDataset, device) -> dict[str, float]:
    """Modality dominance (CMD, Kim & Kang 2022, Table 6) of a model with per-modality logits
    (``model.modality_logits(batch)``): each modality's share of the mean |dL/dlogits| over the
    utterances of ``ds``, L the model's loss on the true labels."""
    from sertool.data import to_device
    from sertool.train import compute_loss

    model.eval()
    grads: dict[str, float] = {}
    bs = cfg["train"]["eval_batch_size"] or 2 * cfg["train"]["batch_size"]
    for idx in ds.batch_indices(bs, cfg["train"]["max_batch_frames"] or None):
        batch = to_device(ds.collate(idx), device)
        logits = model.modality_logits(batch)
        for v in logits.values():
            v.retain_grad()
        out = model.combine(logits) if hasattr(model, "combine") else model(batch)
        loss = compute_loss(cfg, out, batch["target"], None) * len(idx)
        loss.backward()
        for m, v in logits.items():
            grads[m] = grads.get(m, 0.0) + float(v.grad.abs().sum(-1).sum())
        model.zero_grad(set_to_none=True)
    total = sum(grads.values()) or 1.0
    return {m: g / total for m, g in grads.items()}


def metrics_from_predictions(rows: list[dict], classes: list[str], regression: bool) -> dict:
    """Per-run metrics, mean/std over runs and the pooled confusion matrix, from prediction rows."""
    runs: dict = {}
    for r in rows:
        runs.setdefault((r["fold"], r["seed"]), []).append(r)
    index = {c: i for i, c in enumerate(classes)}
    per_run = []
    pooled = np.zeros((len(classes), len(classes)), dtype=np.int64) if not regression else None
    for (fold, seed), rs in runs.items():
        if regression:
            m = M.sentiment_metrics([r["true"] for r in rs], [r["pred"] for r in rs])
        else:
            m = M.classification_metrics([index[r["true"]] for r in rs], [index[r["pred"]] for r in rs], labels=classes)
            pooled += np.asarray(m["confusion"])
        per_run.append({"fold": fold, "seed": seed, **m})
    keys = REG_METRICS if regression else CLASS_METRICS
    out = {
        "task": "regression" if regression else "classification",
        "labels": classes,
        "n_runs": len(per_run),
        "n_predictions": len(rows),
    }
    for k in keys:
        s = M.summarize([r[k] for r in per_run])
        out[k] = {"mean": s["mean"], "std": s["std"]}
    if not regression:
        out["confusion"] = pooled.tolist()
        out["pooled"] = {
            k: v
            for k, v in M.classification_metrics(
                [index[r["true"]] for r in rows], [index[r["pred"]] for r in rows], labels=classes
            ).items()
            if k not in ("confusion", "labels")
        }
    out["runs"] = per_run
    return out


def compare_runs(a: dict, b: dict) -> dict:
    """Paired tests of matched (fold, seed) runs of two evaluations."""
    ra = {(r["fold"], r["seed"]): r for r in a["runs"]}
    rb = {(r["fold"], r["seed"]): r for r in b["runs"]}
    keys = sorted(set(ra) & set(rb))
    if not keys:
        raise EvaluateError(
            "the two experiments share no (fold, seed) run; compare experiments trained with the same "
            "protocol and seeds"
        )
    names = REG_METRICS[:3] if a["task"] == "regression" else CLASS_METRICS[:3]
    out = {"matched_runs": len(keys), "unmatched": len(set(ra) ^ set(rb))}
    for k in names:
        out[k] = M.paired_tests([ra[x][k] for x in keys], [rb[x][k] for x in keys])
        out[k]["mean_a"] = float(np.mean([ra[x][k] for x in keys]))
        out[k]["mean_b"] = float(np.mean([rb[x][k] for x in keys]))
    return out


# ----------------------------------------------------------------------------------- plots and report
def plot_confusion(path: Path, cm: list, classes: list[str], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(classes)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * n, 0.8 + 0.6 * n))
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    for i in range(n):
        for j in range(n):
            ax.text(
                j,
                i,
                f"{norm[i, j]:.2f}\n({int(cm[i, j])})",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(path: Path, exp: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = exp / "log.jsonl"
    if not log.exists():
        return False
    rows = [json.loads(l) for l in log.read_text().splitlines() if l.strip()]
    if not rows:
        return False
    metric = "dev_UA" if "dev_UA" in rows[0] else "dev_MAE" if "dev_MAE" in rows[0] else None
    fig, axes = plt.subplots(1, 2 if metric else 1, figsize=(10 if metric else 5, 3.5), squeeze=False)
    runs: dict = {}
    for r in rows:
        runs.setdefault((r["fold"], r["seed"]), []).append(r)
    for (fold, seed), rs in runs.items():
        ep = [r["epoch"] for r in rs]  # numbered from 0, as in log.jsonl and metrics.json
        (line,) = axes[0, 0].plot(ep, [r["train_loss"] for r in rs], lw=0.8)
        axes[0, 0].plot(ep, [r["dev_loss"] for r in rs], lw=0.8, ls="--", color=line.get_color())
        if metric:
            axes[0, 1].plot(ep, [r[metric] for r in rs], lw=0.8, color=line.get_color())
    axes[0, 0].set_title("loss (solid train, dashed dev)", fontsize=9)
    axes[0, 0].set_xlabel("epoch (from 0)")
    if metric:
        axes[0, 1].set_title(metric.replace("_", " "), fontsize=9)
        axes[0, 1].set_xlabel("epoch (from 0)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _fmt(s: dict) -> str:
    return f"{s['mean']:.4f} ± {s['std']:.4f}"


def write_report(path: Path, exp: Path, cfg: dict, metrics: dict, comparison: dict | None, has_curves: bool) -> None:
    regression = metrics["task"] == "regression"
    keys = REG_METRICS if regression else CLASS_METRICS
    settings = _settings(cfg)
    lines = [
        f"# Evaluation of `{exp}`",
        "",
        f"- model: `{settings['model']['name']}`; inputs: "
        + ", ".join(f"{m} = `{settings['data'][m]}`" for m in model_modalities(settings)),
        f"- protocol: `{settings['protocol']['name']}`, {len(set(r['fold'] for r in metrics['runs']))} fold(s) x "
        f"{len(set(r['seed'] for r in metrics['runs']))} seed(s); model selection on "
        f"{metrics.get('selected_on') or 'dev'} (never on test)",
        f"- label set: `{cfg.get('label_set', {}).get('preset')}` "
        + (f"({', '.join(metrics['labels'])})" if not regression else "(regression on scores)"),
    ]
    if metrics.get("crop_length"):
        lines.append(f"- test sequences cropped to the first {metrics['crop_length']} steps")
    lines += [
        "",
        "WA = overall accuracy; UA = mean per-class recall (sertool.metrics)."
        if not regression
        else "Acc-2/F1 with zeros (has0: negative vs non-negative) and without (non0: zero-score examples removed).",
        "",
        "## Mean ± std over runs",
        "",
        "| " + " | ".join(keys) + " |",
        "|" + "---|" * len(keys),
        "| " + " | ".join(_fmt(metrics[k]) for k in keys) + " |",
        "",
        "## Per run",
        "",
        "| fold | seed | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for r in metrics["runs"]:
        lines.append(f"| {r['fold']} | {r['seed']} | " + " | ".join(f"{r[k]:.4f}" for k in keys) + " |")
    if not regression:
        lines += [
            "",
            "## Per class (pooled over runs)",
            "",
            "| class | precision | recall | F1 | support |",
            "|---|---|---|---|---|",
        ]
        for c, v in metrics["pooled"]["per_class"].items():
            lines.append(f"| {c} | {v['precision']:.4f} | {v['recall']:.4f} | {v['f1']:.4f} | {v['support']} |")
        lines += ["", "![confusion](confusion.png)"]
    if metrics.get("dominance"):
        lines += [
            "",
            "## Modality dominance (share of mean |dL/dlogits| on the test splits; CMD Table 6)",
            "",
            "| modality | share |",
            "|---|---|",
        ]
        lines += [f"| {m} | {v['mean']:.3f} ± {v['std']:.3f} |" for m, v in metrics["dominance"].items()]
    for m, lw in (metrics.get("layer_weights") or {}).items():
        lines += [
            "",
            f"## Learned layer weights ({m}; softmax over the store's stacked layers, mean ± std over "
            f"{lw['runs']} runs)",
            "",
            "| layer | weight |",
            "|---|---|",
        ]
        lines += [f"| {i} | {mu:.3f} ± {sd:.3f} |" for i, mu, sd in zip(lw["layers"], lw["mean"], lw["std"])]
    if metrics.get("calibration"):
        c = metrics["calibration"]
        lines += [
            "",
            "## Calibration (temperature scaling fitted on each run's dev split; mean ± std over runs)",
            "",
            "| temperature | test ECE before | test ECE after |",
            "|---|---|---|",
            f"| {_fmt(c['temperature'])} | {_fmt(c['ece_before'])} | {_fmt(c['ece_after'])} |",
        ]
    if has_curves:
        lines += ["", "![curves](curves.png)"]
    if comparison:
        lines += [
            "",
            f"## Comparison with `{comparison['other']}`",
            "",
            f"{comparison['matched_runs']} matched (fold, seed) runs; paired two-tailed t-test and Wilcoxon "
            "signed-rank test.",
            "",
            "| metric | this | other | mean diff | t | p (t-test) | p (Wilcoxon) |",
            "|---|---|---|---|---|---|---|",
        ]
        for k, v in comparison.items():
            if isinstance(v, dict):
                lines.append(
                    f"| {k} | {v['mean_a']:.4f} | {v['mean_b']:.4f} | {v['mean_diff']:+.4f} | {v['t']:.3f} | "
                    f"{v['p_ttest']:.4g} | {v['p_wilcoxon']:.4g} |"
                )
    write_text(path, "\n".join(lines) + "\n")


def _flatten_attention(obj, name: str, out: list) -> None:
    if isinstance(obj, torch.Tensor):
        out.append((name, obj))
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _flatten_attention(v, f"{name}/{k}" if name else str(k), out)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _flatten_attention(v, f"{name}[{i}]", out)


def plot_attention(exp: Path, uid: str, out_dir: Path, feats=None, device: str = "auto") -> Path:
    """Attention maps (mean over heads) of one test utterance, from the first run testing it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, folds = load_experiment(exp)
    fold = next((f for f in folds if uid in f.test), None)
    if fold is None:
        raise EvaluateError(f"utterance {uid!r} is in no test split of {exp}")
    cfg, settings, _, inputs, crop = _open(exp, feats, None, only={uid})
    seeds = cfg.get("experiment", {}).get("seeds") or [0]
    rd = next(
        (
            run_dir_of(exp, fold.name, s)
            for s in seeds
            if (run_dir_of(exp, fold.name, s) / "model.safetensors").exists()
        ),
        None,
    )
    if rd is None:
        raise EvaluateError(f"fold {fold.name} has no trained model")
    norm = Normalizer.load(exp / "folds" / fold.name / "norm.safetensors")
    ds = SERDataset(inputs.sources, [uid], [inputs.target_of[uid]], norm, crop, inputs.labels.regression)
    dev = pick_device(device)
    model = build(settings).to(dev).eval()
    load_weights(model, rd / "model.safetensors")
    from sertool.data import to_device

    with torch.no_grad():
        res = model(to_device(ds.collate([0]), dev), return_attention=True)
    maps: list = []
    _flatten_attention(res[1] if isinstance(res, tuple) else {}, "", maps)
    maps = [(n, t) for n, t in maps if t.dim() in (3, 4)]
    if not maps:
        raise EvaluateError(f"model {settings['model']['name']!r} returns no attention maps")
    n = len(maps)
    cols = min(4, n)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, t) in zip(axes.flat, maps):
        a = t[0].float().cpu()
        if a.dim() == 3:
            a = a.mean(0)
        ax.axis("on")
        ax.imshow(a.numpy(), aspect="auto", cmap="viridis")
        ax.set_title(name, fontsize=8)
        ax.set_xlabel("key", fontsize=7)
        ax.set_ylabel("query", fontsize=7)
    fig.suptitle(f"{uid} ({fold.name}, {rd.name}); mean over heads", fontsize=9)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"attention-{uid}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------- the stage
def run_evaluate(
    exp: str | os.PathLike,
    feats=None,
    *,
    out_dir=None,
    compare=None,
    crop_length: int | None = None,
    attention: str | None = None,
    device: str = "auto",
    log: Callable[[str], None] = print,
) -> dict:
    """Evaluate EXP into ``out_dir`` (EXP/eval, or EXP/eval-crop<L> with ``crop_length``)."""
    exp = Path(exp)
    if crop_length is not None and crop_length < 1:
        raise EvaluateError(f"--crop-length must be >= 1, got {crop_length}")
    out = Path(out_dir) if out_dir else exp / ("eval" if not crop_length else f"eval-crop{crop_length}")
    cfg, _ = load_experiment(exp)
    metrics, rows = evaluate_experiment(exp, feats, crop_length=crop_length, device=device, log=log)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "predictions.csv", rows)
    comparison = None
    if compare:
        other = Path(compare)
        other_metrics_path = other / "eval" / "metrics.json"
        if crop_length or not other_metrics_path.exists():
            other_metrics, _ = evaluate_experiment(
                other, feats, crop_length=crop_length, device=device, log=lambda s: None
            )
        else:
            other_metrics = json.loads(other_metrics_path.read_text())
        if other_metrics["task"] != metrics["task"]:
            raise EvaluateError(f"cannot compare a {metrics['task']} experiment with a {other_metrics['task']} one")
        comparison = {"other": str(other), **compare_runs(metrics, other_metrics)}
        metrics["compare"] = comparison
    if metrics["task"] != "regression":
        plot_confusion(
            out / "confusion.png",
            metrics["confusion"],
            metrics["labels"],
            f"{cfg['model']['name']}: summed over {metrics['n_runs']} run(s), row-normalised",
        )
    has_curves = plot_curves(out / "curves.png", exp)
    write_json(out / "metrics.json", metrics)
    write_report(out / "report.md", exp, cfg, metrics, comparison, has_curves)
    if attention:
        path = plot_attention(exp, attention, out, feats, device)
        metrics["attention_plot"] = str(path)
        log(f"attention maps: {path}")
    return metrics
