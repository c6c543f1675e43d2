"""Long recordings: voice activity segmentation (sertool.segment), per-segment and per-file rows,
and the --plot picture, with the packaged MFCC model."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from whisper_synth import speechlike

from sertool.cli import cli
from sertool.predict import iter_rows
from sertool.segment import PAD_S, prediction_segments, silero_available, smooth_spans, speech_spans

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SR = 16000
SPEECH = [(2.0, 6.5), (9.0, 11.0), (11.2, 14.0), (30.0, 41.0), (55.0, 57.5)]  # 11.2: a 0.2 s pause inside


def synthesised(spans=SPEECH, duration=70.0, seed=0) -> np.ndarray:
    """Speech-like bursts (an amplitude-modulated 180 Hz tone + noise) at `spans`, faint noise elsewhere."""
    rng = np.random.default_rng(seed)
    x = 0.002 * rng.standard_normal(int(duration * SR)).astype(np.float32)
    for k, (a, b) in enumerate(spans):
        i, j = int(a * SR), int(b * SR)
        x[i:j] += speechlike(j - i, seed=k)
    return x


def close(found, expected, tol):
    return len(found) == len(expected) and all(
        abs(a - c) <= tol and abs(b - d) <= tol for (a, b), (c, d) in zip(found, expected)
    )


def test_energy_vad_finds_the_speech_spans():
    found = speech_spans(synthesised(), SR, "energy")
    expected = [(2.0, 6.5), (9.0, 14.0), (30.0, 41.0), (55.0, 57.5)]  # the 0.2 s pause is bridged
    assert close(found, expected, PAD_S + 0.05), found


def test_smoothing_and_prediction_segments():
    assert smooth_spans([(1.0, 1.1), (2.0, 3.0), (3.2, 4.0)], 10.0) == [(1.9, 4.1)]  # burst dropped, pause bridged
    spans = [(0.0, 4.0), (4.5, 8.0), (20.0, 95.0), (99.0, 99.1)]
    # neighbours joined up to the window; 75 s cut into 3 x 25 s; a 0.1 s scrap dropped
    assert prediction_segments(spans, 30.0) == [(0.0, 8.0), (20.0, 45.0), (45.0, 70.0), (70.0, 95.0)]
    assert prediction_segments([(0.0, 10.0), (10.5, 25.0)], 20.0) == [(0.0, 10.0), (10.5, 25.0)]


@pytest.mark.skipif(
    not silero_available() or shutil.which("espeak-ng") is None, reason="needs silero-vad and espeak-ng"
)
def test_silero_vad_finds_synthetic_speech(tmp_path):
    from sertool.audio import load_audio

    parts, truth, t = [], [], 0.0
    for k, text in enumerate(["The quick brown fox jumps over the lazy dog.", "Please leave the door open."]):
        wav = tmp_path / f"s{k}.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), text], check=True)
        w, _ = load_audio(wav, SR)
        nz = np.flatnonzero(np.abs(w) > 1e-3)
        w = w[nz[0] : nz[-1] + 1]
        parts += [np.zeros(3 * SR, np.float32), w]
        truth.append((t + 3.0, t + 3.0 + len(w) / SR))
        t += 3.0 + len(w) / SR
    x = np.concatenate([*parts, np.zeros(3 * SR, np.float32)])
    assert close(speech_spans(x, SR, "silero"), truth, 0.35)
    assert close(speech_spans(x, SR, "energy"), truth, 0.35)


@pytest.fixture(scope="module")
def long_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("long")
    sf.write(d / "long.wav", synthesised(), SR)
    sf.write(d / "silent_long.wav", 0.001 * np.random.default_rng(1).standard_normal(40 * SR).astype(np.float32), SR)
    sf.write(d / "tiny.wav", speechlike(int(0.05 * SR)), SR)
    sf.write(d / "clip.wav", speechlike(3 * SR), SR)
    return d


def test_long_file_is_cut_at_its_speech_and_plotted(long_dir, tmp_path):
    out, plots = tmp_path / "p.csv", tmp_path / "plots"
    args = [
        "predict",
        "--model",
        "ravdess-mfcc",
        str(long_dir),
        "-o",
        str(out),
        "-q",
        "--segments",
        "--plot",
        str(plots),
    ]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 3, res.output  # tiny.wav and the silent long file fail
    rows = list(iter_rows(out))
    by_file = {r["file"].rsplit("/", 1)[-1]: r for r in rows if not r["segment"]}
    assert "too short" in by_file["tiny.wav"]["error"]
    assert "no speech found" in by_file["silent_long.wav"]["error"]
    assert by_file["clip.wav"]["n_segments"] == "1" and by_file["clip.wav"]["error"] == ""
    segs = [r for r in rows if r["segment"] and r["file"].endswith("/long.wav")]
    spans = [(float(r["start"]), float(r["end"])) for r in segs]
    # spans 2.5 s or more apart stay separate segments; each lies on speech
    assert close(spans, [(2.0, 6.5), (9.0, 14.0), (30.0, 41.0), (55.0, 57.5)], PAD_S + 0.05), spans
    f = by_file["long.wav"]
    classes = [c[2:] for c in f if c.startswith("p_")]
    weights = np.array([b - a for a, b in spans])
    probs = np.array([[float(r[f"p_{c}"]) for c in classes] for r in segs])
    np.testing.assert_allclose([float(f[f"p_{c}"]) for c in classes], weights @ probs / weights.sum(), atol=2e-6)
    time_per_label = {}
    for w, r in zip(weights, segs):
        time_per_label[r["label"]] = time_per_label.get(r["label"], 0.0) + w
    assert f["label"] == max(time_per_label, key=time_per_label.get)  # majority over speech time
    assert f["n_segments"] == str(len(segs)) and f["uncertain"] in ("true", "false")
    pngs = sorted(p.name for p in plots.iterdir())
    assert pngs == ["long.wav.png"]  # long files only; not the one without speech
    assert (plots / "long.wav.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_vad_off_keeps_equal_windows(long_dir, tmp_path):
    out = tmp_path / "p.csv"
    args = ["predict", "--model", "ravdess-mfcc", str(long_dir / "long.wav"), "-o", str(out), "-q", "--vad", "off"]
    assert CliRunner().invoke(cli, args).exit_code == 0
    (row,) = iter_rows(out)
    assert row["n_segments"] == "3"  # 70 s in 3 x 23.3 s
