"""text_ft: a trainable BERT-family encoder through the one train loop (issue 19, text side).

A tiny random BERT (3 layers, hidden 24; test_lm.py's ``tiny_bert``, its tokenizer limited to 24
tokens) on 16 short transcripts, two of them too long: trained end to end its encoder moves, with
train_layers=1 only the top layer moves, a frozen first epoch leaves the encoder as loaded,
evaluate rebuilds the model from config.yaml + model.safetensors with the checkpoint gone, an
utterance's output does not depend on its batch's padding, a bad encoder is a one-line error, and
the truncated texts are counted."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from test_lm import SENTENCES, WORDS, tiny_bert, tiny_roberta  # noqa: F401 - fixtures

from sertool.cli import cli
from sertool.train import resolve_config, run_train

from conftest import quiet

pytestmark = pytest.mark.usefixtures("one_torch_thread")
MAX_TOKENS = 24  # the tokenizer's limit here (the tiny BERT has 64 positions)
LONG = ("u03", "u10")  # transcripts of 30 words: truncated


@pytest.fixture(scope="module")
def encoder(tiny_bert, tmp_path_factory):  # noqa: F811
    """test_lm's tiny BERT with its tokenizer limited to MAX_TOKENS and its weights moved off the ones
    that seed 0 draws (a run seeded 0 builds its untrained encoder from the same seed)."""
    from transformers import AutoModel, AutoTokenizer

    d = tmp_path_factory.mktemp("tiny-bert-24") / "bert"
    shutil.copytree(tiny_bert, d)
    AutoTokenizer.from_pretrained(d, model_max_length=MAX_TOKENS).save_pretrained(d)
    model = AutoModel.from_pretrained(d)
    noise = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=noise))
    model.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    """16 text-only utterances, 3 classes, each class with its own favourite words."""
    from sertool.corpora.base import Utterance, write_manifest

    root = tmp_path_factory.mktemp("tft") / "f"
    rng = np.random.default_rng(0)
    words = [w for w in dict.fromkeys(WORDS) if w.isalpha()]
    classes = ("angry", "happy", "sad")
    utts = []
    for i in range(16):
        c = i % 3
        n = 30 if f"u{i:02d}" in LONG else int(rng.integers(3, 9))
        mine = words[c * 5 : c * 5 + 5]
        text = " ".join(mine[int(j)] if rng.random() < 0.7 else words[int(j)] for j in rng.integers(0, 5, size=n))
        utts.append(Utterance(id=f"u{i:02d}", text=text, label=classes[c], speaker=f"s{i % 4}"))
    write_manifest(utts, root / "manifest.jsonl")
    return root


def settings(encoder, epochs=2, *extra):
    return [f"model.encoder={encoder}", "protocol.name=kfold:2", f"train.epochs={epochs}", "run.threads=1", *extra]


def checkpoint_state(encoder) -> dict[str, torch.Tensor]:
    """The checkpoint's encoder weights under the model's names (``encoder.``; no pooler)."""
    state = load_file(str(Path(encoder) / "model.safetensors"))
    return {f"encoder.{k}": v for k, v in state.items() if not k.startswith("pooler.")}


def test_train_moves_the_encoder_and_evaluate_rebuilds_it_without_the_checkpoint(tmp_path, encoder, feats):
    enc = tmp_path / "bert"
    shutil.copytree(encoder, enc)
    exp = tmp_path / "exp"
    warned: list[str] = []
    out = run_train("text_ft", feats, exp, overrides=settings(enc), progress=False, log=quiet, warn=warned.append)
    assert len(out["runs"]) == 2 and all(np.isfinite(r["test"]["UA"]) for r in out["runs"])
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    assert cfg["data"]["text"] == f"tokenizer:{enc}"
    assert cfg["model"]["encoder_config"]["num_hidden_layers"] == 3
    assert cfg["model"]["encoder_config"]["hidden_size"] == 24
    state = load_file(str(exp / "folds" / "fold1" / "seed0" / "model.safetensors"))
    start = checkpoint_state(enc)
    assert start.keys() <= state.keys() and state["layer_weights.text.logits"].shape == (4,)
    moved = [k for k in start if not torch.equal(state[k], start[k])]
    assert max(float((state[k] - start[k]).abs().max()) for k in start) < 0.01  # fine-tuned from the checkpoint
    assert any(k.startswith("encoder.embeddings.") for k in moved)
    assert any(k.startswith("encoder.encoder.layer.0.") for k in moved)
    # the architecture comes from config.yaml, the weights from model.safetensors: no checkpoint needed
    (enc / "model.safetensors").unlink()
    (enc / "config.json").unlink()
    res = CliRunner().invoke(cli, ["evaluate", str(exp), "-q"])
    assert res.exit_code == 0, res.output
    ev = json.loads((exp / "eval" / "metrics.json").read_text())
    for run in out["runs"]:
        got = next(r for r in ev["runs"] if r["fold"] == run["fold"] and r["seed"] == run["seed"])
        for k in ("WA", "UA"):
            assert got[k] == pytest.approx(run["test"][k], abs=1e-9), (run["fold"], k)


def test_train_layers_1_keeps_the_embeddings_and_lower_layers_bit_identical(tmp_path, encoder, feats):
    exp = tmp_path / "exp"
    sets = settings(encoder, 2, "model.train_layers=1")
    run_train("text_ft", feats, exp, overrides=sets, progress=False, log=quiet, folds_only=["fold1"])
    state = load_file(str(exp / "folds" / "fold1" / "seed0" / "model.safetensors"))
    start = checkpoint_state(encoder)
    moved = {k for k in start if not torch.equal(state[k], start[k])}
    assert moved and all(k.startswith("encoder.encoder.layer.2.") for k in moved), sorted(moved)
    assert not any(
        k.startswith(("encoder.embeddings.", "encoder.encoder.layer.0.", "encoder.encoder.layer.1.")) for k in moved
    )


def test_frozen_first_epoch_leaves_the_encoder_as_loaded_then_trains_it(tmp_path, encoder, feats):
    """The loop's own functions: after epoch 0 the encoder is the checkpoint's (the head moved), after
    epoch 1 it moved too; each optimiser group ran at the schedule's lr x its scale."""
    from sertool.data import Normalizer
    from sertool.train import finalize_model_config, load_inputs, select_and_checkpoint, setup_run, train_epoch

    sets = [*settings(encoder, 2), "train.freeze_encoder_epochs=1", "schedule.name=none", "train.batch_size=4"]
    cfg = resolve_config("text_ft", overrides=[*sets, f"data.feats={feats}"])
    inputs = load_inputs(cfg, feats)
    finalize_model_config(cfg, inputs)
    fold = inputs.folds[0]
    norm = Normalizer.fit(inputs.sources, fold.train, cfg["data"]["normalize"])
    run = setup_run(
        cfg, inputs, fold, 0, tmp_path / "run", norm, torch.device("cpu"), resume=False, log=quiet, fixed_epochs=None
    )
    start = checkpoint_state(encoder)
    head = run.model.classifier.weight.detach().clone()

    def encoder_changed() -> list[str]:
        now = run.model.state_dict()
        return [k for k in start if not torch.equal(now[k], start[k])]

    assert encoder_changed() == []  # load_pretrained gave the checkpoint's weights
    for epoch in range(2):
        loss, seconds = train_epoch(run, progress=False, kill_step=None)
        assert np.isfinite(loss)
        select_and_checkpoint(run, loss, seconds, progress=False, log=quiet)
        if epoch == 0:
            assert encoder_changed() == [] and not torch.equal(run.model.classifier.weight, head)
        else:
            assert encoder_changed(), "the encoder did not train after its frozen epoch"
    groups = {g["name"]: g["lr"] for g in run.optimizer.param_groups}
    assert groups == {"encoder": pytest.approx(1e-3 * 0.03), "head": pytest.approx(1e-3)}


@pytest.mark.parametrize("family,pooling", [("bert", "mean"), ("bert", "cls"), ("roberta", "mean")])
def test_output_does_not_depend_on_batch_padding(request, family, pooling):
    """Two transcripts padded with zeros as the data pipeline pads them (for RoBERTa 0 is <s>, not its
    padding id): the shorter one's output is the one it gets alone, unpadded."""
    from transformers import AutoTokenizer

    from sertool.models import build_model

    path = request.getfixturevalue("encoder" if family == "bert" else "tiny_roberta")
    cfg = resolve_config("text_ft", overrides=[f"model.encoder={path}", f"model.pooling={pooling}"])
    torch.manual_seed(0)
    model = build_model({"model": {**cfg["model"], "n_classes": 3}})
    model.load_pretrained()
    model.eval()
    tok = AutoTokenizer.from_pretrained(path)
    short, long = (tok(t)["input_ids"] for t in (SENTENCES[0], SENTENCES[1]))
    assert len(short) < len(long)
    ids = torch.zeros(2, len(long), dtype=torch.long)
    ids[0, : len(short)], ids[1] = torch.tensor(short), torch.tensor(long)
    mask = torch.arange(len(long))[None, :] < torch.tensor([len(short), len(long)])[:, None]
    with torch.no_grad():
        both = model({"text": ids, "text_mask": mask})
        alone = model({"text": ids[:1, : len(short)], "text_mask": mask[:1, : len(short)]})
        unmasked = model({"text": ids[:1], "text_mask": None})
    torch.testing.assert_close(both[0], alone[0], atol=1e-5, rtol=0)
    assert not torch.allclose(unmasked[0], alone[0], atol=1e-3)  # unmasked padding would change it: a real check
    if family == "roberta":  # train_layers finds RoBERTa's layer stack too
        top = build_model({"model": {**cfg["model"], "n_classes": 3, "train_layers": 1}})
        trained = [n for n, p in top.encoder.named_parameters() if p.requires_grad]
        assert trained and all(n.startswith("encoder.layer.1.") for n in trained)


def test_bad_encoder_or_text_input_is_one_clean_line(tmp_path, feats, encoder, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    runner = CliRunner()
    base = ["train", str(feats), "-m", "text_ft", "-o", str(tmp_path / "exp"), "-q"]
    (tmp_path / "empty").mkdir()
    for name in (str(tmp_path / "no-such-model"), "nobody/no-such-model", str(tmp_path / "empty")):
        res = runner.invoke(cli, [*base, "--set", f"model.encoder={name}"])
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert "model.encoder" in res.output and name in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(cli, [*base, "--set", f"model.encoder={encoder}", "--text", "bert"])
    assert res.exit_code == 1 and "data.text" in res.output and "Traceback" not in res.output, res.output
    assert not (tmp_path / "exp" / "config.yaml").exists()


def test_truncated_texts_are_counted_and_said_once(tmp_path, encoder, feats):
    from sertool.corpora.base import read_manifest
    from sertool.data import TokenSource

    src = TokenSource(f"tokenizer:{encoder}", read_manifest(feats / "manifest.jsonl"), feats)
    assert sorted(src.truncated) == list(LONG) and src.limit == MAX_TOKENS
    for uid in src.ids:
        ids = src.get(uid)
        assert ids[0] == 2 and ids[-1] == 3  # [CLS] ... [SEP], kept by the truncation
        assert (len(ids) == MAX_TOKENS) == (uid in LONG)
    assert src.warnings == [
        f"warning: 2 text(s) longer than {MAX_TOKENS} tokens truncated to their first 24 (e.g. u03)"
    ]
    res = CliRunner().invoke(
        cli,
        ["train", str(feats), "-m", "text_ft", "-o", str(tmp_path / "exp"), "-q", "--fold", "fold1"]
        + sum((["--set", s] for s in settings(encoder, 1)), []),
    )
    assert res.exit_code == 0, res.output
    assert res.stderr.count("2 text(s) longer than 24 tokens truncated") == 1


def test_layer_decay_orders_embeddings_layers_and_head(encoder):
    """optim.layer_decay on a BERT-family encoder: the embeddings train slowest, each layer faster
    than the one below it, the head at the full rate."""
    from sertool.models.text_ft import TextFT
    from sertool.train import make_optimizer

    cfg = resolve_config("text_ft", overrides=[f"model.encoder={encoder}", "optim.layer_decay=0.8"])
    cfg["model"]["n_classes"] = 3
    model = TextFT(**{k: v for k, v in cfg["model"].items() if k != "name"})
    opt = make_optimizer(cfg, model)
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    layers = model.encoder_layers()
    n, base = len(layers), cfg["optim"]["lr"] * cfg["optim"]["encoder_lr_scale"]
    assert n >= 2
    emb = next(p for name, p in model.encoder.named_parameters() if name.startswith("embeddings."))
    assert lr_of[id(emb)] == pytest.approx(base * 0.8**n)
    for i, layer in enumerate(layers):
        assert [lr_of[id(p)] for p in layer.parameters()] == pytest.approx(
            [base * 0.8 ** (n - i - 1)] * len(list(layer.parameters()))
        )
    assert lr_of[id(model.classifier.weight)] == pytest.approx(cfg["optim"]["lr"])
