"""Whisper fine-tuning: the model owns a trainable Whisper encoder and reads the waveform.

    sertool train FEATS -m whisper_ft                          # the packaged tiny.en, every layer trained
    sertool train FEATS -m whisper_ft --set model.train_layers=1   # only the top layer (the cheap CPU option)

``data.audio: wave`` (set by the model's YAML): the batch holds each utterance's 16 kHz samples
(z-normalised per utterance by the data pipeline; scaled here to ``WAVE_RMS``, a usual speech level,
since Whisper's log-Mel is not scale invariant).  Each clip becomes its own Whisper log-Mel frames
(no 30 s padding: :meth:`WhisperAudioEncoder.log_mel`), the encoder returns every layer (the front
end and each transformer layer), a learned softmax weighting of the layers (SUPERB;
:class:`blocks.LayerWeights`, weights start equal) gives one sequence, statistics pooling (mean +
std over the clip's real states) and a linear classifier give the logits.  ``model.pooled_norm:
batch`` standardises the pooled statistics with a BatchNorm (no affine parameters; running
averages at evaluation), as SpeechBrain's ECAPA-TDNN does after its pooling (Desplanques et al.,
2020).  Why: tiny.en's pooled statistics differ between clips by about a tenth of their common
offset (median over the 768 channels of 300 RAVDESS clips, equal layer weights: spread 0.030,
offset 0.32), which the probe's global normalisation removes and a linear head on the raw
statistics learns only slowly (its first, encoder-frozen epoch stays at chance).  A clip's output does not
depend on its batch (the encoder masks what lies past each clip).

``model.encoder``: ``tiny.en`` (packaged), a faster-whisper or transformers folder, or a hub id
(:func:`sertool.features.whisper.resolve_whisper`).  :meth:`prepare_config` records the encoder's
sizes in ``model.encoder_config``, so the architecture is rebuilt from the experiment's config
(``sertool evaluate``, ``predict``) and the fine-tuned weights, the whole encoder included, come
from the run's model.safetensors; :meth:`load_pretrained` (the train stage, new runs only) loads
the checkpoint's weights.

The fine-tuning recipe lives in the one training loop (sertool/train.py), through two hooks:
:meth:`param_groups` names the encoder's parameters (``optim.encoder_lr_scale`` x the schedule's
learning rate) and :meth:`set_encoder_trainable` is called at the start of each epoch (frozen for
the first ``train.freeze_encoder_epochs``).  ``model.train_layers: N`` > 0 trains only the top N
encoder layers (and the final layer norm); the front end and the lower layers stay as loaded and
run without a backward pass.  ``model.gradient_checkpointing`` recomputes each trained layer's
activations in the backward pass (less memory for long clips).

``model.cache_frozen: true`` (the default; only with ``train_layers`` > 0): the frozen part's
hidden states (front end and lower layers; all of them enter the layer weighting) are computed
once per utterance id and kept in memory (``model.cache_dtype``: float32, or float16 for half the
memory), so every later epoch, dev and test pass runs only the trained top layers.  Exact: the
encoder has no dropout and a clip's states do not depend on its batch; a waveform augmentation
(``data.augment``) gives each utterance the same copy every epoch, under its own id.  Memory:
(lower layers + 1) x frames x D values per utterance, e.g. 1.6 GB for RAVDESS's 1,440 clips with
tiny.en's front end and 3 frozen layers in float32.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
import torch.nn as nn

from .registry import PooledAudioModel, register
from .whisper_encoder import WhisperAudioEncoder, load_whisper_encoder

WAVE_RMS = 0.05  # the level (-26 dBFS) the z-normalised waveform is scaled to before the log-Mel
SIZE_KEYS = (
    "d_model",
    "encoder_layers",
    "encoder_attention_heads",
    "encoder_ffn_dim",
    "num_mel_bins",
    "max_source_positions",
)
_LOADED: dict[str, WhisperAudioEncoder] = {}  # resolved checkpoint path -> encoder, read once per process


def resolve_encoder(name: str) -> str:
    """The checkpoint path of ``model.encoder`` (packaged name, folder or hub id); ValueError if none."""
    from sertool.features.base import ExtractorError
    from sertool.features.whisper import resolve_whisper

    if not name:
        raise ValueError("model.encoder: give a Whisper model (tiny.en, a folder or a hub id)")
    try:
        return str(resolve_whisper(str(name), option="model.encoder").path)
    except ExtractorError as e:
        raise ValueError(str(e)) from None


def pretrained_encoder(name: str) -> WhisperAudioEncoder:
    """The encoder of checkpoint ``name``, loaded on the CPU once per process (do not train it: copy it)."""
    from .whisper_encoder import WhisperWeightsError

    path = resolve_encoder(name)
    if path not in _LOADED:
        try:
            with torch.device("cpu"):
                _LOADED[path] = load_whisper_encoder(path)
        except WhisperWeightsError as e:
            raise ValueError(f"model.encoder {name!r}: {e}") from None
    return _LOADED[path]


def encoder_sizes(encoder: WhisperAudioEncoder) -> dict:
    config = encoder.encoder.config
    return {k: int(getattr(config, k)) for k in SIZE_KEYS}


def empty_encoder(sizes: dict) -> WhisperAudioEncoder:
    """A Whisper encoder of these sizes with untrained weights (the checkpoint's are loaded after)."""
    from .whisper_encoder import EncoderSizes, WhisperEncoderModule

    return WhisperAudioEncoder(WhisperEncoderModule(EncoderSizes(**{k: int(sizes[k]) for k in SIZE_KEYS})))


@register("whisper_ft")
class WhisperFT(PooledAudioModel):
    """A trainable Whisper encoder + layer weights + statistics pooling + linear classifier."""

    def __init__(
        self,
        *,
        modality,
        encoder,
        encoder_config,
        n_classes,
        task,
        dropout,
        train_layers,
        gradient_checkpointing,
        cache_frozen,
        cache_dtype,
        pooled_norm,
    ):
        super().__init__()
        if modality != "audio":
            raise ValueError(f"model whisper_ft reads audio (model.modality: audio), got {modality!r}")
        self.modalities = ("audio",)
        self.encoder_name = encoder
        sizes = encoder_config or encoder_sizes(pretrained_encoder(encoder))
        self.encoder = empty_encoder(sizes)
        self.encoder.gradient_checkpointing = bool(gradient_checkpointing)
        n_layers = self.encoder.n_layers
        if not 0 <= int(train_layers) <= n_layers:
            raise ValueError(
                f"model.train_layers {train_layers!r}: 0 (every layer) to {n_layers} (the encoder's layers)"
            )
        lower = self.encoder.front_end() if int(train_layers) else None
        if lower is not None:  # the front end and the lower layers stay as loaded
            lower.requires_grad_(False)
            for layer in self.encoder.encoder.layers[: n_layers - int(train_layers)]:
                layer.requires_grad_(False)
        # frozen states per utterance id (model.cache_frozen): [lower layers + 1, real states, D]
        self.n_frozen = n_layers - int(train_layers) if int(train_layers) else 0
        if cache_dtype not in ("float32", "float16"):
            raise ValueError(f"model.cache_dtype must be float32 or float16, got {cache_dtype!r}")
        self.cache_dtype = getattr(torch, cache_dtype)
        self.frozen_cache: dict[str, torch.Tensor] | None = {} if cache_frozen and self.n_frozen else None
        # the encoder parameters fine-tuning trains (positions are fixed in Whisper)
        self._trained = [n for n, p in self.encoder.named_parameters() if p.requires_grad]
        self._build_head(self.encoder.dim, n_layers + 1, dropout, pooled_norm, task, n_classes)

    # ------------------------------------------------------------------ train-stage hooks
    def load_pretrained(self) -> None:
        """The checkpoint's encoder weights (the train stage calls this for a new run)."""
        src = pretrained_encoder(self.encoder_name)
        if encoder_sizes(src) != encoder_sizes(self.encoder):
            raise ValueError(
                f"model.encoder {self.encoder_name!r}: its sizes {encoder_sizes(src)} are not this "
                f"experiment's {encoder_sizes(self.encoder)}; train again"
            )
        self.encoder.encoder.load_state_dict(src.encoder.state_dict())

    def encoder_layers(self) -> nn.ModuleList:
        return self.encoder.encoder.layers

    @classmethod
    def prepare_config(cls, cfg: dict) -> None:
        """Read the encoder's sizes into ``model.encoder_config``; the input is the waveform."""
        m, data = cfg["model"], cfg["data"]
        if data.get("audio") != "wave":
            raise ValueError(
                f"model whisper_ft reads the waveform (data.audio: wave), got data.audio {data.get('audio')!r}"
            )
        src = pretrained_encoder(m["encoder"])
        m["encoder_config"] = encoder_sizes(src)  # derived from model.encoder, never a setting of its own
        window = src.max_mel_frames * 160  # samples in the encoder's window (30 s)
        if not (data.get("max_steps") or {}).get("audio"):
            data.setdefault("max_steps", {})["audio"] = window

    # ------------------------------------------------------------------ forward
    def _waves(self, batch: dict) -> list[np.ndarray]:
        wave, mask = batch["audio"], batch.get("audio_mask")
        n = mask.sum(1).tolist() if mask is not None else [wave.shape[1]] * wave.shape[0]
        host = wave.detach().float().cpu().numpy()
        return [np.asarray(host[i, : int(k)]) * WAVE_RMS for i, k in enumerate(n)]

    def forward(self, batch: dict, return_attention: bool = False):
        out = self.head(*self._states(batch))
        return (out, {}) if return_attention else out

    def frames(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned weighting of every hidden state, [B, T, D] at 50 Hz, and the real-state mask:
        what the head pools (and what a sequence head reads: ``model.encoders``, sertool/models/owned.py)."""
        states, n_states = self._states(batch)
        return self.weighted(states), self.state_mask(n_states, states[0].shape[1])

    def _states(self, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        if self.frozen_cache is not None and batch.get("ids") is not None:
            return self._from_cache(batch)
        device = batch["audio"].device
        mel, frames = self.encoder.log_mel(self._waves(batch))
        return list(self.encoder(mel.to(device), frames.to(device))), (frames.to(device) + 1) // 2

    def _from_cache(self, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every hidden state of the batch, the frozen ones from ``frozen_cache`` (computed for the
        utterances not seen yet), the trained top layers run on them."""
        cache, device = self.frozen_cache, batch["audio"].device
        waves = self._waves(batch)
        # keyed by id and content: an id reused for other samples (another file, segment) is not a hit
        ids = [
            f"{uid}:{hashlib.blake2b(w.tobytes(), digest_size=8).hexdigest()}" for uid, w in zip(batch["ids"], waves)
        ]
        new = [i for i, key in enumerate(ids) if key not in cache]
        if new:
            mel, frames = self.encoder.log_mel([waves[i] for i in new])
            with torch.no_grad():
                lower = self.encoder(mel.to(device), frames.to(device), up_to=self.n_frozen)
            for j, i in enumerate(new):
                n = (int(frames[j]) + 1) // 2
                cache[ids[i]] = torch.stack([s[j, :n] for s in lower]).to(self.cache_dtype)
        items = [cache[uid] for uid in ids]
        n_states = torch.tensor([int(c.shape[1]) for c in items], device=device)
        t = int(n_states.max())
        dtype = self.encoder.encoder.conv1.weight.dtype
        lower = torch.zeros(len(items), self.n_frozen + 1, t, self.encoder.dim, dtype=dtype, device=device)
        for b, c in enumerate(items):
            lower[b, :, : c.shape[1]] = c.to(device=device, dtype=dtype)
        key_mask = self.encoder.key_mask(n_states, t, dtype) if int(n_states.min()) < t else None
        states = list(lower.unbind(1))
        return states + self.encoder.blocks(states[-1], key_mask, self.n_frozen, self.encoder.n_layers), n_states
