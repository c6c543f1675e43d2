"""CMD student: the small audio-text transformers of Cross-Modal Distillation.

Kim & Kang. "Cross-modal distillation with audio-text fusion for fine-grained emotion
classification using BERT and Wav2vec 2.0." Neurocomputing 506:168-183, 2022.

Student:

* Input encoders: the teacher's input encoders (wav2vec 2.0 CNN feature encoder, 512-d at
  50 Hz; BERT embedding layer, 768-d), whose outputs are given as cached features
  (``audio_input``/``text_input`` = ``features``, default).  Without a teacher encoder:
  ``audio_input: waveform`` uses a small conv stem with the wav2vec 2.0 kernels/strides (total
  stride 320, i.e. the teacher frame rate at 16 kHz) and ``text_input: ids`` a token embedding.
* A Conv1d to d = 32 channels per modality.
* L = 3 blocks; ``fusion: early`` (default): cross-attention (audio queries text, text queries
  audio) followed by self-attention per modality; ``fusion: late``: self then cross.
  d = 32, 2 heads.
* Outputs: per-time-step embeddings per modality for the contrastive distillation loss
  (``forward(batch, return_embeddings=True)``; optional linear projection ``embed_dim``, e.g. to
  the teacher width), and for fine-tuning one classifier per modality on the mean over real
  frames; the per-modality softmax outputs are averaged.  ``forward`` returns
  ``log(mean_m softmax(logits_m))`` so that cross-entropy on it is the NLL of the averaged
  distribution (for ``task: regression`` the per-modality scores are averaged).

Not specified by the paper (sertool choices): FFN width (4d = 128), post-LN, dropout 0.1,
kernel-1 projection conv.  The distillation loss (temperature kappa) lives in the distill stage.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import TransformerLayer, masked_mean
from .encoders import ConvStack
from .registry import SERModel, _check_modalities, register


@register("cmd_student")
class CMDStudent(SERModel):
    def __init__(
        self,
        *,
        modalities,
        audio_dim: int,
        text_dim: int,
        n_classes: int,
        task: str,
        audio_input: str,
        text_input: str,
        stem_channels: int,
        stem_kernels,
        stem_strides,
        vocab_size: int,
        d: int,
        proj_kernel: int,
        num_heads: int,
        num_blocks: int,
        ffn_dim: int,
        fusion: str,
        norm: str,
        dropout: float,
        embed_dim,
    ):
        super().__init__()
        self.modalities = _check_modalities(modalities, ("audio", "text"))
        if set(self.modalities) != {"audio", "text"}:
            raise ValueError("cmd_student is an audio-text model: model.modalities must be [audio, text]")
        if fusion not in ("early", "late"):
            raise ValueError(f"model.fusion must be early|late, got {fusion!r}")
        if audio_input not in ("features", "waveform") or text_input not in ("features", "ids"):
            raise ValueError("model.audio_input must be features|waveform and model.text_input features|ids")
        if task not in ("regression", "classification"):
            raise ValueError(f"model.task must be regression|classification, got {task!r}")
        self.task, self.fusion = task, fusion
        self.audio_input, self.text_input = audio_input, text_input
        if audio_input == "waveform":
            self.stem = ConvStack(1, [[stem_channels, k, s] for k, s in zip(stem_kernels, stem_strides)], pad=False)
            audio_dim = stem_channels
        if text_input == "ids":
            self.embedding = nn.Embedding(vocab_size, text_dim)
        self.proj = nn.ModuleDict(
            {
                "audio": ConvStack(audio_dim, [[d, proj_kernel, 1]], activation="none"),
                "text": ConvStack(text_dim, [[d, proj_kernel, 1]], activation="none"),
            }
        )
        kw = dict(d_model=d, num_heads=num_heads, ffn_dim=ffn_dim, norm=norm, dropout=dropout)
        self.cross = nn.ModuleList(
            nn.ModuleDict({m: TransformerLayer(cross=True, kdim=d, **kw) for m in ("audio", "text")})
            for _ in range(num_blocks)
        )
        self.self_attn = nn.ModuleList(
            nn.ModuleDict({m: TransformerLayer(**kw) for m in ("audio", "text")}) for _ in range(num_blocks)
        )
        self.embed_proj = nn.ModuleDict({m: nn.Linear(d, embed_dim) for m in ("audio", "text")}) if embed_dim else None
        out = 1 if task == "regression" else n_classes
        self.heads = nn.ModuleDict({m: nn.Linear(d, out) for m in ("audio", "text")})

    def _inputs_all(self, batch):
        xa, ma = self._inputs(batch, "audio")
        xt, mt = self._inputs(batch, "text")
        if self.audio_input == "waveform":
            wav = xa if xa.dim() == 3 else xa[..., None]
            xa, ma = self.stem(wav, ma)
        if self.text_input == "ids":
            xt = self.embedding(xt.long().squeeze(-1) if xt.dim() == 3 else xt.long())
        xa, ma = self.proj["audio"](xa, ma)
        xt, mt = self.proj["text"](xt, mt)
        return {"audio": xa, "text": xt}, {"audio": ma, "text": mt}

    def _cross(self, i, x, m):
        return {
            "audio": self.cross[i]["audio"](x["audio"], m["audio"], x["text"], m["text"]),
            "text": self.cross[i]["text"](x["text"], m["text"], x["audio"], m["audio"]),
        }

    def _self(self, i, x, m):
        return {k: self.self_attn[i][k](x[k], m[k]) for k in ("audio", "text")}

    def encode(self, batch):
        """Per-time-step student states ``{audio: [B, Ta, d], text: [B, Tt, d]}`` and masks."""
        x, m = self._inputs_all(batch)
        for i in range(len(self.cross)):
            if self.fusion == "early":
                x = self._self(i, self._cross(i, x, m), m)
            else:
                x = self._cross(i, self._self(i, x, m), m)
        return x, m

    def forward(self, batch: dict, return_embeddings: bool = False):
        x, m = self.encode(batch)
        logits = {k: self.heads[k](masked_mean(x[k], m[k])) for k in ("audio", "text")}
        if self.task == "regression":
            out = (logits["audio"] + logits["text"]) / 2
        else:
            prob = (logits["audio"].softmax(-1) + logits["text"].softmax(-1)) / 2
            out = torch.log(prob.clamp_min(1e-12))
        if not return_embeddings:
            return out
        emb = {k: (self.embed_proj[k](x[k]) if self.embed_proj is not None else x[k]) for k in x}
        return {
            "logits": out,
            "modality_logits": logits,
            "audio": emb["audio"],
            "text": emb["text"],
            "audio_mask": m["audio"],
            "text_mask": m["text"],
        }
