"""``model.input_encoders``: a store-fed model (cma, self_attn, cross_attn) on a Whisper and a BERT-family
encoder it fine-tunes (issue 19, sertool/models/owned.py).

Tiny random encoders (test_whisper_ft's Whisper, test_text_ft's BERT) on make_distill_feats's clips
with transcripts: the model reads exactly the encoders' layer-weighted frames, trains end to end
(the encoders' weights move, at the scaled learning rate), evaluate rebuilds it from the experiment
alone and predict reproduces evaluate; wrong settings are one-line errors."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file
from test_lm import tiny_bert  # noqa: F401 - fixture
from test_predict_finetuned import FOLD, assert_matches_evaluate, predict, text_corpus
from test_text_ft import encoder as tiny_bert_24  # noqa: F401 - fixture
from test_whisper_ft import tiny_whisper  # noqa: F401 - fixture

from sertool.cli import cli
from sertool.models import build_model
from sertool.train import make_optimizer, resolve_config

from conftest import quiet

pytestmark = pytest.mark.usefixtures("one_torch_thread")
SMALL = {
    "cma": ["model.d=16", "model.num_heads=2", "model.ffn_dim=16", "model.lstm_hidden=8", "model.audio_conv=[[8,3,2]]"],
}


def settings(model, whisper, bert, *extra) -> list[str]:
    return [
        f"model.input_encoders.audio={whisper}",
        f"model.input_encoders.text={bert}",
        *SMALL[model],
        "protocol.name=kfold:2",
        "train.epochs=2",
        "train.batch_size=4",
        "train.freeze_encoder_epochs=0",
        "optim.encoder_lr_scale=0.5",
        "run.threads=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def cma_exp(tmp_path_factory, tiny_whisper, tiny_bert_24):  # noqa: F811
    from sertool.evaluate import run_evaluate
    from sertool.train import run_train

    base = tmp_path_factory.mktemp("owned")
    feats, exp = text_corpus(base / "f"), base / "exp"
    sets = settings("cma", tiny_whisper, tiny_bert_24)
    out = run_train("cma", feats, exp, overrides=sets, progress=False, log=quiet, folds_only=[FOLD])
    spec = json.loads((exp / "predictor.json").read_text())
    spec.pop("temperature", None)  # evaluate's probabilities are uncalibrated
    (exp / "predictor.json").write_text(json.dumps(spec))
    ev = run_evaluate(exp, feats, log=quiet)
    with open(exp / "eval" / "predictions.csv", newline="") as f:
        evaluated = {r["id"]: r for r in csv.DictReader(f) if r.get("fold", FOLD) == FOLD}
    return {"exp": exp, "feats": feats, "out": out, "ev": ev, "eval": evaluated, "classes": spec["classes"]}


def test_config_expands_the_encoders_and_sets_the_inputs(tiny_whisper, tiny_bert_24):  # noqa: F811
    cfg = resolve_config("cma", overrides=settings("cma", tiny_whisper, tiny_bert_24))
    enc = cfg["model"]["input_encoders"]
    assert enc["audio"]["name"] == "whisper_ft" and enc["audio"]["encoder_config"]["d_model"] == 32
    assert enc["text"]["name"] == "text_ft" and enc["text"]["encoder_config"]["hidden_size"] > 0
    assert cfg["data"]["audio"] == "wave" and cfg["data"]["text"] == f"tokenizer:{tiny_bert_24}"
    assert cfg["model"]["audio_dim"] == 32 and cfg["model"]["text_dim"] == enc["text"]["encoder_config"]["hidden_size"]
    assert cfg["data"]["normalize"]["audio"] == "none"


def test_the_model_reads_the_encoders_frames_and_groups_their_weights(tiny_whisper, tiny_bert_24):  # noqa: F811
    cfg = resolve_config("cma", overrides=settings("cma", tiny_whisper, tiny_bert_24, "model.dropout=0.0"))
    cfg["model"]["n_classes"] = 3
    torch.manual_seed(0)
    model = build_model({"model": cfg["model"]})
    model.load_pretrained()
    model.eval()
    wave = torch.randn(2, 6000) * (torch.arange(6000)[None, :] < torch.tensor([6000, 4000])[:, None])
    batch = {
        "audio": wave,
        "audio_mask": torch.arange(6000)[None, :] < torch.tensor([6000, 4000])[:, None],
        "text": torch.tensor([[2, 5, 6, 3], [2, 7, 3, 0]]),
        "text_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]], dtype=torch.bool),
        "ids": ["a", "b"],
    }
    with torch.no_grad():
        got = model(batch)
        frames = dict(batch)
        for m in ("audio", "text"):
            frames[m], frames[f"{m}_mask"] = model.encoders[m].frames(batch)
        want = model.head(frames)
    torch.testing.assert_close(got, want)
    assert frames["audio"].shape[-1] == 32 and frames["audio_mask"].sum(1).tolist() == [19, 13]
    opt = make_optimizer(cfg, model)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["encoder"]["lr"] == pytest.approx(0.5 * groups["head"]["lr"])
    names = {id(p): n for n, p in model.named_parameters()}
    enc_names = {names[id(p)] for p in groups["encoder"]["params"]}
    assert any(n.startswith("encoders.audio.encoder.") for n in enc_names)
    assert any(n.startswith("encoders.text.encoder.") for n in enc_names)
    head_names = {names[id(p)] for p in groups["head"]["params"]}
    assert "encoders.audio.layer_weights.audio.logits" in head_names and any(n.startswith("head.") for n in head_names)


def test_trains_end_to_end_and_evaluate_rebuilds_it(cma_exp, tiny_whisper):  # noqa: F811
    from sertool.models.whisper_ft import pretrained_encoder

    run = cma_exp["out"]["runs"][0]
    assert np.isfinite(run["test"]["loss"])
    state = load_file(str(cma_exp["exp"] / "folds" / FOLD / "seed0" / "model.safetensors"))
    start = pretrained_encoder(str(tiny_whisper)).encoder.state_dict()
    moved = [k for k, v in start.items() if not torch.equal(state[f"encoders.audio.encoder.encoder.{k}"], v)]
    assert moved, "the Whisper encoder did not train"
    assert any(k.startswith("encoders.text.encoder.") for k in state) and any(k.startswith("head.") for k in state)
    got = next(r for r in cma_exp["ev"]["runs"] if r["fold"] == run["fold"])
    for k in ("WA", "UA"):
        assert got[k] == pytest.approx(run["test"][k], abs=1e-9)


def test_predict_reproduces_evaluate(cma_exp, tmp_path):
    exp, feats = cma_exp["exp"], cma_exp["feats"]
    from sertool.corpora.base import read_manifest

    with open(tmp_path / "t.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "text"])
        for u in read_manifest(feats / "manifest.jsonl"):
            w.writerow([f"{u.id}.wav", u.text])
    out = tmp_path / "pred.csv"
    res = predict([exp, feats / "wav", "-o", out, "--transcripts", tmp_path / "t.csv", "-q"])
    assert res.exit_code == 0, res.output
    with open(out, newline="") as f:
        assert_matches_evaluate(list(csv.DictReader(f)), cma_exp)


def test_bad_settings_are_one_line(tmp_path, tiny_whisper):  # noqa: F811
    from conftest import make_distill_feats

    feats = make_distill_feats(tmp_path / "f")
    cases = [
        (["--audio", "ta", "--set", f"model.input_encoders.audio={tiny_whisper}"], "reads the waveform"),
        (["--set", "model.input_encoders.visual=x"], "model.input_encoders.visual"),
        (["--audio-encoder", str(tmp_path / "nowhere")], "model.input_encoders.audio"),
        (["-m", "lgcct", "--audio-encoder", "tiny.en"], "unknown config key 'model.input_encoders"),
        (["--set", f"model.input_encoders.audio={tmp_path / 'nowhere'}"], "model.input_encoders.audio"),
        (["--set", "model.input_encoders.audio={encoder: tiny.en, bogus: 1}"], "unknown key(s) bogus"),
    ]
    for args, message in cases:
        model = [] if "-m" in args else ["-m", "cma"]
        res = CliRunner().invoke(cli, ["train", str(feats), *model, "-o", str(tmp_path / "e"), *args, "-q"])
        assert res.exit_code != 0 and message in res.output, (args, res.output)
        assert "Traceback" not in res.output


def test_export_refuses_in_one_line(cma_exp, tmp_path):
    res = CliRunner().invoke(cli, ["export", str(cma_exp["exp"]), "-o", str(tmp_path / "m.onnx")])
    assert res.exit_code != 0 and "model.input_encoders: audio, text" in res.output, res.output
    assert "Traceback" not in res.output and not (tmp_path / "m.onnx").exists()
