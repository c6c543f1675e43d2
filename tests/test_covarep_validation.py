"""COVAREP-like extractor against known truth (issue 3, requirement 3).

* F0 of synthetic LF pulse trains (truth = the synthesis F0) and of espeak-ng speech (truth =
  Praat's pitch through parselmouth). Gross error = fraction of frames voiced in both whose
  F0 differs from the reference by more than 20 %; must be < 5 %.
* NAQ, QOQ and Rd from LF-model flows (tests/acoustic_synth.lf_*, written from Fant 1995
  independently of the extractor) over an Rd sweep 0.3-2.7: Spearman rank correlation > 0.9
  between the truth and the per-signal median estimate, for each of the three.
* MCEP: the envelope reconstructed from MCEP_0..24 (inverse all-pass warped cepstrum) matches
  the known formant filter response of an impulse-train vowel within 2 dB RMS (100-7000 Hz,
  after removing the mean level difference).
* HMPDD near 0 for a phase-coherent harmonic signal, high for one with random phases.
* creak fires on a synthetic creaky pulse train and not on modal voice.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile

import numpy as np
import pytest
import scipy.stats

from sertool.features.base import build_extractor

from acoustic_synth import SR, creaky_train, harmonic_signal, impulse_vowel, lf_train, lf_truth, resonator_response_db

COL = {"F0": 0, "VUV": 1, "NAQ": 2, "QOQ": 3, "Rd": 8, "creak": 10, "MCEP_0": 11, "HMPDD_0": 61}
RD_SWEEP = np.round(np.arange(0.3, 2.71, 0.2), 2)  # 13 values


@pytest.fixture(scope="module")
def covarep():
    return build_extractor("covarep")


def gross_error(est: np.ndarray, ref: np.ndarray) -> tuple[float, int]:
    both = (est > 0) & (ref > 0)
    if not both.any():
        return 1.0, 0
    return float(np.mean(np.abs(est[both] - ref[both]) / ref[both] > 0.2)), int(both.sum())


@pytest.mark.parametrize("f0", [70.0, 110.0, 160.0, 240.0, 350.0])
@pytest.mark.parametrize("rd", [0.5, 1.2, 2.5])
def test_f0_of_lf_pulse_trains(covarep, f0, rd):
    out = covarep.extract(None, lf_train(rd, f0, 0.6, jitter=0.005, seed=int(f0))).data[5:-5]
    assert out[:, COL["VUV"]].mean() > 0.9
    err, n = gross_error(out[:, COL["F0"]], np.full(len(out), f0))
    assert err < 0.05, (f0, rd, err)
    np.testing.assert_allclose(np.median(out[out[:, 1] > 0, 0]), f0, rtol=0.02)


def test_f0_of_a_glide(covarep):
    n = int(0.8 * SR)
    track = np.linspace(90.0, 250.0, n)
    from acoustic_synth import vowel

    out = covarep.extract(None, vowel(track, 0.8)).data
    t = 79 + 160 * np.arange(len(out))
    err, n_both = gross_error(out[:, 0], track[np.minimum(t, n - 1)])
    assert n_both > 0.8 * len(out) and err < 0.05


ESPEAK_TEXT = (
    "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore, and we were away a year ago."
)


def espeak(voice: str, pitch: int) -> np.ndarray:
    import soundfile as sf
    import soxr

    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "s.wav")
        subprocess.run(
            ["espeak-ng", "-v", voice, "-p", str(pitch), "-s", "150", "-w", path, ESPEAK_TEXT],
            check=True,
            capture_output=True,
        )
        x, sr = sf.read(path)
    return soxr.resample(x, sr, SR).astype(np.float32)


def praat_f0(x: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Praat's autocorrelation pitch (50-500 Hz, 10 ms) at the nearest frame, 0 = unvoiced."""
    parselmouth = pytest.importorskip("parselmouth")
    pitch = parselmouth.Sound(x.astype(np.float64), SR).to_pitch(time_step=0.01, pitch_floor=50, pitch_ceiling=500)
    f, xs = pitch.selected_array["frequency"], pitch.xs()
    i = np.clip(np.searchsorted(xs, times), 1, len(xs) - 1)
    i = np.where(np.abs(xs[i - 1] - times) < np.abs(xs[i] - times), i - 1, i)
    return np.where(np.abs(xs[i] - times) < 0.006, f[i], 0.0)


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed (apt-get install espeak-ng)")
@pytest.mark.parametrize("voice,pitch", [("en-us", 50), ("en-us", 20), ("en-us+f3", 50), ("en-gb+f2", 80)])
def test_f0_of_espeak_speech_vs_praat(covarep, voice, pitch):
    x = espeak(voice, pitch)
    out = covarep.extract(None, x).data
    ref = praat_f0(x, (79 + 160 * np.arange(len(out)) + 1) / SR)
    err, n_both = gross_error(out[:, 0], ref)
    assert n_both >= 0.85 * (ref > 0).sum()  # voicing agrees on most of Praat's voiced frames
    assert err < 0.05, (voice, pitch, err)


@pytest.fixture(scope="module")
def rd_sweep(covarep):
    """Median NAQ, QOQ, Rd over the voiced frames of LF trains at two F0s for each Rd."""
    rows = {}
    for f0 in (120.0, 160.0):
        est = []
        for rd in RD_SWEEP:
            out = covarep.extract(None, lf_train(rd, f0, 0.6, jitter=0.005, seed=1)).data[5:-5]
            v = out[:, 1] > 0
            est.append([np.median(out[v, COL[c]]) for c in ("NAQ", "QOQ", "Rd")])
        rows[f0] = np.array(est)
    truth = np.array([[lf_truth(rd)[c] for c in ("NAQ", "QOQ", "Rd")] for rd in RD_SWEEP])
    return truth, rows


@pytest.mark.parametrize("param", ["NAQ", "QOQ", "Rd"])
@pytest.mark.parametrize("f0", [120.0, 160.0])
def test_lf_parameters_rank_correlation(rd_sweep, param, f0):
    truth, rows = rd_sweep
    j = ("NAQ", "QOQ", "Rd").index(param)
    rho = scipy.stats.spearmanr(truth[:, j], rows[f0][:, j])[0]
    assert rho > 0.9, (param, f0, rho, rows[f0][:, j])


def test_naq_and_rd_values_near_truth(rd_sweep):
    truth, rows = rd_sweep
    est = rows[120.0]
    np.testing.assert_allclose(est[:, 0], truth[:, 0], atol=0.03)  # NAQ
    inside = RD_SWEEP <= 2.5  # COVAREP's Rd search range is 0.3-2.5
    np.testing.assert_allclose(est[inside, 2], truth[inside, 2], atol=0.15)


def mcep_envelope_db(c: np.ndarray, n_bins: int, alpha: float = 0.42) -> np.ndarray:
    """log|H| (dB) from a mel-cepstrum: c_0 + sum_m c_m cos(m w~), w~ the all-pass warped
    frequency of w (SPTK convention; natural-log amplitude)."""
    w = np.linspace(0, np.pi, n_bins)
    wt = w + 2 * np.arctan(alpha * np.sin(w) / (1 - alpha * np.cos(w)))
    env = c[0] + (c[1:, None] * np.cos(np.arange(1, c.size)[:, None] * wt[None, :])).sum(0)
    return 20 / np.log(10) * env


@pytest.mark.parametrize("f0", [100.0, 160.0])
@pytest.mark.parametrize(
    "formants,bandwidths", [((700, 1220, 2600), (80, 90, 120)), ((300, 2300, 3000), (60, 100, 150))]
)
def test_mcep_reconstructs_the_vowel_envelope(covarep, f0, formants, bandwidths):
    out = covarep.extract(None, impulse_vowel(f0, 0.6, formants, bandwidths)).data[15:-15]
    env = mcep_envelope_db(out[:, 11:36].mean(0), 513)
    true = resonator_response_db(513, formants, bandwidths)
    hz = np.linspace(0, SR / 2, 513)
    band = (hz > 100) & (hz < 7000)
    diff = env - true
    diff -= diff[band].mean()  # MCEP_0 carries the (arbitrary) level
    rms = np.sqrt(np.mean(diff[band] ** 2))
    null = np.sqrt(np.mean((true[band] - true[band].mean()) ** 2))
    assert rms < 2.0 and null > 10 * rms, (rms, null)
    peaks = [hz[band][np.argmax(np.where(np.abs(hz[band] - f) < 150, env[band], -np.inf))] for f in formants]
    np.testing.assert_allclose(peaks, formants, rtol=0.03, atol=max(60.0, f0 / 2))  # peak picking on the 15.6 Hz grid


def test_phase_distortion_deviation(covarep):
    coh = covarep.extract(None, harmonic_signal(150.0, random_phase=False)).data[15:-15]
    rnd = covarep.extract(None, harmonic_signal(150.0, random_phase=True)).data[15:-15]
    assert coh[:, 1].mean() > 0.9 and rnd[:, 1].mean() > 0.8  # both voiced
    # HMPDD_0 is the mean log PDD over frequency: exp() gives its geometric mean in radians
    pdd_coh = np.exp(coh[coh[:, 1] > 0, COL["HMPDD_0"]].mean())
    pdd_rnd = np.exp(rnd[rnd[:, 1] > 0, COL["HMPDD_0"]].mean())
    assert pdd_coh < 0.05 and pdd_rnd > 0.4, (pdd_coh, pdd_rnd)


@pytest.mark.parametrize("f0,secondary,seed", [(50.0, 0.5, 0), (40.0, 0.5, 1), (65.0, 0.0, 2)])
def test_creak_fires_on_creaky_pulses(covarep, f0, secondary, seed):
    out = covarep.extract(None, creaky_train(f0, 1.0, secondary=secondary, seed=seed)).data[10:-10]
    assert out[:, COL["creak"]].mean() > 0.6 and np.mean(out[:, COL["creak"]] > 0.5) > 0.7


@pytest.mark.parametrize("f0,rd", [(90.0, 0.7), (120.0, 1.0), (200.0, 1.0)])
def test_creak_silent_on_modal_voice(covarep, f0, rd):
    out = covarep.extract(None, lf_train(rd, f0, 1.0, jitter=0.005)).data[10:-10]
    assert out[:, COL["creak"]].mean() < 0.1 and np.mean(out[:, COL["creak"]] > 0.5) < 0.05
