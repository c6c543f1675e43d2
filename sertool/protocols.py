"""Evaluation protocols: train / dev / test splits, one `Fold` per test partition.

Every protocol carves its dev split from the *training* data, never from the test fold, so early
stopping and model selection never see test data.  The splits depend only on the utterances, the
protocol and ``protocol_seed`` (default 0), not on the training seed: repeated seeds measure
training variance on the same folds, and two experiments with the same protocol are paired fold
by fold (for ``evaluate --compare``).

Specs (``--protocol``):

``corpus``             the corpus's own split (manifest ``split``); dev = the ``dev`` split, or
                       when the corpus has none, carved from train (by speaker when speakers are
                       known, else stratified).
``kfold:K``            stratified K-fold over utterances (speaker-dependent); dev = stratified
                       ``dev_fraction`` of the training part.
``loso``               leave-one-speaker-out; dev = ``dev_fraction`` of the remaining speakers
                       (at least two when five or more remain, else one), so dev is
                       speaker-independent too.
``speaker-kfold:K``    speakers sorted (natural order) and cut into K contiguous groups; fold k
                       tests group k.  RAVDESS with K = 6: fold k tests actors 4k+1..4k+4.
``loso-session``       leave-one-session-out (IEMOCAP: both speakers of the session are held out);
                       dev = ``dev_fraction`` of the training speakers.

Every dev split carved by speaker has at least two speakers when the training part has five or
more (``MIN_SPEAKERS_FOR_TWO_DEV``), whatever ``dev_fraction`` gives: with one dev speaker, early
stopping and model selection follow one voice.
``rajan``              Rajan et al.: 5 random stratified splits with train : dev : test =
                       8 : 0.5 : 1.5 (80 % / 5 % / 15 %), one per fold (``rajan:N`` for N splits).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from sertool.corpora.base import Utterance

PROTOCOLS = ("corpus", "kfold:K", "loso", "speaker-kfold:K", "loso-session", "rajan[:N]")


@dataclass
class Fold:
    name: str
    train: list[str]
    dev: list[str]
    test: list[str]
    info: dict = field(default_factory=dict)  # e.g. {"test_speakers": [...], "dev_speakers": [...]}

    def to_json(self) -> dict:
        return {"name": self.name, "train": self.train, "dev": self.dev, "test": self.test, "info": self.info}

    @classmethod
    def from_json(cls, d: dict) -> "Fold":
        return cls(d["name"], list(d["train"]), list(d["dev"]), list(d["test"]), dict(d.get("info", {})))


def _natural_key(s: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(s))]


def parse_protocol(spec: str) -> tuple[str, int | None]:
    name, _, arg = spec.partition(":")
    if name in ("kfold", "speaker-kfold"):
        if not arg.isdigit() or int(arg) < 2:
            raise ValueError(f"protocol {spec!r}: give the number of folds >= 2, e.g. {name}:5")
        return name, int(arg)
    if name == "rajan":
        if arg and (not arg.isdigit() or int(arg) < 1):
            raise ValueError(f"protocol {spec!r}: rajan:N needs N >= 1")
        return name, int(arg) if arg else 5
    if name in ("corpus", "loso", "loso-session") and not arg:
        return name, None
    raise ValueError(f"unknown protocol {spec!r}; known: {', '.join(PROTOCOLS)}")


def _stratified_split(ids: list[str], strata: list, fraction: float, rng: np.random.Generator) -> tuple[list, list]:
    """Split ids into (rest, part) with ~fraction of each stratum in part (at least 1 per stratum
    with >= 2 members)."""
    by: dict = {}
    for uid, s in zip(ids, strata):
        by.setdefault(s, []).append(uid)
    keys = sorted(by, key=str)
    # largest-remainder allocation: the total is round(fraction x N), each stratum gets its share
    exact = np.array([fraction * len(by[s]) for s in keys])
    counts = np.floor(exact).astype(int)
    remainder = int(round(fraction * len(ids))) - counts.sum()
    order = sorted(range(len(keys)), key=lambda i: (-(exact[i] - counts[i]), rng.random()))
    for i in order[: max(0, remainder)]:
        counts[i] += 1
    part: set[str] = set()
    for s, k in zip(keys, counts):
        members = list(by[s])
        rng.shuffle(members)
        if k == 0 and len(members) >= 2 and fraction > 0:
            k = 1
        part.update(members[:k])
    return [u for u in ids if u not in part], [u for u in ids if u in part]


def _stratified_kfold(ids: list[str], strata: list, k: int, rng: np.random.Generator) -> list[list[str]]:
    """Assign each stratum's shuffled members round-robin to k folds (sizes differ by <= 1 per class)."""
    by: dict = {}
    for uid, s in zip(ids, strata):
        by.setdefault(s, []).append(uid)
    folds: list[list[str]] = [[] for _ in range(k)]
    offset = 0
    for s in sorted(by, key=str):
        members = list(by[s])
        rng.shuffle(members)
        for i, uid in enumerate(members):
            folds[(offset + i) % k].append(uid)
        offset += len(members)  # continue the round robin so fold sizes stay balanced overall
    order = {u: i for i, u in enumerate(ids)}
    return [sorted(f, key=order.__getitem__) for f in folds]


# dev carved by speaker takes at least two speakers once the training part has this many (two of
# five keeps 60 % for training); with 2-4 training speakers it takes one, since two would leave too
# little to train on.
MIN_SPEAKERS_FOR_TWO_DEV = 5


def _dev_by_speaker(
    train: list[Utterance], fraction: float, rng: np.random.Generator
) -> tuple[list[str], list[str], list[str]]:
    speakers = sorted({u.speaker for u in train}, key=_natural_key)
    if len(speakers) < 2:
        raise ValueError(f"cannot carve a speaker-independent dev split from {len(speakers)} training speaker(s)")
    n_dev = max(1, int(round(fraction * len(speakers))))
    if n_dev < 2 and len(speakers) >= MIN_SPEAKERS_FOR_TWO_DEV:
        # one dev speaker makes early stopping follow that speaker (a LOSO run over 10 speakers
        # picked best epochs from 1 to 24 and scored one fold below chance); two of five or more
        n_dev = 2
    n_dev = min(n_dev, len(speakers) - 1)
    dev_speakers = sorted(rng.choice(speakers, size=n_dev, replace=False).tolist(), key=_natural_key)
    dev = [u.id for u in train if u.speaker in dev_speakers]
    rest = [u.id for u in train if u.speaker not in dev_speakers]
    return rest, dev, dev_speakers


def _dev_stratified(train: list[Utterance], strata: dict, fraction: float, rng: np.random.Generator):
    ids = [u.id for u in train]
    return _stratified_split(ids, [strata[u] for u in ids], fraction, rng)


def make_folds(
    utts: list[Utterance], targets: list, protocol: str, *, dev_fraction: float = 0.1, seed: int = 0, dev: str = "auto"
) -> list[Fold]:
    """Folds for `protocol` (see the module docstring).

    ``targets``: class index (or score) per utterance, used for stratification (scores are
    stratified by their sign).  ``dev``: ``auto`` (by speaker for speaker-independent protocols,
    stratified otherwise), ``speaker`` or ``stratified``.
    """
    if dev not in ("auto", "speaker", "stratified"):
        raise ValueError(f"dev carving {dev!r} is not auto, speaker or stratified")
    if not 0 < dev_fraction < 1:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction}")
    name, k = parse_protocol(protocol)
    rng = np.random.default_rng(seed)
    strata = {u.id: (t if isinstance(t, (int, np.integer)) else (t > 0) - (t < 0)) for u, t in zip(utts, targets)}
    by_id = {u.id: u for u in utts}
    speaker_independent = name in ("loso", "speaker-kfold", "loso-session")

    def need(attr: str):
        missing = [u.id for u in utts if getattr(u, attr) is None]
        if missing:
            raise ValueError(
                f"protocol {protocol!r} needs a {attr} for every utterance; {len(missing)} have none "
                f"(e.g. {missing[0]!r})"
            )

    def carve(train_ids: list[str], test_ids: list[str], fold_name: str, info: dict) -> Fold:
        train = [by_id[u] for u in train_ids]
        how = dev
        if how == "auto":
            how = (
                "speaker"
                if speaker_independent or (name == "corpus" and all(u.speaker for u in train))
                else "stratified"
            )
        if how == "speaker":
            if any(u.speaker is None for u in train):
                raise ValueError("dev carving by speaker needs a speaker for every training utterance")
            rest, dev_ids, dev_speakers = _dev_by_speaker(train, dev_fraction, rng)
            info = {**info, "dev_speakers": dev_speakers}
        else:
            rest, dev_ids = _dev_stratified(train, strata, dev_fraction, rng)
        return Fold(fold_name, rest, dev_ids, list(test_ids), info)

    folds: list[Fold] = []
    if name == "corpus":
        need("split")
        split = {s: [u.id for u in utts if u.split == s] for s in ("train", "dev", "test")}
        if split["dev"]:
            folds.append(Fold("corpus", split["train"], split["dev"], split["test"], {"dev": "corpus"}))
        else:
            folds.append(carve(split["train"], split["test"], "corpus", {"dev": "carved from train"}))
    elif name == "kfold":
        ids = [u.id for u in utts]
        parts = _stratified_kfold(ids, [strata[i] for i in ids], k, rng)
        for i, test in enumerate(parts):
            test_set = set(test)
            folds.append(carve([u for u in ids if u not in test_set], test, f"fold{i + 1}", {}))
    elif name in ("loso", "speaker-kfold"):
        need("speaker")
        speakers = sorted({u.speaker for u in utts}, key=_natural_key)
        if name == "loso":
            groups = [[s] for s in speakers]
        else:
            if k > len(speakers):
                raise ValueError(f"protocol {protocol!r}: only {len(speakers)} speakers for {k} folds")
            groups = [list(g) for g in np.array_split(np.array(speakers, dtype=object), k)]
        for i, group in enumerate(groups):
            g = set(group)
            test = [u.id for u in utts if u.speaker in g]
            train = [u.id for u in utts if u.speaker not in g]
            fold_name = f"spk-{group[0]}" if name == "loso" else f"fold{i + 1}"
            folds.append(carve(train, test, _safe(fold_name), {"test_speakers": list(group)}))
    elif name == "loso-session":
        need("session")
        need("speaker")
        sessions = sorted({u.session for u in utts}, key=_natural_key)
        for s in sessions:
            test = [u.id for u in utts if u.session == s]
            train = [u.id for u in utts if u.session != s]
            test_speakers = sorted({by_id[t].speaker for t in test}, key=_natural_key)
            leaked = set(test_speakers) & {by_id[t].speaker for t in train}
            if leaked:
                raise ValueError(
                    f"protocol loso-session: speaker(s) {sorted(leaked)} of session {s!r} also speak "
                    "in other sessions; speaker ids must be per session (IEMOCAP: Ses01F)"
                )
            folds.append(carve(train, test, _safe(f"ses-{s}"), {"test_session": s, "test_speakers": test_speakers}))
    elif name == "rajan":
        ids = [u.id for u in utts]
        for i in range(k):
            r = np.random.default_rng([seed, i])
            rest, test = _stratified_split(ids, [strata[u] for u in ids], 0.15, r)
            train, dev_ids = _stratified_split(rest, [strata[u] for u in rest], 0.05 / 0.85, r)
            folds.append(Fold(f"fold{i + 1}", train, dev_ids, test, {"ratio": "8:0.5:1.5"}))
    check_folds(folds, protocol)
    return folds


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def check_folds(folds: list[Fold], protocol: str = "") -> None:
    """Every fold has non-empty, disjoint train/dev/test parts."""
    if not folds:
        raise ValueError(f"protocol {protocol!r} produced no folds")
    for f in folds:
        for part in ("train", "dev", "test"):
            if not getattr(f, part):
                raise ValueError(f"protocol {protocol!r}, fold {f.name!r}: the {part} split is empty")
        a, b, c = set(f.train), set(f.dev), set(f.test)
        if a & b or a & c or b & c:
            raise ValueError(f"protocol {protocol!r}, fold {f.name!r}: train/dev/test overlap")
