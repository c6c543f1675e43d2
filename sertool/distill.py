"""The distill stage: Cross-Modal Distillation (CMD, Kim & Kang, Neurocomputing 506, 2022).

    run_distill("feats/rav", "exp/rav-cmd", teacher_audio="whisper", teacher_text="minilm_states")
    run_train("cmd", "feats/rav", "exp/rav-cmd-ft", overrides=["model.init=exp/rav-cmd"])   # fine-tuning

1. Teachers (frozen), one per modality, named by a SPEC:
   * a feature store written by ``sertool extract`` (a store name in FEATS or a ``.h5`` path): the
     cached teacher states (the common case, much faster);
   * a ``transformers`` model (local folder, packaged alias or hub id): a wav2vec2-family audio
     encoder or a BERT-family text encoder, run live on every batch (last hidden state);
   * a teacher fine-tuned on the task, as the paper's are: a ``sertool train`` experiment of
     ``whisper_ft`` (audio) or ``text_ft`` (text), EXP (its deployed model.safetensors) or one of its
     runs, EXP/folds/FOLD/seedS (fold-honest: a run that never saw FOLD's test utterances), run live
     (:class:`WhisperFTTeacher`, :class:`TextFTTeacher`): the layer-weighted states its head pools;
     the experiment (path, weights checksum, model) is recorded in EXP/distill.yaml and in the
     student's input spec.
2. Student (paper Sections 3.1, 4.2; :class:`DistillStudent`): per modality an input encoder:
   the live teacher's own input encoder with its weights (wav2vec2's convolutional feature
   encoder on the waveform; BERT's embedding layer on the token ids; a fine-tuned Whisper's log-Mel
   front end and two convolutions, a fine-tuned BERT's embedding layer), otherwise, for a cached
   teacher, the architecture of its input encoder: Whisper's log-Mel front end and two
   convolutions for a Whisper store (``student.audio_stem=logmel``, the ``auto`` choice), with the
   checkpoint's own convolution weights when the store names a Whisper checkpoint that is here
   (``student.audio_stem_init``), a convolutional stem on the waveform at the teacher's frame rate
   for any other store (``waveform``), and for text a token embedding (plus sinusoidal positions,
   as BERT's embedding layer has positions) over the cached store's tokens; then the CMD core
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
6. Fine-tuning is the train stage's: ``sertool train FEATS -m cmd --init EXP``
   (:class:`sertool.models.cmd.CMD`), with its protocols, seeds, resume and evaluation.

Not specified by the paper (sertool choices, documented in docs/distill.md): cosine similarity,
student-to-teacher direction only (``distill.symmetric=true`` adds teacher-to-student), per-
utterance waveform normalisation (zero mean, unit variance) for every student and live teacher,
input encoders trained with the rest (``student.freeze_input_encoders=true`` freezes them).
"""

from __future__ import annotations

import copy
import datetime as _dt
import json
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

from sertool.batching import budget_batches, crop_lengths
from sertool.data import to_device
from sertool.locks import locking
from sertool.models.cmd import DistillStudent, count_parameters, modality_parameters, save_student
from sertool.models.cmd_inputs import (
    SAMPLE_RATE,
    TeacherTokenEncoder,
    TeacherWaveEncoder,
    TokenEmbedding,
    WaveStem,
    _module_spec,
    logmel_stem_for,
    stem_layers,
)
from sertool.train import STAGE_DEFAULTS, Schedule
from sertool.utils import DeviceError, pick_device, show_bar, write_json, write_text

MODALITIES = ("audio", "text")
# The student and the schedule: written once, in sertool/conf/stages/distill.yaml.
DEFAULTS: dict = yaml.safe_load((Path(__file__).resolve().parent / "conf" / "stages" / "distill.yaml").read_text())


class DistillError(ValueError):
    """A problem with the distillation's inputs or settings, raised before training."""


# =================================================================================== loss
def contrastive_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    mask: torch.Tensor | None = None,
    kappa: float = 0.05,
    similarity: str = "cosine",
    symmetric: bool = False,
) -> torch.Tensor:
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
        logits = torch.einsum("itd,jtd->tij", a, b) / kappa  # [T, B(anchor), B(candidate)]
        logits = logits.masked_fill(~valid[:, None, :], -1e9)  # padded candidates are no negatives
        pos = logits.log_softmax(-1).diagonal(dim1=1, dim2=2)  # [T, B]
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
        self.spec = {
            "type": "store",
            "path": str(Path(path).resolve()),
            "feature": store.attrs.get("feature"),
            "dim": self.dim,
            "frame_rate_hz": self.frame_rate_hz,
            "extractor": store.attrs.get("extractor"),
        }
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
        raise DistillError(
            f"teacher {modality}: cannot load a transformers model from {resolved.path} ({type(e).__name__}: {e})"
        ) from None
    return model, resolved


class LiveAudioTeacher:
    """A wav2vec2-family encoder run on every batch (last hidden state, 50 Hz)."""

    live = True

    def __init__(self, spec, device="cpu"):
        model, resolved = _load_transformers(spec, "audio")
        if not hasattr(model, "_get_feat_extract_output_lengths") or not hasattr(model, "feature_extractor"):
            raise DistillError(
                f"teacher audio: {type(model).__name__} is not a wav2vec2-family encoder "
                "(for Whisper, extract `-f whisper` and give the store as the teacher)"
            )
        self.model = model.eval() if device is None else model.eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        cfg = model.config
        self.dim = int(cfg.hidden_size)
        self.frame_rate_hz = SAMPLE_RATE / float(np.prod(cfg.conv_stride))
        self.can_mask = getattr(cfg, "feat_extract_norm", "group") == "layer"
        self.n_parameters = sum(p.numel() for p in model.parameters())
        self.spec = {
            "type": "transformers",
            "model": str(spec) if resolved is None else str(resolved.name),
            "path": None if resolved is None else resolved.record,
            "dim": self.dim,
            "frame_rate_hz": self.frame_rate_hz,
        }
        if resolved is None:
            self.spec["model"] = type(model).__name__

    def input_encoder(self) -> nn.Module:
        cfg = self.model.config
        return TeacherWaveEncoder(
            copy.deepcopy(self.model.feature_extractor),
            cfg.conv_kernel,
            cfg.conv_stride,
            int(cfg.conv_dim[-1]),
            spec=_module_spec(self.model.feature_extractor, cfg),
        )

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
        self.tokenizer = tokenizer or (
            AutoTokenizer.from_pretrained(str(resolved.path), local_files_only=True) if resolved is not None else None
        )
        self.dim = int(model.config.hidden_size)
        self.max_length = int(getattr(model.config, "max_position_embeddings", 512) or 512)
        self.n_parameters = sum(p.numel() for p in model.parameters())
        self.spec = {
            "type": "transformers",
            "model": type(model).__name__ if resolved is None else str(resolved.name),
            "path": None if resolved is None else resolved.record,
            "dim": self.dim,
        }

    def input_encoder(self) -> nn.Module:
        return TeacherTokenEncoder(
            copy.deepcopy(self.model.embeddings), spec=_module_spec(self.model.embeddings, self.model.config)
        )

    def ids(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise DistillError("teacher text: no tokenizer")
        return list(self.tokenizer(text or "", truncation=True, max_length=self.max_length)["input_ids"])

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor):
        out = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        return out.float(), mask


# ----------------------------------------------------------------------------- fine-tuned teachers
TEACHING_MODELS = {"audio": "whisper_ft", "text": "text_ft"}  # train-stage models that can teach, per modality


def experiment_of(spec) -> tuple[Path, Path] | None:
    """(experiment folder, weights file) when SPEC names a ``sertool train`` experiment: EXP (its
    deployed ``model.safetensors``) or one of its runs, ``EXP/folds/FOLD/seedS`` (the fold-honest
    choice) or ``EXP/final``; None for anything else.  A ``sertool distill`` folder is refused."""
    if spec is None or isinstance(spec, nn.Module):
        return None
    p = Path(str(spec))
    if not p.is_dir():
        return None
    if (p / "config.yaml").exists():
        return p, p / "model.safetensors"
    if len(p.resolve().parents) > 2 and p.resolve().parents[1].name == "folds":
        exp = p.resolve().parents[2]
        if (exp / "config.yaml").exists():
            return exp, p / "model.safetensors"
    if p.resolve().name == "final" and (p.resolve().parent / "config.yaml").exists():
        return p.resolve().parent, p / "model.safetensors"
    if (p / "distill.yaml").exists():
        raise DistillError(
            f"{p} is a `sertool distill` experiment: its student cannot teach; give a fine-tuned "
            f"{' or '.join(TEACHING_MODELS.values())} experiment (sertool train -m ...)"
        )
    return None


class ExperimentTeacher:
    """A teacher fine-tuned on the task by the train stage (the paper fine-tunes its teachers before
    distilling): a ``whisper_ft`` (audio) or ``text_ft`` (text) experiment, rebuilt from its
    config.yaml and weights as ``sertool evaluate`` rebuilds a run, frozen, run live on every batch.
    Its states are the layer-weighted states the experiment's head pools (its own learned layer
    weights), with their mask; its input encoder (for the student) carries the fine-tuned weights."""

    live = True
    max_samples = 0  # > 0: the longest clip (samples) the teacher reads

    def __init__(self, exp: Path, weights: Path, modality: str, device="cpu"):
        from sertool.audio import file_checksum
        from sertool.config import load_config_file
        from sertool.train import build, load_weights

        want = TEACHING_MODELS[modality]
        try:
            cfg = load_config_file(exp / "config.yaml")
            name = (cfg.get("model") or {}).get("name")
        except (ValueError, AttributeError) as e:
            raise DistillError(f"teacher {modality}: {exp}/config.yaml is unreadable ({e})") from None
        if name != want:
            raise DistillError(
                f"teacher {modality}: {exp} is a {name!r} experiment; only fine-tuned encoders can teach: "
                + ", ".join(f"{m} {n} (--teacher-{m})" for m, n in TEACHING_MODELS.items())
            )
        if not weights.exists():
            raise DistillError(
                f"teacher {modality}: {weights} is missing (an unfinished training? give EXP or a run "
                "EXP/folds/FOLD/seedS that holds model.safetensors)"
            )
        try:
            model = build(cfg)
            load_weights(model, weights)
        except Exception as e:  # noqa: BLE001 - a missing checkpoint/tokenizer, weights of another model
            first = " ".join(str(e).split())[:200] or type(e).__name__
            raise DistillError(f"teacher {modality}: cannot rebuild {exp}'s {name} model ({first})") from None
        self.model = model.eval() if device is None else model.eval().to(device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.modality, self.cfg, self.exp, self.weights = modality, cfg, exp, weights
        self.n_parameters = sum(p.numel() for p in self.model.encoder.parameters())
        try:
            run = str(Path(weights).resolve().relative_to(Path(exp).resolve()))
        except ValueError:
            run = str(Path(weights).resolve())
        self.record = {
            "experiment": str(Path(exp).resolve()),
            "weights": run,
            "checksum": file_checksum(weights),
            "model_name": name,
        }
        self.spec = {"type": "experiment", **self.record}

    def layer_weights(self) -> torch.Tensor:
        return self.model.layer_weights[self.modality].weights()


class WhisperFTTeacher(ExperimentTeacher):
    """A ``whisper_ft`` experiment: the fine-tuned encoder's layer-weighted states (50 Hz) of each clip
    (scaled and turned into its own log-Mel frames as the model does), real states masked; the
    student's log-Mel stem starts from the fine-tuned ``conv1``/``conv2``."""

    def __init__(self, exp: Path, weights: Path, device="cpu"):
        super().__init__(exp, weights, "audio", device)
        enc = self.model.encoder
        self.dim = int(enc.dim)
        self.frame_rate_hz = 50.0  # Whisper's 10 ms Mel frames, halved by conv2
        self.max_samples = int(enc.max_mel_frames) * 160  # the encoder's 30 s window
        self.spec.update(model=str(self.cfg["model"].get("encoder")), dim=self.dim, frame_rate_hz=self.frame_rate_hz)

    def input_encoder(self) -> nn.Module:
        from sertool.models.cmd_inputs import LogMelStem
        from sertool.models.whisper_ft import WAVE_RMS

        stem = LogMelStem.from_whisper(self.model.encoder, scale=WAVE_RMS)
        stem.spec["init"] = dict(self.record)
        return stem

    @torch.no_grad()
    def __call__(self, wave: torch.Tensor, mask: torch.Tensor):
        from sertool.models.whisper_ft import WAVE_RMS

        enc = self.model.encoder
        host, n = wave.detach().float().cpu().numpy(), mask.long().sum(1).tolist()
        mel, frames = enc.log_mel([host[i, : int(k)] * WAVE_RMS for i, k in enumerate(n)])
        device = next(self.model.parameters()).device
        states = enc(mel.to(device), frames.to(device))
        x = torch.einsum("lbtd,l->btd", torch.stack(states), self.layer_weights().to(states[0].dtype))
        n_states = (frames.to(device) + 1) // 2
        tmask = torch.arange(x.shape[1], device=device)[None, :] < n_states[:, None]
        return x.float(), tmask


class TextFTTeacher(ExperimentTeacher):
    """A ``text_ft`` experiment: the fine-tuned encoder's layer-weighted token states (the experiment's
    tokenizer, special tokens included) with the token mask; the student's input encoder is the
    fine-tuned embedding layer and reads the same tokenizer's ids."""

    def __init__(self, exp: Path, weights: Path, device="cpu"):
        from sertool.data import load_tokenizer

        super().__init__(exp, weights, "text", device)
        target = str((self.cfg.get("data") or {}).get("text") or f"tokenizer:{self.cfg['model']['encoder']}")
        target = target.partition(":")[2] if target.startswith("tokenizer:") else str(self.cfg["model"]["encoder"])
        try:
            self.tokenizer, self.limit, _ = load_tokenizer(target)
        except Exception as e:  # noqa: BLE001 - a tokenizer folder that is gone
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise DistillError(f"teacher text: cannot load {exp}'s tokenizer {target!r}: {first}") from None
        self.dim = int(self.model.encoder.config.hidden_size)
        self.frame_rate_hz = None
        # "model": the tokenizer the student reads (sertool train -m cmd: data.text tokenizer:MODEL)
        self.spec.update(model=target, dim=self.dim)

    def input_encoder(self) -> nn.Module:
        emb = self.model.encoder.embeddings
        enc = TeacherTokenEncoder(copy.deepcopy(emb), spec=_module_spec(emb, self.model.encoder.config))
        enc.spec["init"] = dict(self.record)
        return enc

    def ids(self, text: str) -> list[int]:
        from sertool.data import token_ids

        return token_ids(self.tokenizer, text, self.limit)[0].tolist()

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, mask: torch.Tensor):
        out = self.model.encoder(input_ids=ids.long(), attention_mask=mask.long(), output_hidden_states=True)
        states = out.hidden_states
        x = torch.einsum("lbtd,l->btd", torch.stack(states), self.layer_weights().to(states[0].dtype))
        return x.float(), mask.bool()


def open_experiment_teacher(exp: Path, weights: Path, modality: str, device="cpu") -> ExperimentTeacher:
    return (WhisperFTTeacher if modality == "audio" else TextFTTeacher)(exp, weights, device)


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
    """A teacher SPEC: a store in FEATS / a .h5 path (cached states), a fine-tuned ``whisper_ft`` /
    ``text_ft`` experiment (or one of its runs), or a transformers model."""
    if spec is None:
        raise DistillError(f"no teacher given for the {modality} student (--teacher-{modality} SPEC)")
    store = _is_store(spec, feats)
    if store is not None:
        return CachedTeacher(store, modality, only)
    found = experiment_of(spec)
    if found is not None:
        return open_experiment_teacher(*found, modality, device)
    return LiveAudioTeacher(spec, device) if modality == "audio" else LiveTextTeacher(spec, device)


# =================================================================================== student
def make_student(
    student_cfg: dict, teachers: dict, train_ids: Iterable[str] = ()
) -> tuple[DistillStudent, dict | None]:
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
            if stem == "logmel":  # with the Whisper checkpoint's own front-end weights when it is here
                try:
                    encoders[m] = logmel_stem_for(t.spec.get("extractor") or {}, t.frame_rate_hz, student_cfg)
                except ValueError as e:
                    raise DistillError(f"teacher store {t.path}: {e}") from None
            else:
                encoders[m] = WaveStem(int(student_cfg["stem_channels"]), stem_layers(t.frame_rate_hz))
        else:
            vocab = build_vocab(t, train_ids)
            encoders[m] = TokenEmbedding(len(vocab), int(student_cfg["text_embed_dim"]))
        inputs[m] = encoders[m].spec
    return DistillStudent({"student": copy.deepcopy(student_cfg), "inputs": inputs}, encoders), vocab


class Distiller(nn.Module):
    """Student + the linear maps g (teacher and student streams -> d_z) + the loss."""

    def __init__(
        self,
        student: DistillStudent,
        teacher_dims: dict[str, int],
        d_z: int = 32,
        kappa: float = 0.05,
        similarity: str = "cosine",
        symmetric: bool = False,
    ):
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
    """Student inputs (waveforms, token ids) and cached teacher states of utterances.  Waveforms
    are read as the train stage's ``wave`` input reads them (:class:`sertool.data.WaveSource`)."""

    def __init__(self, utts, modalities, teachers: dict, vocab: dict | None = None, max_audio_samples: int = 0):
        from sertool.data import DataError, WaveSource

        self.utts = list(utts)
        self.ids = [u.id for u in self.utts]
        self.modalities = tuple(modalities)
        self.teachers = teachers
        self.vocab = vocab
        self.max_audio_samples = int(max_audio_samples or 0)
        try:
            self.waves = WaveSource(self.utts, sample_rate=SAMPLE_RATE) if "audio" in self.modalities else None
        except DataError as e:
            raise DistillError(str(e)) from None
        self._ids: dict[str, np.ndarray] = {}

    def __len__(self):
        return len(self.utts)

    # ---------------------------------------------------------------- student inputs
    def wave(self, i: int) -> np.ndarray:
        x = self.waves.get(self.ids[i])
        return x[: self.max_audio_samples] if self.max_audio_samples else x

    def token_ids(self, i: int) -> np.ndarray:
        u = self.utts[i]
        if u.id not in self._ids:
            t = self.teachers["text"]
            ids = [self.vocab.get(tok, 1) for tok in t.tokens(u.id)] if isinstance(t, CachedTeacher) else t.ids(u.text)
            if not ids:
                raise DistillError(f"utterance {u.id!r} has no text tokens")
            self._ids[u.id] = np.asarray(ids, np.int64)
        return self._ids[u.id]

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

    def collate(self, idx, lengths: np.ndarray | None = None) -> dict:
        """``audio``/``text`` (+ masks) as the student reads them, and ``t_<modality>`` cached states."""
        idx = [int(i) for i in idx]
        batch: dict = {"uids": [self.ids[i] for i in idx]}
        if "audio" in self.modalities:
            waves = [self.wave(i) for i in idx]
            if lengths is not None:  # the batcher's (cropped) lengths: never over budget
                waves = [w[: int(lengths[i])] for w, i in zip(waves, idx)]
            batch["audio"], batch["audio_mask"] = _pad([torch.from_numpy(w) for w in waves])
        if "text" in self.modalities:
            batch["text"], batch["text_mask"] = _pad([torch.from_numpy(self.token_ids(i)) for i in idx])
        for m in self.modalities:
            t = self.teachers[m]
            if isinstance(t, CachedTeacher):
                batch[f"t_{m}"], batch[f"t_{m}_mask"] = _pad(
                    [torch.from_numpy(np.asarray(t.states(self.ids[i]))) for i in idx]
                )
        return batch

    def teacher_states(self, batch: dict) -> dict:
        out = {}
        for m in self.modalities:
            t = self.teachers[m]
            out[m] = (
                (batch[f"t_{m}"], batch[f"t_{m}_mask"])
                if isinstance(t, CachedTeacher)
                else t(batch[m], batch[f"{m}_mask"])
            )
        return out


def _pad(seqs: list[torch.Tensor]):
    T = max(int(s.shape[0]) for s in seqs)
    x = torch.zeros((len(seqs), T, *seqs[0].shape[1:]), dtype=seqs[0].dtype)
    mask = torch.zeros((len(seqs), T), dtype=torch.bool)
    for b, s in enumerate(seqs):
        x[b, : s.shape[0]] = s
        mask[b, : s.shape[0]] = True
    return x, mask


def build_vocab(teacher: CachedTeacher, ids: Iterable[str]) -> dict[str, int]:
    """Token -> index (0 = padding, 1 = unknown), in order of first appearance."""
    vocab = {"<pad>": 0, "<unk>": 1}
    for uid in ids:
        for tok in teacher.tokens(uid):
            vocab.setdefault(tok, len(vocab))
    return vocab


# =================================================================================== config
def resolve_config(config_file=None, overrides: Iterable[str] = ()) -> dict:
    from sertool.config import apply_overrides, load_config_file, merge

    cfg = copy.deepcopy(DEFAULTS)
    if config_file is not None:
        user = load_config_file(config_file)
        if "finetune" in user and "experiment" not in user:  # a user's file, not an older EXP/distill.yaml
            raise DistillError(
                f"{config_file}: fine-tuning settings (finetune:) belong to the train stage now: "
                "sertool train FEATS -m cmd --init EXP (optim.lr, train.epochs, ... in its --config)"
            )
        user = {k: v for k, v in user.items() if k in DEFAULTS}  # the rest of an EXP/distill.yaml is its record
        try:
            merge(cfg, user)
        except ValueError as e:
            raise DistillError(f"{config_file}: {e}") from None
    apply_overrides(cfg, list(overrides))
    if cfg["distill"]["similarity"] not in ("cosine", "dot"):
        raise DistillError(f"distill.similarity must be cosine or dot, got {cfg['distill']['similarity']!r}")
    if cfg["student"]["fusion"] not in ("early", "late"):
        raise DistillError(f"student.fusion must be early or late, got {cfg['student']['fusion']!r}")
    if float(cfg["distill"]["kappa"]) <= 0:
        raise DistillError("distill.kappa must be > 0")
    return cfg


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
@locking("distill", lambda a: [a["exp"]], hint="wait for it or use another -o")
def run_distill(
    feats,
    exp,
    *,
    teacher_audio=None,
    teacher_text=None,
    config_file=None,
    overrides: Iterable[str] = (),
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    utts=None,
) -> dict:
    """Distil the teachers into a student: FEATS -> EXP/student.safetensors (best val loss)."""
    from sertool.corpora.base import read_manifest

    t0 = time.time()
    cfg = resolve_config(config_file, overrides)
    d, s = cfg["distill"], cfg["student"]
    if int(cfg["distill"]["epochs"]) < 1:
        raise DistillError(f"distill.epochs = {cfg['distill']['epochs']!r}: must be at least 1")
    feats = Path(feats) if feats is not None else None
    exp = Path(exp)
    if utts is None:
        if feats is None or not (feats / "manifest.jsonl").exists():
            raise DistillError(f"{feats}: no manifest.jsonl (give FEATS, the output of `sertool extract`)")
        utts = read_manifest(feats / "manifest.jsonl")
    if exp.exists() and any(exp.iterdir()) and not overwrite:
        raise DistillError(f"{exp} already holds an experiment; use --overwrite")
    mods = list(s["modalities"])
    try:
        device = pick_device(d["device"])
    except DeviceError as e:
        raise DistillError(str(e)) from None
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
    distiller = Distiller(
        student, {m: teachers[m].dim for m in mods}, d["d_z"], d["kappa"], d["similarity"], d["symmetric"]
    ).to(device)
    max_samples = int(round(float(d["max_audio_s"] or 0) * SAMPLE_RATE))
    for t in teachers.values():  # a teacher with a window (whisper_ft's 30 s): clips cut to it
        if getattr(t, "max_samples", 0) and (not max_samples or max_samples > t.max_samples):
            max_samples = int(t.max_samples)
    if max_samples:  # recorded as applied: the student's fine-tuning (train -m cmd --init) crops the same
        d["max_audio_s"] = max_samples / SAMPLE_RATE
    train = DistillData(train_utts, mods, teachers, vocab, max_samples)
    dev = DistillData(dev_utts, mods, teachers, vocab, max_samples)
    budget = int(d["budget"] if "audio" in mods else d["text_budget"])
    train_len, dev_len = crop_lengths(train.lengths(), budget), crop_lengths(dev.lengths(), budget)
    mk = lambda data, lens, ep, sh: budget_batches(
        lens, budget, shuffle=sh, seed=int(d["seed"]), epoch=ep, measure=d["measure"]
    )
    spe = len(mk(train, train_len, 0, True))
    # the paper's schedule: linear warm-up, then linear decay to 0 (the train stage's warmup_linear)
    schedule = Schedule(
        {**STAGE_DEFAULTS["schedule"], "name": "warmup_linear", "warmup_epochs": d["warmup_epochs"]},
        float(d["lr"]),
        spe,
        int(d["epochs"]),
        higher_is_better=False,
    )
    opt = torch.optim.Adam([p for p in distiller.parameters() if p.requires_grad], lr=float(d["lr"]))

    if exp.exists() and any(exp.iterdir()):
        shutil.rmtree(exp)
    exp.mkdir(parents=True, exist_ok=True)
    params = {
        "student": modality_parameters(student),
        "student_total": count_parameters(student),
        "teacher": {m: teachers[m].n_parameters for m in mods},
    }
    record = {
        **cfg,
        "inputs": inputs,
        "teachers": {m: teachers[m].spec for m in mods},
        "data": {"feats": str(feats.resolve()) if feats else None, "train": len(train_utts), "dev": len(dev_utts)},
        "parameters": params,
        "experiment": {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "device": str(device),
            "sertool": __import__("sertool").__version__,
            "torch": torch.__version__,
        },
    }
    write_text(exp / "distill.yaml", yaml.safe_dump(json.loads(json.dumps(record, default=str)), sort_keys=False))
    if vocab is not None:
        write_json(exp / "vocab.json", vocab, indent=None)
    log_path = exp / "distill_log.jsonl"
    log_path.write_text("")
    from tqdm.auto import tqdm

    step, best, best_epoch, history = 0, None, -1, []
    for epoch in range(int(d["epochs"])):
        distiller.train()
        batches = mk(train, train_len, epoch, True)
        total, n, te = 0.0, 0, time.time()
        for idx in tqdm(
            batches, desc=f"distill ep{epoch + 1}/{d['epochs']}", disable=not show_bar(progress), leave=False
        ):
            batch = to_device(train.collate(idx, train_len), device)
            teacher = train.teacher_states(batch)
            lr = schedule.lr(step)
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
        row = {
            "epoch": epoch,
            "lr": lr,
            "train_loss": total / max(n, 1),
            "val_loss": val["loss"],
            **{f"val_loss_{m}": v for m, v in val["parts"].items()},
            "best": improved,
            "seconds": round(seconds, 3),
            "utts_per_s": round(n / max(seconds, 1e-9), 2),
        }
        history.append(row)
        with open(log_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if progress:
            log(
                f"epoch {epoch}: train loss {row['train_loss']:.4f}, val loss {val['loss']:.4f}"
                f"{' *' if improved else ''} ({row['utts_per_s']:.1f} utt/s)"
            )
    metrics = {
        "best_epoch": best_epoch,
        "best_val_loss": best,
        "first_train_loss": history[0]["train_loss"] if history else None,
        "last_train_loss": history[-1]["train_loss"] if history else None,
        "parameters": params,
        "utts_per_s": float(np.mean([h["utts_per_s"] for h in history])) if history else None,
        "seconds": round(time.time() - t0, 2),
    }
    write_json(exp / "distill_metrics.json", metrics)
    for t in teachers.values():
        if isinstance(t, CachedTeacher):
            t.store.close()
    return metrics


@torch.no_grad()
def evaluate_loss(distiller: Distiller, data: DistillData, lengths, budget, measure, device) -> dict:
    distiller.eval()
    total, parts, n = 0.0, {}, 0
    for idx in budget_batches(lengths, budget, measure=measure):
        batch = to_device(data.collate(idx, lengths), device)
        loss, p = distiller(batch, data.teacher_states(batch))
        total += float(loss) * len(idx)
        for m, v in p.items():
            parts[m] = parts.get(m, 0.0) + float(v) * len(idx)
        n += len(idx)
    return {"loss": total / max(n, 1), "parts": {m: v / max(n, 1) for m, v in parts.items()}}
