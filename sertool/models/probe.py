"""Probe: statistics pooling (mean + std over real frames) of one feature store + a linear
classifier.  A cheap baseline for comparing feature sets (not a published system).

``hidden: H`` (default 0 = linear) puts one hidden layer of H ReLU units (dropout after it)
between the pooled statistics and the classes: the MLP probe, the usual next step up from a
linear probe on frozen features.

``layers: L`` > 1 (set by the train stage from a stacked-layer store, e.g. ``bert``/``whisper``
with ``layer=all``; ``input_dim`` is then one layer's width): the frames are first the learned
softmax-weighted sum of the L layers (SUPERB; blocks.LayerWeights, weights start equal), then
pooled.  ``layers: 1`` is a plain store and the same model as before."""

from __future__ import annotations

import torch.nn as nn

from .blocks import frame_moments, pooled_statistics, stacked_layer_weights, statistics_pooling
from .registry import MODALITIES, SERModel, register


@register("probe")
class Probe(SERModel):
    def __init__(
        self, *, modality: str, input_dim: int, layers: int, n_classes: int, task: str, dropout: float, hidden: int
    ):
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"model.modality must be one of {MODALITIES}, got {modality!r}")
        if task not in ("regression", "classification"):
            raise ValueError(f"model.task must be regression|classification, got {task!r}")
        self.modalities = (modality,)
        if int(hidden) < 0:
            raise ValueError(f"model.hidden must be >= 0 (0 = linear probe), got {hidden!r}")
        if int(layers) < 1:
            raise ValueError(f"model.layers must be >= 1 (1 = a plain store), got {layers!r}")
        self.layer_weights = stacked_layer_weights({modality: int(layers)})
        self.dropout = nn.Dropout(dropout)
        out_dim = 1 if task == "regression" else n_classes
        self.hidden = (
            nn.Sequential(nn.Linear(2 * input_dim, int(hidden)), nn.ReLU(), nn.Dropout(dropout))
            if int(hidden)
            else None
        )
        self.linear = nn.Linear(int(hidden) or 2 * input_dim, out_dim)

    def frozen_inputs(self, batch: dict) -> dict:
        """The batch with its frames replaced by their moments (blocks.frame_moments): the part of
        the forward pass without trained weights, computed once for a batch used many times
        (full-batch L-BFGS); the forward pass then gives the same outputs without the frames."""
        m = self.modalities[0]
        layers = len(self.layer_weights[m].logits) if m in self.layer_weights else 1
        moments = frame_moments(batch[m], batch.get(f"{m}_mask"), layers)
        rest = {k: v for k, v in batch.items() if not k.startswith(m)}
        if m not in self.layer_weights:  # nothing trained before the pooling: the pooled statistics themselves
            return rest | {f"{m}_pooled": pooled_statistics(*moments)}
        return rest | {f"{m}_moments": moments}

    def forward(self, batch: dict, return_attention: bool = False):
        m = self.modalities[0]
        if f"{m}_pooled" in batch:
            pooled = batch[f"{m}_pooled"]
        elif f"{m}_moments" in batch:
            weights = self.layer_weights[m].weights() if m in self.layer_weights else None
            pooled = pooled_statistics(*batch[f"{m}_moments"], weights)
        else:
            x, mask = self._inputs(batch, m)
            pooled = statistics_pooling(x, mask)
        pooled = self.dropout(pooled)
        out = self.linear(pooled if self.hidden is None else self.hidden(pooled))
        return (out, {}) if return_attention else out
