"""IEMOCAP (Busso et al. 2008), the release layout:

    IEMOCAP_full_release/Session{1..5}/
      dialog/EmoEvaluation/<dialog>.txt      "[start - end]\t<utt>\t<label>\t[V, A, D]"
      dialog/transcriptions/<dialog>.txt     "<utt> [start-end]: text"
      sentences/wav/<dialog>/<utt>.wav
      sentences/ForcedAlignment/<dialog>/<utt>.wdseg   word timings (10 ms frames), when present

Speakers are per session and gender (Ses01F_impro01_M003 is the male speaker of session 1:
the last field's letter is the speaker's gender). Labels are read as the full names below;
`labels="4class"` keeps neutral, happy (+ excited merged into happy), angry, sad — the set of
the KS-Transformer, Krishna D N and CMD papers — and `labels="7class"` Rajan et al.'s seven
(neutral, happy, angry, sad, excited, frustrated, surprised); `labels="all"` keeps everything.
The valence of the evaluation line is stored as `score`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sertool.corpora.base import Utterance

LABEL_NAMES = {
    "neu": "neutral",
    "hap": "happy",
    "exc": "excited",
    "ang": "angry",
    "sad": "sad",
    "fru": "frustrated",
    "sur": "surprised",
    "fea": "fearful",
    "dis": "disgusted",
    "oth": "other",
    "xxx": "undecided",
}
LABEL_SETS = {
    "all": None,
    "4class": {"neutral": "neutral", "happy": "happy", "excited": "happy", "angry": "angry", "sad": "sad"},
    "7class": {k: k for k in ("neutral", "happy", "angry", "sad", "excited", "frustrated", "surprised")},
}
_EVAL = re.compile(
    r"^\[(?P<start>[\d.]+)\s*-\s*(?P<end>[\d.]+)\]\s+(?P<utt>\S+)\s+(?P<label>\w+)\s+\[(?P<vad>[^\]]*)\]"
)
_TRANS = re.compile(r"^(?P<utt>Ses\d\d[FM]_\S+)\s+\[[^\]]*\]:\s*(?P<text>.*)$")


def looks_like(root: Path) -> bool:
    return any((root / f"Session{i}" / "dialog" / "EmoEvaluation").is_dir() for i in range(1, 6))


def read_wdseg(path: Path) -> list[list]:
    """Word timings from a .wdseg file: frames are 10 ms; <s>, </s>, <sil> are dropped, WORD(2) -> word."""
    words = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[1:]:
        parts = line.split()
        if len(parts) < 4 or not parts[0].isdigit():
            continue
        start, end, word = int(parts[0]), int(parts[1]), parts[3]
        if word.startswith("<") or word.startswith("++"):
            continue
        word = re.sub(r"\(\d+\)$", "", word).lower()
        words.append([word, start / 100.0, (end + 1) / 100.0])
    return words


def read_iemocap(
    root: str | os.PathLike, *, problems: list[tuple[str, str]] | None = None, labels: str = "all"
) -> list[Utterance]:
    if labels not in LABEL_SETS:
        raise ValueError(f"labels must be one of {list(LABEL_SETS)}, got {labels!r}")
    keep = LABEL_SETS[labels]
    problems = problems if problems is not None else []
    root = Path(root).resolve()
    utts = []
    for session_dir in sorted(root.glob("Session[1-5]")):
        session = session_dir.name
        texts: dict[str, str] = {}
        for tfile in sorted((session_dir / "dialog" / "transcriptions").glob("*.txt")):
            for line in tfile.read_text(encoding="utf-8", errors="replace").splitlines():
                m = _TRANS.match(line.strip())
                if m:
                    texts[m["utt"]] = m["text"].strip()
        for efile in sorted((session_dir / "dialog" / "EmoEvaluation").glob("*.txt")):
            dialog = efile.stem
            for line in efile.read_text(encoding="utf-8", errors="replace").splitlines():
                m = _EVAL.match(line.strip())
                if not m:
                    continue
                uid, code = m["utt"], m["label"]
                label = LABEL_NAMES.get(code)
                if label is None:
                    problems.append((str(efile), f"{uid}: unknown label code {code!r}; skipped"))
                    continue
                if keep is not None:
                    if label not in keep:
                        continue
                    label = keep[label]
                wav = session_dir / "sentences" / "wav" / dialog / f"{uid}.wav"
                if not wav.exists():
                    problems.append((str(wav), f"{uid}: audio file missing; skipped"))
                    continue
                try:
                    valence = float(m["vad"].split(",")[0])
                except ValueError:
                    valence = None
                wdseg = session_dir / "sentences" / "ForcedAlignment" / dialog / f"{uid}.wdseg"
                words = read_wdseg(wdseg) if wdseg.exists() else None
                gender = uid.split("_")[-1][0]
                utts.append(
                    Utterance(
                        id=uid,
                        audio=str(wav),
                        text=texts.get(uid, ""),
                        label=label,
                        score=valence,
                        speaker=f"{uid[:5]}_{gender}",
                        session=session,
                        words=words,
                        extra={
                            "dialog": dialog,
                            "improvised": "impro" in dialog,
                            "raw_label": code,
                            "text_source": "corpus",
                            "word_timings": "wdseg" if words is not None else None,
                        },
                    )
                )
    for u in utts:
        if u.extra.get("word_timings") is None:
            u.extra.pop("word_timings")
    return utts
