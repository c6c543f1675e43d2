"""`sertool predict` and `sertool export` on experiments whose model owns its encoder (issue 19):
``whisper_ft`` (reads the 16 kHz waveform, ``data.audio: wave``) and ``text_ft`` (reads its
tokenizer's ids, ``data.text: tokenizer:MODEL``).

Tiny random encoders (test_whisper_ft's Whisper, test_text_ft's BERT) trained for one epoch on a
dozen short clips, one fold: predict on the corpus's own files reproduces evaluate's probabilities
(the waveform read and z-normalised as in training, the token ids of the transcript from the same
tokenizer), a long recording goes through the segmentation path in windows the encoder accepts,
and the exported graphs match the PyTorch model on real inputs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from test_lm import WORDS, tiny_bert  # noqa: F401 - fixtures
from test_text_ft import encoder as tiny_bert_24  # noqa: F401 - fixture
from test_whisper_ft import tiny_whisper  # noqa: F401 - fixture
from whisper_synth import speechlike

from sertool.cli import cli
from sertool.predict import iter_rows, load_predictor

from conftest import make_distill_feats, quiet

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FOLD = "fold1"


def text_corpus(root: Path) -> Path:
    """make_distill_feats's 12 noise clips, each with a transcript of test_lm's words (class words first)."""
    from sertool.corpora.base import read_manifest, write_manifest

    feats = make_distill_feats(root)
    words = [w for w in dict.fromkeys(WORDS) if w.isalpha()]
    rng = np.random.default_rng(1)
    utts = read_manifest(feats / "manifest.jsonl")
    classes = sorted({u.label for u in utts})
    for u in utts:
        c = classes.index(u.label)
        mine = words[c * 5 : c * 5 + 5]
        u.text = " ".join(mine[int(j)] if rng.random() < 0.7 else words[int(j)] for j in rng.integers(0, 5, size=6))
    write_manifest(utts, feats / "manifest.jsonl")
    return feats


def train_and_evaluate(model: str, feats: Path, exp: Path, setting: str) -> dict:
    """One fold of kfold:2, one epoch; evaluate's probabilities of its test utterances (by id)."""
    from sertool.evaluate import run_evaluate
    from sertool.train import run_train

    settings = [
        setting,
        "protocol.name=kfold:2",
        "train.epochs=1",
        "train.batch_size=4",
        "run.threads=1",
    ]
    run_train(model, feats, exp, overrides=settings, progress=False, log=quiet, folds_only=[FOLD])
    spec = json.loads((exp / "predictor.json").read_text())
    # evaluate writes uncalibrated probabilities: compare without the temperature (checked below)
    temperature = spec.pop("temperature", None)
    (exp / "predictor.json").write_text(json.dumps(spec))
    run_evaluate(exp, feats, log=quiet)
    with open(exp / "eval" / "predictions.csv", newline="") as f:
        evaluated = {r["id"]: r for r in csv.DictReader(f) if r.get("fold", FOLD) == FOLD}
    return {"exp": exp, "feats": feats, "eval": evaluated, "classes": spec["classes"], "temperature": temperature}


@pytest.fixture(scope="module")
def whisper_exp(tmp_path_factory, tiny_whisper):  # noqa: F811
    base = tmp_path_factory.mktemp("pft-w")
    return train_and_evaluate(
        "whisper_ft", make_distill_feats(base / "f"), base / "exp", f"model.encoder={tiny_whisper}"
    )


@pytest.fixture(scope="module")
def text_exp(tmp_path_factory, tiny_bert_24):  # noqa: F811
    base = tmp_path_factory.mktemp("pft-t")
    return train_and_evaluate("text_ft", text_corpus(base / "f"), base / "exp", f"model.encoder={tiny_bert_24}")


@pytest.fixture(scope="module")
def cmd_exp(tmp_path_factory):
    """A CMD audio-only student (sertool distill, one epoch) fine-tuned on the waveform (data.audio: wave)."""
    from sertool.distill import run_distill

    base = tmp_path_factory.mktemp("pft-c")
    feats = make_distill_feats(base / "f")
    tiny = ["distill.epochs=1", "distill.budget=24000", "student.stem_channels=8", "student.ffn_dim=32"]
    tiny += ["distill.dev_fraction=0.25", "student.modalities=[audio]"]
    run_distill(feats, base / "d", teacher_audio="ta", overrides=tiny, progress=False)
    return train_and_evaluate("cmd", feats, base / "exp", f"model.init={base / 'd'}")


def predict(args):
    return CliRunner().invoke(cli, ["predict", *map(str, args)], catch_exceptions=False)


def probabilities(row, classes):
    return np.array([float(row[f"p_{c}"]) for c in classes])


def assert_matches_evaluate(rows: list[dict], ctx: dict) -> None:
    by_id = {Path(r["file"]).stem: r for r in rows}
    assert len(by_id) == 12 and all(r["error"] == "" for r in rows), rows
    assert len(ctx["eval"]) >= 5
    for uid, want in ctx["eval"].items():
        got = by_id[uid]
        np.testing.assert_allclose(probabilities(got, ctx["classes"]), probabilities(want, ctx["classes"]), atol=1e-5)
        assert got["n_segments"] == "1"


def test_whisper_ft_predict_reproduces_evaluate(whisper_exp, tmp_path):
    out = tmp_path / "p.csv"
    res = predict([whisper_exp["exp"], whisper_exp["feats"] / "wav", "-o", out, "-q", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert_matches_evaluate(list(iter_rows(out)), whisper_exp)
    # the predictor reads the waveform itself: no feature extractor, the 30 s window of its encoder
    pred = load_predictor(whisper_exp["exp"], "cpu")
    assert type(pred.extractors["audio"]).__name__ == "WaveReader" and pred.longest_wave_s == 30.0


def test_whisper_ft_calibration_and_uncertain_flag(whisper_exp, tmp_path):
    """predictor.json ``temperature`` is applied (softmax(log p / T)), ``uncertain`` flags flat rows."""
    exp = tmp_path / "exp"
    shutil.copytree(whisper_exp["exp"], exp)
    spec = json.loads((exp / "predictor.json").read_text())
    (exp / "predictor.json").write_text(json.dumps({**spec, "temperature": 3.0}))
    out = tmp_path / "p.jsonl"
    res = predict([exp, whisper_exp["feats"] / "wav", "-o", out, "-q", "--device", "cpu", "--uncertain-below", "0.9"])
    assert res.exit_code == 0, res.output
    rows = {Path(r["file"]).stem: r for r in iter_rows(out)}
    for uid, want in whisper_exp["eval"].items():
        logits = np.log(probabilities(want, whisper_exp["classes"]))
        expected = np.exp(logits / 3.0) / np.exp(logits / 3.0).sum()
        np.testing.assert_allclose(probabilities(rows[uid], whisper_exp["classes"]), expected, atol=1e-5)
        assert rows[uid]["uncertain"] is True  # 3 classes flattened by T = 3: no class near 0.9


def test_whisper_ft_bad_files_get_error_rows_and_resume_skips_finished_ones(whisper_exp, tmp_path):
    d = tmp_path / "clips"
    d.mkdir()
    sf.write(d / "a_ok.wav", speechlike(16000), 16000)
    sf.write(d / "b_short.wav", speechlike(800), 16000)
    (d / "c_corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage")
    out = tmp_path / "p.csv"
    res = predict([whisper_exp["exp"], d, "-o", out, "-q", "--device", "cpu"])
    assert res.exit_code == 3, res.output
    rows = {Path(r["file"]).name: r for r in iter_rows(out)}
    assert rows["a_ok.wav"]["error"] == "" and rows["a_ok.wav"]["label"] in whisper_exp["classes"]
    assert "too short" in rows["b_short.wav"]["error"] and rows["c_corrupt.wav"]["error"]
    sf.write(d / "d_new.wav", speechlike(12000, seed=3), 16000)
    res = predict([whisper_exp["exp"], d, "-o", out, "-q", "--device", "cpu", "--resume"])
    rows2 = list(iter_rows(out))
    assert [Path(r["file"]).name for r in rows2] == ["a_ok.wav", "b_short.wav", "c_corrupt.wav", "d_new.wav"]
    assert rows2[0] == rows["a_ok.wav"] and rows2[3]["error"] == ""


def test_whisper_ft_long_recording_is_cut_into_encoder_windows(whisper_exp, tmp_path):
    """A 70 s recording (more than the encoder's 30 s) with --window 60: segments of at most 30 s, each
    z-normalised on its own (the prediction of a segment equals that of the segment cut out as a file)."""
    d = tmp_path / "long"
    d.mkdir()
    x = np.concatenate([speechlike(35 * 16000, seed=1), 3 * speechlike(35 * 16000, seed=2)])
    sf.write(d / "long.wav", x, 16000)
    out = tmp_path / "p.csv"
    args = ["-o", out, "-q", "--device", "cpu", "--segments", "--vad", "off", "--window", "60"]
    res = predict([whisper_exp["exp"], d, *args])
    assert res.exit_code == 0, res.output
    rows = list(iter_rows(out))
    segs = [r for r in rows if r["segment"]]
    assert [(float(r["start"]), float(r["end"])) for r in segs] == [(0.0, 23.333), (23.333, 46.667), (46.667, 70.0)]
    assert rows[-1]["n_segments"] == "3" and rows[-1]["error"] == ""
    cut = tmp_path / "cut"
    cut.mkdir()
    sf.write(cut / "last.wav", x[int(round(46.667 * 16000)) :], 16000)
    out2 = tmp_path / "cut.csv"
    assert predict([whisper_exp["exp"], cut, "-o", out2, "-q", "--device", "cpu"]).exit_code == 0
    (alone,) = iter_rows(out2)
    classes = whisper_exp["classes"]
    np.testing.assert_allclose(probabilities(segs[-1], classes), probabilities(alone, classes), atol=1e-5)


def test_cmd_student_on_the_waveform_predicts_and_exports(cmd_exp, tmp_path):
    """Another model on data.audio: wave: predict reproduces evaluate, the export's check passes."""
    out = tmp_path / "p.csv"
    res = predict([cmd_exp["exp"], cmd_exp["feats"] / "wav", "-o", out, "-q", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert_matches_evaluate(list(iter_rows(out)), cmd_exp)
    res = CliRunner().invoke(cli, ["export", str(cmd_exp["exp"]), "-o", str(tmp_path / "m.pt")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "m.pt.json").read_text())["check"]["max_abs_diff"] < 1e-4


def write_transcripts(feats: Path, table: Path) -> Path:
    """A --transcripts table of the corpus's own files and texts."""
    from sertool.corpora.base import read_manifest

    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "text"])
        for u in read_manifest(feats / "manifest.jsonl"):
            w.writerow([Path(u.audio).name, u.text])
    return table


def test_text_ft_predict_with_transcripts_reproduces_evaluate(text_exp, tmp_path):
    table = write_transcripts(text_exp["feats"], tmp_path / "transcripts.csv")
    out = tmp_path / "p.csv"
    wav = text_exp["feats"] / "wav"
    res = predict([text_exp["exp"], wav, "-o", out, "-q", "--device", "cpu", "--transcripts", table])
    assert res.exit_code == 0, res.output
    rows = list(iter_rows(out))
    assert {r["text_source"] for r in rows} == {"transcripts"}
    assert_matches_evaluate(rows, text_exp)
    # without any text the run fails at once, naming the ways to give it
    res = CliRunner().invoke(cli, ["predict", str(text_exp["exp"]), str(wav), "-o", str(tmp_path / "q.csv"), "-q"])
    assert res.exit_code == 1 and "--transcripts" in res.output and "Traceback" not in res.output


def test_text_ft_predict_with_a_missing_tokenizer_is_one_clear_line(text_exp, tmp_path):
    exp = tmp_path / "exp"
    shutil.copytree(text_exp["exp"], exp)
    spec = json.loads((exp / "predictor.json").read_text())
    spec["inputs"]["text"] = f"tokenizer:{tmp_path / 'gone'}"
    (exp / "predictor.json").write_text(json.dumps(spec))
    (tmp_path / "t.csv").write_text("file,text\nu00.wav,hello\n")
    args = [exp, text_exp["feats"] / "wav", "-o", tmp_path / "p.csv", "-q", "--transcripts", tmp_path / "t.csv"]
    res = CliRunner().invoke(cli, ["predict", *map(str, args)])
    assert res.exit_code == 1 and "tokenizer" in res.output and "Traceback" not in res.output, res.output


# ----------------------------------------------------------------------------------- export
def real_inputs(ctx: dict, modality: str, names: list[str]) -> tuple:
    """The corpus's first 4 clips as the exported graph takes them (zero-padded, with masks): raw
    16 kHz samples, or the token ids ``sertool predict`` makes of their transcripts."""
    import torch

    from sertool.corpora.base import read_manifest

    utts = read_manifest(ctx["feats"] / "manifest.jsonl")[:4]
    pred = load_predictor(ctx["exp"], "cpu")
    if modality == "audio":
        from sertool.audio import load_audio

        xs = [load_audio(u.audio, 16000)[0] for u in utts]
    else:
        xs = [pred.extractors["text"].extract(u).data for u in utts]
    T = max(len(x) for x in xs)
    arr = np.zeros((len(xs), T), dtype=xs[0].dtype)
    for i, x in enumerate(xs):
        arr[i, : len(x)] = x
    mask = np.arange(T)[None, :] < np.array([len(x) for x in xs])[:, None]
    # the reference: predict's own computation on the same recordings (reader, collate, model, softmax)
    want = pred.predict_features([{modality: pred.extractors[modality].extract(u, x).data} for u, x in zip(utts, xs)])
    return (torch.from_numpy(arr), torch.from_numpy(mask)), want


@pytest.mark.parametrize("suffix", [".pt", ".onnx"])
@pytest.mark.parametrize("which", ["whisper", "text"])
def test_export_of_a_finetuned_model_matches_pytorch(whisper_exp, text_exp, tmp_path, which, suffix):
    from sertool.export import run_exported

    if suffix == ".onnx":
        pytest.importorskip("onnx")
        pytest.importorskip("onnxruntime")
    ctx, modality = (whisper_exp, "audio") if which == "whisper" else (text_exp, "text")
    out = tmp_path / f"model{suffix}"
    res = CliRunner().invoke(cli, ["export", str(ctx["exp"]), "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    info = json.loads(out.with_name(out.name + ".json").read_text())
    assert info["input_names"] == [modality, f"{modality}_mask"]
    assert info["check"]["max_abs_diff"] < 1e-4
    inputs, want = real_inputs(ctx, modality, info["input_names"])
    got = run_exported(out, inputs, info["input_names"])
    diff = float(np.max(np.abs(got - want)))
    print(f"{which}{suffix}: exported vs PyTorch on real inputs, max |diff| {diff:.2e}")  # pytest -s
    assert got.shape == want.shape and diff < 1e-4


def test_graph_log_mel_matches_the_encoders(tiny_whisper):  # noqa: F811
    """The exported front end (a DFT convolution) against WhisperAudioEncoder.log_mel (torch.stft),
    on clips of different lengths in one batch, speech-like and noise."""
    import torch

    from sertool.export import WaveformLogMel
    from sertool.models.whisper_encoder import load_whisper_encoder

    enc = load_whisper_encoder(tiny_whisper)
    noise = np.random.default_rng(0).normal(size=800).astype(np.float32) * 0.05
    waves = [0.1 * speechlike(5000, 1), 0.05 * speechlike(12345, 2), noise]
    want, frames = enc.log_mel(waves)
    arr = np.zeros((3, 12345), np.float32)
    for i, w in enumerate(waves):
        arr[i, : len(w)] = w
    got, got_frames = WaveformLogMel(enc.n_mels, enc.max_mel_frames)(
        torch.from_numpy(arr), torch.tensor([5000, 12345, 800])
    )
    assert got_frames.tolist() == frames.tolist() == [32, 78, 6] and got.shape == (3, enc.n_mels, 3000)
    M = want.shape[-1]
    assert float((got[:, :, :M] - want).abs().max()) < 1e-4 and float(got[:, :, M:].abs().max()) == 0.0
    for i, m in enumerate(frames.tolist()):
        assert float(got[i, :, m:].abs().max()) == 0.0  # zeros past each clip's frames


def test_unsupported_raw_inputs_fail_with_one_line(tmp_path):
    """predict: a tokens:STORE input (ids over a vocabulary of a text store) cannot be rebuilt;
    export: a model that cannot take its raw input in a graph (a probe on the waveform)."""
    from test_predict import write_exp

    wave = {"feature": "wave", "kind": "audio", "dim": 0, "frame_rate_hz": 16000.0, "source": "manifest"}
    exp = write_exp(
        tmp_path / "wave",
        {"name": "probe", "modality": "audio", "input_dim": 1, "n_classes": 2},
        {"audio": wave},
        ["a", "b"],
    )
    res = CliRunner().invoke(cli, ["export", str(exp), "-o", str(tmp_path / "m.pt")])
    assert res.exit_code == 1 and "TorchScript export failed" in res.output and "Traceback" not in res.output
    assert len(res.output.strip().splitlines()) == 1
    tokens = {"feature": "tokens:bert", "kind": "text", "dim": 0, "unit": "token", "source": str(tmp_path / "bert.h5")}
    exp = write_exp(
        tmp_path / "tok",
        {"name": "probe", "modality": "text", "input_dim": 1, "n_classes": 2},
        {"text": tokens},
        ["a", "b"],
    )
    (tmp_path / "wav").mkdir()
    sf.write(tmp_path / "wav" / "a.wav", speechlike(16000), 16000)
    (tmp_path / "t.csv").write_text("file,text\na.wav,hello\n")
    args = [exp, tmp_path / "wav", "-o", tmp_path / "p.csv", "--transcripts", tmp_path / "t.csv", "-q"]
    res = CliRunner().invoke(cli, ["predict", *map(str, args)])
    assert res.exit_code == 1 and "tokens:bert" in res.output and "Traceback" not in res.output, res.output


@pytest.fixture(scope="module")
def cmd_tokens_exp(tmp_path_factory, tiny_bert):  # noqa: F811
    """A CMD student distilled from a cached text teacher made by the ``bert`` extractor (its tokens
    recorded), fine-tuned on the waveform and ``data.text: tokens:bert`` (ids over its vocabulary)."""
    from sertool.corpora.base import read_manifest
    from sertool.distill import run_distill
    from sertool.features.base import build_extractor
    from sertool.store import StoreWriter

    base = tmp_path_factory.mktemp("pft-ct")
    feats = text_corpus(base / "f")
    ex = build_extractor("bert", {"model": str(tiny_bert)})
    store = StoreWriter(
        feats / "bert.h5",
        {"feature": "bert", "kind": "text", "dim": ex.dim, "unit": "token", "extractor": ex.config()},
    )
    for u in read_manifest(feats / "manifest.jsonl"):
        res = ex.extract(u, None)
        store.add(u.id, res.data, res.attrs)
    store.finalize()
    tiny = ["distill.epochs=1", "distill.budget=24000", "student.stem_channels=8", "student.ffn_dim=32"]
    tiny += ["distill.dev_fraction=0.25"]
    run_distill(feats, base / "d", teacher_audio="ta", teacher_text="bert", overrides=tiny, progress=False)
    return train_and_evaluate("cmd", feats, base / "exp", f"model.init={base / 'd'}")


def test_cmd_student_on_store_tokens_predicts_with_transcripts(cmd_tokens_exp, tmp_path):
    """data.text: tokens:STORE: predict rebuilds the store's extractor, tokenises each transcript as
    the store did and maps the tokens through the training vocabulary: evaluate's probabilities."""
    ctx = cmd_tokens_exp
    spec = json.loads((ctx["exp"] / "predictor.json").read_text())
    assert spec["inputs"]["text"].startswith("tokens:") and spec["vocab"][:2] == ["<pad>", "<unk>"]
    assert spec["features"]["text"]["extractor"]["name"] == "bert"
    table = write_transcripts(ctx["feats"], tmp_path / "transcripts.csv")
    out = tmp_path / "p.csv"
    wav = ctx["feats"] / "wav"
    res = predict([ctx["exp"], wav, "-o", out, "-q", "--device", "cpu", "--transcripts", table])
    assert res.exit_code == 0, res.output
    assert_matches_evaluate(list(iter_rows(out)), ctx)
    # an experiment from before predictor.json held the vocabulary reads it from config.yaml
    old = dict(spec)
    del old["vocab"]
    (ctx["exp"] / "predictor.json").write_text(json.dumps(old))
    out2 = tmp_path / "p2.csv"
    res = predict([ctx["exp"], wav, "-o", out2, "-q", "--device", "cpu", "--transcripts", table])
    (ctx["exp"] / "predictor.json").write_text(json.dumps(spec))
    assert res.exit_code == 0, res.output
    assert_matches_evaluate(list(iter_rows(out2)), ctx)
