"""Input encoders of the CMD student (Kim & Kang, Neurocomputing 506, 2022, Sections 3.1 and 4.2).

The paper's student starts from its teachers' own input encoders: wav2vec 2.0's convolutional
feature encoder on the waveform and BERT's embedding layer on the token ids, with their weights
(:class:`TeacherWaveEncoder`, :class:`TeacherTokenEncoder`).  When the teacher is a cached store
(its weights are not at hand) the student gets the architecture of that input encoder without
weights: Whisper's log-Mel front end and two convolutions for a Whisper store
(:class:`LogMelStem`), a convolutional stem with wav2vec2's kernels at the teacher's frame rate
for any other audio store (:class:`WaveStem`), and a token embedding with sinusoidal positions
over the store's tokens for text (:class:`TokenEmbedding`).

Each encoder maps ``(x, mask) -> (states [B, T, D], mask [B, T])`` and carries a JSON ``spec``
from which :func:`build_input_encoder` rebuilds it (the student's weights file records it).
"""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .blocks import sinusoidal_positions
from .encoders import ConvStack

SAMPLE_RATE = 16000
# wav2vec 2.0's CNN feature encoder: (kernel, stride) per layer, total stride 320 (50 Hz at 16 kHz)
W2V_LAYERS = ((10, 5), (3, 2), (3, 2), (3, 2), (3, 2), (2, 2), (2, 2))


def _module_spec(module: nn.Module, config) -> dict:
    cls = type(module)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "config": config.to_dict()}


def _rebuild_module(spec: dict) -> nn.Module:
    from transformers import AutoConfig

    conf = dict(spec["config"])
    config = AutoConfig.for_model(conf.pop("model_type"), **conf)
    mod, _, name = spec["class"].rpartition(".")
    return getattr(importlib.import_module(mod), name)(config)


class TeacherWaveEncoder(nn.Module):
    """The teacher's convolutional feature encoder (wav2vec 2.0 CNN) on the waveform."""

    def __init__(self, cnn: nn.Module, kernels, strides, out_dim: int, spec: dict | None = None):
        super().__init__()
        self.cnn, self.kernels, self.strides, self.out_dim = cnn, list(kernels), list(strides), out_dim
        self.spec = {
            "type": "teacher_cnn",
            "module": spec,
            "kernels": self.kernels,
            "strides": self.strides,
            "out_dim": out_dim,
        }

    def forward(self, wave: torch.Tensor, mask: torch.Tensor):
        x = self.cnn(wave).transpose(1, 2)
        lengths = mask.long().sum(1)
        for k, s in zip(self.kernels, self.strides):
            lengths = torch.div(lengths - k, s, rounding_mode="floor") + 1
        m = torch.arange(x.shape[1], device=x.device)[None, :] < lengths.clamp_min(0)[:, None]
        return x * m[..., None].to(x.dtype), m


class WaveStem(nn.Module):
    """A small convolutional stem on the waveform at the teacher's frame rate (wav2vec2 kernels)."""

    def __init__(self, channels: int, layers):
        super().__init__()
        self.conv = ConvStack(1, [[channels, k, s] for k, s in layers], pad=False)
        self.out_dim = channels
        self.spec = {"type": "stem", "channels": channels, "layers": [list(l) for l in layers]}

    def forward(self, wave, mask):
        return self.conv(wave[..., None], mask)


class LogMelStem(nn.Module):
    """Whisper's own input encoder for a cached Whisper teacher, the analogue of the paper's
    wav2vec2 CNN for a wav2vec2 teacher: log-Mel spectrogram (80 bands, 25 ms / 10 ms, Whisper's
    log10, 8-decade floor and (x + 4) / 4 scaling), Conv1d k3 + GELU, then Conv1d k3 stride 2 +
    GELU per halving of the 100 Hz frame rate down to the teacher's (50 Hz: Whisper's two
    convolutions).  :meth:`from_whisper` takes the weights of a Whisper encoder's two
    convolutions (:func:`sertool.models.whisper_encoder.load_whisper_encoder`, which reads the
    packaged CTranslate2 checkpoint, or a fine-tuned ``whisper_ft`` experiment's encoder);
    otherwise the stem is randomly initialised.  Far cheaper on CPU than a stem on the raw waveform.

    ``scale``: the (z-normalised) waveform is multiplied by it before the log-Mel, as ``whisper_ft``
    scales its input to a speech level (log-Mel is not scale invariant: the convolutions of a
    fine-tuned encoder see the levels they were trained on); 1 (the default) leaves it as it is."""

    N_FFT, HOP, N_MELS = 400, 160, 80

    def __init__(self, channels: int, halvings: int = 1, sample_rate: int = SAMPLE_RATE, scale: float = 1.0):
        super().__init__()
        import librosa

        mel = librosa.filters.mel(sr=sample_rate, n_fft=self.N_FFT, n_mels=self.N_MELS)
        self.register_buffer("mel", torch.from_numpy(np.asarray(mel, dtype=np.float32)), persistent=False)
        self.register_buffer("window", torch.hann_window(self.N_FFT), persistent=False)
        layers = [nn.Conv1d(self.N_MELS, channels, 3, padding=1)]
        layers += [nn.Conv1d(channels, channels, 3, stride=2, padding=1) for _ in range(int(halvings))]
        self.convs = nn.ModuleList(layers)
        self.out_dim = channels
        self.spec = {"type": "logmel", "channels": channels, "halvings": int(halvings), "sample_rate": sample_rate}
        self.scale = float(scale)
        if self.scale != 1.0:  # recorded only when used: the spec of an older student is unchanged
            self.spec["scale"] = self.scale

    @classmethod
    def from_whisper(cls, encoder, scale: float = 1.0) -> LogMelStem:
        """The stem with the weights of ``encoder``'s front end (``conv1``, ``conv2``: Whisper's own
        input encoder at 50 Hz, the width of the encoder), copied."""
        front = encoder.front_end()
        conv1, conv2 = front["conv1"], front["conv2"]
        if conv1.in_channels != cls.N_MELS or conv2.stride[0] != 2:
            raise ValueError(
                f"the Whisper encoder's front end ({conv1.in_channels} Mel bands, stride "
                f"{conv2.stride[0]}) is not the {cls.N_MELS}-band, stride-2 front end of this stem"
            )
        stem = cls(int(conv1.out_channels), halvings=1, scale=scale)
        with torch.no_grad():
            for mine, theirs in zip(stem.convs, (conv1, conv2)):
                mine.weight.copy_(theirs.weight.float())
                mine.bias.copy_(theirs.bias.float())
        stem.spec["init"] = getattr(encoder, "source", "whisper")
        return stem

    def forward(self, wave, mask):
        # zero padding at the edges (not reflection): what Whisper sees after its 30 s zero padding,
        # and it makes a padded batch give the same frames as each utterance alone
        spec = torch.stft(
            wave.float() * self.scale if self.scale != 1.0 else wave.float(),
            self.N_FFT,
            self.HOP,
            window=self.window,
            center=True,
            pad_mode="constant",
            return_complex=True,
        )
        logmel = torch.log10((self.mel @ spec.abs().pow(2)).clamp_min(1e-10))  # [B, 80, T]
        lengths = torch.div(mask.long().sum(1), self.HOP, rounding_mode="floor") + 1
        valid = torch.arange(logmel.shape[-1], device=logmel.device)[None, :] < lengths[:, None]
        peak = logmel.masked_fill(~valid[:, None], float("-inf")).amax(dim=(1, 2), keepdim=True)
        x = (torch.maximum(logmel, peak - 8.0) + 4.0) / 4.0
        for k, conv in enumerate(self.convs):
            if k > 0:
                lengths = torch.div(lengths - 1, 2, rounding_mode="floor") + 1
            valid = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]
            x = F.gelu(conv(x * valid[:, None].to(x.dtype)))
        valid = torch.arange(x.shape[-1], device=x.device)[None, :] < lengths[:, None]
        return x.transpose(1, 2) * valid[..., None].to(x.dtype), valid


def logmel_halvings(frame_rate_hz: float | None) -> int:
    """Stride-2 convolutions that bring the 100 Hz log-Mel frames to the teacher's rate."""
    if not frame_rate_hz:
        return 1
    ratio = 100.0 / float(frame_rate_hz)
    halvings = int(round(np.log2(ratio))) if ratio >= 1 else -1
    if halvings < 0 or abs(2**halvings - ratio) > 1e-6:
        raise ValueError(
            f"student.audio_stem=logmel: the teacher frame rate {frame_rate_hz} Hz is not 100 Hz "
            "halved a whole number of times; use student.audio_stem=waveform"
        )
    return halvings


def logmel_stem_for(extractor: dict, frame_rate_hz: float | None, student_cfg: dict) -> LogMelStem:
    """The log-Mel stem for a cached teacher made by ``extractor`` (its store's record): with the
    Whisper checkpoint's own convolution weights (``student.audio_stem_init``: ``teacher``, or
    ``auto`` when the store names a Whisper checkpoint that is here), else randomly initialised,
    ``student.stem_channels`` wide."""
    init = student_cfg.get("audio_stem_init", "auto")
    if init not in ("auto", "teacher", "random"):
        raise ValueError(f"student.audio_stem_init must be auto, teacher or random, got {init!r}")
    path = (extractor.get("params") or {}).get("model_path") if extractor.get("name") == "whisper" else None
    if init == "teacher" or (init == "auto" and path and Path(path).exists()):
        from .whisper_encoder import load_whisper_encoder

        if not path:
            raise ValueError(
                "student.audio_stem_init=teacher: the store records no Whisper checkpoint (extract it with -f whisper)"
            )
        if logmel_halvings(frame_rate_hz) != 1:
            raise ValueError(
                f"student.audio_stem_init=teacher: the store is at {frame_rate_hz} Hz; Whisper's front end gives 50 Hz"
            )
        return LogMelStem.from_whisper(load_whisper_encoder(path))
    return LogMelStem(int(student_cfg["stem_channels"]), logmel_halvings(frame_rate_hz))


def stem_layers(frame_rate_hz: float | None, sample_rate: int = SAMPLE_RATE):
    """wav2vec2's (kernel, stride) layers, dropping stride-2 layers until the total stride gives
    ``frame_rate_hz``."""
    layers = list(W2V_LAYERS)
    if not frame_rate_hz:
        return layers
    want = sample_rate / float(frame_rate_hz)
    while layers and int(np.prod([s for _, s in layers])) > want + 1e-6 and len(layers) > 1:
        layers.pop()
    if abs(np.prod([s for _, s in layers]) - want) > 1e-6:
        raise ValueError(
            f"no conv stem of stride-2 layers gives the teacher frame rate {frame_rate_hz} Hz "
            f"at {sample_rate} Hz (stride {want})"
        )
    return layers


class TeacherTokenEncoder(nn.Module):
    """The teacher's embedding layer (BERT word + position + type embeddings, LayerNorm)."""

    def __init__(self, embeddings: nn.Module, spec: dict | None = None):
        super().__init__()
        self.emb = embeddings
        self.out_dim = int(embeddings.word_embeddings.embedding_dim)
        self.spec = {"type": "teacher_embeddings", "module": spec, "out_dim": self.out_dim}

    def forward(self, ids, mask):
        return self.emb(input_ids=ids) * mask[..., None].float(), mask


class TokenEmbedding(nn.Module):
    """A token embedding over a vocabulary (0 = padding, 1 = unknown)."""

    def __init__(self, vocab_size: int, dim: int, positions: bool = True):
        super().__init__()
        self.emb = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.out_dim = dim
        self.positions = bool(positions)
        self.spec = {"type": "embedding", "vocab_size": vocab_size, "dim": dim, "positions": self.positions}

    def forward(self, ids, mask):
        x = self.emb(ids)
        if self.positions:  # as BERT's embedding layer: the student core has no positions of its own
            x = x + sinusoidal_positions(ids.shape[1], x.shape[-1], device=x.device, dtype=x.dtype)[None]
        return x * mask[..., None].to(x.dtype), mask


def build_input_encoder(spec: dict) -> nn.Module:
    t = spec["type"]
    if t == "stem":
        return WaveStem(spec["channels"], spec["layers"])
    if t == "logmel":
        return LogMelStem(
            spec["channels"], spec["halvings"], spec.get("sample_rate", SAMPLE_RATE), spec.get("scale", 1.0)
        )
    if t == "embedding":
        return TokenEmbedding(spec["vocab_size"], spec["dim"], spec.get("positions", True))
    if t == "teacher_cnn":
        return TeacherWaveEncoder(
            _rebuild_module(spec["module"]), spec["kernels"], spec["strides"], spec["out_dim"], spec=spec["module"]
        )
    if t == "teacher_embeddings":
        return TeacherTokenEncoder(_rebuild_module(spec["module"]), spec=spec["module"])
    raise ValueError(f"unknown input encoder type {t!r}")
