"""openSMILE LLD extractors (eGeMAPS, ComParE): shapes, names, finite output, pickling."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

pytest.importorskip("opensmile")

from sertool.features.base import build_extractor  # noqa: E402

from acoustic_synth import speech_like  # noqa: E402


@pytest.mark.parametrize("name,dim", [("egemaps", 25), ("compare", 130)])
def test_lld_sets(name, dim):
    ex = build_extractor(name)
    attrs = ex.file_attrs()
    assert attrs["dim"] == dim == len(attrs["columns"]) and attrs["frame_rate_hz"] == 100.0
    w = speech_like(1.0)
    out = ex.extract(None, w).data
    assert out.shape[1] == dim and abs(out.shape[0] - 100) <= 6 and np.isfinite(out).all()
    assert ex.extract(None, np.zeros(10, np.float32)).data.shape[1] == dim
    again = pickle.loads(pickle.dumps(ex))
    np.testing.assert_array_equal(again.extract(None, w).data, out)
    assert build_extractor(ex.config()).params() == ex.params()


def test_egemaps_pitch_column():
    ex = build_extractor("egemaps")
    cols = ex.file_attrs()["columns"]
    assert "F0semitoneFrom27.5Hz_sma3nz" in cols
