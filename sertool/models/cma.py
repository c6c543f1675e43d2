"""CMA: wav2vec 2.0 + BERT with bidirectional cross-modal attention.

Krishna D N. "Using Large Pre-Trained Models with Cross-Modal Attention for Multi-Modal Emotion
Recognition." arXiv:2108.09669, 2021.

* Audio feature encoder on wav2vec 2.0 hidden states: 2 x (Conv1d k3 s2, 256 channels,
  BatchNorm, ReLU), then a BiLSTM (128 per direction = 256), dropout 0.2.
* Text: BERT hidden states projected by a kernel-1 Conv1d to 256.
* CMA-1: audio queries attend to text keys/values; CMA-2: text queries attend to audio.
  8 heads, pre-LayerNorm transformer layers, FFN 256 (``cma_layers`` layers, default 1).
* Statistics pooling (mean + std over real frames) of each CMA output, concatenation (4 x 256),
  linear classifier.
* Audio-only / text-only variants (Table 2): the modality's encoder, statistics pooling and the
  classifier (no cross-modal attention).

``frontend``:

* ``features`` (default): cached wav2vec2 / BERT hidden states ``[B, T, 768]`` in
  ``batch["audio"]`` / ``batch["text"]``.
* ``end_to_end``: the ``transformers`` encoders inside the model, fine-tuned with the CNN feature
  encoder of wav2vec 2.0 frozen (paper: Adam 1e-5).  ``batch["audio"]`` is the waveform
  ``[B, S]`` (16 kHz) with ``audio_mask`` ``[B, S]``; ``batch["text"]`` holds token ids
  ``[B, T]`` (LongTensor) with ``text_mask`` = attention mask.  ``wav2vec2_path`` / ``bert_path``
  name local pretrained checkpoints (no model hub access); when null the encoders are built with
  random weights from ``wav2vec2_config`` / ``bert_config`` (for tests and offline smoke runs).
  wav2vec2-base uses group norm in its CNN, so there padding is not exactly neutral; that is a
  property of the pretrained model, not of this head.

Departures: the paper does not give the number of CMA layers or dropout inside them (1 layer,
dropout 0.1 here); BatchNorm statistics in training mode include padded frames (eval is exact).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import TransformerStack, stacked_layer_weights, statistics_pooling
from .encoders import ConvRNNEncoder
from .registry import SERModel, _check_modalities, register


def _build_hf(kind: str, path, cfg: dict):
    import transformers

    if kind == "wav2vec2":
        if path:
            return transformers.Wav2Vec2Model.from_pretrained(path, local_files_only=True)
        conf = dict(cfg)
        for k in ("conv_dim", "conv_kernel", "conv_stride"):
            if conf.get(k) is not None:
                conf[k] = tuple(conf[k])
        conf = {k: v for k, v in conf.items() if v is not None}
        return transformers.Wav2Vec2Model(transformers.Wav2Vec2Config(**conf))
    if path:
        return transformers.BertModel.from_pretrained(path, local_files_only=True)
    return transformers.BertModel(
        transformers.BertConfig(**{k: v for k, v in cfg.items() if v is not None}), add_pooling_layer=False
    )


@register("cma")
class CMA(SERModel):
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
        frontend: str,
        audio_conv,
        lstm_hidden: int,
        encoder_dropout: float,
        d: int,
        num_heads: int,
        ffn_dim: int,
        cma_layers: int,
        norm: str,
        dropout: float,
        attn_dropout: float,
        wav2vec2_path,
        bert_path,
        wav2vec2_config,
        bert_config,
        freeze_feature_encoder: bool,
    ):
        super().__init__()
        self.layer_weights = stacked_layer_weights({"audio": audio_layers, "text": text_layers})
        self.modalities = _check_modalities(modalities, ("audio", "text"))
        if frontend not in ("features", "end_to_end"):
            raise ValueError(f"model.frontend must be features|end_to_end, got {frontend!r}")
        if task not in ("regression", "classification"):
            raise ValueError(f"model.task must be regression|classification, got {task!r}")
        self.frontend = frontend
        self.wav2vec2 = self.bert = None
        if frontend == "end_to_end":
            if "audio" in self.modalities:
                self.wav2vec2 = _build_hf("wav2vec2", wav2vec2_path, wav2vec2_config or {})
                if freeze_feature_encoder:
                    self.wav2vec2.freeze_feature_encoder()
                audio_dim = self.wav2vec2.config.hidden_size
            if "text" in self.modalities:
                self.bert = _build_hf("bert", bert_path, bert_config or {})
                text_dim = self.bert.config.hidden_size
        if "audio" in self.modalities:
            self.audio_encoder = ConvRNNEncoder(
                audio_dim, audio_conv, lstm_hidden, cell="lstm", batch_norm=True, dropout=encoder_dropout
            )
            if self.audio_encoder.out_dim != d:
                raise ValueError(f"2 x lstm_hidden ({self.audio_encoder.out_dim}) must equal model.d ({d})")
        if "text" in self.modalities:
            self.text_proj = nn.Linear(text_dim, d)  # Conv1d kernel 1
        if len(self.modalities) == 2:
            common = dict(
                num_heads=num_heads,
                ffn_dim=ffn_dim,
                cross=True,
                kdim=d,
                norm=norm,
                dropout=dropout,
                attn_dropout=attn_dropout,
            )
            self.cma1 = TransformerStack(cma_layers, d, **common)  # audio queries text
            self.cma2 = TransformerStack(cma_layers, d, **common)  # text queries audio
        self.classifier = nn.Linear(2 * d * len(self.modalities), 1 if task == "regression" else n_classes)

    def _audio(self, batch):
        x, mask = self._inputs(batch, "audio")
        if self.wav2vec2 is not None:
            wav = x.squeeze(-1) if x.dim() == 3 else x
            wav = wav * mask.to(wav.dtype)
            out = self.wav2vec2(wav, attention_mask=mask.long()).last_hidden_state
            lengths = self.wav2vec2._get_feat_extract_output_lengths(mask.long().sum(1))
            mask = torch.arange(out.shape[1], device=out.device)[None, :] < lengths[:, None]
            x = out
        return self.audio_encoder(x, mask)

    def _text(self, batch):
        x, mask = self._inputs(batch, "text")
        if self.bert is not None:
            x = self.bert(input_ids=x.long(), attention_mask=mask.long()).last_hidden_state
        return self.text_proj(x), mask

    def forward(self, batch: dict, return_attention: bool = False):
        attn = {}
        if len(self.modalities) == 1:
            h, m = self._audio(batch) if self.modalities[0] == "audio" else self._text(batch)
            z = statistics_pooling(h, m)
        else:
            a, ma = self._audio(batch)
            t, mt = self._text(batch)
            r1 = self.cma1(a, ma, t, mt, return_attention=return_attention)
            r2 = self.cma2(t, mt, a, ma, return_attention=return_attention)
            if return_attention:
                (h1, attn["audio<-text"]), (h2, attn["text<-audio"]) = r1, r2
            else:
                h1, h2 = r1, r2
            z = torch.cat([statistics_pooling(h1, ma), statistics_pooling(h2, mt)], dim=-1)
        out = self.classifier(z)
        return (out, attn) if return_attention else out
