"""CMU-MOSEI / CMU-MOSI from the CMU Multimodal SDK's computational sequence (`.csd`) files.

A `.csd` file is HDF5: one top-level group (the sequence name) with `data/<video>/features`
[N, D] and `data/<video>/intervals` [N, 2] (seconds) and a `metadata` group. Utterances are
the labelled segments of the labels sequence (`<video>[k]` in the SDK, id `<video>__k` here);
their words come from the timestamped-words sequence (SDK padding tokens `sp` dropped).
The sentiment score (first label column, -3..3) is `score`; MOSEI's six emotion intensities
are kept in `extra.emotions`. Audio, when the raw `<video>.wav` files are present anywhere
under the root, is referenced with the segment's `start`/`end`.

`import_csd_features` copies pre-extracted sequences (COVAREP, GloVe word vectors …) into
sertool feature stores, sliced to each segment, so models can train on exactly the features
the published tables used, with no re-extraction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from sertool.corpora.base import CorpusError, Utterance, safe_id

MOSEI_EMOTIONS = ("happy", "sad", "anger", "surprise", "disgust", "fear")
SDK_PADDING_WORDS = {"sp", "sil", ""}


def looks_like(root: Path) -> str | None:
    names = [p.name.lower() for p in root.glob("*.csd")]
    if not names:
        return None
    return "mosi" if any("mosi" in n and "mosei" not in n for n in names) else "mosei"


def _find_csd(root: Path, *keywords: str) -> Path | None:
    for path in sorted(root.glob("*.csd")):
        name = path.stem.lower()
        if any(k in name for k in keywords):
            return path
    return None


def open_csd(path: Path) -> tuple[h5py.File, h5py.Group]:
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise CorpusError(f"{path}: not a readable .csd (HDF5) file ({e})") from None
    tops = list(f.keys())
    if len(tops) != 1 or "data" not in f[tops[0]]:
        f.close()
        raise CorpusError(f"{path}: not a CMU SDK computational sequence (expected one group with 'data')")
    return f, f[tops[0]]["data"]


def _decode_word(raw) -> str:
    value = raw[0] if isinstance(raw, np.ndarray) and raw.shape else raw
    return value.decode("utf-8", errors="replace") if isinstance(value, bytes) else str(value)


def read_mosei(
    root: str | os.PathLike,
    *,
    problems: list[tuple[str, str]] | None = None,
    labels_csd: str | None = None,
    words_csd: str | None = None,
    folds: str | None = None,
) -> list[Utterance]:
    """`folds`: optional JSON {"train": [video ids], "dev": [...], "test": [...]} (the SDK's standard folds)."""
    problems = problems if problems is not None else []
    root = Path(root).resolve()
    labels_path = Path(labels_csd) if labels_csd else _find_csd(root, "label", "opinion")
    if labels_path is None:
        raise CorpusError(f"{root}: no labels .csd file (e.g. CMU_MOSEI_Labels.csd) found")
    words_path = Path(words_csd) if words_csd else _find_csd(root, "timestampedwords", "words")
    if words_path is not None and "vector" in words_path.stem.lower():
        words_path = None
    split_of: dict[str, str] = {}
    folds_path = Path(folds) if folds else (root / "folds.json" if (root / "folds.json").exists() else None)
    if folds_path:
        for split, videos in json.loads(folds_path.read_text()).items():
            for v in videos:
                split_of[str(v)] = {"valid": "dev", "validation": "dev"}.get(split, split)
    wavs = {p.stem: p for p in root.rglob("*.wav")}
    words_file, words_data = open_csd(words_path) if words_path else (None, None)
    labels_file, labels_data = open_csd(labels_path)
    utts = []
    try:
        for video in sorted(labels_data.keys()):
            feats = np.asarray(labels_data[video]["features"], dtype=np.float64)
            intervals = np.asarray(labels_data[video]["intervals"], dtype=np.float64)
            if words_data is not None and video in words_data:
                w_feats = words_data[video]["features"][()]
                w_int = np.asarray(words_data[video]["intervals"], dtype=np.float64)
                all_words = [(_decode_word(w), float(a), float(b)) for w, (a, b) in zip(w_feats, w_int)]
            else:
                all_words = None
                if words_data is not None:
                    problems.append((str(words_path), f"video {video}: no words; its segments have no text"))
            for k, ((start, end), row) in enumerate(zip(intervals, feats)):
                words = None
                text = ""
                if all_words is not None:
                    inside = [
                        (w, a, b)
                        for w, a, b in all_words
                        if a >= start - 1e-3 and b <= end + 1e-3 and w.lower() not in SDK_PADDING_WORDS
                    ]
                    words = [[w, round(a - start, 4), round(b - start, 4)] for w, a, b in inside]
                    text = " ".join(w for w, _, _ in inside)
                if not np.isfinite(row).all():
                    problems.append((str(labels_path), f"{video}[{k}]: non-finite label; skipped"))
                    continue
                wav = wavs.get(video)
                extra = {"video": video, "segment": k, "bounds": [float(start), float(end)], "text_source": "corpus"}
                if row.shape[0] >= 7:
                    extra["emotions"] = {e: float(v) for e, v in zip(MOSEI_EMOTIONS, row[1:7])}
                if not text and wav is None:
                    problems.append((str(labels_path), f"{video}[{k}]: no words and no audio; skipped"))
                    continue
                utts.append(
                    Utterance(
                        id=safe_id(f"{video}__{k}"),
                        audio=str(wav) if wav else None,
                        text=text,
                        score=float(row[0]),
                        speaker=video,
                        session=video,
                        split=split_of.get(video),
                        words=words,
                        start=float(start) if wav else None,
                        end=float(end) if wav else None,
                        duration=float(end - start),
                        extra=extra,
                    )
                )
    finally:
        labels_file.close()
        if words_file is not None:
            words_file.close()
    return utts


def read_mosi(root: str | os.PathLike, **kw) -> list[Utterance]:
    return read_mosei(root, **kw)


def import_csd_features(
    csd_path: str | os.PathLike, utts: list[Utterance], out_path: str | os.PathLike, *, name: str, kind: str = "audio"
) -> Path:
    """Copy one pre-extracted sequence into a sertool store, one [T, D] slice per segment.

    Frames whose interval lies inside the segment are kept (the SDK's own inclusion rule);
    `kind="text"` stores word-level sequences (unit "word").
    """
    from sertool.store import StoreWriter

    csd_path = Path(csd_path)
    f, data = open_csd(csd_path)
    try:
        dims = {data[v]["features"].shape[1] for v in list(data.keys())[:5]}
        if len(dims) != 1:
            raise CorpusError(f"{csd_path}: feature dimension differs between videos ({sorted(dims)})")
        dim = dims.pop()
        attrs = {
            "feature": name,
            "kind": kind,
            "dim": int(dim),
            "extractor": {"name": "csd", "params": {"file": csd_path.name, "sequence": name}},
        }
        first = data[next(iter(data.keys()))]["intervals"][()]
        if kind == "audio":
            step = float(np.median(np.diff(first[:, 0]))) if len(first) > 1 else 0.01
            attrs["frame_rate_hz"] = round(1.0 / step, 3) if step > 0 else 100.0
        else:
            attrs["unit"] = "word"
        with StoreWriter(out_path, attrs) as writer:
            for u in utts:
                video, k = u.extra.get("video"), u.extra.get("segment")
                if u.id in writer or video not in data:
                    continue
                intervals = data[video]["intervals"][()]
                seg_start = u.start if u.start is not None else None
                # segment bounds are not stored for audio-less utterances: recover them from words
                lo, hi = _segment_bounds(u, seg_start)
                inside = (intervals[:, 0] >= lo - 1e-3) & (intervals[:, 1] <= hi + 1e-3)
                feats = np.nan_to_num(
                    np.asarray(data[video]["features"][()][inside], dtype=np.float32), nan=0.0, posinf=0.0, neginf=0.0
                )
                if kind == "text" and u.words is not None:
                    # word-level sequences carry the SDK's padding tokens (`sp`) as rows; the
                    # reader dropped them from `words`, so keep exactly the rows whose start
                    # matches a kept word (one vector per word, as align expects)
                    starts = intervals[inside, 0]
                    wanted = np.array([lo + w[1] for w in u.words])
                    if len(wanted):
                        hit = np.abs(starts[:, None] - wanted[None, :]) < 2e-3
                        feats = feats[hit.any(axis=1)]
                    else:
                        feats = feats[:0]
                writer.add(u.id, feats.reshape(-1, dim), {"source": csd_path.name, "video": video, "segment": k})
    finally:
        f.close()
    return Path(out_path)


def _segment_bounds(u: Utterance, start: float | None) -> tuple[float, float]:
    if u.start is not None and u.end is not None:
        return u.start, u.end
    bounds = u.extra.get("bounds")
    if bounds:
        return float(bounds[0]), float(bounds[1])
    raise CorpusError(f"utterance {u.id}: segment bounds unknown")
