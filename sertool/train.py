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
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn.functional as F
import yaml

from sertool.weights import load_tensors
from sertool import metrics as M
from sertool.corpora.base import read_manifest
from sertool import distributed as D
from sertool.data import (DataError, Normalizer, SERDataset, Source, SpeakerNormalizedSource, check_ids,
                          distributed_batch_indices, speaker_statistics,
                          iterate_batches, open_sources, to_device)
from sertool.labels import LabelSet, apply as apply_labels, label_set
from sertool.protocols import Fold, make_folds

# Keys the train stage adds to every model config (the model YAML's own values win).
STAGE_DEFAULTS: dict[str, dict] = {
    "optim": {"name": "adam", "lr": 1.0e-3, "weight_decay": 0.0, "grad_clip": 0.0, "momentum": 0.9,
              "betas": [0.9, 0.999]},
    "schedule": {
        "name": "none",         # none | step | halving | plateau | warmup_linear | cosine
        "step_size": 0,         # step / halving: epochs between decays
        "gamma": 1.0,           # step: decay factor; plateau: reduction factor
        "warmup_epochs": 0.0,   # linear warm-up (any schedule), in epochs (fractions allowed)
        "patience": 3,          # plateau: epochs without dev improvement before reducing
        "min_lr": 0.0,
    },
    "train": {
        "epochs": 30,
        "batch_size": 32,
        "loss": "ce",               # ce | nll (model returns log-probabilities) | l1 | mse
        "early_stopping": 10,       # epochs without dev improvement; 0 = off (still selects the best)
        "select_on": "auto",        # auto (UA; dev loss for regression) | ua | wa | macro_f1 | weighted_f1 | loss
        "class_weights": False,     # true = inverse class frequency of the training split
        "amp": True,                # bfloat16 autocast on CUDA (ignored on CPU)
        "max_batch_frames": 0,      # > 0: dynamic batching by frames (longest x items <= this)
        "eval_batch_size": 0,       # 0 = 2 x batch_size
    },
    "data": {
        "feats": None,              # FEATS folder (manifest.jsonl + stores)
        "audio": None,              # store name in FEATS, a store path, or an aligned file
        "text": None,
        "visual": None,
        "labels": "auto",           # sertool.labels preset, "auto" or a comma list of classes
        "normalize": {"audio": "global", "text": "none", "visual": "global"},
        "max_steps": {"audio": None, "text": None, "visual": None},  # crop to the first L steps
        "missing": "error",         # error | drop: utterances absent from a store
        "preload": "auto",          # auto | true | false | GB: hold the features in memory (a number = budget)
        "workers": 0,               # DataLoader processes collating training batches (own HDF5 handles)
    },
    "protocol": {"name": "corpus", "dev_fraction": 0.1, "seed": 0, "dev": "auto"},
    "run": {"seeds": 1, "seed": 0, "device": "auto", "final": "best-dev",
            "threads": 0},              # CPU threads for torch (0 = torch's default); 1 on a shared machine
}
# Sections of EXP/config.yaml that record what happened (not settings); ignored when the file is
# given back as --config.
RECORD_KEYS = ("features", "label_set", "experiment")
LOWER_IS_BETTER = {"loss", "mae"}


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
    from sertool.models.registry import _merge, apply_overrides, default_config

    cfg = default_config(model)
    _fill(cfg, STAGE_DEFAULTS)
    if config_file is not None:
        path = Path(config_file)
        if not path.exists():
            raise TrainError(f"config file {path} does not exist")
        with open(path) as f:
            user = yaml.safe_load(f) or {}
        if not isinstance(user, dict):
            raise TrainError(f"{path}: a config file must be a YAML mapping")
        user = {k: v for k, v in user.items() if k not in RECORD_KEYS}
        name = (user.get("model") or {}).get("name") if isinstance(user.get("model"), dict) else None
        if name is not None and name != model:
            raise TrainError(f"{path}: model.name is {name!r} but the model is {model!r}")
        try:
            _merge(cfg, user)
        except ValueError as e:
            raise TrainError(f"{path}: {e}") from None
    apply_overrides(cfg, list(overrides))
    return cfg


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

    @property
    def target_of(self) -> dict:
        return {u.id: t for u, t in zip(self.utts, self.targets)}


def load_inputs(cfg: dict, feats: str | os.PathLike | None = None, *, make_protocol: bool = True,
                only: set[str] | None = None) -> Inputs:
    """Manifest, labels, stores and folds for ``cfg``; every input error is raised here."""
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
        hint = ("--set model.task=regression --set train.loss=l1" if labels.regression
                else "--set model.task=classification --set train.loss=ce (or --labels mosei for scores)")
        raise TrainError(f"label set {labels.name!r} is {'a regression' if labels.regression else 'categorical'} but "
                         f"model.task is {_task(cfg)!r}; use {hint}")
    loss = cfg["train"]["loss"]
    if regression and loss not in ("l1", "mse"):
        raise TrainError(f"train.loss {loss!r} does not fit a regression model; use l1 or mse")
    if not regression and loss not in ("ce", "nll"):
        raise TrainError(f"train.loss {loss!r} does not fit a classifier; use ce (or nll); "
                         "e.g. --set train.loss=ce")
    utts, targets = apply_labels(labels, utts)
    all_utts = list(utts)  # speaker statistics use every utterance of a speaker, whatever `only` keeps
    if only is not None:
        keep = [i for i, u in enumerate(utts) if u.id in only]
        utts, targets = [utts[i] for i in keep], [targets[i] for i in keep]
    mods = model_modalities(cfg)
    for m in mods:
        if not data.get(m):
            raise TrainError(f"model {cfg['model']['name']!r} consumes {', '.join(mods)} but no feature store is "
                             f"named for {m} (use --{m} NAME or --set data.{m}=NAME)")
    spec = {m: data[m] for m in mods}
    try:
        sources = open_sources(feats, spec, preload=data["preload"], only={u.id for u in utts})
        dropped: list[str] = []
        if data["missing"] == "drop":
            dropped = [u.id for u in utts if any(u.id not in s for s in sources.values())]
            if dropped:
                keep = [i for i, u in enumerate(utts) if u.id not in set(dropped)]
                utts, targets = [utts[i] for i in keep], [targets[i] for i in keep]
        elif data["missing"] != "error":
            raise TrainError(f"data.missing must be error or drop, got {data['missing']!r}")
        check_ids(sources, [u.id for u in utts])
        sources = speaker_normalize(sources, feats, spec, data, all_utts)
    except DataError as e:
        raise TrainError(str(e)) from None
    inputs = Inputs(utts, targets, labels, sources, dropped_missing=dropped)
    if make_protocol:
        p = cfg["protocol"]
        inputs.folds = make_folds(utts, targets, p["name"], dev_fraction=p["dev_fraction"], seed=p["seed"], dev=p["dev"])
        check_label_coverage(inputs)
    return inputs


def speaker_normalize(sources: dict[str, Source], feats: Path, spec: dict, data: dict, utts: list) -> dict[str, Source]:
    """Wrap the sources whose ``data.normalize`` mode is ``speaker`` (statistics per speaker over
    all of the speaker's utterances in the manifest, so train, evaluate and every fold agree)."""
    wanted = [m for m in sources if (data.get("normalize") or {}).get(m) == "speaker"]
    if not wanted:
        return sources
    no_speaker = [u.id for u in utts if not u.speaker]
    if no_speaker:
        raise DataError(f"data.normalize = speaker needs a speaker for every utterance; {len(no_speaker)} have none in "
                        f"the manifest (e.g. {no_speaker[0]})")
    speaker_of = {u.id: str(u.speaker) for u in utts}
    out = dict(sources)
    for m in wanted:
        # the loaded source already holds every utterance unless evaluate asked for a subset
        full = (sources[m] if all(u in sources[m] for u in speaker_of)
                else open_sources(feats, {m: spec[m]}, preload=False, only=set(speaker_of))[m])
        out[m] = SpeakerNormalizedSource(sources[m], speaker_of, speaker_statistics(full, speaker_of))
    return out


def check_label_coverage(inputs: Inputs) -> None:
    """Every class must have training examples in every fold."""
    if inputs.labels.regression:
        return
    t = inputs.target_of
    for fold in inputs.folds:
        present = {t[u] for u in fold.train}
        missing = [c for i, c in enumerate(inputs.labels.classes) if i not in present]
        if missing:
            where = {part: sum(1 for u in getattr(fold, part) if inputs.labels.classes[t[u]] in missing)
                     for part in ("dev", "test")}
            raise TrainError(f"fold {fold.name!r}: label(s) {missing} have no training example "
                             f"(dev has {where['dev']}, test has {where['test']}); choose a label set that "
                             "merges or drops them (--labels) or another protocol")


def finalize_model_config(cfg: dict, inputs: Inputs) -> None:
    """Set input dims and the class count from the data."""
    for m, src in inputs.sources.items():
        cfg["model"][_dim_key(cfg, m)] = int(src.dim)
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
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainError(f"device {name!r} requested but CUDA is not available")
    return torch.device(name)


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


def _atomic_save(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}, str(tmp),
              metadata={k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()})
    os.replace(tmp, path)


def save_weights(model: torch.nn.Module, path: Path, metadata: dict | None = None) -> None:
    _atomic_save(model.state_dict(), path, {"format": "sertool-model", **(metadata or {})})


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
            raise TrainError(f"schedule.name {self.name!r}: expected none, step, halving, plateau, warmup_linear or cosine")
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
            f *= max(0.0, 1.0 - progress) if self.name == "warmup_linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
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
        return {"plateau_factor": self.plateau_factor, "plateau_best": self.plateau_best, "plateau_bad": self.plateau_bad}

    def load(self, state: dict) -> None:
        self.plateau_factor = state["plateau_factor"]
        self.plateau_best = state["plateau_best"]
        self.plateau_bad = state["plateau_bad"]


def make_optimizer(cfg: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    o = cfg["optim"]
    params = [p for p in model.parameters() if p.requires_grad]
    name = o["name"].lower()
    if name == "adam":
        return torch.optim.Adam(params, lr=o["lr"], weight_decay=o["weight_decay"], betas=tuple(o.get("betas", (0.9, 0.999))))
    if name == "adamw":
        return torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"], betas=tuple(o.get("betas", (0.9, 0.999))))
    if name == "sgd":
        return torch.optim.SGD(params, lr=o["lr"], weight_decay=o["weight_decay"], momentum=o.get("momentum", 0.0))
    raise TrainError(f"optim.name {o['name']!r}: expected adam, adamw or sgd")


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
    meta = {"format": "sertool-checkpoint", "state": state, "optim_groups": osd["param_groups"],
            "optim_scalars": scalars}
    _atomic_save(tensors, path, meta)


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


# ----------------------------------------------------------------------------------- loops
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
    import contextlib

    return contextlib.nullcontext()


@torch.no_grad()
def predict(cfg: dict, model, ds: SERDataset, device: torch.device, batch_size: int | None = None,
            weight: torch.Tensor | None = None) -> tuple[np.ndarray, float]:
    """Predictions for every item of ``ds`` (in order) and the mean loss.

    In a distributed run each rank predicts every ``world``-th item and the predictions are
    all-gathered, so every rank returns the same arrays as a single process would."""
    model.eval()
    bs = batch_size or cfg["train"]["eval_batch_size"] or 2 * cfg["train"]["batch_size"]
    w = D.world()
    if not w.distributed:
        outs, total, n = [], 0.0, 0
        for batch in ds.batches(bs):
            batch = to_device(batch, device)
            with _autocast(device, cfg["train"]["amp"]):
                out = model(batch)
            target = batch["target"]
            total += float(compute_loss(cfg, out, target, weight)) * len(target)
            n += len(target)
            outs.append(outputs_to_predictions(cfg, out))
        return np.concatenate(outs), total / max(n, 1)
    mine = np.arange(w.rank, len(ds), w.size)
    outs, total = [], 0.0
    for i in range(0, len(mine), bs):
        batch = to_device(ds.collate(mine[i:i + bs]), device)
        with _autocast(device, cfg["train"]["amp"]):
            out = model(batch)
        target = batch["target"]
        total += float(compute_loss(cfg, out, target, weight)) * len(target)
        outs.append(outputs_to_predictions(cfg, out))
    local = np.concatenate(outs) if outs else None
    parts = D.all_gather_object((mine, local, total))
    first = next(p[1] for p in parts if p[1] is not None)
    preds = np.empty((len(ds), *first.shape[1:]), dtype=first.dtype)
    for where, p, _ in parts:
        if p is not None:
            preds[where] = p
    return preds, sum(p[2] for p in parts) / max(len(ds), 1)


def score_predictions(cfg: dict, preds: np.ndarray, targets: np.ndarray, classes: list[str]) -> dict:
    if _task(cfg) == "regression":
        return M.sentiment_metrics(targets, preds)
    return M.classification_metrics(targets, preds.argmax(1), labels=classes)


def _select_key(cfg: dict) -> str:
    key = cfg["train"]["select_on"]
    if key == "auto":
        return "loss" if _task(cfg) == "regression" else "UA"
    table = {"ua": "UA", "wa": "WA", "macro_f1": "macro_f1", "weighted_f1": "weighted_f1", "loss": "loss",
             "mae": "MAE", "corr": "corr"}
    if key.lower() not in table:
        raise TrainError(f"train.select_on {key!r}: expected auto, {', '.join(table)}")
    return table[key.lower()]


def _kill_hook() -> Callable[[], None]:
    """Test hook: SERTOOL_TEST_KILL_AFTER_STEPS=N kills the process (SIGKILL) after N steps."""
    n = int(os.environ.get("SERTOOL_TEST_KILL_AFTER_STEPS", "0") or 0)
    count = [0]

    def step():
        count[0] += 1
        if n and count[0] >= n:
            os.kill(os.getpid(), signal.SIGKILL)

    return step


@dataclass
class RunResult:
    fold: str
    seed: int
    best_epoch: int
    dev: dict
    test: dict
    seconds: float


def train_run(cfg: dict, inputs: Inputs, fold: Fold, seed: int, run_dir: Path, norm: Normalizer, device: torch.device,
              *, resume: bool = False, progress: bool = True, log: Callable[[str], None] = print,
              kill_step: Callable[[], None] | None = None, fixed_epochs: int | None = None) -> RunResult:
    """Train one (fold, seed): early stopping and selection on dev; the selected model on test.

    ``fixed_epochs`` = N (the ``run.final: all`` deployment model): ``fold.dev`` and ``fold.test``
    are empty; train exactly N epochs on ``fold.train`` (the learning-rate schedule keeps its
    ``train.epochs`` horizon, so the first N epochs follow the folds' schedule; a plateau schedule
    watches the training loss, there being no dev split), no early stopping, and the model after
    epoch N is the result (its dev/test metrics are empty).

    Under torchrun (a process group of N > 1) the model is wrapped in DistributedDataParallel,
    every rank takes its share of each global batch, dev/test predictions are gathered, and rank 0
    alone writes the run's files (see sertool/distributed.py)."""
    t0 = time.time()
    w = D.world()
    main = w.main
    if not main:
        progress, log = False, (lambda s: None)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
    target = inputs.target_of
    regression = inputs.labels.regression
    crop = crop_lengths(cfg)
    mk = lambda ids: SERDataset(inputs.sources, ids, [target[u] for u in ids], norm, crop, regression)
    final = fixed_epochs is not None
    train_ds = mk(fold.train)
    dev_ds, test_ds = (None, None) if final else (mk(fold.dev), mk(fold.test))
    tr = cfg["train"]
    select = _select_key(cfg)
    higher = select not in ("loss", "MAE")
    epochs = int(fixed_epochs) if final else int(tr["epochs"])
    weight = None
    if tr["class_weights"] and not regression:
        counts = np.bincount(train_ds.targets, minlength=len(inputs.labels.classes)).astype(np.float64)
        weight = torch.tensor(len(train_ds) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32, device=device)

    seed_everything(seed)
    model = build(cfg).to(device)
    D.broadcast_module(model)  # identical initial weights on every rank (they are: same seed)
    optimizer = make_optimizer(cfg, model)
    spe = len(train_ds.batch_indices(tr["batch_size"], tr["max_batch_frames"] or None, True, seed, 0))
    sched = Schedule(cfg["schedule"], cfg["optim"]["lr"], spe, tr["epochs"], higher and not final)
    ckpt, best_path = run_dir / "checkpoint.safetensors", run_dir / "best.safetensors"
    state = {"epoch": 0, "step": 0, "best": None, "best_epoch": -1, "bad": 0, "stopped": False}
    history: list[dict] = []
    log_path = run_dir / "log.jsonl"
    D.barrier()  # rank 0 has made run_dir
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt, model, optimizer)
        sched.load(state["schedule"])
        if log_path.exists():
            history = [json.loads(l) for l in log_path.read_text().splitlines() if l.strip()]
            history = [h for h in history if h["epoch"] < state["epoch"]]
        log(f"[{fold.name} seed {seed}] resuming after epoch {state['epoch']}")
    elif main:
        for p in (ckpt, best_path, log_path):
            p.unlink(missing_ok=True)
    D.barrier()  # every rank has read the checkpoint before rank 0 rewrites anything
    if main:
        _write_jsonl(log_path, history)
    net = model
    if w.distributed:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                  find_unused_parameters=os.environ.get("SERTOOL_DDP_FIND_UNUSED", "0") == "1")
    # weight of each item in the loss (class weights for ce/nll), to split a global batch's mean loss
    item_w = (weight.detach().cpu().numpy()[train_ds.targets] if weight is not None and not regression
              else np.ones(len(train_ds), dtype=np.float64))
    scaler_ctx = tr["amp"]
    workers = int(cfg["data"].get("workers") or 0)
    clip = float(cfg["optim"]["grad_clip"] or 0)
    patience = 0 if final else int(tr["early_stopping"] or 0)
    from tqdm.auto import tqdm

    while state["epoch"] < epochs and not state["stopped"]:
        epoch = state["epoch"]
        model.train()
        batches = distributed_batch_indices(train_ds, tr["batch_size"], tr["max_batch_frames"] or None, True, seed,
                                            epoch, w.rank, w.size)
        collated = iterate_batches(train_ds, [idx for _, idx, _ in batches], workers)
        bar = tqdm(zip(batches, collated), total=len(batches), desc=f"{fold.name} s{seed} ep{epoch + 1}/{epochs}",
                   disable=not progress, leave=False, dynamic_ncols=True)
        total, n, te = 0.0, 0, time.time()
        for (gidx, idx, real), batch in bar:
            batch = to_device(batch, device)
            lr = sched.lr(state["step"])
            for g in optimizer.param_groups:
                g["lr"] = lr
            with _autocast(device, scaler_ctx):
                out = net(batch)
            loss = compute_loss(cfg, out, batch["target"], weight)
            # this rank's share of the global batch's mean loss; DDP averages gradients over the
            # ranks, hence the factor w.size (1 and an unchanged loss in a single process)
            share = float(item_w[idx].sum() / item_w[gidx].sum()) if real else 0.0
            scaled = loss * (share * w.size) if w.distributed else loss
            optimizer.zero_grad(set_to_none=True)
            scaled.backward()
            if clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            state["step"] += 1
            total += float(loss.detach()) * (share * len(gidx) if w.distributed else len(idx))
            n += len(gidx)
            bar.set_postfix(loss=f"{total / n:.4f}", lr=f"{lr:.2e}")
            if kill_step is not None:
                kill_step()
        train_seconds = time.time() - te
        if w.distributed:
            total = D.all_sum([total])[0]
        if final:  # no held-out data: the last epoch is the model; a plateau schedule watches the train loss
            dev_m, dev_loss = {}, float("nan")
            score = total / max(n, 1)
            improved = True
        else:
            preds, dev_loss = predict(cfg, model, dev_ds, device, weight=weight)
            dev_m = score_predictions(cfg, preds, dev_ds.targets, inputs.labels.classes)
            dev_m["loss"] = dev_loss
            score = float(dev_m[select])
            improved = state["best"] is None or (score > state["best"] if higher else score < state["best"])
        if improved:
            state.update(best=score, best_epoch=epoch, bad=0)
            if main:
                save_weights(model, best_path, {"epoch": str(epoch), "fold": fold.name, "seed": str(seed)})
        else:
            state["bad"] += 1
        sched.end_epoch(score)
        record = {"fold": fold.name, "seed": seed, "epoch": epoch, "lr": sched.lr(max(state["step"] - 1, 0)),
                  "train_loss": total / max(n, 1), **({} if final else {"dev_loss": dev_loss}),
                  **{f"dev_{k}": dev_m[k] for k in ("WA", "UA", "macro_f1", "MAE", "corr") if k in dev_m},
                  "best": improved, "seconds": round(train_seconds, 3)}
        if w.distributed:
            record["world_size"] = w.size
        history.append(record)
        if main:
            _append_jsonl(log_path, record)
        state["epoch"] = epoch + 1
        if patience and state["bad"] >= patience:
            state["stopped"] = True
        state["schedule"] = sched.state()
        if main:
            save_checkpoint(ckpt, model, optimizer, state)
        if progress:
            shown = " ".join(f"{k[4:]} {record[k]:.4f}" for k in ("dev_UA", "dev_WA", "dev_MAE") if k in record)
            log(f"[{fold.name} seed {seed}] epoch {epoch + 1}: train loss {record['train_loss']:.4f}"
                + ("" if final else f", dev loss {dev_loss:.4f} {shown}{' *' if improved else ''}"))
    # the selected (best dev) model, evaluated once on the test split
    D.barrier()  # rank 0 has written best.safetensors
    if not best_path.exists():
        raise TrainError(f"{run_dir}: no model was selected (train.epochs = {epochs})")
    if final:
        result = RunResult(fold.name, seed, epochs - 1, {}, {}, round(time.time() - t0, 2))
        D.barrier()
        if main:
            os.replace(best_path, run_dir / "model.safetensors")
            _write_json(run_dir / "metrics.json", {
                "fold": fold.name, "seed": seed, "final": "all", "epochs": epochs, "n_utterances": len(fold.train),
                "train_loss": history[-1]["train_loss"] if history else None, "seconds": result.seconds})
            ckpt.unlink(missing_ok=True)
        D.barrier()
        return result
    meta = load_weights(model, best_path)
    preds, test_loss = predict(cfg, model, test_ds, device, weight=weight)
    test_m = score_predictions(cfg, preds, test_ds.targets, inputs.labels.classes)
    test_m["loss"] = test_loss
    preds_dev, dev_loss = predict(cfg, model, dev_ds, device, weight=weight)
    dev_m = score_predictions(cfg, preds_dev, dev_ds.targets, inputs.labels.classes)
    dev_m["loss"] = dev_loss
    result = RunResult(fold.name, seed, int(meta.get("epoch", state["best_epoch"])), _compact(dev_m), _compact(test_m),
                       round(time.time() - t0, 2))
    D.barrier()  # every rank has read best.safetensors
    if main:
        os.replace(best_path, run_dir / "model.safetensors")
        _write_json(run_dir / "metrics.json", {"fold": fold.name, "seed": seed, "best_epoch": result.best_epoch,
                                               "selected_on": f"dev {select}", "dev": result.dev, "test": result.test,
                                               "epochs_run": state["epoch"], "seconds": result.seconds})
        ckpt.unlink(missing_ok=True)
    D.barrier()  # the run's files are complete before any rank looks at the next run
    return result


def _compact(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("per_class",)}


def _write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r, default=_json_default) + "\n" for r in rows))
    os.replace(tmp, path)


def _append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row, default=_json_default) + "\n")
        f.flush()


def run_dir_of(exp: Path, fold: str, seed: int) -> Path:
    return Path(exp) / "folds" / fold / f"seed{seed}"


def seeds_of(cfg: dict) -> list[int]:
    n = int(cfg["run"]["seeds"])
    if n < 1:
        raise TrainError(f"run.seeds must be >= 1, got {n}")
    return [int(cfg["run"]["seed"]) + i for i in range(n)]


# ----------------------------------------------------------------------------------- the stage
def run_train(model: str, feats: str | os.PathLike, exp: str | os.PathLike, *, config_file=None,
              overrides: Iterable[str] = (), resume: bool = False, overwrite: bool = False, progress: bool = True,
              log: Callable[[str], None] = print, folds_only: Iterable[str] | None = None) -> dict:
    """Train ``model`` on FEATS into EXP; returns the content of EXP/metrics.json.

    Launched by torchrun (``WORLD_SIZE`` > 1) it joins the process group and trains with
    DistributedDataParallel; every rank returns the same result, rank 0 writes EXP."""
    exp = Path(exp)
    overrides = list(overrides)
    cfg = resolve_config(model, config_file, [*overrides, f"data.feats={Path(feats).resolve()}"])
    inputs = load_inputs(cfg, feats)
    finalize_model_config(cfg, inputs)
    build(cfg)  # a model that cannot be built fails before any training
    final_mode(cfg)
    seeds = seeds_of(cfg)
    started_group = D.launched_by_torchrun() and not D.world().distributed
    w, device_name = D.setup(cfg["run"]["device"])
    try:
        return _run_train(cfg, inputs, seeds, exp, w, device_name, resume=resume, overwrite=overwrite,
                          progress=progress, log=log, folds_only=folds_only)
    finally:
        if started_group:
            D.shutdown()


def _run_train(cfg: dict, inputs: Inputs, seeds: list[int], exp: Path, w: "D.World", device_name: str, *,
               resume: bool, overwrite: bool, progress: bool, log: Callable[[str], None],
               folds_only: Iterable[str] | None) -> dict:
    main = w.main
    if not main:
        progress, log = False, (lambda s: None)
    device = pick_device(device_name)
    if int(cfg["run"].get("threads") or 0) > 0:
        torch.set_num_threads(int(cfg["run"]["threads"]))
    select = _select_key(cfg)

    cfg_path = exp / "config.yaml"
    record = {**cfg,
              "features": {m: s.provenance() for m, s in inputs.sources.items()},
              "label_set": {**inputs.labels.to_config(), "dropped_missing_features": len(inputs.dropped_missing)},
              "experiment": {"created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                             "command": " ".join(sys.argv), "device": str(device), "seeds": seeds,
                             "folds": [f.name for f in inputs.folds], "selected_on": f"dev {select}",
                             "sertool": __import__("sertool").__version__, "torch": torch.__version__,
                             **({"world_size": w.size, "backend": w.backend} if w.distributed else {})}}
    error = None
    if main:
        try:
            _prepare_exp(exp, cfg, record, cfg_path, inputs, resume=resume, overwrite=overwrite)
        except TrainError as e:
            error = str(e)
    error = D.broadcast_object(error)  # rank 0 has checked and written EXP (or every rank fails alike)
    if error is not None:
        raise TrainError(error)

    kill = _kill_hook()
    results: list[RunResult] = []
    wanted = set(folds_only) if folds_only else None
    if wanted is not None and wanted - {f.name for f in inputs.folds}:
        raise TrainError(f"--fold {', '.join(sorted(wanted - {f.name for f in inputs.folds}))}: no such fold; "
                         f"this protocol's folds are {', '.join(f.name for f in inputs.folds)}")
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
                results.append(RunResult(m["fold"], m["seed"], m["best_epoch"], m["dev"], m["test"], m["seconds"]))
                log(f"[{fold.name} seed {seed}] already done")
                continue
            res = train_run(cfg, inputs, fold, seed, rd, norm, device, resume=resume, progress=progress, log=log,
                            kill_step=kill)
            results.append(res)
            shown = " ".join(f"{k} {res.test[k]:.4f}" for k in ("WA", "UA", "macro_f1", "MAE", "corr") if k in res.test)
            log(f"[{fold.name} seed {seed}] best epoch {res.best_epoch + 1}, test {shown}")
    final_info = None
    if final_mode(cfg) == "all":
        if wanted is not None and wanted != {f.name for f in inputs.folds}:
            log("run.final=all: the deployment model is trained once every fold is done "
                "(run again with --resume and no --fold)")
        elif results:
            final_info = train_final(cfg, inputs, results, seeds[0], exp, device, resume=resume, progress=progress,
                                     log=log, kill_step=kill)
    for src in inputs.sources.values():
        store = getattr(src, "store", None)
        if store is not None:
            store.close()
    summary = _summarize(results)
    out = {"task": _task(cfg), "labels": inputs.labels.classes, "selected_on": f"dev {select}",
           "summary": summary, "runs": [r.__dict__ for r in results]}
    if final_info is not None:
        out["final"] = final_info
    if main:
        _write_json(exp / "metrics.json", out)
        # EXP/log.jsonl: every run's epochs
        rows = []
        for r in results:
            lp = run_dir_of(exp, r.fold, r.seed) / "log.jsonl"
            rows += [json.loads(l) for l in lp.read_text().splitlines() if l.strip()] if lp.exists() else []
        _write_jsonl(exp / "log.jsonl", rows)
        if results and (final_mode(cfg) == "best-dev" or final_info is not None):
            write_predictor(exp, cfg, results, select, final=final_info)
        if final_info is not None:  # provenance of the deployment model in config.yaml's record
            rec = yaml.safe_load(cfg_path.read_text())
            rec["experiment"]["final"] = final_info
            _write_text(cfg_path, yaml.safe_dump(json.loads(json.dumps(rec, default=_json_default)), sort_keys=False))
    D.barrier()  # EXP is complete when any rank returns
    return out


def _prepare_exp(exp: Path, cfg: dict, record: dict, cfg_path: Path, inputs: Inputs, *, resume: bool,
                 overwrite: bool) -> None:
    """Check EXP (refuse to overwrite, or to resume with other settings); write config.yaml and folds.json."""
    if exp.exists() and any(exp.iterdir()):
        if overwrite:
            shutil.rmtree(exp)
        elif not resume:
            raise TrainError(f"{exp} already holds an experiment; use --resume to continue it or --overwrite")
        elif cfg_path.exists():
            old = yaml.safe_load(cfg_path.read_text())
            old_settings = {k: v for k, v in old.items() if k not in RECORD_KEYS}
            _fill(old_settings, json.loads(json.dumps(STAGE_DEFAULTS)))  # keys added since then: defaults
            _fill(old_settings, _model_defaults((old_settings.get("model") or {}).get("name")))
            new_settings = json.loads(json.dumps({k: v for k, v in cfg.items()}))
            if old_settings != new_settings:
                diff = [k for k in set(old_settings) | set(new_settings) if old_settings.get(k) != new_settings.get(k)]
                raise TrainError(f"--resume: the settings differ from those of {exp} (sections {sorted(diff)}); "
                                 "resume with the same command, or use --overwrite")
            record["experiment"]["created"] = old.get("experiment", {}).get("created")
    exp.mkdir(parents=True, exist_ok=True)
    _write_text(cfg_path, yaml.safe_dump(json.loads(json.dumps(record, default=_json_default)), sort_keys=False))
    _write_json(exp / "folds.json", {"protocol": cfg["protocol"], "folds": [f.to_json() for f in inputs.folds]})


def _model_defaults(name: str | None) -> dict:
    """The registered default config of model `name` (keys a newer sertool added to it count as
    unchanged when an older experiment is resumed); {} for an unknown name."""
    from sertool.models.registry import default_config

    try:
        return json.loads(json.dumps(default_config(name))) if name else {}
    except (KeyError, ValueError):
        return {}


def _summarize(results: list[RunResult]) -> dict:
    keys = [k for k in ("WA", "UA", "macro_f1", "weighted_f1", "MAE", "corr", "acc7", "acc5", "acc2_has0",
                        "f1_has0", "acc2_non0", "f1_non0") if results and k in results[0].test]
    return {k: M.summarize([r.test[k] for r in results]) for k in keys}


FINAL_MODES = ("best-dev", "all")


def final_mode(cfg: dict) -> str:
    mode = cfg["run"]["final"]
    if mode not in FINAL_MODES:
        raise TrainError(f"run.final {mode!r}: expected best-dev (the fold x seed run with the best dev score) or "
                         "all (one more model trained on every labelled utterance)")
    return mode


def final_epochs(results: list[RunResult]) -> int:
    """The number of epochs of the ``run.final: all`` model: the median, over the fold x seed runs, of
    the epoch count of the selected (best dev) model, rounded half up, at least 1."""
    counts = sorted(r.best_epoch + 1 for r in results)
    return max(1, int(math.floor(float(np.median(counts)) + 0.5)))


def train_final(cfg: dict, inputs: Inputs, results: list[RunResult], seed: int, exp: Path, device: torch.device, *,
                resume: bool, progress: bool, log: Callable[[str], None],
                kill_step: Callable[[], None] | None = None) -> dict:
    """``run.final: all``: one deployment model on every labelled utterance (train + dev + test of all
    folds), normalised with statistics of all of them, for ``final_epochs(results)`` epochs, into
    EXP/final/ (norm.safetensors, ids.json, model.safetensors, log.jsonl, metrics.json).  Resumable:
    a finished final model is kept, an interrupted one continues from its last checkpoint."""
    main = D.world().main
    ids = [u.id for u in inputs.utts]
    epochs = final_epochs(results)
    counts = [r.best_epoch + 1 for r in results]
    info = {"final": "all", "n_utterances": len(ids), "epochs": epochs, "seed": seed,
            "epochs_rule": f"median over the {len(results)} fold x seed runs of the selected (best dev) epoch count, "
                           "rounded half up; no early stopping (no held-out data)",
            "selected_epoch_counts": counts, "normalizer": "statistics of all n_utterances"}
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
        _write_json(fd / "ids.json", {"n_utterances": len(ids), "ids": ids})
    D.barrier()
    if not main:
        norm = Normalizer.load(norm_path)
    log(f"[final seed {seed}] training on all {len(ids)} utterances for {epochs} epochs "
        f"(median of the folds' selected epochs {counts})")
    fold = Fold("final", ids, [], [], {"final": "all"})
    res = train_run(cfg, inputs, fold, seed, fd, norm, device, resume=resume, progress=progress, log=log,
                    kill_step=kill_step, fixed_epochs=epochs)
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
    shutil.copyfile(src_dir / "model.safetensors", exp / "model.safetensors.tmp")
    os.replace(exp / "model.safetensors.tmp", exp / "model.safetensors")
    shutil.copyfile(norm_src, exp / "norm.safetensors.tmp")
    os.replace(exp / "norm.safetensors.tmp", exp / "norm.safetensors")
    cfg_rec = yaml.safe_load((exp / "config.yaml").read_text())
    predictor = {
        "format": "sertool-predictor", "version": 1,
        "model": "model.safetensors", "normalizer": "norm.safetensors", "config": "config.yaml",
        "model_config": cfg["model"], "task": _task(cfg), "loss": cfg["train"]["loss"],
        "classes": cfg_rec["label_set"]["classes"], "label_set": cfg_rec["label_set"]["preset"],
        "features": cfg_rec["features"], "inputs": {m: cfg["data"][m] for m in model_modalities(cfg)},
        "normalize": {m: (cfg["data"].get("normalize") or {}).get(m, "none") for m in model_modalities(cfg)},
        "max_steps": crop_lengths(cfg),
        "selection": ({"rule": f"the fold x seed run with the best dev {select} (test scores not used)",
                       "final": "best-dev", "fold": best.fold, "seed": best.seed, f"dev_{select}": best.dev[select]}
                      if mode == "best-dev" else
                      {"rule": "final: all - one model trained on every labelled utterance for a fixed number of "
                               "epochs; the cross-validation metrics (metrics.json) are those of the fold x seed runs",
                       **final}),
    }
    _write_json(exp / "predictor.json", predictor)
    return predictor


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def load_experiment(exp: str | os.PathLike) -> tuple[dict, list[Fold]]:
    """The resolved config (with records) and the folds of an experiment directory."""
    exp = Path(exp)
    if not (exp / "config.yaml").exists():
        raise TrainError(f"{exp} is not an experiment directory (no config.yaml; run `sertool train` first)")
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    folds = [Fold.from_json(f) for f in json.loads((exp / "folds.json").read_text())["folds"]]
    return cfg, folds
