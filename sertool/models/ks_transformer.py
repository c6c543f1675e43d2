"""KS-Transformer: Key-Sparse Transformer with Cascaded Cross-Attention Blocks.

Chen, Xing, Xu, Yang. "Key-Sparse Transformer for Multimodal Speech Emotion Recognition."
ICASSP 2022 (reference code: github.com/HappyColor/Key-Sparse-Transformer).

Architecture (IEMOCAP, wav2vec 512-d audio frames (460) and RoBERTa-large 1024-d
tokens (20)):

* FEM (feature extraction module): 5 vanilla transformer layers per modality.
* MIM (modality interaction module): per direction, ``ccab_blocks`` (3) Cascaded Cross-Attention
  Blocks.  A CCAB is a key-sparse cross-attention layer (Q from modality A, K/V from modality B)
  followed by a key-sparse self-attention layer on the fused sequence; the stack of CCABs has one
  skip connection (``x + CCABs(x)``).
* DFM (deep fusion module): 2 key-sparse self-attention layers per modality.
* Average pooling over real frames, concatenation, classifier
  ``(Da+Dt) -> /2 -> /4 -> C`` with ReLU and dropout 0.5.

Key-sparse attention: per head, the softmax weights are summed over queries; only the
top ``k = ceil(rate x real keys)`` keys (rate 0.5) are kept, shared by all queries of that head.
8 heads; FFN 256 (audio) / 512 (text) as in the reference config.  Training: Adam 5e-4, lr halved
every 30 epochs, 120 epochs, batch 16 (reference config), dropout 0.5 in the classifier.

Options and departures (docs/models.md):

* ``renormalize``: true (default, the paper's "attention over the kept keys") renormalises the
  kept weights; false reproduces the released code, which zeroes the other weights without
  renormalising.  The code also computes k from the padded length (``int(rate * T)``) and
  leaves padding unmasked in the DFM and in the average pooling; sertool uses real frames only,
  so padding never changes an item's output.
* The released code adds the MIM skip twice (``x + (x + CCABs(x))``); sertool uses the single
  skip of the paper's figure.
* ``ccab_blocks`` (0-3), ``fem``/``mim``/``dfm`` = false, and ``sparse`` = false (vanilla
  attention in MIM and DFM) give the ablations of Tables 1-2.
* Sinusoidal positions are added to the attention inputs of every layer and each stack starts
  with a LayerNorm, as in the reference code (not described in the paper).
* With a single modality the MIM is skipped (uni-modal baseline of Table 2).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import CCABStack, TransformerStack, masked_mean, stacked_layer_weights
from .registry import SERModel, _check_modalities, register


@register("ks_transformer")
class KSTransformer(SERModel):
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
        num_heads: int,
        audio_ffn: int,
        text_ffn: int,
        fem: bool,
        fem_layers: int,
        mim: bool,
        ccab_blocks: int,
        dfm: bool,
        dfm_layers: int,
        sparse: bool,
        topk_rate: float,
        renormalize: bool,
        dropout: float,
        attn_dropout: float,
        classifier_dropout: float,
        norm: str,
        positions: str,
    ):
        super().__init__()
        self.layer_weights = stacked_layer_weights({"audio": audio_layers, "text": text_layers})
        self.modalities = _check_modalities(modalities, ("audio", "text"))
        if task not in ("regression", "classification"):
            raise ValueError(f"model.task must be regression|classification, got {task!r}")
        if not 0 <= ccab_blocks <= 3:
            raise ValueError(f"model.ccab_blocks must be 0..3, got {ccab_blocks}")
        dims = {"audio": audio_dim, "text": text_dim}
        ffns = {"audio": audio_ffn, "text": text_ffn}
        rate = topk_rate if sparse else None
        common = dict(
            num_heads=num_heads,
            norm=norm,
            dropout=dropout,
            attn_dropout=attn_dropout,
            positions=positions,
            input_norm=True,
            final_norm=False,
        )
        self.fem = nn.ModuleDict()
        self.mim = nn.ModuleDict()
        self.dfm = nn.ModuleDict()
        for m in self.modalities:
            if fem and fem_layers > 0:
                self.fem[m] = TransformerStack(fem_layers, dims[m], ffn_dim=ffns[m], **common)
            if dfm and dfm_layers > 0:
                self.dfm[m] = TransformerStack(
                    dfm_layers, dims[m], ffn_dim=ffns[m], topk_rate=rate, renormalize=renormalize, **common
                )
        if mim and ccab_blocks > 0 and len(self.modalities) == 2:
            for m, o in (("audio", "text"), ("text", "audio")):
                self.mim[m] = CCABStack(
                    ccab_blocks,
                    dims[m],
                    dims[o],
                    num_heads=num_heads,
                    ffn_dim=ffns[m],
                    dropout=dropout,
                    attn_dropout=attn_dropout,
                    topk_rate=rate,
                    renormalize=renormalize,
                    norm=norm,
                    positions=positions,
                )
        fc = sum(dims[m] for m in self.modalities)
        out = 1 if task == "regression" else n_classes
        self.classifier = nn.Sequential(
            nn.Linear(fc, fc // 2),
            nn.ReLU(),
            nn.Dropout(classifier_dropout),
            nn.Linear(fc // 2, fc // 4),
            nn.ReLU(),
            nn.Dropout(classifier_dropout),
            nn.Linear(fc // 4, out),
        )

    def forward(self, batch: dict, return_attention: bool = False):
        xs, ms = {}, {}
        for m in self.modalities:
            x, mask = self._inputs(batch, m)
            if m in self.fem:
                x = self.fem[m](x, mask)
            xs[m], ms[m] = x, mask
        if len(self.mim):
            fused = {m: self.mim[m](xs[m], ms[m], xs[o], ms[o]) for m, o in (("audio", "text"), ("text", "audio"))}
            xs = fused
        attn = {}
        pooled = []
        for m in self.modalities:
            x = xs[m]
            if m in self.dfm:
                res = self.dfm[m](x, ms[m], return_attention=return_attention)
                if return_attention:
                    x, attn[f"dfm_{m}"] = res
                else:
                    x = res
            pooled.append(masked_mean(x, ms[m]))
        out = self.classifier(torch.cat(pooled, dim=-1))
        return (out, attn) if return_attention else out
