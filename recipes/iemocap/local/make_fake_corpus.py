#!/usr/bin/env python3
"""Write a small corpus in the IEMOCAP release layout, to run the recipe where IEMOCAP is absent.

    python recipes/iemocap/local/make_fake_corpus.py OUT [--per_label 2] [--audio espeak|synthetic]

OUT/Session{1..5}/dialog/EmoEvaluation/<dialog>.txt, dialog/transcriptions/<dialog>.txt,
sentences/wav/<dialog>/<utt>.wav and sentences/ForcedAlignment/<dialog>/<utt>.wdseg, with one
female (F) and one male (M) speaker per session, as in the release. Every speaker says
`--per_label` sentences of each of the 7 labels of Rajan et al.'s set (neu, hap, exc, ang, sad,
fru, sur) plus one `xxx` (no agreement, dropped by every label set).

Audio: `espeak` (default) speaks each word with espeak-ng, the voice's pitch and speed set by the
emotion, and joins the words with short pauses, so the .wdseg word timings are exact;
`synthetic` writes harmonic tones instead (no espeak-ng needed). The sentences and the prosody
differ by label, so a model can learn something, but the figures mean nothing about IEMOCAP.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import soundfile as sf

SR = 16000
LABELS = ("neu", "hap", "exc", "ang", "sad", "fru", "sur")
SENTENCES = {
    "neu": ["the meeting is at ten", "i will take the bus home", "the forms are on the desk"],
    "hap": ["this is a lovely day", "i am so glad you came", "what a nice surprise gift"],
    "exc": ["we won the whole thing", "i cannot wait to go", "this is the best news ever"],
    "ang": ["get out of my office", "you never listen to me", "stop lying to me now"],
    "sad": ["i miss him so much", "nothing will ever be the same", "she is not coming back"],
    "fru": ["why does this never work", "i have asked you three times", "the line is busy again"],
    "sur": ["wait you are here", "really is that true", "oh i did not expect that"],
    "xxx": ["i do not know what to say"],
}
# espeak-ng pitch (0-99), speed (words per minute), amplitude per label
PROSODY = {
    "neu": (45, 160, 100),
    "hap": (75, 185, 130),
    "exc": (85, 210, 160),
    "ang": (55, 200, 190),
    "sad": (30, 120, 70),
    "fru": (50, 175, 150),
    "sur": (90, 170, 140),
    "xxx": (50, 160, 100),
}
VAD = {
    "neu": (3.0, 2.5, 2.5),
    "hap": (4.0, 3.0, 3.0),
    "exc": (4.5, 4.0, 3.5),
    "ang": (1.5, 4.0, 4.0),
    "sad": (1.5, 2.0, 2.0),
    "fru": (2.0, 3.5, 3.0),
    "sur": (3.5, 4.0, 2.5),
    "xxx": (3.0, 3.0, 3.0),
}
PAUSE = 0.08  # seconds between words


def espeak_word(word: str, label: str, gender: str, tmp: Path) -> np.ndarray:
    pitch, speed, amp = PROSODY[label]
    voice = "en+f3" if gender == "F" else "en+m3"
    if gender == "M":
        pitch = max(0, pitch - 20)
    out = tmp / "w.wav"
    subprocess.run(
        ["espeak-ng", "-v", voice, "-p", str(pitch), "-s", str(speed), "-a", str(amp), "-w", str(out), word],
        check=True,
        capture_output=True,
    )
    x, sr = sf.read(out, dtype="float32")
    if x.ndim > 1:
        x = x.mean(axis=1)
    n = int(round(len(x) * SR / sr))
    x = np.interp(np.linspace(0, len(x) - 1, n), np.arange(len(x)), x).astype(np.float32)
    voiced = np.flatnonzero(np.abs(x) > 0.01)  # trim espeak's leading/trailing silence
    return x[voiced[0] : voiced[-1] + 1] if len(voiced) else x


def synthetic_word(word: str, label: str, gender: str, rng: np.random.Generator) -> np.ndarray:
    pitch, speed, amp = PROSODY[label]
    f0 = (120 if gender == "M" else 200) * (0.7 + pitch / 100)
    dur = max(0.12, len(word) * 60 / speed / 4)
    t = np.arange(int(dur * SR)) / SR
    f = f0 * (1 + 0.05 * np.sin(2 * np.pi * 3 * t))
    x = sum(np.sin(2 * np.pi * k * np.cumsum(f) / SR) / k for k in range(1, 6))
    env = np.hanning(len(t))
    return (amp / 400 * env * x + 0.003 * rng.standard_normal(len(t))).astype(np.float32)


def speak(words: list[str], label: str, gender: str, mode: str, tmp: Path, rng) -> tuple[np.ndarray, list]:
    pieces, timings, pos = [np.zeros(int(0.15 * SR), np.float32)], [], int(0.15 * SR)
    for w in words:
        x = espeak_word(w, label, gender, tmp) if mode == "espeak" else synthetic_word(w, label, gender, rng)
        timings.append((w, pos, pos + len(x)))
        pieces += [x, np.zeros(int(PAUSE * SR), np.float32)]
        pos += len(x) + int(PAUSE * SR)
    pieces.append(np.zeros(int(0.1 * SR), np.float32))
    return np.concatenate(pieces), timings


def wdseg(timings: list, n_samples: int) -> str:
    """IEMOCAP .wdseg: 10 ms frames, inclusive end frame, <s> / </s> around the words."""
    fr = lambda s: s * 100 // SR  # noqa: E731
    rows = [" SFrm  EFrm    SegAScr Word", f"    0 {fr(timings[0][1]) - 1:5d}    -1000 <s>"]
    for w, a, b in timings:
        rows.append(f"{fr(a):5d} {fr(b) - 1:5d}    -2000 {w.upper()}")
    rows.append(f"{fr(timings[-1][2]):5d} {fr(n_samples) - 1:5d}    -1000 </s>")
    rows.append(" Total score: -10000")
    return "\n".join(rows) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--per_label", type=int, default=2, help="sentences per label and speaker")
    ap.add_argument("--sessions", type=int, default=5)
    ap.add_argument("--audio", choices=("espeak", "synthetic"), default="espeak")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.audio == "espeak" and not shutil.which("espeak-ng"):
        ap.error("espeak-ng not found: install it (apt-get install espeak-ng) or use --audio synthetic")
    rng = np.random.default_rng(args.seed)
    n = 0
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        for s in range(1, args.sessions + 1):
            sess = args.out / f"Session{s}"
            dialog = f"Ses{s:02d}F_impro01"
            evals, trans = ["% [START_TIME - END_TIME] TURN_NAME EMOTION [V, A, D]", ""], []
            wav_dir = sess / "sentences" / "wav" / dialog
            seg_dir = sess / "sentences" / "ForcedAlignment" / dialog
            wav_dir.mkdir(parents=True, exist_ok=True)
            seg_dir.mkdir(parents=True, exist_ok=True)
            plan = [(lab, k) for lab in LABELS for k in range(args.per_label)] + [("xxx", 0)]
            t, turn = 0.0, 0
            for gender in ("F", "M"):
                for lab, k in plan:
                    uid = f"{dialog}_{gender}{turn:03d}"
                    turn += 1
                    sentence = SENTENCES[lab][(k + s + (gender == "M")) % len(SENTENCES[lab])]
                    x, timings = speak(sentence.split(), lab, gender, args.audio, tmp, rng)
                    sf.write(wav_dir / f"{uid}.wav", x, SR)
                    (seg_dir / f"{uid}.wdseg").write_text(wdseg(timings, len(x)))
                    dur = len(x) / SR
                    v, a, d = VAD[lab]
                    evals += [f"[{t:.4f} - {t + dur:.4f}]\t{uid}\t{lab}\t[{v:.4f}, {a:.4f}, {d:.4f}]", ""]
                    trans.append(f"{uid} [{t:08.4f}-{t + dur:08.4f}]: {sentence.capitalize()}.")
                    t += dur + 0.5
                    n += 1
            (sess / "dialog" / "EmoEvaluation").mkdir(parents=True, exist_ok=True)
            (sess / "dialog" / "transcriptions").mkdir(parents=True, exist_ok=True)
            (sess / "dialog" / "EmoEvaluation" / f"{dialog}.txt").write_text("\n".join(evals) + "\n")
            (sess / "dialog" / "transcriptions" / f"{dialog}.txt").write_text("\n".join(trans) + "\n")
    print(f"wrote {n} utterances ({args.sessions} sessions x 2 speakers, {args.audio} audio) to {args.out}")


if __name__ == "__main__":
    main()
