"""MELD (Poria et al. 2019): `{train,dev,test}_sent_emo.csv`, audio optional.

Text-only copies (the CSVs alone) are valid corpora. When audio is present it is found by the
name MELD uses for its clips, `dia{D}_utt{U}.{wav,flac,mp3,mp4-extracted audio …}`, under a
folder whose name starts with the split (train_splits, dev_splits_complete,
output_repeated_splits_test …). Emotion is the label; sentiment is kept in `extra` and as a
score (-1, 0, 1).
"""

from __future__ import annotations

import csv
import io
import os
import re
from pathlib import Path

from sertool.corpora.base import AUDIO_EXTENSIONS, Utterance
from sertool.corpora.folder import decode_table_bytes

SPLITS = {"train": "train", "dev": "dev", "test": "test"}
SENTIMENT_SCORE = {"negative": -1.0, "neutral": 0.0, "positive": 1.0}
_CLIP = re.compile(r"^dia(\d+)_utt(\d+)$")


def looks_like(root: Path) -> bool:
    return any((root / f"{s}_sent_emo.csv").exists() for s in SPLITS)


def _find_audio(root: Path) -> dict[tuple[str, int, int], Path]:
    found = {}
    for path in root.rglob("*"):
        if path.suffix.lower() not in AUDIO_EXTENSIONS:
            continue
        m = _CLIP.match(path.stem)
        if not m:
            continue
        rel = path.relative_to(root).as_posix().lower()
        split = "test" if "test" in rel else "dev" if "dev" in rel else "train" if "train" in rel else None
        if split:
            found[(split, int(m[1]), int(m[2]))] = path
    return found


def read_meld(
    root: str | os.PathLike, *, problems: list[tuple[str, str]] | None = None, audio: bool = True
) -> list[Utterance]:
    problems = problems if problems is not None else []
    root = Path(root).resolve()
    clips = _find_audio(root) if audio else {}
    utts = []
    for split in SPLITS:
        csv_path = root / f"{split}_sent_emo.csv"
        if not csv_path.exists():
            continue
        rows = read_table_meld(csv_path)
        for lineno, row in enumerate(rows, 2):
            try:
                dia, utt_no = int(row["dialogue_id"]), int(row["utterance_id"])
            except (KeyError, ValueError):
                problems.append((f"{csv_path}:{lineno}", "Dialogue_ID/Utterance_ID missing or not a number; skipped"))
                continue
            text = " ".join(row.get("utterance", "").split())
            wav = clips.get((split, dia, utt_no))
            if not text and wav is None:
                problems.append(
                    (f"{csv_path}:{lineno}", f"dia{dia}_utt{utt_no}: empty utterance text and no audio; skipped")
                )
                continue
            sentiment = row.get("sentiment", "").lower() or None
            utts.append(
                Utterance(
                    id=f"{split}_dia{dia}_utt{utt_no}",
                    audio=str(wav) if wav else None,
                    text=text,
                    label=row.get("emotion", "").lower() or None,
                    score=SENTIMENT_SCORE.get(sentiment) if sentiment else None,
                    speaker=row.get("speaker") or None,
                    session=f"{split}_dia{dia}",
                    split=split,
                    extra={
                        "sentiment": sentiment,
                        "season": row.get("season"),
                        "episode": row.get("episode"),
                        "text_source": "corpus",
                    },
                )
            )
    return utts


def read_table_meld(path: Path) -> list[dict[str, str]]:
    # MELD has no 'file' column; read it as a plain CSV with lower-case keys. The original
    # release has cp1252 characters where UTF-8 is expected; decode_table_bytes handles both.
    content = decode_table_bytes(path.read_bytes())
    reader = csv.DictReader(io.StringIO(content, newline=""))  # not splitlines: U+2028 in an utterance is no row end
    return [{(k or "").strip().lower(): (v or "").strip() for k, v in row.items()} for row in reader]
