"""Temperature scaling (Guo et al., "On calibration of modern neural networks", ICML 2017).

A classifier's probabilities ``softmax(z)`` are replaced by ``softmax(z / T)``, one scalar ``T > 0``
fitted by minimising the negative log-likelihood on held-out data. It never changes the arg-max
(so WA/UA are untouched), only how confident the probabilities are. The train stage fits ``T`` on
each run's dev split (never on test) and reports the expected calibration error (ECE) of the test
predictions before and after; the deployed model carries the median ``T`` of its runs
(predictor.json ``temperature``), which ``sertool predict`` applies.

Only probabilities are needed: ``log p`` differs from the logits by a constant per row, which the
softmax ignores at any temperature, so ``softmax(log p / T)`` is the temperature-scaled output.
"""

from __future__ import annotations

import numpy as np

ECE_BINS = 15  # Guo et al.'s choice; equal-width confidence bins


def scaled(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """``softmax(log p / T)`` row by row (float64)."""
    logp = np.log(np.clip(np.asarray(probabilities, dtype=np.float64), 1e-12, 1.0)) / float(temperature)
    logp -= logp.max(axis=1, keepdims=True)
    e = np.exp(logp)
    return e / e.sum(axis=1, keepdims=True)


def nll(probabilities: np.ndarray, targets: np.ndarray) -> float:
    p = np.asarray(probabilities, dtype=np.float64)[np.arange(len(targets)), np.asarray(targets, dtype=int)]
    return float(-np.mean(np.log(np.clip(p, 1e-12, 1.0))))


def fit_temperature(
    probabilities: np.ndarray, targets: np.ndarray, bounds: tuple[float, float] = (0.05, 20.0)
) -> float:
    """The ``T`` in ``bounds`` minimising the NLL of ``softmax(log p / T)`` on (probabilities, targets):
    a one-dimensional problem in ``log T`` with one minimum, solved by golden-section search to
    1e-6 in ``log T`` (by hand: importing scipy.optimize alone costs every training run 0.4 s)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    targets = np.asarray(targets, dtype=int)
    if len(targets) == 0:
        return 1.0
    loss = lambda log_t: nll(scaled(probabilities, np.exp(log_t)), targets)  # noqa: E731
    lo, hi = np.log(bounds[0]), np.log(bounds[1])
    ratio = (np.sqrt(5.0) - 1.0) / 2.0
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = loss(a), loss(b)
    while hi - lo > 1e-6:
        if fa <= fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = loss(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = loss(b)
    return float(np.exp((lo + hi) / 2.0))


def expected_calibration_error(probabilities: np.ndarray, targets: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE: over equal-width bins of the top probability, the gap between mean confidence and
    accuracy, weighted by the share of predictions in the bin."""
    p = np.asarray(probabilities, dtype=np.float64)
    if len(p) == 0:
        return float("nan")
    confidence = p.max(axis=1)
    correct = p.argmax(axis=1) == np.asarray(targets, dtype=int)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        inside = which == b
        if inside.any():
            ece += inside.mean() * abs(confidence[inside].mean() - correct[inside].mean())
    return float(ece)
