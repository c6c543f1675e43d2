"""HDF5 feature store: one file per feature set, one [T, D] dataset per utterance.

Layout (DESIGN.md): file attrs `feature`, `kind`, `dim`, `frame_rate_hz` or `unit`,
`extractor` (JSON config that rebuilds the extractor), library versions, creation time, plus
`format`/`format_version` so a reader can refuse a store it does not understand. Datasets live
under `/utts/<id>` with per-utterance attrs (tokens, source checksum …).

Crash safety. HDF5 files are not safe against a kill in the middle of a write, so a running
extraction never writes into the final file. Finished utterances are buffered and written in
small *part* files (`NAME.h5.parts/part-000001.h5`), each written to a temporary name and
renamed when complete; a kill -9 loses at most the buffer. When the run finishes, the parts
(and any earlier complete store) are merged into `NAME.h5.tmp`, which is renamed over
`NAME.h5`. A re-run reads the ids already in the store and its parts and computes only the rest
(and the utterances whose recorded source checksum no longer matches: the merge keeps an id's
latest version).

Shards from parallel or cluster jobs (`--shard i/N`) are `NAME.shard-i-of-N.h5`; `open_store`
reads a complete set of shards as one store and `merge_shards` joins them.
"""

from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import platform
import re
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import h5py
import numpy as np

from sertool.utils import atomic_path

FORMAT = "sertool-features"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
_JSON_KEYS_ATTR = "__json__"
_SHARD_RE = re.compile(r"^(?P<name>.+)\.shard-(?P<i>\d+)-of-(?P<n>\d+)\.h5$")
# Attributes that describe the extractor; stores (and shards, parts) can be joined only when
# these agree. Creation time and library versions may differ between shards.
IDENTITY_KEYS = ("feature", "kind", "dim", "extractor", "frame_rate_hz", "unit", "dtype", "degradation")


class StoreError(RuntimeError):
    """A feature store that cannot be read or written; names the file and the problem."""


# ---------------------------------------------------------------------------- attrs encoding
def _encode_attrs(target: h5py.AttributeManager, attrs: dict[str, Any]) -> None:
    json_keys = []
    for key, value in attrs.items():
        if value is None:
            continue
        if isinstance(value, (dict, list, tuple)):
            target[key] = json.dumps(value, ensure_ascii=False)
            json_keys.append(key)
        elif isinstance(value, np.ndarray):
            target[key] = value
        elif isinstance(value, (bool, np.bool_)):
            target[key] = bool(value)
        else:
            target[key] = value
    if json_keys:
        target[_JSON_KEYS_ATTR] = json.dumps(json_keys)


def _decode_attrs(source: h5py.AttributeManager) -> dict[str, Any]:
    json_keys = set(json.loads(source[_JSON_KEYS_ATTR])) if _JSON_KEYS_ATTR in source else set()
    out = {}
    for key, value in source.items():
        if key == _JSON_KEYS_ATTR:
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if key in json_keys:
            value = json.loads(value)
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


# Public names: aligned files and experiment records use the same attribute encoding.
encode_attrs = _encode_attrs
decode_attrs = _decode_attrs


def library_versions() -> dict[str, str]:
    from importlib import metadata

    import sertool

    versions = {"sertool": sertool.__version__, "python": platform.python_version()}
    for pkg in ("numpy", "h5py", "torch", "librosa", "transformers", "scipy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return versions


def _check_format(path: Path, attrs: dict) -> None:
    fmt = attrs.get("format")
    if fmt != FORMAT:
        raise StoreError(f"{path}: not a sertool feature store (attribute 'format' is {fmt!r}, expected {FORMAT!r})")
    version = attrs.get("format_version")
    if version not in SUPPORTED_VERSIONS:
        made_by = (
            attrs.get("versions", {}).get("sertool", "unknown")
            if isinstance(attrs.get("versions"), dict)
            else "unknown"
        )
        newer = isinstance(version, int) and version > max(SUPPORTED_VERSIONS)
        raise StoreError(
            f"{path}: store format version {version!r} (written by sertool {made_by}) is not supported by this "
            f"sertool (reads versions {list(SUPPORTED_VERSIONS)}); "
            + ("upgrade sertool to read it." if newer else "re-run `sertool extract` to rebuild it.")
        )


def _identity(attrs: dict) -> dict:
    return {k: attrs.get(k) for k in IDENTITY_KEYS}


def _check_same_identity(path: Path, attrs: dict, reference: dict, reference_path: Path | str) -> None:
    a, b = _identity(attrs), _identity(reference)
    if a != b:
        diff = [k for k in IDENTITY_KEYS if a[k] != b[k]]
        raise StoreError(
            f"{path}: made with a different extractor than {reference_path} "
            f"(differs in {', '.join(diff)}); use a new output name or --overwrite"
        )


# ---------------------------------------------------------------------------- reading
def _open_h5(path: Path) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise StoreError(f"{path}: feature store does not exist") from None
    except OSError as e:
        raise StoreError(f"{path}: not a readable HDF5 file, it may be truncated or corrupt ({e})") from None


class FeatureStore:
    """Read-only view of a store file or of a complete set of its shards."""

    def __init__(self, paths: list[Path]):
        self.paths = [Path(p) for p in paths]
        self._files: list[h5py.File] = []
        self._where: dict[str, int] = {}
        try:
            for i, path in enumerate(self.paths):
                f = _open_h5(path)
                self._files.append(f)
                attrs = _decode_attrs(f.attrs)
                _check_format(path, attrs)
                if i == 0:
                    self.attrs = attrs
                else:
                    _check_same_identity(path, attrs, self.attrs, self.paths[0])
                if "utts" not in f:
                    raise StoreError(f"{path}: has no /utts group; the store is incomplete")
                for uid in f["utts"].keys():
                    if uid in self._where:
                        raise StoreError(f"utterance {uid!r} is in both {self.paths[self._where[uid]]} and {path}")
                    self._where[uid] = i
        except Exception:
            self.close()
            raise
        self.name = self.attrs.get("feature")

    # mapping-like access --------------------------------------------------
    @property
    def ids(self) -> list[str]:
        return list(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, uid: object) -> bool:
        return uid in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def _dataset(self, uid: str) -> h5py.Dataset:
        try:
            return self._files[self._where[uid]]["utts"][uid]
        except KeyError:
            raise KeyError(f"utterance {uid!r} is not in feature store {self.paths[0]}") from None

    def __getitem__(self, uid: str) -> np.ndarray:
        return np.asarray(self._dataset(uid)[()], dtype=np.float32)

    def read_with_attr(self, uid: str, attr: str | None = None) -> tuple[np.ndarray, Any]:
        """Fast path for bulk readers (align): the [T, D] data as float32 and one raw attribute.

        Uses h5py's low-level calls, skipping the per-access group lookup and the decoding of
        every attribute that `__getitem__`/`utt_attrs` do; numeric attributes (word_index) come
        back as arrays, others undecoded (None when absent).
        """
        index = self._where.get(uid)
        if index is None:
            raise KeyError(f"utterance {uid!r} is not in feature store {self.paths[0]}")
        if not hasattr(self, "_group_ids"):
            self._group_ids = [f["utts"].id for f in self._files]
        dsid = h5py.h5d.open(self._group_ids[index], uid.encode())
        data = np.empty(dsid.shape, dsid.dtype)
        if data.size:
            dsid.read(h5py.h5s.ALL, h5py.h5s.ALL, data)
        value = None
        if attr is not None and h5py.h5a.exists(dsid, attr.encode()):
            handle = h5py.h5a.open(dsid, attr.encode())
            if handle.dtype.kind in "iuf":
                value = np.empty(handle.shape, handle.dtype)
                handle.read(value)
            else:
                value = self._files[index]["utts"][uid].attrs[attr]
        return data.astype(np.float32, copy=False), value

    def utt_attrs(self, uid: str) -> dict:
        return _decode_attrs(self._dataset(uid).attrs)

    def shape(self, uid: str) -> tuple[int, ...]:
        return tuple(self._dataset(uid).shape)

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def extractor(self) -> dict:
        return self.attrs.get("extractor", {})

    def close(self) -> None:
        for f in self._files:
            try:
                f.close()
            except Exception:
                pass
        self._files = []

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        files = [str(p) for p in self.paths]
        return f"FeatureStore({self.name!r}, {len(self)} utterances, dim {self.attrs.get('dim')}, files {files})"


def store_path(feats_dir: str | os.PathLike, name: str) -> Path:
    return Path(feats_dir) / f"{name}.h5"


def find_shards(path: Path) -> list[Path]:
    """Shard files for store path NAME.h5, sorted by index; raise when the set is incomplete."""
    stem = path.name[:-3] if path.name.endswith(".h5") else path.name
    found: dict[int, dict[int, Path]] = {}
    for candidate in glob.glob(str(path.parent / f"{glob.escape(stem)}.shard-*-of-*.h5")):
        m = _SHARD_RE.match(os.path.basename(candidate))
        if m and m["name"] == stem:
            found.setdefault(int(m["n"]), {})[int(m["i"])] = Path(candidate)
    if not found:
        return []
    if len(found) > 1:
        raise StoreError(f"{path.parent}: shards of {stem!r} from runs with different shard counts {sorted(found)}")
    ((n, shards),) = found.items()
    missing = [i for i in range(n) if i not in shards]
    if missing:
        raise StoreError(
            f"{path.parent}: store {stem!r} is split into {n} shards but shard(s) {missing} are missing "
            f"(run `sertool extract --shard i/{n}` for them)"
        )
    return [shards[i] for i in range(n)]


def open_store(path: str | os.PathLike, name: str | None = None) -> FeatureStore:
    """Open `FEATS/NAME.h5` (or `open_store(FEATS, NAME)`), or its complete set of shards."""
    path = Path(path)
    if name is not None:
        path = store_path(path, name)
    elif path.is_dir():
        raise StoreError(f"{path}: is a directory; give the store file (e.g. {path}/mfcc.h5) or a feature name")
    elif path.suffix != ".h5":
        path = path.with_name(path.name + ".h5")
    if path.exists():
        return FeatureStore([path])
    shards = find_shards(path)
    if shards:
        return FeatureStore(shards)
    parts = path.with_name(path.name + ".parts")
    hint = " (an unfinished run left parts: re-run `sertool extract` to finish it)" if parts.exists() else ""
    raise StoreError(f"{path}: feature store does not exist{hint}")


def list_stores(feats_dir: str | os.PathLike) -> list[str]:
    """Names of the stores (complete files or shard sets) in a features folder."""
    names = set()
    for p in Path(feats_dir).glob("*.h5"):
        m = _SHARD_RE.match(p.name)
        names.add(m["name"] if m else p.name[:-3])
    return sorted(names)


# ---------------------------------------------------------------------------- writing
def _write_h5(path: Path, file_attrs: dict, items: list[tuple[str, np.ndarray, dict]], dtype: str) -> None:
    """Write a complete HDF5 file at `path` via a temporary name and rename."""
    with atomic_path(path, fsync=True) as tmp, h5py.File(tmp, "w") as f:
        _encode_attrs(f.attrs, file_attrs)
        group = f.create_group("utts")
        for uid, data, attrs in items:
            ds = group.create_dataset(uid, data=np.asarray(data, dtype=dtype))
            _encode_attrs(ds.attrs, attrs)


def _merge_files(target: Path, sources: list[Path], file_attrs: dict) -> None:
    """Join ``sources`` into ``target``; an id in several sources is taken from the last one (an
    utterance recomputed because its audio changed is in a part written after the old store)."""
    last: dict[str, int] = {}
    for i, source in enumerate(sources):
        with _open_h5(source) as f:
            last.update((uid, i) for uid in f["utts"].keys())
    with atomic_path(target, fsync=True) as tmp, h5py.File(tmp, "w") as out:
        _encode_attrs(out.attrs, file_attrs)
        group = out.create_group("utts")
        for i, source in enumerate(sources):
            with _open_h5(source) as f:
                for uid in f["utts"].keys():
                    if last[uid] == i:
                        f.copy(f["utts"][uid], group, name=uid)


class StoreWriter:
    """Append utterances to a store crash-safely; see the module docstring.

    ``with StoreWriter(path, attrs) as w: for ...: if uid not in w.done: w.add(uid, x, {})``
    """

    def __init__(
        self,
        path: str | os.PathLike,
        file_attrs: dict,
        *,
        dtype: str = "float32",
        flush_every: int = 64,
        flush_seconds: float = 20.0,
        overwrite: bool = False,
    ):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = dtype
        self.flush_every = flush_every
        self.flush_seconds = flush_seconds
        self.file_attrs = {
            **file_attrs,
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "dtype": dtype,
            "versions": library_versions(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        if overwrite:
            for stale in [self.path, *self.path.parent.glob(self.path.name[:-3] + ".shard-*-of-*.h5")]:
                stale.unlink(missing_ok=True)
            shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.done: set[str] = set()
        self._existing_complete = False
        self._scan_existing()
        self._buffer: list[tuple[str, np.ndarray, dict]] = []
        self._last_flush = time.monotonic()
        self._n_added = 0

    def _scan_existing(self) -> None:
        if self.path.exists():
            with FeatureStore([self.path]) as old:
                _check_same_identity(self.path, old.attrs, self.file_attrs, "this run's extractor")
                self.done.update(old.ids)
            self._existing_complete = True
        if self.parts_dir.exists():
            for part in sorted(self.parts_dir.glob("part-*.h5")):
                try:
                    with FeatureStore([part]) as p:
                        _check_same_identity(part, p.attrs, self.file_attrs, "this run's extractor")
                        self.done.update(p.ids)
                except StoreError as e:
                    if "different extractor" in str(e):
                        raise
                    part.unlink()  # an unreadable part cannot happen with rename-on-complete; drop it
            for leftover in self.parts_dir.glob("*.tmp*"):
                leftover.unlink()  # a part that was being written when the run was killed

    def __contains__(self, uid: str) -> bool:
        return uid in self.done

    def recorded(self, keys: tuple[str, ...]) -> dict[str, dict[str, Any]]:
        """The per-utterance attributes ``keys`` (e.g. ``source_checksum``) of the utterances already
        written (store and parts; the latest write of an id wins), for ids that have any of them."""
        out: dict[str, dict[str, Any]] = {}
        sources = ([self.path] if self._existing_complete else []) + (
            sorted(self.parts_dir.glob("part-*.h5")) if self.parts_dir.exists() else []
        )
        for source in sources:
            with _open_h5(source) as f:
                for uid, ds in f["utts"].items():
                    if any(k in ds.attrs for k in keys):
                        attrs = _decode_attrs(ds.attrs)
                        out[uid] = {k: attrs[k] for k in keys if k in attrs}
                    else:
                        out.pop(uid, None)
        for uid, _, attrs in self._buffer:
            found = {k: attrs[k] for k in keys if k in attrs}
            if found:
                out[uid] = found
            else:
                out.pop(uid, None)
        return out

    def add(self, uid: str, data: np.ndarray, attrs: dict | None = None) -> None:
        data = np.asarray(data)
        if data.ndim != 2:
            raise StoreError(f"{self.path}: features for {uid!r} must be [T, D], got shape {data.shape}")
        dim = self.file_attrs.get("dim")
        if dim is not None and data.shape[1] != dim:
            raise StoreError(f"{self.path}: features for {uid!r} have {data.shape[1]} columns, store dim is {dim}")
        if not np.isfinite(data).all():
            raise StoreError(f"{self.path}: features for {uid!r} contain NaN or infinite values")
        self._buffer.append((uid, data, attrs or {}))
        self.done.add(uid)
        self._n_added += 1
        if len(self._buffer) >= self.flush_every or time.monotonic() - self._last_flush > self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if not self._buffer:
            return
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        existing = [int(p.stem.split("-")[1]) for p in self.parts_dir.glob("part-*.h5")]
        index = max(existing, default=0) + 1
        _write_h5(self.parts_dir / f"part-{index:06d}.h5", self.file_attrs, self._buffer, self.dtype)
        self._buffer = []
        self._last_flush = time.monotonic()

    def finalize(self) -> Path:
        """Flush and merge everything into the final file; returns its path."""
        self.flush()
        parts = sorted(self.parts_dir.glob("part-*.h5")) if self.parts_dir.exists() else []
        if parts or not self._existing_complete:
            sources = ([self.path] if self._existing_complete else []) + parts
            _merge_files(self.path, sources, self.file_attrs)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return self.path

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finalize()
        else:  # keep the work done so far; a re-run resumes from it
            try:
                self.flush()
            except Exception:
                pass


def merge_shards(path: str | os.PathLike, *, remove: bool = True) -> Path:
    """Join `NAME.shard-i-of-N.h5` into `NAME.h5` (bit-identical data), then remove the shards."""
    path = Path(path)
    if path.suffix != ".h5":
        path = path.with_name(path.name + ".h5")
    shards = find_shards(path)
    if not shards:
        raise StoreError(f"{path}: no shards to merge")
    with FeatureStore(shards) as store:  # validates identity and duplicate ids
        attrs = dict(store.attrs)
    _merge_files(path, shards, attrs)
    if remove:
        for s in shards:
            s.unlink()
    return path


def shard_path(path: Path, index: int, count: int) -> Path:
    stem = path.name[:-3] if path.name.endswith(".h5") else path.name
    return path.with_name(f"{stem}.shard-{index}-of-{count}.h5")
