"""A test-only extractor: frame RMS and zero-crossing rate at 100 Hz, with hooks for tests.

`log` appends each computed id to a file (to check what a resumed run recomputes);
`sleep` slows each utterance down (so a test can kill a run in the middle);
`fail_on` makes the ids containing that text fail.
"""

import time

import numpy as np

from sertool.features.base import Extractor, FeatureResult, register_extractor


@register_extractor("toy")
class Toy(Extractor):
    """Frame RMS and zero-crossing rate (test extractor)."""

    kind = "audio"

    def __init__(self, hop_ms=10.0, sample_rate=16000, log=None, sleep=0.0, fail_on=None):
        self.hop_ms, self.sample_rate, self.log, self.sleep, self.fail_on = hop_ms, sample_rate, log, sleep, fail_on

    def params(self):
        return {
            "hop_ms": self.hop_ms,
            "sample_rate": self.sample_rate,
            "log": self.log,
            "sleep": self.sleep,
            "fail_on": self.fail_on,
        }

    def file_attrs(self):
        return {"dim": 2, "frame_rate_hz": 1000.0 / self.hop_ms, "columns": ["rms", "zcr"]}

    def extract(self, utt, wave):
        if self.fail_on and self.fail_on in utt.id:
            raise ValueError(f"toy failure for {utt.id}")
        if self.sleep:
            time.sleep(self.sleep)
        hop = int(self.sample_rate * self.hop_ms / 1000)
        n = max(1, len(wave) // hop)
        frames = wave[: n * hop].reshape(n, hop) if len(wave) >= hop else np.pad(wave, (0, hop - len(wave)))[None]
        rms = np.sqrt((frames**2).mean(axis=1))
        zcr = (np.diff(np.sign(frames), axis=1) != 0).mean(axis=1)
        if self.log:
            with open(self.log, "a") as f:
                f.write(utt.id + "\n")
        return FeatureResult(np.stack([rms, zcr], axis=1).astype(np.float32), {"n_samples": len(wave)})
