"""LGCCT: Light Gated and Crossed Complementation Transformer.

Liu, Feng, Wang, Hu, Zhang, Li. "LGCCT: A Light Gated and Crossed Complementation Transformer
for Multimodal Speech Emotion Recognition." Entropy 24(7):1010, 2022.

Pipeline (paper Table 1; CMU-MOSEI aligned, n = 50 words):

1. Encoders: text GloVe-300 -> BiLSTM (2 x 16 = 32); audio COVAREP-74 -> CNN (2 x Conv1d 64, k3,
   ReLU) -> BiLSTM (32).  A bias-free 1x1 projection to d = 30 per modality.
2. Crossed complementation, both ways: a cross-modal transformer (5 layers, 5 heads, FFN 4d) where
   the target modality queries the other one.  Attention logits are length-scaled:
   ``softmax(lambda * Q K^T / sqrt(d_k))`` with ``lambda = log n``.
3. Gate, Eq. (18): ``H = H_fused G_i + H_target G_r`` with learnable d x d matrices.
4. Concatenation of both directions (2d = 60), a transformer encoder (5 layers), the last
   (real) time step, a residual FC block and the output layer (score or class logits).

Training (Table 1): Adam 1e-3, 40 epochs, lr x 0.1 after 20 epochs, batch 24,
gradient clip 1.0, output dropout 0.1, L1 loss for MOSEI scores.

Options and where they depart from the paper (see docs/models.md):

* ``length_scale``: ``keys`` (default) = log of the number of real keys per item, which is what
  the entropy-invariance argument of the paper needs; ``queries`` = log of the real query length,
  as in the released code, where the line is commented out (``none`` = the released behaviour).
* ``gate_mode``: ``matrix`` (default, Eq. 18, no bias); ``linear_ln`` = the released code's
  ``LayerNorm(Linear(H_fused) + Linear(H_target))``.
* ``norm``: ``post`` (default, paper figure) or ``pre`` (released MulT-derived code: pre-LN plus a
  final LayerNorm per stack).
* ``positions``/``embed_scale``: sinusoidal positions added to sqrt(d)-scaled inputs of each
  transformer, as in the released (MulT) code; the paper does not discuss positions.
* ``pooling``: ``last`` (default; the released code takes ``h[-1]``; with padded batches this is
  the last *real* frame) or ``mean`` over real frames.
* ``gates`` / ``encoders`` / ``transformer`` = false give the Table 3 ablations.  Without encoders
  the 1x1 projections map the raw 74/300-d features to d.  Without gates, the cross-modal
  transformer output is used directly.
* The released code builds an unused second 5-layer transformer (``trans_l_mem``) and two unused
  attention-pooling heads inside the encoders; they are not built here.
* The two directions are concatenated along features, so both sequences must have the same length
  (word-aligned features, ``sertool align``); otherwise ``forward`` raises ``ValueError``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import GatedFusion, TransformerStack, last_real, masked_mean, stacked_layer_weights
from .encoders import ConvRNNEncoder, RNNEncoder
from .registry import SERModel, _check_modalities, register


@register("lgcct")
class LGCCT(SERModel):
    def __init__(
        self,
        *,
        modalities,
        audio_dim: int,
        text_dim: int,
        audio_layers: int,
        text_layers: int,
        n_classes: int,
        task: str,
        encoders: bool,
        audio_conv,
        rnn_hidden: int,
        d: int,
        num_heads: int,
        cross_layers: int,
        gates: bool,
        gate_mode: str,
        transformer: bool,
        transformer_layers: int,
        ffn_mult: int,
        norm: str,
        length_scale: str,
        positions: bool,
        embed_scale: bool,
        attn_dropout: float,
        attn_dropout_audio: float,
        relu_dropout: float,
        res_dropout: float,
        embed_dropout: float,
        encoder_dropout: float,
        out_dropout: float,
        pooling: str,
    ):
        super().__init__()
        self.layer_weights = stacked_layer_weights({"audio": audio_layers, "text": text_layers})
        self.modalities = _check_modalities(modalities)
        if set(self.modalities) != {"audio", "text"}:
            raise ValueError("lgcct is an audio-text model: model.modalities must be [audio, text]")
        if task not in ("regression", "classification"):
            raise ValueError(f"model.task must be regression|classification, got {task!r}")
        if pooling not in ("last", "mean"):
            raise ValueError(f"model.pooling must be last|mean, got {pooling!r}")
        self.task, self.pooling = task, pooling
        self.use_encoders, self.use_gates, self.use_transformer = encoders, gates, transformer
        ls = None if length_scale in (None, "none") else length_scale
        if encoders:
            self.audio_encoder = ConvRNNEncoder(audio_dim, audio_conv, rnn_hidden, cell="lstm", dropout=encoder_dropout)
            self.text_encoder = RNNEncoder(text_dim, rnn_hidden, cell="lstm", dropout=encoder_dropout)
            a_in, t_in = self.audio_encoder.out_dim, self.text_encoder.out_dim
        else:
            a_in, t_in = audio_dim, text_dim
        self.embed_dropout = embed_dropout
        self.proj_audio = nn.Linear(a_in, d, bias=False)  # Conv1d k=1, no bias, in the code
        self.proj_text = nn.Linear(t_in, d, bias=False)
        common = dict(
            num_heads=num_heads,
            norm=norm,
            dropout=res_dropout,
            relu_dropout=relu_dropout,
            embed_dropout=embed_dropout,
            length_scale=ls,
            positions="input" if positions else "none",
            embed_scale=embed_scale,
        )
        # text queries audio ("text with audio"), audio queries text
        self.cross_text = TransformerStack(
            cross_layers, d, ffn_dim=ffn_mult * d, cross=True, kdim=d, attn_dropout=attn_dropout_audio, **common
        )
        self.cross_audio = TransformerStack(
            cross_layers, d, ffn_dim=ffn_mult * d, cross=True, kdim=d, attn_dropout=attn_dropout, **common
        )
        if gates:
            self.gate_text = GatedFusion(d, gate_mode)
            self.gate_audio = GatedFusion(d, gate_mode)
        D = 2 * d
        if transformer:
            self.transformer = TransformerStack(
                transformer_layers, D, ffn_dim=ffn_mult * D, attn_dropout=attn_dropout, **common
            )
        self.proj1 = nn.Linear(D, D)
        self.proj2 = nn.Linear(D, D)
        self.out_dropout = out_dropout
        self.out_layer = nn.Linear(D, 1 if task == "regression" else n_classes)

    def forward(self, batch: dict, return_attention: bool = False):
        xa, ma = self._inputs(batch, "audio")
        xt, mt = self._inputs(batch, "text")
        if xa.shape[1] != xt.shape[1]:
            raise ValueError(
                f"lgcct concatenates the two directions along features and needs word-aligned "
                f"sequences of equal length (got audio {xa.shape[1]}, text {xt.shape[1]} frames)"
            )
        if self.use_encoders:
            xa, ma = self.audio_encoder(xa, ma)
            xt, mt = self.text_encoder(xt, mt)
            xt = F.dropout(xt, self.embed_dropout, self.training)
        pa, pt = self.proj_audio(xa), self.proj_text(xt)
        attn = {}
        res_t = self.cross_text(pt, mt, pa, ma, return_attention=return_attention)
        res_a = self.cross_audio(pa, ma, pt, mt, return_attention=return_attention)
        if return_attention:
            (ht, attn["text<-audio"]), (ha, attn["audio<-text"]) = res_t, res_a
        else:
            ht, ha = res_t, res_a
        if self.use_gates:
            ht, ha = self.gate_text(ht, pt), self.gate_audio(ha, pa)
        h = torch.cat([ht, ha], dim=-1)
        m = mt | ma
        if self.use_transformer:
            res = self.transformer(h, m, return_attention=return_attention)
            if return_attention:
                h, attn["fused"] = res
            else:
                h = res
        z = last_real(h, m) if self.pooling == "last" else masked_mean(h, m)
        z = z + self.proj2(F.dropout(F.relu(self.proj1(z)), self.out_dropout, self.training))
        out = self.out_layer(z)
        return (out, attn) if return_attention else out
