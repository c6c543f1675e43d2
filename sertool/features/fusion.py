"""Frame-level fusion of acoustic feature sets: ``concat`` (early fusion by concatenation).

Two ways to make the same fused store, with the same numbers:

* from stores already extracted (the usual case: no feature is computed twice)::

      sertool store concat feats/rav whisper compare        # writes feats/rav/whisper+compare.h5

* in one extraction (and this is what ``predict`` rebuilds from the fused store's provenance)::

      sertool extract CORPUS -o feats -f whisper+compare=concat:parts=whisper+compare

The first part sets the time axis: its frame rate and frame count. Every other part is brought
onto it by averaging its frames that fall inside each reference frame's interval
[i / r0, (i + 1) / r0) (a faster part: 100 Hz ComParE onto 50 Hz Whisper, two frames averaged)
or by repeating the frame that covers it (a slower part), clipped at the part's last frame, so
parts whose lengths differ by a frame or two at the end of the file (window centring) still
line up. Written here because no library aligns feature matrices of different frame rates;
resampling them as signals (librosa, scipy) would smear across the sequence ends.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from sertool.corpora.base import Utterance
from sertool.features.base import Extractor, ExtractorError, FeatureResult, build_extractor, register_extractor, resolve


def align_frames(x: np.ndarray, rate: float, n_ref: int, ref_rate: float) -> np.ndarray:
    """[T, D] frames at `rate` Hz -> [n_ref, D] on the time axis of `n_ref` frames at `ref_rate` Hz."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"frames of shape {x.shape}: expected a non-empty [T, D] matrix")
    if rate <= 0 or ref_rate <= 0:
        raise ValueError(f"frame rates must be positive, got {rate} and {ref_rate}")
    i = np.arange(n_ref + 1, dtype=np.float64)
    edges = np.floor(i * rate / ref_rate + 1e-9).astype(np.int64)
    start = np.minimum(edges[:-1], x.shape[0] - 1)
    end = np.clip(edges[1:], start + 1, x.shape[0])  # at least the frame that covers the interval
    cum = np.concatenate([np.zeros((1, x.shape[1]), dtype=np.float64), np.cumsum(x, axis=0, dtype=np.float64)])
    return ((cum[end] - cum[start]) / (end - start)[:, None]).astype(np.float32)


def concat_frames(parts: list[np.ndarray], rates: list[float]) -> np.ndarray:
    """Concatenate the parts along features on the first part's time axis (see the module docstring)."""
    if len(parts) != len(rates) or not parts:
        raise ValueError("one frame rate per part is needed")
    ref = np.asarray(parts[0], dtype=np.float32)
    if ref.ndim != 2 or ref.shape[0] == 0:
        raise ValueError(f"first part has shape {ref.shape}: expected a non-empty [T, D] matrix")
    aligned = [ref] + [align_frames(x, r, ref.shape[0], rates[0]) for x, r in zip(parts[1:], rates[1:])]
    return np.concatenate(aligned, axis=1)


def _part_name(config: dict) -> str:
    return str(config.get("name", "?"))


@register_extractor("concat")
class ConcatExtractor(Extractor):
    """Concatenation of acoustic feature sets on the first one's frames (parts=whisper+compare)."""

    kind = "audio"
    cli_options = {"device": "device"}

    def __init__(self, parts: str | list, device: str | None = None):
        if isinstance(parts, str):
            parts = [p for p in parts.split("+") if p]
        if not isinstance(parts, list) or len(parts) < 2:
            raise ValueError(f"concat needs at least two parts (e.g. parts=whisper+mfcc), got {parts!r}")
        self.parts: list[Extractor] = []
        for spec in parts:
            name = spec["name"] if isinstance(spec, dict) else str(spec)
            cls, _ = resolve(name)
            extra = {"device": device} if device is not None and "device" in cls.cli_options.values() else {}
            ex = build_extractor(spec, extra)
            if ex.kind != "audio" or not ex.needs_audio or ex.needs_text:
                raise ExtractorError(
                    f"concat: part {name!r} is a {ex.kind} feature; only acoustic features are "
                    "concatenated frame by frame"
                )
            if ex.file_attrs().get("frame_rate_hz") is None:
                raise ExtractorError(f"concat: part {name!r} records no frame rate")
            self.parts.append(ex)
        rates = {ex.sample_rate for ex in self.parts}
        if len(rates) != 1:
            raise ExtractorError(f"concat: the parts read audio at different sample rates {sorted(rates)}")
        self.sample_rate = rates.pop()
        self.rates = [float(ex.file_attrs()["frame_rate_hz"]) for ex in self.parts]
        self.batched = any(ex.batched for ex in self.parts)
        self.batch_size = max(ex.batch_size for ex in self.parts)

    def params(self) -> dict[str, Any]:
        return {"parts": [ex.config() for ex in self.parts]}

    def file_attrs(self) -> dict[str, Any]:
        attrs = [ex.file_attrs() for ex in self.parts]
        columns = []
        for ex, a in zip(self.parts, attrs):
            cols = a.get("columns") or [str(k) for k in range(int(a["dim"]))]
            columns += [f"{ex.name}:{c}" for c in cols]
        return {
            "dim": sum(int(a["dim"]) for a in attrs),
            "frame_rate_hz": self.rates[0],
            "columns": columns,
            "parts": [ex.name for ex in self.parts],
        }

    def extract(self, utt: Utterance, wave: np.ndarray | None) -> FeatureResult:
        return FeatureResult(concat_frames([ex.extract(utt, wave).data for ex in self.parts], self.rates), {})

    def extract_batch(self, items: list[tuple[Utterance, np.ndarray | None]]) -> list[FeatureResult | Exception]:
        per_part = [ex.extract_batch(items) for ex in self.parts]
        out: list[FeatureResult | Exception] = []
        for k in range(len(items)):
            results = [p[k] for p in per_part]
            failed = next((r for r in results if isinstance(r, Exception)), None)
            if failed is not None:
                out.append(failed)
                continue
            try:
                out.append(FeatureResult(concat_frames([r.data for r in results], self.rates), {}))
            except ValueError as e:
                out.append(ExtractorError(f"concat: {e}"))
        return out


def concat_stores(
    feats_dir: str | Path,
    names: list[str],
    out_name: str | None = None,
    *,
    overwrite: bool = False,
    log: Callable[[str], None] = lambda s: None,
) -> Path:
    """Write FEATS/OUT.h5 (default: the names joined by ``+``) from stores already extracted: the same
    numbers as ``-f OUT=concat:parts=...`` would compute. Resumes like ``extract``; an utterance
    missing from any part is left out and counted in the log line."""
    from sertool.store import StoreError, StoreWriter, open_store, store_path

    if len(names) < 2:
        raise StoreError("store concat needs at least two stores")
    out_name = out_name or "+".join(names)
    stores = [open_store(feats_dir, n) for n in names]
    try:
        for name, s in zip(names, stores):
            kind = s.attrs.get("kind", "audio")
            if kind != "audio":
                raise StoreError(
                    f"{store_path(feats_dir, name)}: holds {kind} features; only acoustic stores are "
                    "concatenated frame by frame"
                )
            if not s.attrs.get("frame_rate_hz"):
                raise StoreError(f"{store_path(feats_dir, name)}: records no frame_rate_hz")
        rates = [float(s.attrs["frame_rate_hz"]) for s in stores]
        configs = [s.attrs.get("extractor") for s in stores]
        columns = []
        for name, s in zip(names, stores):
            cols = s.attrs.get("columns") or [str(k) for k in range(s.dim)]
            columns += [f"{_part_name(s.attrs.get('extractor') or {'name': name})}:{c}" for c in cols]
        attrs = {
            "feature": out_name,
            "kind": "audio",
            "dim": sum(s.dim for s in stores),
            "frame_rate_hz": rates[0],
            "columns": columns,
            "parts": list(names),
            "corpus": stores[0].attrs.get("corpus"),
            # provenance that rebuilds the fused features for new audio (predict): only when every part has it
            "extractor": (
                {"name": "concat", "params": {"parts": configs}} if all(isinstance(c, dict) for c in configs) else None
            ),
        }
        attrs = {k: v for k, v in attrs.items() if v is not None}
        common = [u for u in stores[0].ids if all(u in s for s in stores[1:])]
        with StoreWriter(store_path(feats_dir, out_name), attrs, overwrite=overwrite) as w:
            todo = [u for u in common if u not in w]
            for uid in todo:
                w.add(uid, concat_frames([s[uid] for s in stores], rates), {})
        log(
            f"{out_name}: {len(todo)} written, {len(common) - len(todo)} already done, "
            f"{len(stores[0].ids) - len(common)} missing from some part"
        )
        return store_path(feats_dir, out_name)
    finally:
        for s in stores:
            s.close()
