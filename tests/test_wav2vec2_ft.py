"""wav2vec2_ft: a trainable wav2vec2-family encoder through the one train loop (issue 19).

Tiny random encoders saved as transformers folders (test_ssl's: wav2vec2 with a group-normalised
front end like wav2vec2-base, WavLM with a layer-normalised one): a clip's logits do not depend on
its batch either way; the front end stays frozen and train_layers freezes the lower layers; one fold
trains, evaluate and predict reproduce its scores, the ONNX export matches PyTorch; a checkpoint of
another family and a clip shorter than the front end accepts fail in one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_lm import tiny_bert  # noqa: F401 - fixture
from test_predict_finetuned import assert_matches_evaluate, predict, train_and_evaluate
from test_ssl import save_tiny
from whisper_synth import speechlike

from sertool.cli import cli
from sertool.models.wav2vec2_ft import Wav2Vec2FT
from sertool.predict import iter_rows
from sertool.train import make_optimizer, resolve_config

from conftest import make_distill_feats

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def w2v_group(tmp_path_factory):  # group norm over time in the front end (wav2vec2-base): no padding
    return save_tiny("wav2vec2", tmp_path_factory.mktemp("w2v-group"), False)


@pytest.fixture(scope="module")
def wavlm_layer(tmp_path_factory):  # layer norm in the front end (WavLM): padded batches with a mask
    return save_tiny("wavlm", tmp_path_factory.mktemp("wavlm-layer"), True)


def build(encoder, *overrides, n_classes=3):
    cfg = resolve_config("wav2vec2_ft", overrides=[f"model.encoder={encoder}", *overrides])
    cfg["model"].update(n_classes=n_classes, dropout=0.0)
    model = Wav2Vec2FT(**{k: v for k, v in cfg["model"].items() if k != "name"})
    model.load_pretrained()
    return cfg, model


def batch_of(lengths):
    wave = torch.zeros(len(lengths), max(lengths))
    for i, n in enumerate(lengths):
        x = speechlike(n, seed=i + 1)
        wave[i, :n] = torch.from_numpy((x - x.mean()) / x.std())
    return {"audio": wave, "audio_mask": torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]}


@pytest.fixture(scope="module")
def data2vec(tmp_path_factory):  # positional convolutions that carry padding: clips by equal length
    return save_tiny("data2vec-audio", tmp_path_factory.mktemp("d2v"), False)


@pytest.mark.parametrize("fixture", ["w2v_group", "wavlm_layer", "data2vec"])
def test_a_clips_logits_do_not_depend_on_its_batch(fixture, request):
    cfg, model = build(request.getfixturevalue(fixture))
    assert model.padding_group == ("length" if fixture == "data2vec" else None)  # else one padded pass
    model.eval()
    lengths = [16000, 9000, 12345, 9000]
    batch = batch_of(lengths)
    with torch.no_grad():
        together = model(batch)
        for i, n in enumerate(lengths):
            alone = model({"audio": batch["audio"][i : i + 1, :n], "audio_mask": batch["audio_mask"][i : i + 1, :n]})
            torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=1e-4)
        states, n_states = model._states(batch)
    assert len(states) == 3 and n_states.tolist() == [49, 27, 38, 27]  # (n - 400) // 320 + 1
    assert float(states[-1][1, 27:].abs().max()) == 0.0  # zeros past a clip's frames


def test_front_end_frozen_train_layers_and_layer_decay(w2v_group, wavlm_layer):
    cfg, model = build(w2v_group, "model.train_layers=1", "optim.layer_decay=0.5")
    names = {id(p): n for n, p in model.encoder.named_parameters()}
    trained = {names[id(p)] for p in model.encoder_parameters()}
    assert trained and all(n.startswith("encoder.layers.1.") for n in trained), trained
    assert not any(p.requires_grad for p in model.encoder.feature_extractor.parameters())
    opt = make_optimizer(cfg, model)
    lr = cfg["optim"]["lr"]
    assert {g["name"]: g["lr"] for g in opt.param_groups} == pytest.approx(
        {"encoder.2/2": lr * cfg["optim"]["encoder_lr_scale"], "head": lr}
    )
    # WavLM here has stable layer norm: its final layer norm (registered before the layers) trains with the top
    _, stable = build(wavlm_layer, "model.train_layers=1")
    trained = {n for n, p in stable.encoder.named_parameters() if p.requires_grad}
    assert "encoder.layer_norm.weight" in trained and not any(n.startswith("encoder.layers.0.") for n in trained)
    _, every = build(w2v_group)  # train_layers 0: all but the convolutional front end
    trained = {n for n, p in every.encoder.named_parameters() if p.requires_grad}
    assert "encoder.layers.0.attention.q_proj.weight" in trained and "feature_projection.projection.weight" in trained
    assert not any(n.startswith("feature_extractor.") for n in trained)


def test_one_fold_trains_and_predict_reproduces_evaluate(w2v_group, tmp_path):
    ctx = train_and_evaluate(
        "wav2vec2_ft", make_distill_feats(tmp_path / "f"), tmp_path / "exp", f"model.encoder={w2v_group}"
    )
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((ctx["exp"] / "config.yaml").read_text())))
    assert cfg["model"]["encoder_config"]["model_type"] == "wav2vec2" and cfg["data"]["audio"] == "wave"
    out = tmp_path / "p.csv"
    res = predict([ctx["exp"], ctx["feats"] / "wav", "-o", out, "-q", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert_matches_evaluate(list(iter_rows(out)), ctx)
    # ONNX from the waveform: the padded batch (3 clips of different lengths) matches PyTorch's clips alone
    res = CliRunner().invoke(cli, ["export", str(ctx["exp"]), "-o", str(tmp_path / "m.onnx")], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    check = json.loads((tmp_path / "m.onnx.json").read_text())["check"]
    assert check["max_abs_diff"] < 1e-5 and max(c["batch"] for c in check["cases"]) == 3


def test_audio_encoder_of_a_store_model_picks_wav2vec2_ft(w2v_group):
    from sertool.models.owned import prepare_encoders

    cfg = resolve_config("cma", overrides=[f"model.input_encoders.audio={w2v_group}"])
    prepare_encoders(cfg)
    sub = cfg["model"]["input_encoders"]["audio"]
    assert sub["name"] == "wav2vec2_ft" and cfg["model"]["audio_dim"] == 32 and cfg["data"]["audio"] == "wave"


def test_bad_encoders_and_short_clips_fail_in_one_line(w2v_group, tiny_bert, tmp_path):  # noqa: F811
    feats = make_distill_feats(tmp_path / "f")
    base = [str(feats), "-m", "wav2vec2_ft", "--protocol", "kfold:2", "--epochs", "1", "-q", "--threads", "1"]
    for encoder, says in ((tiny_bert, "not a wav2vec2-family"), (tmp_path / "nowhere", "model.encoder")):
        res = CliRunner().invoke(cli, ["train", *base, "-o", str(tmp_path / "e1"), "--set", f"model.encoder={encoder}"])
        assert res.exit_code != 0 and says in res.output and "Traceback" not in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1, res.output
    import soundfile as sf

    short = sorted((feats / "wav").glob("*.wav"))[3]
    sf.write(short, np.zeros(300, np.float32), 16000)  # 300 samples: the front end needs 400
    from sertool.corpora.base import read_manifest, write_manifest

    utts = read_manifest(feats / "manifest.jsonl")
    for u in utts:
        if u.audio == str(short):
            u.duration = 300 / 16000
    write_manifest(utts, feats / "manifest.jsonl")
    res = CliRunner().invoke(cli, ["train", *base, "-o", str(tmp_path / "e2"), "--set", f"model.encoder={w2v_group}"])
    assert res.exit_code != 0 and short.stem in res.output and "shorter" in res.output, res.output
    assert "Traceback" not in res.output and len(res.output.strip().splitlines()) == 1, res.output


def test_parameter_count_on_the_wav2vec2_base_architecture():
    """The docs/models.md row: wav2vec2-base's architecture (transformers' default config) + 13 layer
    weights + the 4-class linear head on mean + std; the frozen front end's 4,200,448 not trained."""
    from transformers import Wav2Vec2Config

    from sertool.models.text_ft import _NOT_ARCHITECTURE

    config = {k: v for k, v in Wav2Vec2Config().to_dict().items() if k not in _NOT_ARCHITECTURE}
    kwargs = dict(modality="audio", encoder="base", encoder_config=config, n_classes=4, task="classification")
    kwargs.update(dropout=0.1, train_layers=0, freeze_feature_encoder=True, gradient_checkpointing=False)
    with torch.device("meta"):
        model = Wav2Vec2FT(**kwargs, pooled_norm="none")
    total = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert (total, total - trained) == (94_377_873, 4_200_448)
