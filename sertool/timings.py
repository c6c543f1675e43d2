"""Word timings for the align stage: where each word of an utterance starts and ends.

Sources, in the order `align` prefers them (``--timings corpus,forced,asr,uniform``):

``corpus``
    The corpus's own word intervals (IEMOCAP ``.wdseg``, CMU-MOSEI word intervals), i.e. the
    utterance's ``words`` when its text did not come from ASR.
``forced``
    Forced alignment of the known transcript to the audio, with one of three aligners, or
    ``auto`` (the default): pocketsphinx, and Whisper for the utterances it cannot align
    (pocketsphinx was closer to the true boundaries on continuous speech and about 10x faster in
    ``benchmarks/bench_align.py``; docs/align.md has the figures):

    * ``whisper`` (offline): faster-whisper's ``find_alignment`` (cross-attention
      DTW of the transcript's tokens) on the packaged ``tiny.en`` model or any faster-whisper
      model. Whisper sees 30 s windows, so longer audio is aligned window by window: each
      window gets the words that fit the speaking rate seen so far, the last words of a window
      (which DTW may stretch over untranscribed audio) are re-aligned in the next one. DTW
      word boundaries touch (no pauses) and are quantised to 20 ms; they are then snapped to
      the pauses an energy detector finds within 200 ms and trimmed to voiced audio
      (`refine_with_energy`), which brings most boundaries within a frame or two of the truth.
    * ``wav2vec2``: a Hugging Face wav2vec2-CTC model (``--align-model``, a directory or a hub
      id): character log-probabilities, then `ctc_viterbi` (the best CTC path that emits the
      transcript's characters in order, written in torch) gives each character its frames.
    * ``pocketsphinx``: the CMU Sphinx aligner with its packaged US-English acoustic model and
      dictionary (words outside the dictionary are placed between their neighbours).
``asr``
    Word timestamps of an ASR pass: the utterance's own ``words`` when its text came from ASR
    (``extract --asr``), else a fresh ASR pass (`sertool.features.asr.load_asr`) whose words
    are matched to the transcript (words it did not recognise are placed between neighbours).
``uniform``
    The utterance's duration shared out in proportion to the words' character counts; marked
    approximate.

Every function returns a `Timings` (the words' [start, end] in seconds from the start of the
utterance, the source, and notes such as "2 words interpolated") or raises `TimingError` with
the reason, which `align` writes to its report.

`synthesize_speech` makes test speech with exact word boundaries (espeak-ng, one word at a
time), used by the tests and the benchmark to measure the aligners.
"""

from __future__ import annotations

import io
import math
import re
import shutil
import subprocess
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

SAMPLE_RATE = 16000
ALIGNERS = ("whisper", "wav2vec2", "pocketsphinx", "auto")
SOURCES = ("corpus", "forced", "asr", "uniform")


class TimingError(RuntimeError):
    """Word timings that cannot be had for one utterance; the message says why."""


class NotApplicable(TimingError):
    """A source that does not apply to the utterance (no corpus timings, no ASR text): not a failure."""


@dataclass
class Timings:
    spans: np.ndarray  # [n_words, 2] float64 seconds from the utterance start
    source: str  # corpus | forced:<aligner> | asr | uniform
    approximate: bool = False
    notes: list[str] = field(default_factory=list)  # worth reporting: words interpolated or guessed
    info: dict[str, Any] = field(default_factory=dict)  # for the record only (e.g. windows used)

    def as_words(self, words: Sequence[str]) -> list[list]:
        return [[w, round(float(s), 4), round(float(e), 4)] for w, (s, e) in zip(words, self.spans)]


# ---------------------------------------------------------------------------- simple sources
def corpus_timings(words: Sequence, n_words: int, source: str = "corpus") -> Timings:
    """Spans from [[word, start, end], ...] as the corpus (or an ASR pass) gives them."""
    if not words:
        raise NotApplicable(f"{source}: the utterance has no word timings")
    if len(words) != n_words:
        raise TimingError(f"{source}: {len(words)} timed words but {n_words} words in the text features")
    spans = np.asarray([[float(w[1]), float(w[2])] for w in words], np.float64)
    if not np.isfinite(spans).all() or (spans[:, 1] < spans[:, 0]).any() or (spans < 0).any():
        raise TimingError(f"{source}: word timings are not finite, non-negative intervals")
    return Timings(spans, source)


def uniform_timings(words: Sequence[str], duration: float) -> Timings:
    """Spans proportional to each word's character count (at least one character each)."""
    if not words:
        raise TimingError("uniform: no words")
    if duration is None or not math.isfinite(duration) or duration <= 0:
        raise TimingError("uniform: the utterance's duration is unknown")
    weights = np.asarray([max(1, len(str(w))) for w in words], np.float64)
    edges = np.concatenate([[0.0], np.cumsum(weights)]) / weights.sum() * float(duration)
    return Timings(np.stack([edges[:-1], edges[1:]], 1), "uniform", approximate=True)


def interpolate_missing(spans: np.ndarray, known: np.ndarray, duration: float) -> np.ndarray:
    """Fill the spans of words that an aligner could not place (known False) between neighbours."""
    spans = np.asarray(spans, np.float64).copy()
    n = len(spans)
    i = 0
    while i < n:
        if known[i]:
            i += 1
            continue
        j = i
        while j < n and not known[j]:
            j += 1
        lo = spans[i - 1, 1] if i > 0 else 0.0
        hi = spans[j, 0] if j < n else max(duration, lo)
        edges = np.linspace(lo, max(lo, hi), j - i + 1)
        spans[i:j, 0], spans[i:j, 1] = edges[:-1], edges[1:]
        i = j
    return spans


# ---------------------------------------------------------------------------- CTC Viterbi
def ctc_viterbi(log_probs, targets: Sequence[int], blank: int = 0):
    """Best CTC path emitting `targets` in order: for each frame, the target index it emits (-1: blank).

    `log_probs` is a [T, C] tensor (or array) of log-probabilities. The path runs over the usual
    extended sequence (blank, y1, blank, y2, ..., blank): a state may stay, step one, or skip a
    blank between two different labels. Vectorised over states; one torch step per frame.
    Raises TimingError when the audio has too few frames for the transcript.
    """
    import torch

    lp = torch.as_tensor(log_probs, dtype=torch.float32)
    if lp.ndim != 2:
        raise ValueError(f"log_probs must be [T, C], got shape {tuple(lp.shape)}")
    T = lp.shape[0]
    y = torch.as_tensor(list(targets), dtype=torch.long)
    L = len(y)
    if L == 0:
        return np.full(T, -1, np.int64)
    if (y == blank).any() or (y < 0).any() or (y >= lp.shape[1]).any():
        raise ValueError("targets must be label ids other than the blank and below the number of classes")
    repeats = int((y[1:] == y[:-1]).sum())
    if T < L + repeats:
        raise TimingError(f"the audio has {T} frames, too few for {L} characters ({L + repeats} needed)")
    S = 2 * L + 1
    ext = torch.full((S,), blank, dtype=torch.long)
    ext[1::2] = y
    # skip allowed into s from s-2 when s is a label that differs from the label two back
    skip = torch.zeros(S, dtype=torch.bool)
    skip[3::2] = y[1:] != y[:-1]
    neg = torch.tensor(float("-inf"))
    emit = lp[:, ext]  # [T, S]
    alpha = torch.full((S,), float("-inf"))
    alpha[0] = emit[0, 0]
    alpha[1] = emit[0, 1]
    back = torch.zeros((T, S), dtype=torch.int8)  # 0 stay, 1 from s-1, 2 from s-2
    for t in range(1, T):
        stay = alpha
        step = torch.cat([neg.view(1), alpha[:-1]])
        jump = torch.where(skip, torch.cat([neg.expand(2), alpha[:-2]]), neg)
        best, arg = torch.stack([stay, step, jump]).max(0)
        back[t] = arg.to(torch.int8)
        alpha = best + emit[t]
    # the path ends in the last label or the final blank
    s = S - 1 if alpha[S - 1] >= alpha[S - 2] else S - 2
    if not torch.isfinite(alpha[s]):
        raise TimingError("no CTC path emits the transcript (impossible emission probabilities)")
    back_np = back.numpy()
    states = np.empty(T, np.int64)
    for t in range(T - 1, -1, -1):
        states[t] = s
        s -= int(back_np[t, s])
    return np.where(states % 2 == 1, (states - 1) // 2, -1)


def token_spans(path: np.ndarray, n_tokens: int) -> np.ndarray:
    """[n_tokens, 2] first frame and last frame + 1 of each target in a `ctc_viterbi` path."""
    frames = np.flatnonzero(path >= 0)
    emitted = path[frames]  # non-decreasing target indices
    first = np.searchsorted(emitted, np.arange(n_tokens), side="left")
    last = np.searchsorted(emitted, np.arange(n_tokens), side="right") - 1
    spans = np.stack([frames[first], frames[last] + 1], 1)
    return spans


# ---------------------------------------------------------------------------- energy refinement
def voiced_frames(
    wave: np.ndarray, sample_rate: int = SAMPLE_RATE, hop_s: float = 0.01, win_s: float = 0.025, rel_db: float = 40.0
) -> np.ndarray:
    """Per 10 ms frame: True when its energy is within `rel_db` of the loud frames (and above the floor)."""
    hop, win = int(round(sample_rate * hop_s)), int(round(sample_rate * win_s))
    wave = np.asarray(wave, np.float32).reshape(-1)
    n = max(1, int(math.ceil(len(wave) / hop)))
    padded = np.pad(wave, (win // 2, win + hop))
    frames = np.lib.stride_tricks.sliding_window_view(padded, win)[::hop][:n]
    db = 10 * np.log10(np.mean(frames.astype(np.float64) ** 2, axis=1) + 1e-12)
    loud, floor = np.percentile(db, 99), np.percentile(db, 5)
    if loud - floor < 12:  # no clear speech / pause contrast: call everything voiced
        return np.ones(n, bool)
    return db > max(loud - rel_db, floor + 6.0)


def refine_with_energy(
    spans: np.ndarray,
    wave: np.ndarray,
    sample_rate: int = SAMPLE_RATE,
    window_s: float = 0.2,
    min_pause_s: float = 0.03,
    hop_s: float = 0.01,
) -> np.ndarray:
    """Snap boundaries between words to a pause found within `window_s`, then trim words to voiced audio."""
    voiced = voiced_frames(wave, sample_rate, hop_s)
    m = np.concatenate([[0], (~voiced).astype(np.int8), [0]])
    d = np.diff(m)
    a, b = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
    keep = (b - a) * hop_s >= min_pause_s - 1e-9
    a, b = a[keep] * hop_s, b[keep] * hop_s
    out = np.asarray(spans, np.float64).copy()
    for i in range(len(out) - 1):
        if not len(a):
            break
        boundary = 0.5 * (out[i, 1] + out[i + 1, 0])
        dist = np.maximum(0.0, np.maximum(a - boundary, boundary - b))
        k = int(np.argmin(dist))
        if dist[k] <= window_s and a[k] > out[i, 0] and b[k] < out[i + 1, 1]:
            out[i, 1], out[i + 1, 0] = a[k], b[k]
    for s in out:
        f0, f1 = int(math.floor(s[0] / hop_s + 1e-6)), int(math.ceil(s[1] / hop_s - 1e-6))
        idx = np.flatnonzero(voiced[f0:f1])
        if len(idx):
            s[0], s[1] = max(s[0], (f0 + idx[0]) * hop_s), min(s[1], (f0 + idx[-1] + 1) * hop_s)
    return out


# ---------------------------------------------------------------------------- aligners
def _plain_word(word: str) -> str:
    text = unicodedata.normalize("NFKC", word).lower().replace("’", "'")
    return re.sub(r"[^\w']", "", text).strip("'")


class Aligner:
    """Forced aligner: wave (16 kHz mono float32) + words -> Timings; `config` is recorded in the output."""

    name = ""

    def config(self) -> dict[str, Any]:
        return {"aligner": self.name}

    def align(self, wave: np.ndarray, words: Sequence[str]) -> Timings:
        raise NotImplementedError


class WhisperAligner(Aligner):
    """faster-whisper `find_alignment` (cross-attention DTW) on tiny.en or another faster-whisper model."""

    name = "whisper"
    WINDOW_S = 30.0
    TRUST_TAIL = 3  # words at the end of a window that the next window aligns again

    def __init__(self, model: str | None = None, device: str = "auto", refine: bool = True, cpu_threads: int = 2):
        try:
            from faster_whisper import WhisperModel
            from faster_whisper.tokenizer import Tokenizer
        except ModuleNotFoundError:
            raise TimingError(
                "forced alignment with Whisper needs faster-whisper: pip install 'sertool[offline-models]'"
            ) from None
        from sertool.features.whisper import DEFAULT_WHISPER_MODEL, resolve_whisper
        from sertool.utils import pick_device

        self.model_name = model or DEFAULT_WHISPER_MODEL
        resolved = resolve_whisper(self.model_name, option="--align-model")
        if resolved.kind != "ctranslate2":
            raise TimingError(f"{resolved.path}: the whisper aligner needs a faster-whisper (CTranslate2) model")
        self.device = str(pick_device(device))
        cuda = self.device.startswith("cuda")
        index = int(self.device.split(":")[1]) if cuda and ":" in self.device else 0
        self.fw = WhisperModel(
            str(resolved.path),
            device="cuda" if cuda else "cpu",
            device_index=index,
            compute_type="float16" if cuda else "float32",
            cpu_threads=cpu_threads,
        )
        # transcripts are taken as English (tiny.en; a multilingual model is told "en" too)
        self.tokenizer = Tokenizer(
            self.fw.hf_tokenizer, self.fw.model.is_multilingual, task="transcribe", language="en"
        )
        self.refine = refine
        self.model_path = str(resolved.path)

    def config(self) -> dict[str, Any]:
        return {
            "aligner": self.name,
            "model": self.model_name,
            "model_path": self.model_path,
            "refine": self.refine,
            "window_s": self.WINDOW_S,
        }

    def _align_window(self, wave: np.ndarray, words: Sequence[str]) -> np.ndarray:
        import ctranslate2
        from faster_whisper.audio import pad_or_trim

        mel = self.fw.feature_extractor(wave)
        n_frames = int(mel.shape[-1])
        feats = np.ascontiguousarray(pad_or_trim(mel)[None].astype(np.float32))
        encoded = self.fw.model.encode(ctranslate2.StorageView.from_array(feats), to_cpu=False)
        pieces = [self.tokenizer.encode(" " + w.strip()) for w in words]
        tokens = [t for p in pieces for t in p]
        result = self.fw.find_alignment(self.tokenizer, [tokens], encoded, n_frames)[0]
        # find_alignment splits at spaces and punctuation, a refinement of our words: merge back
        bounds = np.cumsum([len(p) for p in pieces])
        spans = np.full((len(words), 2), np.nan)
        count, k, first = 0, 0, None
        for item in result:
            first = item["start"] if first is None else first
            count += len(item["tokens"])
            while k < len(words) and count >= bounds[k]:
                spans[k] = (first, item["end"])
                k += 1
                first = None
        if k < len(words):
            raise TimingError(f"whisper alignment returned {k} of {len(words)} words")
        return spans

    def align(self, wave: np.ndarray, words: Sequence[str]) -> Timings:
        words = [str(w) for w in words]
        if not words:
            raise TimingError("no words to align")
        duration = len(wave) / SAMPLE_RATE
        win = int(self.WINDOW_S * SAMPLE_RATE)
        spans = np.zeros((len(words), 2))
        start_word, offset, windows = 0, 0.0, 0
        rate = None  # characters per second seen so far
        while start_word < len(words):
            s0 = int(round(offset * SAMPLE_RATE))
            piece = wave[s0 : s0 + win]
            rest = words[start_word:]
            last_window = s0 + win >= len(wave)
            if last_window:
                chosen = rest
            else:
                chars = np.cumsum([len(w) + 1 for w in rest])
                r = rate or max(1.0, chars[-1] / max(1e-3, duration - offset))
                fit = int(np.searchsorted(chars, 0.8 * self.WINDOW_S * r, side="right"))
                chosen = rest[: max(1, fit)]
            local = self._align_window(piece, chosen) + offset
            windows += 1
            if len(chosen) == len(rest):  # every remaining word placed
                spans[start_word:] = local
                break
            keep = max(1, len(chosen) - self.TRUST_TAIL)
            spans[start_word : start_word + keep] = local[:keep]
            done_chars = sum(len(w) + 1 for w in chosen[:keep])
            elapsed = local[keep - 1, 1] - offset
            rate = done_chars / elapsed if elapsed > 1.0 else rate
            new_offset = float(local[keep - 1, 1])
            if new_offset <= offset + 0.5:  # no progress (silence?): move on by half a window
                new_offset = offset + self.WINDOW_S / 2
            offset = min(new_offset, max(0.0, duration - 1.0))
            start_word += keep
            if windows > 4 * len(words) + 10:
                raise TimingError("whisper alignment did not progress through the audio")
        spans = np.clip(spans, 0.0, duration)
        spans[:, 1] = np.maximum(spans[:, 1], spans[:, 0])
        if self.refine:
            spans = refine_with_energy(spans, wave)
        return Timings(spans, "forced:whisper", info={"windows": windows})


class CTCAligner(Aligner):
    """wav2vec2-CTC character emissions + `ctc_viterbi` (any transformers *ForCTC model with a character vocabulary)."""

    name = "wav2vec2"
    CHUNK_S = 30.0

    def __init__(self, model: str | None = None, device: str = "auto"):
        import torch

        from sertool.features.hub import quiet_transformers, resolve_model
        from sertool.utils import pick_device

        if not model:
            raise TimingError(
                "the wav2vec2 aligner needs --align-model (a wav2vec2-CTC directory or hub id, "
                "e.g. facebook/wav2vec2-base-960h)"
            )
        self.resolved = resolve_model(model, option="--align-model")
        from transformers import AutoFeatureExtractor, AutoModelForCTC, AutoTokenizer

        path = str(self.resolved.path)
        self.device = str(pick_device(device))
        try:
            with quiet_transformers():
                self.feature_extractor = AutoFeatureExtractor.from_pretrained(path, local_files_only=True)
                self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
                self.model = AutoModelForCTC.from_pretrained(path, local_files_only=True).eval().to(self.device)
        except Exception as e:  # noqa: BLE001
            raise TimingError(f"cannot load a CTC model from {path} ({type(e).__name__}: {e})") from None
        self.model_name = str(model)
        self.vocab = self.tokenizer.get_vocab()
        self.blank = int(
            self.model.config.pad_token_id
            if self.model.config.pad_token_id is not None
            else self.tokenizer.pad_token_id
        )
        self.delimiter = getattr(self.tokenizer, "word_delimiter_token", "|") or "|"
        letters = [k for k in self.vocab if len(k) == 1 and k.isalpha()]
        self.upper = bool(letters) and sum(k.isupper() for k in letters) > len(letters) / 2
        self.stride = int(np.prod(self.model.config.conv_stride))
        self.torch = torch

    def config(self) -> dict[str, Any]:
        return {"aligner": self.name, "model": self.model_name, "model_path": str(self.resolved.path)}

    def emissions(self, wave: np.ndarray):
        """[T, C] log-probabilities, the audio run in CHUNK_S pieces (frames concatenated)."""
        torch = self.torch
        step = int(self.CHUNK_S * SAMPLE_RATE) // self.stride * self.stride
        out = []
        for s in range(0, len(wave), step):
            piece = np.asarray(wave[s : s + step], np.float32)
            if len(piece) < 400:
                piece = np.pad(piece, (0, 400 - len(piece)))
            inputs = self.feature_extractor(piece, sampling_rate=SAMPLE_RATE, return_tensors="pt")
            with torch.inference_mode():
                logits = self.model(inputs["input_values"].to(self.device)).logits[0]
            out.append(torch.log_softmax(logits.float(), -1).cpu())
        return torch.cat(out, 0)

    def _targets(self, words: Sequence[str]) -> tuple[list[int], list[tuple[int, int]]]:
        ids, ranges = [], []
        delim = self.vocab.get(self.delimiter)
        for w in words:
            chars = [c for c in _plain_word(w)]
            chars = [c.upper() if self.upper else c for c in chars]
            found = [self.vocab[c] for c in chars if c in self.vocab]
            if ids and found and delim is not None:
                ids.append(delim)
            ranges.append((len(ids), len(ids) + len(found)))
            ids.extend(found)
        return ids, ranges

    def align(self, wave: np.ndarray, words: Sequence[str]) -> Timings:
        emissions = self.emissions(wave)
        return align_emissions(
            emissions,
            *self._targets(words),
            frame_s=self.stride / SAMPLE_RATE,
            blank=self.blank,
            duration=len(wave) / SAMPLE_RATE,
            source="forced:wav2vec2",
        )


def align_emissions(
    emissions,
    targets: list[int],
    ranges: list[tuple[int, int]],
    frame_s: float,
    blank: int = 0,
    duration: float | None = None,
    source: str = "forced:wav2vec2",
) -> Timings:
    """Word spans from CTC emissions: `ranges[i]` are word i's positions in `targets` (empty: not alignable)."""
    if not targets:
        raise TimingError("no word of the transcript has characters in the CTC model's vocabulary")
    path = ctc_viterbi(emissions, targets, blank)
    tok = token_spans(path, len(targets))
    spans = np.zeros((len(ranges), 2))
    known = np.zeros(len(ranges), bool)
    for i, (a, b) in enumerate(ranges):
        if b > a:
            spans[i] = tok[a, 0] * frame_s, tok[b - 1, 1] * frame_s
            known[i] = True
    duration = len(path) * frame_s if duration is None else duration
    notes = []
    if not known.all():
        spans = interpolate_missing(spans, known, duration)
        notes.append(f"{int((~known).sum())} word(s) without alignable characters interpolated")
    return Timings(np.clip(spans, 0.0, duration), source, notes=notes)


class PocketsphinxAligner(Aligner):
    """CMU PocketSphinx forced alignment with its packaged en-us model and dictionary."""

    name = "pocketsphinx"

    def __init__(self, model: str | None = None, device: str = "auto"):
        try:
            import pocketsphinx  # noqa: F401
        except ModuleNotFoundError:
            raise TimingError(
                "forced alignment with pocketsphinx needs it installed: pip install pocketsphinx"
            ) from None
        if model:
            raise TimingError("the pocketsphinx aligner uses its packaged en-us model; --align-model is not supported")
        self._decoders: dict[tuple, Any] = {}

    def config(self) -> dict[str, Any]:
        import pocketsphinx

        return {
            "aligner": self.name,
            "model": "pocketsphinx en-us",
            "version": getattr(pocketsphinx, "__version__", "") or _dist_version("pocketsphinx"),
        }

    def _decoder(self, wide: bool):
        from pocketsphinx import Decoder

        if wide not in self._decoders:
            kw = dict(beam=1e-80, wbeam=1e-60, pbeam=1e-80) if wide else {}
            self._decoders[wide] = Decoder(lm=None, loglevel="FATAL", **kw)
        return self._decoders[wide]

    def _run(self, pcm: bytes, text: str, wide: bool):
        d = self._decoder(wide)
        d.set_align_text(text)
        d.start_utt()
        d.process_raw(pcm, full_utt=True)
        d.end_utt()
        segs = d.seg()
        if segs is None:
            return None
        return [(s.word, s.start_frame / 100.0, (s.end_frame + 1) / 100.0) for s in segs]

    def align(self, wave: np.ndarray, words: Sequence[str]) -> Timings:
        plain = [_plain_word(w) for w in words]
        dec = self._decoder(False)
        oov = sorted({p for p in plain if p and dec.lookup_word(p) is None})
        guessed = [p for p in oov if letter_to_sound(p)]
        for wide in (False, True):  # words outside the dictionary: a letter-to-sound guess
            for p in guessed:
                self._decoder(wide).add_word(p, letter_to_sound(p), True)
        known = np.array([bool(p) and (p not in oov or p in guessed) for p in plain])
        if not known.any():
            raise TimingError("pocketsphinx: no word of the transcript can be pronounced")
        # digital silence (exact zeros) breaks Sphinx's features: add noise far below speech
        rng = np.random.default_rng(0)
        wave = np.asarray(wave, np.float32)
        noisy = wave + 1e-4 * rng.standard_normal(len(wave)).astype(np.float32)
        pcm = (np.clip(noisy, -1, 1) * 32767).astype("<i2").tobytes()
        found = None
        for attempt in range(3):
            if attempt == 2:  # last resort: align without the guessed words, place them between neighbours
                if not guessed:
                    break
                known &= np.array([p not in guessed for p in plain])
                guessed = []
                if not known.any():
                    break
            text = " ".join(p for p, k in zip(plain, known) if k)
            segs = self._run(pcm, text, wide=attempt >= 1)
            got = [s for s in (segs or []) if not s[0].startswith(("<", "[", "+"))]
            if len(got) == int(known.sum()):
                found = got
                break
        if found is None:
            raise TimingError("pocketsphinx could not align the transcript to the audio")
        duration = len(wave) / SAMPLE_RATE
        spans = np.zeros((len(words), 2))
        spans[known] = [[s, e] for _, s, e in found]
        notes = []
        n_guessed = sum(1 for p, k in zip(plain, known) if k and p in guessed)
        if n_guessed:
            notes.append(f"{n_guessed} word(s) not in the dictionary pronounced by a letter-to-sound guess")
        if not known.all():
            spans = interpolate_missing(spans, known, duration)
            notes.append(f"{int((~known).sum())} word(s) not aligned (not pronounceable), interpolated")
        return Timings(np.clip(spans, 0.0, duration), "forced:pocketsphinx", notes=notes)


_DIGRAPHS = {
    "tch": "CH",
    "sch": "S K",
    "th": "TH",
    "sh": "SH",
    "ch": "CH",
    "ph": "F",
    "ng": "NG",
    "ck": "K",
    "wh": "W",
    "qu": "K W",
    "ee": "IY",
    "ea": "IY",
    "oo": "UW",
    "ou": "AW",
    "ow": "OW",
    "ai": "EY",
    "ay": "EY",
    "oi": "OY",
    "oy": "OY",
    "au": "AO",
    "aw": "AO",
    "er": "ER",
    "ir": "ER",
    "ur": "ER",
    "ar": "AA R",
    "or": "AO R",
}
_LETTERS = {
    "a": "AE",
    "b": "B",
    "c": "K",
    "d": "D",
    "e": "EH",
    "f": "F",
    "g": "G",
    "h": "HH",
    "i": "IH",
    "j": "JH",
    "k": "K",
    "l": "L",
    "m": "M",
    "n": "N",
    "o": "AA",
    "p": "P",
    "q": "K",
    "r": "R",
    "s": "S",
    "t": "T",
    "u": "AH",
    "v": "V",
    "w": "W",
    "x": "K S",
    "y": "Y",
    "z": "Z",
}


def letter_to_sound(word: str) -> str:
    """A rough CMUdict phone string for a word outside the dictionary (spelling rules, no stress):
    enough for the aligner to give the word about the right length. "" when it has no letters."""
    w = re.sub(r"[^a-z]", "", unicodedata.normalize("NFKD", word.lower()))
    out, i = [], 0
    while i < len(w):
        for n in (3, 2):
            if w[i : i + n] in _DIGRAPHS:
                out.append(_DIGRAPHS[w[i : i + n]])
                i += n
                break
        else:
            if not (w[i] == "e" and i == len(w) - 1 and len(w) > 2):  # silent final e
                out.append(_LETTERS[w[i]])
            i += 1
    return " ".join(out)


def _dist_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return ""


class FallbackAligner(Aligner):
    """The default: pocketsphinx first (closer boundaries on continuous speech, about 10x faster),
    Whisper for the utterances it cannot align; Whisper alone when pocketsphinx is
    not installed."""

    name = "auto"

    def __init__(self, model: str | None = None, device: str = "auto", threads: int = 2):
        try:
            self.first: Aligner | None = PocketsphinxAligner(None, device)
        except TimingError:
            self.first = None
        self._model, self._device, self._threads = model, device, threads
        self._second: Aligner | None = (
            None if self.first is not None else WhisperAligner(model, device, cpu_threads=threads)
        )

    def config(self) -> dict[str, Any]:
        chain = [self.first.config()] if self.first is not None else []
        return {"aligner": self.name, "chain": chain + [{"aligner": "whisper", "model": self._model or "tiny.en"}]}

    def align(self, wave: np.ndarray, words: Sequence[str]) -> Timings:
        failed = None
        if self.first is not None:
            try:
                return self.first.align(wave, words)
            except TimingError as e:
                failed = e
        if self._second is None:
            self._second = WhisperAligner(self._model, self._device, cpu_threads=self._threads)
        t = self._second.align(wave, words)
        if failed is not None:
            t.notes.append(f"pocketsphinx failed ({failed}); aligned by whisper")
        return t


def make_aligner(name: str = "auto", model: str | None = None, device: str = "auto", threads: int = 2) -> Aligner:
    """Build a forced aligner by name: auto (pocketsphinx, then whisper where it fails), whisper (default model
    tiny.en; `model` another faster-whisper model), wav2vec2 (needs `model`), pocketsphinx."""
    if name == "auto":
        return FallbackAligner(model, device, threads)
    if name == "whisper":
        return WhisperAligner(model, device, cpu_threads=threads)
    if name == "wav2vec2":
        import torch

        if threads and torch.get_num_threads() > threads:
            torch.set_num_threads(threads)
        return CTCAligner(model, device)
    if name == "pocketsphinx":
        return PocketsphinxAligner(model, device)
    raise ValueError(f"unknown aligner {name!r} (choose {', '.join(ALIGNERS)})")


# ---------------------------------------------------------------------------- ASR timings
class ASRTimer:
    """Word timings from a fresh ASR pass, matched to the transcript's words."""

    def __init__(self, model: str | None = None, device: str = "auto"):
        from sertool.features.asr import DEFAULT_ASR_MODEL, load_asr

        self.model_name = model or DEFAULT_ASR_MODEL
        self.recognise, self.resolved = load_asr(self.model_name, device)

    def config(self) -> dict[str, Any]:
        return {"asr_model": self.model_name, "asr_model_path": str(self.resolved.path)}

    def timings(self, wave: np.ndarray, words: Sequence[str]) -> Timings:
        import difflib

        _text, hyp = self.recognise(wave)
        if not hyp:
            raise TimingError("asr: the recogniser found no words")
        ref = [_plain_word(w) for w in words]
        got = [_plain_word(h[0]) for h in hyp]
        spans = np.zeros((len(words), 2))
        known = np.zeros(len(words), bool)
        for block in difflib.SequenceMatcher(a=ref, b=got, autojunk=False).get_matching_blocks():
            for k in range(block.size):
                h = hyp[block.b + k]
                spans[block.a + k] = (float(h[1]), float(h[2]))
                known[block.a + k] = True
        if known.sum() < 0.5 * len(words):
            raise TimingError(f"asr: only {int(known.sum())} of {len(words)} transcript words were recognised")
        notes = []
        if not known.all():
            spans = interpolate_missing(spans, known, len(wave) / SAMPLE_RATE)
            notes.append(f"{int((~known).sum())} word(s) not recognised, interpolated")
        return Timings(spans, "asr", approximate=False, notes=notes)


# ---------------------------------------------------------------------------- test speech
def synthesize_speech(
    words: Sequence[str],
    *,
    voice: str = "en-us",
    speed: int = 160,
    pause_s: tuple[float, float] = (0.05, 0.25),
    noise: float = 1e-3,
    seed: int = 0,
    sample_rate: int = SAMPLE_RATE,
) -> tuple[np.ndarray, np.ndarray]:
    """Speech with exact word boundaries: each word spoken alone by espeak-ng, trimmed to its
    non-silent samples and joined with random pauses; returns (wave, [n_words, 2] spans in s).

    The speech starts after 0.2 s of silence and ends with 0.3 s; `pause_s=(0, 0)` joins the
    words with no pause between them. A little noise (`noise`, peak-relative 1e-3)
    keeps the pauses from being digital silence, as in real recordings.
    """
    exe = shutil.which("espeak-ng") or shutil.which("espeak")
    if exe is None:
        raise RuntimeError("espeak-ng is not installed (apt-get install espeak-ng)")
    import soundfile as sf
    import soxr

    rng = np.random.default_rng(seed)
    lead = int(0.2 * sample_rate)  # recordings start with a little silence
    pieces, spans, t = [np.zeros(lead, np.float32)], [], lead
    for word in words:
        raw = subprocess.run(
            [exe, "-v", voice, "-s", str(speed), "--stdout", str(word)], capture_output=True, check=True
        ).stdout
        x, sr = sf.read(io.BytesIO(raw), dtype="float32")
        if x.ndim > 1:
            x = x.mean(1)
        if sr != sample_rate:
            x = soxr.resample(x, sr, sample_rate).astype(np.float32)
        on = np.flatnonzero(np.abs(x) > 1e-3 * max(1e-9, float(np.abs(x).max())))
        x = x[on[0] : on[-1] + 1] if len(on) else x
        gap = int(round(rng.uniform(*pause_s) * sample_rate)) if pause_s[1] > 0 else 0
        if gap:
            pieces.append(np.zeros(gap, np.float32))
        t += gap
        spans.append((t / sample_rate, (t + len(x)) / sample_rate))
        pieces.append(x)
        t += len(x)
    pieces.append(np.zeros(int(0.3 * sample_rate), np.float32))
    wave = np.concatenate(pieces)
    if noise:
        wave = wave + noise * float(np.abs(wave).max()) * rng.standard_normal(len(wave)).astype(np.float32)
    return wave.astype(np.float32), np.asarray(spans, np.float64)
