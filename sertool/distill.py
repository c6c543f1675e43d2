"""The distill stage: Cross-Modal Distillation (CMD, Kim & Kang, Neurocomputing 506, 2022).

    run_distill("feats/rav", "exp/rav-cmd", teacher_audio="whisper", teacher_text="minilm_states")
    run_finetune("exp/rav-cmd", overrides=["finetune.protocol=speaker-kfold:6"])

1. Teachers (frozen), one per modality, named by a SPEC:
   * a feature store written by ``sertool extract`` (a store name in FEATS or a ``.h5`` path): the
     cached teacher states (the common case, much faster);
   * a ``transformers`` model (local folder, packaged alias or hub id): a wav2vec2-family audio
     encoder or a BERT-family text encoder, run live on every batch (last hidden state).
2. Student (paper Sections 3.1, 4.2; :class:`DistillStudent`): per modality an input encoder:
   the live teacher's own input encoder with its weights (wav2vec2's convolutional feature
   encoder on the waveform; BERT's embedding layer on the token ids), otherwise, for a cached
   teacher, the architecture of its input encoder without weights: Whisper's log-Mel front end
   and two convolutions for a Whisper store (``student.audio_stem=logmel``, the ``auto`` choice),
   a convolutional stem on the waveform at the teacher's frame rate for any other (``waveform``),
   and for text a token embedding (plus sinusoidal
   positions, as BERT's embedding layer has positions) over the vocabulary of the cached store's
   tokens (text); then the CMD student core
   (:class:`sertool.models.cmd_student.CMDStudent`: Conv1d to d = 32, L = 3 blocks of
   cross-attention then self-attention ("early fusion"; ``student.fusion=late``: self then
   cross), 2 heads).  A unimodal student (``student.modalities=[text]``) has self-attention
   blocks only.
3. Loss (Eqs. 8-9, Fig. 5; :func:`contrastive_loss`): linear maps g to d_z = 32 for the teacher
   and the student streams; for every utterance i and real time step t the student vector
   z^s_{i,t} must pick its own teacher vector z^h_{i,t} among the teacher vectors z^h_{j,t} of
   all utterances j of the batch that are real at step t:
   ``-log exp(sim(z^s_it, z^h_it)/kappa) / sum_j exp(sim(z^s_it, z^h_jt)/kappa)``, sim = cosine,
   averaged over the real (i, t), summed over modalities.  Student and teacher steps are paired
   by index; when their counts differ (a stem whose frame count differs from the teacher's by a
   frame or two), the shorter one decides.
4. Batching by accumulated audio samples (:mod:`sertool.batching`; 320,000 by default), text-only
   students by tokens (``distill.text_budget``).
5. Schedule: Adam, lr 1e-4, linear warm-up for 10 of 50 epochs then linear decay; the student
   with the lowest validation loss is kept: EXP/student.safetensors, EXP/distill.yaml (resolved
   config, teachers, student input spec), EXP/distill_log.jsonl, EXP/distill_metrics.json
   (best epoch, losses, parameter counts teacher vs student per modality, throughput).
6. Fine-tuning (:func:`run_finetune`, ``sertool distill --finetune``): average pooling per
   modality, two FC layers of 32 (``32 -> 32 -> classes``), softmax(logits / kappa) averaged over
   the modalities, cross-entropy on the averaged distribution; folds x seeds of a protocol with
   model selection on the dev split; EXP/finetune/{metrics.json, report.md} with per-class F1
   and macro-F1 mean +/- std (Table 3 format) and modality dominance (mean |dL/dlogits| per
   modality, Table 6).

Not specified by the paper (sertool choices, documented in docs/distill.md): cosine similarity,
student-to-teacher direction only (``distill.symmetric=true`` adds teacher-to-student), per-
utterance waveform normalisation (zero mean, unit variance) for every student and live teacher,
input encoders trained with the rest (``student.freeze_input_encoders=true`` freezes them).
"""
from __future__ import annotations

import copy
import datetime as _dt
import importlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

from sertool.weights import load_tensors
from sertool.batching import budget_batches, crop_lengths
from sertool.models.blocks import TransformerLayer, masked_mean, sinusoidal_positions
from sertool.models.encoders import ConvStack

MODALITIES = ("audio", "text")
SAMPLE_RATE = 16000
# wav2vec 2.0's CNN feature encoder: (kernel, stride) per layer, total stride 320 (50 Hz at 16 kHz)
W2V_LAYERS = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))

DEFAULTS: dict = {
    "student": {
        "modalities": ["audio", "text"],
        "d": 32, "num_heads": 2, "num_blocks": 3, "ffn_dim": 128, "fusion": "early", "norm": "post",
        "dropout": 0.1, "proj_kernel": 1,
        "stem_channels": 64,          # conv stem width (cached audio teacher)
        "audio_stem": "auto",         # cached audio teacher: waveform (wav2vec2-style conv stem) | logmel
                                      # (Whisper's front end); auto = logmel for a Whisper store
        "text_embed_dim": 128,        # token embedding width (cached text teacher)
        "freeze_input_encoders": False,
    },
    "distill": {
        "kappa": 0.05,                # temperature; the paper's grid: 0.01 / 0.05 / 0.1
        "d_z": 32,
        "similarity": "cosine",       # cosine | dot
        "symmetric": False,           # also teacher -> student
        "lr": 1.0e-4, "epochs": 50, "warmup_epochs": 10, "grad_clip": 0.0,
        "budget": 320000,             # audio samples per batch (320,000 / 640,000 / 1,280,000 at 16 kHz)
        "text_budget": 4096,          # tokens per batch for text-only students
        "measure": "padded",          # padded (longest x count) | sum
        "max_audio_s": 0.0,           # crop longer utterances (0 = only to the budget)
        "dev_fraction": 0.1,          # validation utterances when the manifest has no dev split
        "exclude_test": True,         # leave out utterances of split "test"
        "max_utts": 0,                # > 0: use only this many utterances (smoke runs)
        "seed": 0, "device": "auto", "threads": 0,
    },
    "finetune": {
        "labels": "auto", "protocol": "corpus", "dev_fraction": 0.1, "dev": "auto",
        "seeds": 1, "seed": 0, "epochs": 30, "lr": 1.0e-4, "kappa": None, "hidden": 32,
        "early_stopping": 10, "select_on": "UA", "budget": 320000, "text_budget": 4096,
        "folds": [],                  # fold names to train (empty = all; e.g. to spread folds over jobs)
    },
}


class DistillError(ValueError):
    """A problem with the distillation's inputs or settings, raised before training."""


# =================================================================================== loss
def contrastive_loss(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None = None,
                     kappa: float = 0.05, similarity: str = "cosine", symmetric: bool = False) -> torch.Tensor:
    """Per-time-step contrastive loss (Eqs. 8-9): positives are the teacher and student vectors of
    the same utterance at the same step, negatives the teacher vectors of the other utterances of
    the batch at that step (padded steps are neither anchors nor negatives).

    ``student``, ``teacher``: ``[B, T, d_z]``; ``mask``: ``[B, T]`` bool (True = real step).
    Returns the mean over real (utterance, step) pairs.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} shapes differ")
    B, T, _ = student.shape
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=student.device)
    if similarity == "cosine":
        s, h = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    elif similarity == "dot":
        s, h = student, teacher
    else:
        raise ValueError(f"similarity must be cosine or dot, got {similarity!r}")
    valid = mask.transpose(0, 1)  # [T, B]
    n = valid.sum().clamp_min(1)

    def one_way(a, b):
        logits = torch.einsum("itd,jtd->tij", a, b) / kappa      # [T, B(anchor), B(candidate)]
        logits = logits.masked_fill(~valid[:, None, :], -1e9)     # padded candidates are no negatives
        pos = logits.log_softmax(-1).diagonal(dim1=1, dim2=2)     # [T, B]
        return -torch.where(valid, pos, torch.zeros_like(pos)).sum() / n

    loss = one_way(s, h)
    if symmetric:
        loss = (loss + one_way(h, s)) / 2
    return loss


def align_steps(x: torch.Tensor, xm: torch.Tensor, y: torch.Tensor, ym: torch.Tensor):
    """Pair steps by index; the shorter sequence decides (masks are combined)."""
    T = min(x.shape[1], y.shape[1])
    return x[:, :T], y[:, :T], xm[:, :T] & ym[:, :T]


# =================================================================================== teachers
class CachedTeacher:
    """Teacher states read from a feature store (``sertool extract``)."""

    live = False

    def __init__(self, path: Path, modality: str, only: set[str] | None = None):
        from sertool.data import StoreSource
        from sertool.store import open_store

        store = open_store(path)
        kind = store.attrs.get("kind")
        if kind not in (None, modality):
            raise DistillError(f"teacher {modality}: {path} holds {kind} features")
        self.source = StoreSource(store, preload="auto", only=only)
        self.store, self.path, self.modality = store, Path(path), modality
        self.dim = int(store.dim)
        self.frame_rate_hz = store.attrs.get("frame_rate_hz")
        self.spec = {"type": "store", "path": str(Path(path).resolve()), "feature": store.attrs.get("feature"),
                     "dim": self.dim, "frame_rate_hz": self.frame_rate_hz, "extractor": store.attrs.get("extractor")}
        self.n_parameters = None

    def __contains__(self, uid):
        return uid in self.source

    def states(self, uid: str) -> np.ndarray:
        return self.source.get(uid)

    def tokens(self, uid: str) -> list[str]:
        toks = self.store.utt_attrs(uid).get("tokens")
        if toks is None:
            raise DistillError(f"text teacher store {self.path} has no 'tokens' for {uid!r} (extract it with -f bert)")
        return [t.decode() if isinstance(t, bytes) else str(t) for t in toks]


def _load_transformers(spec, modality: str):
    from transformers import AutoModel

    from sertool.features.hub import quiet_transformers, resolve_model

    if isinstance(spec, nn.Module):
        return spec, None
    resolved = resolve_model(spec, option=f"--teacher-{modality}")
    try:
        with quiet_transformers():
            model = AutoModel.from_pretrained(str(resolved.path), local_files_only=True)
    except Exception as e:  # noqa: BLE001
        raise DistillError(f"teacher {modality}: cannot load a transformers model from {resolved.path} "
                           f"({type(e).__name__}: {e})") from None
    return model, resolved


class LiveAudioTeacher:
    """A wav2vec2-family encoder run on every batch (last hidden state, 50 Hz)."""

    live = True

    def __init__(self, spec, device="cpu"):
        model, resolved = _load_transformers(spec, "audio")
        if not hasattr(model, "_get_feat_extract_output_lengths") or not hasattr(model, "feature_extractor"):
            raise DistillError(f"teacher audio: {type(model).__name__} is not a wav2vec2-family encoder "
                               "(for Whisper, extract `-f whisper` and give the store as the teacher)")
        self.model = model.eval() if device is None else model.eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        cfg = model.config
        self.dim = int(cfg.hidden_size)
        self.frame_rate_hz = SAMPLE_RATE / float(np.prod(cfg.conv_stride))
        self.can_mask = getattr(cfg, "feat_extract_norm", "group") == "layer"
        self.n_parameters = sum(p.numel() for p in model.parameters())
        self.spec = {"type": "transformers", "model": str(spec) if resolved is None else str(resolved.name),
                     "path": None if resolved is None else resolved.record, "dim": self.dim,
                     "frame_rate_hz": self.frame_rate_hz}
        if resolved is None:
            self.spec["model"] = type(model).__name__

    def input_encoder(self) -> nn.Module:
        cfg = self.model.config
        return TeacherWaveEncoder(copy.deepcopy(self.model.feature_extractor), cfg.conv_kernel, cfg.conv_stride,
                                  int(cfg.conv_dim[-1]), spec=_module_spec(self.model.feature_extractor, cfg))

    @torch.no_grad()
    def __call__(self, wave: torch.Tensor, mask: torch.Tensor):
        kwargs = {"attention_mask": mask.long()} if self.can_mask else {}
        out = self.model(wave, **kwargs).last_hidden_state
        lengths = self.model._get_feat_extract_output_lengths(mask.long().sum(1))
        tmask = torch.arange(out.shape[1], device=out.device)[None, :] < lengths[:, None]
        return out.float(), tmask


class LiveTextTeacher:
    """A BERT-family encoder run on every batch (last hidden state per token)."""

    live = True

    def __init__(self, spec, device="cpu", tokenizer=None):
        from transformers import AutoTokenizer

        model, resolved = _load_transformers(spec, "text")
        if not hasattr(model, "embeddings"):
            raise DistillError(f"teacher text: {type(model).__name__} has no embedding layer (BERT family needed)")
        self.model = model.eval() if device is None else model.eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer or (AutoTokenizer.from_pretrained(str(resolved.path), local_files_only=True)
                                       if resolved is not None else None)
        self.dim = int(model.config.hidden_size)
        self.max_length = int(getattr(model.config, "max_position_embeddings", 512) or 512)
        self.n_parameters = sum(p.numel() for p in model.parameters())
        self.spec = {"type": "transformers", "model": type(model).__name__ if resolved is None else str(resolved.name),
                     "path": None if resolved is None else resolved.record, "dim": self.dim}

    def input_encoder(self) -> nn.Module:
        return TeacherTokenEncoder(copy.deepcopy(self.model.embeddings),
                                   spec=_module_spec(self.model.embeddings, self.model.config))

    def ids(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise DistillError("teacher text: no tokenizer")
        return list(self.tokenizer(text or "", truncation=True, max_length=self.max_length)["input_ids"])

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor):
        out = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return out.float(), mask


def _is_store(spec, feats: Path | None) -> Path | None:
    if isinstance(spec, nn.Module) or spec is None:
        return None
    p = Path(str(spec))
    for cand in ([p] if p.suffix == ".h5" else []) + ([Path(feats) / f"{spec}.h5"] if feats else []):
        if cand.exists():
            return cand
    if p.suffix == ".h5":
        raise DistillError(f"teacher store {p} does not exist")
    return None


def open_teacher(spec, modality: str, feats: Path | None, device="cpu", only=None):
    """A teacher SPEC: a store in FEATS / a .h5 path (cached states) or a transformers model."""
    if spec is None:
        raise DistillError(f"no teacher given for the {modality} student (--teacher-{modality} SPEC)")
    store = _is_store(spec, feats)
    if store is not None:
        return CachedTeacher(store, modality, only)
    return LiveAudioTeacher(spec, device) if modality == "audio" else LiveTextTeacher(spec, device)


# =================================================================================== student
def _module_spec(module: nn.Module, config) -> dict:
    cls = type(module)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "config": config.to_dict()}


def _rebuild_module(spec: dict) -> nn.Module:
    from transformers import AutoConfig

    conf = dict(spec["config"])
    config = AutoConfig.for_model(conf.pop("model_type"), **conf)
    mod, _, name = spec["class"].rpartition(".")
    return getattr(importlib.import_module(mod), name)(config)


class TeacherWaveEncoder(nn.Module):
    """The teacher's convolutional feature encoder (wav2vec 2.0 CNN) on the waveform."""

    def __init__(self, cnn: nn.Module, kernels, strides, out_dim: int, spec: dict | None = None):
        super().__init__()
        self.cnn, self.kernels, self.strides, self.out_dim = cnn, list(kernels), list(strides), out_dim
        self.spec = {"type": "teacher_cnn", "module": spec, "kernels": self.kernels, "strides": self.strides,
                     "out_dim": out_dim}

    def forward(self, wave: torch.Tensor, mask: torch.Tensor):
        x = self.cnn(wave).transpose(1, 2)
        lengths = mask.long().sum(1)
        for k, s in zip(self.kernels, self.strides):
            lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
        m = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.clamp_min(0)[:, None]
        return x * m[..., None].to(x.dtype), m


class WaveStem(nn.Module):
    """A small convolutional stem on the waveform at the teacher's frame rate (wav2vec2 kernels)."""

    def __init__(self, channels: int, layers):
        super().__init__()
        self.conv = ConvStack(1, [[channels, k, s] for k, s in layers], pad=False)
        self.out_dim = channels
        self.spec = {"type": "stem", "channels": channels, "layers": [list(l) for l in layers]}

    def forward(self, wave, mask):
        return self.conv(wave[..., None], mask)


class LogMelStem(nn.Module):
    """Whisper's own input encoder for a cached Whisper teacher, the analogue of the paper's
    wav2vec2 CNN for a wav2vec2 teacher: log-Mel spectrogram (80 bands, 25 ms / 10 ms, Whisper's
    log10, 8-decade floor and (x + 4) / 4 scaling), Conv1d k3 + GELU, then Conv1d k3 stride 2 +
    GELU per halving of the 100 Hz frame rate down to the teacher's (50 Hz: Whisper's two
    convolutions).  Randomly initialised: CTranslate2 checkpoints do not expose their weights.
    Far cheaper on CPU than a stem on the raw waveform."""

    N_FFT, HOP, N_MELS = 400, 160, 80

    def __init__(self, channels: int, halvings: int = 1, sample_rate: int = SAMPLE_RATE):
        super().__init__()
        import librosa

        mel = librosa.filters.mel(sr=sample_rate, n_fft=self.N_FFT, n_mels=self.N_MELS)
        self.register_buffer("mel", torch.from_numpy(np.asarray(mel, dtype=np.float32)), persistent=False)
        self.register_buffer("window", torch.hann_window(self.N_FFT), persistent=False)
        layers = [nn.Conv1d(self.N_MELS, channels, 3, padding=1)]
        layers += [nn.Conv1d(channels, channels, 3, stride=2, padding=1) for _ in range(int(halvings))]
        self.convs = nn.ModuleList(layers)
        self.out_dim = channels
        self.spec = {"type": "logmel", "channels": channels, "halvings": int(halvings), "sample_rate": sample_rate}

    def forward(self, wave, mask):
        # zero padding at the edges (not reflection): what Whisper sees after its 30 s zero padding,
        # and it makes a padded batch give the same frames as each utterance alone
        spec = torch.stft(wave.float(), self.N_FFT, self.HOP, window=self.window, center=True, pad_mode="constant",
                          return_complex=True)
        logmel = torch.log10((self.mel @ spec.abs().pow(2)).clamp_min(1e-10))  # [B, 80, T]
        lengths = torch.div(mask.long().sum(1), self.HOP, rounding_mode="floor") + 1
        valid = torch.arange(logmel.shape[-1], device=logmel.device)[None, :] < lengths[:, None]
        peak = logmel.masked_fill(~valid[:, None], float("-inf")).amax(dim=(1, 2), keepdim=True)
        x = (torch.maximum(logmel, peak - 8.0) + 4.0) / 4.0
        for k, conv in enumerate(self.convs):
            if k > 0:
                lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
            valid = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]
            x = F.gelu(conv(x * valid[:, None].to(x.dtype)))
        valid = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]
        return x.transpose(1, 2) * valid[..., None].to(x.dtype), valid


def logmel_halvings(frame_rate_hz: float | None) -> int:
    """Stride-2 convolutions that bring the 100 Hz log-Mel frames to the teacher's rate."""
    if not frame_rate_hz:
        return 1
    ratio = 100.0 / float(frame_rate_hz)
    halvings = int(round(np.log2(ratio))) if ratio >= 1 else -1
    if halvings < 0 or abs(2 ** halvings - ratio) > 1e-6:
        raise DistillError(f"student.audio_stem=logmel: the teacher frame rate {frame_rate_hz} Hz is not 100 Hz "
                           "halved a whole number of times; use student.audio_stem=waveform")
    return halvings


def stem_layers(frame_rate_hz: float | None, sample_rate: int = SAMPLE_RATE):
    """wav2vec2's (kernel, stride) layers, dropping stride-2 layers until the total stride gives
    ``frame_rate_hz``."""
    layers = list(W2V_LAYERS)
    if not frame_rate_hz:
        return layers
    want = sample_rate / float(frame_rate_hz)
    while layers and int(np.prod([s for _, s in layers])) > want + 1e-6 and len(layers) > 1:
        layers.pop()
    if abs(np.prod([s for _, s in layers]) - want) > 1e-6:
        raise DistillError(f"no conv stem of stride-2 layers gives the teacher frame rate {frame_rate_hz} Hz "
                           f"at {sample_rate} Hz (stride {want})")
    return layers


class TeacherTokenEncoder(nn.Module):
    """The teacher's embedding layer (BERT word + position + type embeddings, LayerNorm)."""

    def __init__(self, embeddings: nn.Module, spec: dict | None = None):
        super().__init__()
        self.emb = embeddings
        self.out_dim = int(embeddings.word_embeddings.embedding_dim)
        self.spec = {"type": "teacher_embeddings", "module": spec, "out_dim": self.out_dim}

    def forward(self, ids, mask):
        return self.emb(input_ids=ids) * mask[..., None].float(), mask


class TokenEmbedding(nn.Module):
    """A token embedding over a vocabulary (0 = padding, 1 = unknown)."""

    def __init__(self, vocab_size: int, dim: int, positions: bool = True):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.out_dim = dim
        self.positions = bool(positions)
        self.spec = {"type": "embedding", "vocab_size": vocab_size, "dim": dim, "positions": self.positions}

    def forward(self, ids, mask):
        x = self.emb(ids)
        if self.positions:  # as BERT's embedding layer: the student core has no positions of its own
            x = x + sinusoidal_positions(ids.shape[1], x.shape[-1], device=x.device, dtype=x.dtype)[None]
        return x * mask[..., None].to(x.dtype), mask


def build_input_encoder(spec: dict) -> nn.Module:
    t = spec["type"]
    if t == "stem":
        return WaveStem(spec["channels"], spec["layers"])
    if t == "logmel":
        return LogMelStem(spec["channels"], spec["halvings"], spec.get("sample_rate", SAMPLE_RATE))
    if t == "embedding":
        return TokenEmbedding(spec["vocab_size"], spec["dim"], spec.get("positions", True))
    if t == "teacher_cnn":
        return TeacherWaveEncoder(_rebuild_module(spec["module"]), spec["kernels"], spec["strides"], spec["out_dim"],
                                  spec=spec["module"])
    if t == "teacher_embeddings":
        return TeacherTokenEncoder(_rebuild_module(spec["module"]), spec=spec["module"])
    raise DistillError(f"unknown input encoder type {t!r}")


class UnimodalCore(nn.Module):
    """One modality: Conv1d to d channels, L self-attention blocks (no cross-attention)."""

    def __init__(self, modality: str, in_dim: int, d=32, proj_kernel=1, num_heads=2, num_blocks=3, ffn_dim=128,
                 norm="post", dropout=0.1, **_):
        super().__init__()
        self.modality = modality
        self.proj = nn.ModuleDict({modality: ConvStack(in_dim, [[d, proj_kernel, 1]], activation="none")})
        self.self_attn = nn.ModuleList(
            nn.ModuleDict({modality: TransformerLayer(d, num_heads, ffn_dim, norm=norm, dropout=dropout)})
            for _ in range(num_blocks))

    def encode(self, batch):
        m = self.modality
        x, mask = self.proj[m](batch[m], batch[f"{m}_mask"])
        for blk in self.self_attn:
            x = blk[m](x, mask)
        return {m: x}, {m: mask}


class DistillStudent(nn.Module):
    """Input encoders + CMD student core (+ the fine-tuning heads once added).

    ``forward(batch)`` takes ``wave``/``wave_mask`` ``[B, N]`` and ``ids``/``ids_mask`` ``[B, L]``
    and returns per-modality states and masks; :meth:`classify` the log of the averaged
    per-modality softmax of logits / kappa.
    """

    def __init__(self, spec: dict, encoders: dict | None = None):
        super().__init__()
        self.spec = copy.deepcopy(spec)
        s = spec["student"]
        self.modalities = tuple(s["modalities"])
        if not self.modalities or any(m not in MODALITIES for m in self.modalities) or len(set(self.modalities)) != len(self.modalities):
            raise DistillError(f"student.modalities must be [audio, text], [audio] or [text], got {list(self.modalities)}")
        encoders = encoders or {}
        self.encoders = nn.ModuleDict({m: encoders[m] if m in encoders else build_input_encoder(spec["inputs"][m])
                                       for m in self.modalities})
        kw = {k: s[k] for k in ("d", "proj_kernel", "num_heads", "num_blocks", "ffn_dim", "norm", "dropout")}
        if len(self.modalities) == 2:
            from sertool.models.cmd_student import CMDStudent

            self.core = CMDStudent(audio_dim=self.encoders["audio"].out_dim, text_dim=self.encoders["text"].out_dim,
                                   n_classes=1, fusion=s["fusion"], **kw)
            del self.core.heads  # CMD's fine-tuning heads (two FC layers) live here
        else:
            m = self.modalities[0]
            self.core = UnimodalCore(m, self.encoders[m].out_dim, **kw)
        if s.get("freeze_input_encoders"):
            for p in self.encoders.parameters():
                p.requires_grad_(False)
        self.d = int(s["d"])
        self.heads = None
        self.kappa = 1.0
        if spec.get("heads"):
            self.add_heads(**spec["heads"])

    def add_heads(self, n_classes: int, hidden: int = 32, kappa: float = 1.0):
        self.spec["heads"] = {"n_classes": int(n_classes), "hidden": int(hidden), "kappa": float(kappa)}
        self.kappa = float(kappa)
        self.heads = nn.ModuleDict({m: nn.Sequential(nn.Linear(self.d, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))
                                    for m in self.modalities})
        return self

    def forward(self, batch: dict):
        inputs = {}
        if "audio" in self.modalities:
            inputs["audio"], inputs["audio_mask"] = self.encoders["audio"](batch["wave"], batch["wave_mask"])
        if "text" in self.modalities:
            inputs["text"], inputs["text_mask"] = self.encoders["text"](batch["ids"], batch["ids_mask"])
        return self.core.encode(inputs)

    def modality_logits(self, batch: dict) -> dict:
        if self.heads is None:
            raise DistillError("the student has no classification heads (fine-tune it first)")
        x, m = self(batch)
        return {k: self.heads[k](masked_mean(x[k], m[k])) for k in self.modalities}

    def classify(self, batch: dict, logits: dict | None = None) -> torch.Tensor:
        logits = logits if logits is not None else self.modality_logits(batch)
        prob = sum((logits[k] / self.kappa).softmax(-1) for k in self.modalities) / len(self.modalities)
        return torch.log(prob.clamp_min(1e-12))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def modality_parameters(student: DistillStudent) -> dict[str, int]:
    """Parameters per modality: every parameter whose name names the modality (audio queries
    text = audio side); fine-tuning heads excluded."""
    out = {m: 0 for m in student.modalities}
    for name, p in student.named_parameters():
        if name.startswith("heads."):
            continue
        parts = name.split(".")
        for m in student.modalities:
            if m in parts:
                out[m] += p.numel()
    return out


def make_student(student_cfg: dict, teachers: dict, train_ids: Iterable[str] = ()) -> tuple[DistillStudent, dict | None]:
    """The student for ``teachers``: a live teacher's own input encoder (with its weights), else a
    conv stem at the cached teacher's frame rate (audio) / an embedding over the store's tokens
    (text, vocabulary from ``train_ids``).  Returns the student and the vocabulary (or None)."""
    inputs, encoders, vocab = {}, {}, None
    for m in student_cfg["modalities"]:
        t = teachers[m]
        if t.live:
            encoders[m] = t.input_encoder()
        elif m == "audio":
            stem = student_cfg.get("audio_stem", "auto")
            if stem not in ("auto", "waveform", "logmel"):
                raise DistillError(f"student.audio_stem must be auto, waveform or logmel, got {stem!r}")
            if stem == "auto":  # the analogue of the teacher's own input encoder
                stem = "logmel" if (t.spec.get("extractor") or {}).get("name") == "whisper" else "waveform"
            if stem == "logmel":
                encoders[m] = LogMelStem(int(student_cfg["stem_channels"]), logmel_halvings(t.frame_rate_hz))
            else:
                encoders[m] = WaveStem(int(student_cfg["stem_channels"]), stem_layers(t.frame_rate_hz))
        else:
            vocab = build_vocab(t, train_ids)
            encoders[m] = TokenEmbedding(len(vocab), int(student_cfg["text_embed_dim"]))
        inputs[m] = encoders[m].spec
    return DistillStudent({"student": copy.deepcopy(student_cfg), "inputs": inputs}, encoders), vocab


class Distiller(nn.Module):
    """Student + the linear maps g (teacher and student streams -> d_z) + the loss."""

    def __init__(self, student: DistillStudent, teacher_dims: dict[str, int], d_z: int = 32, kappa: float = 0.05,
                 similarity: str = "cosine", symmetric: bool = False):
        super().__init__()
        self.student = student
        self.g_student = nn.ModuleDict({m: nn.Linear(student.d, d_z) for m in student.modalities})
        self.g_teacher = nn.ModuleDict({m: nn.Linear(int(teacher_dims[m]), d_z) for m in student.modalities})
        self.kappa, self.similarity, self.symmetric = float(kappa), similarity, bool(symmetric)

    def forward(self, batch: dict, teacher: dict) -> tuple[torch.Tensor, dict]:
        x, mask = self.student(batch)
        total, parts = 0.0, {}
        for m in self.student.modalities:
            h, hm = teacher[m]
            s, t, valid = align_steps(self.g_student[m](x[m]), mask[m], self.g_teacher[m](h.to(x[m].dtype)), hm)
            loss = contrastive_loss(s, t, valid, self.kappa, self.similarity, self.symmetric)
            parts[m] = loss
            total = total + loss
        return total, parts


# =================================================================================== data
class DistillData:
    """Student inputs (waveforms, token ids), cached teacher states and targets of utterances."""

    def __init__(self, utts, modalities, teachers: dict, vocab: dict | None = None, max_audio_samples: int = 0,
                 targets=None):
        self.utts = list(utts)
        self.ids = [u.id for u in self.utts]
        self.modalities = tuple(modalities)
        self.teachers = teachers
        self.vocab = vocab
        self.targets = None if targets is None else np.asarray(targets, dtype=np.int64)
        self.max_audio_samples = int(max_audio_samples or 0)
        self._waves: dict[str, np.ndarray] = {}
        self._ids: dict[str, np.ndarray] = {}

    def __len__(self):
        return len(self.utts)

    # ---------------------------------------------------------------- student inputs
    def wave(self, i: int) -> np.ndarray:
        u = self.utts[i]
        if u.id not in self._waves:
            from sertool.audio import load_audio

            if not u.audio:
                raise DistillError(f"utterance {u.id!r} has no audio")
            x, _ = load_audio(u.audio, SAMPLE_RATE, start=u.start, end=u.end)
            x = np.asarray(x, np.float32)
            if self.max_audio_samples:
                x = x[: self.max_audio_samples]
            x = (x - x.mean()) / (x.std() + 1e-7)
            self._waves[u.id] = x
        return self._waves[u.id]

    def token_ids(self, i: int) -> np.ndarray:
        u = self.utts[i]
        if u.id not in self._ids:
            t = self.teachers["text"]
            if isinstance(t, CachedTeacher):
                ids = [self.vocab.get(tok, 1) for tok in t.tokens(u.id)]
            else:
                ids = t.ids(u.text)
            if not ids:
                raise DistillError(f"utterance {u.id!r} has no text tokens")
            self._ids[u.id] = np.asarray(ids, np.int64)
        return self._ids[u.id]

    def token_strings(self, i: int) -> list[str]:
        ids = self.token_ids(i)
        t = self.teachers["text"]
        if isinstance(t, CachedTeacher):
            return t.tokens(self.ids[i])[: len(ids)]
        tok = getattr(t, "tokenizer", None)
        return tok.convert_ids_to_tokens([int(x) for x in ids]) if tok is not None else [str(int(x)) for x in ids]

    def lengths(self) -> np.ndarray:
        """Audio samples (bimodal / audio students) or tokens (text students) per utterance."""
        if "audio" in self.modalities:
            out = []
            for i, u in enumerate(self.utts):
                if u.duration:
                    n = int(round(u.duration * SAMPLE_RATE))
                    n = min(n, self.max_audio_samples) if self.max_audio_samples else n
                else:
                    n = len(self.wave(i))
                out.append(max(n, 1))
            return np.asarray(out, np.int64)
        return np.asarray([len(self.token_ids(i)) for i in range(len(self.utts))], np.int64)

    def collate(self, idx, lengths: np.ndarray | None = None, with_teacher: bool = True) -> dict:
        idx = [int(i) for i in idx]
        batch: dict = {"uids": [self.ids[i] for i in idx]}
        if "audio" in self.modalities:
            waves = [self.wave(i) for i in idx]
            if lengths is not None:  # the batcher's (cropped) lengths: never over budget
                waves = [w[: int(lengths[i])] for w, i in zip(waves, idx)]
            batch["wave"], batch["wave_mask"] = _pad([torch.from_numpy(w) for w in waves])
        if "text" in self.modalities:
            batch["ids"], batch["ids_mask"] = _pad([torch.from_numpy(self.token_ids(i)) for i in idx])
        if with_teacher:
            for m in self.modalities:
                t = self.teachers[m]
                if isinstance(t, CachedTeacher):
                    batch[f"t_{m}"], batch[f"t_{m}_mask"] = _pad([torch.from_numpy(np.asarray(t.states(self.ids[i])))
                                                                  for i in idx])
        if self.targets is not None:
            batch["target"] = torch.from_numpy(self.targets[idx])
        return batch

    def teacher_states(self, batch: dict) -> dict:
        out = {}
        for m in self.modalities:
            t = self.teachers[m]
            if isinstance(t, CachedTeacher):
                out[m] = (batch[f"t_{m}"], batch[f"t_{m}_mask"])
            elif m == "audio":
                out[m] = t(batch["wave"], batch["wave_mask"])
            else:
                out[m] = t(batch["ids"], batch["ids_mask"])
        return out


def _pad(seqs: list[torch.Tensor]):
    T = max(int(s.shape[0]) for s in seqs)
    x = torch.zeros((len(seqs), T, *seqs[0].shape[1:]), dtype=seqs[0].dtype)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, s in enumerate(seqs):
        x[b, : s.shape[0]] = s
        mask[b, : s.shape[0]] = True
    return x, mask


def _to(batch: dict, device) -> dict:
    if str(device) == "cpu":
        return batch
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def build_vocab(teacher: CachedTeacher, ids: Iterable[str]) -> dict[str, int]:
    """Token -> index (0 = padding, 1 = unknown), in order of first appearance."""
    vocab = {"<pad>": 0, "<unk>": 1}
    for uid in ids:
        for tok in teacher.tokens(uid):
            vocab.setdefault(tok, len(vocab))
    return vocab


# =================================================================================== config
def resolve_config(config_file=None, overrides: Iterable[str] = ()) -> dict:
    from sertool.models.registry import _merge, apply_overrides

    cfg = copy.deepcopy(DEFAULTS)
    if config_file is not None:
        user = yaml.safe_load(Path(config_file).read_text()) or {}
        if not isinstance(user, dict):
            raise DistillError(f"{config_file}: a config file must be a YAML mapping")
        user = {k: v for k, v in user.items() if k in DEFAULTS}
        _merge(cfg, user)
    apply_overrides(cfg, list(overrides))
    if cfg["distill"]["similarity"] not in ("cosine", "dot"):
        raise DistillError(f"distill.similarity must be cosine or dot, got {cfg['distill']['similarity']!r}")
    if cfg["student"]["fusion"] not in ("early", "late"):
        raise DistillError(f"student.fusion must be early or late, got {cfg['student']['fusion']!r}")
    if float(cfg["distill"]["kappa"]) <= 0:
        raise DistillError("distill.kappa must be > 0")
    return cfg


def lr_factor(step: int, steps_per_epoch: int, epochs: int, warmup_epochs: float) -> float:
    """Linear warm-up for ``warmup_epochs``, then linear decay to 0 at the end."""
    total = max(1, steps_per_epoch * epochs)
    warm = int(round(warmup_epochs * steps_per_epoch))
    if warm and step < warm:
        return (step + 1) / warm
    return max(0.0, 1.0 - (step - warm) / max(1, total - warm))


def _pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _atomic_save(tensors: dict, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp),
              metadata={k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()})
    os.replace(tmp, path)


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _split_ids(utts, cfg: dict) -> tuple[list, list]:
    d = cfg["distill"]
    pool = [u for u in utts if not (d["exclude_test"] and (u.split or "").lower() == "test")]
    if d["max_utts"]:
        pool = pool[: int(d["max_utts"])]
    dev = [u for u in pool if (u.split or "").lower() in ("dev", "val", "valid", "validation")]
    if dev:
        dev_ids = {u.id for u in dev}
        return [u for u in pool if u.id not in dev_ids], dev
    rng = np.random.default_rng(int(d["seed"]))
    order = rng.permutation(len(pool))
    n_dev = max(1, int(round(float(d["dev_fraction"]) * len(pool)))) if len(pool) > 1 else 0
    dev_idx = set(order[:n_dev].tolist())
    return [u for i, u in enumerate(pool) if i not in dev_idx], [u for i, u in enumerate(pool) if i in dev_idx]


# =================================================================================== pre-training
def run_distill(feats, exp, *, teacher_audio=None, teacher_text=None, config_file=None, overrides: Iterable[str] = (),
                overwrite: bool = False, progress: bool = True, log: Callable[[str], None] = print,
                utts=None) -> dict:
    """Distil the teachers into a student: FEATS -> EXP/student.safetensors (best val loss)."""
    from sertool.corpora.base import read_manifest

    t0 = time.time()
    cfg = resolve_config(config_file, overrides)
    d, s = cfg["distill"], cfg["student"]
    for section, key in (("distill", "epochs"), ("finetune", "epochs")):
        if int(cfg[section][key]) < 1:
            raise DistillError(f"{section}.{key} = {cfg[section][key]!r}: must be at least 1")
    feats = Path(feats) if feats is not None else None
    exp = Path(exp)
    if utts is None:
        if feats is None or not (feats / "manifest.jsonl").exists():
            raise DistillError(f"{feats}: no manifest.jsonl (give FEATS, the output of `sertool extract`)")
        utts = read_manifest(feats / "manifest.jsonl")
    if exp.exists() and any(exp.iterdir()) and not overwrite:
        raise DistillError(f"{exp} already holds an experiment; use --overwrite")
    mods = list(s["modalities"])
    device = _pick_device(d["device"])
    if int(d["threads"] or 0) > 0:
        torch.set_num_threads(int(d["threads"]))
    specs = {"audio": teacher_audio, "text": teacher_text}
    teachers = {m: open_teacher(specs[m], m, feats, device) for m in mods}
    for m, t in teachers.items():
        if isinstance(t, CachedTeacher):
            missing = [u.id for u in utts if u.id not in t]
            if missing and len(missing) == len(utts):
                raise DistillError(f"teacher {m} store {t.path} holds none of the manifest's utterances")
            if missing:
                log(f"{len(missing)} utterance(s) have no {m} teacher states (e.g. {missing[0]}); left out")
                utts = [u for u in utts if u.id in t]
    train_utts, dev_utts = _split_ids(utts, cfg)
    if not train_utts or not dev_utts:
        raise DistillError(f"need training and validation utterances (have {len(train_utts)} and {len(dev_utts)})")

    torch.manual_seed(int(d["seed"]))
    np.random.seed(int(d["seed"]))
    student, vocab = make_student(s, teachers, [u.id for u in train_utts])
    inputs = student.spec["inputs"]
    distiller = Distiller(student, {m: teachers[m].dim for m in mods}, d["d_z"], d["kappa"], d["similarity"],
                          d["symmetric"]).to(device)
    max_samples = int(round(float(d["max_audio_s"] or 0) * SAMPLE_RATE))
    train = DistillData(train_utts, mods, teachers, vocab, max_samples)
    dev = DistillData(dev_utts, mods, teachers, vocab, max_samples)
    budget = int(d["budget"] if "audio" in mods else d["text_budget"])
    train_len, dev_len = crop_lengths(train.lengths(), budget), crop_lengths(dev.lengths(), budget)
    mk = lambda data, lens, ep, sh: budget_batches(lens, budget, shuffle=sh, seed=int(d["seed"]), epoch=ep,
                                                   measure=d["measure"])
    spe = len(mk(train, train_len, 0, True))
    opt = torch.optim.Adam([p for p in distiller.parameters() if p.requires_grad], lr=float(d["lr"]))

    if exp.exists() and any(exp.iterdir()):
        shutil.rmtree(exp)
    exp.mkdir(parents=True, exist_ok=True)
    params = {"student": modality_parameters(student), "student_total": count_parameters(student),
              "teacher": {m: teachers[m].n_parameters for m in mods}}
    record = {**cfg, "inputs": inputs, "teachers": {m: teachers[m].spec for m in mods},
              "data": {"feats": str(feats.resolve()) if feats else None, "train": len(train_utts), "dev": len(dev_utts)},
              "parameters": params,
              "experiment": {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                             "command": " ".join(sys.argv), "device": str(device),
                             "sertool": __import__("sertool").__version__, "torch": torch.__version__}}
    _write(exp / "distill.yaml", yaml.safe_dump(json.loads(json.dumps(record, default=str)), sort_keys=False))
    if vocab is not None:
        _write(exp / "vocab.json", json.dumps(vocab, ensure_ascii=False))
    log_path = exp / "distill_log.jsonl"
    log_path.write_text("")
    from tqdm.auto import tqdm

    step, best, best_epoch, history = 0, None, -1, []
    for epoch in range(int(d["epochs"])):
        distiller.train()
        batches = mk(train, train_len, epoch, True)
        total, n, te = 0.0, 0, time.time()
        for idx in tqdm(batches, desc=f"distill ep{epoch + 1}/{d['epochs']}", disable=not progress, leave=False):
            batch = _to(train.collate(idx, train_len), device)
            teacher = train.teacher_states(batch)
            lr = float(d["lr"]) * lr_factor(step, spe, int(d["epochs"]), float(d["warmup_epochs"]))
            for g in opt.param_groups:
                g["lr"] = lr
            loss, _ = distiller(batch, teacher)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if float(d["grad_clip"] or 0) > 0:
                torch.nn.utils.clip_grad_norm_(distiller.parameters(), float(d["grad_clip"]))
            opt.step()
            step += 1
            total += float(loss.detach()) * len(idx)
            n += len(idx)
        seconds = time.time() - te
        val = evaluate_loss(distiller, dev, dev_len, budget, d["measure"], device)
        improved = best is None or val["loss"] < best
        if improved:
            best, best_epoch = val["loss"], epoch
            save_student(student, exp / "student.safetensors", {"epoch": epoch, "val_loss": best})
        row = {"epoch": epoch, "lr": lr, "train_loss": total / max(n, 1), "val_loss": val["loss"],
               **{f"val_loss_{m}": v for m, v in val["parts"].items()}, "best": improved,
               "seconds": round(seconds, 3), "utts_per_s": round(n / max(seconds, 1e-9), 2)}
        history.append(row)
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if progress:
            log(f"epoch {epoch + 1}: train loss {row['train_loss']:.4f}, val loss {val['loss']:.4f}"
                f"{' *' if improved else ''} ({row['utts_per_s']:.1f} utt/s)")
    metrics = {"best_epoch": best_epoch, "best_val_loss": best,
               "first_train_loss": history[0]["train_loss"] if history else None,
               "last_train_loss": history[-1]["train_loss"] if history else None,
               "parameters": params, "utts_per_s": float(np.mean([h["utts_per_s"] for h in history])) if history else None,
               "seconds": round(time.time() - t0, 2)}
    _write(exp / "distill_metrics.json", json.dumps(metrics, indent=2) + "\n")
    for t in teachers.values():
        if isinstance(t, CachedTeacher):
            t.store.close()
    return metrics


@torch.no_grad()
def evaluate_loss(distiller: Distiller, data: DistillData, lengths, budget, measure, device) -> dict:
    distiller.eval()
    total, parts, n = 0.0, {}, 0
    for idx in budget_batches(lengths, budget, measure=measure):
        batch = _to(data.collate(idx, lengths), device)
        loss, p = distiller(batch, data.teacher_states(batch))
        total += float(loss) * len(idx)
        for m, v in p.items():
            parts[m] = parts.get(m, 0.0) + float(v) * len(idx)
        n += len(idx)
    return {"loss": total / max(n, 1), "parts": {m: v / max(n, 1) for m, v in parts.items()}}


def save_student(student: DistillStudent, path: Path, meta: dict | None = None) -> None:
    _atomic_save(student.state_dict(), path, {"format": "sertool-cmd-student", "spec": student.spec, **(meta or {})})


def load_student(path: Path) -> DistillStudent:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "sertool-cmd-student":
        raise DistillError(f"{path}: not a sertool CMD student")
    student = DistillStudent(json.loads(meta["spec"]))
    student.load_state_dict(load_tensors(path))
    return student


# =================================================================================== fine-tuning
def _finetune_inputs(rec: dict, cfg: dict, feats, teacher_text_tokenizer=None):
    """Manifest, label set, targets and teachers (cached stores / tokenizer) of a fine-tuning run."""
    from sertool.corpora.base import read_manifest
    from sertool.labels import apply as apply_labels, label_set

    ft = cfg["finetune"]
    feats = Path(feats or rec["data"]["feats"])
    if not (feats / "manifest.jsonl").exists():
        raise DistillError(f"{feats}: no manifest.jsonl (give FEATS, the output of `sertool extract`)")
    utts = read_manifest(feats / "manifest.jsonl")
    labels = label_set(ft["labels"], utts)
    if labels.regression:
        raise DistillError("CMD fine-tuning is a classifier; choose a categorical label set (finetune.labels)")
    utts, targets = apply_labels(labels, utts)
    mods = list(cfg["student"]["modalities"])
    teachers = {}
    for m in mods:
        t = rec["teachers"][m]
        if t["type"] == "store":
            teachers[m] = CachedTeacher(Path(t["path"]), m)
        elif m == "text":  # only the tokenizer is needed
            teachers[m] = _TokenizerOnly(t, teacher_text_tokenizer)
        else:
            teachers[m] = None
    keep = [i for i, u in enumerate(utts) if all(teachers[m] is None or not isinstance(teachers[m], CachedTeacher)
                                                 or u.id in teachers[m] for m in mods)]
    utts, targets = [utts[i] for i in keep], [targets[i] for i in keep]
    return feats, labels, utts, targets, mods, teachers


def _finetune_data(fold, part: str, utts, targets, mods, teachers, vocab, max_samples) -> "DistillData":
    by_id = {u.id: i for i, u in enumerate(utts)}
    ids = getattr(fold, part)
    return DistillData([utts[by_id[u]] for u in ids], mods, teachers, vocab, max_samples,
                       [targets[by_id[u]] for u in ids])


@torch.no_grad()
def _prediction_rows(student, data, lengths, budget, device, classes, fold: str, seed: int) -> list[dict]:
    """One row per utterance (in data order): id, fold, seed, true, pred, p_<class> (as `sertool evaluate`)."""
    student.eval()
    probs = np.zeros((len(data), len(classes)), dtype=np.float64)
    for idx in budget_batches(lengths, budget):
        batch = _to(data.collate(idx, lengths, with_teacher=False), device)
        probs[np.asarray(idx)] = student.classify(batch).exp().float().cpu().numpy()
    rows = []
    for i, uid in enumerate(data.ids):
        row = {"id": uid, "fold": fold, "seed": seed, "true": classes[int(data.targets[i])],
               "pred": classes[int(probs[i].argmax())]}
        row.update({f"p_{c}": float(probs[i, j]) for j, c in enumerate(classes)})
        rows.append(row)
    return rows


SELECT_ON = {"ua": "UA", "wa": "WA", "macro_f1": "macro_f1", "weighted_f1": "weighted_f1"}


def run_finetune(exp, feats=None, *, overrides: Iterable[str] = (), progress: bool = True,
                 log: Callable[[str], None] = print, teacher_text_tokenizer=None, out_dir=None,
                 command: str | None = None) -> dict:
    """Fine-tune the distilled student of EXP for classification over a protocol's folds x seeds, into
    ``out_dir`` (default EXP/finetune): metrics.json, report.md, predictions.csv (test splits),
    log.jsonl, folds/<fold>/seed<s>/{model.safetensors, log.jsonl, metrics.json}, and config.yaml +
    folds.json + distill.yaml (+ vocab.json) so that `sertool evaluate OUT` re-predicts every run.
    ``sertool distill --finetune`` and ``sertool train --model cmd --init EXP`` both land here."""
    from sertool import metrics as M
    from sertool.models.registry import apply_overrides
    from sertool.protocols import make_folds

    exp = Path(exp)
    if not (exp / "distill.yaml").exists() or not (exp / "student.safetensors").exists():
        raise DistillError(f"{exp}: no distilled student (distill.yaml + student.safetensors); "
                           "give the output folder of `sertool distill`")
    rec = yaml.safe_load((exp / "distill.yaml").read_text())
    # settings a newer sertool added since EXP was distilled take their defaults
    cfg = {k: {**copy.deepcopy(v), **(rec.get(k) or {})} for k, v in DEFAULTS.items()}
    apply_overrides(cfg, list(overrides))
    ft, d = cfg["finetune"], cfg["distill"]
    ft["select_on"] = SELECT_ON.get(str(ft["select_on"]).lower(), ft["select_on"])
    if ft["select_on"] not in SELECT_ON.values():
        raise DistillError(f"finetune.select_on {ft['select_on']!r}: expected UA, WA, macro_f1 or weighted_f1")
    if int(ft["epochs"]) < 1 or int(ft["seeds"]) < 1:
        raise DistillError("finetune.epochs and finetune.seeds must be at least 1")
    if int(d.get("threads") or 0) > 0:
        torch.set_num_threads(int(d["threads"]))
    feats, labels, utts, targets, mods, teachers = _finetune_inputs(rec, cfg, feats, teacher_text_tokenizer)
    vocab = json.loads((exp / "vocab.json").read_text()) if (exp / "vocab.json").exists() else None
    folds = make_folds(utts, targets, ft["protocol"], dev_fraction=ft["dev_fraction"], seed=int(ft["seed"]), dev=ft["dev"])
    only = [str(f) for f in (ft.get("folds") or [])]
    unknown = [f for f in only if f not in {fold.name for fold in folds}]
    if unknown:
        raise DistillError(f"finetune.folds: no fold named {', '.join(unknown)} in protocol {ft['protocol']!r} "
                           f"(folds: {', '.join(f.name for f in folds)})")
    device = _pick_device(d["device"])
    kappa = float(ft["kappa"] if ft["kappa"] is not None else d["kappa"])
    budget = int(ft["budget"] if "audio" in mods else ft["text_budget"])
    max_samples = int(round(float(d["max_audio_s"] or 0) * SAMPLE_RATE))
    seeds = list(range(int(ft["seed"]), int(ft["seed"]) + int(ft["seeds"])))
    out_dir = Path(out_dir) if out_dir is not None else exp / "finetune"
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    # the experiment record that `sertool evaluate` reads (load_experiment: config.yaml + folds.json)
    shutil.copyfile(exp / "distill.yaml", out_dir / "distill.yaml")
    if vocab is not None:
        shutil.copyfile(exp / "vocab.json", out_dir / "vocab.json")
    record = {
        "model": {"name": "cmd", "modalities": mods},
        "data": {"feats": str(feats.resolve()),
                 **{m: rec["teachers"][m].get("feature") or rec["teachers"][m].get("model") for m in mods}},
        "protocol": {"name": ft["protocol"], "dev_fraction": ft["dev_fraction"], "seed": ft["seed"], "dev": ft["dev"]},
        "finetune": ft, "distill": {k: d[k] for k in ("kappa", "device", "max_audio_s")},
        "init": str(exp.resolve()),
        "label_set": {**labels.to_config()},
        "experiment": {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       "command": command or " ".join(sys.argv), "seeds": seeds, "folds": [f.name for f in folds],
                       "selected_on": f"dev {ft['select_on']}", "init": str(exp.resolve()),
                       "sertool": importlib.import_module("sertool").__version__, "torch": torch.__version__},
    }
    _write(out_dir / "config.yaml", yaml.safe_dump(json.loads(json.dumps(record)), sort_keys=False))
    _write(out_dir / "folds.json", json.dumps({"protocol": record["protocol"], "folds": [f.to_json() for f in folds]},
                                              indent=2) + "\n")
    runs, all_rows, pred_rows = [], [], []
    for fold in folds:
        if only and fold.name not in only:
            continue
        data = {part: _finetune_data(fold, part, utts, targets, mods, teachers, vocab, max_samples)
                for part in ("train", "dev", "test")}
        lens = {p: crop_lengths(v.lengths(), budget) for p, v in data.items()}
        for seed in seeds:
            torch.manual_seed(seed)
            student = load_student(exp / "student.safetensors").add_heads(len(labels.classes), int(ft["hidden"]), kappa)
            student.to(device)
            opt = torch.optim.Adam([p for p in student.parameters() if p.requires_grad], lr=float(ft["lr"]))
            best, best_state, best_epoch, bad = None, None, -1, 0
            rows = []
            for epoch in range(int(ft["epochs"])):
                student.train()
                total, n = 0.0, 0
                for idx in budget_batches(lens["train"], budget, shuffle=True, seed=seed, epoch=epoch):
                    batch = _to(data["train"].collate(idx, lens["train"], with_teacher=False), device)
                    loss = F.nll_loss(student.classify(batch), batch["target"])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += float(loss.detach()) * len(idx)
                    n += len(idx)
                dev_m = _score(student, data["dev"], lens["dev"], budget, device, labels.classes)
                score = dev_m[ft["select_on"]]
                if best is None or score > best:
                    best, best_epoch, bad = score, epoch, 0
                    best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
                else:
                    bad += 1
                rows.append({"fold": fold.name, "seed": seed, "epoch": epoch, "train_loss": total / max(n, 1),
                             "dev_loss": dev_m["loss"], "dev_UA": dev_m["UA"], "dev_WA": dev_m["WA"],
                             "dev_macro_f1": dev_m["macro_f1"], "best": epoch == best_epoch})
                if int(ft["early_stopping"]) and bad >= int(ft["early_stopping"]):
                    break
            student.load_state_dict(best_state)
            test_m = _score(student, data["test"], lens["test"], budget, device, labels.classes, dominance=True,
                            n_saliency=5)
            pred_rows += _prediction_rows(student, data["test"], lens["test"], budget, device, labels.classes,
                                          fold.name, seed)
            rd = out_dir / "folds" / fold.name / f"seed{seed}"
            rd.mkdir(parents=True, exist_ok=True)
            save_student(student, rd / "model.safetensors", {"epoch": best_epoch, "fold": fold.name, "seed": seed})
            _write(rd / "log.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
            all_rows += rows
            run = {"fold": fold.name, "seed": seed, "best_epoch": best_epoch, "dev_" + ft["select_on"]: best,
                   "test": {k: v for k, v in test_m.items() if k not in ("confusion",)}}
            _write(rd / "metrics.json", json.dumps(run, indent=2) + "\n")
            runs.append(run)
            if progress:
                log(f"[{fold.name} seed {seed}] best epoch {best_epoch + 1}: test UA {test_m['UA']:.4f}, "
                    f"macro-F1 {test_m['macro_f1']:.4f}")
    summary = {k: M.summarize([r["test"][k] for r in runs]) for k in ("WA", "UA", "macro_f1", "weighted_f1")}
    summary["per_class_f1"] = {c: M.summarize([r["test"]["per_class"][c]["f1"] for r in runs]) for c in labels.classes}
    summary["dominance"] = {m: M.summarize([r["test"]["dominance"][m] for r in runs]) for m in mods}
    result = {"task": "classification", "labels": labels.classes, "selected_on": f"dev {ft['select_on']}",
              "summary": summary, "runs": runs, "parameters": rec.get("parameters"), "init": str(exp.resolve())}
    _write(out_dir / "metrics.json", json.dumps(result, indent=2) + "\n")
    _write(out_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in all_rows))
    _write_predictions_csv(out_dir / "predictions.csv", pred_rows)
    _write(out_dir / "report.md", report_markdown(result, rec))
    return result


def _write_predictions_csv(path: Path, rows: list[dict]) -> None:
    import csv
    import io

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()})
    _write(path, buf.getvalue())


def finetune_predictions(exp, feats=None, *, crop_length: int | None = None, device: str = "auto",
                         log: Callable[[str], None] = print, teacher_text_tokenizer=None) -> list[dict]:
    """`sertool evaluate` of a CMD fine-tuning experiment (``model.name: cmd``): every run's
    test split re-predicted from EXP alone (distill.yaml, vocab.json, folds.json, the runs' weights)."""
    from sertool.protocols import Fold

    exp = Path(exp)
    if crop_length:
        raise DistillError("--crop-length is not available for CMD experiments (inputs are waveforms and tokens)")
    cfg_rec = yaml.safe_load((exp / "config.yaml").read_text())
    rec = yaml.safe_load((exp / "distill.yaml").read_text())
    cfg = {k: copy.deepcopy(rec[k]) for k in DEFAULTS}
    cfg["finetune"] = cfg_rec["finetune"]
    cfg["distill"].update(cfg_rec.get("distill") or {})
    if device != "auto":
        cfg["distill"]["device"] = device
    ft, d = cfg["finetune"], cfg["distill"]
    feats, labels, utts, targets, mods, teachers = _finetune_inputs(rec, cfg, feats or cfg_rec["data"]["feats"],
                                                                    teacher_text_tokenizer)
    recorded = cfg_rec.get("label_set", {}).get("classes")
    if recorded is not None and list(recorded) != list(labels.classes):
        raise DistillError(f"{exp}: classes {recorded} recorded at training, but FEATS gives {labels.classes}")
    vocab = json.loads((exp / "vocab.json").read_text()) if (exp / "vocab.json").exists() else None
    folds = [Fold.from_json(f) for f in json.loads((exp / "folds.json").read_text())["folds"]]
    have = {u.id for u in utts}
    dev = _pick_device(d["device"] if d["device"] != "auto" else "auto")
    budget = int(ft["budget"] if "audio" in mods else ft["text_budget"])
    max_samples = int(round(float(d["max_audio_s"] or 0) * SAMPLE_RATE))
    rows: list[dict] = []
    for fold in folds:
        missing = [u for u in fold.test if u not in have]
        if missing:
            raise DistillError(f"fold {fold.name}: {len(missing)} test utterances are not in FEATS (e.g. {missing[0]})")
        data = _finetune_data(fold, "test", utts, targets, mods, teachers, vocab, max_samples)
        lens = crop_lengths(data.lengths(), budget)
        for seed in cfg_rec["experiment"]["seeds"]:
            path = exp / "folds" / fold.name / f"seed{seed}" / "model.safetensors"
            if not path.exists():
                continue
            student = load_student(path).to(dev)
            rows += _prediction_rows(student, data, lens, budget, dev, labels.classes, fold.name, seed)
            log(f"[{fold.name} seed {seed}] {len(fold.test)} test utterances")
    if not rows:
        raise DistillError(f"{exp}: no trained run (folds/<fold>/seed<s>/model.safetensors)")
    return rows


# train-stage keys that mean something for CMD fine-tuning (`sertool train --model cmd --init EXP`)
TRAIN_KEYS = {"protocol.name": "finetune.protocol", "protocol.dev_fraction": "finetune.dev_fraction",
              "protocol.dev": "finetune.dev", "data.labels": "finetune.labels", "run.seeds": "finetune.seeds",
              "run.seed": "finetune.seed", "train.epochs": "finetune.epochs", "optim.lr": "finetune.lr",
              "train.early_stopping": "finetune.early_stopping", "train.select_on": "finetune.select_on",
              "run.device": "distill.device", "run.threads": "distill.threads"}


def finetune_overrides(overrides: Iterable[str]) -> list[str]:
    """``sertool train`` overrides -> fine-tuning overrides: finetune.* (and distill.device/threads) as
    they are, the train keys of TRAIN_KEYS renamed; any other key is an error naming it."""
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        key = key.strip()
        if not eq:
            raise DistillError(f"--set {o!r}: expected KEY=VALUE")
        if key.startswith("finetune.") or key in ("distill.device", "distill.threads"):
            out.append(f"{key}={value}")
        elif key in TRAIN_KEYS:
            out.append(f"{TRAIN_KEYS[key]}={value}")
        elif key == "data.feats":
            continue
        else:
            raise DistillError(f"{key}: not a setting of CMD fine-tuning (`--model cmd --init`); use finetune.* keys "
                               f"or {', '.join(TRAIN_KEYS)}")
    return out


def train_from_distillation(init, feats, exp, *, overrides: Iterable[str] = (), overwrite: bool = False,
                            progress: bool = True, log: Callable[[str], None] = print, teacher_text_tokenizer=None,
                            command: str | None = None) -> dict:
    """``sertool train FEATS --model cmd --init INIT -o EXP``: the CMD fine-tuning of INIT's student
    (:func:`run_finetune`) written to EXP, evaluable with ``sertool evaluate EXP``."""
    init, exp = Path(init), Path(exp)
    if not (init / "distill.yaml").exists() or not (init / "student.safetensors").exists():
        raise DistillError(f"--init {init}: not a distillation experiment (no distill.yaml + student.safetensors); "
                           "give the output folder of `sertool distill`")
    if exp.resolve() == init.resolve():
        raise DistillError(f"-o {exp}: give a new folder, not the distillation experiment itself")
    if exp.exists() and any(exp.iterdir()) and not overwrite:
        raise DistillError(f"{exp} already holds an experiment; use --overwrite")
    ft = finetune_overrides(overrides)
    return run_finetune(init, feats, overrides=ft, progress=progress, log=log,
                        teacher_text_tokenizer=teacher_text_tokenizer, out_dir=exp, command=command)


class _TokenizerOnly:
    live = True

    def __init__(self, spec: dict, tokenizer=None):
        from transformers import AutoTokenizer

        if tokenizer is None:
            from sertool.features.hub import resolve_model

            path = resolve_model(spec.get("path") or spec["model"], option="--teacher-text").path
            tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.tokenizer = tokenizer

    def ids(self, text):
        return list(self.tokenizer(text or "", truncation=True, max_length=512)["input_ids"])


def _score(student, data, lengths, budget, device, classes, dominance: bool = False, n_saliency: int = 0) -> dict:
    """Metrics on ``data``; with ``dominance`` also the share of |dL/dlogits| per modality (Table 6)
    and, for the first ``n_saliency`` utterances, the text tokens' saliency (Table 7): |grad . x|
    of the loss w.r.t. the text encoder's output, per token, normalised to sum 1."""
    from sertool import metrics as M

    student.eval()
    # budget_batches groups utterances by length, so predictions are put back in data order
    preds = np.full(len(data), -1, dtype=np.int64)
    grads, saliency = {m: [] for m in student.modalities}, []
    captured = {}
    hook = None
    loss_sum = 0.0
    if dominance and n_saliency and "text" in student.modalities:
        def keep(module, inputs, output):
            x = output[0]
            if not x.requires_grad:
                x.requires_grad_(True)
            x.retain_grad()
            captured["x"] = x
        hook = student.encoders["text"].register_forward_hook(keep)
    try:
        for idx in budget_batches(lengths, budget):
            batch = _to(data.collate(idx, lengths, with_teacher=False), device)
            with torch.enable_grad() if dominance else torch.no_grad():
                logits = student.modality_logits(batch)
                if dominance:  # Table 6: gradient of the loss w.r.t. each modality's logits
                    for v in logits.values():
                        v.retain_grad()
                    F.nll_loss(student.classify(batch, logits), batch["target"], reduction="sum").backward()
                    for m, v in logits.items():
                        grads[m].append(v.grad.abs().sum(-1).detach().cpu())
                    x = captured.pop("x", None)
                    if x is not None and x.grad is not None and len(saliency) < n_saliency:
                        sal = (x.grad * x).sum(-1).abs().detach().cpu().numpy()
                        for b, i in enumerate(idx[: n_saliency - len(saliency)]):
                            n = int(batch["ids_mask"][b].sum())
                            v = sal[b, :n] / max(float(sal[b, :n].sum()), 1e-12)
                            saliency.append({"id": data.ids[int(i)], "label": classes[int(data.targets[int(i)])],
                                             "tokens": data.token_strings(int(i)), "saliency": [round(float(a), 4) for a in v]})
                out = student.classify(batch, logits)
            preds[np.asarray(idx)] = out.argmax(-1).detach().cpu().numpy()
            loss_sum += float(F.nll_loss(out.detach().float(), batch["target"], reduction="sum"))
    finally:
        if hook is not None:
            hook.remove()
    student.zero_grad(set_to_none=True)
    m = M.classification_metrics(data.targets, preds, labels=classes)
    m["loss"] = loss_sum / max(len(data), 1)
    if dominance:
        mean = {k: float(torch.cat(v).mean()) for k, v in grads.items()}
        tot = sum(mean.values()) or 1.0
        m["dominance"] = {k: v / tot for k, v in mean.items()}
        if saliency:
            m["saliency"] = saliency
    return m


def report_markdown(result: dict, rec: dict) -> str:
    s = result["summary"]
    fmt = lambda v: f"{100 * v['mean']:.2f} ± {100 * v['std']:.2f}"
    lines = ["# CMD fine-tuning", "", f"Teachers: " + ", ".join(f"{m}: {t.get('feature') or t.get('model')}"
                                                                for m, t in rec["teachers"].items()),
             f"Runs: {len(result['runs'])} (folds x seeds), model selection on {result['selected_on']}.", "",
             "| class | F1 (%) |", "|---|---|"]
    lines += [f"| {c} | {fmt(v)} |" for c, v in s["per_class_f1"].items()]
    lines += [f"| **macro-F1** | {fmt(s['macro_f1'])} |", "",
              f"UA {fmt(s['UA'])}, WA {fmt(s['WA'])}", "", "## Modality dominance (share of |dL/dlogits|)", "",
              "| modality | share |", "|---|---|"]
    lines += [f"| {m} | {v['mean']:.3f} ± {v['std']:.3f} |" for m, v in s["dominance"].items()]
    examples = [e for r in result["runs"][:1] for e in r["test"].get("saliency", [])]
    if examples:
        lines += ["", "## Token saliency (|grad . x| of the loss at the text input; top 3 in bold)", "",
                  "| label | tokens |", "|---|---|"]
        for e in examples:
            top = set(np.argsort(e["saliency"])[::-1][:3].tolist())
            toks = " ".join(f"**{t}** ({100 * v:.0f}%)" if k in top else t.replace("|", "\\|")
                            for k, (t, v) in enumerate(zip(e["tokens"], e["saliency"])))
            lines.append(f"| {e['label']} | {toks} |")
    p = result.get("parameters") or {}
    if p:
        lines += ["", "## Parameters", "", "| modality | teacher | student |", "|---|---|---|"]
        for m, n in (p.get("student") or {}).items():
            t = (p.get("teacher") or {}).get(m)
            lines.append(f"| {m} | {t if t is not None else 'cached states'} | {n} |")
    return "\n".join(lines) + "\n"
