"""Protocols: test folds cover the data once, dev comes from training data, speakers are held out."""

from collections import Counter

import pytest

from sertool.corpora.base import Utterance
from sertool.labels import apply, label_set
from sertool.protocols import make_folds

CLASSES = ["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"]


def ravdess_like(n_actors=24, per_class=3):
    utts = []
    for a in range(1, n_actors + 1):
        for c, label in enumerate(CLASSES):
            for r in range(per_class):
                utts.append(Utterance(id=f"a{a:02d}_{c}_{r}", text="x", label=label, speaker=f"Actor_{a:02d}"))
    return utts


def targets(utts, classes=CLASSES):
    return [classes.index(u.label) for u in utts]


def check_partition(utts, folds, *, test_cover=True):
    ids = {u.id for u in utts}
    for f in folds:
        assert not set(f.train) & set(f.dev) and not set(f.train) & set(f.test) and not set(f.dev) & set(f.test)
        assert set(f.train) | set(f.dev) | set(f.test) == ids
    if test_cover:
        tested = Counter(u for f in folds for u in f.test)
        assert set(tested) == ids and set(tested.values()) == {1}


def test_speaker_kfold_ravdess_folds():
    utts = ravdess_like()
    folds = make_folds(utts, targets(utts), "speaker-kfold:6")
    check_partition(utts, folds)
    spk = {u.id: u.speaker for u in utts}
    for k, f in enumerate(folds):
        assert f.info["test_speakers"] == [f"Actor_{i:02d}" for i in range(4 * k + 1, 4 * k + 5)]
        test_s = {spk[u] for u in f.test}
        dev_s = {spk[u] for u in f.dev}
        train_s = {spk[u] for u in f.train}
        assert not test_s & train_s and not dev_s & train_s and not dev_s & test_s
        assert len(dev_s) == 2  # 10 % of the 20 training speakers


def test_loso_and_determinism():
    utts = ravdess_like(n_actors=5, per_class=1)
    folds = make_folds(utts, targets(utts), "loso")
    assert [f.name for f in folds] == [f"spk-Actor_0{i}" for i in range(1, 6)]
    check_partition(utts, folds)
    again = make_folds(utts, targets(utts), "loso")
    assert [f.to_json() for f in folds] == [f.to_json() for f in again]
    other = make_folds(utts, targets(utts), "loso", seed=3)
    assert [f.dev for f in folds] != [f.dev for f in other] or len(folds) == 1


def test_stratified_kfold():
    utts = ravdess_like(n_actors=4, per_class=5)  # 20 per class
    t = targets(utts)
    folds = make_folds(utts, t, "kfold:5")
    check_partition(utts, folds)
    lab = {u.id: u.label for u in utts}
    for f in folds:
        assert set(Counter(lab[u] for u in f.test).values()) == {4}
        dev = Counter(lab[u] for u in f.dev)  # 10 % of the 128 training utterances, stratified
        assert sum(dev.values()) == 13 and set(dev.values()) <= {1, 2} and len(dev) == 8


def test_corpus_split_with_and_without_dev():
    utts = [
        Utterance(
            id=f"u{i}",
            text="x",
            label="ab"[i % 2],
            speaker=f"s{i % 5}",
            split=["train", "train", "train", "dev", "test"][i % 5],
        )
        for i in range(40)
    ]
    folds = make_folds(utts, [i % 2 for i in range(40)], "corpus")
    assert len(folds) == 1 and folds[0].info["dev"] == "corpus"
    assert all(u.endswith(("3", "8")) for u in folds[0].dev)
    for u in utts:
        if u.split == "dev":
            u.split = "train"
    folds = make_folds(utts, [i % 2 for i in range(40)], "corpus")
    assert folds[0].info["dev"] == "carved from train" and folds[0].dev
    test = {u.id for u in utts if u.split == "test"}
    assert set(folds[0].test) == test and not set(folds[0].dev) & test


def test_leave_one_session_out():
    utts = [
        Utterance(id=f"S{s}{g}_{i}", text="x", label="ab"[i % 2], speaker=f"Ses0{s}{g}", session=f"Session{s}")
        for s in range(1, 6)
        for g in "FM"
        for i in range(4)
    ]
    folds = make_folds(utts, [i % 2 for i in range(len(utts))], "loso-session")
    assert len(folds) == 5
    check_partition(utts, folds)
    for s, f in enumerate(folds, 1):
        assert f.info["test_speakers"] == [f"Ses0{s}F", f"Ses0{s}M"]
        assert all(u.startswith(f"S{s}") for u in f.test)
        assert not any(u.startswith(f"S{s}") for u in f.dev + f.train)
    utts[0].speaker = "Ses02F"  # a speaker in two sessions
    with pytest.raises(ValueError, match="other sessions"):
        make_folds(utts, [i % 2 for i in range(len(utts))], "loso-session")


def test_rajan_ratio():
    utts = ravdess_like(n_actors=10, per_class=5)  # 400 utterances
    folds = make_folds(utts, targets(utts), "rajan")
    assert len(folds) == 5
    check_partition(utts, folds, test_cover=False)
    for f in folds:
        n = len(utts)
        assert abs(len(f.test) / n - 0.15) < 0.01 and abs(len(f.dev) / n - 0.05) < 0.01
    assert folds[0].test != folds[1].test


def test_bad_protocols():
    utts = ravdess_like(n_actors=2, per_class=1)
    with pytest.raises(ValueError, match="unknown protocol"):
        make_folds(utts, targets(utts), "leave-some-out")
    with pytest.raises(ValueError, match="number of folds"):
        make_folds(utts, targets(utts), "kfold:1")
    with pytest.raises(ValueError, match="needs a split"):
        make_folds(utts, targets(utts), "corpus")
    for u in utts:
        u.split = "train"
    with pytest.raises(ValueError, match="test split is empty"):
        make_folds(utts, targets(utts), "corpus")
    with pytest.raises(ValueError, match="only 2 speakers"):
        make_folds(utts, targets(utts), "speaker-kfold:3")


def test_label_presets():
    utts = ravdess_like(n_actors=1, per_class=1)
    ls = label_set("ravdess7")
    kept, t = apply(ls, utts)
    assert len(kept) == 8 and ls.classes[t[[u.label for u in kept].index("calm")]] == "neutral"
    ls4 = label_set("ravdess4")
    kept, t = apply(ls4, utts)
    assert sorted(u.label for u in kept) == ["angry", "calm", "happy", "neutral", "sad"]
    assert ls4.dropped == {"fearful": 1, "disgust": 1, "surprised": 1}
    iem = [Utterance(id=f"u{i}", text="x", label=l) for i, l in enumerate(["happy", "excited", "frustrated", "sad"])]
    ls = label_set("iemocap4")
    kept, t = apply(ls, iem)
    assert [ls.classes[i] for i in t] == ["happy", "happy", "sad"]
    kept, t = apply(label_set("iemocap4-noexc"), iem)
    assert [u.label for u in kept] == ["happy", "sad"]
    with pytest.raises(ValueError, match="does not contain"):
        apply(label_set("ravdess8"), [Utterance(id="x", text="x", label="bored")])
    auto = label_set("auto", utts)
    assert auto.classes == sorted(CLASSES)
    reg = label_set("mosei")
    kept, t = apply(reg, [Utterance(id="a", text="x", score=1.5), Utterance(id="b", text="x")])
    assert t == [1.5] and reg.dropped == {"<no score>": 1}
    with pytest.raises(ValueError, match="unknown label set"):
        label_set("ravdess9")
