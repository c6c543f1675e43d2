"""Frame-level hidden states of self-supervised speech encoders (wav2vec 2.0, HuBERT, WavLM,
data2vec-audio: any ``transformers`` AutoModel audio encoder with a convolutional front end).

``-f wav2vec2 --ssl-model NAME_OR_PATH [--device auto|cpu|cuda]``

* Input: the utterance's 16 kHz mono waveform, normalised by the model's own feature extractor
  (zero mean, unit variance when its ``do_normalize`` is set) over the whole utterance.
* Output: one row per 20 ms frame (50 Hz for the standard front end), exactly the model's frame
  count for the real length (``_get_feat_extract_output_lengths``), never padding frames.
* Layers: ``layer=-1`` (last; default), any index (0 = the transformer input: projected CNN
  features + positional convolution), a list / slice averaged (``combine="mean"``) or
  concatenated (``"stack"``), or ``"all"``: every hidden state concatenated, [T, (L+1)·H], for a
  learned weighted sum (file attrs ``layers`` and ``layer_dim`` tell a model how to reshape).
* Long files: audio longer than ``chunk_s`` is cut into chunks of ``chunk_s`` seconds of output
  frames, each run with ``context_s`` seconds of extra audio on both sides whose frames are
  dropped, so memory is bounded (an hour of audio never runs out of memory) and chunk borders
  see context. Frame indices are exact: frame i always covers samples [320 i, 320 i + 400).
  Layer 0 is identical to an unchunked run when ``context_s`` covers the positional
  convolution (128 frames, 1.28 s each side); deeper layers differ only by attention context.
* Batches: chunks of several utterances are zero-padded and run together with an attention
  mask when the model's CNN uses layer normalisation (``feat_extract_norm="layer"``: large
  wav2vec 2.0 / HuBERT, WavLM); models with group normalisation over time (wav2vec2-base,
  HuBERT-base) see padding in their statistics, and data2vec-audio's stacked positional
  convolutions carry padding into real frames, so their chunks run one at a time (or with
  chunks of the same length): results never depend on how utterances were batched.
* Device: ``auto`` picks CUDA when available; ``dtype="auto"`` runs float16 on CUDA and
  float32 on CPU. Stored features are float32.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sertool.corpora.base import Utterance
from sertool.features.base import Extractor, ExtractorError, FeatureResult, register_extractor
from sertool.features.hub import bind_model, combine_states, layer_indices, parse_layers, quiet_transformers

DEFAULT_SSL_MODEL = "facebook/wav2vec2-base"
# Models whose output for the real frames changes when the batch is zero-padded, besides those
# with group normalisation in the CNN: data2vec-audio's stacked positional convolutions (each
# with a layer norm) turn the zeroed padding frames into non-zero values that reach real frames.
_PADDING_CHANGES_RESULTS = {"data2vec-audio"}


def receptive_field(kernels, strides) -> int:
    """Samples one frame of a convolutional front end reads (400 for wav2vec2's): the fewest that give a frame."""
    field, jump = 1, 1
    for k, s in zip(kernels, strides):
        field += (int(k) - 1) * jump
        jump *= int(s)
    return field


@register_extractor("wav2vec2")
class SSLFeatures(Extractor):
    """Frame states of wav2vec2 / HuBERT / WavLM / data2vec-audio (--ssl-model), 50 Hz."""

    kind = "audio"
    needs_audio = True
    batched = True
    batch_size = 8
    sample_rate = 16000
    cli_options = {"ssl_model": "model", "device": "device"}

    def __init__(
        self,
        model: str = DEFAULT_SSL_MODEL,
        layer: Any = -1,
        combine: str = "mean",
        chunk_s: float = 30.0,
        context_s: float = 2.0,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 8,
        model_path: str | None = None,
        model_checksum: str | None = None,
    ):
        import torch
        from transformers import AutoFeatureExtractor, AutoModel

        if combine not in ("mean", "stack"):
            raise ExtractorError(f"combine={combine!r}: choose mean or stack")
        if chunk_s <= 0 or context_s < 0:
            raise ExtractorError("chunk_s must be > 0 and context_s >= 0")
        model = model or DEFAULT_SSL_MODEL
        resolved = bind_model(self, model, model_path, model_checksum, device, dtype, option="--ssl-model")
        path = str(resolved.path)
        try:
            with quiet_transformers():
                self.feature_extractor = AutoFeatureExtractor.from_pretrained(path, local_files_only=True)
                self.model = AutoModel.from_pretrained(path, local_files_only=True, dtype=self.torch_dtype)
        except Exception as e:  # noqa: BLE001
            raise ExtractorError(
                f"cannot load speech model from {path} ({type(e).__name__}: {e}); it needs "
                f"config.json, the weights and preprocessor_config.json"
            ) from None
        if not hasattr(self.model, "_get_feat_extract_output_lengths"):
            raise ExtractorError(
                f"{path}: {type(self.model).__name__} is not a wav2vec2-family audio encoder "
                f"(for Whisper checkpoints use -f whisper)"
            )
        self.model.eval().to(self.device)
        cfg = self.model.config
        self.sample_rate = int(getattr(self.feature_extractor, "sampling_rate", 16000) or 16000)
        self.do_normalize = bool(getattr(self.feature_extractor, "do_normalize", False))
        self.stride = int(np.prod(cfg.conv_stride))
        self.receptive = receptive_field(cfg.conv_kernel, cfg.conv_stride)
        self.frame_rate_hz = self.sample_rate / self.stride
        self.can_pad = (
            getattr(cfg, "feat_extract_norm", "layer") == "layer"
            and getattr(cfg, "model_type", "") not in _PADDING_CHANGES_RESULTS
        )
        self.layer = parse_layers(layer)
        self.layer_ids = layer_indices(self.layer, int(cfg.num_hidden_layers) + 1)
        self.combine = "stack" if self.layer == "all" else (combine if not isinstance(self.layer, int) else "mean")
        self.layer_dim = int(cfg.hidden_size)
        self.dim = self.layer_dim * (len(self.layer_ids) if self.combine == "stack" else 1)
        self.chunk_s = float(chunk_s)
        self.context_s = float(context_s)
        self.batch_size = int(batch_size)
        self._torch = torch

    def params(self) -> dict[str, Any]:
        return {
            "model": self.model_name,
            "model_path": self.resolved.record,
            "model_checksum": self.model_checksum,
            "layer": self.layer,
            "combine": self.combine,
            "chunk_s": self.chunk_s,
            "context_s": self.context_s,
            "dtype": self.dtype_name,
        }

    def file_attrs(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "frame_rate_hz": float(self.frame_rate_hz),
            "model": self.model_name,
            "model_type": getattr(self.model.config, "model_type", ""),
            "layers": self.layer_ids,
            "layer_dim": self.layer_dim,
            "combine": self.combine,
            "model_source": self.resolved.source,
            "frame_shift_samples": self.stride,
            "frame_length_samples": self.receptive,
        }

    # ------------------------------------------------------------------ frames
    def n_frames(self, n_samples: int) -> int:
        """The model's frame count for `n_samples` of audio (0 when shorter than one frame)."""
        import torch

        if n_samples < self.receptive:
            return 0
        return int(self.model._get_feat_extract_output_lengths(torch.tensor(n_samples)).item())

    def _normalise(self, wave: np.ndarray) -> np.ndarray:
        if self.do_normalize:
            out = self.feature_extractor(wave, sampling_rate=self.sample_rate, return_tensors="np")
            return np.asarray(out["input_values"][0], dtype=np.float32)
        return np.asarray(wave, dtype=np.float32)

    def _pieces(self, n_samples: int) -> list[tuple[int, int, int, int]]:
        """(sample start, sample end, first frame kept, last frame kept + 1) in piece coordinates."""
        total = self.n_frames(n_samples)
        chunk_frames = max(1, int(round(self.chunk_s * self.frame_rate_hz)))
        if total <= chunk_frames:
            return [(0, n_samples, 0, total)]
        ctx = int(round(self.context_s * self.frame_rate_hz))
        pieces = []
        for a in range(0, total, chunk_frames):
            b = min(a + chunk_frames, total)
            first = max(0, a - ctx)
            s = first * self.stride
            e = min(n_samples, (b - 1 + ctx) * self.stride + self.receptive)
            pieces.append((s, e, a - first, b - first))
        return pieces

    # ------------------------------------------------------------------ running
    def extract(self, utt: Utterance, wave: np.ndarray | None) -> FeatureResult:
        result = self.extract_batch([(utt, wave)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def extract_batch(self, items: list[tuple[Utterance, np.ndarray | None]]) -> list[FeatureResult | Exception]:
        out: list[Any] = [None] * len(items)
        jobs = []  # (item, piece index, input, keep_from, keep_to)
        parts: dict[int, list] = {}
        for i, (utt, wave) in enumerate(items):
            if wave is None or len(wave) < self.receptive:
                n = 0 if wave is None else len(wave)
                out[i] = ExtractorError(
                    f"utterance {utt.id!r}: audio too short for {self.model_name} "
                    f"({n} samples, at least {self.receptive} needed)"
                )
                continue
            x = self._normalise(np.asarray(wave, np.float32))
            pieces = self._pieces(len(x))
            parts[i] = [None] * len(pieces)
            for k, (s, e, a, b) in enumerate(pieces):
                jobs.append((i, k, x[s:e], a, b))
        for batch in self._batches(jobs):
            try:
                states = self._forward([j[2] for j in batch])
            except Exception as e:  # noqa: BLE001
                if len(batch) > 1:  # retry one by one (e.g. out of memory) so the rest still run
                    states = []
                    for j in batch:
                        try:
                            states.append(self._forward([j[2]])[0])
                        except Exception as e1:  # noqa: BLE001
                            states.append(e1)
                else:
                    states = [e]
            for j, st in zip(batch, states):
                i, k, _, a, b = j
                if isinstance(st, Exception):
                    out[i] = ExtractorError(f"utterance {items[i][0].id!r}: {type(st).__name__}: {st}")
                elif not isinstance(out[i], Exception):
                    parts[i][k] = st[a:b]
        for i, pieces in parts.items():
            if out[i] is None:
                data = np.concatenate(pieces, 0) if len(pieces) > 1 else pieces[0]
                expected = self.n_frames(len(items[i][1]))
                assert data.shape[0] == expected, (data.shape, expected)
                out[i] = FeatureResult(
                    np.ascontiguousarray(data, dtype=np.float32),
                    {"n_chunks": len(pieces), "n_samples": int(len(items[i][1]))},
                )
        return out

    def _batches(self, jobs: list) -> list[list]:
        if self.can_pad:
            order = sorted(jobs, key=lambda j: len(j[2]))
            return [order[s : s + self.batch_size] for s in range(0, len(order), self.batch_size)]
        by_length: dict[int, list] = {}
        for j in jobs:
            by_length.setdefault(len(j[2]), []).append(j)
        batches = []
        for same in by_length.values():
            batches += [same[s : s + self.batch_size] for s in range(0, len(same), self.batch_size)]
        return batches

    def _forward(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        torch = self._torch
        lengths = [len(x) for x in inputs]
        longest = max(lengths)
        batch = np.zeros((len(inputs), longest), np.float32)
        mask = np.zeros((len(inputs), longest), np.int64)
        for r, x in enumerate(inputs):
            batch[r, : len(x)] = x
            mask[r, : len(x)] = 1
        values = torch.from_numpy(batch).to(self.device, dtype=self.torch_dtype)
        kwargs = {}
        if len(set(lengths)) > 1:
            kwargs["attention_mask"] = torch.from_numpy(mask).to(self.device)
        with torch.inference_mode():
            outputs = self.model(values, output_hidden_states=True, return_dict=True, **kwargs)
        states = combine_states(outputs.hidden_states, self.layer_ids, self.combine).float().cpu().numpy()
        return [states[r, : self.n_frames(n)] for r, n in enumerate(lengths)]
