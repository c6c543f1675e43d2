"""COVAREP-like extractor: shape/columns, known F0 and voicing on synthetic vowels, finite
output on edge cases, rebuild from config."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sertool.features.base import build_extractor

from acoustic_synth import silence, speech_like, vowel, white_noise


@pytest.fixture(scope="module")
def covarep():
    return build_extractor("covarep")


def test_columns_and_frames(covarep):
    attrs = covarep.file_attrs()
    assert attrs["dim"] == 74 and attrs["frame_rate_hz"] == 100.0
    cols = attrs["columns"]
    assert cols[:11] == ["F0", "VUV", "NAQ", "QOQ", "H1H2", "PSP", "MDQ", "peakSlope", "Rd", "Rd_conf", "creak"]
    assert cols[11] == "MCEP_0" and cols[36] == "HMPDM_0" and cols[61] == "HMPDD_0" and cols[-1] == "HMPDD_12"
    out = covarep.extract(None, vowel(120.0, 1.0)).data
    assert out.shape == ((16000 - 80) // 160 + 1, 74) and out.dtype == np.float32


@pytest.mark.parametrize("f0", [100.0, 180.0, 260.0])
def test_f0_voicing_and_glottal_ranges(covarep, f0):
    out = covarep.extract(None, vowel(f0, 1.0)).data
    mid = out[10:-10]
    assert mid[:, 1].mean() > 0.9  # voiced
    np.testing.assert_allclose(np.median(mid[:, 0]), f0, rtol=0.03)
    naq, qoq, rd, conf = (np.median(mid[:, i]) for i in (2, 3, 8, 9))
    assert 0.02 < naq < 0.4 and 0.1 < qoq < 0.9
    assert 0.3 <= rd <= 2.5 and 0 < conf <= 1
    assert np.all(np.abs(mid[:, 36:61]) <= np.pi + 1e-5)  # PDM is a phase


def test_noise_is_unvoiced_and_mcep_tracks_level(covarep):
    noise = covarep.extract(None, white_noise(1.0, amp=0.1)).data
    assert noise[:, 1].mean() < 0.3
    a = covarep.extract(None, vowel(120.0, 1.0)).data
    b = covarep.extract(None, 0.1 * vowel(120.0, 1.0)).data
    np.testing.assert_allclose(a[20:-20, 11] - b[20:-20, 11], np.log(10), atol=0.05)  # MCEP_0 = log level
    np.testing.assert_allclose(a[20:-20, 12:20], b[20:-20, 12:20], atol=1e-3)  # shape is level-free


@pytest.mark.parametrize("n", [1, 100, 479, 1600, 4000])
def test_edge_lengths_and_silence_finite(covarep, n):
    for w in (np.zeros(n, np.float32), white_noise(n / 16000 + 1e-4)[:n], speech_like(0.5)[:n]):
        out = covarep.extract(None, w).data
        assert out.shape == (max(1, (n - 80) // 160 + 1), 74)
        assert np.isfinite(out).all()
    assert not covarep.extract(None, silence(0.5)).data.any()


def test_deterministic_and_rebuildable(covarep):
    w = speech_like(1.0)
    again = build_extractor(json.loads(json.dumps(covarep.config())))
    np.testing.assert_array_equal(again.extract(None, w).data, covarep.extract(None, w).data)
