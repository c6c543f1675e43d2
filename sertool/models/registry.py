"""Model registry and YAML configs.

Each model is registered under a key and has a default config ``sertool/conf/<key>.yaml`` with
three sections:

``model``    constructor arguments (``name`` = registry key, ``modalities``, input dims,
             ``n_classes``, ``task`` = classification | regression, and the paper's
             hyper-parameters);
``optim``    optimiser for the ``train`` stage (``name``, ``lr``, ``weight_decay``, ``grad_clip``...);
``schedule`` learning-rate schedule (``name`` = step | none, ``step_size`` epochs, ``gamma``);
``train``    ``epochs``, ``batch_size``, ``loss`` and what else the paper fixes.

The ``model`` section is the one place for a model's defaults: constructors take their arguments
keyword-only and without default values, and :func:`build_model` passes the whole section.

Only keys present in the default config are accepted: a user YAML file or a ``key.sub=value``
override naming any other key raises ``ValueError`` naming that key.  Override values are parsed
with ``yaml.safe_load`` (``model.d=30``, ``model.gates=false``, ``optim.lr=1e-4``); the machinery
(merge, coercion, overrides, safe YAML files) is :mod:`sertool.config`.
"""

from __future__ import annotations

import copy
import importlib
from pathlib import Path
from typing import Iterable, Optional, Union

import torch
import torch.nn as nn

from sertool.config import apply_overrides, coerce, load_yaml, merge, merge_file, split_override

__all__ = [
    "register",
    "list_models",
    "default_config",
    "load_config",
    "apply_overrides",
    "build_model",
    "describe_models",
    "count_parameters",
    "SERModel",
    "CONF_DIR",
]

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
MODALITIES = ("audio", "text", "visual")

_REGISTRY: dict[str, type] = {}
_MODULES = (
    "lgcct",
    "ks_transformer",
    "rajan",
    "cma",
    "cmd_student",
    "cmd",
    "probe",
    "whisper_ft",
    "text_ft",
    "wav2vec2_ft",
)


def register(key: str):
    """Class decorator: register a model class under ``key``."""

    def deco(cls):
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"model key {key!r} registered twice")
        _REGISTRY[key] = cls
        return cls

    return deco


def _import_all():
    for m in _MODULES:
        importlib.import_module(f"{__package__}.{m}")


def list_models() -> list[str]:
    """Registered model keys, in the order of their modules in _MODULES (whatever was imported first)."""
    _import_all()
    module_rank = {f"{__package__}.{m}": i for i, m in enumerate(_MODULES)}
    return sorted(
        _REGISTRY, key=lambda k: (module_rank.get(_REGISTRY[k].__module__, len(_MODULES)), list(_REGISTRY).index(k))
    )


# ----------------------------------------------------------------------------- configs
_DEFAULTS_READ: dict[str, dict] = {}


def default_config(key: str) -> dict:
    """A copy of sertool/conf/KEY.yaml, read once per process: every fold and seed of a run is
    built from the same defaults, even if the file changes on disk while the run goes on."""
    if key not in list_models():
        raise ValueError(f"unknown model {key!r}; known: {', '.join(list_models())}")
    if key not in _DEFAULTS_READ:
        _DEFAULTS_READ[key] = load_yaml(CONF_DIR / f"{key}.yaml")
    return copy.deepcopy(_DEFAULTS_READ[key])


# The config machinery lives in sertool.config; these names stay importable from here.
_coerce = coerce
_merge = merge
_split_override = split_override


def _has_path(cfg: dict, path: list[str]) -> bool:
    node = cfg
    for p in path:
        if not isinstance(node, dict) or p not in node:
            return False
        node = node[p]
    return True


def load_config(key: str, overrides: Iterable[str] = (), path: Optional[str] = None) -> dict:
    """Default config of ``key``, then the user YAML ``path`` merged on top, then overrides."""
    cfg = default_config(key)
    if path is not None:
        merge_file(cfg, path)
    apply_overrides(cfg, overrides)
    return cfg


# ----------------------------------------------------------------------------- models
class SERModel(nn.Module):
    """Base class: ``modalities`` it consumes, the resolved ``config``, batch access helpers."""

    modalities: tuple = ()
    config: dict = {}

    def _inputs(self, batch: dict, m: str):
        """Frames and mask of modality ``m``; frames of a stacked-layer store come out as the
        learned weighted sum of their layers (``self.layer_weights``, blocks.stacked_layer_weights)."""
        if m not in batch or batch[m] is None:
            raise KeyError(f"{type(self).__name__} needs batch[{m!r}] (consumes {self.modalities})")
        x = batch[m]
        layer_weights = getattr(self, "layer_weights", None)
        if layer_weights is not None and m in layer_weights:
            x = layer_weights[m](x)
        mask = batch.get(f"{m}_mask")
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        return x, mask.to(torch.bool)

    def learned_layer_weights(self) -> dict[str, list[float]]:
        """``{modality: softmax weight per stacked layer}`` (empty for plain stores)."""
        layer_weights = getattr(self, "layer_weights", None) or {}
        return {m: [float(v) for v in lw.weights().detach().cpu()] for m, lw in layer_weights.items()}


class OwnEncoderModel(SERModel):
    """A model that owns a pretrained encoder it fine-tunes (``whisper_ft``, ``text_ft``): the train
    stage's two encoder hooks over ``self.encoder``'s parameters named in ``self._trained``, with
    ``self.layer_weights`` and ``self.classifier`` as the head."""

    def encoder_parameters(self) -> list[nn.Parameter]:
        named = dict(self.encoder.named_parameters())
        return [named[n] for n in self._trained]

    def encoder_layers(self) -> nn.ModuleList:
        """The encoder's stack of transformer layers (each model names its own)."""
        raise NotImplementedError

    def encoder_depths(self) -> dict[int, tuple[int, int]]:
        """``{id(parameter): (depth, layers)}`` over the encoder's parameters, for layer-wise
        learning-rate decay (``optim.layer_decay``): depth k for the k-th transformer layer (from 1),
        0 for what comes before the stack (embeddings, the convolutional front end, positions) and
        ``layers`` for what comes after it (a final layer norm)."""
        layers = self.encoder_layers()
        n = len(layers)
        depths = {id(p): (i + 1, n) for i, layer in enumerate(layers) for p in layer.parameters()}
        past_the_stack = False
        for p in self.encoder.parameters():  # registration order: what precedes the stack, the stack, the rest
            if id(p) in depths:
                past_the_stack = True
            else:
                depths[id(p)] = (n if past_the_stack else 0, n)
        return depths

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Optimiser groups: ``encoder`` (lr x optim.encoder_lr_scale) and ``head``."""
        head = [*self.layer_weights.parameters(), *self.classifier.parameters()]
        return {"encoder": self.encoder_parameters(), "head": head}

    def set_encoder_trainable(self, trainable: bool) -> None:
        """Freeze (no gradient: the optimiser leaves the weights as they are) or unfreeze the encoder's
        trained parameters; the loop calls it at the start of every epoch."""
        for p in self.encoder_parameters():
            p.requires_grad_(bool(trainable))


class PooledAudioModel(OwnEncoderModel):
    """The head of the waveform fine-tuning models (``whisper_ft``, ``wav2vec2_ft``): a learned
    softmax weighting of every hidden state (SUPERB), statistics pooling over each clip's real
    states, optionally standardised (``model.pooled_norm: batch``), dropout, a linear classifier."""

    def _build_head(self, dim: int, states: int, dropout, pooled_norm, task, n_classes) -> None:
        from .blocks import LayerWeights

        if task not in ("classification", "regression"):
            raise ValueError(f"model.task must be regression|classification, got {task!r}")
        if pooled_norm not in ("none", "batch"):
            raise ValueError(f"model.pooled_norm must be none or batch, got {pooled_norm!r}")
        self.layer_weights = nn.ModuleDict({"audio": LayerWeights(states)})
        # the pooled statistics standardised over the batch (running averages at evaluation)
        self.pooled_norm = nn.BatchNorm1d(2 * dim, affine=False) if pooled_norm == "batch" else None
        self.dropout = nn.Dropout(float(dropout))
        self.classifier = nn.Linear(2 * dim, 1 if task == "regression" else int(n_classes))

    def weighted(self, states: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
        weights = self.layer_weights["audio"].weights()
        return torch.einsum("lbtd,l->btd", torch.stack(list(states)), weights.to(states[0].dtype))

    @staticmethod
    def state_mask(n_states: torch.Tensor, t: int) -> torch.Tensor:
        return torch.arange(t, device=n_states.device)[None, :] < n_states[:, None]

    def head(self, states: list[torch.Tensor] | tuple[torch.Tensor, ...], n_states: torch.Tensor) -> torch.Tensor:
        """Every hidden state [B, T, D] and each clip's real states -> logits: the learned layer
        weighting, statistics pooling over real states, the optional batch standardisation,
        dropout, the classifier."""
        x = self.weighted(states)
        return self.classifier(self.dropout(self.pool(x, self.state_mask(n_states, x.shape[1]))))

    def pool(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Frames [B, T, D] and their real-frame mask -> the statistics the classifier reads [B, 2D]."""
        from .blocks import statistics_pooling

        pooled = statistics_pooling(x, mask)
        norm = self.pooled_norm
        if norm is not None:  # a batch of one clip has no spread to standardise by: the running averages serve
            batch_stats = self.training and pooled.shape[0] > 1
            if batch_stats:
                norm.num_batches_tracked += 1
            pooled = nn.functional.batch_norm(
                pooled, norm.running_mean, norm.running_var, training=batch_stats, momentum=norm.momentum, eps=norm.eps
            )
        return pooled


def _check_modalities(mods, allowed=MODALITIES):
    mods = tuple(mods)
    bad = [m for m in mods if m not in allowed]
    if bad or not mods or len(set(mods)) != len(mods):
        raise ValueError(f"model.modalities must be a non-empty subset of {allowed}, got {list(mods)}")
    return mods


# model keys build_model reads itself, not the model class: its name and the encoders it owns
BUILD_KEYS = ("name", "input_encoders")
# keys added with a default other than the behaviour before them: an experiment recorded without the
# key was made with this value (build_model rebuilds it so; --resume compares with it)
LEGACY_DEFAULTS = {"whisper_ft": {"pooled_norm": "none"}}


def fill_legacy_defaults(model_cfg: dict) -> None:
    """Give a recorded ``model`` section the values its missing keys had before they existed."""
    for k, v in LEGACY_DEFAULTS.get(model_cfg.get("name"), {}).items():
        model_cfg.setdefault(k, v)
    for spec in (model_cfg.get("input_encoders") or {}).values():
        if isinstance(spec, dict) and spec.get("name"):
            fill_legacy_defaults(spec)


def build_model(key_or_config: Union[str, dict], overrides: Iterable[str] = (), **dims) -> nn.Module:
    """Build a model from a registry key or a (full or ``model``-section) config dict.

    ``dims``: model keys such as ``audio_dim=768, text_dim=1024, n_classes=4`` (a ``model.``
    prefix is accepted too); they override the config.
    """
    if isinstance(key_or_config, str):
        cfg = load_config(key_or_config, overrides)
    else:
        given = copy.deepcopy(dict(key_or_config))
        if "model" not in given:
            given = {"model": given}
        key = (given.get("model") or {}).get("name")
        if key is None:
            raise ValueError("config has no model.name")
        fill_legacy_defaults(given["model"])
        cfg = default_config(key)
        merge(cfg, given)
        apply_overrides(cfg, overrides)
    key = cfg["model"]["name"]
    for k, v in dims.items():
        k2 = k[len("model.") :] if k.startswith("model.") else k
        if k2 not in cfg["model"]:
            raise ValueError(f"unknown config key 'model.{k2}'")
        cfg["model"][k2] = coerce(cfg["model"][k2], v, f"model.{k2}")
    cls = _REGISTRY[key]
    kwargs = {k: v for k, v in cfg["model"].items() if k not in BUILD_KEYS}
    model = cls(**kwargs)
    from .owned import WithEncoders, requested

    encoders = requested(cfg["model"])
    if encoders:  # the model on encoders it owns (sertool/models/owned.py)
        model = WithEncoders(model, encoders)
    model.config = cfg
    return model


def count_parameters(model: nn.Module, trainable: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


def describe_models(overrides: Iterable[str] = ()) -> list[tuple[str, int]]:
    """``(key, trainable parameter count)`` for every model with its default config (``None`` for a
    model built from another experiment, ``model.init``, or from a checkpoint the user names,
    ``model.encoder: null`` (wav2vec2_ft): its size is that one's).

    Each override ``a.b=v`` is applied to every model whose config has the key ``a.b``; an
    override prefixed by a model key (``lgcct.model.gates=false``) applies to that model only.
    An override that applies to no model raises ``ValueError``.
    """
    keys = list_models()
    overrides = list(overrides or ())
    used = [False] * len(overrides)
    rows = []
    for key in keys:
        cfg = default_config(key)
        mine = []
        for i, ov in enumerate(overrides):
            path, _ = split_override(ov)
            if path[0] in keys and len(path) > 1:
                if path[0] == key:
                    mine.append(ov.split(".", 1)[1])
                    used[i] = True
            elif _has_path(cfg, path):
                mine.append(ov)
                used[i] = True
        if ("init" in cfg["model"] and cfg["model"]["init"] is None) or (
            "encoder" in cfg["model"] and cfg["model"]["encoder"] is None
        ):  # built from another experiment (cmd: a distilled student) or a checkpoint the user names
            rows.append((key, None))
            continue
        with torch.device("meta"):
            model = build_model(key, mine)
        rows.append((key, count_parameters(model)))
    for ov, u in zip(overrides, used):
        if not u:
            raise ValueError(f"unknown config key '{ov.split('=', 1)[0]}' (applies to no model)")
    return rows
