"""The predict stage: a trained experiment + a folder of recordings -> a table of predictions.

    report = run_predict("exp/rav-probe", "recordings/", "predictions.csv")
    report = run_predict(None, "recordings/", "-")          # the packaged default model
    report = run_predict("ravdess-mfcc", "recordings/", "p.csv", speaker_from="parent", plot="plots/")

1. Load the predictor of EXP (``EXP/predictor.json`` + ``model.safetensors`` +
   ``norm.safetensors``, written by ``sertool train``), of a packaged model named by EXP
   (``sertool/pretrained/NAME``), or of the default packaged model (``pretrained/DEFAULT``) when
   EXP is None.  The features each input was trained on are rebuilt from the
   provenance recorded in the feature stores (``features.<modality>.extractor``: extractor name
   and every parameter, model checksums included), so the same extractors run here, and the
   training split's normalisation statistics are applied.  A model that reads its input raw
   (``data.audio: wave``, ``data.text: tokenizer:MODEL``: whisper_ft, text_ft) gets a reader
   instead (:class:`WaveReader`, :class:`TokenReader`) that reads it as the train stage does.
2. Scan the input: a folder (recursively: wav, flac, mp3, ogg, opus, aiff) or one file.
3. Text, for models with a text input, per file, in this order: ``--transcripts FILE`` (csv/tsv,
   columns ``file`` and ``text``), a sidecar ``.txt`` next to the audio, ``--asr MODEL``.  A text
   model without any of them fails at once, naming the three.  The ``text_source`` column says
   which was used.  ASR decodes greedily by default (``asr_beam=1``, the fastest; the extract
   stage keeps beam 5) and asks for word timestamps only for files longer than ``window``
   (their segments get the words that start in them); ``PredictReport.asr`` records the settings.
4. Per file: load (mono, resampled to each extractor's rate), cut files longer than ``window``
   seconds at their speech (``vad``, sertool.segment; ``"off"``: equal segments no longer than
   the window), compute the features, normalise, pad, predict in batches (CUDA when
   available), and average the segments' probabilities (or scores), weighted by their speech
   time, into the file's prediction; its label is the class of the most speech time.
   Probabilities are softmax(logits / T), T = predictor.json ``temperature`` (calibration).
   With ``speaker_from`` (models trained with ``data.normalize.<m>=speaker``) files go by
   speaker group, normalised with the group's own statistics (see ``_predict_by_speaker``).
5. Rows are written and flushed as each file is finished, so an interrupted run keeps what it
   did; ``resume=True`` reads the output back, drops a half-written last line and skips the
   files it already holds (error rows included).  A file that cannot be processed gets a row
   with the ``error`` column filled and the run goes on; the report counts them (the CLI exits
   with status 3 when any file failed, as ``sertool extract`` does, and prints their number last
   on stderr; 1 = a fatal error before any prediction, 2 = a usage error).
   ``OUT.model.json`` beside the output records which model writes it (experiment folder,
   checksums of its weights and normalisation statistics); ``resume=True`` with another model is
   refused, naming both.  One run at a time writes an output file: a second one is refused at
   once, naming the first (sertool.locks).

Output columns: ``file, duration, label, p_<class>..., uncertain`` (``score`` for regression
models), ``n_segments, text, text_source, error``; with ``segments=True`` also ``segment, start,
end``, one row per segment before the file's row (whose ``segment`` is empty); with
``speaker_from`` also ``speaker, normalization`` (before ``error``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from sertool.audio import AudioError, audio_info, load_audio
from sertool.corpora.base import AUDIO_EXTENSIONS, Utterance
from sertool.locks import locking
from sertool.utils import pick_device, show_bar, write_json
from sertool.weights import load_tensors

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained"
# pretrained/DEFAULT names the folder `sertool predict WAV_DIR` uses; the MFCC model when it is missing
FALLBACK_DEFAULT_MODEL = "ravdess-mfcc"
DEFAULT_WINDOW_S = 30.0
EXIT_SOME_FAILED = 3  # as sertool extract: some files failed (1 = fatal error, 2 = usage error)
TEXT_OPTIONS = (
    "--transcripts FILE.tsv|csv (columns file, text)",
    "a sidecar .txt file next to each audio file",
    "--asr tiny.en (the packaged faster-whisper model, offline)",
)


# ----------------------------------------------------------------------------------- packaged models
def default_model_name() -> str:
    """The packaged model ``sertool predict WAV_DIR`` uses: the folder named in pretrained/DEFAULT."""
    try:
        name = (PRETRAINED_DIR / "DEFAULT").read_text(encoding="utf-8").strip()
    except OSError:
        return FALLBACK_DEFAULT_MODEL
    return name or FALLBACK_DEFAULT_MODEL


def packaged_models() -> list[str]:
    """Names of the model folders shipped in sertool/pretrained (those with a predictor.json)."""
    if not PRETRAINED_DIR.is_dir():
        return []
    return sorted(p.name for p in PRETRAINED_DIR.iterdir() if (p / "predictor.json").is_file())


def resolve_model(model: str | os.PathLike | None) -> tuple[Path, bool]:
    """(folder, packaged?) of ``--model``/EXP: None = the default packaged model; an existing
    folder is an experiment (it wins over a packaged model of the same name); else a packaged name."""
    if model is None:
        return PRETRAINED_DIR / default_model_name(), True
    path = Path(model)
    if path.exists():
        return path, False
    name = str(model)
    if "/" not in name and os.sep not in name and (PRETRAINED_DIR / name / "predictor.json").is_file():
        return PRETRAINED_DIR / name, True
    return path, False


DEFAULT_MODEL_DIR = resolve_model(None)[0]

CARD_KEYS = ("summary", "features", "ua_cv", "ua_cv_8khz", "ua_cv_snr10", "ece_before", "ece_after", "x_real_time")


def model_cards() -> list[dict]:
    """One dict per packaged model: ``name``, ``default`` and the keys of its optional card.json
    (missing keys are None)."""
    default = default_model_name()
    cards = []
    for name in packaged_models():
        card: dict = {}
        card_file = PRETRAINED_DIR / name / "card.json"
        if card_file.is_file():
            try:
                loaded = json.loads(card_file.read_text(encoding="utf-8"))
                card = loaded if isinstance(loaded, dict) else {}
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                card = {}
        cards.append({"name": name, "default": name == default, **{k: card.get(k) for k in (*CARD_KEYS, "command")}})
    return cards


def format_model_cards(cards: list[dict]) -> str:
    """The ``--list-models`` table: one row per packaged model, then how each was measured."""

    def num(v, digits=3):
        return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "\u2014"

    def txt(v):
        return str(v) if v not in (None, "") else "\u2014"

    head = ["model", "features", "UA (6-fold CV)", "UA 8 kHz", "UA 10 dB SNR", "ECE before/after", "x real time"]
    rows = []
    for c in cards:
        rows.append(
            [
                c["name"] + (" (default)" if c["default"] else ""),
                txt(c["features"]),
                num(c["ua_cv"]),
                num(c["ua_cv_8khz"]),
                num(c["ua_cv_snr10"]),
                f"{num(c['ece_before'])} / {num(c['ece_after'])}",
                num(c["x_real_time"], 0),
            ]
        )
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [head, *rows]]
    for c in cards:
        lines.append(f"{c['name']}: {txt(c['summary'])}; measured by: {txt(c['command'])}")
    return "\n".join(lines)


class PredictError(ValueError):
    """An experiment or input that cannot be used for prediction (raised before any file is done)."""


class ASRUnavailable(PredictError):
    """--asr names a model that cannot be loaded: one error for the run, not one per file."""


# Shorter clips get an error row, not a label: a 0.05 s or one-sample clip holds no emotion to hear,
# yet a model still gives it a confident class (its features are a few frames of onset).  A model
# may ask for more (predictor.json ``min_clip_s``), never less.
MIN_CLIP_S = 0.25
# Rows whose top probability is below this get uncertain=true.  With calibrated probabilities
# (predictor.json ``temperature``) a top probability p is right about a fraction p of the time, so
# below 0.4 such a label is wrong more often than not by a wide margin (3 times out of 5); for the 8
# RAVDESS classes (chance 0.125) 0.4 is still 3x chance, so confident rows are not flagged.
DEFAULT_UNCERTAIN_BELOW = 0.4


# ----------------------------------------------------------------------------------- predictor
@dataclass
class Predictor:
    """A trained model with the extractors and normalisation statistics of its features."""

    path: Path
    spec: dict  # predictor.json
    model: Any  # torch.nn.Module, eval mode, on `device`
    stats: dict[str, tuple[np.ndarray, np.ndarray]]  # modality -> (mean, std)
    extractors: dict[str, Any]  # modality -> Extractor
    device: Any

    @property
    def modalities(self) -> list[str]:
        return list(self.extractors)

    @property
    def regression(self) -> bool:
        return self.spec.get("task") == "regression"

    @property
    def classes(self) -> list[str]:
        return list(self.spec.get("classes") or [])

    @property
    def text_modalities(self) -> list[str]:
        return [m for m, ex in self.extractors.items() if ex.needs_text]

    @property
    def temperature(self) -> float:
        """Calibration temperature: probabilities are softmax(logits / T) (1.0 = none fitted)."""
        return float(self.spec.get("temperature", 1.0))

    @property
    def min_clip_s(self) -> float:
        return max(MIN_CLIP_S, float(self.spec.get("min_clip_s") or 0.0))

    @property
    def speaker_modalities(self) -> list[str]:
        """Inputs trained with per-speaker normalisation (data.normalize.<m>=speaker)."""
        return [
            m
            for m, mode in (self.spec.get("normalize") or {}).items()
            if mode == "speaker" and m in self.extractors and not getattr(self.extractors[m], "raw", False)
        ]

    @property
    def crop(self) -> dict[str, int]:
        return {m: int(v) for m, v in (self.spec.get("max_steps") or {}).items() if v}

    @property
    def longest_wave_s(self) -> float | None:
        """A raw waveform input's longest segment in seconds (its ``max_steps``: the Whisper
        encoder's 30 s window for whisper_ft); None when the model has none."""
        spans = [
            self.crop[m] / ex.sample_rate
            for m, ex in self.extractors.items()
            if isinstance(ex, WaveReader) and self.crop.get(m)
        ]
        return min(spans) if spans else None

    def output_columns(self) -> list[str]:
        return ["score"] if self.regression else ["label", *[f"p_{c}" for c in self.classes], "uncertain"]

    def predict_features(self, items: list[dict[str, np.ndarray]]) -> np.ndarray:
        """Raw features (one dict modality -> [T, D] per item; [T] waveform samples or token ids for
        a model's raw input) -> probabilities [N, C] or scores [N]."""
        import torch

        batch = collate(items, self.stats, self.crop)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with torch.inference_mode():
            out = self.model(batch)
        return outputs_to_probabilities(out, self.spec)


def outputs_to_probabilities(out, spec: dict) -> np.ndarray:
    """Model outputs -> class probabilities [N, C] (or scores [N] for regression): softmax of the
    logits divided by the calibration temperature (an nll model's log-probabilities are logits too)."""
    out = out.float()
    if spec.get("task") == "regression":
        return out.reshape(-1).cpu().numpy()
    temperature = float(spec.get("temperature", 1.0))
    if temperature != 1.0:
        probs = (out / temperature).softmax(-1)
    else:
        probs = out.exp() if spec.get("loss") == "nll" else out.softmax(-1)
    return probs.cpu().numpy()


def collate(
    items: list[dict[str, np.ndarray]],
    stats: dict[str, tuple[np.ndarray, np.ndarray]],
    crop: dict[str, int] | None = None,
) -> dict:
    """The batch the models take, exactly as training built it (sertool.data.SERDataset.collate):
    the first ``crop[m]`` steps, zero padding, ``<m>_mask`` (True = real frame), then
    ``(x - mean) / std`` from the training split and padding set back to zero.  A raw input
    (1-d items: waveform samples, token ids) gives ``[B, T]`` of its own dtype, not normalised."""
    import torch

    crop = crop or {}
    batch: dict = {}
    for m in items[0]:
        xs = [x[: crop[m]] if crop.get(m) else x for x in (it[m] for it in items)]
        lens = np.array([len(x) for x in xs], dtype=np.int64)
        T = int(lens.max())
        shape = (len(xs), T) if xs[0].ndim == 1 else (len(xs), T, int(xs[0].shape[1]))
        arr = np.zeros(shape, dtype=np.float32 if xs[0].ndim == 2 else xs[0].dtype)
        for b, x in enumerate(xs):
            arr[b, : lens[b]] = x
        xt = torch.from_numpy(arr)
        mask = torch.from_numpy(np.arange(T)[None, :] < lens[:, None])
        if m in stats and arr.ndim == 3:
            mu, sd = stats[m]
            xt = (xt - torch.from_numpy(np.asarray(mu, np.float32))) / torch.from_numpy(np.asarray(sd, np.float32))
            xt = xt * mask[..., None]
        batch[m] = xt
        batch[f"{m}_mask"] = mask
    return batch


def read_predictor_spec(exp: str | os.PathLike | None, speaker_adaptive: bool = False) -> tuple[Path, dict]:
    """(directory, predictor.json content) of EXP (an experiment folder or a packaged model's
    name), or of the packaged default model.  A model trained with per-speaker normalisation is
    refused unless ``speaker_adaptive`` (predict --speaker-from, export)."""
    path, packaged = resolve_model(exp)
    spec_file = path / "predictor.json"
    if not path.is_dir():
        if exp is None:
            raise PredictError(
                f"the default model is missing from this installation ({path}); "
                "reinstall sertool or give an experiment folder: sertool predict EXP WAV_DIR"
            )
        if "/" not in str(exp) and not packaged:
            raise PredictError(
                f"{exp}: neither an experiment folder nor a packaged model "
                f"({', '.join(packaged_models()) or 'none installed'}; see sertool predict --list-models)"
            )
        raise PredictError(f"{path}: not an experiment folder (give the -o folder of `sertool train`)")
    if not spec_file.exists():
        if (path / "config.yaml").exists():
            raise PredictError(
                f"{path} has no predictor.json: its training has not finished (continue it with "
                f"`sertool train ... -o {path} --resume`)"
            )
        raise PredictError(f"{path} is not an experiment folder: no predictor.json (train one with `sertool train`)")
    try:
        spec = json.loads(spec_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PredictError(f"{spec_file}: unreadable ({e})") from None
    if spec.get("format") != "sertool-predictor":
        raise PredictError(f"{spec_file}: not a sertool predictor file (format {spec.get('format')!r})")
    if spec.get("version") != 1:
        raise PredictError(
            f"{spec_file}: predictor version {spec.get('version')!r} is not supported by this sertool (reads version 1)"
        )
    classes = spec.get("classes", [])
    if not isinstance(classes, list) or not all(isinstance(c, str) and c for c in classes):
        raise PredictError(f"{spec_file}: 'classes' must be a list of class names, got {classes!r}")
    temperature = spec.get("temperature", 1.0)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise PredictError(f"{spec_file}: 'temperature' must be a number > 0, got {temperature!r}")
    min_clip = spec.get("min_clip_s", 0.0)
    if isinstance(min_clip, bool) or not isinstance(min_clip, (int, float)) or not 0 <= min_clip < math.inf:
        raise PredictError(f"{spec_file}: 'min_clip_s' must be a number of seconds >= 0, got {min_clip!r}")
    speaker_norm = [m for m, mode in (spec.get("normalize") or {}).items() if mode == "speaker"]
    if speaker_norm and not speaker_adaptive:
        raise PredictError(
            f"{path} was trained with speaker-level normalisation (data.normalize.{speaker_norm[0]}="
            "speaker): its inputs need the statistics of each speaker's recordings; say who speaks in "
            "each file with --speaker-from parent|csv:FILE|regex:PATTERN, or train with data.normalize."
            f"{speaker_norm[0]}=global"
        )
    for key in ("model", "normalizer"):  # files from others never point outside their folder
        name = spec.get(key)
        if name is not None and (
            not isinstance(name, str)
            or os.path.isabs(name)
            or not (path / name).resolve().is_relative_to(path.resolve())
        ):
            raise PredictError(f"{spec_file}: {key!r} must name a file inside the experiment folder, got {name!r}")
    return path, spec


def load_predictor(
    exp: str | os.PathLike | None = None, device: str = "auto", speaker_adaptive: bool = False
) -> Predictor:
    """Model, normalisation statistics and the rebuilt feature extractors of EXP (None = default)."""
    path, spec = read_predictor_spec(exp, speaker_adaptive)
    model, stats = load_model(path, spec, device)
    dev = pick_device(device)
    extractors = build_extractors(spec, device=str(dev), where=path)
    return Predictor(path, spec, model, stats, extractors, dev)


def load_model(path: Path, spec: dict, device: str = "auto"):
    """(model in eval mode on `device`, {modality: (mean, std)}) from the files predictor.json names."""

    from sertool.models import build_model

    dev = pick_device(device)
    weights = path / spec.get("model", "model.safetensors")
    norm_file = path / spec.get("normalizer", "norm.safetensors")
    for f in (weights, norm_file):
        if not f.exists():
            raise PredictError(f"{f} is missing: the experiment folder is incomplete")
    try:
        model = build_model({"model": dict(spec["model_config"])})
        model.load_state_dict(load_tensors(weights))
    except (KeyError, RuntimeError, ValueError) as e:
        raise PredictError(
            f"{weights}: cannot rebuild the model ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
        ) from None
    model.eval().to(dev)
    tensors = load_tensors(norm_file)
    stats = {
        k[: -len(".mean")]: (tensors[k].numpy(), tensors[k[: -len(".mean")] + ".std"].numpy())
        for k in tensors
        if k.endswith(".mean")
    }
    return model, stats


def _recorded_vocab(exp: Path | str) -> list[str] | None:
    """``data.vocab`` of EXP/config.yaml: where experiments made before predictor.json held it keep it."""
    import yaml

    path = Path(exp) / "config.yaml"
    if not path.is_file():
        return None
    try:
        return (yaml.safe_load(path.read_text()).get("data") or {}).get("vocab")
    except (OSError, yaml.YAMLError, AttributeError):
        return None


def build_extractors(spec: dict, device: str = "cpu", where: Path | str = "EXP") -> dict[str, Any]:
    """One extractor per model input, rebuilt from the recorded provenance, checked against its dim."""
    from sertool.features.base import ExtractorError

    inputs = spec.get("inputs") or {}
    features = spec.get("features") or {}
    extractors = {}
    for modality in inputs or features:
        prov = features.get(modality) or {}
        config = prov.get("extractor")
        if prov.get("source") is not None:  # a raw input read from the manifest (waveform, token ids)
            name = str(inputs.get(modality) or prov.get("feature"))
            vocab = spec.get("vocab") or _recorded_vocab(where)
            extractors[modality] = raw_reader(modality, name, prov, where, vocab=vocab, device=device)
            continue
        if not isinstance(config, dict) or "name" not in config:
            raise PredictError(
                f"{where}: the {modality} features ({prov.get('feature') or inputs.get(modality)!r}) were not made by "
                f"a sertool extractor (no recorded extractor: aligned files and imported CMU .csd features cannot be "
                f"recomputed for new audio); train on features from `sertool extract` to predict"
            )
        try:
            ex = _build_extractor(config, device)
        except ExtractorError as e:
            raise PredictError(
                f"{where}: cannot rebuild the {modality} feature extractor {config['name']!r}: {e}"
            ) from None
        want = prov.get("dim")
        have = ex.file_attrs().get("dim") if want is not None else None
        if want is not None and have is not None and int(want) != int(have):
            raise PredictError(
                f"{where}: the rebuilt {modality} extractor {config['name']!r} gives {have}-d features, "
                f"the model was trained on {want}-d ones"
            )
        extractors[modality] = ex
    if not extractors:
        raise PredictError(f"{where}: predictor.json names no model inputs")
    return extractors


class WaveReader:
    """``data.audio: wave`` at predict time: each segment's samples at the training rate (16 kHz),
    z-normalised on their own as :class:`sertool.data.WaveSource` reads an utterance
    (:func:`sertool.data.standardize_wave`).  Quacks like an extractor for ``_features``."""

    kind, needs_audio, needs_text, batched, raw, dtype = "audio", True, False, False, True, np.float32

    def __init__(self, sample_rate: int = 16000):
        self.sample_rate = int(sample_rate)

    def params(self) -> dict:
        return {"sample_rate": self.sample_rate, "normalize": "per-utterance z-score"}

    def file_attrs(self) -> dict:
        return {"dim": 0}

    def extract(self, utt: Utterance, wave: np.ndarray):
        from sertool.data import standardize_wave
        from sertool.features.base import FeatureResult

        return FeatureResult(standardize_wave(wave), {})


class TokenReader:
    """``data.text: tokenizer:MODEL`` at predict time: the token ids of each segment's transcript
    from the same tokenizer and limit as :class:`sertool.data.TokenSource` (:func:`sertool.data.token_ids`)."""

    kind, needs_audio, needs_text, batched, raw, dtype = "text", False, True, False, True, np.int64
    sample_rate = None

    def __init__(self, target: str):
        from sertool.data import load_tokenizer

        self.target = target
        self.tokenizer, self.limit, self.resolved = load_tokenizer(target)

    def params(self) -> dict:
        return {"tokenizer": self.target, "path": str(self.resolved.path), "limit": self.limit}

    def file_attrs(self) -> dict:
        return {"dim": 0}

    def extract(self, utt: Utterance, wave=None):
        from sertool.data import token_ids
        from sertool.features.base import FeatureResult

        return FeatureResult(token_ids(self.tokenizer, utt.text, self.limit)[0], {})


class StoreTokenReader:
    """``data.text: tokens:STORE`` at predict time (a CMD student distilled from a cached text
    teacher): the store's extractor, rebuilt from its record, tokenises each segment's transcript
    as it did the corpus's (the ``tokens`` it records), and each token becomes its id in the
    training vocabulary (0 padding, 1 unknown), as :class:`sertool.data.TokenSource` reads them."""

    kind, needs_audio, needs_text, batched, raw, dtype = "text", False, True, False, True, np.int64
    sample_rate = None

    def __init__(self, extractor, vocab: list[str]):
        self.extractor = extractor
        self.index = {tok: i for i, tok in enumerate(vocab)}

    def params(self) -> dict:
        return {"tokens_of": self.extractor.config(), "vocab_size": len(self.index)}

    def file_attrs(self) -> dict:
        return {"dim": 0}

    def extract(self, utt: Utterance, wave=None):
        from sertool.features.base import FeatureResult

        tokens = self.extractor.extract(utt, None).attrs.get("tokens")
        if tokens is None:
            raise PredictError(f"the text extractor {self.extractor.name!r} records no tokens")
        tokens = [t.decode() if isinstance(t, bytes) else str(t) for t in tokens]
        return FeatureResult(np.asarray([self.index.get(t, 1) for t in tokens], np.int64), {})


def raw_reader(
    modality: str, name: str, prov: dict, where: Path | str = "EXP", vocab: list[str] | None = None, device="cpu"
):
    """The reader of a raw model input (``data.<m>: wave``, ``tokenizer:MODEL`` or ``tokens:STORE``),
    rebuilt from its recorded name (and, for ``tokens:STORE``, the store's recorded extractor and the
    training vocabulary); PredictError for one predict cannot rebuild."""
    if name.startswith("tokens:") and modality == "text" and isinstance(prov.get("extractor"), dict):
        if not vocab:
            raise PredictError(
                f"{where}: the model reads token ids of {name!r} over a training vocabulary that its "
                "predictor.json does not hold (made before sertool recorded it); train it again to predict"
            )
        from sertool.features.base import ExtractorError

        try:
            return StoreTokenReader(_build_extractor(prov["extractor"], device), vocab)
        except ExtractorError as e:
            raise PredictError(f"{where}: cannot rebuild the tokens of {name!r}: {e}") from None
    if name == "wave" and modality == "audio":
        return WaveReader(int(float(prov.get("frame_rate_hz") or 16000)))
    if name.startswith("tokenizer:") and modality == "text":
        try:
            return TokenReader(name.partition(":")[2])
        except Exception as e:  # noqa: BLE001 - a missing or unreadable tokenizer folder
            first = (str(e).splitlines() or [type(e).__name__])[0]
            raise PredictError(f"{where}: cannot load the {modality} tokenizer of {name!r}: {first}") from None
    raise PredictError(
        f"{where}: the model reads its {modality} input raw ({name!r}, from {prov.get('source')}); "
        "`sertool predict` rebuilds waveforms (data.audio: wave) and tokenizer ids (data.text: tokenizer:MODEL) "
        "only, so evaluate this experiment with `sertool evaluate`"
    )


def _build_extractor(config: dict, device: str):
    """Rebuild a recorded extractor, on `device` when it takes one (the registry imports only
    the extractor module it needs, so start-up stays short)."""
    from sertool.features import base

    cls, _ = base.resolve(config["name"])
    return base.build_extractor(
        config, {param: device for option, param in cls.cli_options.items() if option == "device"}
    )


# ----------------------------------------------------------------------------------- inputs
def find_inputs(path: str | os.PathLike, problems: list[tuple[str, str]] | None = None) -> list[Path]:
    """Audio files under a folder (recursive, sorted; symlinked folders followed as by the folder
    corpus reader), or the one file given. Unreadable folders and dangling or looping links are
    appended to ``problems``."""
    from sertool.corpora.folder import find_audio

    p = Path(path)
    if p.is_dir():
        return find_audio(p, problems)
    if p.exists():
        return [p]
    raise PredictError(f"{p}: no such file or folder")


def _display(path: Path, root: Path) -> str:
    return str(path) if root == path else str(root / path.relative_to(root))


class Transcripts:
    """``--transcripts FILE``: a csv/tsv table with columns ``file`` and ``text`` (aliases as in the
    folder corpus layout).  ``file`` may be a path relative to WAV_DIR (with or without the
    extension), an absolute path or a bare file name (when unique)."""

    def __init__(self, path: str | os.PathLike, root: Path):
        from sertool.corpora.folder import read_table

        path = Path(path)
        if not path.is_file():
            raise PredictError(f"--transcripts {path}: no such file")
        rows = read_table(path)
        if rows and "text" not in rows[0]:
            raise PredictError(f"--transcripts {path}: needs a 'text' column (found {', '.join(rows[0])})")
        self.path = path
        self.by_key: dict[str, str] = {}
        names: dict[str, list[str]] = {}
        base = root if root.is_dir() else root.parent
        for row in rows:
            key, text = row.get("file", "").replace("\\", "/"), " ".join(row.get("text", "").split())
            if not key:
                continue
            full = Path(key) if os.path.isabs(key) else base / key
            self.by_key[str(full.resolve())] = text
            self.by_key[str(full.resolve().with_suffix(""))] = text
            names.setdefault(Path(key).name, []).append(text)
            names.setdefault(Path(key).stem, []).append(text)
        self.by_name = {k: v[0] for k, v in names.items() if len(v) == 1}

    def get(self, audio: Path) -> str | None:
        full = audio.resolve()
        for key in (str(full), str(full.with_suffix(""))):
            if key in self.by_key:
                return self.by_key[key]
        return self.by_name.get(audio.name, self.by_name.get(audio.stem))


def sidecar_text(audio: Path) -> str | None:
    side = audio.with_suffix(".txt")
    if not side.is_file():
        return None
    from sertool.corpora.folder import read_text_file

    return read_text_file(side)


# ----------------------------------------------------------------------------------- output
def model_record_of(output: str | os.PathLike) -> Path:
    """``OUT.model.json``: which model wrote the output file ``OUT``."""
    return Path(f"{output}.model.json")


def model_identity(predictor: Predictor, speaker_from: str | None = None) -> dict:
    """The model that writes an output: its experiment folder and the checksums of its weights and
    normalisation statistics (the folder alone would not tell a retrained model from the old one)."""
    from sertool.audio import file_checksum

    spec = predictor.spec
    return {
        "experiment": str(predictor.path.resolve()),
        "weights": file_checksum(predictor.path / spec.get("model", "model.safetensors")),
        "normalizer": file_checksum(predictor.path / spec.get("normalizer", "norm.safetensors")),
        "classes": predictor.classes,
        "speaker_from": speaker_from,  # the speaker groups decide the statistics of speaker-normalised inputs
    }


def _short(checksum) -> str:
    algorithm, _, digest = str(checksum).partition(":")
    return f"{algorithm}:{digest[:12]}" if digest else str(checksum)


def _csv_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):  # as JSON writes them
        return "true" if value else "false"
    return value


class Output:
    """Rows to CSV or JSON Lines (a file or stdout), written and flushed one file at a time."""

    def __init__(
        self,
        target: str | os.PathLike,
        columns: list[str],
        fmt: str | None = None,
        *,
        resume: bool = False,
        overwrite: bool = False,
        model: dict | None = None,
    ):
        self.target = str(target)
        self.stdout = self.target == "-"
        self.fmt = fmt or ("jsonl" if self.target.lower().endswith((".jsonl", ".json", ".ndjson")) else "csv")
        if self.fmt not in ("csv", "jsonl"):
            raise PredictError(f"output format {self.fmt!r}: use csv or jsonl")
        self.columns = columns
        self.done: set[str] = set()
        self.n_resumed_errors = 0
        if self.stdout:
            if resume:
                raise PredictError("--resume needs an output file (-o FILE), not stdout")
            self.f = sys.stdout
            self._header()
            return
        path = Path(self.target)
        if path.exists() and path.stat().st_size > 0 and not (resume or overwrite):
            raise PredictError(f"{path} already exists; use --resume to continue it or --overwrite to replace it")
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.exists():
            self._check_model(path, model)
            keep = self._read_back(path)
            with open(path, "r+b") as f:
                f.truncate(keep)
            self.f = open(path, "a", encoding="utf-8", newline="")
            if keep == 0:
                self._header()
        else:
            self.f = open(path, "w", encoding="utf-8", newline="")
            self._header()
        if model is not None:
            write_json(model_record_of(path), {"format": "sertool-predictions-model", "version": 1, **model})

    @staticmethod
    def _check_model(path: Path, model: dict | None) -> None:
        """Refuse to resume an output written by another model (an output of an older sertool,
        without the record, cannot be checked)."""
        record = model_record_of(path)
        if model is None or not record.exists():
            return
        try:
            old = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise PredictError(
                f"--resume: {record} is unreadable ({e}); use another output file or --overwrite"
            ) from None
        if not isinstance(old, dict):
            old = {}
        if "speaker_from" in old and old["speaker_from"] != model.get("speaker_from"):
            raise PredictError(
                f"--resume: {path} was written with --speaker-from {old['speaker_from']}, this run uses "
                f"{model.get('speaker_from')} (other speaker groups, other statistics); use the same option, "
                "another output file or --overwrite"
            )
        if (old.get("weights"), old.get("normalizer")) != (model["weights"], model["normalizer"]):
            raise PredictError(
                f"--resume: {path} was written by the model in {old.get('experiment')} (weights "
                f"{_short(old.get('weights'))}), this run's model is {model['experiment']} (weights "
                f"{_short(model['weights'])}); use another output file or --overwrite"
            )

    def _header(self) -> None:
        if self.fmt == "csv":
            self._write_csv([dict(zip(self.columns, self.columns))])

    def _read_back(self, path: Path) -> int:
        """Files already finished in `path`; returns the byte offset after the last finished file."""
        data = path.read_bytes()
        offset, keep = 0, 0
        header_ok = self.fmt == "jsonl"
        for line in data.splitlines(keepends=True):
            end = offset + len(line)
            offset = end
            if not line.endswith(b"\n"):
                break  # half-written last line of an interrupted run
            text = line.decode("utf-8", errors="replace").rstrip("\r\n")
            if self.fmt == "csv":
                fields = next(csv.reader([text]))
                if not header_ok:
                    if fields != self.columns:
                        raise PredictError(
                            f"--resume: {path} has the columns {fields}, this run writes "
                            f"{self.columns} (another model or --segments / --speaker-from setting, or "
                            "an output of an older sertool, before the uncertain and normalization "
                            "columns); use another output file or --overwrite"
                        )
                    header_ok, keep = True, end
                    continue
                if len(fields) != len(self.columns):
                    break
                row = dict(zip(self.columns, fields))
            else:
                try:
                    row = json.loads(text)
                except json.JSONDecodeError:
                    break
                if not isinstance(row, dict) or set(row) != set(self.columns):
                    raise PredictError(
                        f"--resume: {path} holds rows with other fields than this run writes "
                        f"({sorted(row) if isinstance(row, dict) else row!r}); use another output "
                        "file or --overwrite"
                    )
            if not row.get("segment"):
                self.done.add(os.path.abspath(row["file"]))
                self.n_resumed_errors += bool(row.get("error"))
                keep = end
        return keep

    def _write_csv(self, rows: list[dict]) -> None:
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for row in rows:
            w.writerow([_csv_value(row.get(c)) for c in self.columns])
        self.f.write(buf.getvalue())

    def write(self, rows: list[dict]) -> None:
        if self.fmt == "csv":
            self._write_csv(rows)
        else:
            self.f.write(
                "".join(json.dumps({c: row.get(c) for c in self.columns}, ensure_ascii=False) + "\n" for row in rows)
            )
        self.f.flush()

    def close(self) -> None:
        if not self.stdout:
            self.f.close()
        else:
            self.f.flush()


# ----------------------------------------------------------------------------------- the stage
@dataclass
class PredictReport:
    output: str
    n_files: int = 0
    n_done: int = 0  # predicted in this run
    n_failed: int = 0  # error rows written in this run
    n_skipped: int = 0  # already in the output (--resume)
    audio_seconds: float = 0.0
    seconds: float = 0.0
    first_prediction_s: float | None = None  # from the start of run_predict to the first row written
    failures: list[tuple[str, str]] = field(default_factory=list)
    asr: dict | None = None  # the ASR model and decoding settings, when --asr transcribed a file

    @property
    def exit_status(self) -> int:
        """0 when every file was predicted, 3 (EXIT_SOME_FAILED) when at least one failed."""
        return EXIT_SOME_FAILED if self.n_failed else 0

    @property
    def real_time_factor(self) -> float:
        """Seconds of audio per second of processing (50 = fifty times faster than real time)."""
        return self.audio_seconds / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _File:
    path: Path
    name: str  # as written in the `file` column
    duration: float | None = None
    text: str = ""
    text_source: str = ""
    words: list | None = None
    segments: list[tuple[float, float]] = field(default_factory=list)
    outputs: list = field(default_factory=list)  # per segment: probabilities / score
    error: str = ""
    done: bool = False  # already in the output (--resume): features only for its speaker's statistics
    features: list | None = None  # per segment {modality: [T, D]}, kept until its speaker group is predicted
    speaker: str = ""
    normalization: str = ""  # --speaker-from: speaker | global-fallback
    wave: np.ndarray | None = None  # --plot: the waveform of a long file, until its picture is drawn
    wave_rate: int = 16000


def segment_bounds(duration: float, window: float) -> list[tuple[float, float]]:
    """Equal segments no longer than `window` (a 70 s file with a 30 s window: 3 x 23.3 s)."""
    if window <= 0 or duration <= window:
        return [(0.0, duration)]
    n = int(math.ceil(duration / window - 1e-9))
    step = duration / n
    return [(round(i * step, 3), round(duration if i == n - 1 else (i + 1) * step, 3)) for i in range(n)]


def _reason(e: BaseException) -> str:
    text = str(e) if isinstance(e, (AudioError, PredictError)) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())[:500]


def _words_in(words: list | None, start: float, end: float) -> list | None:
    if not words:
        return None
    return [[w[0], round(w[1] - start, 3), round(w[2] - start, 3)] for w in words if start <= w[1] < end]


def _segment_text(f: "_File", start: float, end: float) -> str:
    """The recognised words that start in the segment; the whole text without word timings (or
    when no word starts in the segment)."""
    words = _words_in(f.words, start, end)
    return " ".join(str(w[0]) for w in words) if words else f.text


@locking("predict", lambda a: [] if str(a["out"]) == "-" else [a["out"]], hint="wait for it or use another -o")
def run_predict(
    exp: str | os.PathLike | None,
    wav_dir: str | os.PathLike,
    out: str | os.PathLike = "-",
    *,
    transcripts: str | os.PathLike | None = None,
    asr: str | None = None,
    asr_beam: int = 1,
    segments: bool = False,
    window: float = DEFAULT_WINDOW_S,
    batch_size: int = 32,
    device: str = "auto",
    fmt: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = lambda s: print(s, file=sys.stderr),
    threads: int | None = None,
    uncertain_below: float = DEFAULT_UNCERTAIN_BELOW,
    speaker_from: str | None = None,
    vad: str = "energy",
    plot: str | os.PathLike | None = None,
) -> PredictReport:
    t0 = time.perf_counter()
    if threads:  # the model and its extractors run in torch's thread pool; ASR gets it too
        import torch

        torch.set_num_threads(int(threads))
    if window <= 0:
        raise PredictError(f"--window must be > 0 seconds, got {window}")
    if batch_size < 1:
        raise PredictError(f"--batch-size must be >= 1, got {batch_size}")
    from sertool.segment import VADError, resolve_method

    try:
        vad = resolve_method(vad)
    except VADError as e:
        raise PredictError(str(e)) from None
    plot_dir = Path(plot) if plot is not None else None
    if plot_dir is not None:
        plot_dir.mkdir(parents=True, exist_ok=True)
    if not 0 <= uncertain_below <= 1:
        raise PredictError(f"--uncertain-below must be a probability in [0, 1], got {uncertain_below}")
    if int(asr_beam) < 1:
        raise PredictError(f"--asr-beam must be >= 1, got {asr_beam}")
    root = Path(wav_dir)
    skipped: list[tuple[str, str]] = []
    files = find_inputs(root, skipped)  # before loading anything: a wrong path fails at once
    if skipped:
        from sertool.corpora import summarize

        log(f"warning: {len(skipped)} item(s) under {root} skipped: {summarize(skipped)}")
    speaker_map = SpeakerMap(speaker_from, root) if speaker_from else None
    exp_dir, spec = read_predictor_spec(exp, speaker_adaptive=speaker_map is not None)
    table = Transcripts(transcripts, root) if transcripts else None
    # the model's text needs, checked before any model is loaded
    inputs = spec.get("inputs") or spec.get("features") or {}
    text_inputs = [m for m, prov in (spec.get("features") or {}).items() if prov.get("kind") == "text" and m in inputs]
    if text_inputs and table is None and not asr and not any(f.with_suffix(".txt").is_file() for f in files):
        feature = spec["features"][text_inputs[0]].get("feature", text_inputs[0])
        raise PredictError(
            f"the model in {exp_dir} needs the text of each recording (its {text_inputs[0]} input is "
            f"{feature!r} features of the transcript) and no text was given; use one of: " + "; ".join(TEXT_OPTIONS)
        )
    predictor = load_predictor(exp_dir, device, speaker_adaptive=speaker_map is not None)
    needs_text = bool(predictor.text_modalities)
    if speaker_map is not None and not predictor.speaker_modalities:
        log(
            f"warning: --speaker-from {speaker_from} ignored: the model in {exp_dir} was trained with "
            "global normalisation (its training statistics are used for every speaker)"
        )
        speaker_map = None
    columns = [
        "file",
        *(["segment", "start", "end"] if segments else []),
        "duration",
        *predictor.output_columns(),
        "n_segments",
        "text",
        "text_source",
        *(["speaker", "normalization"] if speaker_map is not None else []),
        "error",
    ]
    identity = model_identity(predictor, speaker_from if speaker_map is not None else None)
    output = Output(out, columns, fmt, resume=resume, overwrite=overwrite, model=identity)
    report = PredictReport(output=output.target, n_files=len(files))
    kill_after = int(os.environ.get("SERTOOL_TEST_KILL_AFTER_FILES", "0") or 0)  # test hook
    recogniser = None

    inputs_all = [_File(p, _display(p, root)) for p in files]
    todo = []
    for f in inputs_all:
        f.done = os.path.abspath(f.name) in output.done
        if f.done:
            report.n_skipped += 1
        else:
            todo.append(f)
    if not files:
        log(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {root}")
    if report.n_skipped:
        log(f"--resume: {report.n_skipped} file(s) already in {output.target}; {len(todo)} to do")

    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="predict", unit="file", disable=not show_bar(progress), file=sys.stderr)

    def finish(done: list[_File]) -> None:
        rows = []
        for f in done:
            rows.extend(_rows(f, predictor, segments, uncertain_below))
            if plot_dir is not None and f.wave is not None:
                if not f.error and not predictor.regression:
                    _plot_file(f, predictor, plot_dir, root, log)
                f.wave = None
            report.n_done += 1
            if f.error:
                report.n_failed += 1
                report.failures.append((f.name, f.error))
            else:
                report.audio_seconds += f.duration or 0.0
        output.write(rows)
        if report.first_prediction_s is None and rows:
            report.first_prediction_s = time.perf_counter() - t0
        bar.update(len(done))
        if kill_after and report.n_done >= kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    def prepare(f: _File) -> list[dict[str, np.ndarray]]:
        """Text and features of every segment of one file ([] and f.error when it fails)."""
        nonlocal recogniser
        try:
            if needs_text or asr or table is not None:
                recogniser = _attach_text(
                    f, table, asr, recogniser, device, log, asr_beam, window, report, threads=threads
                )
                if needs_text and not f.text.strip():
                    raise PredictError("no text for this file: " + "; ".join(TEXT_OPTIONS))
            feats = _features(f, predictor, window, vad, keep_wave=plot_dir is not None)
            f.outputs = [None] * len(feats)
            return feats
        except ASRUnavailable:
            raise
        except Exception as e:  # noqa: BLE001 - one bad file never stops the run
            f.error = _reason(e)
            return []

    try:
        if speaker_map is not None:
            _predict_by_speaker(predictor, inputs_all, speaker_map, prepare, finish, batch_size, log)
            return report
        # batches grow 1, 2, 4 ... batch_size: the first prediction comes out at once
        pending: list[_File] = []
        items: list[tuple[_File, int, dict]] = []  # (file, segment index, features)
        limit = 1
        for f in todo:
            items.extend((f, k, x) for k, x in enumerate(prepare(f)))
            pending.append(f)
            if len(items) >= limit or (not items and pending):
                _predict_items(predictor, items, batch_size)
                finish(pending)
                pending, items = [], []
                limit = min(limit * 2, batch_size)
        if pending:
            _predict_items(predictor, items, batch_size)
            finish(pending)
    finally:
        bar.close()
        output.close()
        report.seconds = time.perf_counter() - t0
    return report


# ----------------------------------------------------------------------------------- speakers
# A speaker's own statistics replace the global ones only when they rest on enough speech: at
# least 5 recordings and 15 s of audio (a mean over one or two clips is mostly that clip's
# emotion, which the normalisation would then remove), or one long recording of >= 60 s.
# Smaller groups, and files of no known speaker, fall back to global statistics.
MIN_SPEAKER_RECORDINGS = 5
MIN_SPEAKER_SECONDS = 15.0
ENOUGH_SPEAKER_SECONDS = 60.0
SPEAKER_FROM_FORMS = "parent, csv:FILE (columns path, speaker) or regex:PATTERN"


def speaker_group_is_enough(n_recordings: int, seconds: float) -> bool:
    """Whether a speaker group's own statistics are used (else the global fallback)."""
    return seconds >= ENOUGH_SPEAKER_SECONDS or (
        n_recordings >= MIN_SPEAKER_RECORDINGS and seconds >= MIN_SPEAKER_SECONDS
    )


class SpeakerMap:
    """``--speaker-from``: who speaks in each input file (None = unknown).

    * ``parent``: the name of the file's folder (``Actor_01/x.wav`` -> ``Actor_01``);
    * ``csv:FILE``: a csv/tsv table with columns ``path`` (or ``file``: relative to WAV_DIR,
      with or without the extension, absolute, or a bare file name when unique) and ``speaker``;
    * ``regex:PATTERN``: searched in the path relative to WAV_DIR (``/`` separators); the
      named group ``speaker``, else the first group, else the whole match is the speaker.
    """

    def __init__(self, spec: str, root: Path):
        self.spec, self.root = str(spec), Path(root)
        self.base = self.root if self.root.is_dir() else self.root.parent
        kind, _, arg = self.spec.partition(":")
        self.kind = kind.strip().lower()
        if self.kind == "parent" and not arg:
            return
        if self.kind == "regex" and arg:
            import re

            try:
                self.pattern = re.compile(arg)
            except re.error as e:
                raise PredictError(f"--speaker-from {self.spec}: not a regular expression ({e})") from None
            return
        if self.kind == "csv" and arg:
            self._read_table(Path(arg))
            return
        raise PredictError(f"--speaker-from {self.spec!r}: use {SPEAKER_FROM_FORMS}")

    def _read_table(self, path: Path) -> None:
        from sertool.corpora.folder import read_table

        if not path.is_file():
            raise PredictError(f"--speaker-from csv:{path}: no such file")
        from sertool.corpora.base import CorpusError

        try:
            rows = read_table(path)
        except (CorpusError, OSError, UnicodeDecodeError) as e:
            raise PredictError(f"--speaker-from csv:{path}: needs columns path and speaker ({e})") from None
        if not rows or "speaker" not in rows[0] or not ({"path", "file"} & set(rows[0])):
            found = ", ".join(rows[0]) if rows else "no rows"
            raise PredictError(f"--speaker-from csv:{path}: needs columns path and speaker (found {found})")
        self.by_key: dict[str, str] = {}
        names: dict[str, list[str]] = {}
        for row in rows:
            key = (row.get("path") or row.get("file") or "").replace("\\", "/").strip()
            speaker = str(row.get("speaker") or "").strip()
            if not key or not speaker:
                continue
            full = Path(key) if os.path.isabs(key) else self.base / key
            self.by_key[str(full.resolve())] = speaker
            self.by_key[str(full.resolve().with_suffix(""))] = speaker
            names.setdefault(Path(key).name, []).append(speaker)
        self.by_name = {k: v[0] for k, v in names.items() if len(set(v)) == 1}

    def relative(self, path: Path) -> str:
        try:
            return path.relative_to(self.base).as_posix()
        except ValueError:
            return path.name

    def __call__(self, path: Path) -> str | None:
        if self.kind == "parent":
            return path.parent.name or None
        if self.kind == "regex":
            m = self.pattern.search(self.relative(path))
            if m is None:
                return None
            if "speaker" in self.pattern.groupindex:
                value = m.group("speaker")
            else:
                value = m.group(1) if self.pattern.groups else m.group(0)
            return value or None
        full = path.resolve()
        for key in (str(full), str(full.with_suffix(""))):
            if key in self.by_key:
                return self.by_key[key]
        return self.by_name.get(path.name)


class _InMemoryFeatures:
    """Features held in memory, read as a ``sertool.data`` source (``frame_moments`` needs ``dim``, ``get``)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.arrays = arrays
        self.dim = int(next(iter(arrays.values())).shape[1])

    def get(self, uid: str) -> np.ndarray:
        return self.arrays[uid]


def speaker_moments(files: list[_File], modality: str) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std over all frames of the files' segments, exactly as the train stage computes a
    speaker's statistics (sertool.data.frame_moments: frames pooled, float64 sums, std 1 where constant)."""
    from sertool.data import frame_moments

    arrays = {f"{i}:{k}": x[modality] for i, f in enumerate(files) for k, x in enumerate(f.features or [])}
    src = _InMemoryFeatures(arrays)
    return frame_moments(src, list(arrays))


class _PooledMoments:
    """frame_moments accumulated file by file (the global fallback over every recording of a run)."""

    def __init__(self):
        self.s = self.ss = None
        self.n = 0

    def add(self, x: np.ndarray) -> None:
        x = x.astype(np.float64)
        if self.s is None:
            self.s, self.ss = np.zeros(x.shape[1]), np.zeros(x.shape[1])
        self.s += x.sum(0)
        self.ss += (x * x).sum(0)
        self.n += x.shape[0]

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.s / max(self.n, 1)
        std = np.sqrt(np.maximum(self.ss / max(self.n, 1) - mean * mean, 0.0))
        std[std < 1e-8] = 1.0
        return mean.astype(np.float32), std.astype(np.float32)


def _predict_by_speaker(
    predictor: Predictor,
    files: list[_File],
    speaker_of: SpeakerMap,
    prepare: Callable[[_File], list],
    finish: Callable[[list[_File]], None],
    batch_size: int,
    log: Callable[[str], None],
) -> None:
    """Two passes per speaker group: the features of all of its files (those already in a resumed
    output too, so the statistics do not change), then its files normalised with the group's
    statistics and predicted.  Groups too small for their own statistics, and files of unknown
    speakers, wait until the end and get the global fallback: the experiment's ``<m>.fallback``
    statistics (norm.safetensors) when it has them, else the statistics of every recording of the run."""
    modalities = predictor.speaker_modalities
    # the speaker-normalised inputs come to the model normalised already: collate must not touch them
    model_view = Predictor(
        predictor.path,
        predictor.spec,
        predictor.model,
        {m: v for m, v in predictor.stats.items() if m not in modalities},
        predictor.extractors,
        predictor.device,
    )
    groups: dict[str | None, list[_File]] = {}
    for f in files:
        f.speaker = speaker_of(f.path) or ""
        groups.setdefault(f.speaker or None, []).append(f)
    fallback = {m: predictor.stats[f"{m}.fallback"] for m in modalities if f"{m}.fallback" in predictor.stats}
    pooled = {m: _PooledMoments() for m in modalities}
    deferred: list[list[_File]] = []
    untouched: list[list[_File]] = []

    def pool(members: list[_File]) -> None:
        for f in members:
            for x in f.features or []:
                for m in modalities:
                    pooled[m].add(x[m])

    def predict_group(members: list[_File], stats: dict, how: str) -> None:
        items = []
        for f in members:
            f.normalization = how
            if f.done:
                continue
            for k, x in enumerate(f.features or []):
                x = dict(x)
                for m in modalities:
                    mean, std = stats[m]
                    x[m] = (x[m] - mean) / std
                items.append((f, k, x))
        for s in range(0, len(items), batch_size):
            _predict_items(model_view, items[s : s + batch_size], batch_size)
        finish([f for f in members if not f.done])
        for f in members:
            f.features = f.wave = None

    for speaker, members in groups.items():
        if all(f.done for f in members):
            untouched.append(members)
            continue
        for f in members:
            f.features = prepare(f)
        ok = [f for f in members if not f.error]
        pool(ok)
        seconds = sum(f.duration or 0.0 for f in ok)
        if speaker is not None and ok and speaker_group_is_enough(len(ok), seconds):
            predict_group(members, {m: speaker_moments(ok, m) for m in modalities}, "speaker")
        else:
            deferred.append(members)
    if not deferred:
        return
    missing = [m for m in modalities if m not in fallback]
    if missing and untouched:  # a resumed run: the fallback pools every recording, finished ones too
        for members in untouched:
            for f in members:
                f.features = prepare(f)
            pool([f for f in members if not f.error])
            for f in members:
                f.features = None
    stats = {m: fallback[m] if m in fallback else pooled[m].result() for m in modalities}
    small = [g[0].speaker or "(unknown)" for g in deferred]
    log(
        f"--speaker-from: {len(deferred)} speaker group(s) below {MIN_SPEAKER_RECORDINGS} recordings and "
        f"{MIN_SPEAKER_SECONDS:g} s ({', '.join(small[:5])}{' ...' if len(small) > 5 else ''}) use global "
        + ("statistics of the experiment" if not missing else "statistics of all recordings of this run")
    )
    for members in deferred:
        predict_group(members, stats, "global-fallback")


def _attach_text(
    f: _File,
    table: Transcripts | None,
    asr: str | None,
    recogniser,
    device: str,
    log,
    asr_beam: int = 1,
    window: float = DEFAULT_WINDOW_S,
    report: PredictReport | None = None,
    threads: int | None = None,
):
    """Text from --transcripts, else the sidecar .txt, else ASR; returns the (lazily loaded) recogniser.
    ASR: beam ``asr_beam``; word timestamps only for a file longer than ``window`` (its segments'
    text comes from them)."""
    text = table.get(f.path) if table is not None else None
    if text is not None:
        f.text, f.text_source = text, "transcripts"
        return recogniser
    text = sidecar_text(f.path)
    if text is not None:
        f.text, f.text_source = text, "sidecar"
        return recogniser
    if asr:
        if recogniser is None:
            from sertool.features.asr import load_asr

            log(f"loading ASR model {asr} (beam {asr_beam})")
            try:
                extra = {"threads": threads} if threads else {}
                recogniser = load_asr(asr, device, beam_size=asr_beam, word_timestamps=False, **extra)[0]
            except Exception as e:  # noqa: BLE001 - the same for every file: stop once
                raise ASRUnavailable(f"--asr {asr}: {_reason(e)}") from None
            if report is not None:
                report.asr = {
                    "model": asr,
                    **dict(getattr(recogniser, "settings", {}) or {}),
                    "word_timestamps": f"only for files longer than the {window:g} s window",
                }
        from sertool.features.asr import SAMPLE_RATE

        wave, _ = load_audio(f.path, SAMPLE_RATE)
        f.text, f.words = recogniser(wave, word_timestamps=len(wave) > window * SAMPLE_RATE)
        f.text_source = "asr"
    return recogniser


def _features(
    f: _File, predictor: Predictor, window: float, vad: str = "off", keep_wave: bool = False
) -> list[dict[str, np.ndarray]]:
    """Features of every segment of one file: [{modality: [T, D]}, ...].  A file longer than
    ``window`` is cut at its speech (``vad``: sertool.segment) or, with ``vad="off"``, into equal
    windows; ``keep_wave`` keeps its 16 kHz waveform on ``f`` (for --plot).  A model reading the
    waveform itself gets segments no longer than its input's window (``Predictor.longest_wave_s``)."""
    window = min(window, predictor.longest_wave_s or window)
    info = audio_info(f.path)
    if info.frames <= 0:
        raise AudioError(f"{f.path}: zero-length audio (0 samples)")
    f.duration = round(info.duration, 4)
    waves: dict[int | None, np.ndarray] = {}
    for ex in predictor.extractors.values():
        if ex.needs_audio and ex.sample_rate not in waves:
            waves[ex.sample_rate], _ = load_audio(f.path, ex.sample_rate)
    if waves:
        sr, wave = next(iter(waves.items()))
        f.duration = round(len(wave) / (sr or info.sample_rate), 4)
    if f.duration < predictor.min_clip_s:
        raise PredictError(
            f"{f.path}: too short ({f.duration:g} s of audio; sertool predicts clips of at least "
            f"{predictor.min_clip_s:g} s)"
        )
    if f.duration > window and vad != "off":
        from sertool.segment import SAMPLE_RATE as VAD_RATE
        from sertool.segment import prediction_segments, speech_spans

        wave16 = waves[VAD_RATE] if VAD_RATE in waves else load_audio(f.path, VAD_RATE)[0]
        f.segments = prediction_segments(speech_spans(wave16, VAD_RATE, vad), window, predictor.min_clip_s)
        if not f.segments:
            raise PredictError(
                f"{f.path}: no speech found in {f.duration:g} s by the voice activity detector (--vad {vad}); "
                "--vad off cuts it into equal windows instead"
            )
        if keep_wave:
            f.wave, f.wave_rate = wave16, VAD_RATE
    else:
        f.segments = segment_bounds(f.duration, window)
        if keep_wave and f.duration > window:
            f.wave, f.wave_rate = (waves[16000] if 16000 in waves else load_audio(f.path, 16000)[0]), 16000
    whole = f.duration <= window
    out: list[dict[str, np.ndarray]] = [{} for _ in f.segments]
    uid = Path(f.name).with_suffix("").as_posix().replace("/", "__")
    for modality, ex in predictor.extractors.items():
        seg_items = []
        for k, (start, end) in enumerate(f.segments):
            wave = None
            if ex.needs_audio:
                full = waves[ex.sample_rate]
                rate = ex.sample_rate or info.sample_rate
                a = int(round(start * rate))
                b = len(full) if end >= f.duration - 1e-6 else int(round(end * rate))
                wave = full[a:b]
            utt = Utterance(
                id=uid if whole else f"{uid}__seg{k}",
                audio=str(f.path),
                text=f.text,
                words=f.words if whole else _words_in(f.words, start, end),
                start=None if whole else start,
                end=None if whole else end,
            )
            if not whole:
                utt.text = _segment_text(f, start, end)
            seg_items.append((utt, wave))
        results = ex.extract_batch(seg_items) if ex.batched else [_safe_extract(ex, u, w) for u, w in seg_items]
        raw = getattr(ex, "raw", False)
        for k, res in enumerate(results):
            if isinstance(res, Exception):
                raise res
            data = np.asarray(res.data, dtype=ex.dtype if raw else np.float32)
            if data.ndim != (1 if raw else 2) or data.shape[0] == 0:
                raise PredictError(f"{modality} features of segment {k} have shape {data.shape}")
            if not np.isfinite(data).all():
                raise PredictError(f"{modality} features of segment {k} hold NaN/inf values")
            out[k][modality] = data
    return out


def _safe_extract(ex, utt, wave):
    try:
        return ex.extract(utt, wave)
    except Exception as e:  # noqa: BLE001
        return e


def _predict_items(predictor: Predictor, items: list[tuple[_File, int, dict]], batch_size: int) -> None:
    """Fill each file's per-segment outputs; a failing batch is retried item by item."""
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        try:
            preds = predictor.predict_features([x for _, _, x in chunk])
            results = [preds[i] for i in range(len(chunk))]
        except Exception:  # noqa: BLE001
            results = []
            for _, _, x in chunk:
                try:
                    results.append(predictor.predict_features([x])[0])
                except Exception as e:  # noqa: BLE001
                    results.append(e)
        for (f, k, _), r in zip(chunk, results):
            if isinstance(r, Exception):
                f.error = f.error or f"model: {_reason(r)}"
            else:
                f.outputs[k] = r


def _prediction_fields(pred, predictor: Predictor, uncertain_below: float = DEFAULT_UNCERTAIN_BELOW) -> dict:
    if predictor.regression:
        return {"score": round(float(pred), 6)}
    return {
        "label": predictor.classes[int(np.argmax(pred))],
        **{f"p_{c}": round(float(p), 6) for c, p in zip(predictor.classes, pred)},
        "uncertain": bool(np.max(pred) < uncertain_below),
    }


def _rows(
    f: _File, predictor: Predictor, segments: bool, uncertain_below: float = DEFAULT_UNCERTAIN_BELOW
) -> list[dict]:
    base = {
        "file": f.name,
        "text": f.text,
        "text_source": f.text_source,
        "speaker": f.speaker,
        "normalization": "" if f.error else f.normalization,
    }
    if f.error or not f.outputs or any(o is None for o in f.outputs):
        return [
            {**base, "duration": f.duration, "n_segments": len(f.segments) or None, "error": f.error or "no prediction"}
        ]
    rows = []
    weights = np.array([max(b - a, 1e-6) for a, b in f.segments])
    if segments:
        for k, ((a, b), pred) in enumerate(zip(f.segments, f.outputs)):
            rows.append(
                {
                    "file": f.name,
                    "segment": k + 1,
                    "start": a,
                    "end": b,
                    "duration": round(b - a, 4),
                    **_prediction_fields(pred, predictor, uncertain_below),
                    "n_segments": 1,
                    "text": _segment_text(f, a, b),
                    "text_source": f.text_source,
                    "speaker": f.speaker,
                    "normalization": f.normalization,
                    "error": "",
                }
            )
    mean = np.average(np.stack([np.atleast_1d(o) for o in f.outputs]), axis=0, weights=weights)
    fields = _prediction_fields(mean[0] if predictor.regression else mean, predictor, uncertain_below)
    if not predictor.regression and len(f.outputs) > 1:
        # the file's label: the class predicted for the most speech time (ties: the larger mean probability)
        time_per_class = np.zeros(len(predictor.classes))
        for w, o in zip(weights, f.outputs):
            time_per_class[int(np.argmax(o))] += w
        best = max(range(len(mean)), key=lambda j: (round(float(time_per_class[j]), 6), float(mean[j])))
        fields["label"] = predictor.classes[best]
    rows.append(
        {
            **base,
            "duration": f.duration,
            **({"start": 0.0, "end": f.duration} if segments else {}),
            **fields,
            "n_segments": len(f.segments),
            "error": "",
        }
    )
    return rows


def plot_path(plot_dir: Path, name: str, root: Path) -> Path:
    """``--plot DIR``: DIR/<path under WAV_DIR with / as __>.png (unique per input file)."""
    try:
        rel = Path(name).relative_to(root).as_posix() if root.is_dir() else Path(name).name
    except ValueError:
        rel = Path(name).name
    return plot_dir / (rel.replace("/", "__") + ".png")


def _plot_file(f: _File, predictor: Predictor, plot_dir: Path, root: Path, log: Callable[[str], None]) -> None:
    from sertool.segment import plot_timeline

    target = plot_path(plot_dir, f.name, root)
    try:
        speech = sum(b - a for a, b in f.segments)
        title = f"{f.name}: {speech:.0f} s of speech in {f.duration:.0f} s, {len(f.segments)} segment(s)"
        plot_timeline(target, f.wave, f.wave_rate, f.segments, f.outputs, predictor.classes, title)
    except Exception as e:  # noqa: BLE001 - a picture that fails never costs the predictions
        log(f"warning: --plot {target}: {_reason(e)}")


def iter_rows(path: str | os.PathLike) -> Iterator[dict]:
    """Read a predictions file back (CSV or JSON Lines) as dicts."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                yield json.loads(line)
    else:
        with open(path, newline="", encoding="utf-8") as f:
            yield from csv.DictReader(f)
