"""Corpus readers: pure functions `read_<corpus>(root, ...) -> list[Utterance]`, validated.

`read_corpus(root)` picks the reader by `corpus=` or by looking at the folder.
`READERS` is the registry (the CLI's `--corpus` choices come from it) and `DETECTORS` the layout
tests: a new corpus is one module here plus its line in each (docs/extending.md).
Readers never stop on one bad entry: they skip it and append (file, reason) to `problems`,
which the extract stage writes to errors.tsv.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from sertool.corpora import iemocap, meld, mosei, ravdess
from sertool.corpora.base import (  # noqa: F401
    AUDIO_EXTENSIONS,
    CorpusError,
    Utterance,
    read_manifest,
    safe_id,
    validate,
    write_manifest,
)
from sertool.corpora.folder import read_folder
from sertool.corpora.iemocap import read_iemocap
from sertool.corpora.meld import read_meld
from sertool.corpora.mosei import read_mosei, read_mosi
from sertool.corpora.ravdess import read_ravdess

READERS: dict[str, Callable[..., list[Utterance]]] = {
    "folder": read_folder,
    "ravdess": read_ravdess,
    "iemocap": read_iemocap,
    "meld": read_meld,
    "mosei": read_mosei,
    "mosi": read_mosi,
}


# Layout tests, in order (the first match wins): (corpus name, looks_like(root)); a test may
# return the corpus name itself when one layout serves several corpora (mosei / mosi).
DETECTORS: list[tuple[str, Callable[[Path], bool | str | None]]] = [
    ("iemocap", iemocap.looks_like),
    ("meld", meld.looks_like),
    ("mosei", mosei.looks_like),
    ("ravdess", ravdess.looks_like),
]


def detect_corpus(root: str | os.PathLike) -> str:
    """Guess the layout of a corpus folder (the generic `folder` layout when nothing matches)."""
    root = Path(root)
    if not root.is_dir():
        raise CorpusError(f"{root}: corpus folder does not exist or is not a folder")
    for name, looks_like in DETECTORS:
        found = looks_like(root)
        if found:
            return found if isinstance(found, str) else name
    return "folder"


def read_corpus(
    root: str | os.PathLike, corpus: str | None = None, *, problems: list[tuple[str, str]] | None = None, **options
) -> tuple[str, list[Utterance]]:
    """Read a corpus folder; returns (corpus name, validated utterances)."""
    name = corpus or detect_corpus(root)
    if name not in READERS:
        raise CorpusError(f"unknown corpus {name!r}; known: {', '.join(READERS)}")
    if not Path(root).is_dir():
        raise CorpusError(f"{root}: corpus folder does not exist or is not a folder")
    problems = problems if problems is not None else []
    utts = READERS[name](root, problems=problems, **options)
    if not utts:
        message = f"{root}: no utterances found for corpus layout {name!r}"
        if problems:
            message += f"; {len(problems)} entr{'y' if len(problems) == 1 else 'ies'} skipped: {summarize(problems)}"
        raise EmptyCorpusError(message, problems)
    return name, validate(utts)


class EmptyCorpusError(CorpusError):
    """No utterance read; `problems` says why (the extract stage writes them to errors.tsv)."""

    def __init__(self, message: str, problems: list[tuple[str, str]]):
        super().__init__(message)
        self.problems = list(problems)


def summarize(problems: list[tuple[str, str]], most: int = 3) -> str:
    """'10 × lies outside the corpus folder (e.g. c/wavs/a.wav), 2 × …': the reasons, counted, with
    the file-specific parts (quoted names) left out, most frequent first."""
    groups: dict[str, list[str]] = {}
    for where, reason in problems:
        key = re.sub(r"'[^']*'|\"[^\"]*\"", "…", reason)
        groups.setdefault(key, []).append(where)
    ranked = sorted(groups.items(), key=lambda kv: -len(kv[1]))
    parts = [f"{len(w)} × {k} (e.g. {w[0]})" for k, w in ranked[:most]]
    if len(ranked) > most:
        parts.append(f"{sum(len(w) for _, w in ranked[most:])} with {len(ranked) - most} other reason(s)")
    return ", ".join(parts)
