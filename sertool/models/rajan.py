"""Self-attention and cross-attention models of Rajan, Brutti, Cavallaro.

"Is Cross-Attention Preferable to Self-Attention for Multi-Modal Emotion Recognition?"
ICASSP 2022.  Keys ``self_attn`` and ``cross_attn``.

Per modality (audio, text, optional visual): a Conv1d layer for local feature extraction, one
bidirectional GRU (60 hidden -> 120), then 6-head multi-head attention:

* ``self_attn``: each modality attends to itself (Q = K = V = that modality);
* ``cross_attn``: for every ordered pair (target, source) of modalities, the target provides the
  queries and the source the keys/values (6 attention blocks for three modalities).

Each attention output is averaged over time (real frames), the resulting vectors are pooled by
statistics pooling *across modality vectors* (mean and std), then FC 60 (ReLU, dropout 0.1)
and FC C.  Uni-, bi- and tri-modal inputs are supported (cross-attention needs >= 2 modalities).

Convolution variants (``conv``):

* ``time`` (default; the released code): a kernel-1 Conv1d whose *channels are the time steps*
  of a fixed-length input (followed by ReLU here), i.e. a learned mixing across time: audio
  1000 -> 500 frames, visual
  32 -> 25, no convolution on text; inputs are zero-padded / truncated to the fixed lengths
  1000 / 128 / 32.  It is the default because it is the only fully specified variant (the paper
  gives no conv hyper-parameters) and it reproduces the reference parameter counts: tri-modal,
  7 classes, audio 120-d, text 300-d, visual 2048-d -> 1,645,892 (self) and 1,820,132 (cross).
  Padding is zeroed before the mixing, so batch padding never changes an item's output.
* ``local``: a temporal Conv1d (kernel ``local_kernel``, ``local_channels`` outputs, default =
  input dim) + ReLU over real frames, accepting any length; this is what the paper's text
  ("convolutional layers for local feature extraction") describes.

Departures: the reference code names the two statistics the other way round (std / mean); here
they are ``[mean, std]`` (population std, so one vector gives std 0).  The paper does not state
the training settings; the config uses the released code's (Adam 1e-3 ... see conf).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import (
    MultiHeadAttention,
    masked_mean,
    stacked_layer_weights,
    statistics_pooling,
    zero_padding,
)
from .encoders import ConvStack, RNNEncoder
from .registry import SERModel, _check_modalities, register


class _TimeMixConv(nn.Module):
    """Kernel-1 Conv1d with the (fixed) time axis as channels: ``[B, L, D] -> [B, L_out, D]``."""

    def __init__(self, length: int, out_length: int):
        super().__init__()
        self.length = length
        self.conv = nn.Conv1d(length, out_length, kernel_size=1)

    def forward(self, x, mask):
        x = zero_padding(x, mask)
        T = x.shape[1]
        if T >= self.length:
            x = x[:, : self.length]
        else:
            x = F.pad(x, (0, 0, 0, self.length - T))
        y = F.relu(self.conv(x))
        return y, torch.ones(y.shape[:2], dtype=torch.bool, device=y.device)


class _RajanBase(SERModel):
    cross: bool = False

    def __init__(
        self,
        *,
        modalities,
        audio_dim: int,
        text_dim: int,
        visual_dim: int,
        audio_layers: int,
        text_layers: int,
        visual_layers: int,
        n_classes: int,
        task: str,
        conv: str,
        conv_modalities,
        fixed_len,
        time_conv_out,
        local_kernel: int,
        local_channels,
        gru_hidden: int,
        num_heads: int,
        fc_hidden: int,
        dropout: float,
        attn_dropout: float,
    ):
        super().__init__()
        self.layer_weights = stacked_layer_weights(
            {"audio": audio_layers, "text": text_layers, "visual": visual_layers}
        )
        self.modalities = _check_modalities(modalities)
        if self.cross and len(self.modalities) < 2:
            raise ValueError("cross_attn needs at least two modalities (use self_attn for one)")
        if conv not in ("time", "local"):
            raise ValueError(f"model.conv must be time|local, got {conv!r}")
        if task not in ("regression", "classification"):
            raise ValueError(f"model.task must be regression|classification, got {task!r}")
        local_channels = local_channels or {}
        dims = {"audio": audio_dim, "text": text_dim, "visual": visual_dim}
        self.conv_mode = conv
        self.fixed_len = dict(fixed_len)
        self.convs = nn.ModuleDict()
        self.grus = nn.ModuleDict()
        for m in self.modalities:
            d = dims[m]
            if m in conv_modalities:
                if conv == "time":
                    if not time_conv_out.get(m):
                        raise ValueError(f"model.time_conv_out.{m} must be set for conv=time")
                    self.convs[m] = _TimeMixConv(fixed_len[m], time_conv_out[m])
                else:
                    ch = local_channels.get(m) or d
                    self.convs[m] = ConvStack(d, [[ch, local_kernel, 1]])
                    d = ch
            self.grus[m] = RNNEncoder(d, gru_hidden, cell="gru", dropout=dropout)
        D = 2 * gru_hidden
        if self.cross:
            self.pairs = [(t, s) for t in self.modalities for s in self.modalities if t != s]
        else:
            self.pairs = [(m, m) for m in self.modalities]
        self.attn = nn.ModuleDict(
            {f"{t}_{s}": MultiHeadAttention(D, num_heads, dropout=attn_dropout) for t, s in self.pairs}
        )
        self.fc = nn.Linear(2 * D, fc_hidden)
        self.dropout = dropout
        self.out = nn.Linear(fc_hidden, 1 if task == "regression" else n_classes)

    def encode(self, batch):
        hs, ms = {}, {}
        for m in self.modalities:
            x, mask = self._inputs(batch, m)
            if self.conv_mode == "time" and m not in self.convs and x.shape[1] > self.fixed_len[m]:
                x, mask = x[:, : self.fixed_len[m]], mask[:, : self.fixed_len[m]]
            if m in self.convs:
                x, mask = self.convs[m](x, mask)
            hs[m], ms[m] = self.grus[m](x, mask)
        return hs, ms

    def forward(self, batch: dict, return_attention: bool = False):
        hs, ms = self.encode(batch)
        vecs, attn = [], {}
        for t, s in self.pairs:
            res = self.attn[f"{t}_{s}"](
                hs[t], hs[s], hs[s], query_mask=ms[t], key_mask=ms[s], return_attention=return_attention
            )
            if return_attention:
                a, attn[f"{t}<-{s}"] = res
            else:
                a = res
            vecs.append(masked_mean(a, ms[t]))
        z = statistics_pooling(torch.stack(vecs, dim=1))  # mean, std across modality vectors
        z = F.dropout(F.relu(self.fc(z)), self.dropout, self.training)
        out = self.out(z)
        return (out, attn) if return_attention else out


@register("self_attn")
class RajanSelfAttention(_RajanBase):
    cross = False


@register("cross_attn")
class RajanCrossAttention(_RajanBase):
    cross = True
