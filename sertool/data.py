"""Datasets over feature stores and aligned files: padding + masks, normalisation, batching.

    sources = open_sources(FEATS, {"audio": "mfcc", "text": "bert"})   # name, path or aligned file
    norm = Normalizer.fit(sources, train_ids, {"audio": "global"})     # training split only
    ds = SERDataset(sources, ids, targets, norm)
    for batch in ds.batches(batch_size=32, max_frames=None, shuffle=True, seed=0, epoch=3): ...

A batch is the dict the models take: ``audio``/``text``/``visual`` ``[B, T, D]`` float32 with
``<modality>_mask`` ``[B, T]`` bool (True = real frame), plus ``target`` ``[B]`` (long class
index or float score) and ``ids``.  Padding is zero after normalisation.

Features are read once into one contiguous array per modality (``preload``; the default when
they fit in ``preload_gb`` of memory), so building a batch is a few slices and one copy; larger
stores are read from HDF5 per batch (lazily: only the lengths are read up front).
``preload`` may also be a number: a memory budget in GB over all inputs, filled in order; an
input that does not fit is read lazily.  A lazily read store is reopened in every process that
uses it (DataLoader workers, forked or spawned), so no HDF5 handle is shared across processes.
Aligned files (``sertool align``: datasets ``ids``, ``audio``/``text``/``visual`` ``[N, n, D]``
and ``mask`` or ``<modality>_mask`` ``[N, n]``) give one source per modality, with only the real
steps kept.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Iterator

import h5py
import numpy as np
import torch

from sertool.batching import budget_batches
from sertool.store import FeatureStore, StoreError, decode_attrs, open_store
from sertool.utils import save_tensors
from sertool.weights import load_tensors

MODALITIES = ("audio", "text", "visual")


class DataError(ValueError):
    """Inputs that cannot be trained on: missing store, ids that do not match, empty split."""


# ----------------------------------------------------------------------------------- sources
class Source:
    """One modality's features: ``get(uid) -> [T, D] float32``, ``length(uid)``, ``dim``, ``ids``."""

    name: str
    dim: int
    attrs: dict

    def get(self, uid: str) -> np.ndarray:
        raise NotImplementedError

    def length(self, uid: str) -> int:
        raise NotImplementedError

    @property
    def ids(self) -> list[str]:
        raise NotImplementedError

    def __contains__(self, uid) -> bool:
        return uid in self._index

    def provenance(self) -> dict:
        keep = (
            "feature",
            "kind",
            "dim",
            "frame_rate_hz",
            "unit",
            "extractor",
            "dtype",
            "versions",
            "created",
            "source",
            "layers",
            "layer_dim",
        )
        return {"path": str(self.path), **{k: self.attrs[k] for k in keep if k in self.attrs}}

    @property
    def stacked_layers(self) -> tuple[list[int], int] | None:
        """``(layer ids, layer_dim)`` when every frame stacks several encoder layers side by side
        (an extractor's ``layer=all`` or a layer list with ``combine=stack``: attrs ``layers`` and
        ``layer_dim``, dim = len(layers) x layer_dim); None for a plain store."""
        layers, layer_dim = self.attrs.get("layers"), self.attrs.get("layer_dim")
        if not isinstance(layers, (list, tuple)) or len(layers) < 2 or not layer_dim:
            return None
        if self.attrs.get("combine", "stack") != "stack" or int(layer_dim) * len(layers) != int(self.dim):
            return None
        return [int(i) for i in layers], int(layer_dim)


class StoreSource(Source):
    """A feature store, preloaded into one array (``preload=True``) or read per utterance."""

    def __init__(
        self, store: FeatureStore, preload: bool | str = "auto", preload_gb: float = 4.0, only: set[str] | None = None
    ):
        self.store = store
        self._pid = os.getpid()
        self.path = store.paths[0] if len(store.paths) == 1 else store.paths[0].parent
        self.name = store.name
        self.attrs = dict(store.attrs)
        self.dim = store.dim
        self._paths = list(store.paths)
        wanted = [u for u in store.ids if only is None or u in only]
        self._index = {u: i for i, u in enumerate(wanted)}
        self._lengths = np.array([store.shape(u)[0] for u in wanted], dtype=np.int64)
        total = self.nbytes
        if preload == "auto":
            preload = total <= preload_gb * 2**30
        self.preloaded = bool(preload)
        if self.preloaded:
            self._offsets = np.concatenate([[0], np.cumsum(self._lengths)])
            self._data = np.empty((int(self._offsets[-1]), self.dim), dtype=np.float32)
            for i, u in enumerate(wanted):
                self._data[self._offsets[i] : self._offsets[i + 1]] = store[u]

    @property
    def ids(self) -> list[str]:
        return list(self._index)

    def length(self, uid: str) -> int:
        return int(self._lengths[self._index[uid]])

    @property
    def nbytes(self) -> int:
        """Memory the features take when preloaded (float32)."""
        return int(self._lengths.sum()) * self.dim * 4

    def _handle(self) -> FeatureStore:
        """This process's HDF5 handle: a process that did not open the store (a forked or
        spawned DataLoader worker) opens its own."""
        if self.store is None or self._pid != os.getpid():
            self.store = FeatureStore(self._paths)
            self._pid = os.getpid()
        return self.store

    def get(self, uid: str) -> np.ndarray:
        if self.preloaded:
            i = self._index[uid]
            return self._data[self._offsets[i] : self._offsets[i + 1]]
        return self._handle()[uid]

    def __getstate__(self):  # h5py handles do not pickle: a spawned worker reopens the store
        state = dict(self.__dict__)
        state["store"] = None
        state["_paths"] = list(self._paths)
        return state


def standardize_wave(x: np.ndarray) -> np.ndarray:
    """``data.audio: wave``'s per-utterance z-score (zero mean, unit variance) as float32; the
    train stage (:class:`WaveSource`) and ``sertool predict`` (each segment) both use it."""
    x = np.asarray(x, np.float32)
    return (x - x.mean()) / (x.std() + 1e-7) if len(x) else x


def load_tokenizer(target: str):
    """``data.text: tokenizer:TARGET``: (transformers tokenizer, its limit in tokens (at most 512),
    the resolved model folder), for :class:`TokenSource` and ``sertool predict``."""
    from transformers import AutoTokenizer

    from sertool.features.hub import resolve_model

    resolved = resolve_model(target, option="data.text tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(str(resolved.path), local_files_only=True)
    limit = min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
    return tokenizer, limit, resolved


def token_ids(tokenizer, text: str | None, limit: int) -> tuple[np.ndarray, bool]:
    """(int64 token ids of ``text``, special tokens included; truncated?): a text longer than
    ``limit`` tokens is cut to its first ones by the tokenizer's own truncation ([SEP] kept)."""
    ids = tokenizer(text or "", verbose=False)["input_ids"]
    cut = len(ids) > limit
    if cut:
        ids = tokenizer(text or "", truncation=True, max_length=limit)["input_ids"]
    return np.asarray(ids, np.int64), cut


class WaveSource(Source):
    """``data.audio: wave``: the manifest's recordings as 16 kHz mono samples, each utterance
    z-normalised (zero mean, unit variance, as wav2vec 2.0's feature extractor does), for models
    whose own input encoder reads the waveform.  ``get`` returns ``[N]`` float32 (``dim`` 0: one
    value per step); recordings are read once and kept when ``preload`` allows."""

    dtype = np.float32
    raw = True

    def __init__(
        self, utts: list, only: set[str] | None = None, sample_rate: int = 16000, preload: bool | str = "auto"
    ):
        self.utts = {u.id: u for u in utts if only is None or u.id in only}
        no_audio = [uid for uid, u in self.utts.items() if not u.audio]
        if no_audio:
            raise DataError(
                f"data.audio = wave: {len(no_audio)} utterances have no audio in the manifest (e.g. {no_audio[0]})"
            )
        self._index = {uid: i for i, uid in enumerate(self.utts)}
        self.sample_rate = int(sample_rate)
        self.keep = preload is not False
        self._cache: dict[str, np.ndarray] = {}
        self._lengths: dict[str, int] = {}
        self.name, self.dim, self.preloaded = "wave", 0, False
        self.path = Path("manifest.jsonl")
        self.attrs = {
            "feature": "wave",
            "kind": "audio",
            "dim": 0,
            "frame_rate_hz": float(sample_rate),
            "unit": "sample",
            "source": "manifest",
            "normalize": "per-utterance z-score",
        }

    @property
    def ids(self) -> list[str]:
        return list(self._index)

    def _read(self, uid: str) -> np.ndarray:
        from sertool.audio import AudioError, load_audio

        u = self.utts[uid]
        try:
            x, sr = load_audio(u.audio, self.sample_rate, start=u.start, end=u.end)
        except AudioError as e:
            raise DataError(f"utterance {uid!r}: {e}") from None
        return standardize_wave(self._channel(x, sr, uid) if len(x) else x)

    def _channel(self, x: np.ndarray, sample_rate: int, uid: str) -> np.ndarray:
        """What the recording goes through before the z-score (DegradedWaveSource: a degradation)."""
        return x

    def get(self, uid: str) -> np.ndarray:
        x = self._cache.get(uid)
        if x is None:
            x = self._read(uid)
            self._lengths[uid] = len(x)
            if self.keep:
                self._cache[uid] = x
        return x

    def length(self, uid: str) -> int:
        if uid not in self._lengths:
            self.get(uid)
        return self._lengths[uid]


class DegradedWaveSource(WaveSource):
    """``data.augment: [degrade:SPEC]`` on ``data.audio: wave``: the recordings through
    :func:`sertool.augment.degrade` (before the per-utterance z-score), copy ``copy`` seeded by
    ``augmented_id(uid, copy)``, so every epoch and a resumed run read the same copy."""

    def __init__(self, utts: list, spec: str, copy: int, only=None, sample_rate: int = 16000, preload="auto"):
        from sertool.augment import parse_degradation

        super().__init__(utts, only, sample_rate, preload)
        self.spec, self.copy = "+".join(str(s) for s in parse_degradation(spec)), int(copy)
        self.attrs = {**self.attrs, "degradation": self.spec}

    def _channel(self, x: np.ndarray, sample_rate: int, uid: str) -> np.ndarray:
        from sertool.augment import degrade

        return degrade(x, sample_rate, self.spec, augmented_id(uid, self.copy))


class TokenSource(Source):
    """``data.text: tokens:STORE`` (the token strings a text store records per utterance, as ids
    over ``data.vocab``: index = id, 0 padding, 1 unknown) or ``tokenizer:MODEL`` (a transformers
    tokenizer on the manifest's text): ``get`` returns ``[L]`` int64 token ids (``dim`` 0).
    A text longer than the tokenizer's limit (at most 512 tokens) is cut to its first tokens, special
    tokens kept; ``truncated`` lists those utterances and ``warnings`` says how many."""

    dtype = np.int64
    raw = True

    def __init__(
        self,
        spec: str,
        utts: list,
        feats: str | Path | None,
        only: set[str] | None = None,
        vocab: list[str] | None = None,
    ):
        kind, _, target = spec.partition(":")
        self.name, self.dim, self.preloaded = spec, 0, True
        self.utts = {u.id: u for u in utts if only is None or u.id in only}
        self._ids: dict[str, np.ndarray] = {}
        self.truncated: list[str] = []  # tokenizer: utterances longer than the limit, cut to their first tokens
        self.limit: int | None = None
        if kind == "tokens":
            if not vocab:
                raise DataError(f"data.text = {spec}: token ids need a vocabulary (data.vocab)")
            path = Path(target)
            if not path.exists() and feats is not None:
                path = Path(feats) / (target if target.endswith(".h5") else f"{target}.h5")
            try:
                store = open_store(path)
            except StoreError as e:
                raise DataError(f"data.text = {spec}: {e}") from None
            index = {tok: i for i, tok in enumerate(vocab)}
            try:
                for uid in self.utts:
                    if uid not in store:
                        continue
                    toks = store.utt_attrs(uid).get("tokens")
                    if toks is None:
                        raise DataError(
                            f"data.text = {spec}: {path} records no tokens for {uid!r} "
                            "(extract a token-level store, e.g. -f bert)"
                        )
                    toks = [t.decode() if isinstance(t, bytes) else str(t) for t in toks]
                    self._ids[uid] = np.asarray([index.get(t, 1) for t in toks], np.int64)
            finally:
                store.close()
            self.path = path
            self.attrs = {
                "feature": f"tokens:{store.attrs.get('feature') or path.stem}",
                "kind": "text",
                "dim": 0,
                "unit": "token",
                "source": str(path),
                "vocab_size": len(vocab),
                # what made the store's tokens: `sertool predict` rebuilds it on new transcripts
                **({"extractor": store.attrs["extractor"]} if "extractor" in store.attrs else {}),
            }
        elif kind == "tokenizer":
            tokenizer, limit, resolved = load_tokenizer(target)
            for uid, u in self.utts.items():
                self._ids[uid], cut = token_ids(tokenizer, u.text, limit)
                if cut:
                    self.truncated.append(uid)
            self.limit = limit
            self.path = Path(str(resolved.path))
            self.attrs = {
                "feature": spec,
                "kind": "text",
                "dim": 0,
                "unit": "token",
                "source": "manifest",
                "tokenizer": resolved.record,
            }
        else:
            raise DataError(f"data.text = {spec!r}: expected a store, tokens:STORE or tokenizer:MODEL")
        self._index = {uid: i for i, uid in enumerate(self._ids)}

    @property
    def ids(self) -> list[str]:
        return list(self._index)

    @property
    def warnings(self) -> list[str]:
        """Lines the train stage prints once: how many texts the tokenizer's limit truncated."""
        if not self.truncated:
            return []
        return [
            f"warning: {len(self.truncated)} text(s) longer than {self.limit} tokens truncated to their first "
            f"{self.limit} (e.g. {self.truncated[0]})"
        ]

    def get(self, uid: str) -> np.ndarray:
        return self._ids[uid]

    def length(self, uid: str) -> int:
        return len(self._ids[uid])


class AlignedSource(Source):
    """One modality of an aligned file (fixed length n, mask of real steps)."""

    def __init__(self, path: Path, modality: str, only: set[str] | None = None):
        self.path = Path(path)
        with h5py.File(self.path, "r") as f:
            if modality not in f:
                raise DataError(f"{path}: aligned file has no {modality!r} dataset (has {sorted(f.keys())})")
            if "ids" not in f:
                raise DataError(f"{path}: aligned file has no 'ids' dataset")
            ids = [i.decode() if isinstance(i, bytes) else str(i) for i in f["ids"][()]]
            x = np.asarray(f[modality][()], dtype=np.float32)
            mask_key = f"{modality}_mask" if f"{modality}_mask" in f else "mask" if "mask" in f else None
            mask = np.asarray(f[mask_key][()], dtype=bool) if mask_key else np.ones(x.shape[:2], dtype=bool)
            self.attrs = decode_attrs(f.attrs)  # JSON-valued attrs (provenance) come back as dicts
            self.attrs.setdefault("feature", f"{self.path.stem}:{modality}")
            self.attrs["kind"] = modality
        if x.ndim != 3 or mask.shape != x.shape[:2] or len(ids) != x.shape[0]:
            raise DataError(f"{path}: {modality} {x.shape}, mask {mask.shape} and {len(ids)} ids do not match")
        self.name = self.attrs["feature"]
        self.dim = int(x.shape[2])
        keep = [i for i, u in enumerate(ids) if only is None or u in only]
        self._index = {ids[i]: j for j, i in enumerate(keep)}
        if len(keep) == len(ids):  # no copy of a large file
            self._x, self._mask = x, mask
        else:
            self._x, self._mask = x[keep], mask[keep]
        self._lengths = self._mask.sum(1).astype(np.int64)
        self.preloaded = True

    @property
    def ids(self) -> list[str]:
        return list(self._index)

    def length(self, uid: str) -> int:
        return int(self._lengths[self._index[uid]])

    def get(self, uid: str) -> np.ndarray:
        i = self._index[uid]
        return self._x[i][self._mask[i]]


class SpeakerNormalizedSource(Source):
    """``data.normalize.<modality>: speaker``: every frame of an utterance z-normalised with the
    mean and standard deviation of all frames of its speaker (speaker-level feature
    normalisation, e.g. Busso et al., "Iterative feature normalization scheme for automatic
    emotion detection from speech", IEEE T-AC 2013).  The statistics of a speaker use only that
    speaker's features, never labels, so a held-out speaker's come from its own (unlabelled)
    recordings: the setting where the speaker of each test recording is known."""

    def __init__(self, src: Source, speaker_of: dict[str, str], stats: dict[str, tuple[np.ndarray, np.ndarray]]):
        self.src, self.speaker_of, self.stats = src, speaker_of, stats
        self.name, self.dim, self.attrs, self.path = src.name, src.dim, src.attrs, src.path
        self._index = src._index
        self.preloaded = getattr(src, "preloaded", False)

    @property
    def ids(self) -> list[str]:
        return self.src.ids

    def length(self, uid: str) -> int:
        return self.src.length(uid)

    def get(self, uid: str) -> np.ndarray:
        mean, std = self.stats[self.speaker_of[uid]]
        return (self.src.get(uid) - mean) / std


AUGMENT_SEP = "@aug"


def source_id(uid: str) -> str:
    """The utterance an id names: ``augmented_id(u, k)`` -> ``u``; any other id -> itself."""
    base, sep, k = uid.rpartition(AUGMENT_SEP)
    return base if sep and k.isdigit() else uid


def augmented_id(uid: str, copy: int) -> str:
    """The id of copy ``copy`` (0-based, the order of ``data.augment``) of utterance ``uid``."""
    return f"{uid}{AUGMENT_SEP}{copy + 1}"


class AugmentedSource(Source):
    """``data.augment``: the source's utterances plus their degraded copies (``sertool extract
    --degrade``), each copy read from its own store of the same name in another FEATS folder and
    addressed as ``augmented_id(uid, k)``. Only the training split asks for the copies."""

    def __init__(self, src: Source, copies: list[Source]):
        for k, c in enumerate(copies):
            if c.dim != src.dim:
                raise DataError(f"data.augment[{k}] {c.path}: {c.dim}-d features, but {src.path} has {src.dim}-d")
            same = ("feature", "extractor", "frame_rate_hz", "layers", "unit")
            differs = [key for key in same if c.attrs.get(key) != src.attrs.get(key)]
            if differs:
                raise DataError(
                    f"data.augment[{k}] {c.path}: made with another extractor than {src.path} (differs in "
                    f"{', '.join(differs)}); extract the copies with the same -f spec and --degrade"
                )
        self.src, self.copies = src, copies
        self.name, self.dim, self.attrs, self.path = src.name, src.dim, src.attrs, src.path
        self.preloaded = getattr(src, "preloaded", False)
        self._index = set(src.ids) | {augmented_id(u, k) for k, c in enumerate(copies) for u in c.ids}

    @property
    def ids(self) -> list[str]:
        return self.src.ids + [augmented_id(u, k) for k, c in enumerate(self.copies) for u in c.ids]

    def _where(self, uid: str) -> tuple[Source, str]:
        base, sep, k = uid.rpartition(AUGMENT_SEP)
        if sep and k.isdigit() and 1 <= int(k) <= len(self.copies):
            return self.copies[int(k) - 1], base
        return self.src, uid

    def length(self, uid: str) -> int:
        src, uid = self._where(uid)
        return src.length(uid)

    def get(self, uid: str) -> np.ndarray:
        src, uid = self._where(uid)
        return src.get(uid)


def frame_moments(src: Source, ids: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (float32) over all frames of utterances ``ids`` of ``src``;
    constant dimensions get std 1 (left unscaled)."""
    s = np.zeros(src.dim, dtype=np.float64)
    ss = np.zeros(src.dim, dtype=np.float64)
    n = 0
    for u in ids:
        x = src.get(u).astype(np.float64)
        s += x.sum(0)
        ss += (x * x).sum(0)
        n += x.shape[0]
    mean = s / max(n, 1)
    std = np.sqrt(np.maximum(ss / max(n, 1) - mean * mean, 0.0))
    std[std < 1e-8] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)


def speaker_statistics(src: Source, speaker_of: dict[str, str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per speaker: :func:`frame_moments` over the speaker's utterances in ``src``."""
    by_speaker: dict[str, list[str]] = {}
    for uid in src.ids:
        if uid in speaker_of:
            by_speaker.setdefault(speaker_of[uid], []).append(uid)
    return {spk: frame_moments(src, ids) for spk, ids in by_speaker.items()}


def _is_aligned(path: Path) -> bool:
    try:
        with h5py.File(path, "r") as f:
            return "utts" not in f and "ids" in f
    except OSError:
        return False


def _holds(kind: str, attrs: dict) -> str:
    if kind == "text":
        unit = attrs.get("unit")
        return f"text ({unit}) features" if unit else "text features"
    return f"{kind} frames" if kind == "audio" else f"{kind} features"


def _check_kind(store: FeatureStore, modality: str, name: str) -> None:
    """A store records the modality it holds (attr ``kind``: audio, text or visual); one given as
    another modality's input (a GloVe store as --audio) is refused before anything is trained.
    Stores without a kind, or of another kind, are taken as they are; aligned files carry every
    modality and never come here."""
    kind = store.attrs.get("kind")
    if kind == modality or kind not in MODALITIES:
        return
    store.close()
    stored = store.name or Path(str(name)).stem
    raise DataError(
        f"--{modality} {name}: store {stored!r} holds {_holds(kind, store.attrs)}, not "
        f"{_holds(modality, {'unit': 'word'})}; pass it as --{kind}"
    )


def open_sources(
    feats: str | Path | None,
    spec: dict[str, str],
    *,
    preload: bool | str = "auto",
    preload_gb: float = 4.0,
    only: set[str] | None = None,
    utts: list | None = None,
    vocab: list[str] | None = None,
) -> dict[str, Source]:
    """Open the source of every modality in ``spec`` (store name in FEATS, a .h5 path, or an
    aligned file; or the raw inputs of models with their own input encoders: ``wave``,
    ``tokens:STORE``, ``tokenizer:MODEL``, which read the manifest's ``utts``); raises DataError
    naming the missing store and what FEATS holds.

    ``preload``: ``auto`` (a store is held in memory when it fits in ``preload_gb``), ``True``,
    ``False`` (read lazily from HDF5), or a number: a memory budget in GB over all the stores,
    filled in ``spec`` order (aligned files are always held in memory and count against it)."""
    from sertool.store import list_stores

    budget = None
    if isinstance(preload, (int, float)) and not isinstance(preload, bool):
        if preload < 0:
            raise DataError(f"data.preload = {preload!r}: a memory budget in GB must be >= 0")
        budget = float(preload) * 2**30
    elif preload not in (True, False, "auto"):
        raise DataError(f"data.preload = {preload!r}: expected auto, true, false or a memory budget in GB")
    sources: dict[str, Source] = {}
    for modality, name in spec.items():
        if modality not in MODALITIES:
            raise DataError(f"data.{modality}: unknown modality (known: {', '.join(MODALITIES)})")
        if not name:
            raise DataError(
                f"no feature store given for the {modality} input (e.g. --{modality} mfcc or "
                f"--set data.{modality}=NAME)"
            )
        if str(name) == "wave" or str(name).startswith(("tokens:", "tokenizer:")):
            if utts is None:
                from sertool.corpora.base import read_manifest

                utts = read_manifest(Path(feats) / "manifest.jsonl")
            if str(name) == "wave":
                if modality != "audio":
                    raise DataError(f"data.{modality} = wave: waveforms are an audio input")
                sources[modality] = WaveSource(utts, only, preload=preload if preload is not None else "auto")
            else:
                if modality != "text":
                    raise DataError(f"data.{modality} = {name}: token ids are a text input")
                sources[modality] = TokenSource(str(name), utts, feats, only, vocab)
            continue
        path = Path(name)
        if path.suffix != ".h5" and feats is not None:
            path = Path(feats) / f"{name}.h5"
        elif not path.is_absolute() and feats is not None and not path.exists():
            path = Path(feats) / name
        if path.exists() and _is_aligned(path):
            sources[modality] = AlignedSource(path, modality, only)
            if budget is not None:
                budget -= sources[modality]._x.nbytes
            continue
        try:
            store = open_store(path)
        except StoreError as e:
            have = list_stores(feats) if feats is not None and Path(feats).is_dir() else []
            raise DataError(
                f"data.{modality} = {name!r}: {e}"
                + (f"; {feats} has: {', '.join(have) or 'no stores'}" if feats is not None else "")
            ) from None
        _check_kind(store, modality, name)
        if budget is None:
            sources[modality] = StoreSource(store, preload=preload, preload_gb=preload_gb, only=only)
        else:
            sources[modality] = src = StoreSource(store, preload="auto", preload_gb=max(budget, 0) / 2**30, only=only)
            if src.preloaded:
                budget -= src.nbytes
    return sources


def check_ids(sources: dict[str, Source], ids: list[str]) -> None:
    """Every utterance must be in every store: mismatched ids are an error before training."""
    for modality, src in sources.items():
        missing = [u for u in ids if u not in src]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(ids)} utterances are missing from the {modality} store "
                f"{src.path} (e.g. {', '.join(missing[:3])}); the stores and the manifest do not "
                "match (extract them from the same corpus, or re-run extract to finish the store)"
            )
        empty = [u for u in ids if src.length(u) == 0]
        if empty:
            raise DataError(f"{len(empty)} utterances have no {modality} frames in {src.path} (e.g. {empty[0]})")


# ----------------------------------------------------------------------------------- normalisation
def speaker_unnormalized(src: Source) -> Source | None:
    """The features under a SpeakerNormalizedSource (through AugmentedSource wrappers); None if none."""
    while src is not None:
        if isinstance(src, SpeakerNormalizedSource):
            return src.src
        src = getattr(src, "src", None)
    return None


class Normalizer:
    """Per-dimension mean / std per modality, fitted on training utterances only."""

    def __init__(self, stats: dict[str, tuple[np.ndarray, np.ndarray]] | None = None):
        self.stats = stats or {}

    @classmethod
    def fit(cls, sources: dict[str, Source], ids: list[str], modes: dict[str, str]) -> "Normalizer":
        stats = {}
        for m, src in sources.items():
            mode = modes.get(m, "none")
            if mode == "speaker" and src.dim:  # the global fallback for speakers with too little audio (predict)
                raw = speaker_unnormalized(src)
                if raw is not None:
                    stats[f"{m}.fallback"] = frame_moments(raw, ids)
            if mode in ("none", "speaker") or src.dim == 0:  # speaker: SpeakerNormalizedSource; raw inputs: as they are
                continue
            if mode != "global":
                raise DataError(f"data.normalize.{m} = {mode!r}: expected global, speaker or none")
            stats[m] = frame_moments(src, ids)
        return cls(stats)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for m, (mean, std) in self.stats.items():
            out[f"{m}.mean"] = torch.from_numpy(np.ascontiguousarray(mean))
            out[f"{m}.std"] = torch.from_numpy(np.ascontiguousarray(std))
        return out

    def save(self, path: str | Path) -> None:
        save_tensors(path, self.tensors() or {"_empty": torch.zeros(0)}, {"format": "sertool-normalizer"})

    @classmethod
    def load(cls, path: str | Path) -> "Normalizer":

        t = load_tensors(path)
        stats = {}
        for key in t:
            if key.endswith(".mean"):
                m = key[: -len(".mean")]
                stats[m] = (t[key].numpy(), t[f"{m}.std"].numpy())
        return cls(stats)


# ----------------------------------------------------------------------------------- dataset
class SERDataset:
    """Utterances ``ids`` with ``targets``, read from ``sources``, normalised by ``norm``.

    ``crop``: modality -> maximum steps (the first L are kept), e.g. KS-Transformer's 460 audio
    frames / 20 tokens or ``evaluate --crop-length``.
    """

    def __init__(
        self,
        sources: dict[str, Source],
        ids: list[str],
        targets: list,
        norm: Normalizer | None = None,
        crop: dict[str, int | None] | None = None,
        regression: bool = False,
    ):
        if not ids:
            raise DataError("empty split: no utterances to load")
        if len(ids) != len(targets):
            raise DataError(f"{len(ids)} ids but {len(targets)} targets")
        self.sources = sources
        self.ids = list(ids)
        self.targets = np.asarray(targets, dtype=np.float32 if regression else np.int64)
        self.regression = regression
        self.crop = {m: int(v) for m, v in (crop or {}).items() if v}
        self.norm = norm or Normalizer()
        self._norm_t = {m: (torch.from_numpy(mu), torch.from_numpy(sd)) for m, (mu, sd) in self.norm.stats.items()}
        self.lengths = {
            m: np.array([min(src.length(u), self.crop.get(m, 1 << 62)) for u in self.ids], dtype=np.int64)
            for m, src in sources.items()
        }
        self.max_length = np.max(np.stack(list(self.lengths.values())), axis=0) if sources else None

    def __len__(self) -> int:
        return len(self.ids)

    def collate(self, idx: np.ndarray | list[int]) -> dict:
        idx = np.asarray(idx)
        batch: dict = {"ids": [self.ids[i] for i in idx]}
        for m, src in self.sources.items():
            lens = self.lengths[m][idx]
            T = int(lens.max())
            # a raw source (dim 0: waveform samples, token ids) gives [B, T] of its own dtype
            x = np.zeros((len(idx), T, src.dim) if src.dim else (len(idx), T), dtype=getattr(src, "dtype", np.float32))
            for b, i in enumerate(idx):
                x[b, : lens[b]] = src.get(self.ids[i])[: lens[b]]
            xt = torch.from_numpy(x)
            mask = torch.from_numpy(np.arange(T)[None, :] < lens[:, None])
            if m in self._norm_t:
                mu, sd = self._norm_t[m]
                xt = (xt - mu) / sd
                xt = xt * mask[..., None]
            batch[m] = xt
            batch[f"{m}_mask"] = mask
        batch["target"] = torch.from_numpy(self.targets[idx])
        return batch

    def batch_indices(
        self, batch_size: int, max_frames: int | None = None, shuffle: bool = False, seed: int = 0, epoch: int = 0
    ) -> list[np.ndarray]:
        """Index batches of ``batch_size`` utterances; with ``max_frames``, dynamic batching by frames
        (:func:`sertool.batching.budget_batches`: utterances of similar length grouped so that the
        longest item x items stays under ``max_frames``, at most ``batch_size`` items, random
        chunks and batch order per epoch), the batcher CMD's paper batches with."""
        n = len(self.ids)
        if max_frames:
            return budget_batches(
                self.max_length, int(max_frames), shuffle=shuffle, seed=seed, epoch=epoch, max_items=batch_size
            )
        order = np.random.default_rng([seed, epoch]).permutation(n) if shuffle else np.arange(n)
        return [order[i : i + batch_size] for i in range(0, n, batch_size)]

    def batches(
        self, batch_size: int, max_frames: int | None = None, shuffle: bool = False, seed: int = 0, epoch: int = 0
    ) -> Iterator[dict]:
        for idx in self.batch_indices(batch_size, max_frames, shuffle, seed, epoch):
            yield self.collate(idx)


# ----------------------------------------------------------------------------------- distributed batching
def shard_batch(idx: np.ndarray, rank: int, world_size: int) -> tuple[np.ndarray, bool]:
    """Rank ``rank``'s share of a *global* batch: every ``world_size``-th item from ``rank``.

    Returns ``(local_idx, real)``.  Frame-budget batches are sorted by length, so the strided
    shares have near-equal padded sizes.  A batch with fewer items than ranks leaves some ranks
    without an item: they get the batch's first item with ``real = False`` and must give it zero
    weight (DDP needs every rank to run forward/backward on every step)."""
    idx = np.asarray(idx)
    local = idx[rank::world_size]
    if len(local) == 0:
        return idx[:1], False
    return local, True


def distributed_batch_indices(
    ds: "SERDataset",
    batch_size: int,
    max_frames: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> list[tuple[np.ndarray, np.ndarray, bool]]:
    """The same global batches as ``ds.batch_indices`` (fixed size or frame budget, a function
    of ``(seed, epoch)`` only), each as ``(global_idx, local_idx, real)`` for this rank.

    Unlike ``torch.utils.data.DistributedSampler``, which gives each rank a slice of the
    dataset and so changes which items are batched together, every global batch here is the one
    a single process would see: with the loss of a share scaled by its share of the global
    batch, N processes take the same optimiser steps as one."""
    out = []
    for g in ds.batch_indices(batch_size, max_frames, shuffle, seed, epoch):
        local, real = shard_batch(g, rank, world_size)
        out.append((g, local, real))
    return out


class DistributedBatchSampler:
    """A ``batch_sampler`` for ``torch.utils.data.DataLoader``: this rank's shares of the global
    (fixed-size or frame-budget) batches of ``ds``; ``set_epoch`` as with DistributedSampler.

        sampler = DistributedBatchSampler(ds, 32, max_frames=6000, shuffle=True, seed=0,
                                          rank=rank, world_size=world)
        loader = DataLoader(ds_items, batch_sampler=sampler, collate_fn=..., num_workers=2)
    """

    def __init__(
        self,
        ds: "SERDataset",
        batch_size: int,
        max_frames: int | None = None,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.ds, self.batch_size, self.max_frames = ds, batch_size, max_frames
        self.shuffle, self.seed, self.rank, self.world_size = shuffle, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self):
        return distributed_batch_indices(
            self.ds, self.batch_size, self.max_frames, self.shuffle, self.seed, self.epoch, self.rank, self.world_size
        )

    def __iter__(self):
        for _, local, _ in self._batches():
            yield [int(i) for i in local]

    def __len__(self) -> int:
        return len(self._batches())


class CollatedBatches(torch.utils.data.Dataset):
    """Map-style dataset whose item ``k`` is ``ds.collate(batches[k])``: with
    ``DataLoader(CollatedBatches(ds, batches), batch_size=None, num_workers=W)`` worker
    processes read (each through its own HDF5 handle), pad and normalise the batches ahead of the
    training step, in order."""

    def __init__(self, ds: "SERDataset", batches: list[np.ndarray]):
        self.ds, self.batches = ds, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict:
        return self.ds.collate(self.batches[k])


def iterate_batches(ds: "SERDataset", batches: list[np.ndarray], workers: int = 0) -> Iterator[dict]:
    """``ds.collate(b)`` for every ``b`` in order: in this process (``workers = 0``) or prefetched
    by ``workers`` DataLoader processes."""
    if workers <= 0 or len(batches) == 0:
        for b in batches:
            yield ds.collate(b)
        return
    loader = torch.utils.data.DataLoader(
        CollatedBatches(ds, batches), batch_size=None, shuffle=False, num_workers=workers, prefetch_factor=2
    )
    yield from loader


def to_device(batch: dict, device: torch.device | str) -> dict:
    if str(device) == "cpu":
        return batch
    return {k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


def n_batches(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)
