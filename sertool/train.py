"""The train stage: FEATS -> EXP, over the folds of a protocol and repeated seeds.

    run_train("lgcct", "feats/mosei", "exp/lgcct", overrides=["data.audio=covarep", ...])

1. Resolve the config: the model's YAML (sertool/conf/<key>.yaml), the train-stage defaults
   below (``data``, ``protocol``, ``run`` sections and the extra ``optim``/``schedule``/
   ``train`` keys), a user YAML (``--config``), then ``--set key=value``.  Unknown keys are
   rejected with the key named.
2. Read the manifest and apply the label set; open the feature stores named in ``data`` (one per
   modality the model consumes); make the protocol's folds.  Every input error (missing store,
   ids that do not match, a class absent from a training split, an empty split) is raised here,
   before any training starts.
3. Write EXP/config.yaml (resolved config + feature provenance copied from the stores' attrs +
   the label set) and EXP/folds.json (the exact ids of every split).
4. For every fold x seed: normalisation statistics from the fold's training split only
   (EXP/folds/<fold>/norm.safetensors); train with early stopping / model selection on the dev
   split (never the test split); checkpoint every epoch (safetensors, atomic); finally evaluate
   the selected model on the test split.  EXP/folds/<fold>/seed<s>/{model.safetensors,
   log.jsonl, metrics.json}.
5. EXP/metrics.json (per run and mean +/- std), EXP/log.jsonl, and the deployment model:
   EXP/model.safetensors + EXP/norm.safetensors + EXP/predictor.json = the run (fold, seed) with
   the best *dev* score (``run.final: best-dev``), chosen without looking at any test score; or
   (``run.final: all``) one more model trained on every labelled utterance, normalised with
   statistics of all of them, for the median of the runs' selected epoch counts (EXP/final/); the
   cross-validation metrics stay those of the fold x seed runs.

``--resume`` continues an interrupted experiment: finished runs are skipped, an unfinished run
restarts from its last end-of-epoch checkpoint, which holds the model, optimiser, schedule,
early-stopping state and the RNG state, so the result equals that of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from sertool import distributed as D
from sertool import metrics as M
from sertool.config import apply_overrides, load_config_file, merge_file
from sertool.corpora.base import read_manifest
from sertool.data import (
    MODALITIES,
    AugmentedSource,
    DataError,
    DegradedWaveSource,
    Normalizer,
    SERDataset,
    Source,
    SpeakerNormalizedSource,
    augmented_id,
    check_ids,
    distributed_batch_indices,
    iterate_batches,
    open_sources,
    source_id,
    speaker_statistics,
    to_device,
)
from sertool.labels import LabelSet, label_set
from sertool.labels import apply as apply_labels
from sertool.locks import OutputBusy, OutputLock
from sertool.protocols import Fold, make_folds
from sertool.utils import (
    DeviceError,
    append_jsonl,
    atomic_path,
    json_default,
    save_tensors,
    show_bar,
    write_json,
    write_jsonl,
    write_text,
)
from sertool.utils import (
    pick_device as _pick_device,
)
from sertool.weights import load_tensors

# Keys the train stage adds to every model config (the model YAML's own values win): written once,
# in sertool/conf/stages/train.yaml.
STAGE_DEFAULTS: dict[str, dict] = yaml.safe_load(
    (Path(__file__).resolve().parent / "conf" / "stages" / "train.yaml").read_text()
)
# Sections of EXP/config.yaml that record what happened (not settings); ignored when the file is
# given back as --config.
RECORD_KEYS = ("features", "label_set", "experiment")


class TrainError(ValueError):
    """A problem with the experiment's inputs or settings, found before training."""


# ----------------------------------------------------------------------------------- config
def _fill(cfg: dict, defaults: dict) -> None:
    for k, v in defaults.items():
        if k not in cfg:
            cfg[k] = copy.deepcopy(v)
        elif isinstance(v, dict) and isinstance(cfg[k], dict):
            _fill(cfg[k], v)


def resolve_config(model: str, config_file: str | os.PathLike | None = None, overrides: Iterable[str] = ()) -> dict:
    """Model defaults + stage defaults + user YAML + ``key=value`` overrides (strict keys)."""
    from sertool.models.registry import default_config

    cfg = default_config(model)
    _fill(cfg, STAGE_DEFAULTS)
    if config_file is not None:
        if not Path(config_file).exists():
            raise TrainError(f"config file {config_file} does not exist")
        try:
            merge_file(cfg, config_file, ignore=RECORD_KEYS)
        except ValueError as e:
            raise TrainError(str(e)) from None
    apply_overrides(cfg, list(overrides))
    prepare_model_config(cfg)
    follow_inputs(cfg)
    return cfg


def _model_class(cfg: dict):
    from sertool.models.registry import _REGISTRY, list_models

    list_models()  # imports every model module
    return _REGISTRY[cfg["model"]["name"]]


def prepare_model_config(cfg: dict) -> None:
    """A model whose inputs or architecture come from elsewhere fills its config here, before any
    input is read (``prepare_config(cfg)`` classmethod; e.g. ``cmd`` reads its distilled student
    from ``model.init``).  Its errors are TrainErrors."""
    from sertool.models.owned import prepare_encoders, requested

    hook = getattr(_model_class(cfg), "prepare_config", None)
    try:
        if requested(cfg["model"]):  # model.input_encoders: the model on encoders it owns
            prepare_encoders(cfg)
        if hook is not None:
            hook(cfg)
    except (ValueError, OSError) as e:
        raise TrainError(str(e)) from None


def follow_inputs(cfg: dict) -> None:
    """Modalities follow the inputs given: a model with a ``modalities`` list whose stores are named
    for only some of them runs on those (``-m self_attn --audio mfcc`` is the audio-only model),
    unless ``model.modalities`` was set explicitly; a model that cannot drop a modality says so."""
    from sertool.models.registry import default_config

    m = cfg["model"]
    given = [x for x in MODALITIES if cfg["data"].get(x)]
    if "modalities" not in m or not given or set(given) == set(m["modalities"]):
        return
    if list(m["modalities"]) != list(default_config(m["name"])["model"]["modalities"]):
        return  # set by the user: load_inputs names a missing store
    wanted = [x for x in m["modalities"] if x in given] or given
    try:
        with torch.device("meta"):
            build({**cfg, "model": {**m, "modalities": wanted}})
    except (ValueError, KeyError) as e:
        missing = [x for x in m["modalities"] if x not in given]
        raise TrainError(
            f"model {m['name']!r} consumes {', '.join(m['modalities'])}; it cannot run without "
            f"{', '.join(missing)} ({e}); give --{missing[0]} STORE"
        ) from None
    m["modalities"] = wanted


def model_modalities(cfg: dict) -> list[str]:
    m = cfg["model"]
    if "modalities" in m:
        return list(m["modalities"])
    if "modality" in m:
        return [m["modality"]]
    raise TrainError(f"model {m.get('name')!r} config has neither model.modalities nor model.modality")


def _dim_key(cfg: dict, modality: str) -> str:
    if f"{modality}_dim" in cfg["model"]:
        return f"{modality}_dim"
    if "input_dim" in cfg["model"]:
        return "input_dim"
    raise TrainError(f"model {cfg['model']['name']!r} has no {modality}_dim/input_dim key")


def _layers_key(cfg: dict, modality: str) -> str | None:
    """The model key that takes the layer count of a stacked-layer store, if the model has one:
    ``layers`` beside ``input_dim``, ``{modality}_layers`` beside ``{modality}_dim``."""
    key = "layers" if _dim_key(cfg, modality) == "input_dim" else f"{modality}_layers"
    return key if key in cfg["model"] else None


def _task(cfg: dict) -> str:
    return cfg["model"].get("task", "classification")


# ----------------------------------------------------------------------------------- inputs
@dataclass
class Inputs:
    """Everything read from FEATS for an experiment."""

    utts: list
    targets: list
    labels: LabelSet
    sources: dict[str, Source]
    folds: list[Fold] = field(default_factory=list)
    dropped_missing: list[str] = field(default_factory=list)
    augment_copies: int = 0  # data.augment: degraded copies per training utterance (AugmentedSource)

    def training_ids(self, ids: list[str]) -> list[str]:
        """``ids`` followed by their degraded copies (data.augment) that every source holds."""
        copies = [
            augmented_id(u, k)
            for k in range(self.augment_copies)
            for u in ids
            if all(augmented_id(u, k) in s for s in self.sources.values())
        ]
        return list(ids) + copies

    @property
    def target_of(self) -> dict:
        return {u.id: t for u, t in zip(self.utts, self.targets)}


def load_inputs(
    cfg: dict,
    feats: str | os.PathLike | None = None,
    *,
    make_protocol: bool = True,
    only: set[str] | None = None,
    augment: bool | None = None,
) -> Inputs:
    """Manifest, labels, stores and folds for ``cfg``; every input error is raised here. The
    degraded training copies of ``data.augment`` are opened for training (``augment``, by default
    when the folds are made), not for evaluation."""
    data = cfg["data"]
    feats = Path(feats or data.get("feats") or "")
    if not str(feats) or not feats.is_dir():
        raise TrainError(f"features folder {str(feats)!r} does not exist (give FEATS, the output of `sertool extract`)")
    utts = read_manifest(feats / "manifest.jsonl")
    regression = _task(cfg) == "regression"
    preset = data["labels"]
    if preset == "auto" and regression:
        preset = "mosei"
    labels = label_set(preset, utts)
    if labels.regression != regression:
        hint = (
            "--set model.task=regression --set train.loss=l1"
            if labels.regression
            else "--set model.task=classification --set train.loss=ce (or --labels mosei for scores)"
        )
        raise TrainError(
            f"label set {labels.name!r} is {'a regression' if labels.regression else 'categorical'} but "
            f"model.task is {_task(cfg)!r}; use {hint}"
        )
    loss = cfg["train"]["loss"]
    if regression and loss not in ("l1", "mse"):
        raise TrainError(f"train.loss {loss!r} does not fit a regression model; use l1 or mse")
    if not regression and loss not in ("ce", "nll"):
        raise TrainError(f"train.loss {loss!r} does not fit a classifier; use ce (or nll); e.g. --set train.loss=ce")
    utts, targets = apply_labels(labels, utts)
    all_utts = list(utts)  # speaker statistics use every utterance of a speaker, whatever `only` keeps
    if only is not None:
        keep = [i for i, u in enumerate(utts) if u.id in only]
        utts, targets = [utts[i] for i in keep], [targets[i] for i in keep]
    mods = model_modalities(cfg)
    for m in mods:
        if not data.get(m):
            raise TrainError(
                f"model {cfg['model']['name']!r} consumes {', '.join(mods)} but no feature store is "
                f"named for {m} (use --{m} NAME or --set data.{m}=NAME)"
            )
    spec = {m: data[m] for m in mods}
    try:
        sources = open_sources(
            feats, spec, preload=data["preload"], only={u.id for u in utts}, utts=all_utts, vocab=data.get("vocab")
        )
        dropped: list[str] = []
        if data["missing"] == "drop":
            dropped = [u.id for u in utts if any(u.id not in s for s in sources.values())]
            if dropped:
                keep = [i for i, u in enumerate(utts) if u.id not in set(dropped)]
                utts, targets = [utts[i] for i in keep], [targets[i] for i in keep]
        elif data["missing"] != "error":
            raise TrainError(f"data.missing must be error or drop, got {data['missing']!r}")
        check_ids(sources, [u.id for u in utts])
        check_wave_lengths(cfg, sources, utts)
        sources = speaker_normalize(sources, feats, spec, data, all_utts)
        copies = data.get("augment") or []
        copies = [copies] if isinstance(copies, str) else list(copies)
        if copies and (make_protocol if augment is None else augment):
            sources = augment_sources(sources, copies, spec, data, all_utts)
        else:
            copies = []
    except DataError as e:
        raise TrainError(str(e)) from None
    inputs = Inputs(utts, targets, labels, sources, dropped_missing=dropped, augment_copies=len(copies))
    if make_protocol:
        p = cfg["protocol"]
        inputs.folds = make_folds(
            utts, targets, p["name"], dev_fraction=p["dev_fraction"], seed=p["seed"], dev=p["dev"]
        )
        check_label_coverage(inputs)
    return inputs


def check_wave_lengths(cfg: dict, sources: dict[str, Source], utts: list) -> None:
    """A model that reads the waveform through an encoder's convolutional front end
    (``min_wave_samples``: ``wav2vec2_ft``, also as an input encoder) needs clips of at least its
    receptive field: one error naming the first shorter utterance, before any training."""
    from sertool.models.registry import _REGISTRY

    src = sources.get("audio")
    if src is None or cfg["data"].get("audio") != "wave":
        return
    owners = [cfg["model"], *(s for s in (cfg["model"].get("input_encoders") or {}).values() if isinstance(s, dict))]
    rules = [(getattr(_REGISTRY.get(m.get("name")), "min_wave_samples", None), m) for m in owners]
    need, who = max(((rule(m), m["name"]) for rule, m in rules if rule is not None), default=(0, ""))
    if not need:
        return
    short = [(u.id, n) for u in utts if (n := src.length(u.id)) < need]
    if short:
        uid, n = short[0]
        raise TrainError(
            f"utterance {uid!r}: {n} samples ({1000 * n / 16000:.1f} ms) is shorter than the {who} encoder's "
            f"front end accepts (at least {need} samples, {1000 * need / 16000:.0f} ms); {len(short)} such "
            "utterance(s): leave them out of the manifest"
        )


def speaker_normalize(sources: dict[str, Source], feats: Path, spec: dict, data: dict, utts: list) -> dict[str, Source]:
    """Wrap the sources whose ``data.normalize`` mode is ``speaker`` (statistics per speaker over
    all of the speaker's utterances in the manifest, so train, evaluate and every fold agree)."""
    wanted = [m for m in sources if (data.get("normalize") or {}).get(m) == "speaker"]
    if not wanted:
        return sources
    no_speaker = [u.id for u in utts if not u.speaker]
    if no_speaker:
        raise DataError(
            f"data.normalize = speaker needs a speaker for every utterance; {len(no_speaker)} have none in "
            f"the manifest (e.g. {no_speaker[0]})"
        )
    speaker_of = {u.id: str(u.speaker) for u in utts}
    out = dict(sources)
    for m in wanted:
        # the loaded source already holds every utterance unless evaluate asked for a subset
        full = (
            sources[m]
            if all(u in sources[m] for u in speaker_of)
            else open_sources(feats, {m: spec[m]}, preload=False, only=set(speaker_of))[m]
        )
        out[m] = SpeakerNormalizedSource(sources[m], speaker_of, speaker_statistics(full, speaker_of))
    return out


def augment_sources(sources: dict[str, Source], dirs: list, spec: dict, data: dict, utts: list) -> dict[str, Source]:
    """``data.augment``: the audio store of the same name from each FEATS folder in ``dirs`` (made by
    ``sertool extract --degrade``), normalised as the clean one (per speaker too); for a model that
    reads the waveform (``data.audio: wave``) entries ``degrade:SPEC``, the recordings degraded as
    they are read (DegradedWaveSource). The other modalities' copies are the clean features (a
    degraded channel leaves the transcript alone)."""
    if "audio" not in sources or not isinstance(spec.get("audio"), str):
        raise DataError("data.augment holds degraded copies of the audio input; this model reads no audio")
    wave = spec["audio"] == "wave"
    copies, ids = [], {u.id for u in utts}
    for k, d in enumerate(dirs):
        if str(d).startswith("degrade:") != wave:
            raise DataError(
                f"data.augment[{k}] = {d!r}: "
                + (
                    "a model reading the waveform (data.audio=wave) degrades it on the fly: give degrade:SPEC "
                    "(sertool/augment.py), e.g. degrade:telephone"
                    if wave
                    else "degrade:SPEC copies need data.audio=wave; for a feature store extract the copies with "
                    "`sertool extract --degrade SPEC` and give their folder"
                )
            )
        if wave:
            from sertool.augment import DegradeError

            base = sources["audio"]
            try:
                copies.append(
                    DegradedWaveSource(list(base.utts.values()), str(d)[len("degrade:") :], k, None, base.sample_rate)
                )
            except DegradeError as e:
                raise DataError(f"data.augment[{k}]: {e}") from None
            continue
        if not Path(d).is_dir():
            raise DataError(f"data.augment[{k}]: {d} is not a folder (the output of `sertool extract --degrade`)")
        opened = open_sources(Path(d), {"audio": spec["audio"]}, preload=data["preload"], only=ids, utts=utts)
        opened = speaker_normalize(
            opened, Path(d), {"audio": spec["audio"]}, data, [u for u in utts if u.id in opened["audio"]]
        )
        copies.append(opened["audio"])
    return {m: AugmentedSource(src, copies if m == "audio" else [src] * len(copies)) for m, src in sources.items()}


def left_out(inputs: Inputs) -> list[str]:
    """Warning lines for the manifest's utterances that training leaves out (no label, a label the
    label set drops, features missing with data.missing=drop); config.yaml records the counts."""
    lines = []
    dropped = dict(inputs.labels.dropped)
    unlabelled = dropped.pop("<no label>", 0) + dropped.pop("<no score>", 0)
    if unlabelled:
        what = "score" if inputs.labels.regression else "label"
        lines.append(f"warning: {unlabelled} utterance(s) have no {what} in the manifest; left out of training")
    if dropped:
        shown = ", ".join(f"{k} {v}" for k, v in sorted(dropped.items()))
        lines.append(
            f"warning: {sum(dropped.values())} utterance(s) have a label that label set {inputs.labels.name!r} "
            f"drops ({shown}); left out of training"
        )
    if inputs.dropped_missing:
        lines.append(
            f"warning: {len(inputs.dropped_missing)} utterance(s) lack features in a store (data.missing=drop, "
            f"e.g. {inputs.dropped_missing[0]}); left out of training"
        )
    return lines


def input_warnings(inputs: Inputs) -> list[str]:
    """Warning lines the inputs give (``Source.warnings``, e.g. TokenSource's truncated texts)."""
    lines = []
    for src in inputs.sources.values():
        while src is not None and not hasattr(src, "warnings"):
            src = getattr(src, "src", None)  # through AugmentedSource-style wrappers
        lines += list(getattr(src, "warnings", None) or [])
    return lines


def check_label_coverage(inputs: Inputs) -> None:
    """Every class must have training examples in every fold, and every training split at least two
    classes (one class trains a constant and scores WA = UA = F1 = 1.000 on a one-class test)."""
    if inputs.labels.regression:
        return
    t = inputs.target_of
    for fold in inputs.folds:
        present = {t[u] for u in fold.train}
        if len(present) < 2:
            found = ", ".join(inputs.labels.classes[i] for i in sorted(present)) or "none"
            raise TrainError(
                f"fold {fold.name!r}: the training split has {len(present)} class(es) ({found}) in "
                f"{len(fold.train)} utterances; a classifier needs at least two (check the labels in the "
                "manifest, --labels, or the protocol)"
            )
        missing = [c for i, c in enumerate(inputs.labels.classes) if i not in present]
        if missing:
            where = {
                part: sum(1 for u in getattr(fold, part) if inputs.labels.classes[t[u]] in missing)
                for part in ("dev", "test")
            }
            raise TrainError(
                f"fold {fold.name!r}: label(s) {missing} have no training example "
                f"(dev has {where['dev']}, test has {where['test']}); choose a label set that "
                "merges or drops them (--labels) or another protocol"
            )


def finalize_model_config(cfg: dict, inputs: Inputs) -> None:
    """Set input dims and the class count from the data.

    A stacked-layer store (``Source.stacked_layers``: every layer of an encoder side by side) given
    to a model with a layer-count key (``{modality}_layers`` or ``layers``) sets that key to the
    number of layers and the input dim to one layer's width: the model learns softmax weights over
    the layers (blocks.LayerWeights).  A plain store sets the dim alone, as a model without such a
    key does (it reads the stacked frames as one wide vector)."""
    for m, src in inputs.sources.items():
        if src.dim == 0:  # waveform samples or token ids: the model's own input encoder reads them
            continue
        dim, stacked, layers_key = int(src.dim), src.stacked_layers, _layers_key(cfg, m)
        if stacked is not None and layers_key is not None:
            cfg["model"][layers_key], dim = len(stacked[0]), stacked[1]
        elif layers_key is not None:
            cfg["model"][layers_key] = 1
        cfg["model"][_dim_key(cfg, m)] = dim
    if not inputs.labels.regression and "n_classes" in cfg["model"]:
        cfg["model"]["n_classes"] = len(inputs.labels.classes)


def crop_lengths(cfg: dict) -> dict:
    """data.max_steps, plus KS-Transformer's train.audio_frames / train.text_tokens."""
    crop = {m: v for m, v in (cfg["data"].get("max_steps") or {}).items() if v}
    tr = cfg["train"]
    if tr.get("audio_frames"):
        crop.setdefault("audio", int(tr["audio_frames"]))
    if tr.get("text_tokens"):
        crop.setdefault("text", int(tr["text_tokens"]))
    return crop


# ----------------------------------------------------------------------------------- devices, seeds
def pick_device(name: str = "auto") -> torch.device:
    try:
        return _pick_device(name)
    except DeviceError as e:
        raise TrainError(str(e)) from None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


# ----------------------------------------------------------------------------------- model I/O
def build(cfg: dict) -> torch.nn.Module:
    from sertool.models import build_model

    return build_model({"model": copy.deepcopy(cfg["model"])})


def save_weights(model: torch.nn.Module, path: Path, metadata: dict | None = None) -> None:
    save_tensors(path, model.state_dict(), {"format": "sertool-model", **(metadata or {})})


def load_weights(model: torch.nn.Module, path: Path) -> dict:
    from safetensors import safe_open

    state = load_tensors(path)
    model.load_state_dict(state)
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})


# ----------------------------------------------------------------------------------- schedule
class Schedule:
    """Learning-rate factor per optimiser step: warm-up x (step | halving | cosine | linear decay)
    x plateau reductions.  The plateau state is saved in checkpoints."""

    def __init__(self, cfg: dict, base_lr: float, steps_per_epoch: int, epochs: int, higher_is_better: bool):
        self.name = cfg["name"]
        if self.name not in ("none", "step", "halving", "plateau", "warmup_linear", "cosine"):
            raise TrainError(
                f"schedule.name {self.name!r}: expected none, step, halving, plateau, warmup_linear or cosine"
            )
        self.cfg = cfg
        self.base_lr = base_lr
        self.spe = max(1, steps_per_epoch)
        self.total = self.spe * epochs
        self.warmup = int(round(float(cfg.get("warmup_epochs") or 0) * self.spe))
        self.higher = higher_is_better
        self.plateau_factor, self.plateau_best, self.plateau_bad = 1.0, None, 0
        if self.name in ("step", "halving") and int(cfg.get("step_size") or 0) <= 0:
            raise TrainError(f"schedule {self.name!r} needs schedule.step_size > 0 (epochs)")

    def lr(self, step: int) -> float:
        epoch = step // self.spe
        f = 1.0
        if self.warmup and step < self.warmup:
            f *= (step + 1) / self.warmup
        if self.name == "step":
            f *= float(self.cfg["gamma"]) ** (epoch // int(self.cfg["step_size"]))
        elif self.name == "halving":
            f *= 0.5 ** (epoch // int(self.cfg["step_size"]))
        elif self.name in ("warmup_linear", "cosine") and step >= self.warmup:
            progress = (step - self.warmup) / max(1, self.total - self.warmup)
            f *= (
                max(0.0, 1.0 - progress)
                if self.name == "warmup_linear"
                else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            )
        f *= self.plateau_factor
        lr = self.base_lr * f
        min_lr = float(self.cfg.get("min_lr") or 0.0)
        return max(lr, min_lr) if step >= self.warmup and self.name != "none" else lr

    def end_epoch(self, score: float) -> None:
        if self.name != "plateau":
            return
        better = self.plateau_best is None or (score > self.plateau_best if self.higher else score < self.plateau_best)
        if better:
            self.plateau_best, self.plateau_bad = score, 0
        else:
            self.plateau_bad += 1
            if self.plateau_bad > int(self.cfg["patience"]):
                self.plateau_factor *= float(self.cfg["gamma"]) if float(self.cfg["gamma"]) < 1 else 0.1
                self.plateau_bad = 0

    def state(self) -> dict:
        return {
            "plateau_factor": self.plateau_factor,
            "plateau_best": self.plateau_best,
            "plateau_bad": self.plateau_bad,
        }

    def load(self, state: dict) -> None:
        self.plateau_factor = state["plateau_factor"]
        self.plateau_best = state["plateau_best"]
        self.plateau_bad = state["plateau_bad"]


def full_batch(cfg: dict) -> bool:
    """``optim.name: lbfgs``: one optimiser step per epoch on the whole training split."""
    return str(cfg["optim"]["name"]).lower() == "lbfgs"


def weight_decay_of(cfg: dict, epoch: int) -> float:
    """``optim.weight_decay``, or with ``optim.weight_decay_path`` the epoch's value of the path (a
    regularisation path: the last value once the path is done)."""
    path = cfg["optim"].get("weight_decay_path") or []
    return float(path[min(epoch, len(path) - 1)]) if path else float(cfg["optim"]["weight_decay"])


def l2_penalty(cfg: dict, model: torch.nn.Module, epoch: int) -> torch.Tensor | float:
    """L-BFGS's weight decay, as a term of the loss: ``0.5 * wd * ||W||^2`` over the weight matrices
    (not biases, norms or layer weights; scikit-learn's LogisticRegression with C = 1 / (wd * n_train)
    has the same optimum), ``wd = weight_decay_of(cfg, epoch)``."""
    if not full_batch(cfg):
        return 0.0  # the other optimisers apply optim.weight_decay themselves
    wd = weight_decay_of(cfg, epoch)
    if wd == 0:
        return 0.0
    return 0.5 * wd * sum((p.float() ** 2).sum() for p in model.parameters() if p.requires_grad and p.ndim >= 2)


def param_groups(cfg: dict, model: torch.nn.Module) -> list[dict]:
    """The optimiser's parameter groups: the model's trainable parameters, or the groups its
    ``param_groups()`` hook names (``{name: parameters}``, e.g. a fine-tuned model's ``encoder`` and
    ``head``), each with ``lr_scale`` = ``optim.<name>_lr_scale`` where the config has that key (else
    1): the group's learning rate is the schedule's times its scale."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    hook = getattr(model, "param_groups", None)
    if hook is None:
        return [{"params": trainable, "lr_scale": 1.0}]
    o, groups = cfg["optim"], []
    decay = float(o.get("layer_decay", 1.0))
    if not 0 < decay <= 1:
        raise TrainError(f"optim.layer_decay {o.get('layer_decay')!r}: expected a number in (0, 1] (1 = no decay)")
    for name, params in hook().items():
        params = [p for p in params if p.requires_grad]
        scale = float(o.get(f"{name}_lr_scale", 1.0))
        if name == "encoder" and decay != 1 and params and hasattr(model, "encoder_depths"):
            groups += layer_decay_groups(params, model.encoder_depths(), scale, decay)
        elif params:
            groups.append({"params": params, "name": name, "lr_scale": scale})
    grouped = {id(p) for g in groups for p in g["params"]}
    if len(grouped) != sum(len(g["params"]) for g in groups) or grouped != {id(p) for p in trainable}:
        raise TrainError(f"model {cfg['model']['name']!r}: param_groups() must name every trainable parameter once")
    return groups


def layer_decay_groups(params: list, depths: dict[int, tuple[int, int]], scale: float, decay: float) -> list[dict]:
    """Layer-wise learning-rate decay (Clark et al., ELECTRA, 2020): the encoder's parameters at depth
    d of L (0 = embeddings / front end, L = the top layer; ``encoder_depths()``) train at
    ``scale x decay^(L - d)`` of the schedule's rate, one group per depth (``encoder.d/L``)."""
    by_depth: dict[tuple[int, int], list] = {}
    for p in params:
        by_depth.setdefault(depths[id(p)], []).append(p)
    return [
        {"params": ps, "name": f"encoder.{d}/{n}", "lr_scale": scale * decay ** (n - d)}
        for (d, n), ps in sorted(by_depth.items(), key=lambda kv: kv[0][0] - kv[0][1])
    ]


def make_optimizer(cfg: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg["optim"]
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{**g, "lr": o["lr"] * g["lr_scale"]} for g in param_groups(cfg, model)]
    name = o["name"].lower()
    path = o.get("weight_decay_path") or []
    if path and name != "lbfgs":
        raise TrainError("optim.weight_decay_path (a regularisation path, one value per epoch) needs optim.name lbfgs")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 for v in path):
        raise TrainError(f"optim.weight_decay_path {path!r}: expected a list of numbers >= 0")
    if name == "lbfgs":
        if D.world().distributed:
            raise TrainError("optim.name lbfgs (full batch) runs in one process; launch it without torchrun")
        return torch.optim.LBFGS(
            params, lr=o["lr"], max_iter=int(o["max_iter"]), history_size=20, line_search_fn="strong_wolfe"
        )
    if name == "adam":
        return torch.optim.Adam(
            groups, lr=o["lr"], weight_decay=o["weight_decay"], betas=tuple(o.get("betas", (0.9, 0.999)))
        )
    if name == "adamw":
        return torch.optim.AdamW(
            groups, lr=o["lr"], weight_decay=o["weight_decay"], betas=tuple(o.get("betas", (0.9, 0.999)))
        )
    if name == "sgd":
        return torch.optim.SGD(groups, lr=o["lr"], weight_decay=o["weight_decay"], momentum=o.get("momentum", 0.0))
    raise TrainError(f"optim.name {o['name']!r}: expected adam, adamw, sgd or lbfgs")


# ----------------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, model, optimizer, state: dict) -> None:
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    osd = optimizer.state_dict()
    scalars = {}
    for pid, pstate in osd["state"].items():
        for k, v in pstate.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v
            else:
                scalars[f"{pid}.{k}"] = v
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda{i}"] = s
    meta = {
        "format": "sertool-checkpoint",
        "state": state,
        "optim_groups": osd["param_groups"],
        "optim_scalars": scalars,
    }
    save_tensors(path, tensors, meta)


def load_checkpoint(path: Path, model, optimizer) -> dict:
    from safetensors import safe_open

    tensors = load_tensors(path)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    if meta.get("format") != "sertool-checkpoint":
        raise TrainError(f"{path}: not a sertool checkpoint")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    groups = json.loads(meta["optim_groups"])
    scalars = json.loads(meta["optim_scalars"])
    ostate: dict = {}
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, pid, name = k.split(".", 2)
            ostate.setdefault(int(pid), {})[name] = v
    for k, v in scalars.items():
        pid, name = k.split(".", 1)
        ostate.setdefault(int(pid), {})[name] = v
    optimizer.load_state_dict({"state": ostate, "param_groups": groups})
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("rng.cuda")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)
    return json.loads(meta["state"])


# ----------------------------------------------------------------------------------- batches
def compute_loss(cfg: dict, out: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    loss = cfg["train"]["loss"]
    out = out.float()
    if loss == "ce":
        return F.cross_entropy(out, target, weight=weight)
    if loss == "nll":
        return F.nll_loss(out, target, weight=weight)
    pred = out.reshape(-1)
    return F.l1_loss(pred, target) if loss == "l1" else F.mse_loss(pred, target)


def outputs_to_predictions(cfg: dict, out: torch.Tensor) -> np.ndarray:
    """Class probabilities ``[N, C]`` (classification) or scores ``[N]`` (regression)."""
    out = out.float()
    if _task(cfg) == "regression":
        return out.reshape(-1).cpu().numpy()
    probs = out.exp() if cfg["train"]["loss"] == "nll" else out.softmax(-1)
    return probs.cpu().numpy()


def _autocast(device: torch.device, enabled: bool):
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    return contextlib.nullcontext()


@torch.no_grad()
def predict(
    cfg: dict,
    model,
    ds: SERDataset,
    device: torch.device,
    batch_size: int | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[np.ndarray, float]:
    """Predictions for every item of ``ds`` (in order) and the mean loss (with class weights, the
    weighted mean over all items, whatever the batches).  Batches follow ``train.max_batch_frames``
    when it is set (grouped by length; the predictions are put back in data order).

    In a distributed run each rank predicts every ``world``-th item and the predictions are
    all-gathered, so every rank returns the same arrays as a single process would."""
    model.eval()
    bs = batch_size or cfg["train"]["eval_batch_size"] or 2 * cfg["train"]["batch_size"]
    w = D.world()
    if w.distributed:
        mine = np.arange(w.rank, len(ds), w.size)
        batches = [mine[i : i + bs] for i in range(0, len(mine), bs)]
    else:
        batches = ds.batch_indices(bs, cfg["train"]["max_batch_frames"] or None)
    weighted = weight is not None and _task(cfg) != "regression"
    outs, where, total, mass = [], [], 0.0, 0.0
    for idx in batches:
        batch = to_device(ds.collate(idx), device)
        with _autocast(device, cfg["train"]["amp"]):
            out = model(batch)
        target = batch["target"]
        # a batch's loss is the (weighted) mean over its items: weigh it by its items' total weight
        items = float(weight[target].sum()) if weighted else len(target)
        total += float(compute_loss(cfg, out, target, weight)) * items
        mass += items
        outs.append(outputs_to_predictions(cfg, out))
        where.append(np.asarray(idx))
    local = (np.concatenate(where), np.concatenate(outs)) if outs else None
    parts = D.all_gather_object((local, total, mass)) if w.distributed else [(local, total, mass)]
    first = next(p[0][1] for p in parts if p[0] is not None)
    preds = np.empty((len(ds), *first.shape[1:]), dtype=first.dtype)
    for part, _, _ in parts:
        if part is not None:
            preds[part[0]] = part[1]
    return preds, sum(p[1] for p in parts) / max(sum(p[2] for p in parts), 1e-12)


def score_predictions(cfg: dict, preds: np.ndarray, targets: np.ndarray, classes: list[str]) -> dict:
    if _task(cfg) == "regression":
        return M.sentiment_metrics(targets, preds)
    return M.classification_metrics(targets, preds.argmax(1), labels=classes)


SELECT_KEYS = {
    "ua": "UA",
    "wa": "WA",
    "macro_f1": "macro_f1",
    "weighted_f1": "weighted_f1",
    "loss": "loss",
    "mae": "MAE",
    "corr": "corr",
}


def _select_key(cfg: dict) -> str:
    key = cfg["train"]["select_on"]
    if key == "auto":
        return "loss" if _task(cfg) == "regression" else "UA"
    if str(key).lower() not in SELECT_KEYS:
        raise TrainError(f"train.select_on {key!r}: expected auto, {', '.join(SELECT_KEYS)}")
    return SELECT_KEYS[str(key).lower()]


def _kill_hook() -> Callable[[], None]:
    """Test hook: SERTOOL_TEST_KILL_AFTER_STEPS=N kills the process (SIGKILL) after N steps."""
    n = int(os.environ.get("SERTOOL_TEST_KILL_AFTER_STEPS", "0") or 0)
    count = [0]

    def step():
        count[0] += 1
        if n and count[0] >= n:
            os.kill(os.getpid(), signal.SIGKILL)

    return step


# ----------------------------------------------------------------------------------- one run
@dataclass
class RunResult:
    fold: str
    seed: int
    best_epoch: int
    dev: dict
    test: dict
    seconds: float
    calibration: dict = field(default_factory=dict)  # temperature fitted on dev; test ECE before/after


@dataclass
class Run:
    """One (fold, seed) run in training: its data, model, optimiser, schedule and state.

    ``final`` marks the ``run.final: all`` deployment model: no dev or test split, a fixed number
    of epochs, the model after the last epoch is the result."""

    cfg: dict
    inputs: Inputs
    fold: Fold
    seed: int
    run_dir: Path
    device: torch.device
    epochs: int
    final: bool
    train_ds: SERDataset
    dev_ds: SERDataset | None
    test_ds: SERDataset | None
    model: torch.nn.Module
    net: torch.nn.Module  # the model, or its DistributedDataParallel wrapper
    optimizer: torch.optim.Optimizer
    schedule: "Schedule"
    weight: torch.Tensor | None  # class weights of the loss (ce / nll)
    item_weight: np.ndarray  # each training item's weight in a batch's mean loss
    state: dict  # epoch, step, best, best_epoch, bad, stopped (+ schedule)
    history: list[dict]
    t0: float
    frozen_batch: dict | bool | None = None  # full-batch L-BFGS: the training split's frozen inputs, once

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoint.safetensors"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.safetensors"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "log.jsonl"

    @property
    def select(self) -> str:
        return _select_key(self.cfg)

    @property
    def higher_is_better(self) -> bool:
        return self.select not in ("loss", "MAE")


def setup_run(
    cfg: dict,
    inputs: Inputs,
    fold: Fold,
    seed: int,
    run_dir: Path,
    norm: Normalizer,
    device: torch.device,
    *,
    resume: bool,
    log: Callable[[str], None],
    fixed_epochs: int | None,
) -> Run:
    """Datasets, model (pretrained weights for a new run), optimiser and schedule of one run; with
    ``resume`` the state of the last end-of-epoch checkpoint."""
    w = D.world()
    if w.main:
        run_dir.mkdir(parents=True, exist_ok=True)
    target = inputs.target_of
    regression = inputs.labels.regression
    crop = crop_lengths(cfg)
    final = fixed_epochs is not None

    def dataset(ids):
        return SERDataset(inputs.sources, ids, [target[source_id(u)] for u in ids], norm, crop, regression)

    train_ds = dataset(inputs.training_ids(fold.train))
    dev_ds, test_ds = (None, None) if final else (dataset(fold.dev), dataset(fold.test))
    tr = cfg["train"]
    weight = None
    if tr["class_weights"] and not regression:
        counts = np.bincount(train_ds.targets, minlength=len(inputs.labels.classes)).astype(np.float64)
        weight = torch.tensor(len(train_ds) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=device)
    item_weight = (
        weight.detach().cpu().numpy()[train_ds.targets]
        if weight is not None
        else np.ones(len(train_ds), dtype=np.float64)
    )

    seed_everything(seed)
    model = build(cfg).to(device)
    D.broadcast_module(model)  # identical initial weights on every rank (they are: same seed)
    optimizer = make_optimizer(cfg, model)
    batches = train_ds.batch_indices(tr["batch_size"], tr["max_batch_frames"] or None, True, seed, 0)
    spe = 1 if full_batch(cfg) else len(batches)  # optimiser steps per epoch
    higher = _select_key(cfg) not in ("loss", "MAE")
    schedule = Schedule(cfg["schedule"], cfg["optim"]["lr"], spe, tr["epochs"], higher and not final)
    run = Run(
        cfg,
        inputs,
        fold,
        seed,
        run_dir,
        device,
        int(fixed_epochs) if final else int(tr["epochs"]),
        final,
        train_ds,
        dev_ds,
        test_ds,
        model,
        model,
        optimizer,
        schedule,
        weight,
        item_weight,
        {"epoch": 0, "step": 0, "best": None, "best_epoch": -1, "bad": 0, "stopped": False},
        [],
        time.time(),
    )
    D.barrier()  # rank 0 has made run_dir
    if resume and run.checkpoint.exists():
        run.state = load_checkpoint(run.checkpoint, model, optimizer)
        schedule.load(run.state["schedule"])
        if run.log_path.exists():
            rows = [json.loads(line) for line in run.log_path.read_text().splitlines() if line.strip()]
            run.history = [h for h in rows if h["epoch"] < run.state["epoch"]]
        log(f"[{fold.name} seed {seed}] resuming at epoch {run.state['epoch']}")
    else:
        if hasattr(model, "load_pretrained"):  # e.g. a distilled student or a pretrained encoder
            model.load_pretrained()
        if w.main:
            for p in (run.checkpoint, run.best_path, run.log_path):
                p.unlink(missing_ok=True)
    D.barrier()  # every rank has read the checkpoint before rank 0 rewrites anything
    if w.main:
        write_jsonl(run.log_path, run.history)
    if w.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # an encoder frozen for the first epochs (set_encoder_trainable) leaves parameters without gradients
        freezes = hasattr(model, "set_encoder_trainable") and int(tr["freeze_encoder_epochs"] or 0) > 0
        run.net = DDP(
            model,
            device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=os.environ.get("SERTOOL_DDP_FIND_UNUSED", "0") == "1" or freezes,
        )
    return run


def merge_batches(parts: list[dict]) -> dict | None:
    """One batch from ``parts`` (tensors joined along the batch axis, lists chained); None when a
    tensor's other axes differ between parts (e.g. frames of another length)."""
    merged: dict = {}
    for key, first in parts[0].items():
        values = [p[key] for p in parts]
        if torch.is_tensor(first):
            if any(v.shape[1:] != first.shape[1:] for v in values):
                return None
            merged[key] = torch.cat(values)
        elif isinstance(first, tuple):  # e.g. the moments (mean, second)
            joined = [merge_batches([{"x": v[i]} for v in values]) for i in range(len(first))]
            if any(j is None for j in joined):
                return None
            merged[key] = tuple(j["x"] for j in joined)
        elif isinstance(first, list):
            merged[key] = [x for v in values for x in v]
        else:
            return None
    return merged


def frozen_training_batch(run: Run, frozen: Callable[[dict], dict]) -> dict | None:
    """Full-batch training of a model with ``frozen_inputs``: the whole training split as one batch
    of its frozen inputs (e.g. the probe's frame moments), computed once per run, in index order so
    that a resumed run gets the same tensors. None when they cannot be one batch (then every epoch
    collates and steps batch by batch)."""
    if run.frozen_batch is None:
        bs = int(run.cfg["train"]["batch_size"])
        n = len(run.train_ds)
        order = [np.arange(i, min(i + bs, n)) for i in range(0, n, bs)]
        with torch.no_grad():
            parts = [frozen(to_device(b, run.device)) for b in iterate_batches(run.train_ds, order, 0)]
        run.frozen_batch = merge_batches(parts) or False
    return run.frozen_batch or None


def train_epoch(run: Run, *, progress: bool, kill_step: Callable[[], None] | None) -> tuple[float, float]:
    """One pass over the training split; returns (mean training loss before each step, seconds).

    Every optimiser step evaluates a closure: the loss and gradient of one batch, or, with
    ``optim.name: lbfgs`` (full batch), of the whole training split: one batch of the model's
    ``frozen_inputs`` (the part of its forward pass without trained weights) computed once per run
    (frozen_training_batch), else accumulated over its batches, collated once per epoch; one
    L-BFGS step of ``optim.max_iter`` iterations per
    epoch, started afresh from the current weights (no optimiser state between epochs), with its
    weight decay in the loss (``l2_penalty``)."""
    from tqdm.auto import tqdm

    t0 = time.time()
    cfg, tr, w = run.cfg, run.cfg["train"], D.world()
    epoch, whole = run.state["epoch"], full_batch(run.cfg)
    run.model.train()
    set_encoder_trainable = getattr(run.model, "set_encoder_trainable", None)
    if set_encoder_trainable is not None:  # a model that owns an encoder: frozen for the first epochs
        set_encoder_trainable(epoch >= int(tr["freeze_encoder_epochs"] or 0))
    frozen = getattr(run.model, "frozen_inputs", None) if whole else None
    cached = frozen_training_batch(run, frozen) if frozen is not None and not w.distributed else None
    if cached is not None:  # one step on the cached frozen inputs of the whole split
        everything = np.arange(len(run.train_ds))
        batches, collated, frozen = [(everything, everything, True)], [cached], None
    else:
        batches = distributed_batch_indices(
            run.train_ds, tr["batch_size"], tr["max_batch_frames"] or None, True, run.seed, epoch, w.rank, w.size
        )
        collated = iterate_batches(run.train_ds, [idx for _, idx, _ in batches], int(cfg["data"].get("workers") or 0))
    pairs = zip(batches, collated)
    steps = [pairs] if whole else ([pair] for pair in pairs)
    bar = tqdm(
        steps,
        total=1 if whole else len(batches),
        desc=f"{run.fold.name} s{run.seed} ep{epoch + 1}/{run.epochs}",
        disable=not show_bar(progress),
        leave=False,
        dynamic_ncols=True,
    )
    clip = float(cfg["optim"]["grad_clip"] or 0)
    total, n = 0.0, 0

    def prepared(batch: dict) -> dict:
        batch = to_device(batch, run.device)
        if frozen is None:
            return batch
        with torch.no_grad():  # the part of the forward pass without trained weights, once per epoch
            return frozen(batch)

    for step in bar:
        step = [(ids, prepared(batch)) for ids, batch in step]
        items = np.concatenate([gidx for (gidx, _, _), _ in step])
        lr = run.schedule.lr(run.state["step"])
        for g in run.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

        def closure() -> torch.Tensor:
            """The step's mean loss (its gradient in .grad): a sum over its batches, each weighted by
            its share of the step's items; under DDP this rank's share of the global batch's mean
            loss, times w.size because DDP averages gradients over the ranks."""
            run.optimizer.zero_grad(set_to_none=True)
            step_loss = l2_penalty(cfg, run.model, epoch)
            if torch.is_tensor(step_loss):
                step_loss.backward()
                step_loss = step_loss.detach()
            for (gidx, idx, real), batch in step:
                with _autocast(run.device, tr["amp"] and not whole):
                    out = run.net(batch)
                loss = compute_loss(cfg, out, batch["target"], run.weight)
                share = float(run.item_weight[idx].sum() / run.item_weight[items].sum()) if real else 0.0
                (loss * (share * w.size if w.distributed else share)).backward()
                step_loss = step_loss + loss.detach() * share
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(run.model.parameters(), clip)
            return step_loss

        loss = float(run.optimizer.step(closure))
        if whole:
            run.optimizer.state.clear()  # each epoch's L-BFGS solve starts afresh: nothing to checkpoint
        run.state["step"] += 1
        total += loss * len(items)
        n += len(items)
        bar.set_postfix(loss=f"{total / n:.4f}", lr=f"{lr:.2e}")
        if kill_step is not None:
            kill_step()
    if w.distributed:
        total = D.all_sum([total])[0]
    return total / max(n, 1), time.time() - t0


def select_and_checkpoint(
    run: Run, train_loss: float, seconds: float, *, progress: bool, log: Callable[[str], None]
) -> None:
    """Score the epoch on dev (the final model: its training loss), keep the best model, stop
    early after ``train.early_stopping`` epochs without improvement, log the epoch and write the
    end-of-epoch checkpoint (model, optimiser, schedule, early-stopping and RNG state)."""
    w, state = D.world(), run.state
    epoch = state["epoch"]
    if run.final:  # no held-out data: the last epoch is the model; a plateau schedule watches the train loss
        dev_m, score, improved = {}, train_loss, True
    else:
        preds, dev_loss = predict(run.cfg, run.model, run.dev_ds, run.device, weight=run.weight)
        dev_m = {**score_predictions(run.cfg, preds, run.dev_ds.targets, run.inputs.labels.classes), "loss": dev_loss}
        score = float(dev_m[run.select])
        best = state["best"]
        improved = best is None or (score > best if run.higher_is_better else score < best)
    if improved:
        state.update(best=score, best_epoch=epoch, bad=0)
        if w.main:
            save_weights(run.model, run.best_path, {"epoch": str(epoch), "fold": run.fold.name, "seed": str(run.seed)})
    else:
        state["bad"] += 1
    run.schedule.end_epoch(score)
    record = {
        "fold": run.fold.name,
        "seed": run.seed,
        "epoch": epoch,
        "lr": run.schedule.lr(max(state["step"] - 1, 0)),
        "train_loss": train_loss,
        **({"weight_decay": weight_decay_of(run.cfg, epoch)} if run.cfg["optim"].get("weight_decay_path") else {}),
        **({} if run.final else {"dev_loss": dev_m["loss"]}),
        **{f"dev_{k}": dev_m[k] for k in ("WA", "UA", "macro_f1", "MAE", "corr") if k in dev_m},
        "best": improved,
        "seconds": round(seconds, 3),
    }
    if w.distributed:
        record["world_size"] = w.size
    run.history.append(record)
    if w.main:
        append_jsonl(run.log_path, record)
    state["epoch"] = epoch + 1
    patience = 0 if run.final else int(run.cfg["train"]["early_stopping"] or 0)
    if patience and state["bad"] >= patience:
        state["stopped"] = True
    state["schedule"] = run.schedule.state()
    if w.main:
        save_checkpoint(run.checkpoint, run.model, run.optimizer, state)
    if progress:
        shown = " ".join(f"{k[4:]} {record[k]:.4f}" for k in ("dev_UA", "dev_WA", "dev_MAE") if k in record)
        log(
            f"[{run.fold.name} seed {run.seed}] epoch {epoch}: train loss {train_loss:.4f}"
            + ("" if run.final else f", dev loss {dev_m['loss']:.4f} {shown}{' *' if improved else ''}")
        )


def finish_run(run: Run) -> RunResult:
    """The selected model becomes the run's model.safetensors; a cross-validation run scores it
    once on the test split (and again on dev), the final model records its training loss."""
    w = D.world()
    D.barrier()  # rank 0 has written best.safetensors
    if not run.best_path.exists():
        raise TrainError(f"{run.run_dir}: no model was selected (train.epochs = {run.epochs})")
    seconds = lambda: round(time.time() - run.t0, 2)  # noqa: E731
    if run.final:
        result = RunResult(run.fold.name, run.seed, run.epochs - 1, {}, {}, seconds())
        metrics = {
            "fold": run.fold.name,
            "seed": run.seed,
            "final": "all",
            "epochs": run.epochs,
            "n_utterances": len(run.fold.train),
            "train_loss": run.history[-1]["train_loss"] if run.history else None,
            "seconds": result.seconds,
        }
    else:
        meta = load_weights(run.model, run.best_path)
        scores, outputs = {}, {}
        for part, ds in (("test", run.test_ds), ("dev", run.dev_ds)):
            preds, loss = predict(run.cfg, run.model, ds, run.device, weight=run.weight)
            outputs[part] = preds
            scores[part] = _compact(
                {**score_predictions(run.cfg, preds, ds.targets, run.inputs.labels.classes), "loss": loss}
            )
        result = RunResult(
            run.fold.name,
            run.seed,
            int(meta.get("epoch", run.state["best_epoch"])),
            scores["dev"],
            scores["test"],
            seconds(),
            {} if run.inputs.labels.regression else calibrate(outputs, run.dev_ds.targets, run.test_ds.targets),
        )
        metrics = {
            "fold": run.fold.name,
            "seed": run.seed,
            "best_epoch": result.best_epoch,
            "selected_on": f"dev {run.select}",
            "dev": result.dev,
            "test": result.test,
            **({"calibration": result.calibration} if result.calibration else {}),
            "epochs_run": run.state["epoch"],
            "seconds": result.seconds,
        }
    D.barrier()  # every rank has read best.safetensors
    if w.main:
        os.replace(run.best_path, run.run_dir / "model.safetensors")
        write_json(run.run_dir / "metrics.json", metrics)
        run.checkpoint.unlink(missing_ok=True)
    D.barrier()  # the run's files are complete before any rank looks at the next run
    return result


def calibrate(outputs: dict[str, np.ndarray], dev_targets, test_targets) -> dict:
    """Temperature scaling fitted on the dev split's probabilities (sertool.calibration); the test
    split's expected calibration error before and after (the scores do not change)."""
    from sertool import calibration as C

    t = C.fit_temperature(outputs["dev"], dev_targets)
    test = outputs["test"]
    return {
        "temperature": t,
        "fitted_on": "dev",
        "test_ece_before": C.expected_calibration_error(test, test_targets),
        "test_ece_after": C.expected_calibration_error(C.scaled(test, t), test_targets),
        "test_nll_before": C.nll(test, test_targets),
        "test_nll_after": C.nll(C.scaled(test, t), test_targets),
    }


def train_run(
    cfg: dict,
    inputs: Inputs,
    fold: Fold,
    seed: int,
    run_dir: Path,
    norm: Normalizer,
    device: torch.device,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    kill_step: Callable[[], None] | None = None,
    fixed_epochs: int | None = None,
) -> RunResult:
    """Train one (fold, seed): early stopping and selection on dev; the selected model on test.

    ``fixed_epochs`` = N (the ``run.final: all`` deployment model): ``fold.dev`` and ``fold.test``
    are empty; train exactly N epochs on ``fold.train`` (the learning-rate schedule keeps its
    ``train.epochs`` horizon, so the first N epochs follow the folds' schedule; a plateau schedule
    watches the training loss, there being no dev split), no early stopping, and the model after
    epoch N is the result (its dev/test metrics are empty).

    Under torchrun (a process group of N > 1) the model is wrapped in DistributedDataParallel,
    every rank takes its share of each global batch, dev/test predictions are gathered, and rank 0
    alone writes the run's files (see sertool/distributed.py)."""
    if not D.world().main:
        progress, log = False, (lambda s: None)
    run = setup_run(cfg, inputs, fold, seed, run_dir, norm, device, resume=resume, log=log, fixed_epochs=fixed_epochs)
    while run.state["epoch"] < run.epochs and not run.state["stopped"]:
        train_loss, seconds = train_epoch(run, progress=progress, kill_step=kill_step)
        select_and_checkpoint(run, train_loss, seconds, progress=progress, log=log)
    return finish_run(run)


def _compact(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("per_class",)}


# evaluate.py's names for the shared writers (sertool.utils)
_write_json, _write_text = write_json, write_text


def run_dir_of(exp: Path, fold: str, seed: int) -> Path:
    return Path(exp) / "folds" / fold / f"seed{seed}"


def seeds_of(cfg: dict) -> list[int]:
    n = int(cfg["run"]["seeds"])
    if n < 1:
        raise TrainError(f"run.seeds must be >= 1, got {n}")
    return [int(cfg["run"]["seed"]) + i for i in range(n)]


# ----------------------------------------------------------------------------------- the stage
def run_train(
    model: str,
    feats: str | os.PathLike,
    exp: str | os.PathLike,
    *,
    config_file=None,
    overrides: Iterable[str] = (),
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    folds_only: Iterable[str] | None = None,
    warn: Callable[[str], None] | None = None,
) -> dict:
    """Train ``model`` on FEATS into EXP; returns the content of EXP/metrics.json.

    Launched by torchrun (``WORLD_SIZE`` > 1) it joins the process group and trains with
    DistributedDataParallel; every rank returns the same result, rank 0 writes EXP."""
    exp = Path(exp)
    overrides = list(overrides)
    cfg = resolve_config(model, config_file, [*overrides, f"data.feats={Path(feats).resolve()}"])
    inputs = load_inputs(cfg, feats)
    if int(os.environ.get("RANK", "0") or 0) == 0:  # once under torchrun
        for line in left_out(inputs) + input_warnings(inputs):
            (warn or log)(line)
        if inputs.augment_copies:
            n = len(inputs.training_ids([u.id for u in inputs.utts])) - len(inputs.utts)
            log(
                f"data.augment: {n} degraded copies of {len(inputs.utts)} utterances in {inputs.augment_copies} "
                "store(s); each training split gets its utterances' copies, dev and test stay clean"
            )
    finalize_model_config(cfg, inputs)
    build(cfg)  # a model that cannot be built fails before any training
    final_mode(cfg)
    seeds = seeds_of(cfg)
    started_group = D.launched_by_torchrun() and not D.world().distributed
    w, device_name = D.setup(cfg["run"]["device"])
    # one run at a time writes EXP (rank 0 holds the lock; _run_train shares a refusal with every rank)
    lock = OutputLock(exp, "train", hint="wait for it or use another -o", log=log) if w.main else None
    try:
        return _run_train(
            cfg,
            inputs,
            seeds,
            exp,
            w,
            device_name,
            resume=resume,
            overwrite=overwrite,
            progress=progress,
            log=log,
            folds_only=folds_only,
            lock=lock,
        )
    finally:
        if lock is not None:
            lock.release()
        if started_group:
            D.shutdown()


def _run_train(
    cfg: dict,
    inputs: Inputs,
    seeds: list[int],
    exp: Path,
    w: "D.World",
    device_name: str,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    log: Callable[[str], None],
    folds_only: Iterable[str] | None,
    lock: OutputLock | None = None,
) -> dict:
    main = w.main
    if not main:
        progress, log = False, (lambda s: None)
    device = pick_device(device_name)
    if int(cfg["run"].get("threads") or 0) > 0:
        torch.set_num_threads(int(cfg["run"]["threads"]))
    select = _select_key(cfg)

    cfg_path = exp / "config.yaml"
    record = {
        **cfg,
        "features": {m: s.provenance() for m, s in inputs.sources.items()},
        "label_set": {**inputs.labels.to_config(), "dropped_missing_features": len(inputs.dropped_missing)},
        "experiment": {
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv),
            "device": str(device),
            "seeds": seeds,
            "folds": [f.name for f in inputs.folds],
            "selected_on": f"dev {select}",
            "sertool": __import__("sertool").__version__,
            "torch": torch.__version__,
            **({"world_size": w.size, "backend": w.backend} if w.distributed else {}),
        },
    }
    error = None
    if main:
        try:
            if lock is not None:
                lock.acquire()
            _prepare_exp(exp, cfg, record, cfg_path, inputs, resume=resume, overwrite=overwrite)
        except (TrainError, OutputBusy) as e:
            error = str(e)
    error = D.broadcast_object(error)  # rank 0 has checked and written EXP (or every rank fails alike)
    if error is not None:
        raise TrainError(error)

    kill = _kill_hook()
    results: list[RunResult] = []
    wanted = set(folds_only) if folds_only else None
    if wanted is not None and wanted - {f.name for f in inputs.folds}:
        raise TrainError(
            f"--fold {', '.join(sorted(wanted - {f.name for f in inputs.folds}))}: no such fold; "
            f"this protocol's folds are {', '.join(f.name for f in inputs.folds)}"
        )
    for fold in inputs.folds:
        if wanted is not None and fold.name not in wanted:
            continue
        norm_path = exp / "folds" / fold.name / "norm.safetensors"
        if main:
            norm_path.parent.mkdir(parents=True, exist_ok=True)
            if resume and norm_path.exists():
                norm = Normalizer.load(norm_path)
            else:
                norm = Normalizer.fit(inputs.sources, fold.train, cfg["data"]["normalize"])
                norm.save(norm_path)
        D.barrier()  # rank 0 has written the fold's statistics
        if not main:
            norm = Normalizer.load(norm_path)
        for seed in seeds:
            rd = run_dir_of(exp, fold.name, seed)
            done = rd / "metrics.json"
            if resume and done.exists() and (rd / "model.safetensors").exists():
                m = json.loads(done.read_text())
                results.append(
                    RunResult(
                        m["fold"],
                        m["seed"],
                        m["best_epoch"],
                        m["dev"],
                        m["test"],
                        m["seconds"],
                        m.get("calibration", {}),
                    )
                )
                log(f"[{fold.name} seed {seed}] already done")
                continue
            res = train_run(
                cfg, inputs, fold, seed, rd, norm, device, resume=resume, progress=progress, log=log, kill_step=kill
            )
            results.append(res)
            shown = " ".join(f"{k} {res.test[k]:.4f}" for k in ("WA", "UA", "macro_f1", "MAE", "corr") if k in res.test)
            # epochs are numbered from 0 everywhere (console, log.jsonl, metrics.json), like seeds
            log(f"[{fold.name} seed {seed}] best epoch {res.best_epoch}, test {shown}")
    final_info = None
    if final_mode(cfg) == "all":
        if wanted is not None and wanted != {f.name for f in inputs.folds}:
            log(
                "run.final=all: the deployment model is trained once every fold is done "
                "(run again with --resume and no --fold)"
            )
        elif results:
            final_info = train_final(
                cfg, inputs, results, seeds[0], exp, device, resume=resume, progress=progress, log=log, kill_step=kill
            )
    for src in inputs.sources.values():
        store = getattr(src, "store", None)
        if store is not None:
            store.close()
    summary = _summarize(results)
    out = {
        "task": _task(cfg),
        "labels": inputs.labels.classes,
        "selected_on": f"dev {select}",
        "summary": summary,
        "runs": [r.__dict__ for r in results],
    }
    if (calibration := summarize_calibration(results)) is not None:
        out["calibration"] = calibration
    if final_info is not None:
        out["final"] = final_info
    if main:
        write_json(exp / "metrics.json", out)
        # EXP/log.jsonl: every run's epochs
        rows = []
        for r in results:
            lp = run_dir_of(exp, r.fold, r.seed) / "log.jsonl"
            rows += [json.loads(l) for l in lp.read_text().splitlines() if l.strip()] if lp.exists() else []
        write_jsonl(exp / "log.jsonl", rows)
        if results and (final_mode(cfg) == "best-dev" or final_info is not None):
            write_predictor(exp, cfg, results, select, final=final_info)
        if final_info is not None:  # provenance of the deployment model in config.yaml's record
            rec = load_config_file(cfg_path)
            rec["experiment"]["final"] = final_info
            write_text(cfg_path, yaml.safe_dump(json.loads(json.dumps(rec, default=json_default)), sort_keys=False))
    D.barrier()  # EXP is complete when any rank returns
    return out


def _prepare_exp(
    exp: Path, cfg: dict, record: dict, cfg_path: Path, inputs: Inputs, *, resume: bool, overwrite: bool
) -> None:
    """Check EXP (refuse to overwrite, or to resume with other settings); write config.yaml and folds.json."""
    if exp.exists() and any(exp.iterdir()):
        if overwrite:
            shutil.rmtree(exp)
        elif not resume:
            raise TrainError(f"{exp} already holds an experiment; use --resume to continue it or --overwrite")
        elif cfg_path.exists():
            try:
                old = load_config_file(cfg_path)
            except ValueError as e:
                raise TrainError(f"--resume: {e}") from None
            old_settings = {k: v for k, v in old.items() if k not in RECORD_KEYS}
            _fill(old_settings, json.loads(json.dumps(STAGE_DEFAULTS)))  # keys added since then: defaults
            from sertool.models.registry import fill_legacy_defaults

            fill_legacy_defaults(old_settings.get("model") or {})  # ... or the behaviour before them
            _fill(old_settings, _model_defaults((old_settings.get("model") or {}).get("name")))
            new_settings = json.loads(json.dumps({k: v for k, v in cfg.items()}))
            if old_settings != new_settings:
                diff = [k for k in set(old_settings) | set(new_settings) if old_settings.get(k) != new_settings.get(k)]
                raise TrainError(
                    f"--resume: the settings differ from those of {exp} (sections {sorted(diff)}); "
                    "resume with the same command, or use --overwrite"
                )
            record["experiment"]["created"] = old.get("experiment", {}).get("created")
    exp.mkdir(parents=True, exist_ok=True)
    write_text(cfg_path, yaml.safe_dump(json.loads(json.dumps(record, default=json_default)), sort_keys=False))
    write_json(exp / "folds.json", {"protocol": cfg["protocol"], "folds": [f.to_json() for f in inputs.folds]})


def _model_defaults(name: str | None) -> dict:
    """The registered default config of model `name` (keys a newer sertool added to it count as
    unchanged when an older experiment is resumed); {} for an unknown name."""
    from sertool.models.registry import default_config

    try:
        return json.loads(json.dumps(default_config(name))) if name else {}
    except (KeyError, ValueError):
        return {}


def _summarize(results: list[RunResult]) -> dict:
    keys = [
        k
        for k in (
            "WA",
            "UA",
            "macro_f1",
            "weighted_f1",
            "MAE",
            "corr",
            "acc7",
            "acc5",
            "acc2_has0",
            "f1_has0",
            "acc2_non0",
            "f1_non0",
        )
        if results and k in results[0].test
    ]
    return {k: M.summarize([r.test[k] for r in results]) for k in keys}


def summarize_calibration(results: list[RunResult]) -> dict | None:
    """Mean ± std over the runs of the dev-fitted temperature and the test ECE/NLL before and after."""
    calibrated = [r.calibration for r in results if r.calibration]
    if not calibrated or len(calibrated) != len(results):
        return None
    keys = ("temperature", "test_ece_before", "test_ece_after", "test_nll_before", "test_nll_after")
    return {k: M.summarize([c[k] for c in calibrated]) for k in keys}


def deployed_temperature(results: list[RunResult], best: RunResult, mode: str) -> float | None:
    """The temperature predict applies: the selected run's (best-dev), or the median of the runs'
    (run.final all: the final model has no held-out data to fit one on)."""
    if mode == "best-dev":
        return best.calibration.get("temperature")
    ts = [r.calibration["temperature"] for r in results if r.calibration.get("temperature")]
    return float(np.median(ts)) if ts and len(ts) == len(results) else None


FINAL_MODES = ("best-dev", "all")


def final_mode(cfg: dict) -> str:
    mode = cfg["run"]["final"]
    if mode not in FINAL_MODES:
        raise TrainError(
            f"run.final {mode!r}: expected best-dev (the fold x seed run with the best dev score) or "
            "all (one more model trained on every labelled utterance)"
        )
    return mode


def final_epochs(results: list[RunResult]) -> int:
    """The number of epochs of the ``run.final: all`` model: the median, over the fold x seed runs, of
    the epoch count of the selected (best dev) model, rounded half up, at least 1."""
    counts = sorted(r.best_epoch + 1 for r in results)
    return max(1, int(math.floor(float(np.median(counts)) + 0.5)))


def train_final(
    cfg: dict,
    inputs: Inputs,
    results: list[RunResult],
    seed: int,
    exp: Path,
    device: torch.device,
    *,
    resume: bool,
    progress: bool,
    log: Callable[[str], None],
    kill_step: Callable[[], None] | None = None,
) -> dict:
    """``run.final: all``: one deployment model on every labelled utterance (train + dev + test of all
    folds), normalised with statistics of all of them, for ``final_epochs(results)`` epochs, into
    EXP/final/ (norm.safetensors, ids.json, model.safetensors, log.jsonl, metrics.json).  Resumable:
    a finished final model is kept, an interrupted one continues from its last checkpoint."""
    main = D.world().main
    ids = [u.id for u in inputs.utts]
    epochs = final_epochs(results)
    counts = [r.best_epoch + 1 for r in results]
    info = {
        "final": "all",
        "n_utterances": len(ids),
        "epochs": epochs,
        "seed": seed,
        "epochs_rule": f"median over the {len(results)} fold x seed runs of the selected (best dev) epoch count, "
        "rounded half up; no early stopping (no held-out data)",
        "selected_epoch_counts": counts,
        "normalizer": "statistics of all n_utterances",
    }
    fd = exp / "final"
    norm_path, done = fd / "norm.safetensors", fd / "metrics.json"
    if resume and done.exists() and (fd / "model.safetensors").exists() and norm_path.exists():
        m = json.loads(done.read_text())
        if m.get("epochs") == epochs and m.get("n_utterances") == len(ids):
            log(f"[final seed {seed}] already done")
            return {**info, "train_loss": m.get("train_loss")}
    if main:
        fd.mkdir(parents=True, exist_ok=True)
        if resume and norm_path.exists():
            norm = Normalizer.load(norm_path)
        else:
            norm = Normalizer.fit(inputs.sources, ids, cfg["data"]["normalize"])
            norm.save(norm_path)
        write_json(fd / "ids.json", {"n_utterances": len(ids), "ids": ids})
    D.barrier()
    if not main:
        norm = Normalizer.load(norm_path)
    log(
        f"[final seed {seed}] training on all {len(ids)} utterances for {epochs} epochs "
        f"(median of the folds' selected epochs {counts})"
    )
    fold = Fold("final", ids, [], [], {"final": "all"})
    res = train_run(
        cfg,
        inputs,
        fold,
        seed,
        fd,
        norm,
        device,
        resume=resume,
        progress=progress,
        log=log,
        kill_step=kill_step,
        fixed_epochs=epochs,
    )
    m = json.loads(done.read_text()) if main else {}
    return {**info, "train_loss": m.get("train_loss"), "seconds": res.seconds}


def write_predictor(exp: Path, cfg: dict, results: list[RunResult], select: str, final: dict | None = None) -> dict:
    """EXP/model.safetensors + norm.safetensors + predictor.json: the run with the best dev score
    (``run.final: best-dev``), or the model trained on all data (``final``, from ``train_final``)."""
    mode = final_mode(cfg)
    if mode == "all" and final is None:
        raise TrainError("run.final all: the final model has not been trained")
    higher = select not in ("loss", "MAE")
    best = sorted(results, key=lambda r: (-(r.dev[select]) if higher else r.dev[select], r.fold, r.seed))[0]
    src_dir = exp / "final" if mode == "all" else run_dir_of(exp, best.fold, best.seed)
    norm_src = exp / "final" / "norm.safetensors" if mode == "all" else exp / "folds" / best.fold / "norm.safetensors"
    for src, name in ((src_dir / "model.safetensors", "model.safetensors"), (norm_src, "norm.safetensors")):
        with atomic_path(exp / name) as tmp:
            shutil.copyfile(src, tmp)
    cfg_rec = load_config_file(exp / "config.yaml")
    predictor = {
        "format": "sertool-predictor",
        "version": 1,
        "model": "model.safetensors",
        "normalizer": "norm.safetensors",
        "config": "config.yaml",
        "model_config": cfg["model"],
        "task": _task(cfg),
        "loss": cfg["train"]["loss"],
        "classes": cfg_rec["label_set"]["classes"],
        "label_set": cfg_rec["label_set"]["preset"],
        "features": cfg_rec["features"],
        "inputs": {m: cfg["data"][m] for m in model_modalities(cfg)},
        # token ids over a text store's tokens (data.text: tokens:STORE) need the training vocabulary
        **({"vocab": list(cfg["data"]["vocab"])} if cfg["data"].get("vocab") else {}),
        "normalize": {m: (cfg["data"].get("normalize") or {}).get(m, "none") for m in model_modalities(cfg)},
        "max_steps": crop_lengths(cfg),
        **(
            {"temperature": t, "temperature_rule": "fitted on dev (sertool.calibration); run.final all: median of runs"}
            if (t := deployed_temperature(results, best, mode)) is not None
            else {}
        ),
        "selection": (
            {
                "rule": f"the fold x seed run with the best dev {select} (test scores not used)",
                "final": "best-dev",
                "fold": best.fold,
                "seed": best.seed,
                f"dev_{select}": best.dev[select],
            }
            if mode == "best-dev"
            else {
                "rule": "final: all - one model trained on every labelled utterance for a fixed number of "
                "epochs; the cross-validation metrics (metrics.json) are those of the fold x seed runs",
                **final,
            }
        ),
    }
    write_json(exp / "predictor.json", predictor)
    return predictor


def deployment_note(exp: str | os.PathLike) -> str:
    """One line saying which model `sertool predict EXP` and `sertool export EXP` will use."""
    exp = Path(exp)
    try:
        sel = json.loads((exp / "predictor.json").read_text())["selection"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"no deployment model in {exp} yet (predict/export need EXP/predictor.json)"
    if sel.get("final") == "all":
        return (
            f"predict/export will use {exp / 'model.safetensors'}: one model trained on all "
            f"{sel.get('n_utterances', '?')} labelled utterances for {sel.get('epochs', '?')} epoch(s) (run.final=all)"
        )
    score = next(((k, v) for k, v in sel.items() if k.startswith("dev_")), None)
    shown = f", best dev {score[0][4:]} {score[1]:.4f}" if score and isinstance(score[1], (int, float)) else ""
    return (
        f"predict/export will use {exp / 'model.safetensors'}: the {sel.get('fold')} seed {sel.get('seed')} run"
        f"{shown} (run.final=best-dev), trained without that fold's test data; for deployment, train one model "
        "on all labelled data with --set run.final=all"
    )


def load_experiment(exp: str | os.PathLike) -> tuple[dict, list[Fold]]:
    """The resolved config (with records) and the folds of an experiment directory."""
    exp = Path(exp)
    if not (exp / "config.yaml").exists():
        raise TrainError(f"{exp} is not an experiment directory (no config.yaml; run `sertool train` first)")
    try:
        cfg = load_config_file(exp / "config.yaml")
    except ValueError as e:
        raise TrainError(str(e)) from None
    folds = [Fold.from_json(f) for f in json.loads((exp / "folds.json").read_text())["folds"]]
    return cfg, folds
