"""A store-fed model on encoders it owns and fine-tunes: ``model.input_encoders`` (issue 19).

    sertool train FEATS -m cma --set model.input_encoders.audio=tiny.en --set model.input_encoders.text=minilm

A model whose YAML has the ``input_encoders`` key (``cma``, ``self_attn``, ``cross_attn``) reads, for each
modality named there, the layer-weighted hidden states of a pretrained encoder it trains with
itself instead of a feature store: ``audio`` = a Whisper encoder on the waveform
(:class:`~sertool.models.whisper_ft.WhisperFT`'s encoder, layer weights and frozen-state cache:
``tiny.en``, a faster-whisper / transformers folder or a hub id) or, for a wav2vec2-family
checkpoint (wav2vec2, HuBERT, WavLM, data2vec-audio), that of
:class:`~sertool.models.wav2vec2_ft.Wav2Vec2FT`; ``text`` = a BERT-family encoder on its
tokenizer's ids (:class:`~sertool.models.text_ft.TextFT`'s: ``minilm``, a folder or a hub id).
The encoder's frames (``frames(batch)``: [B, T, D] and the real-frame mask) go to the model
exactly where a store's frames would, so the model itself is unchanged (its ``audio_dim`` /
``text_dim`` become the encoder's width).

A spec is the encoder's name, or the mapping of ``whisper_ft`` / ``wav2vec2_ft`` / ``text_ft``
model keys (e.g. ``{encoder: tiny.en, train_layers: 1}``); :func:`prepare_encoders` (the train
stage, before any input is read) expands it into the full mapping, architecture included, so ``evaluate`` and
``predict`` rebuild the encoders from the experiment's config, weights from its model.safetensors.
The fine-tuning recipe is the train stage's (``optim.encoder_lr_scale``,
``train.freeze_encoder_epochs``); the layer weights train with the head.
"""

from __future__ import annotations

import copy

import torch.nn as nn

from .registry import SERModel

# the model that owns each modality's encoder, and the input it reads
ENCODER_MODELS = {"audio": "whisper_ft", "text": "text_ft"}


def audio_encoder_model(name) -> str:
    """The model that owns an audio encoder of this name: ``wav2vec2_ft`` for a wav2vec2-family
    transformers checkpoint (wav2vec2, HuBERT, WavLM, data2vec-audio), else ``whisper_ft``."""
    from .text_ft import encoder_config_of
    from .wav2vec2_ft import is_wav2vec2_family

    try:
        config = encoder_config_of(name)
    except (ValueError, OSError):
        return "whisper_ft"  # a Whisper name or folder (CTranslate2 ones have no transformers config)
    return "wav2vec2_ft" if is_wav2vec2_family(config) else "whisper_ft"


def requested(model_cfg: dict) -> dict:
    """``{modality: spec}`` of the encoders a model config asks for (none: empty)."""
    return {m: s for m, s in (model_cfg.get("input_encoders") or {}).items() if s}


def prepare_encoders(cfg: dict) -> None:
    """Expand ``model.input_encoders`` into full encoder configs, set each modality's input (``data.audio:
    wave``, ``data.text: tokenizer:NAME``, no feature normalisation) and the model's input width.
    ValueError (one line) for a modality the model does not read or an input given as a store."""
    from .registry import _REGISTRY, default_config, list_models

    model, data = cfg["model"], cfg["data"]
    list_models()
    for m, spec in requested(model).items():
        if m not in ENCODER_MODELS:
            raise ValueError(f"model.input_encoders.{m}: encoders exist for {' and '.join(ENCODER_MODELS)}")
        if m not in (model.get("modalities") or [m]):
            raise ValueError(f"model.input_encoders.{m}: model {model['name']} does not read {m} (model.modalities)")
        given = dict(spec) if isinstance(spec, dict) else {"encoder": str(spec)}
        key = audio_encoder_model(given.get("encoder")) if m == "audio" else ENCODER_MODELS[m]
        sub = default_config(key)["model"]
        unknown = sorted(set(given) - set(sub))
        if unknown:
            raise ValueError(f"model.input_encoders.{m}: unknown key(s) {', '.join(unknown)} (those of model {key})")
        sub.update(given, name=key, n_classes=1, modality=m)
        if m == "audio" and data.get("audio") not in (None, "wave"):
            raise ValueError(
                "model.input_encoders.audio reads the waveform; leave the audio input unset "
                f"(got --audio {data['audio']!r})"
            )
        if m == "audio":
            data["audio"] = "wave"
        try:  # encoder_config, the input (and its checks)
            _REGISTRY[key].prepare_config({"model": sub, "data": data})
        except ValueError as e:
            raise ValueError(f"model.input_encoders.{m}: {e}") from None
        model["input_encoders"][m] = sub
        data.setdefault("normalize", {})[m] = "none"
        width = sub["encoder_config"]["d_model" if key == "whisper_ft" else "hidden_size"]
        model[f"{m}_dim"] = int(width)


class WithEncoders(SERModel):
    """``head`` (any store-fed model) on the encoders of ``encoders`` ({modality: encoder config})."""

    def __init__(self, head: SERModel, encoders: dict[str, dict]):
        super().__init__()
        from .registry import build_model

        self.head = head
        self.modalities = head.modalities
        self.encoders = nn.ModuleDict()
        for m, spec in encoders.items():
            enc = build_model({"model": copy.deepcopy(spec)})
            del enc.classifier  # only its frames are read: no parameter without a gradient
            self.encoders[m] = enc

    def forward(self, batch: dict, return_attention: bool = False):
        frames = dict(batch)
        for m, enc in self.encoders.items():
            frames[m], frames[f"{m}_mask"] = enc.frames(batch)
        return self.head(frames, return_attention=return_attention)

    # ------------------------------------------------------------------ train-stage hooks
    def encoder_parameters(self) -> list[nn.Parameter]:
        return [p for enc in self.encoders.values() for p in enc.encoder_parameters()]

    def encoder_depths(self) -> dict[int, tuple[int, int]]:
        return {k: v for enc in self.encoders.values() for k, v in enc.encoder_depths().items()}

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """``encoder``: the encoders' trained weights (lr x optim.encoder_lr_scale); ``head``: the model
        and the encoders' layer weights."""
        head = [*self.head.parameters(), *(p for enc in self.encoders.values() for p in enc.layer_weights.parameters())]
        return {"encoder": self.encoder_parameters(), "head": head}

    def set_encoder_trainable(self, trainable: bool) -> None:
        for enc in self.encoders.values():
            enc.set_encoder_trainable(trainable)

    def load_pretrained(self) -> None:
        for enc in self.encoders.values():
            enc.load_pretrained()
        if hasattr(self.head, "load_pretrained"):
            self.head.load_pretrained()

    def learned_layer_weights(self) -> dict[str, list[float]]:
        out = self.head.learned_layer_weights()
        for m, enc in self.encoders.items():
            out.update(enc.learned_layer_weights())
        return out
