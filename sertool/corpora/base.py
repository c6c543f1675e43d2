"""The utterance record, manifest I/O and validation shared by every corpus reader.

A manifest is JSON Lines, one utterance per line, with the fields of DESIGN.md. Audio paths
are stored relative to the manifest's folder when the audio lies below it, absolute otherwise,
so a features folder can be moved together with its corpus.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from sertool.utils import atomic_open

AUDIO_EXTENSIONS = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".aiff", ".aif")

# An id is used as an HDF5 dataset name and as a file name, so it is restricted to a
# portable subset: no path separators, no leading dot, no control characters.
_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-\[\]+=,@]*$")
MAX_ID_LENGTH = 200


class CorpusError(ValueError):
    """A corpus or manifest that cannot be used, with the file or key that is wrong."""


@dataclass
class Utterance:
    id: str
    audio: str | None = None  # absolute path in memory; relative to the manifest on disk
    duration: float | None = None  # seconds (of the segment when start/end are set)
    sample_rate: int | None = None  # of the audio file
    text: str = ""
    label: str | None = None
    score: float | None = None
    speaker: str | None = None
    session: str | None = None
    split: str | None = None
    words: list | None = None  # [[word, start_s, end_s], ...] relative to the segment start
    start: float | None = None  # segment of a longer file (CMU-MOSEI), seconds
    end: float | None = None
    extra: dict = field(default_factory=dict)  # corpus-specific: gender, intensity, text_source …

    def to_json(self, relative_to: Path | None = None) -> dict:
        record = {k: v for k, v in dataclasses.asdict(self).items() if v is not None}
        if not record.get("extra"):
            record.pop("extra", None)
        if self.audio and relative_to is not None:
            record["audio"] = _relative_path(Path(self.audio), relative_to)
        return record

    @classmethod
    def from_json(cls, record: dict, relative_to: Path | None = None) -> "Utterance":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(record) - known
        if unknown:
            raise CorpusError(f"unknown manifest field(s) {sorted(unknown)} in utterance {record.get('id')!r}")
        utt = cls(**record)
        if utt.audio and relative_to is not None and not os.path.isabs(utt.audio):
            utt.audio = str((relative_to / utt.audio).resolve())
        return utt


def _relative_path(path: Path, base: Path) -> str:
    path, base = path.resolve(), base.resolve()
    try:
        return os.path.relpath(path, base) if _shares_root(path, base) else str(path)
    except ValueError:  # different drives on Windows
        return str(path)


def _shares_root(path: Path, base: Path) -> bool:
    # Relative paths only when the corpus lies beside or below the features folder (they
    # share more than the file-system root), so moving both together keeps the manifest valid.
    common = os.path.commonpath([path, base])
    return common not in (os.path.sep, path.anchor) and os.path.relpath(path, base).count("..") <= 4


def safe_id(raw: str) -> str:
    """Turn a corpus key (a relative path, a MOSEI segment name …) into a safe id.

    ASCII keys keep their ids of earlier versions (a character outside the safe set becomes '_').
    A key with other characters (Cyrillic, Greek, CJK, accents …) keeps what reads the same in
    ASCII (accents folded: 'é' -> 'e') and gets a short hash of the whole key, so names that differ
    only in non-ASCII characters stay apart, and the id does not depend on the file system's Unicode
    normalisation (NFC and NFD spellings of one name give one id). A truncated key gets the hash too.
    """
    key = unicodedata.normalize("NFC", raw.replace("\\", "/").strip().strip("/"))
    s = key.replace("/", "__")
    lossy = not s.isascii()
    if lossy:
        folded = unicodedata.normalize("NFKD", s)
        s = "".join(c for c in folded if c.isascii() or not unicodedata.combining(c))
    s = re.sub(r"[^A-Za-z0-9._\-\[\]+=,@]", "_", s)
    s = re.sub(r"^[^A-Za-z0-9]+", "", s)
    if lossy or len(s) > MAX_ID_LENGTH:
        suffix = "-" + hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]
        s = re.sub(r"_{2,}$", "", s[: MAX_ID_LENGTH - len(suffix)].rstrip("_")) or "utt"
        return s + suffix
    return s or "utt"  # an id starts with a letter or digit (check_id)


def check_id(uid: Any) -> None:
    if not isinstance(uid, str) or not uid:
        raise CorpusError(f"utterance id {uid!r} is not a non-empty string")
    if len(uid) > MAX_ID_LENGTH or not _SAFE_ID.match(uid):
        raise CorpusError(
            f"utterance id {uid!r} is not safe as a file name (allowed: letters, digits and ._-[]+=,@, "
            f"not starting with a dot or dash, at most {MAX_ID_LENGTH} characters)"
        )


def validate(utts: Iterable[Utterance], *, check_audio_exists: bool = True) -> list[Utterance]:
    """Check a list of utterances; raise CorpusError naming the first bad utterance and key."""
    utts = list(utts)
    seen: dict[str, int] = {}
    for i, u in enumerate(utts):
        check_id(u.id)
        if u.id in seen:
            raise CorpusError(f"duplicate utterance id {u.id!r} (entries {seen[u.id]} and {i})")
        seen[u.id] = i
        if u.audio is None and not (u.text or "").strip():
            raise CorpusError(f"utterance {u.id!r} has neither audio nor text")
        if u.audio is not None and check_audio_exists and not os.path.exists(u.audio):
            raise CorpusError(f"utterance {u.id!r}: audio file {u.audio} does not exist")
        if not isinstance(u.text, str):
            raise CorpusError(f"utterance {u.id!r}: text must be a string, got {type(u.text).__name__}")
        if u.label is not None and (not isinstance(u.label, str) or not u.label):
            raise CorpusError(f"utterance {u.id!r}: label {u.label!r} must be a non-empty string")
        if u.score is not None and (not isinstance(u.score, (int, float)) or not math.isfinite(u.score)):
            raise CorpusError(f"utterance {u.id!r}: score {u.score!r} is not a finite number")
        if u.duration is not None and (not math.isfinite(u.duration) or u.duration < 0):
            raise CorpusError(f"utterance {u.id!r}: duration {u.duration!r} is not a non-negative number")
        if u.split is not None and u.split not in ("train", "dev", "test"):
            raise CorpusError(f"utterance {u.id!r}: split {u.split!r} is not train, dev or test")
        if u.words is not None:
            for w in u.words:
                if not (isinstance(w, (list, tuple)) and len(w) == 3 and isinstance(w[0], str)):
                    raise CorpusError(f"utterance {u.id!r}: word timing {w!r} is not [word, start, end]")
                if not (float(w[1]) <= float(w[2])):
                    raise CorpusError(f"utterance {u.id!r}: word {w[0]!r} ends before it starts")
    return utts


def write_manifest(utts: Iterable[Utterance], path: str | os.PathLike) -> Path:
    """Write a manifest atomically (temporary file, on disk, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(path, "w", fsync=True, encoding="utf-8") as f:
        for u in utts:
            f.write(json.dumps(u.to_json(relative_to=path.parent), ensure_ascii=False) + "\n")
    return path


def read_manifest(path: str | os.PathLike, *, check_audio_exists: bool = False) -> list[Utterance]:
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.jsonl"
    if not path.exists():
        raise CorpusError(f"manifest {path} does not exist (run `sertool extract` first)")
    utts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise CorpusError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict) or "id" not in record:
                raise CorpusError(f"{path}:{lineno}: a manifest line must be an object with an 'id'")
            try:
                utts.append(Utterance.from_json(record, relative_to=path.parent))
            except TypeError as e:
                raise CorpusError(f"{path}:{lineno}: {e}") from None
    try:
        return validate(utts, check_audio_exists=check_audio_exists)
    except CorpusError as e:
        raise CorpusError(f"{path}: {e}") from None
