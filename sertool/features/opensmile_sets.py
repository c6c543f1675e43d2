"""openSMILE low-level descriptor sets through the `opensmile` Python package (audEERING).

`egemaps`: eGeMAPS v02 LLDs (Eyben et al., IEEE TAC 2016): 25 frame-level descriptors at
100 frames/s (pitch, jitter, shimmer, loudness, HNR, formants, spectral slopes, MFCC 1-4 …).
`compare`: ComParE 2016 LLDs (65) and, by default, their deltas (65) = 130 at 100 frames/s.

The bundled openSMILE binary is licensed for research and non-commercial use only (see the
README). Frame t covers [t * 10 ms, t * 10 ms + window); openSMILE pads nothing, so very short
inputs are zero-padded to the longest window here to always give at least one frame.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import opensmile

from sertool.corpora.base import Utterance
from sertool.features.base import Extractor, ExtractorError, FeatureResult, register_extractor

_SETS = {
    "eGeMAPSv02": opensmile.FeatureSet.eGeMAPSv02,
    "GeMAPSv01b": opensmile.FeatureSet.GeMAPSv01b,
    "ComParE_2016": opensmile.FeatureSet.ComParE_2016,
}
MIN_SAMPLES = 1600  # 100 ms: longer than every window of these sets (60 ms pitch window)


class OpenSmileLLD(Extractor):
    kind = "audio"
    needs_audio = True
    feature_set: str = ""

    def __init__(self, deltas: bool = False, sample_rate: int = 16000):
        self.deltas = bool(deltas)
        self.sample_rate = int(sample_rate)
        self._smile = None
        self._columns: list[str] | None = None

    def __getstate__(self):  # the openSMILE handle is rebuilt in each worker
        state = dict(self.__dict__)
        state["_smile"] = None
        return state

    def params(self) -> dict[str, Any]:
        return {"deltas": self.deltas, "sample_rate": self.sample_rate}

    def _smiles(self):
        if self._smile is None:
            levels = [opensmile.FeatureLevel.LowLevelDescriptors]
            if self.deltas:
                levels.append(opensmile.FeatureLevel.LowLevelDescriptors_Deltas)
            self._smile = [opensmile.Smile(feature_set=_SETS[self.feature_set], feature_level=lv) for lv in levels]
        return self._smile

    def columns(self) -> list[str]:
        if self._columns is None:
            self._columns = [name for s in self._smiles() for name in s.feature_names]
        return self._columns

    def file_attrs(self) -> dict[str, Any]:
        cols = self.columns()
        return {
            "dim": len(cols),
            "frame_rate_hz": 100.0,
            "columns": cols,
            "frame_centre": "frame t starts at t * 10 ms (openSMILE frame start)",
            "opensmile_feature_set": self.feature_set,
            "opensmile_version": opensmile.__version__,
            "license_note": "openSMILE: research and non-commercial use only",
        }

    def compute(self, wave: np.ndarray) -> np.ndarray:
        wave = np.asarray(wave, dtype=np.float32).reshape(-1)
        if wave.size == 0:
            raise ExtractorError("empty waveform")
        if wave.size < MIN_SAMPLES:
            wave = np.pad(wave, (0, MIN_SAMPLES - wave.size))
        mats = [s.process_signal(wave, self.sample_rate).to_numpy(dtype=np.float32) for s in self._smiles()]
        n = min(m.shape[0] for m in mats)
        out = np.concatenate([m[:n] for m in mats], axis=1) if len(mats) > 1 else mats[0]
        return np.ascontiguousarray(np.nan_to_num(out, nan=0.0, posinf=0.0, neginf=0.0), dtype=np.float32)

    def extract(self, utt: Utterance | None, wave: np.ndarray | None) -> FeatureResult:
        if wave is None:
            raise ExtractorError(f"{self.name} needs audio")
        return FeatureResult(self.compute(wave), {})


@register_extractor("egemaps")
class EGeMAPS(OpenSmileLLD):
    """openSMILE eGeMAPS v02 low-level descriptors (25-d, 100 frames/s; non-commercial licence)."""

    feature_set = "eGeMAPSv02"


@register_extractor("compare")
class ComParE(OpenSmileLLD):
    """openSMILE ComParE 2016 LLDs + deltas (130-d, 100 frames/s; non-commercial licence)."""

    feature_set = "ComParE_2016"

    def __init__(self, deltas: bool = True, sample_rate: int = 16000):
        super().__init__(deltas=deltas, sample_rate=sample_rate)
