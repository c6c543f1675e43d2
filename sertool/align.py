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
   (default), ``max`` or the SDK's ``first`` / ``last``, with vectorised segment reductions
   (``np.add.reduceat`` in float64, so a constant segment gives its value exactly). A word
   with no frame inside gets the frame nearest to its centre.
6. Cut or pad to ``length`` words (padding at the end, as the SDK, or at the start), write
   ``FEATS/aligned-<audio>-<text>-<n>.h5`` atomically, and list every dropped or partly aligned
   utterance with its reason in ``FEATS/align_report.tsv``.

Output (read it with `open_aligned`): datasets ``audio`` [N, n, Da], ``text`` [N, n, Dt],
``mask`` [N, n] (True on real words), ``ids``, ``labels`` ("" when absent), ``scores`` (NaN when
absent), ``lengths`` (real words kept), ``n_words`` (words before cutting), ``timing_source``,
``split``, ``speaker``, ``session``; file attributes ``format: sertool-aligned``,
``format_version: 1`` and the provenance (both stores' extractor configs and attributes,
length, collapse, padding, truncation, timing preference and aligner, sertool version).
"""

from __future__ import annotations

import csv
import datetime as _dt
import json
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import h5py
import numpy as np

from sertool.corpora.base import Utterance, read_manifest
from sertool.store import FeatureStore, StoreError, _decode_attrs, _encode_attrs, library_versions, open_store
from sertool.timings import (ALIGNERS, SOURCES, NotApplicable, Timings, TimingError, corpus_timings, make_aligner,
                             uniform_timings)

FORMAT = "sertool-aligned"
FORMAT_VERSION = 1
SUPPORTED_VERSIONS = (1,)
COLLAPSE = ("mean", "max", "first", "last")
PADDING = ("end", "start")
BLOCK = 512  # utterances written per block: bounds memory whatever N is
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
            lines.append(f"{self.words_without_frames} word(s) had no audio frame inside their span: nearest frame used")
        if self.partial:
            lines.append(f"{len(self.partial)} partly aligned (approximate timings or words without features): "
                         f"see {self.report_path}")
        if self.dropped:
            reasons = Counter(r.split(":")[0] for _, r in self.dropped)
            lines.append(f"{len(self.dropped)} DROPPED (" + "; ".join(f"{k}: {v}" for k, v in reasons.most_common())
                         + f"): see {self.report_path}")
        lines.append(f"done in {self.seconds:.1f} s")
        return lines


# ---------------------------------------------------------------------------- options
def parse_timings(value: str | Sequence[str]) -> list[str]:
    """'corpus,forced,uniform' -> ['corpus', 'forced', 'uniform'] (order = preference)."""
    items = [v.strip() for v in (value.split(",") if isinstance(value, str) else value) if v.strip()]
    bad = [v for v in items if v not in SOURCES]
    if not items or bad:
        raise AlignError(f"--timings {value!r}: use one or more of {', '.join(SOURCES)}, comma-separated in order of preference")
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

    def __init__(self, feats_dir: Path, order: list[str], aligner: str, align_model: str | None, asr_model: str | None,
                 device: str, cache: bool, log):
        self.order, self.aligner_name, self.align_model = order, aligner, align_model
        self.asr_model, self.device, self.log = asr_model, device, log
        self.cache_dir = feats_dir / "timings" if cache else None
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
                self._aligner = make_aligner(self.aligner_name, self.align_model, self.device)
                self.config["aligner"] = self._aligner.config()
            if source == "asr" and self._asr is None:
                from sertool.timings import ASRTimer

                self._asr = ASRTimer(self.asr_model, self.device)
                self.config["asr_model"] = self._asr.config()
        except Exception as e:  # noqa: BLE001 - missing package, model not found ...
            why = f"{source} timings unavailable: {e}".split("\n")[0]
            self._unavailable[source] = why
            self.log(f"warning: {why}")
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
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        rec = {"id": uid, "config": config, "words": t.as_words(words), "source": t.source, "notes": t.notes}
        self._caches.setdefault(key, {})[uid] = rec
        with open(self.cache_dir / f"{key}.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(rec) + "\n")

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


# ---------------------------------------------------------------------------- 4. text -> words
def text_per_word(rows: np.ndarray, word_index: np.ndarray | None, n_words: int) -> tuple[np.ndarray, np.ndarray]:
    """[n_words, D] mean of each word's rows (zeros where a word has none) and a has-rows flag."""
    rows = np.asarray(rows, np.float32)
    if word_index is None:
        if len(rows) != n_words:
            raise AlignError(f"the text features have {len(rows)} rows but no word_index, and the utterance has "
                             f"{n_words} words")
        return rows, np.ones(n_words, bool)
    wi = np.asarray(word_index, np.int64).reshape(-1)
    if len(wi) != len(rows):
        raise AlignError(f"word_index has {len(wi)} entries for {len(rows)} text rows")
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
        a, b = lo[full], hi[full]
        if (a[1:] >= b[:-1]).all():  # disjoint, in order (the usual case): one reduceat over [a0 b0 a1 b1 ...]
            padded = np.concatenate([frames, frames[-1:]], 0) if b[-1] >= len(frames) else frames  # indices < len
            idx = np.stack([a, b], 1).reshape(-1)
            if how == "mean":
                red = np.add.reduceat(padded, idx, axis=0, dtype=np.float64)[0::2]
                red /= (b - a)[:, None]
            else:
                red = np.maximum.reduceat(padded, idx, axis=0)[0::2]
            out[full] = red
        elif how == "mean":  # overlapping spans: prefix sums
            cs = np.concatenate([np.zeros((1, d)), np.cumsum(frames, 0, dtype=np.float64)], 0)
            out[full] = (cs[b] - cs[a]) / (b - a)[:, None]
        else:
            out[full] = np.stack([frames[x:y].max(0) for x, y in zip(a, b)])
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


def _utt_attr(store: FeatureStore, uid: str, key: str):
    """One attribute of an utterance, without decoding the others (the token lists are long)."""
    attrs = store._dataset(uid).attrs  # noqa: SLF001 - the store has no single-attribute accessor yet
    return attrs[key] if key in attrs else None


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
    aligner: str = "whisper",
    align_model: str | None = None,
    asr_model: str | None = None,
    device: str = "auto",
    cache: bool = True,
    dtype: str = "float32",
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
    out = Path(out) if out is not None else default_output(feats_dir, audio, text, length)
    report = AlignReport(out, feats_dir / "align_report.tsv")

    # 1. manifest and stores
    utts = read_manifest(feats_dir)
    a_store = open_store(feats_dir, audio)
    t_store = open_store(feats_dir, text)
    try:
        _check_store(a_store, "audio", "--audio")
        _check_store(t_store, "text", "--text")
        rate = float(a_store.attrs["frame_rate_hz"])
        offset = frame_offset(a_store.attrs)
        resolver = TimingResolver(feats_dir, order, aligner, align_model, asr_model, device, cache, log)
        report.n_utterances = len(utts)

        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            with h5py.File(tmp, "w") as f:
                writer = _Writer(f, len(utts), length, a_store.dim, t_store.dim, dtype)
                bar = _progress(len(utts), progress)
                for utt in utts:
                    try:
                        row = _align_one(utt, a_store, t_store, resolver, rate, offset, length, collapse, padding,
                                         truncate, report)
                    except (TimingError, AlignError) as e:
                        report.dropped.append((utt.id, str(e)))
                    else:
                        writer.add(*row)
                    bar.update(1)
                bar.close()
                n = writer.finish()
                report.n_aligned = n
                attrs = _provenance(a_store, t_store, audio, text, length, collapse, padding, truncate, resolver,
                                    report, feats_dir)
                _encode_attrs(f.attrs, attrs)
            if report.n_aligned == 0:
                raise AlignError(f"no utterance could be aligned ({len(report.dropped)} dropped; first reason: "
                                 f"{report.dropped[0][1] if report.dropped else 'the manifest is empty'})")
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                tmp.unlink()
    finally:
        a_store.close()
        t_store.close()
    report.seconds = time.perf_counter() - t0
    _write_report(report)
    return report


def _align_one(utt, a_store, t_store, resolver, rate, offset, length, collapse, padding, truncate, report):
    uid = utt.id
    if uid not in a_store:
        raise AlignError("no audio features: not in the audio store (see errors.tsv of extract)")
    if uid not in t_store:
        raise AlignError("no text features: not in the text store (no transcript, or see errors.tsv of extract)")
    words = utterance_words(utt)
    if not words:
        raise AlignError("no words: the utterance has no transcript")
    # 4. text to words (first: it is cheap and checks the word count)
    word_index = _utt_attr(t_store, uid, "word_index")
    text_w, has_text = text_per_word(t_store[uid], word_index, len(words))
    # 3. timings
    t, failures = resolver.resolve(utt, words)
    # 5. audio to words
    frames = a_store[uid]
    if len(frames) == 0:
        raise AlignError("no audio features: zero frames")
    lo, hi = word_frames(t.spans, len(frames), rate, offset)
    near = nearest_frames(t.spans, len(frames), rate, offset)
    audio_w = collapse_frames(frames, lo, hi, collapse, near)
    empty = hi <= lo
    report.words_without_frames += int(empty.sum())
    report.sources[t.source] += 1
    notes = []
    if failures:
        notes.append("preferred timings failed (" + "; ".join(failures) + ")")
    if t.approximate:
        notes.append(f"approximate {t.source} timings")
    notes += [n for n in t.notes if "interpolated" in n]
    beyond = t.spans[:, 0] * rate - offset > len(frames) + 1
    if beyond.any():
        notes.append(f"{int(beyond.sum())} word(s) start after the last audio frame")
    if not has_text.all():
        notes.append(f"{int((~has_text).sum())} word(s) without text features (zero vectors)")
    if notes:
        report.partial.append((uid, "; ".join(notes)))
    # 6. cut and pad
    n_words = len(words)
    if n_words > length:
        report.n_cut += 1
        keep = slice(0, length) if truncate == "end" else slice(n_words - length, n_words)
        audio_w, text_w = audio_w[keep], text_w[keep]
    k = len(audio_w)
    place = slice(0, k) if padding == "end" else slice(length - k, length)
    return utt, audio_w, text_w, place, k, n_words, t.source


class _Writer:
    """Fills the output datasets block by block (memory stays at BLOCK utterances)."""

    def __init__(self, f: h5py.File, capacity: int, length: int, da: int, dt: int, dtype: str):
        self.f, self.length, self.n = f, length, 0
        cap = max(1, capacity)
        chunk = lambda d: (min(cap, max(1, (1 << 20) // max(1, length * d * 4))), length, d)  # noqa: E731
        self.ds = {
            "audio": f.create_dataset("audio", (cap, length, da), dtype=dtype, chunks=chunk(da), maxshape=(None, length, da)),
            "text": f.create_dataset("text", (cap, length, dt), dtype=dtype, chunks=chunk(dt), maxshape=(None, length, dt)),
        }
        self.strings = {k: [] for k in ("ids", "labels", "timing_source", "split", "speaker", "session")}
        self.numbers = {"scores": [], "lengths": [], "n_words": []}
        self.masks = []
        self._buf_a = np.zeros((BLOCK, length, da), np.float32)
        self._buf_t = np.zeros((BLOCK, length, dt), np.float32)
        self._k = 0

    def add(self, utt, audio_w, text_w, place, k, n_words, source) -> None:
        self._buf_a[self._k] = 0
        self._buf_t[self._k] = 0
        self._buf_a[self._k, place] = audio_w
        self._buf_t[self._k, place] = text_w
        mask = np.zeros(self.length, bool)
        mask[place] = True
        self.masks.append(mask)
        self.strings["ids"].append(utt.id)
        self.strings["labels"].append(utt.label or "")
        self.strings["timing_source"].append(source)
        self.strings["split"].append(utt.split or "")
        self.strings["speaker"].append(utt.speaker or "")
        self.strings["session"].append(utt.session or "")
        self.numbers["scores"].append(np.nan if utt.score is None else float(utt.score))
        self.numbers["lengths"].append(k)
        self.numbers["n_words"].append(n_words)
        self._k += 1
        if self._k == BLOCK:
            self._flush()

    def _flush(self) -> None:
        if self._k:
            self.ds["audio"][self.n:self.n + self._k] = self._buf_a[:self._k]
            self.ds["text"][self.n:self.n + self._k] = self._buf_t[:self._k]
            self.n += self._k
            self._k = 0

    def finish(self) -> int:
        self._flush()
        for ds in self.ds.values():
            ds.resize(self.n, axis=0)
        f = self.f
        f.create_dataset("mask", data=np.asarray(self.masks, bool).reshape(self.n, self.length))
        utf8 = h5py.string_dtype("utf-8")
        for key, values in self.strings.items():
            f.create_dataset(key, data=np.asarray(values, dtype=object), dtype=utf8)
        f.create_dataset("scores", data=np.asarray(self.numbers["scores"], np.float32))
        f.create_dataset("lengths", data=np.asarray(self.numbers["lengths"], np.int32))
        f.create_dataset("n_words", data=np.asarray(self.numbers["n_words"], np.int32))
        return self.n


def _progress(total: int, enabled: bool):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc="align", unit="utt", disable=not enabled)
    except ModuleNotFoundError:  # pragma: no cover
        class _Null:
            def update(self, n): ...
            def close(self): ...
        return _Null()


def _store_summary(store: FeatureStore, name: str) -> dict:
    keep = ("feature", "kind", "dim", "frame_rate_hz", "unit", "frame_centre", "frame_shift_samples",
            "frame_length_samples", "columns", "model", "corpus", "dtype")
    return {"name": name, "path": str(store.paths[0]), **{k: store.attrs[k] for k in keep if k in store.attrs}}


def _provenance(a_store, t_store, audio, text, length, collapse, padding, truncate, resolver, report, feats_dir) -> dict:
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
        "timings": resolver.config,
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
    tmp = report.report_path.with_name(report.report_path.name + f".tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["id", "status", "reason"])
        w.writerows((uid, status, " ".join(reason.split())) for uid, status, reason in rows)
    os.replace(tmp, report.report_path)


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
            raise StoreError(f"{path}: not a sertool aligned file (attribute 'format' is {fmt!r}, expected {FORMAT!r}){hint}")
        version = attrs.get("format_version")
        if version not in SUPPORTED_VERSIONS:
            newer = isinstance(version, int) and version > max(SUPPORTED_VERSIONS)
            raise StoreError(f"{path}: aligned format version {version!r} is not supported (this sertool reads "
                             f"{list(SUPPORTED_VERSIONS)}); " + ("upgrade sertool." if newer else "re-run `sertool align`."))
        need = ("audio", "text", "mask", "ids", "labels", "scores", "lengths", "timing_source")
        missing = [k for k in need if k not in f]
        if missing:
            raise StoreError(f"{path}: aligned file is incomplete (missing {', '.join(missing)})")

        def strings(key):
            return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in f[key][()]] if key in f else [""] * len(f["ids"])

        return Aligned(
            audio=f["audio"][()], text=f["text"][()], mask=f["mask"][()].astype(bool), ids=strings("ids"),
            labels=strings("labels"), scores=f["scores"][()], lengths=f["lengths"][()],
            n_words=f["n_words"][()] if "n_words" in f else f["lengths"][()], timing_source=strings("timing_source"),
            split=strings("split"), speaker=strings("speaker"), session=strings("session"), attrs=attrs)
