"""Reading the variables of a CTranslate2 ``model.bin`` (the format faster-whisper models ship in).

The file is little-endian and sequential:

* ``uint32`` binary version (5 and 6 share the layout read here);
* the spec name (``WhisperSpec``, ``TransformerSpec`` …) and a ``uint32`` spec revision;
* ``uint32`` count, then per variable: its name, ``uint8`` rank, ``uint32`` per dimension,
  ``uint8`` type id (0 float32, 1 int8, 2 int16, 3 int32, 4 float16, 5 bfloat16),
  ``uint32`` byte count and the raw values (C order);
* ``uint32`` count, then (alias, target name) pairs.

Strings are a ``uint16`` length (the terminating NUL included), the UTF-8 bytes and a NUL.
Quantised weights carry a ``<name>_scale`` variable: int8 rows were multiplied by their scale
(one per output row) and int16 tensors by one scalar, so `dequantized` divides it back out.

Nothing here imports CTranslate2: the reader needs numpy only. Every way a file can be wrong
(missing, truncated, not a CTranslate2 file, an unknown version or type) is one
`CT2FormatError` naming the file.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable

import numpy as np

SUPPORTED_VERSIONS = (5, 6)
_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16, 5: "bfloat16"}
_MAX_RANK = 8


class CT2FormatError(ValueError):
    """A file that is not a readable CTranslate2 model of the expected family."""


@dataclass
class CT2Model:
    path: str
    version: int
    spec: str  # the model family, e.g. "WhisperSpec"
    revision: int
    variables: dict[str, np.ndarray] = field(default_factory=dict)  # the ones that were selected
    aliases: dict[str, str] = field(default_factory=dict)  # alias -> variable name

    def names(self) -> list[str]:
        """Every name the file defines that was selected: variables and aliases."""
        return [*self.variables, *self.aliases]

    def get(self, name: str) -> np.ndarray:
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise CT2FormatError(f"{self.path}: {self.spec} model has no variable {name!r}")
        return self.variables[name]

    def dequantized(self, name: str) -> np.ndarray:
        """A variable as float32, int8/int16 quantisation undone with its ``_scale``."""
        value = self.get(name)
        scale_name = name + "_scale"
        if value.dtype in (np.int8, np.int16) and scale_name in self.names():
            scale = self.get(scale_name).astype(np.float32)
            if scale.ndim == 1:  # one scale per output row (int8); a conv kernel was flattened per row
                scale = scale.reshape((-1,) + (1,) * (value.ndim - 1))
            return value.astype(np.float32) / scale
        return value.astype(np.float32)


class _Reader:
    def __init__(self, f: BinaryIO, path: str, size: int):
        self.f, self.path, self.size = f, path, size

    def bytes(self, n: int, what: str) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise CT2FormatError(
                f"{self.path}: truncated CTranslate2 model file (ends inside {what}, {self.size} bytes)"
            )
        return data

    def skip(self, n: int, what: str) -> None:
        end = self.f.tell() + n
        if end > self.size:
            raise CT2FormatError(
                f"{self.path}: truncated CTranslate2 model file (ends inside {what}, {self.size} bytes)"
            )
        self.f.seek(end)

    def uint(self, fmt: str, what: str) -> int:
        return struct.unpack("<" + fmt, self.bytes(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.uint("H", what)
        raw = self.bytes(n, what)
        if n == 0 or raw[-1] != 0:
            raise CT2FormatError(f"{self.path}: not a CTranslate2 model file (bad string in {what})")
        try:
            return raw[:-1].decode("utf-8")
        except UnicodeDecodeError:
            raise CT2FormatError(f"{self.path}: not a CTranslate2 model file (bad string in {what})") from None


def read_ct2(path: str | os.PathLike, select: Callable[[str], bool] | None = None) -> CT2Model:
    """The header, aliases and the variables whose name `select` accepts (all when None).

    `path` is a ``model.bin`` or the folder holding one. Variables not selected (nor named by a
    selected alias) are skipped without being read, so loading a Whisper encoder does not read
    the decoder's embeddings."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "model.bin")
    if not os.path.isfile(path):
        raise CT2FormatError(f"{path}: no such CTranslate2 model file")
    size = os.path.getsize(path)
    index: dict[str, tuple[tuple[int, ...], Any, int, int]] = {}  # name -> shape, dtype, offset, bytes
    with open(path, "rb") as f:
        r = _Reader(f, path, size)
        version = r.uint("I", "the header")
        if version not in SUPPORTED_VERSIONS:
            raise CT2FormatError(
                f"{path}: not a CTranslate2 model file this reader knows (binary version {version}; "
                f"supported: {', '.join(map(str, SUPPORTED_VERSIONS))})"
            )
        model = CT2Model(path, version, r.string("the spec name"), r.uint("I", "the header"))
        for _ in range(r.uint("I", "the header")):
            name = r.string("a variable name")
            rank = r.uint("B", f"variable {name!r}")
            if rank > _MAX_RANK:
                raise CT2FormatError(f"{path}: not a CTranslate2 model file (variable {name!r} of rank {rank})")
            shape = tuple(r.uint("I", f"variable {name!r}") for _ in range(rank))
            type_id = r.uint("B", f"variable {name!r}")
            n_bytes = r.uint("I", f"variable {name!r}")
            if type_id not in _DTYPES:
                raise CT2FormatError(f"{path}: variable {name!r} has unknown type id {type_id}")
            dtype = _DTYPES[type_id]
            itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
            if n_bytes != int(np.prod(shape, dtype=np.int64)) * itemsize:
                raise CT2FormatError(
                    f"{path}: not a CTranslate2 model file (variable {name!r}: {n_bytes} bytes for shape {shape})"
                )
            index[name] = (shape, dtype, f.tell(), n_bytes)
            r.skip(n_bytes, f"variable {name!r}")
        aliases = {}
        for _ in range(r.uint("I", "the alias table")):
            alias = r.string("the alias table")
            aliases[alias] = r.string("the alias table")
        # an alias (CTranslate2 stores equal tensors once) may point anywhere: read its target too
        model.aliases = {a: t for a, t in aliases.items() if select is None or select(a)}
        wanted = {n for n in index if select is None or select(n)} | set(model.aliases.values())
        for name in sorted(wanted, key=lambda n: index[n][2] if n in index else -1):
            if name not in index:
                raise CT2FormatError(f"{path}: not a CTranslate2 model file (an alias names no variable {name!r})")
            shape, dtype, offset, n_bytes = index[name]
            f.seek(offset)
            raw = r.bytes(n_bytes, f"variable {name!r}")
            if dtype == "bfloat16":  # numpy has no bfloat16: widen the 16 high bits to float32
                value = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
            else:
                value = np.frombuffer(raw, dtype)
            model.variables[name] = value.reshape(shape)
    return model
