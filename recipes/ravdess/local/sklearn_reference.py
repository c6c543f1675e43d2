"""Reference points outside sertool: scikit-learn classifiers on mean+std-pooled frames of a
feature store, RAVDESS speaker-independent 6-fold (fold k tests actors 4k+1..4k+4, the folds of
`--protocol speaker-kfold:6`), with global (training-split) or per-speaker standardisation.

    python recipes/ravdess/local/sklearn_reference.py /work/feats/rav whisper    # needs scikit-learn

Prints UA (mean per-class recall) per fold and mean ± sample std for logistic regression and a
linear SVM. No dev split and no tuning: C is fixed (0.1 / 0.01), as in a quick baseline.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import h5py
import numpy as np


def pooled(feats: Path, store: str):
    manifest = [json.loads(line) for line in (feats / "manifest.jsonl").read_text().splitlines() if line.strip()]
    with h5py.File(feats / f"{store}.h5", "r") as f:
        x = np.stack(
            [np.concatenate([f["utts"][u["id"]][()].mean(0), f["utts"][u["id"]][()].std(0)]) for u in manifest]
        )
    return x, np.array([u["speaker"] for u in manifest]), np.array([u["label"] for u in manifest])


def main(feats: str, store: str) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import recall_score
    from sklearn.svm import LinearSVC

    x, speaker, label = pooled(Path(feats), store)
    speakers = sorted(set(speaker), key=lambda s: int(re.sub(r"\D", "", s) or 0))
    per_speaker = x.copy()
    for s in speakers:
        m = speaker == s
        per_speaker[m] = (x[m] - x[m].mean(0)) / (x[m].std(0) + 1e-8)
    for norm, data in (("global", x), ("per speaker", per_speaker)):
        for name, make in (
            ("logistic regression C=0.1", lambda: LogisticRegression(C=0.1, max_iter=3000)),
            ("linear SVM C=0.01", lambda: LinearSVC(C=0.01, max_iter=20000)),
        ):
            uas = []
            for k in range(6):
                test = np.isin(speaker, speakers[4 * k : 4 * k + 4])
                mean, std = data[~test].mean(0), data[~test].std(0) + 1e-8
                clf = make().fit((data[~test] - mean) / std, label[~test])
                uas.append(recall_score(label[test], clf.predict((data[test] - mean) / std), average="macro"))
            print(
                f"{store} | {norm} | {name} | UA {np.mean(uas):.3f} ± {np.std(uas, ddof=1):.3f} | folds "
                + " ".join(f"{u:.3f}" for u in uas)
            )


if __name__ == "__main__":
    main(*sys.argv[1:3])
