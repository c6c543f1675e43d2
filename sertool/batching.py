"""Batching by a frame (or sample) budget instead of a fixed utterance count.

CMD (Kim & Kang 2022) batches by accumulated audio samples (320,000 / 640,000 / 1,280,000 at
16 kHz), so a batch of short utterances holds many of them and a batch of long ones few.

    batches = budget_batches(lengths, 320_000, shuffle=True, seed=0, epoch=3)

Invariants (tested):

* every utterance is in exactly one batch per epoch;
* no batch is over budget: ``batch_cost(lengths, batch) <= budget``, where the cost is
  ``longest x count`` (``measure="padded"``, the memory a padded batch really takes; default) or
  the plain sum (``measure="sum"``, the paper's "accumulated samples").  ``padded`` >= ``sum``,
  so a padded-budget batch is within the summed budget too;
* an utterance longer than the budget forms a batch of its own and is counted as ``budget``
  long: the caller crops it to ``budget`` (``crop_lengths``); with ``crop=False`` it is an error.

Within chunks of ``sort_chunk`` budgets' worth of utterances, items are sorted by length so that
batches have little padding; the chunks and the order of the batches are random per epoch
(``shuffle``), reproducibly from ``(seed, epoch)``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["budget_batches", "batch_cost", "crop_lengths"]


def crop_lengths(lengths, budget: int) -> np.ndarray:
    """Lengths as the batcher counts them: an item longer than ``budget`` is cropped to it."""
    return np.minimum(np.asarray(lengths, dtype=np.int64), int(budget))


def batch_cost(lengths, batch, measure: str = "padded") -> int:
    lens = np.asarray(lengths, dtype=np.int64)[np.asarray(batch, dtype=np.int64)]
    if len(lens) == 0:
        return 0
    return int(lens.max() * len(lens)) if measure == "padded" else int(lens.sum())


def budget_batches(
    lengths,
    budget: int,
    *,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    measure: str = "padded",
    crop: bool = True,
    sort: bool = True,
    sort_chunk: int = 50,
    max_items: int | None = None,
) -> list[np.ndarray]:
    """Index batches whose cost (see module docstring) is at most ``budget``."""
    if measure not in ("padded", "sum"):
        raise ValueError(f"measure must be padded or sum, got {measure!r}")
    budget = int(budget)
    if budget <= 0:
        raise ValueError(f"the batch budget must be > 0, got {budget}")
    lens = np.asarray(lengths, dtype=np.int64)
    if lens.ndim != 1:
        raise ValueError("lengths must be one-dimensional")
    if (lens <= 0).any():
        raise ValueError(f"{int((lens <= 0).sum())} item(s) have no frames")
    if not crop and (lens > budget).any():
        i = int(np.argmax(lens > budget))
        raise ValueError(f"item {i} is {int(lens[i])} long, over the batch budget {budget}")
    lens = crop_lengths(lens, budget)
    n = len(lens)
    rng = np.random.default_rng([int(seed), int(epoch)]) if shuffle else None
    order = rng.permutation(n) if shuffle else np.arange(n)
    if sort and n:
        # chunks of about `sort_chunk` budgets' worth of items, each sorted by length
        per_chunk = max(1, int(sort_chunk * budget // max(1, int(np.median(lens)))))
        parts = [order[c : c + per_chunk] for c in range(0, n, per_chunk)]
        order = np.concatenate([p[np.argsort(lens[p], kind="stable")] for p in parts])
    batches: list[np.ndarray] = []
    cur: list[int] = []
    longest = total = 0
    for i in order:
        L = int(lens[i])
        new_cost = max(longest, L) * (len(cur) + 1) if measure == "padded" else total + L
        if cur and (new_cost > budget or (max_items is not None and len(cur) >= max_items)):
            batches.append(np.asarray(cur, dtype=np.int64))
            cur, longest, total = [], 0, 0
        cur.append(int(i))
        longest, total = max(longest, L), total + L
    if cur:
        batches.append(np.asarray(cur, dtype=np.int64))
    if shuffle:
        batches = [batches[k] for k in rng.permutation(len(batches))]
    return batches
