"""Shared building blocks: multi-head attention, transformer layers/stacks, CCAB, LGCCT gate,
statistics pooling, masked pooling helpers and learned layer weights over a stacked-layer store.

All sequence tensors are ``[B, T, D]`` with a bool mask ``[B, T]`` (True = real frame).
Every block keeps padded positions from influencing real ones (attention masks keys; pooling
uses only real frames), so appending padding to an item never changes its outputs.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .attention import attention

__all__ = [
    "MultiHeadAttention",
    "TransformerLayer",
    "TransformerStack",
    "CCAB",
    "CCABStack",
    "GatedFusion",
    "LayerWeights",
    "stacked_layer_weights",
    "sinusoidal_positions",
    "masked_mean",
    "statistics_pooling",
    "frame_moments",
    "pooled_statistics",
    "last_real",
    "zero_padding",
    "rnn_over_real_frames",
]


# ----------------------------------------------------------------------------- helpers
def zero_padding(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Set padded frames to zero (x ``[B, T, D]``)."""
    if mask is None:
        return x
    return x * mask[..., None].to(x.dtype)


def masked_mean(x: torch.Tensor, mask: Optional[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Mean of ``x [B, T, D]`` over real frames only."""
    if mask is None:
        return x.mean(dim)
    m = mask[..., None].to(x.dtype)
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1.0)


def statistics_pooling(
    x: torch.Tensor, mask: Optional[torch.Tensor] = None, unbiased: bool = False, eps: float = 1e-8
) -> torch.Tensor:
    """Concatenate mean and standard deviation over real frames: ``[B, T, D] -> [B, 2D]``.

    ``unbiased=False`` (population std) so that a single real frame gives std 0, not NaN.
    ``eps`` is added under the square root to keep the gradient finite at zero variance.
    """
    if mask is None:
        mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
    m = mask[..., None].to(x.dtype)
    n = m.sum(1).clamp_min(1.0)
    mean = (x * m).sum(1) / n
    sq = (((x - mean[:, None, :]) ** 2) * m).sum(1)
    denom = (n - 1).clamp_min(1.0) if unbiased else n
    std = torch.sqrt(sq / denom + eps)
    return torch.cat([mean, std], dim=-1)


def frame_moments(x: torch.Tensor, mask: Optional[torch.Tensor], layers: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-utterance moments of ``layers`` stacked layers over real frames, in float64: the mean
    ``[B, L, D]`` and the second moments of every pair of layers ``[B, L, L, D]``.  From them
    :func:`pooled_statistics` gives, for any layer weights, the statistics pooling of the weighted
    frames without reading the frames again."""
    B, T = x.shape[:2]
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=x.device)
    m = mask[..., None, None].double()
    frames = x.double().reshape(B, T, layers, -1) * m
    n = m.sum(1).clamp_min(1.0)  # [B, 1, 1]
    return frames.sum(1) / n, torch.einsum("btld,btmd->blmd", frames, frames) / n[..., None]


def pooled_statistics(
    mean: torch.Tensor, second: torch.Tensor, weights: Optional[torch.Tensor] = None, eps: float = 1e-8
) -> torch.Tensor:
    """``statistics_pooling`` of the frames ``sum_l weights_l x_l`` from their :func:`frame_moments`
    (one layer: ``weights`` None): ``[B, 2D]`` float32, mean and population std (+ eps under the root)."""
    B, L, D = mean.shape
    if weights is None and L == 1:
        mu, sq = mean[:, 0], second[:, 0, 0]
    else:
        w = torch.ones(L, dtype=mean.dtype, device=mean.device) if weights is None else weights.double()
        mu = (w[None, :, None] * mean).sum(1)
        # one [1, L*L] x [L*L, B*D] product: einsum's "blmd,l,m->bd" path is ~5x slower on CPU
        flat = second.reshape(B, L * L, D).transpose(0, 1).reshape(L * L, B * D)
        sq = (torch.outer(w, w).reshape(1, L * L) @ flat).reshape(B, D)
    var = (sq - mu**2).clamp_min(0.0)
    return torch.cat([mu, torch.sqrt(var + eps)], dim=-1).float()


def last_real(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """The last real frame of each item: ``[B, T, D] -> [B, D]``."""
    if mask is None:
        return x[:, -1]
    idx = (mask.long().sum(1) - 1).clamp_min(0)
    return x[torch.arange(x.shape[0], device=x.device), idx]


def _reverse_real_frames(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Each item's real prefix ``x[b, :L_b]`` in reverse time order, padding left in place (the
    permutation is its own inverse)."""
    t = torch.arange(x.shape[1], device=x.device)[None, :]
    index = torch.where(t < lengths[:, None], lengths[:, None] - 1 - t, t)
    return x.gather(1, index[..., None].expand_as(x))


def rnn_over_real_frames(rnn: nn.RNNBase, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Outputs ``[B, T, dirs * H]`` of a batch-first ``nn.GRU`` / ``nn.LSTM`` over each item's real
    frames (a prefix of ``mask``), equal at real frames to running it on a packed sequence.

    Why not ``pack_padded_sequence``: on CPU the backward of a packed RNN slices the batch at every
    step (autograd ``SliceBackward``: a zero fill and an add of the whole input per step), 88 % of a
    Rajan training step.  Here the forward direction runs unpacked (padding after an item's real
    frames never reaches them), and the backward direction runs unpacked on each item's real frames
    reversed in place, so that for it too the padding comes after the real frames.
    """
    if mask is None or not rnn.bidirectional or bool(mask.all()):
        return _packed_layout(rnn(x)[0])
    if rnn.proj_size or not rnn.batch_first:
        raise ValueError("rnn_over_real_frames needs a batch-first RNN without projections")
    lstm = isinstance(rnn, nn.LSTM)
    step = torch.lstm if lstm else torch.gru
    lengths = mask.long().sum(1)
    weights = rnn._flat_weights
    per_direction = len(weights) // (2 * rnn.num_layers)
    h0 = x.new_zeros(1, x.shape[0], rnn.hidden_size)
    hx = (h0, h0) if lstm else h0
    out = x
    for layer in range(rnn.num_layers):
        if layer:
            out = F.dropout(out, rnn.dropout, rnn.training)
        first = 2 * layer * per_direction
        forward = weights[first : first + per_direction]
        backward = weights[first + per_direction : first + 2 * per_direction]
        fwd = step(out, hx, forward, rnn.bias, 1, 0.0, rnn.training, False, True)[0]
        bwd = step(_reverse_real_frames(out, lengths), hx, backward, rnn.bias, 1, 0.0, rnn.training, False, True)[0]
        out = torch.cat([fwd, _reverse_real_frames(bwd, lengths)], dim=-1)
    return _packed_layout(out)


def _packed_layout(out: torch.Tensor) -> torch.Tensor:
    """``out`` in the batch-major memory layout that ``pad_packed_sequence(batch_first=True)``
    returns (a batch-first RNN returns a time-major one): dropout draws its mask in memory order,
    so the same seed keeps giving the same masks (and trained models) as when the encoders packed
    their input."""
    return out.contiguous()


def sinusoidal_positions(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Transformer sinusoidal position table ``[length, dim]`` (sin on even, cos on odd dims)."""
    pos = torch.arange(length, device=device, dtype=torch.float32)[:, None]
    i = torch.arange(dim, device=device, dtype=torch.float32)[None, :]
    angle = pos / torch.pow(10000.0, 2.0 * torch.div(i, 2, rounding_mode="floor") / dim)
    table = torch.where(i.long() % 2 == 0, torch.sin(angle), torch.cos(angle))
    return table.to(dtype)


class LayerWeights(nn.Module):
    """SUPERB's weighted sum of an encoder's layers (Yang et al., Interspeech 2021; s3prl's
    featurizer): frames ``[B, T, L * D]`` of a stacked-layer store (layer l in columns
    ``l*D:(l+1)*D``, the layout of the extractors' ``layer=all``) -> ``sum_l softmax(w)_l x_l``,
    ``[B, T, D]``.  The weights start equal (w = 0) and are learned with the downstream model."""

    def __init__(self, layers: int):
        super().__init__()
        if int(layers) < 2:
            raise ValueError(f"LayerWeights needs >= 2 layers, got {layers!r}")
        self.layers = int(layers)
        self.logits = nn.Parameter(torch.zeros(self.layers))

    def weights(self) -> torch.Tensor:
        return self.logits.softmax(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.layers:
            raise ValueError(f"input width {x.shape[-1]} is not {self.layers} stacked layers")
        stacked = x.reshape(*x.shape[:-1], self.layers, x.shape[-1] // self.layers)
        return torch.einsum("...ld,l->...d", stacked, self.weights().to(x.dtype))


def stacked_layer_weights(layers: dict[str, int]) -> nn.ModuleDict:
    """One :class:`LayerWeights` per modality whose store stacks more than one layer
    (``{"audio": model.audio_layers, ...}``; 1 = a plain store, nothing to learn).  A model keeps it
    as ``self.layer_weights``; ``SERModel._inputs`` applies it to that modality's frames."""
    return nn.ModuleDict({m: LayerWeights(n) for m, n in layers.items() if int(n) > 1})


def _activation(name: str):
    return {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}[name]


# ----------------------------------------------------------------------------- attention
class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections (same parameter count as a fused
    ``in_proj``: 3 d^2 + 3 d plus the output projection when all dims are d).

    Options map one-to-one onto :func:`sertool.models.attention.attention`.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        qdim: Optional[int] = None,
        kdim: Optional[int] = None,
        vdim: Optional[int] = None,
        bias: bool = True,
        dropout: float = 0.0,
        length_scale: Optional[str] = None,
        topk_rate: Optional[float] = None,
        renormalize: bool = True,
    ):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim {embed_dim} not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.head_dim = embed_dim // num_heads
        kdim = kdim or embed_dim
        self.q_proj = nn.Linear(qdim or embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim or kdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.dropout = dropout
        self.length_scale = length_scale
        self.topk_rate = topk_rate
        self.renormalize = renormalize
        self.reset_parameters()

    def reset_parameters(self):
        for lin in (self.q_proj, self.k_proj, self.v_proj, self.out_proj):
            nn.init.xavier_uniform_(lin.weight)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        return x.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(
        self,
        query: torch.Tensor,
        key: Optional[torch.Tensor] = None,
        value: Optional[torch.Tensor] = None,
        query_mask: Optional[torch.Tensor] = None,
        key_mask: Optional[torch.Tensor] = None,
        return_attention: bool = False,
    ):
        if key is None:  # self-attention
            key, key_mask = query, query_mask if key_mask is None else key_mask
        if value is None:
            value = key
        q, k, v = self._heads(self.q_proj(query)), self._heads(self.k_proj(key)), self._heads(self.v_proj(value))
        res = attention(
            q,
            k,
            v,
            key_mask=key_mask,
            query_mask=query_mask,
            length_scale=self.length_scale,
            topk_rate=self.topk_rate,
            renormalize=self.renormalize,
            dropout_p=self.dropout,
            training=self.training,
            return_weights=return_attention,
        )
        out, w = res if return_attention else (res, None)
        B, H, T, dh = out.shape
        out = self.out_proj(out.transpose(1, 2).reshape(B, T, H * dh))
        return (out, w) if return_attention else out


# ----------------------------------------------------------------------------- transformer
class TransformerLayer(nn.Module):
    """One transformer layer: (self- or cross-) attention + position-wise FFN.

    ``norm="post"`` (Vaswani et al.; the LGCCT and KS papers): x = LN(x + Drop(Attn(x))).
    ``norm="pre"`` (tensor2tensor / MulT code, CMA paper): x = x + Drop(Attn(LN(x))).
    For cross attention (``kdim`` given) the memory is normalised with the query LayerNorm when
    the dims agree (as MulT / the LGCCT code) and with its own LayerNorm otherwise (pre-LN only).
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        ffn_dim: int,
        cross: bool = False,
        kdim: Optional[int] = None,
        norm: str = "post",
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        relu_dropout: Optional[float] = None,
        activation: str = "relu",
        length_scale: Optional[str] = None,
        topk_rate: Optional[float] = None,
        renormalize: bool = True,
    ):
        super().__init__()
        if norm not in ("post", "pre"):
            raise ValueError(f"norm must be 'post' or 'pre', got {norm!r}")
        self.cross, self.norm = cross, norm
        kdim = kdim if (cross and kdim) else d_model
        self.attn = MultiHeadAttention(
            d_model,
            num_heads,
            kdim=kdim,
            dropout=attn_dropout,
            length_scale=length_scale,
            topk_rate=topk_rate,
            renormalize=renormalize,
        )
        self.norm1 = nn.LayerNorm(d_model)
        self.norm_kv = nn.LayerNorm(kdim) if (cross and norm == "pre" and kdim != d_model) else None
        self.fc1 = nn.Linear(d_model, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout = dropout
        self.relu_dropout = dropout if relu_dropout is None else relu_dropout
        self.act = _activation(activation)

    def forward(self, x, x_mask=None, memory=None, memory_mask=None, pos=None, memory_pos=None, return_attention=False):
        """``pos`` / ``memory_pos`` are added to the attention inputs only (not the residual),
        as in the KS-Transformer code."""
        if self.cross and memory is None:
            raise ValueError("cross-attention layer needs a memory sequence")
        residual = x
        h = self.norm1(x) if self.norm == "pre" else x
        if self.cross:
            m = memory
            if self.norm == "pre":
                m = self.norm_kv(m) if self.norm_kv is not None else self.norm1(m)
            if memory_pos is not None:
                m = m + memory_pos
            q = h + pos if pos is not None else h
            res = self.attn(q, m, m, query_mask=x_mask, key_mask=memory_mask, return_attention=return_attention)
        else:
            q = h + pos if pos is not None else h
            res = self.attn(q, q, h, query_mask=x_mask, key_mask=x_mask, return_attention=return_attention)
        a, w = res if return_attention else (res, None)
        x = residual + F.dropout(a, self.dropout, self.training)
        if self.norm == "post":
            x = self.norm1(x)
        residual = x
        h = self.norm2(x) if self.norm == "pre" else x
        h = F.dropout(self.act(self.fc1(h)), self.relu_dropout, self.training)
        x = residual + F.dropout(self.fc2(h), self.dropout, self.training)
        if self.norm == "post":
            x = self.norm2(x)
        return (x, w) if return_attention else x


class TransformerStack(nn.Module):
    """A stack of :class:`TransformerLayer` (self or cross) with optional input processing.

    positions: "none", "input" (sinusoidal added once to the (scaled) inputs, MulT/LGCCT code) or
        "layer" (sinusoidal added to the attention inputs of every layer, KS-Transformer code).
    embed_scale: multiply inputs by sqrt(d) before adding positions (MulT/LGCCT code).
    input_norm: LayerNorm on the query input (and on the memory for cross stacks), KS code.
    final_norm: LayerNorm after the last layer (pre-LN stacks).
    """

    def __init__(
        self,
        num_layers: int,
        d_model: int,
        num_heads: int,
        ffn_dim: int,
        cross: bool = False,
        kdim: Optional[int] = None,
        norm: str = "post",
        dropout: float = 0.1,
        attn_dropout: float = 0.0,
        relu_dropout: Optional[float] = None,
        embed_dropout: float = 0.0,
        activation: str = "relu",
        length_scale: Optional[str] = None,
        topk_rate: Optional[float] = None,
        renormalize: bool = True,
        positions: str = "none",
        embed_scale: bool = False,
        input_norm: bool = False,
        final_norm: Optional[bool] = None,
    ):
        super().__init__()
        if positions not in ("none", "input", "layer"):
            raise ValueError(f"positions must be none|input|layer, got {positions!r}")
        self.cross = cross
        self.d_model = d_model
        self.kdim = kdim if (cross and kdim) else d_model
        self.positions, self.embed_scale, self.embed_dropout = positions, embed_scale, embed_dropout
        self.layers = nn.ModuleList(
            TransformerLayer(
                d_model,
                num_heads,
                ffn_dim,
                cross=cross,
                kdim=self.kdim,
                norm=norm,
                dropout=dropout,
                attn_dropout=attn_dropout,
                relu_dropout=relu_dropout,
                activation=activation,
                length_scale=length_scale,
                topk_rate=topk_rate,
                renormalize=renormalize,
            )
            for _ in range(num_layers)
        )
        self.input_norm = nn.LayerNorm(d_model) if input_norm else None
        self.memory_input_norm = nn.LayerNorm(self.kdim) if (input_norm and cross) else None
        if final_norm is None:
            final_norm = norm == "pre"
        self.final_norm = nn.LayerNorm(d_model) if final_norm else None

    def _prep(self, x, mask, dim):
        if self.embed_scale:
            x = x * math.sqrt(dim)
        if self.positions == "input":
            x = x + sinusoidal_positions(x.shape[1], dim, x.device, x.dtype)
        x = F.dropout(x, self.embed_dropout, self.training)
        return zero_padding(x, mask) if self.positions == "input" else x

    def forward(self, x, x_mask=None, memory=None, memory_mask=None, return_attention=False):
        if self.input_norm is not None:
            x = self.input_norm(x)
        x = self._prep(x, x_mask, self.d_model)
        if self.cross:
            if memory is None:
                raise ValueError("cross-attention stack needs a memory sequence")
            if self.memory_input_norm is not None:
                memory = self.memory_input_norm(memory)
            memory = self._prep(memory, memory_mask, self.kdim)
        pos = mpos = None
        if self.positions == "layer":
            pos = sinusoidal_positions(x.shape[1], self.d_model, x.device, x.dtype)
            if self.cross:
                mpos = sinusoidal_positions(memory.shape[1], self.kdim, x.device, x.dtype)
        attns = []
        for layer in self.layers:
            res = layer(x, x_mask, memory, memory_mask, pos=pos, memory_pos=mpos, return_attention=return_attention)
            if return_attention:
                x, w = res
                attns.append(w)
            else:
                x = res
        if self.final_norm is not None:
            x = self.final_norm(x)
        return (x, attns) if return_attention else x


class CCAB(nn.Module):
    """Cascaded Cross-Attention Block (KS-Transformer): key-sparse cross-attention with
    queries from modality A and keys/values from B, then key-sparse self-attention on the fused
    sequence.  Each part has its own input LayerNorm and sinusoidal positions, as in the KS code."""

    def __init__(
        self,
        d_model,
        kdim,
        num_heads,
        ffn_dim,
        dropout=0.1,
        attn_dropout=0.1,
        topk_rate=0.5,
        renormalize=True,
        norm="post",
        positions="layer",
    ):
        super().__init__()
        common = dict(
            num_heads=num_heads,
            ffn_dim=ffn_dim,
            norm=norm,
            dropout=dropout,
            attn_dropout=attn_dropout,
            topk_rate=topk_rate,
            renormalize=renormalize,
            positions=positions,
            input_norm=True,
            final_norm=False,
        )
        self.cross = TransformerStack(1, d_model, cross=True, kdim=kdim, **common)
        self.self_attn = TransformerStack(1, d_model, **common)

    def forward(self, x, x_mask, memory, memory_mask):
        x = self.cross(x, x_mask, memory, memory_mask)
        return self.self_attn(x, x_mask)


class CCABStack(nn.Module):
    """``n`` CCABs stacked, with one skip connection around the stack (KS-Transformer)."""

    def __init__(self, num_blocks, d_model, kdim, **kw):
        super().__init__()
        self.blocks = nn.ModuleList(CCAB(d_model, kdim, **kw) for _ in range(num_blocks))

    def forward(self, x, x_mask, memory, memory_mask):
        h = x
        for b in self.blocks:
            h = b(h, x_mask, memory, memory_mask)
        return x + h


class GatedFusion(nn.Module):
    """LGCCT gate.

    ``mode="matrix"`` (paper Eq. 18): ``H = H_fused G_i + H_target G_r`` with learnable ``d x d``
    matrices G_i (compound/interaction gate) and G_r (retain gate), no bias.
    ``mode="linear_ln"`` (released code): ``H = LayerNorm(Linear_i(H_fused) + Linear_r(H_target))``
    (Linear layers with bias).
    """

    def __init__(self, d: int, mode: str = "matrix"):
        super().__init__()
        if mode not in ("matrix", "linear_ln"):
            raise ValueError(f"gate mode must be matrix|linear_ln, got {mode!r}")
        self.mode = mode
        bias = mode == "linear_ln"
        self.compound = nn.Linear(d, d, bias=bias)  # G_i
        self.retain = nn.Linear(d, d, bias=bias)  # G_r
        self.norm = nn.LayerNorm(d) if mode == "linear_ln" else None

    def forward(self, fused: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        h = self.compound(fused) + self.retain(target)
        return self.norm(h) if self.norm is not None else h
