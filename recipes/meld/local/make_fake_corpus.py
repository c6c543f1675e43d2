#!/usr/bin/env python3
"""Write a small MELD-layout corpus (transcripts + labels, no audio), for testing the recipe.

    python recipes/meld/local/make_fake_corpus.py OUT [--per_label 6]

OUT/{train,dev,test}_sent_emo.csv with MELD's columns (Sr No., Utterance, Speaker, Emotion,
Sentiment, Dialogue_ID, Utterance_ID, Season, Episode, StartTime, EndTime). The sentences carry
their label's words, so a text model can learn something; the figures mean nothing about MELD.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

WORDS = {
    "neutral": ["okay", "so", "the", "coffee", "is", "here", "we", "go", "then"],
    "joy": ["great", "love", "wonderful", "yay", "happy", "awesome"],
    "surprise": ["what", "really", "wow", "no", "way", "seriously"],
    "anger": ["stupid", "hate", "shut", "up", "damn", "furious"],
    "sadness": ["sorry", "miss", "cry", "lost", "alone", "sad"],
    "disgust": ["gross", "ew", "disgusting", "yuck", "nasty"],
    "fear": ["scared", "afraid", "help", "oh", "god", "terrified"],
}
SENTIMENT = {
    "neutral": "neutral",
    "joy": "positive",
    "surprise": "positive",
    "anger": "negative",
    "sadness": "negative",
    "disgust": "negative",
    "fear": "negative",
}
HEADER = [
    "Sr No.",
    "Utterance",
    "Speaker",
    "Emotion",
    "Sentiment",
    "Dialogue_ID",
    "Utterance_ID",
    "Season",
    "Episode",
    "StartTime",
    "EndTime",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--per_label", type=int, default=6, help="training utterances per label (dev, test: a third)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    for split, n in (
        ("train", args.per_label),
        ("dev", max(1, args.per_label // 3)),
        ("test", max(1, args.per_label // 3)),
    ):
        with open(args.out / f"{split}_sent_emo.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(HEADER)
            row = 0
            for dia, label in enumerate(WORDS):
                for utt in range(n):
                    words = [WORDS[label][rng.integers(len(WORDS[label]))] for _ in range(3)]
                    words += [WORDS["neutral"][rng.integers(9)] for _ in range(int(rng.integers(2, 6)))]
                    rng.shuffle(words)
                    row += 1
                    w.writerow(
                        [
                            row,
                            " ".join(words).capitalize() + ".",
                            ["Ross", "Rachel", "Joey"][utt % 3],
                            label,
                            SENTIMENT[label],
                            dia,
                            utt,
                            1,
                            1,
                            "00:00:01,000",
                            "00:00:02,000",
                        ]
                    )
    print(f"wrote MELD-layout transcripts ({args.per_label} training utterances per label) to {args.out}")


if __name__ == "__main__":
    main()
