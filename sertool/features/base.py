"""The extractor interface and registry.

An extractor turns one utterance into a [T, D] float32 matrix plus per-utterance attributes.
Audio extractors receive the mono waveform already resampled to `sample_rate`; text
extractors receive the utterance (its `text`, `words`).

    @register_extractor("mfcc")
    class MFCC(Extractor):
        kind = "audio"
        def __init__(self, n_mfcc=40, ...): ...
        def params(self): return {"n_mfcc": self.n_mfcc, ...}   # JSON, rebuilds the extractor
        def file_attrs(self): return {"dim": ..., "frame_rate_hz": 100.0, "columns": [...]}
        def extract(self, utt, wave): return FeatureResult(matrix, {})

Presets are named parameter sets of a registered extractor (`mfcc80` = `mfcc` with 80
coefficients …); the preset name becomes the store name.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import numpy as np

from sertool.corpora.base import Utterance


class ExtractorError(RuntimeError):
    """A feature that cannot be computed for one utterance (the run goes on)."""


@dataclass
class FeatureResult:
    data: np.ndarray  # [T, D] float32
    attrs: dict[str, Any] = field(default_factory=dict)  # JSON-able or numpy arrays


class Extractor:
    name: ClassVar[str] = ""  # registry key, set by register_extractor
    kind: ClassVar[str] = "audio"  # audio | text | visual
    needs_audio: ClassVar[bool] = True
    needs_text: ClassVar[bool] = False
    # True for extractors that batch (GPU models): the extract stage calls extract_batch in
    # the main process with `batch_size` utterances instead of fanning out to --nj workers.
    batched: ClassVar[bool] = False
    batch_size: int = 1
    sample_rate: int | None = 16000
    # CLI options of `sertool extract` that this extractor takes as parameters:
    # {"cli option name": "parameter name"}, e.g. {"text_model": "model"}.
    cli_options: ClassVar[dict[str, str]] = {}

    def params(self) -> dict[str, Any]:
        """JSON-able parameters that rebuild this extractor exactly."""
        raise NotImplementedError

    def file_attrs(self) -> dict[str, Any]:
        """Store attrs: at least `dim` and `frame_rate_hz` (audio) or `unit` (text)."""
        raise NotImplementedError

    def extract(self, utt: Utterance, wave: np.ndarray | None) -> FeatureResult:
        raise NotImplementedError

    def extract_batch(self, items: list[tuple[Utterance, np.ndarray | None]]) -> list[FeatureResult | Exception]:
        """Batched extraction; one result or the exception per item, in order."""
        out: list[FeatureResult | Exception] = []
        for utt, wave in items:
            try:
                out.append(self.extract(utt, wave))
            except Exception as e:  # noqa: BLE001 - reported per utterance by the stage
                out.append(e)
        return out

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params()}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.params()})"


_REGISTRY: dict[str, type[Extractor]] = {}
_PRESETS: dict[str, tuple[str, dict[str, Any]]] = {}
# Modules that register extractors when imported; imported lazily so a missing optional
# dependency (pyworld, opensmile, faster-whisper …) only matters for the features that need it.
_MODULES = (
    "sertool.features.acoustic",
    "sertool.features.covarep",
    "sertool.features.opensmile_sets",
    "sertool.features.words",
    "sertool.features.lm",
    "sertool.features.ssl",
    "sertool.features.whisper",
    "sertool.features.fusion",
)


def register_extractor(name: str) -> Callable[[type[Extractor]], type[Extractor]]:
    def wrap(cls: type[Extractor]) -> type[Extractor]:
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def register_preset(preset: str, base: str, **params: Any) -> None:
    _PRESETS[preset] = (base, params)


def _load_plugins() -> None:
    # SERTOOL_PLUGINS=pkg.module,other.module registers a user's own extractors (they must be
    # importable in --nj worker processes too, so they are named by module, not passed around).
    plugins = tuple(m.strip() for m in os.environ.get("SERTOOL_PLUGINS", "").split(",") if m.strip())
    for module in plugins:
        if module not in _IMPORTED:
            importlib.import_module(module)
            _IMPORTED.add(module)


def _load_module(module: str) -> None:
    if module in _IMPORTED or module in _IMPORT_ERRORS:
        return
    try:
        importlib.import_module(module)
        _IMPORTED.add(module)
    except ModuleNotFoundError as e:
        if e.name == module:  # not part of this installation
            return
        # an optional third-party dependency is missing: its extractors stay unregistered
        _IMPORT_ERRORS[module] = f"{type(e).__name__}: {e}"
    except Exception as e:  # noqa: BLE001 - one broken extractor module must not hide the others
        _IMPORT_ERRORS[module] = f"{type(e).__name__}: {e}"


def _load_modules() -> None:
    _load_plugins()
    for module in _MODULES:
        _load_module(module)


# where the built-in extractors live: building one imports its module first (building `whisper`
# need not import librosa through `acoustic`, 1.7 s of predict's start-up)
_HOME = {
    "mfcc": "sertool.features.acoustic",
    "covarep": "sertool.features.covarep",
    "egemaps": "sertool.features.opensmile_sets",
    "compare": "sertool.features.opensmile_sets",
    "glove": "sertool.features.words",
    "word2vec": "sertool.features.words",
    "bert": "sertool.features.lm",
    "wav2vec2": "sertool.features.ssl",
    "whisper": "sertool.features.whisper",
    "concat": "sertool.features.fusion",
}


def _find(name: str) -> bool:
    """Import extractor modules until `name` is registered, its own module first, then the others
    in order: start-up stays fast (building `mfcc` need not import transformers or openSMILE)."""
    _load_plugins()
    for module in (None, _HOME.get(name), *_MODULES):
        if module is not None:
            _load_module(module)
        if name in _REGISTRY or name in _PRESETS:
            return True
    return False


_IMPORTED: set[str] = set()
_IMPORT_ERRORS: dict[str, str] = {}


def list_extractors() -> dict[str, str]:
    """{name: description} of every extractor and preset."""
    _load_modules()
    out = {name: (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else "" for name, cls in _REGISTRY.items()}
    for preset, (base, params) in _PRESETS.items():
        out[preset] = f"preset of {base}: {params}"
    return dict(sorted(out.items()))


def resolve(name: str, params: dict[str, Any] | None = None) -> tuple[type[Extractor], dict[str, Any]]:
    if not _find(name):
        _load_modules()
    params = dict(params or {})
    if name in _PRESETS:
        base, preset_params = _PRESETS[name]
        return _REGISTRY[base], {**preset_params, **params}
    if name not in _REGISTRY:
        known = ", ".join(sorted([*_REGISTRY, *_PRESETS])) or "none"
        failed = "; ".join(f"{m}: {err}" for m, err in _IMPORT_ERRORS.items())
        raise ExtractorError(
            f"unknown feature {name!r} (known: {known})"
            + (f"; modules that could not be loaded: {failed}" if failed else "")
        )
    return _REGISTRY[name], params


def build_extractor(spec: str | dict[str, Any], params: dict[str, Any] | None = None) -> Extractor:
    """Build from a name (+ params) or from a recorded `config()` dict."""
    if isinstance(spec, dict):
        name, params = spec["name"], {**spec.get("params", {}), **(params or {})}
    else:
        name = spec
    cls, params = resolve(name, params)
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:  # unknown parameter, or a value of the wrong type
        raise ExtractorError(f"feature {name!r}: bad parameters {params}: {e}") from None
