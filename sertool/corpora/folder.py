"""The generic layout any user can make: audio files plus metadata and/or sidecar transcripts.

    corpus/
      metadata.csv | metadata.tsv   columns: file, label, [text, speaker, session, split, score]
      any/sub/dirs/x.wav            (wav, flac, mp3, ogg …, found recursively)
      any/sub/dirs/x.txt            optional transcript next to the audio (used when no text column)

Without a metadata file every audio file is an unlabelled utterance (what `predict` needs).
Ids are the relative path without extension, '/' written as '__' (base.safe_id: non-ASCII names
keep their ASCII-readable part plus a short hash; two files whose ids would clash both stay, the
later one, in sorted order, with a hash of its path appended).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import os
from pathlib import Path

from sertool.corpora.base import AUDIO_EXTENSIONS, MAX_ID_LENGTH, CorpusError, Utterance, safe_id

METADATA_NAMES = ("metadata.csv", "metadata.tsv")
_RAW_FILE = "\0file"  # the 'file' value before stripping (a key no column can have)
_COLUMNS = ("file", "label", "text", "speaker", "session", "split", "score")
_ALIASES = {
    "path": "file",
    "audio": "file",
    "wav": "file",
    "emotion": "label",
    "transcript": "text",
    "transcription": "text",
    "speaker_id": "speaker",
    "fold": "session",
    "sentiment_score": "score",
}


def unique_id(uid: str, key: str, taken: dict[str, Path] | set[str]) -> str:
    """`uid`, or when another file already has it, `uid` plus a hash of this file's own key (and a
    counter in the unlikely case that is taken too): a clash never drops a file, and the id depends
    only on the file's relative path and the names sorted before it."""
    if uid not in taken:
        return uid
    digest = hashlib.sha1(key.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    base = f"{uid[: MAX_ID_LENGTH - 12]}-{digest}"
    candidate, n = base, 1
    while candidate in taken:
        candidate, n = f"{base}-{n}", n + 1
    return candidate


def find_audio(root: Path, problems: list[tuple[str, str]] | None = None) -> list[Path]:
    """The audio files below `root`, sorted, as paths below `root`.

    Symbolic links to folders and files are followed (whoever made the corpus folder put them
    there, e.g. `wavs -> /data/x/wavs`), after the folder's own tree, so each real folder and file
    is read once and by its own name where it has one; a second route to a folder is not walked
    again (nothing is lost). What cannot be read is never left out silently: unreadable folders,
    dangling or looping links, and a second name for an audio file already found are appended to
    `problems` (errors.tsv).
    """
    problems = problems if problems is not None else []
    found: dict[str, Path] = {}  # real path -> the first name it was found under
    seen_dirs = {os.path.realpath(root)}
    links: list[Path] = []  # folder links, walked after the tree without links

    def walk(folder: Path) -> None:
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as e:
            problems.append((str(folder), f"folder cannot be read ({e.strerror or e}); the files in it are skipped"))
            return
        for entry in entries:
            path = Path(entry.path)
            try:
                if entry.is_symlink() and not os.path.exists(path):
                    problems.append((str(path), _broken_link(path)))
                elif entry.is_dir():
                    if entry.is_symlink():
                        links.append(path)
                    elif os.path.realpath(path) not in seen_dirs:
                        seen_dirs.add(os.path.realpath(path))
                        walk(path)
                elif path.suffix.lower() in AUDIO_EXTENSIONS and entry.is_file():
                    real = os.path.realpath(path)
                    if real in found:
                        problems.append((str(path), f"the same audio file as {found[real]}; skipped"))
                    else:
                        found[real] = path
            except OSError as e:
                problems.append((str(path), f"cannot be read ({e.strerror or e}); skipped"))

    walk(root)
    while links:
        link = links.pop(0)
        real = os.path.realpath(link)
        if real not in seen_dirs:
            seen_dirs.add(real)
            walk(link)
    return sorted(found.values())


def _broken_link(path: Path) -> str:
    try:
        target = os.readlink(path)
    except OSError:
        target = "?"
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return f"link to {target!r} loops (a link that leads back to itself); skipped"
    return f"link to {target!r} is dangling (the target does not exist); skipped"


def read_text_file(path: Path, problems: list[tuple[str, str]] | None = None) -> str:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # never fails; the guess is reported
        if problems is not None:
            problems.append((str(path), "transcript is not UTF-8; read as Latin-1"))
    return " ".join(text.split())


def decode_table_bytes(raw: bytes) -> str:
    """UTF-8 (with or without BOM); tables saved by spreadsheet programs fall back to cp1252."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def read_table(path: Path) -> list[dict[str, str]]:
    """Read a CSV/TSV file into rows with canonical column names (see _ALIASES)."""
    content = decode_table_bytes(path.read_bytes())
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    # StringIO(newline=""), not str.splitlines: that also breaks rows at \f, \x1c-\x1e, \x85, U+2028/9
    reader = csv.DictReader(io.StringIO(content, newline=""), delimiter=delimiter)
    if reader.fieldnames is None:
        raise CorpusError(f"{path}: empty metadata file (no header line)")
    columns = [_ALIASES.get(c.strip().lower(), c.strip().lower()) for c in reader.fieldnames]
    if "file" not in columns:
        raise CorpusError(f"{path}: metadata needs a 'file' column (found {reader.fieldnames})")
    rows = []
    for row in reader:
        values = list(row.values())
        rows.append({c: (v.strip() if isinstance(v, str) else "") for c, v in zip(columns, values)})
        raw_file = values[columns.index("file")]
        if isinstance(raw_file, str) and raw_file != rows[-1]["file"]:
            rows[-1][_RAW_FILE] = raw_file  # a file name may itself begin or end with spaces
    return rows


def read_folder(
    root: str | os.PathLike, *, problems: list[tuple[str, str]] | None = None, metadata: str | None = None
) -> list[Utterance]:
    root = Path(root).resolve()
    problems = problems if problems is not None else []
    meta_path = Path(metadata) if metadata else next((root / n for n in METADATA_NAMES if (root / n).exists()), None)
    audio_files = find_audio(root, problems)
    rows_by_file: dict[str, tuple[int, dict[str, str]]] = {}  # real path -> (line, row)
    conflicts: list[str] = []
    if meta_path is not None:
        for lineno, row in enumerate(read_table(meta_path), 2):
            where = f"{meta_path}:{lineno}"
            rel = row.get("file", "")
            if not rel:
                problems.append((where, "row has an empty 'file' value; skipped"))
                continue
            # inside the corpus by name ('..' and absolute paths refused); links in it are followed
            path = Path(os.path.normpath(root / rel))
            raw = row.pop(_RAW_FILE, None)
            if raw is not None and not os.path.lexists(path) and os.path.lexists(root / raw):
                path = Path(os.path.normpath(root / raw))
            if not path.is_relative_to(root):
                problems.append((where, f"file {rel!r} lies outside the corpus folder; row skipped"))
                continue
            if os.path.lexists(path) and not path.exists():
                problems.append((where, f"file {rel!r}: {_broken_link(path).replace('; skipped', '; row skipped')}"))
                continue
            if not path.exists():
                problems.append((where, f"audio file {rel!r} does not exist; row skipped"))
                continue
            real = os.path.realpath(path)
            if real in rows_by_file:
                first, kept = rows_by_file[real]
                differ = [k for k in ("label", "score") if (row.get(k) or "") != (kept.get(k) or "")]
                if differ:
                    conflicts.append(
                        f"line {lineno} gives file {rel!r} "
                        + " and ".join(f"{k} {row.get(k) or ''!r}" for k in differ)
                        + f", line {first} "
                        + " and ".join(f"{k} {kept.get(k) or ''!r}" for k in differ)
                    )
                else:
                    problems.append((where, f"file {rel!r} is listed again (first on line {first}); row ignored"))
                continue
            rows_by_file[real] = (lineno, row)
    if conflicts:
        raise CorpusError(
            f"{meta_path}: {len(conflicts)} file(s) listed twice with different labels ({conflicts[0]}"
            f"{'; …' if len(conflicts) > 1 else ''}); keep one row per file"
        )
    utts = []
    ids: dict[str, Path] = {}
    used: set[str] = set()
    for path in audio_files:
        real = os.path.realpath(path)
        row = rows_by_file.get(real, (0, {}))[1]
        used.add(real)
        if meta_path is not None and not row and rows_by_file:
            # a metadata file lists the corpus; audio it does not mention is left out, loudly
            problems.append((str(path), f"not listed in {meta_path.name}; skipped"))
            continue
        rel = path.relative_to(root).with_suffix("").as_posix()
        uid = unique_id(safe_id(rel), path.relative_to(root).as_posix(), ids)
        ids[uid] = path
        text = row.get("text", "")
        extra = {}
        sidecar = path.with_suffix(".txt")
        if not text and sidecar.exists():
            text = read_text_file(sidecar, problems)
            extra["text_source"] = "sidecar"
        elif text:
            extra["text_source"] = "metadata"
        score = None
        if row.get("score"):
            try:
                score = float(row["score"])
            except ValueError:
                problems.append((str(path), f"score {row['score']!r} is not a number; left empty"))
        split = row.get("split") or None
        if split is not None:
            split = {"valid": "dev", "validation": "dev", "val": "dev", "training": "train"}.get(
                split.lower(), split.lower()
            )
            if split not in ("train", "dev", "test"):
                problems.append((str(path), f"split {row['split']!r} is not train/dev/test; left empty"))
                split = None
        for key, value in row.items():
            if key not in _COLUMNS and value:
                extra[key] = value
        utts.append(
            Utterance(
                id=uid,
                audio=str(path),
                text=text,
                label=row.get("label") or None,
                score=score,
                speaker=row.get("speaker") or None,
                session=row.get("session") or None,
                split=split,
                extra=extra,
            )
        )
    for real, (lineno, row) in rows_by_file.items():
        if real not in used:
            problems.append(
                (
                    f"{meta_path}:{lineno}",
                    f"file {row.get('file')!r} is not an audio file sertool reads "
                    f"({', '.join(AUDIO_EXTENSIONS)}) or was not reached; row skipped",
                )
            )
    return utts
