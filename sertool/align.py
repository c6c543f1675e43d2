"""The align stage: word-level, fixed-length audio and text tensors (CMU-MOSEI style).

    run_align("feats/", audio="covarep", text="glove", length=50)

1. Read the manifest and open the two feature stores; an utterance missing from either is
   dropped with its reason (nothing is dropped silently: see 6).
2. Words: the words the text features were computed on (``utt.words`` when the corpus times
   them, else the whitespace words of ``utt.text``: the ``word_index`` of the text store refers
   to these).
3. Word timings, per utterance, from the first source in ``timings`` that works
   (`sertool.timings`: corpus, forced, asr, uniform); forced and ASR timings are cached in
   ``FEATS/timings/`` so a re-run with another length or collapse does not align again.
4. Text to words: rows of the text store are pooled per word by their ``word_index``
   (mean of the word pieces; GloVe tokens of one word, e.g. "do" "n't", likewise).
5. Audio to words: frame i of a store at rate r stands at time (i + c) / r, where c = 0 for
   frames centred on i / r (librosa-style ``frame_centre``) and half a frame length otherwise;
   a word [start, end) gets the frames whose time lies inside it, collapsed by ``mean``
   (default), ``max`` or the SDK's ``first`` / ``last``: the words' frames are gathered and
   reduced with one ``np.add.reduceat`` per utterance, in float64, so a constant segment gives
   its value exactly. A word with no frame inside gets the frame nearest to its centre.
6. Cut or pad to ``length`` words (padding at the end, as the SDK, or at the start), write
   ``FEATS/aligned-<audio>-<text>-<n>.h5`` atomically, and list every dropped or partly aligned
   utterance with its reason in ``FEATS/align_report.tsv``.

Steps 2-6 run on blocks of 512 utterances, written as they come (memory does not grow with the
corpus), in ``nj`` worker processes when asked; the output does not depend on ``nj``.

Output (read it with `open_aligned`): datasets ``audio`` [N, n, Da], ``text`` [N, n, Dt],
``mask`` [N, n] (True on real words), ``ids``, ``labels`` ("" when absent), ``scores`` (NaN when
absent), ``lengths`` (real words kept), ``n_words`` (words before cutting), ``timing_source``,
``split``, ``speaker``, ``session``; file attributes ``format: sertool-aligned``,
``format_version: 1`` and the provenance (both stores' extractor configs and attributes,
length, collapse, padding, truncation, timing preference and aligner, sertool version).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from sertool.corpora.base import Utterance, read_manifest
from sertool.locks import locking
from sertool.store import (
    FeatureStore,
    StoreError,
    library_versions,
    open_store,
)
from sertool.store import (
    decode_attrs as _decode_attrs,
)
from sertool.store import (
    encode_attrs as _encode_attrs,
)
from sertool.timings import (
    ALIGNERS,
    SOURCES,
    NotApplicable,
    TimingError,
    Timings,
    corpus_timings,
    make_aligner,
    uniform_timings,
)
from sertool.utils import atomic_path, show_bar, stale_pid, write_tsv

FORMAT = "sertool-aligned"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
COLLAPSE = ("mean", "max", "first", "last")
PADDING = ("end", "start")
BLOCK = 512  # utterances written per block: bounds memory whatever N is
SLOW_BLOCK = 32  # the same when forced or ASR timings may be computed
EXIT_SOME_DROPPED = 3


class AlignError(ValueError):
    """Inputs that cannot be aligned at all (bad option, store of the wrong kind, wrong file)."""


@dataclass
class AlignReport:
    path: Path | None
    report_path: Path
    n_utterances: int = 0
    n_aligned: int = 0
    dropped: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    partial: list[tuple[str, str]] = field(default_factory=list)  # (id, reason)
    sources: Counter = field(default_factory=Counter)
    n_cut: int = 0
    words_without_frames: int = 0
    seconds: float = 0.0

    def summary(self) -> list[str]:
        lines = [f"aligned {self.n_aligned} of {self.n_utterances} utterances -> {self.path}"]
        if self.sources:
            lines.append("timings: " + ", ".join(f"{k} {v}" for k, v in self.sources.most_common()))
        if self.n_cut:
            lines.append(f"{self.n_cut} utterance(s) had more words than the length and were cut")
        if self.words_without_frames:
            lines.append(
                f"{self.words_without_frames} word(s) had no audio frame inside their span: nearest frame used"
            )
        if self.partial:
            lines.append(
                f"{len(self.partial)} aligned with a caveat (fallback or approximate timings, words "
                f"interpolated, guessed or without text features): see {self.report_path}"
            )
        if self.dropped:
            reasons = Counter(r.split(":")[0] for _, r in self.dropped)
            lines.append(
                f"{len(self.dropped)} DROPPED ("
                + "; ".join(f"{k}: {v}" for k, v in reasons.most_common())
                + f"): see {self.report_path}"
            )
        lines.append(f"done in {self.seconds:.1f} s")
        return lines


# ---------------------------------------------------------------------------- options
def parse_timings(value: str | Sequence[str]) -> list[str]:
    """'corpus,forced,uniform' -> ['corpus', 'forced', 'uniform'] (order = preference)."""
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [v for v in items if v not in SOURCES]
    if not items or bad:
        raise AlignError(
            f"--timings {value!r}: use one or more of {', '.join(SOURCES)}, comma-separated in order of preference"
        )
    return list(dict.fromkeys(items))


def default_output(feats_dir: str | os.PathLike, audio: str, text: str, length: int) -> Path:
    return Path(feats_dir) / f"aligned-{audio}-{text}-{length}.h5"


# ---------------------------------------------------------------------------- 2. words
def utterance_words(utt: Utterance) -> list[str]:
    """The words that the text store's `word_index` refers to (see sertool.features.lm)."""
    if utt.words:
        return [str(w[0]).strip() for w in utt.words]
    return (utt.text or "").split()


# ---------------------------------------------------------------------------- 3. timings
class TimingResolver:
    """Tries the timing sources in order for each utterance; caches forced/ASR results on disk."""

    def __init__(
        self,
        feats_dir: Path,
        order: list[str],
        aligner: str,
        align_model: str | None,
        asr_model: str | None,
        device: str,
        cache: bool,
        threads: int = 2,
    ):
        self.order, self.aligner_name, self.align_model = order, aligner, align_model
        self.asr_model, self.device, self.threads = asr_model, device, threads
        self.cache_dir = feats_dir / "timings" if cache else None
        self.new_records: list[tuple[str, dict]] = []  # (cache key, record): written by the parent process
        self.warnings: list[str] = []
        self._aligner = None
        self._asr = None
        self._unavailable: dict[str, str] = {}  # source -> why it cannot run at all
        self._caches: dict[str, dict] = {}
        self.config: dict[str, Any] = {"order": order}
        if "forced" in order:
            self.config["aligner"] = {"aligner": aligner, "model": align_model}
        if "asr" in order:
            self.config["asr_model"] = asr_model

    # lazily built tools: a source that cannot be built is skipped for every utterance, said once
    def _get(self, source: str):
        if source in self._unavailable:
            raise TimingError(self._unavailable[source])
        try:
            if source == "forced" and self._aligner is None:
                self._aligner = make_aligner(self.aligner_name, self.align_model, self.device, threads=self.threads)
                self.config["aligner"] = self._aligner.config()
            if source == "asr" and self._asr is None:
                from sertool.timings import ASRTimer

                self._asr = ASRTimer(self.asr_model, self.device)
                self.config["asr_model"] = self._asr.config()
        except Exception as e:  # noqa: BLE001 - missing package, model not found ...
            why = f"{source} timings unavailable: {e}".split("\n")[0]
            self._unavailable[source] = why
            self.warnings.append(f"warning: {why}")
            raise TimingError(why) from None
        return self._aligner if source == "forced" else self._asr

    def _cache(self, key: str, config: dict) -> dict:
        if self.cache_dir is None:
            return {}
        if key not in self._caches:
            entries = {}
            path = self.cache_dir / f"{key}.jsonl"
            if path.exists():
                with open(path, encoding="utf-8") as f:
                    for line in f:
                        try:
                            rec = json.loads(line)
                        except json.JSONDecodeError:
                            continue  # a line cut by a kill
                        if rec.get("config") == config:
                            entries[rec["id"]] = rec
            self._caches[key] = entries
        return self._caches[key]

    def _remember(self, key: str, config: dict, uid: str, words: list[str], t: Timings) -> None:
        if self.cache_dir is None:
            return
        rec = {"id": uid, "config": config, "words": t.as_words(words), "source": t.source, "notes": t.notes}
        self._caches.setdefault(key, {})[uid] = rec
        self.new_records.append((key, rec))

    def resolve(self, utt: Utterance, words: list[str]) -> tuple[Timings, list[str]]:
        """(timings, reasons the preferred sources failed); sources that do not apply are not failures."""
        failures, skipped = [], []
        from_asr = utt.extra.get("text_source") == "asr"
        for source in self.order:
            try:
                if source == "corpus":
                    if from_asr:
                        raise NotApplicable("corpus: the text and its word times come from ASR")
                    return corpus_timings(utt.words, len(words), "corpus"), failures
                if source == "uniform":
                    return uniform_timings(words, utt.duration), failures
                if source == "asr" and from_asr and utt.words:
                    return corpus_timings(utt.words, len(words), "asr"), failures
                tool = self._get(source)
                config = tool.config()
                key = "forced-" + config["aligner"] if source == "forced" else "asr"
                cached = self._cache(key, config).get(utt.id)
                if cached is not None and [w[0] for w in cached["words"]] == list(words):
                    t = corpus_timings(cached["words"], len(words), cached["source"])
                    t.notes = cached.get("notes", [])
                    return t, failures
                wave = self._wave(utt)
                t = tool.align(wave, words) if source == "forced" else tool.timings(wave, words)
                self._remember(key, config, utt.id, words, t)
                return t, failures
            except TimingError as e:
                reason = str(e) if str(e).startswith(source) else f"{source}: {e}"
                (skipped if isinstance(e, NotApplicable) else failures).append(reason)
            except Exception as e:  # noqa: BLE001 - one bad file never stops the stage
                failures.append(f"{source}: {type(e).__name__}: {e}")
        raise TimingError("no word timings (" + "; ".join(skipped + failures) + ")")

    @staticmethod
    def _wave(utt: Utterance) -> np.ndarray:
        from sertool.audio import load_audio

        if not utt.audio:
            raise TimingError("the utterance has no audio")
        wave, _ = load_audio(utt.audio, 16000, start=utt.start, end=utt.end)
        if len(wave) < 1600:
            raise TimingError("the audio is shorter than 0.1 s")
        return wave


def save_timings(cache_dir: Path, records: list[tuple[str, dict]]) -> None:
    """Append new forced / ASR timings to FEATS/timings/<key>.jsonl (a kill loses at most a line)."""
    if not records:
        return
    cache_dir.mkdir(parents=True, exist_ok=True)
    by_key: dict[str, list[dict]] = {}
    for key, rec in records:
        by_key.setdefault(key, []).append(rec)
    for key, recs in by_key.items():
        with open(cache_dir / f"{key}.jsonl", "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in recs))


# ---------------------------------------------------------------------------- 4. text -> words
def text_per_word(rows: np.ndarray, word_index: np.ndarray | None, n_words: int) -> tuple[np.ndarray, np.ndarray]:
    """[n_words, D] mean of each word's rows (zeros where a word has none) and a has-rows flag."""
    rows = np.asarray(rows, np.float32)
    if word_index is None:
        if len(rows) != n_words:
            raise AlignError(
                f"the text features have {len(rows)} rows but no word_index, and the utterance has {n_words} words"
            )
        return rows, np.ones(n_words, bool)
    wi = np.asarray(word_index, np.int64).reshape(-1)
    if len(wi) != len(rows):
        raise AlignError(f"word_index has {len(wi)} entries for {len(rows)} text rows")
    if len(wi) == n_words and (wi == np.arange(n_words)).all():  # one row per word (GloVe, most words)
        return rows, np.ones(n_words, bool)
    keep = (wi >= 0) & (wi < n_words)
    wi, rows = wi[keep], rows[keep]
    counts = np.bincount(wi, minlength=n_words)
    if len(wi) and (np.diff(wi) >= 0).all():  # word pieces come in word order: contiguous sums
        present = np.flatnonzero(counts)
        first = np.concatenate([[0], np.cumsum(counts[present])[:-1]])
        sums = np.zeros((n_words, rows.shape[1]), np.float64)
        sums[present] = np.add.reduceat(rows, first, axis=0, dtype=np.float64)
    else:
        sums = np.zeros((n_words, rows.shape[1]), np.float64)
        np.add.at(sums, wi, rows)
    has = counts > 0
    out = np.zeros((n_words, rows.shape[1]), np.float32)
    out[has] = sums[has] / counts[has, None]
    return out, has


# ---------------------------------------------------------------------------- 5. audio -> words
def frame_offset(attrs: dict) -> float:
    """c in time(i) = (i + c) / rate: 0 for centred frames, half a frame length otherwise."""
    centre = str(attrs.get("frame_centre", ""))
    if "centred" in centre or "centered" in centre:
        return 0.0
    shift, length = attrs.get("frame_shift_samples"), attrs.get("frame_length_samples")
    if shift and length:
        return 0.5 * float(length) / float(shift)
    return 0.5


def word_frames(spans: np.ndarray, n_frames: int, rate: float, offset: float) -> tuple[np.ndarray, np.ndarray]:
    """First frame and last frame + 1 of each word: frames whose time lies in [start, end)."""
    spans = np.asarray(spans, np.float64)
    eps = 1e-6  # 0.3 * 100 is 30.000000000000004: times on a frame belong to the word starting there
    lo = np.ceil(spans[:, 0] * rate - offset - eps).astype(np.int64)
    hi = np.ceil(spans[:, 1] * rate - offset - eps).astype(np.int64)
    return np.clip(lo, 0, n_frames), np.clip(np.maximum(hi, lo), 0, n_frames)


def collapse_frames(frames: np.ndarray, lo: np.ndarray, hi: np.ndarray, how: str, nearest: np.ndarray) -> np.ndarray:
    """[n_words, D]: each word's frames [lo, hi) collapsed; words with none take frame `nearest`."""
    frames = np.asarray(frames)
    n, d = len(lo), frames.shape[1]
    empty = hi <= lo
    out = np.empty((n, d), np.float32)
    if how in ("first", "last"):
        idx = np.where(empty, nearest, lo if how == "first" else hi - 1)
        return np.asarray(frames[idx], np.float32)
    full = ~empty
    if full.any():
        # gather every word's frames one after another (spans may overlap), then one reduceat
        # over contiguous segments: sums in float64, so a constant segment gives its value exactly
        a, count = lo[full], hi[full] - lo[full]
        first = np.concatenate([[0], np.cumsum(count)[:-1]])
        rows = np.arange(int(count.sum())) - np.repeat(first - a, count)
        if how == "mean":
            gathered = frames[rows].astype(np.float64)
            out[full] = np.add.reduceat(gathered, first, axis=0) / count[:, None]
        else:
            out[full] = np.maximum.reduceat(frames[rows], first, axis=0)
    if empty.any():
        out[empty] = frames[nearest[empty]]
    return out


def nearest_frames(spans: np.ndarray, n_frames: int, rate: float, offset: float) -> np.ndarray:
    centre = spans.mean(1) * rate - offset
    return np.clip(np.rint(centre), 0, n_frames - 1).astype(np.int64)


# ---------------------------------------------------------------------------- the stage
def _check_store(store: FeatureStore, kind: str, option: str) -> None:
    got = store.attrs.get("kind")
    if got != kind:
        raise AlignError(f"{store.paths[0]}: {option} needs a {kind} feature store, this one is {got!r}")
    if kind == "audio" and not store.attrs.get("frame_rate_hz"):
        raise AlignError(f"{store.paths[0]}: an audio store without frame_rate_hz cannot be aligned to words")


class _Reader:
    """Per-utterance reads through the store's fast path (FeatureStore.read_with_attr)."""

    def __init__(self, store: FeatureStore):
        self.store = store

    def __contains__(self, uid: str) -> bool:
        return uid in self.store

    def read(self, uid: str, attr: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """The utterance's [T, D] rows as float32 and one numeric attribute (None when absent)."""
        return self.store.read_with_attr(uid, attr)


@dataclass
class _Options:
    feats_dir: Path
    audio: str
    text: str
    length: int
    collapse: str
    padding: str
    truncate: str
    order: list[str]
    aligner: str
    align_model: str | None
    asr_model: str | None
    device: str
    cache: bool
    threads: int


@dataclass
class _Block:
    """What aligning one block of utterances gives: rows for the output and the report."""

    audio: np.ndarray  # [k, n, Da]
    text: np.ndarray  # [k, n, Dt]
    mask: np.ndarray  # [k, n]
    meta: list[tuple]  # (id, label, score, split, speaker, session, length, n_words, timing source)
    dropped: list[tuple[str, str]]
    partial: list[tuple[str, str]]
    sources: Counter
    n_cut: int
    words_without_frames: int
    records: list[tuple[str, dict]]  # new forced / ASR timings for the cache
    warnings: list[str]
    timing_config: dict
    tools_built: bool = False  # the aligner / ASR was loaded: timing_config holds its full configuration


class _BlockAligner:
    """Opens the two stores and the timing sources once; aligns blocks of utterances (steps 2-6)."""

    def __init__(self, opt: _Options):
        self.opt = opt
        self.a_store = open_store(opt.feats_dir, opt.audio)
        self.t_store = open_store(opt.feats_dir, opt.text)
        try:
            _check_store(self.a_store, "audio", "--audio")
            _check_store(self.t_store, "text", "--text")
        except AlignError:
            self.close()
            raise
        self.rate = float(self.a_store.attrs["frame_rate_hz"])
        self.offset = frame_offset(self.a_store.attrs)
        self.a_read, self.t_read = _Reader(self.a_store), _Reader(self.t_store)
        self.resolver = TimingResolver(
            opt.feats_dir, opt.order, opt.aligner, opt.align_model, opt.asr_model, opt.device, opt.cache, opt.threads
        )

    def close(self) -> None:
        self.a_store.close()
        self.t_store.close()

    def block(self, utts: list[Utterance]) -> _Block:
        n = self.opt.length
        out = _Block(
            np.zeros((len(utts), n, self.a_store.dim), np.float32),
            np.zeros((len(utts), n, self.t_store.dim), np.float32),
            np.zeros((len(utts), n), bool),
            [],
            [],
            [],
            Counter(),
            0,
            0,
            [],
            [],
            {},
        )
        k = 0
        for utt in utts:
            try:
                self._one(utt, out, k)
                k += 1
            except (TimingError, AlignError) as e:
                out.dropped.append((utt.id, str(e)))
        out.audio, out.text, out.mask = out.audio[:k], out.text[:k], out.mask[:k]
        r = self.resolver
        out.records, out.warnings, r.new_records, r.warnings = r.new_records, r.warnings, [], []
        out.timing_config = dict(r.config)
        out.tools_built = r._aligner is not None or r._asr is not None
        return out

    def _one(self, utt: Utterance, out: _Block, k: int) -> None:
        uid, opt = utt.id, self.opt
        if uid not in self.a_read:
            raise AlignError("no audio features: not in the audio store (see errors.tsv of extract)")
        if uid not in self.t_read:
            raise AlignError("no text features: not in the text store (no transcript, or see errors.tsv of extract)")
        # 2. words
        words = utterance_words(utt)
        if not words:
            raise AlignError("no words: the utterance has no transcript")
        # 4. text to words (before the timings: it is cheap and checks the word count)
        rows, word_index = self.t_read.read(uid, "word_index")
        text_w, has_text = text_per_word(rows, word_index, len(words))
        # 3. timings
        t, failures = self.resolver.resolve(utt, words)
        # 5. audio to words
        frames, _ = self.a_read.read(uid)
        if len(frames) == 0:
            raise AlignError("no audio features: zero frames")
        lo, hi = word_frames(t.spans, len(frames), self.rate, self.offset)
        near = nearest_frames(t.spans, len(frames), self.rate, self.offset)
        audio_w = collapse_frames(frames, lo, hi, opt.collapse, near)
        out.words_without_frames += int((hi <= lo).sum())
        out.sources[t.source] += 1
        notes = []
        if failures:
            notes.append("preferred timings failed (" + "; ".join(failures) + ")")
        if t.approximate:
            notes.append(f"approximate {t.source} timings")
        notes += t.notes  # words interpolated or pronounced by a guess
        beyond = t.spans[:, 0] * self.rate - self.offset > len(frames) + 1
        if beyond.any():
            notes.append(f"{int(beyond.sum())} word(s) start after the last audio frame")
        if not has_text.all():
            notes.append(f"{int((~has_text).sum())} word(s) without text features (zero vectors)")
        if notes:
            out.partial.append((uid, "; ".join(notes)))
        # 6. cut and pad
        n_words, n = len(words), opt.length
        if n_words > n:
            out.n_cut += 1
            keep = slice(0, n) if opt.truncate == "end" else slice(n_words - n, n_words)
            audio_w, text_w = audio_w[keep], text_w[keep]
        m = len(audio_w)
        place = slice(0, m) if opt.padding == "end" else slice(n - m, n)
        out.audio[k, place], out.text[k, place], out.mask[k, place] = audio_w, text_w, True
        out.meta.append(
            (
                uid,
                utt.label or "",
                np.nan if utt.score is None else float(utt.score),
                utt.split or "",
                utt.speaker or "",
                utt.session or "",
                m,
                n_words,
                t.source,
            )
        )


# worker processes (--nj > 1): each opens the stores and the aligner once
_WORKER: _BlockAligner | None = None


def _init_worker(opt: _Options) -> None:
    global _WORKER
    os.environ.setdefault("OMP_NUM_THREADS", str(opt.threads))  # before torch is imported (only if an aligner needs it)
    _WORKER = _BlockAligner(opt)


def _work(utts: list[Utterance]) -> _Block:
    assert _WORKER is not None
    return _WORKER.block(utts)


def _blocks(opt: _Options, utts: list[Utterance], nj: int, first: _BlockAligner):
    # forced / ASR timings take about a second an utterance: small blocks share them evenly
    # among the workers and reach the timings cache sooner
    size = SLOW_BLOCK if {"forced", "asr"} & set(opt.order) else BLOCK
    chunks = [utts[i : i + size] for i in range(0, len(utts), size)]
    if nj <= 1 or len(chunks) < 2:
        for chunk in chunks:
            yield len(chunk), first.block(chunk)
        return
    import multiprocessing as mp

    # spawn, not fork: the parent may hold torch/OpenMP threads and open HDF5 files
    ctx = mp.get_context("spawn")
    with ctx.Pool(nj, initializer=_init_worker, initargs=(opt,)) as pool:
        for chunk, result in zip(chunks, pool.imap(_work, chunks)):
            yield len(chunk), result


class _Writer:
    """Writes the output datasets block by block: memory stays at a few blocks whatever N is."""

    def __init__(self, f: h5py.File, capacity: int, length: int, da: int, dt: int, dtype: str):
        self.f, self.length, self.n = f, length, 0
        cap = max(1, capacity)

        def chunks(d):
            return min(cap, max(1, (1 << 20) // max(1, length * d * 4))), length, d

        self.audio = f.create_dataset(
            "audio", (cap, length, da), dtype=dtype, chunks=chunks(da), maxshape=(None, length, da)
        )
        self.text = f.create_dataset(
            "text", (cap, length, dt), dtype=dtype, chunks=chunks(dt), maxshape=(None, length, dt)
        )
        self.masks: list[np.ndarray] = []
        self.meta: list[tuple] = []

    def add(self, block: _Block) -> None:
        k = len(block.meta)
        if k:
            self.audio[self.n : self.n + k] = block.audio
            self.text[self.n : self.n + k] = block.text
            self.masks.append(block.mask)
            self.meta.extend(block.meta)
            self.n += k

    def finish(self) -> int:
        self.audio.resize(self.n, axis=0)
        self.text.resize(self.n, axis=0)
        f = self.f
        mask = np.concatenate(self.masks) if self.masks else np.zeros((0, self.length), bool)
        f.create_dataset("mask", data=mask)
        columns = list(zip(*self.meta)) if self.meta else [()] * 9
        utf8 = h5py.string_dtype("utf-8")
        for key, col in zip(("ids", "labels", None, "split", "speaker", "session"), columns[:6]):
            if key:
                f.create_dataset(key, data=np.asarray(col, dtype=object), dtype=utf8)
        f.create_dataset("scores", data=np.asarray(columns[2], np.float32))
        f.create_dataset("lengths", data=np.asarray(columns[6], np.int32))
        f.create_dataset("n_words", data=np.asarray(columns[7], np.int32))
        f.create_dataset("timing_source", data=np.asarray(columns[8], dtype=object), dtype=utf8)
        return self.n


@locking(
    "align",
    lambda a: [a["out"] or default_output(a["feats_dir"], a["audio"], a["text"], a["length"])],
    hint="wait for it or use another -o",
)
def run_align(
    feats_dir: str | os.PathLike,
    audio: str,
    text: str,
    out: str | os.PathLike | None = None,
    *,
    length: int = 50,
    timings: str | Sequence[str] = ("corpus", "forced", "asr", "uniform"),
    collapse: str = "mean",
    padding: str = "end",
    truncate: str = "end",
    aligner: str = "auto",
    align_model: str | None = None,
    asr_model: str | None = None,
    device: str = "auto",
    cache: bool = True,
    dtype: str = "float32",
    nj: int = 1,
    progress: bool = True,
    log=print,
) -> AlignReport:
    t0 = time.perf_counter()
    feats_dir = Path(feats_dir)
    order = parse_timings(timings)
    if collapse not in COLLAPSE:
        raise AlignError(f"collapse {collapse!r}: choose {', '.join(COLLAPSE)}")
    if padding not in PADDING or truncate not in PADDING:
        raise AlignError(f"padding / truncate must be one of {', '.join(PADDING)}")
    if aligner not in ALIGNERS:
        raise AlignError(f"aligner {aligner!r}: choose {', '.join(ALIGNERS)}")
    if not isinstance(length, int) or length < 1:
        raise AlignError(f"length {length!r} must be a positive integer")
    if dtype not in ("float32", "float16"):
        raise AlignError(f"dtype {dtype!r}: float32 or float16")
    if not isinstance(nj, int) or nj < 1:
        raise AlignError(f"nj {nj!r} must be a positive integer")
    out = Path(out) if out is not None else default_output(feats_dir, audio, text, length)
    report = AlignReport(out, feats_dir / "align_report.tsv")

    # 1. the manifest and the two stores (checked here, in this process, before any worker starts)
    utts = read_manifest(feats_dir)
    report.n_utterances = len(utts)
    opt = _Options(
        feats_dir,
        audio,
        text,
        length,
        collapse,
        padding,
        truncate,
        order,
        aligner,
        align_model,
        asr_model,
        device,
        cache,
        threads=2 if nj == 1 else 1,
    )
    main = _BlockAligner(opt)
    timing_config: dict = dict(main.resolver.config)
    warned: set[str] = set()
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out)
    try:
        with atomic_path(out) as tmp, h5py.File(tmp, "w") as f:
            writer = _Writer(f, len(utts), length, main.a_store.dim, main.t_store.dim, dtype)
            bar = _progress(len(utts), progress)
            # 2-6, block by block (in worker processes with nj > 1; the output does not depend on nj)
            for size, block in _blocks(opt, utts, nj, main):
                writer.add(block)
                report.dropped += block.dropped
                report.partial += block.partial
                report.sources.update(block.sources)
                report.n_cut += block.n_cut
                report.words_without_frames += block.words_without_frames
                if main.resolver.cache_dir is not None:
                    save_timings(main.resolver.cache_dir, block.records)
                for w in block.warnings:
                    if w not in warned:
                        warned.add(w)
                        log(w)
                if block.tools_built:
                    timing_config = block.timing_config
                bar.update(size)
            bar.close()
            report.n_aligned = writer.finish()
            _encode_attrs(
                f.attrs,
                _provenance(
                    main.a_store,
                    main.t_store,
                    audio,
                    text,
                    length,
                    collapse,
                    padding,
                    truncate,
                    timing_config,
                    report,
                    feats_dir,
                ),
            )
            if report.n_aligned == 0:
                raise AlignError(
                    f"no utterance could be aligned ({len(report.dropped)} dropped; first reason: "
                    f"{report.dropped[0][1] if report.dropped else 'the manifest is empty'})"
                )
    finally:
        main.close()
    report.seconds = time.perf_counter() - t0
    _write_report(report)
    return report


def _remove_stale(out: Path) -> None:
    """Delete OUT.tmpPID.THREAD files left by killed runs (their process is gone)."""
    for leftover in out.parent.glob(out.name + ".tmp*"):
        pid = stale_pid(leftover, out)
        if pid is not None:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                leftover.unlink(missing_ok=True)
            except PermissionError:
                pass


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="align", unit="utt", disable=not show_bar(enabled))
    except ModuleNotFoundError:  # pragma: no cover

        class _Null:
            def update(self, n): ...
            def close(self): ...

        return _Null()


def _store_summary(store: FeatureStore, name: str) -> dict:
    keep = (
        "feature",
        "kind",
        "dim",
        "frame_rate_hz",
        "unit",
        "frame_centre",
        "frame_shift_samples",
        "frame_length_samples",
        "columns",
        "model",
        "corpus",
        "dtype",
    )
    return {"name": name, "path": str(store.paths[0]), **{k: store.attrs[k] for k in keep if k in store.attrs}}


def _provenance(
    a_store, t_store, audio, text, length, collapse, padding, truncate, timing_config, report, feats_dir
) -> dict:
    import sertool

    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "audio_feature": audio,
        "text_feature": text,
        "audio_extractor": a_store.extractor,
        "text_extractor": t_store.extractor,
        "audio_store": _store_summary(a_store, audio),
        "text_store": _store_summary(t_store, text),
        "length": length,
        "collapse": collapse,
        "padding": padding,
        "truncate": truncate,
        "frame_time": f"frame i at (i + {frame_offset(a_store.attrs):g}) / {a_store.attrs['frame_rate_hz']} s",
        "timings": timing_config,
        "timing_counts": dict(report.sources),
        "n_dropped": len(report.dropped),
        "n_partial": len(report.partial),
        "manifest": str((feats_dir / "manifest.jsonl").resolve()),
        "sertool_version": sertool.__version__,
        "versions": library_versions(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _write_report(report: AlignReport) -> None:
    rows = [(uid, "dropped", reason) for uid, reason in report.dropped]
    rows += [(uid, "partial", reason) for uid, reason in report.partial]
    write_tsv(
        report.report_path,
        ["id", "status", "reason"],
        ((uid, status, " ".join(reason.split())) for uid, status, reason in rows),
    )


# ---------------------------------------------------------------------------- reading
@dataclass
class Aligned:
    audio: np.ndarray  # [N, n, Da]
    text: np.ndarray  # [N, n, Dt]
    mask: np.ndarray  # [N, n] bool
    ids: list[str]
    labels: list[str]
    scores: np.ndarray
    lengths: np.ndarray
    n_words: np.ndarray
    timing_source: list[str]
    split: list[str]
    speaker: list[str]
    session: list[str]
    attrs: dict[str, Any]

    def __len__(self) -> int:
        return len(self.ids)


def open_aligned(path: str | os.PathLike) -> Aligned:
    """Read an `aligned-*.h5` file into memory; a clear StoreError for anything else."""
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except FileNotFoundError:
        raise StoreError(f"{path}: aligned file does not exist (run `sertool align`)") from None
    except OSError as e:
        raise StoreError(f"{path}: not a readable HDF5 file ({e})") from None
    with f:
        attrs = _decode_attrs(f.attrs)
        fmt = attrs.get("format")
        if fmt != FORMAT:
            hint = " (a feature store: align it first with `sertool align`)" if fmt == "sertool-features" else ""
            raise StoreError(
                f"{path}: not a sertool aligned file (attribute 'format' is {fmt!r}, expected {FORMAT!r}){hint}"
            )
        version = attrs.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            newer = isinstance(version, int) and version > max(SUPPORTED_VERSIONS)
            raise StoreError(
                f"{path}: aligned format version {version!r} is not supported (this sertool reads "
                f"{list(SUPPORTED_VERSIONS)}); " + ("upgrade sertool." if newer else "re-run `sertool align`.")
            )
        need = ("audio", "text", "mask", "ids", "labels", "scores", "lengths", "timing_source")
        missing = [k for k in need if k not in f]
        if missing:
            raise StoreError(f"{path}: aligned file is incomplete (missing {', '.join(missing)})")

        def strings(key):
            return (
                [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in f[key][()]]
                if key in f
                else [""] * len(f["ids"])
            )

        return Aligned(
            audio=f["audio"][()],
            text=f["text"][()],
            mask=f["mask"][()].astype(bool),
            ids=strings("ids"),
            labels=strings("labels"),
            scores=f["scores"][()],
            lengths=f["lengths"][()],
            n_words=f["n_words"][()] if "n_words" in f else f["lengths"][()],
            timing_source=strings("timing_source"),
            split=strings("split"),
            speaker=strings("speaker"),
            session=strings("session"),
            attrs=attrs,
        )
