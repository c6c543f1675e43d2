"""Linear probe: statistics pooling (mean + std over real frames) of one feature store + a linear
classifier.  A cheap baseline for comparing feature sets (not a published system)."""
from __future__ import annotations

import torch.nn as nn

from .blocks import statistics_pooling
from .registry import MODALITIES, SERModel, register


@register("probe")
class Probe(SERModel):
    def __init__(self, modality: str = "audio", input_dim: int = 768, n_classes: int = 4,
                 task: str = "classification", dropout: float = 0.0):
        super().__init__()
        if modality not in MODALITIES:
            raise ValueError(f"model.modality must be one of {MODALITIES}, got {modality!r}")
        if task not in ("regression", "classification"):
            raise ValueError(f"model.task must be regression|classification, got {task!r}")
        self.modalities = (modality,)
        self.dropout = nn.Dropout(dropout)
        self.linear = nn.Linear(2 * input_dim, 1 if task == "regression" else n_classes)

    def forward(self, batch: dict, return_attention: bool = False):
        x, mask = self._inputs(batch, self.modalities[0])
        out = self.linear(self.dropout(statistics_pooling(x, mask)))
        return (out, {}) if return_attention else out
