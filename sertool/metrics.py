"""Metrics, defined once: classification (WA, UA, F1s, confusion), CMU-MOSEI sentiment, statistics.

Definitions (the literature is inconsistent; these are the ones sertool reports):

* **WA** (weighted accuracy) = overall accuracy = correct / total.  Each class weighs by its
  number of examples, hence "weighted".
* **UA** (unweighted accuracy) = mean of the per-class recalls over the classes present in the
  reference labels (= scikit-learn's ``balanced_accuracy_score``).  Every class weighs the same.
  Several public codebases swap the two names; sertool never does.
* **macro-F1** = unweighted mean of per-class F1; **weighted-F1** = per-class F1 weighted by the
  class support.  Both average over the classes that occur in the reference or in the
  predictions (scikit-learn's default ``labels=None`` behaviour); a class with no true and no
  predicted example does not count.  Precision/recall/F1 of 0/0 are 0.
* **confusion[i][j]** = number of examples of true class i predicted as class j.

CMU-MOSEI / MOSI sentiment (scores in [-3, 3]), as in MulT / MMSA / LGCCT tables:

* **MAE**, **corr** (Pearson r);
* **acc7**: round(clip(score, -3, 3)) equal; **acc5**: round(clip(score, -2, 2)) equal;
* **acc2_has0** / **f1_has0**: negative (< 0) vs non-negative (>= 0) over all examples
  (MMSA "Has0"); **acc2_non0** / **f1_non0**: negative vs positive over examples whose true score
  is not 0 (MulT "Non0", the convention of most tables).  F1 is the weighted F1 of the two classes.

Statistics: ``paired_tests(a, b)`` returns the paired two-tailed t-test (the test of Rajan et al.)
and the Wilcoxon signed-rank test over matched runs (folds x seeds).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

__all__ = [
    "confusion_matrix",
    "classification_metrics",
    "sentiment_metrics",
    "summarize",
    "paired_tests",
]


def _as_int_array(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {a.shape}")
    if a.size and not np.issubdtype(a.dtype, np.integer):
        if np.issubdtype(a.dtype, np.floating) and np.all(a == np.round(a)):
            a = a.astype(np.int64)
        else:
            raise ValueError(f"{name} must hold class indices (integers), got dtype {a.dtype}")
    return a.astype(np.int64)


def confusion_matrix(y_true, y_pred, n_classes: int) -> np.ndarray:
    """``[n_classes, n_classes]`` counts: row = true class, column = predicted class."""
    t, p = _as_int_array(y_true, "y_true"), _as_int_array(y_pred, "y_pred")
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length ({t.size} vs {p.size})")
    for name, a in (("y_true", t), ("y_pred", p)):
        if a.size and (a.min() < 0 or a.max() >= n_classes):
            raise ValueError(f"{name} has class indices outside 0..{n_classes - 1}")
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (t, p), 1)
    return cm


def _safe_div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    out = np.zeros(np.broadcast(a, b).shape)
    np.divide(a, b, out=out, where=b != 0)
    return out


def classification_metrics(y_true, y_pred, n_classes: int | None = None, labels: Sequence[str] | None = None) -> dict:
    """WA, UA, macro/weighted F1, per-class precision/recall/F1/support and the confusion matrix.

    ``y_true``/``y_pred`` are class indices; ``labels`` (names, in index order) set the number
    of classes and name the per-class entries.
    """
    if labels is not None:
        n_classes = len(labels)
    t, p = _as_int_array(y_true, "y_true"), _as_int_array(y_pred, "y_pred")
    if n_classes is None:
        n_classes = int(max(t.max(initial=-1), p.max(initial=-1)) + 1)
    if t.size == 0:
        raise ValueError("no examples to score")
    names = list(labels) if labels is not None else [str(i) for i in range(n_classes)]
    cm = confusion_matrix(t, p, n_classes)
    support = cm.sum(1)
    predicted = cm.sum(0)
    tp = np.diag(cm)
    precision = _safe_div(tp, predicted)
    recall = _safe_div(tp, support)
    f1 = _safe_div(2 * precision * recall, precision + recall)
    present = support > 0
    counted = present | (predicted > 0)
    wa = float(tp.sum() / t.size)
    ua = float(recall[present].mean())
    macro_f1 = float(f1[counted].mean())
    weighted_f1 = float((f1 * support).sum() / support.sum())
    return {
        "WA": wa,
        "UA": ua,
        "macro_f1": macro_f1,
        "weighted_f1": weighted_f1,
        "n": int(t.size),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(names)
        },
        "confusion": cm.tolist(),
        "labels": names,
    }


def _binary_f1_weighted(t: np.ndarray, p: np.ndarray) -> float:
    """Weighted F1 of a two-class problem given boolean arrays (True = positive class)."""
    if t.size == 0:
        return float("nan")
    m = classification_metrics(t.astype(np.int64), p.astype(np.int64), n_classes=2)
    return m["weighted_f1"]


def sentiment_metrics(y_true, y_pred) -> dict:
    """CMU-MOSEI/MOSI metrics of continuous sentiment scores; see the module docstring."""
    t = np.asarray(y_true, dtype=np.float64).reshape(-1)
    p = np.asarray(y_pred, dtype=np.float64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"y_true and y_pred differ in length ({t.size} vs {p.size})")
    if t.size == 0:
        raise ValueError("no examples to score")
    if not (np.isfinite(t).all() and np.isfinite(p).all()):
        raise ValueError("scores contain NaN or infinite values")
    mae = float(np.abs(t - p).mean())
    if t.std() == 0 or p.std() == 0:
        corr = float("nan")
    else:
        corr = float(np.corrcoef(t, p)[0, 1])
    acc7 = float((np.round(np.clip(t, -3, 3)) == np.round(np.clip(p, -3, 3))).mean())
    acc5 = float((np.round(np.clip(t, -2, 2)) == np.round(np.clip(p, -2, 2))).mean())
    has0_t, has0_p = t >= 0, p >= 0
    non0 = t != 0
    non0_t, non0_p = t[non0] > 0, p[non0] > 0
    return {
        "MAE": mae,
        "corr": corr,
        "acc7": acc7,
        "acc5": acc5,
        "acc2_has0": float((has0_t == has0_p).mean()),
        "f1_has0": _binary_f1_weighted(has0_t, has0_p),
        "acc2_non0": float((non0_t == non0_p).mean()) if non0.any() else float("nan"),
        "f1_non0": _binary_f1_weighted(non0_t, non0_p),
        "n": int(t.size),
        "n_non0": int(non0.sum()),
    }


def summarize(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (ddof=1; 0 for a single value), min, max and count."""
    v = np.asarray(
        [x for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))], dtype=np.float64
    )
    if v.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    return {
        "mean": float(v.mean()),
        "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
        "min": float(v.min()),
        "max": float(v.max()),
        "n": int(v.size),
    }


def paired_tests(a: Sequence[float], b: Sequence[float]) -> dict:
    """Paired two-tailed t-test and Wilcoxon signed-rank test of matched scores a[i] vs b[i].

    Returns ``{"n", "mean_diff", "t", "p_ttest", "w", "p_wilcoxon"}`` (mean_diff = mean(a - b)).
    With identical inputs both p-values are 1; with fewer than 2 pairs they are NaN.
    """
    from scipy import stats

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if x.shape != y.shape:
        raise ValueError(f"paired tests need matched runs: {x.size} vs {y.size} values")
    d = x - y
    out = {"n": int(x.size), "mean_diff": float(d.mean()) if d.size else float("nan")}
    if x.size < 2:
        return {**out, "t": float("nan"), "p_ttest": float("nan"), "w": float("nan"), "p_wilcoxon": float("nan")}
    if np.allclose(d, 0):
        return {**out, "t": 0.0, "p_ttest": 1.0, "w": 0.0, "p_wilcoxon": 1.0}
    if np.allclose(d, d[0]):  # constant non-zero difference: t is infinite, p -> 0
        t_stat, p_t = math.copysign(math.inf, d[0]), 0.0
    else:
        res = stats.ttest_rel(x, y)
        t_stat, p_t = float(res.statistic), float(res.pvalue)
    res_w = stats.wilcoxon(x, y, zero_method="wilcox", alternative="two-sided")
    return {**out, "t": t_stat, "p_ttest": p_t, "w": float(res_w.statistic), "p_wilcoxon": float(res_w.pvalue)}
