"""Text fine-tuning: the model owns a trainable BERT-family encoder and reads the transcript's tokens.

    sertool train FEATS -m text_ft                                 # the packaged MiniLM, every layer trained
    sertool train FEATS -m text_ft --set model.train_layers=2      # only the top 2 layers (the rest frozen)
    sertool train FEATS -m text_ft --set model.encoder=roberta-base --set model.pooling=cls

The text counterpart of ``whisper_ft``.  ``data.text: tokenizer:<model.encoder>`` (set by
:meth:`prepare_config`): the batch holds each utterance's token ids from the encoder's own tokenizer
(special tokens included, ``text_mask`` True on real tokens, zeros past them).  The encoder
(``transformers.AutoModel``) runs with that attention mask and returns every layer (the embedding
output and each transformer layer); a learned softmax weighting of the layers (SUPERB, Yang et al.,
Interspeech 2021; :class:`blocks.LayerWeights`, weights start equal) gives one sequence, pooled over
the utterance's real tokens, then dropout and a linear classifier (or one output for
``model.task: regression``).  An utterance's output does not depend on its batch's padding.

``model.pooling``: ``mean`` (the default: the mean over real tokens, [CLS] and [SEP] included, is
what sentence-transformers' all-MiniLM-L6-v2 was trained to produce) or ``cls`` (the first token's
state, as BERT's own sequence classifier; BERT's pooler dense+tanh is not used and not built).

``model.encoder``: ``minilm`` (the packaged all-MiniLM-L6-v2), a local transformers folder or a hub
id (:func:`sertool.features.hub.resolve_model`, offline-first).  :meth:`prepare_config` records the
encoder's transformers config in ``model.encoder_config``, so the architecture is rebuilt from the
experiment's config (``AutoConfig.for_model`` + ``AutoModel.from_config``: ``sertool evaluate``
reads no checkpoint) and the fine-tuned weights, the whole encoder included, come from the run's
model.safetensors; :meth:`load_pretrained` (the train stage, new runs only) loads the checkpoint's
weights.

Fine-tuning goes through the one training loop (sertool/train.py) and two hooks:
:meth:`param_groups` names the encoder's parameters (learning rate ``optim.encoder_lr_scale`` x the
schedule's) and :meth:`set_encoder_trainable` is called at the start of each epoch (frozen for the
first ``train.freeze_encoder_epochs``).  ``model.train_layers: N`` > 0 trains only the top N
transformer layers: the embeddings, the lower layers (and anything else outside the top N layers)
keep the checkpoint's weights, are not in the optimiser and run without a backward pass.

Texts longer than the tokenizer's limit (at most 512 tokens) are truncated to their first tokens
([SEP] kept) by :class:`sertool.data.TokenSource`; the train stage says how many once.

sertool choices: mean pooling over every real token (special tokens included, as
sentence-transformers); the layer weighting is the SUPERB one applied to a fine-tuned encoder (its
lower layers change too unless ``train_layers`` freezes them); no gradient checkpointing (utterance
transcripts are short).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .blocks import LayerWeights, masked_mean
from .registry import OwnEncoderModel, register

POOLINGS = ("mean", "cls")
# keys of a transformers config that do not describe the architecture (not recorded)
_NOT_ARCHITECTURE = (
    "architectures",
    "transformers_version",
    "_name_or_path",
    "torch_dtype",
    "dtype",
    "id2label",
    "label2id",
    "_attn_implementation_autoset",
)


TEXT_ENCODER = "a BERT-family text model (minilm, a transformers folder or a hub id)"


def resolve_encoder(name, what: str = TEXT_ENCODER) -> str:
    """The local folder of ``model.encoder`` (packaged alias, folder or hub id); a one-line ValueError if none."""
    from sertool.features.base import ExtractorError
    from sertool.features.hub import resolve_model

    if name is None or not str(name).strip():
        raise ValueError(f"model.encoder: give {what}")
    try:
        resolved = resolve_model(str(name), option="--set model.encoder=DIR")
    except ExtractorError as e:
        lines = str(e).splitlines()
        hint = "; download it where the hub is reachable and pass its folder" if len(lines) > 1 else ""
        raise ValueError(f"model.encoder {str(name)!r}: {lines[0].rstrip('.') if hint else lines[0]}{hint}") from None
    if resolved.kind != "transformers":
        raise ValueError(f"model.encoder {str(name)!r}: {resolved.path} is not a transformers model folder")
    return str(resolved.path)


def encoder_config_of(name, what: str = TEXT_ENCODER) -> dict:
    """The architecture of ``model.encoder``'s checkpoint: its transformers config as a plain dict."""
    from transformers import AutoConfig

    path = resolve_encoder(name, what)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(
            f"model.encoder {str(name)!r}: cannot read a transformers config in {path} ({first})"
        ) from None
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"model.encoder {str(name)!r}: an encoder-decoder model; give {what}")
    return {k: v for k, v in config.to_dict().items() if k not in _NOT_ARCHITECTURE}


def build_encoder(encoder_config: dict) -> nn.Module:
    """An encoder of this architecture with untrained weights (the checkpoint's are loaded after),
    without the pooler head (BERT's dense + tanh on [CLS]: not used here)."""
    from transformers import AutoConfig, AutoModel

    settings = dict(encoder_config)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    model = AutoModel.from_config(config)
    if getattr(model, "pooler", None) is not None:
        model.pooler = None
    return model


def transformer_layers(encoder: nn.Module, n_layers: int) -> nn.ModuleList:
    """The encoder's stack of transformer layers (``encoder.layer`` in BERT / RoBERTa / MPNet,
    ``transformer.layer`` in DistilBERT): the first ModuleList of ``n_layers`` modules."""
    for _, module in encoder.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n_layers:
            return module
    raise ValueError(f"model.encoder: no stack of {n_layers} transformer layers found in {type(encoder).__name__}")


@register("text_ft")
class TextFT(OwnEncoderModel):
    """A trainable BERT-family encoder + layer weights + pooling over real tokens + linear classifier."""

    def __init__(
        self,
        *,
        modality,
        encoder,
        encoder_config,
        n_classes,
        task,
        pooling,
        dropout,
        train_layers,
    ):
        super().__init__()
        if modality != "text":
            raise ValueError(f"model text_ft reads text (model.modality: text), got {modality!r}")
        if task not in ("classification", "regression"):
            raise ValueError(f"model.task must be regression|classification, got {task!r}")
        if pooling not in POOLINGS:
            raise ValueError(f"model.pooling must be {'|'.join(POOLINGS)}, got {pooling!r}")
        self.modalities = ("text",)
        self.encoder_name = encoder
        self.pooling = pooling
        self.encoder = build_encoder(encoder_config or encoder_config_of(encoder))
        config = self.encoder.config
        n_layers = int(config.num_hidden_layers)
        if not 0 <= int(train_layers) <= n_layers:
            raise ValueError(
                f"model.train_layers {train_layers!r}: 0 (every layer) to {n_layers} (the encoder's layers)"
            )
        if int(train_layers):  # only the top N layers train; the rest stays as loaded
            top = transformer_layers(self.encoder, n_layers)[n_layers - int(train_layers) :]
            keep = {id(p) for p in top.parameters()}
            for p in self.encoder.parameters():
                if id(p) not in keep:
                    p.requires_grad_(False)
        self._trained = [n for n, p in self.encoder.named_parameters() if p.requires_grad]
        self.layer_weights = nn.ModuleDict({"text": LayerWeights(n_layers + 1)})
        self.dropout = nn.Dropout(float(dropout))
        self.classifier = nn.Linear(int(config.hidden_size), 1 if task == "regression" else int(n_classes))

    # ------------------------------------------------------------------ train-stage hooks
    def load_pretrained(self) -> None:
        """The checkpoint's encoder weights (the train stage calls this for a new run)."""
        from transformers import AutoModel

        from sertool.features.hub import quiet_transformers

        path = resolve_encoder(self.encoder_name)
        with quiet_transformers():
            src = AutoModel.from_pretrained(path, local_files_only=True)
        if int(src.config.hidden_size) != int(self.encoder.config.hidden_size) or int(
            src.config.num_hidden_layers
        ) != int(self.encoder.config.num_hidden_layers):
            raise ValueError(
                f"model.encoder {self.encoder_name!r}: its architecture is not this experiment's "
                "(model.encoder_config); train again"
            )
        state = {k: v for k, v in src.state_dict().items() if not k.startswith("pooler.")}
        missing, unexpected = self.encoder.load_state_dict(state, strict=False)
        missing = [k for k in missing if k in dict(self.encoder.named_parameters())]
        if missing or unexpected:
            raise ValueError(
                f"model.encoder {self.encoder_name!r}: the checkpoint's weights do not fit its config "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )

    def encoder_layers(self) -> nn.ModuleList:
        return transformer_layers(self.encoder, int(self.encoder.config.num_hidden_layers))

    @classmethod
    def prepare_config(cls, cfg: dict) -> None:
        """Record the encoder's architecture in ``model.encoder_config``; the input is its tokenizer's ids."""
        m, data = cfg["model"], cfg["data"]
        want = f"tokenizer:{m['encoder']}"
        given = data.get("text")
        if given and str(given) != want:
            kind, _, target = str(given).partition(":")
            same = kind == "tokenizer" and target and _same_folder(target, m["encoder"])
            if not same:
                raise ValueError(
                    f"model text_ft reads its encoder's tokens (data.text: {want}), got data.text {given!r}; "
                    "leave data.text unset (--text is not needed)"
                )
        data["text"] = want
        # derived from model.encoder, never a setting of its own
        m["encoder_config"] = encoder_config_of(m["encoder"])

    # ------------------------------------------------------------------ forward
    def frames(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """The learned weighting of every hidden state, [B, L, D], and the token mask: what the head
        pools (and what a sequence head reads: ``model.encoders``, sertool/models/owned.py)."""
        ids = batch["text"].long()
        mask = batch.get("text_mask")
        if mask is None:
            mask = torch.ones_like(ids, dtype=torch.bool)
        mask = mask.to(torch.bool)
        out = self.encoder(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True)
        states = out.hidden_states
        weights = self.layer_weights["text"].weights()
        return torch.einsum("lbtd,l->btd", torch.stack(states), weights.to(states[0].dtype)), mask

    def forward(self, batch: dict, return_attention: bool = False):
        x, mask = self.frames(batch)
        pooled = x[:, 0] if self.pooling == "cls" else masked_mean(x, mask)
        logits = self.classifier(self.dropout(pooled))
        return (logits, {}) if return_attention else logits


def _same_folder(a: str, b: str) -> bool:
    try:
        return resolve_encoder(a) == resolve_encoder(b)
    except ValueError:
        return False
