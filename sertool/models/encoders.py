"""Sequence encoders: mask-aware Conv1d stacks and bidirectional LSTM/GRU, and their combination
(CNN-BiLSTM of LGCCT, Conv1d+BiGRU of Rajan et al., the CMA audio feature encoder).

Padding never leaks into real frames: inputs are zeroed at padded frames before every
convolution (so a real frame next to the end sees the same zeros as the convolution's own
padding), the output mask follows the convolution arithmetic, and recurrent layers see each
item's real frames only (``blocks.rnn_over_real_frames``: the outputs of a packed sequence, without
packing's slow backward on CPU).  BatchNorm (CMA encoder) uses batch statistics in training mode, where padded frames
are included in the statistics; in eval mode it is exact.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn

from .blocks import rnn_over_real_frames, zero_padding

__all__ = ["ConvStack", "RNNEncoder", "ConvRNNEncoder", "conv_output_mask"]


def conv_output_mask(mask: torch.Tensor, kernel: int, stride: int, padding: int, out_len: int) -> torch.Tensor:
    """Mask of the conv output: frame j is real if it is a valid output for the real length."""
    lengths = mask.long().sum(1)
    out_lengths = torch.div(lengths + 2 * padding - kernel, stride, rounding_mode="floor") + 1
    out_lengths = out_lengths.clamp_min(0)
    return torch.arange(out_len, device=mask.device)[None, :] < out_lengths[:, None]


class ConvStack(nn.Module):
    """Conv1d layers over time on ``[B, T, D]`` sequences (+ optional BatchNorm, activation).

    ``layers``: list of ``[out_channels, kernel, stride]``; padding = kernel // 2 (``pad=True``) or
    none (``pad=False``, e.g. a wav2vec2-style waveform stem).
    """

    def __init__(
        self,
        in_dim: int,
        layers: Sequence[Sequence[int]],
        batch_norm: bool = False,
        activation: str = "relu",
        dropout: float = 0.0,
        pad: bool = True,
    ):
        super().__init__()
        self.specs = []
        mods = []
        d = in_dim
        for spec in layers:
            out, k, s = (list(spec) + [1])[:3] if len(spec) == 2 else spec
            p = k // 2 if pad else 0
            block = [nn.Conv1d(d, out, k, stride=s, padding=p)]
            if batch_norm:
                block.append(nn.BatchNorm1d(out))
            if activation == "relu":
                block.append(nn.ReLU())
            elif activation not in ("none", None):
                raise ValueError(f"unknown activation {activation!r}")
            mods.append(nn.Sequential(*block))
            self.specs.append((k, s, p))
            d = out
        self.convs = nn.ModuleList(mods)
        self.out_dim = d
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        for conv, (k, s, p) in zip(self.convs, self.specs):
            x = zero_padding(x, mask).transpose(1, 2)
            x = conv(x).transpose(1, 2)
            if mask is not None:
                mask = conv_output_mask(mask, k, s, p, x.shape[1])
        x = zero_padding(self.dropout(x), mask)
        return x, mask


class RNNEncoder(nn.Module):
    """(Bi)LSTM / (Bi)GRU over real frames only (the outputs of a packed sequence); outputs zeros
    at padded frames."""

    def __init__(
        self,
        in_dim: int,
        hidden: int,
        cell: str = "lstm",
        num_layers: int = 1,
        bidirectional: bool = True,
        dropout: float = 0.0,
        inter_dropout: float = 0.0,
    ):
        super().__init__()
        rnn = {"lstm": nn.LSTM, "gru": nn.GRU}[cell]
        self.rnn = rnn(
            in_dim,
            hidden,
            num_layers=num_layers,
            bidirectional=bidirectional,
            batch_first=True,
            dropout=inter_dropout if num_layers > 1 else 0.0,
        )
        self.out_dim = hidden * (2 if bidirectional else 1)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None):
        return zero_padding(self.dropout(rnn_over_real_frames(self.rnn, x, mask)), mask), mask


class ConvRNNEncoder(nn.Module):
    """Conv1d stack followed by a bidirectional RNN (LGCCT CNN-BiLSTM, CMA audio encoder)."""

    def __init__(
        self,
        in_dim: int,
        conv_layers: Sequence[Sequence[int]],
        hidden: int,
        cell: str = "lstm",
        batch_norm: bool = False,
        dropout: float = 0.0,
        num_layers: int = 1,
    ):
        super().__init__()
        self.conv = ConvStack(in_dim, conv_layers, batch_norm=batch_norm)
        self.rnn = RNNEncoder(self.conv.out_dim, hidden, cell=cell, num_layers=num_layers, dropout=dropout)
        self.out_dim = self.rnn.out_dim

    def forward(self, x, mask=None):
        x, mask = self.conv(x, mask)
        return self.rnn(x, mask)
