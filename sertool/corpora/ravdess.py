"""RAVDESS (Livingstone & Russo 2018): labels, speaker, gender, intensity and text from file names.

File name fields: modality-vocal_channel-emotion-intensity-statement-repetition-actor, e.g.
03-01-05-02-01-01-12.wav = audio-only, speech, angry, strong, "Kids …", first take, actor 12.
Odd actors are male, even actors female. Speech files (vocal channel 01) are read by default;
song (02) by option. Video files (modality 01/02) have no separate audio and are skipped.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sertool.corpora.base import AUDIO_EXTENSIONS, Utterance

EMOTIONS = {
    "01": "neutral",
    "02": "calm",
    "03": "happy",
    "04": "sad",
    "05": "angry",
    "06": "fearful",
    "07": "disgust",
    "08": "surprised",
}
STATEMENTS = {"01": "Kids are talking by the door.", "02": "Dogs are sitting by the door."}
INTENSITY = {"01": "normal", "02": "strong"}
_NAME = re.compile(r"^(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)-(\d\d)$", re.ASCII)  # not other scripts' digits


def looks_like(root: Path) -> bool:
    for i, path in enumerate(root.rglob("*")):
        if path.suffix.lower() in AUDIO_EXTENSIONS and _NAME.match(path.stem):
            return True
        if i > 2000:
            break
    return False


def read_ravdess(
    root: str | os.PathLike, *, problems: list[tuple[str, str]] | None = None, vocal: str = "speech"
) -> list[Utterance]:
    """vocal: 'speech' (default), 'song' or 'both'."""
    problems = problems if problems is not None else []
    channels = {"speech": {"01"}, "song": {"02"}, "both": {"01", "02"}}[vocal]
    utts = []
    for path in sorted(Path(root).resolve().rglob("*")):
        if path.suffix.lower() not in AUDIO_EXTENSIONS or not path.is_file():
            continue
        m = _NAME.match(path.stem)
        if not m:
            problems.append((str(path), "file name is not a RAVDESS name (7 two-digit fields); skipped"))
            continue
        modality, channel, emotion, intensity, statement, repetition, actor = m.groups()
        if modality != "03" or channel not in channels:
            continue
        if emotion not in EMOTIONS or statement not in STATEMENTS or intensity not in INTENSITY:
            problems.append((str(path), "unknown emotion, intensity or statement code in the file name; skipped"))
            continue
        n = int(actor)
        utts.append(
            Utterance(
                id=path.stem,
                audio=str(path),
                text=STATEMENTS[statement],
                label=EMOTIONS[emotion],
                speaker=f"Actor_{n:02d}",
                session=None,
                extra={
                    "gender": "male" if n % 2 else "female",
                    "intensity": INTENSITY[intensity],
                    "statement": statement,
                    "repetition": repetition,
                    "vocal_channel": "speech" if channel == "01" else "song",
                    "text_source": "corpus",
                },
            )
        )
    return utts
