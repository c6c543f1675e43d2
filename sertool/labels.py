"""Label sets: presets that say exactly which classes are kept and which are merged.

A preset maps each corpus label to a class (or drops it); the class order is the order of the
preset and is written to the experiment's config, so a table always says what it measured.

| preset | classes | merges / drops |
|---|---|---|
| `iemocap4` | neutral, happy, angry, sad | excited -> happy; others dropped |
| `iemocap4-noexc` | neutral, happy, angry, sad | excited dropped (not merged) |
| `iemocap7` | neutral, happy, angry, sad, excited, frustrated, surprised | others dropped |
| `meld7` | neutral, joy, surprise, anger, sadness, disgust, fear | none |
| `ravdess8` | neutral, calm, happy, sad, angry, fearful, disgust, surprised | none |
| `ravdess7` | neutral, happy, sad, angry, fearful, disgust, surprised | calm -> neutral |
| `ravdess4` | neutral, happy, sad, angry | calm -> neutral; others dropped |
| `mosei` | (regression on `score`, -3..3) | none |
| `auto` | the sorted set of labels in the manifest | none |
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sertool.corpora.base import Utterance


@dataclass
class LabelSet:
    name: str
    classes: list[str]  # empty for regression
    mapping: dict[str, str | None] | None = None  # corpus label -> class (None = drop); None = identity
    regression: bool = False
    dropped: dict[str, int] = field(default_factory=dict)  # filled by apply()

    def to_config(self) -> dict:
        return {
            "preset": self.name,
            "classes": list(self.classes),
            "regression": self.regression,
            "mapping": self.mapping,
            "dropped": dict(self.dropped),
        }


def _identity(classes):
    return {c: c for c in classes}


PRESETS: dict[str, tuple[list[str], dict | None]] = {
    "iemocap4": (
        ["neutral", "happy", "angry", "sad"],
        {"neutral": "neutral", "happy": "happy", "excited": "happy", "angry": "angry", "sad": "sad"},
    ),
    "iemocap4-noexc": (["neutral", "happy", "angry", "sad"], _identity(["neutral", "happy", "angry", "sad"])),
    "iemocap7": (
        ["neutral", "happy", "angry", "sad", "excited", "frustrated", "surprised"],
        _identity(["neutral", "happy", "angry", "sad", "excited", "frustrated", "surprised"]),
    ),
    "meld7": (
        ["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"],
        _identity(["neutral", "joy", "surprise", "anger", "sadness", "disgust", "fear"]),
    ),
    "ravdess8": (["neutral", "calm", "happy", "sad", "angry", "fearful", "disgust", "surprised"], None),
    "ravdess7": (
        ["neutral", "happy", "sad", "angry", "fearful", "disgust", "surprised"],
        {
            "neutral": "neutral",
            "calm": "neutral",
            "happy": "happy",
            "sad": "sad",
            "angry": "angry",
            "fearful": "fearful",
            "disgust": "disgust",
            "surprised": "surprised",
        },
    ),
    "ravdess4": (
        ["neutral", "happy", "sad", "angry"],
        {"neutral": "neutral", "calm": "neutral", "happy": "happy", "sad": "sad", "angry": "angry"},
    ),
}
PRESET_NAMES = ["auto", *PRESETS, "mosei"]


def label_set(name: str, utts: list[Utterance] | None = None) -> LabelSet:
    """The preset `name`; `auto` takes the sorted labels of `utts`; a comma list gives classes."""
    if name == "mosei":
        return LabelSet("mosei", [], None, regression=True)
    if name == "auto":
        labels = sorted({u.label for u in utts or [] if u.label is not None})
        if not labels:
            raise ValueError("no utterance has a label (for sentiment scores use --labels mosei)")
        return LabelSet("auto", labels, None)
    if name in PRESETS:
        classes, mapping = PRESETS[name]
        return LabelSet(name, list(classes), dict(mapping) if mapping else None)
    if "," in name:
        classes = [c.strip() for c in name.split(",") if c.strip()]
        return LabelSet("custom", classes, _identity(classes))
    raise ValueError(f"unknown label set {name!r}; known: {', '.join(PRESET_NAMES)} or a comma-separated class list")


def apply(labels: LabelSet, utts: list[Utterance]) -> tuple[list[Utterance], list]:
    """Keep the utterances the label set uses; return them and their targets (class index or score).

    Raises ValueError for a label the set does not know (with `mapping=None`) — a typo or a
    wrong preset must not silently drop data; utterances mapped to None are dropped and counted
    in ``labels.dropped``.
    """
    kept, targets, dropped = [], [], {}
    index = {c: i for i, c in enumerate(labels.classes)}
    for u in utts:
        if labels.regression:
            if u.score is None:
                dropped["<no score>"] = dropped.get("<no score>", 0) + 1
                continue
            kept.append(u)
            targets.append(float(u.score))
            continue
        if u.label is None:
            dropped["<no label>"] = dropped.get("<no label>", 0) + 1
            continue
        raw = u.label
        if labels.mapping is None:
            cls = raw
            if cls not in index:
                raise ValueError(
                    f"utterance {u.id!r} has label {raw!r}, which label set {labels.name!r} "
                    f"({', '.join(labels.classes)}) does not contain"
                )
        else:
            cls = labels.mapping.get(raw, labels.mapping.get(raw.lower()))
            if cls is None:
                dropped[raw] = dropped.get(raw, 0) + 1
                continue
        kept.append(u)
        targets.append(index[cls])
    labels.dropped = dropped
    if not kept:
        raise ValueError(f"label set {labels.name!r} keeps no utterance (dropped: {dropped})")
    return kept, targets
