"""wav2vec 2.0-family fine-tuning: the model owns a trainable wav2vec2 / HuBERT / WavLM /
data2vec-audio encoder and reads the waveform.

    sertool train FEATS -m wav2vec2_ft --set model.encoder=facebook/wav2vec2-base   # a hub id or a local folder
    sertool train FEATS -m wav2vec2_ft --set model.encoder=DIR --set model.train_layers=4

The wav2vec2-family counterpart of ``whisper_ft`` (issue 19), on the recipe of SpeechBrain's
wav2vec2 emotion model and of SUPERB's fine-tuned rows: ``data.audio: wave`` (the batch holds each
utterance's 16 kHz samples, z-normalised per utterance by the data pipeline, which is what these
checkpoints' feature extractors do with ``do_normalize``), the encoder (``transformers.AutoModel``)
returns every hidden state (the transformer input and each layer), and the head of
:class:`~sertool.models.registry.PooledAudioModel` gives the logits: a learned softmax weighting of
the states (SUPERB), statistics pooling over the clip's real frames (``_get_feat_extract_output_lengths``),
optional batch standardisation (``model.pooled_norm``), dropout and a linear classifier.

Batches: a clip's output does not depend on its batch.  The padded batch runs with an attention
mask.  A front end with group normalisation over time (``feat_extract_norm: group``: wav2vec2-base,
HuBERT-base) would take the padding into its first layer's statistics: a forward hook gives that
GroupNorm the statistics of each clip's real frames only (the later convolutions are unpadded, so
no real frame reads padding), which also keeps the forward pass one graph for ``sertool export``.
data2vec-audio's stacked positional convolutions carry padding into real frames, so its clips run in
groups of equal length (the rule of the ``wav2vec2`` extractor, sertool/features/ssl.py).

``model.encoder``: a local transformers folder or a hub id (offline-first; no wav2vec2 weights ship
with sertool).  :meth:`prepare_config` records the checkpoint's transformers config in
``model.encoder_config``, so ``evaluate`` and ``predict`` rebuild the architecture from the
experiment's config and load the fine-tuned weights from its model.safetensors.

Options (the usual wav2vec2 fine-tuning recipe; the train stage's ``optim.encoder_lr_scale``,
``optim.layer_decay`` and ``train.freeze_encoder_epochs`` apply as to ``whisper_ft``):

* ``model.freeze_feature_encoder: true``: the convolutional front end keeps the checkpoint's weights
  (transformers' ``freeze_feature_encoder``, as SpeechBrain and the wav2vec 2.0 paper's fine-tuning).
* ``model.train_layers: N`` > 0: only the top N transformer layers (and what follows them, e.g. the
  final layer norm of the stable-layer-norm variants) train; 0 = every layer.
* ``model.gradient_checkpointing``: transformers' gradient checkpointing of the encoder layers.
* In training the checkpoint's own regularisers stay on: its dropouts and SpecAugment time masking
  (``mask_time_prob``), as transformers applies them in training mode.

sertool choices: LayerDrop off (the checkpoint's ``layerdrop`` is set to 0: a skipped layer would
leave the learned layer weighting one hidden state short); no frozen-state cache (``whisper_ft``'s
``cache_frozen``): dropout and SpecAugment make the lower layers' outputs differ between epochs.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .registry import PooledAudioModel, register
from .text_ft import build_encoder, encoder_config_of, resolve_encoder

# models whose real frames change when the batch is zero-padded (sertool/features/ssl.py)
PADDING_CHANGES_RESULTS = {"data2vec-audio"}
WAV2VEC2_FAMILY = {"wav2vec2", "hubert", "wavlm", "data2vec-audio", "wav2vec2-conformer", "sew", "sew-d", "unispeech"}
_WHAT = "a wav2vec2-family speech model (a transformers folder or a hub id)"


def is_wav2vec2_family(encoder_config: dict) -> bool:
    return str(encoder_config.get("model_type", "")) in WAV2VEC2_FAMILY or "conv_stride" in encoder_config


def family_config(encoder, config: dict | None = None) -> dict:
    """The encoder's recorded (or checkpoint's) transformers config; a one-line ValueError when it is
    not a wav2vec2-family model."""
    config = config or encoder_config_of(encoder, what=_WHAT)
    if not is_wav2vec2_family(config):
        raise ValueError(
            f"model.encoder {encoder!r}: a {config.get('model_type')!r} model, not {_WHAT}; "
            "for Whisper checkpoints use -m whisper_ft"
        )
    return config


@register("wav2vec2_ft")
class Wav2Vec2FT(PooledAudioModel):
    """A trainable wav2vec2-family encoder + layer weights + statistics pooling + linear classifier."""

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
        freeze_feature_encoder,
        gradient_checkpointing,
        pooled_norm,
    ):
        super().__init__()
        if modality != "audio":
            raise ValueError(f"model wav2vec2_ft reads audio (model.modality: audio), got {modality!r}")
        self.modalities = ("audio",)
        self.encoder_name = encoder
        self.encoder = build_encoder(family_config(encoder, encoder_config))
        cfg = self.encoder.config
        cfg.layerdrop = 0.0  # a skipped layer would leave the layer weighting one hidden state short
        n_layers = int(cfg.num_hidden_layers)
        if not 0 <= int(train_layers) <= n_layers:
            raise ValueError(
                f"model.train_layers {train_layers!r}: 0 (every layer) to {n_layers} (the encoder's layers)"
            )
        # how a padded batch stays exact: a group-normalised front end gets the statistics of each
        # clip's real frames (_masked_front_norm); data2vec-audio runs its clips by equal length
        self._real_samples: torch.Tensor | None = None
        self.padding_group = "length" if getattr(cfg, "model_type", "") in PADDING_CHANGES_RESULTS else None
        first = self.encoder.feature_extractor.conv_layers[0]
        norm = getattr(first, "layer_norm", None)
        if self.padding_group is None and isinstance(norm, nn.GroupNorm):
            if norm.num_groups != norm.num_channels:
                self.padding_group = "length"
            else:
                norm.register_forward_hook(self._masked_front_norm)
        if gradient_checkpointing:
            self.encoder.gradient_checkpointing_enable()
        if int(train_layers):  # the top N layers and what follows them train; the rest stays as loaded
            depth = self.encoder_depths()
            top = n_layers - int(train_layers)
            for p in self.encoder.parameters():
                p.requires_grad_(depth[id(p)][0] > top)
        if freeze_feature_encoder:
            self.encoder.feature_extractor.requires_grad_(False)
        self._trained = [n for n, p in self.encoder.named_parameters() if p.requires_grad]
        self._build_head(int(cfg.hidden_size), n_layers + 1, dropout, pooled_norm, task, n_classes)

    def encoder_layers(self) -> nn.ModuleList:
        return self.encoder.encoder.layers

    def encoder_depths(self) -> dict[int, tuple[int, int]]:
        """As registered, except the stable-layer-norm variants' final layer norm: registered before the
        layers, applied after them, so it belongs with the top layer."""
        depths = super().encoder_depths()
        if getattr(self.encoder.config, "do_stable_layer_norm", False):
            n = len(self.encoder_layers())
            for p in self.encoder.encoder.layer_norm.parameters():
                depths[id(p)] = (n, n)
        return depths

    @staticmethod
    def min_wave_samples(model_cfg: dict) -> int:
        """The fewest samples that give one frame: the convolutional front end's receptive field
        (400 samples, 25 ms, for the standard front end)."""
        from sertool.features.ssl import receptive_field

        config = model_cfg.get("encoder_config") or {}
        kernels = config.get("conv_kernel") or []
        return receptive_field(kernels, config.get("conv_stride") or []) if kernels else 0

    # ------------------------------------------------------------------ train-stage hooks
    def load_pretrained(self) -> None:
        """The checkpoint's encoder weights (the train stage calls this for a new run)."""
        from transformers import AutoModel

        from sertool.features.hub import quiet_transformers

        path = resolve_encoder(self.encoder_name, what=_WHAT)
        with quiet_transformers():
            src = AutoModel.from_pretrained(path, local_files_only=True)
        missing, unexpected = self.encoder.load_state_dict(src.state_dict(), strict=False)
        missing = [k for k in missing if k in dict(self.encoder.named_parameters())]
        if missing or unexpected:
            raise ValueError(
                f"model.encoder {self.encoder_name!r}: the checkpoint's weights do not fit this experiment's "
                f"architecture (missing {missing[:3]}, unexpected {unexpected[:3]}); train again"
            )

    @classmethod
    def prepare_config(cls, cfg: dict) -> None:
        """Record the checkpoint's architecture in ``model.encoder_config``; the input is the waveform."""
        m, data = cfg["model"], cfg["data"]
        if data.get("audio") != "wave":
            raise ValueError(
                f"model wav2vec2_ft reads the waveform (data.audio: wave), got data.audio {data.get('audio')!r}"
            )
        m["encoder_config"] = family_config(m["encoder"])  # derived from model.encoder, never a setting of its own

    # ------------------------------------------------------------------ forward
    def _masked_front_norm(self, module, args, output):
        """Forward hook on the front end's first GroupNorm (one group per channel, statistics over
        time): the statistics of each clip's real frames only, so a zero-padded clip normalises as
        it does alone (the later convolutions are unpadded, so a real frame never reads padding)."""
        n = self._real_samples
        if n is None:
            return output
        h = args[0]
        conv = self.encoder.feature_extractor.conv_layers[0].conv
        frames = torch.div(n - conv.kernel_size[0], conv.stride[0], rounding_mode="floor") + 1
        real = (torch.arange(h.shape[-1], device=h.device)[None, :] < frames[:, None]).to(h.dtype)[:, None, :]
        count = real.sum(-1, keepdim=True).clamp_min(1.0)
        mean = (h * real).sum(-1, keepdim=True) / count
        var = (((h - mean) * real) ** 2).sum(-1, keepdim=True) / count
        y = (h - mean) / torch.sqrt(var + module.eps)
        return y * module.weight[None, :, None] + module.bias[None, :, None]

    def _states(self, batch: dict) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Every hidden state [B, T, D] (zeros past each clip) and each clip's real frame count."""
        wave, mask = batch["audio"], batch.get("audio_mask")
        if mask is None:
            mask = torch.ones(wave.shape, dtype=torch.bool, device=wave.device)
        lengths = mask.sum(1)
        n_states = self.encoder._get_feat_extract_output_lengths(lengths).long()
        x = wave.to(next(self.encoder.parameters()).dtype)
        if self.padding_group is None:  # one padded pass, with the attention mask
            self._real_samples = lengths
            try:
                states = self.encoder(x, attention_mask=mask.long(), output_hidden_states=True).hidden_states
            finally:
                self._real_samples = None
        else:  # clips of equal length together (data2vec-audio's stacked positional convolutions)
            states = self._by_length(x, lengths, n_states)
        keep = self.state_mask(n_states, states[0].shape[1])[..., None]
        return [s * keep.to(s.dtype) for s in states], n_states

    def _by_length(self, x: torch.Tensor, lengths: torch.Tensor, n_states: torch.Tensor) -> list[torch.Tensor]:
        groups: dict[int, list[int]] = {}
        for i, n in enumerate(lengths.tolist()):
            groups.setdefault(int(n), []).append(i)
        t, out = int(n_states.max()), None
        for n, rows in groups.items():
            states = self.encoder(x[rows, :n], output_hidden_states=True).hidden_states
            if out is None:
                out = [torch.zeros(x.shape[0], t, s.shape[-1], dtype=s.dtype, device=s.device) for s in states]
            index = torch.tensor(rows, device=x.device)
            out = [o.index_copy(0, index, nn.functional.pad(s, (0, 0, 0, t - s.shape[1]))) for o, s in zip(out, states)]
        return out

    def forward(self, batch: dict, return_attention: bool = False):
        out = self.head(*self._states(batch))
        return (out, {}) if return_attention else out

    def frames(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned weighting of every hidden state, [B, T, D] at 50 Hz, and the real-frame mask."""
        states, n_states = self._states(batch)
        return self.weighted(states), self.state_mask(n_states, states[0].shape[1])
