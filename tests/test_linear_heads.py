"""Linear heads on frozen features: learned layer weights over a stacked-layer store (SUPERB) and
full-batch L-BFGS with weight decay (the logistic-regression optimum, a regularisation path)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sertool.corpora.base import Utterance, write_manifest
from sertool.data import Normalizer, SERDataset
from sertool.evaluate import run_evaluate
from sertool.models import build_model
from sertool.models.blocks import LayerWeights, statistics_pooling
from sertool.store import StoreWriter
from sertool.train import TrainError, finalize_model_config, load_inputs, resolve_config, run_train

from conftest import quiet

pytestmark = pytest.mark.usefixtures("one_torch_thread")
CLASSES = ("angry", "happy", "neutral", "sad")


def make_stacked_feats(root, layers=4, layer_dim=3, useful=2, n_spk=4, per=24, seed=0):
    """A store `st` stacking `layers` layers of `layer_dim` (layer l in columns l*D:(l+1)*D, attrs as
    the extractors' ``layer=all`` writes them) where only layer `useful` carries the class; the others
    carry an utterance-level random offset (noise a classifier can only lose by reading).  Plus the
    useful layer alone as a plain store `plain`."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ids = list(range(layers))
    stacked = StoreWriter(
        root / "st.h5",
        {
            "feature": "st",
            "kind": "audio",
            "dim": layers * layer_dim,
            "frame_rate_hz": 50,
            "layers": ids,
            "layer_dim": layer_dim,
            "combine": "stack",
            "extractor": {"name": "synthetic", "layer": "all"},
        },
    )
    plain = StoreWriter(
        root / "plain.h5",
        {"feature": "plain", "kind": "audio", "dim": layer_dim, "frame_rate_hz": 50, "extractor": {"name": "p"}},
    )
    utts = []
    for s in range(n_spk):
        for i in range(per):
            c = i % len(CLASSES)
            uid = f"s{s}_u{i:03d}"
            utts.append(
                Utterance(
                    id=uid,
                    text="hello",
                    label=CLASSES[c],
                    speaker=f"spk{s + 1}",
                    split=("train", "train", "dev", "test")[s],
                )
            )
            T = int(rng.integers(6, 15))
            parts = []
            for layer in ids:
                if layer == useful:
                    parts.append(rng.normal(size=(T, layer_dim)) * 0.5 + c)
                else:
                    parts.append(rng.normal(size=(T, layer_dim)) * 0.5 + rng.normal(size=layer_dim) * 4)
            stacked.add(uid, np.concatenate(parts, 1).astype(np.float32))
            plain.add(uid, parts[useful].astype(np.float32))
    stacked.finalize()
    plain.finalize()
    write_manifest(utts, root / "manifest.jsonl")
    return root


@pytest.fixture(scope="module")
def stacked_feats(tmp_path_factory):
    return make_stacked_feats(tmp_path_factory.mktemp("stacked") / "f")


def test_layer_weights_module():
    lw = LayerWeights(3)
    assert torch.allclose(lw.weights(), torch.full((3,), 1 / 3))  # equal at the start
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(2, 5, 6)  # 3 layers of 2
    assert torch.allclose(lw(x), (x[..., 0:2] + x[..., 2:4] + x[..., 4:6]) / 3)
    with torch.no_grad():
        lw.logits.copy_(torch.tensor([0.0, 50.0, 0.0]))
    assert torch.allclose(lw(x), x[..., 2:4], atol=1e-4)
    with pytest.raises(ValueError):
        LayerWeights(1)


def test_a_stacked_store_sets_layers_and_one_layers_width(stacked_feats):
    for store, layers, dim in (("st", 4, 3), ("plain", 1, 3)):
        cfg = resolve_config("probe", None, [f"data.audio={store}"])
        finalize_model_config(cfg, load_inputs(cfg, stacked_feats))
        assert (cfg["model"]["layers"], cfg["model"]["input_dim"]) == (layers, dim), store
    # the other models take {modality}_layers beside {modality}_dim
    cfg = resolve_config("self_attn", None, ["data.audio=st"])
    inputs = load_inputs(cfg, stacked_feats)
    finalize_model_config(cfg, inputs)
    assert (cfg["model"]["audio_layers"], cfg["model"]["audio_dim"]) == (4, 3)
    model = build_model({"model": cfg["model"]})
    assert list(model.layer_weights) == ["audio"] and model.learned_layer_weights()["audio"] == [0.25] * 4
    # a model without a layer-count key reads the stacked frames as one wide vector, as before
    del cfg["model"]["audio_layers"]
    finalize_model_config(cfg, inputs)
    assert cfg["model"]["audio_dim"] == 12


def test_a_plain_store_gives_the_same_probe():
    """layers = 1: no layer weights, the parameter count and the outputs of the probe as before."""
    torch.manual_seed(0)
    model = build_model({"name": "probe", "input_dim": 5, "layers": 1, "n_classes": 4}).eval()
    assert not list(model.layer_weights.parameters())
    assert sum(p.numel() for p in model.parameters()) == 2 * 5 * 4 + 4
    assert sorted(model.state_dict()) == ["linear.bias", "linear.weight"]
    x, mask = torch.randn(3, 7, 5), torch.ones(3, 7, dtype=torch.bool)
    mask[0, 4:] = False
    with torch.no_grad():
        expected = model.linear(statistics_pooling(x, mask))
        assert torch.equal(model({"audio": x, "audio_mask": mask}), expected)
    stacked = build_model({"name": "probe", "input_dim": 5, "layers": 3, "n_classes": 4})
    assert sum(p.numel() for p in stacked.parameters()) == 2 * 5 * 4 + 4 + 3


@pytest.mark.parametrize("layers", [1, 3])
def test_the_probe_on_frame_moments_equals_the_probe_on_frames(layers):
    """frozen_inputs (the frames' moments, computed once for full-batch L-BFGS) gives the outputs
    and the gradients of the forward pass on the frames."""
    torch.manual_seed(0)
    model = build_model({"name": "probe", "input_dim": 4, "layers": layers, "n_classes": 3}).eval()
    if layers > 1:
        with torch.no_grad():
            model.layer_weights["audio"].logits.copy_(torch.tensor([0.3, -1.0, 0.8]))
    x, mask = torch.randn(5, 9, 4 * layers) * 2 + 1, torch.ones(5, 9, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False  # one real frame: std 0
    batch = {"audio": x, "audio_mask": mask, "target": torch.tensor([0, 1, 2, 0, 1])}
    moments = model.frozen_inputs(batch)
    assert "audio" not in moments and "audio_mask" not in moments and "target" in moments
    outputs = []
    for b in (batch, moments):
        model.zero_grad()
        out = model(b)
        torch.nn.functional.cross_entropy(out, b["target"]).backward()
        outputs.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(outputs[0][0], outputs[1][0], rtol=1e-5, atol=1e-5)
    for ga, gb in zip(outputs[0][1], outputs[1][1]):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


def test_the_learned_weights_find_the_informative_layer(stacked_feats, tmp_path):
    exp = tmp_path / "exp"
    run_train(
        "probe",
        stacked_feats,
        exp,
        overrides=[
            "data.audio=st",
            "optim.name=lbfgs",
            "optim.lr=1.0",
            "optim.weight_decay=1e-3",
            "optim.max_iter=50",
            "train.epochs=4",
            "run.threads=1",
        ],
        progress=False,
        log=quiet,
    )
    saved = load_file(str(exp / "model.safetensors"))
    assert saved["layer_weights.audio.logits"].shape == (4,)
    metrics = run_evaluate(exp, log=quiet)
    lw = json.loads((exp / "eval" / "metrics.json").read_text())["layer_weights"]["audio"]
    assert lw["layers"] == [0, 1, 2, 3] and lw["runs"] == 1
    assert int(np.argmax(lw["mean"])) == 2 and lw["mean"][2] > 0.8, lw
    assert metrics["UA"]["mean"] > 0.9
    report = (exp / "eval" / "report.md").read_text()
    assert "## Learned layer weights (audio" in report and "| 2 |" in report


# ----------------------------------------------------------------------------------- L-BFGS
def test_lbfgs_reaches_the_logistic_regression_optimum(stacked_feats, tmp_path):
    """Full-batch L-BFGS with weight decay wd on the probe = scikit-learn's multinomial logistic
    regression with C = 1 / (wd n_train) on the same pooled statistics (unpenalised intercept)."""
    from sklearn.linear_model import LogisticRegression

    wd = 0.05
    exp = tmp_path / "exp"
    run_train(
        "probe",
        stacked_feats,
        exp,
        overrides=[
            "data.audio=plain",
            "optim.name=lbfgs",
            "optim.lr=1.0",
            f"optim.weight_decay={wd}",
            "optim.max_iter=500",
            "train.epochs=1",
            "run.threads=1",
        ],
        progress=False,
        log=quiet,
    )
    cfg = resolve_config("probe", None, ["data.audio=plain"])
    inputs = load_inputs(cfg, stacked_feats)
    fold = inputs.folds[0]
    norm = Normalizer.load(exp / "folds" / fold.name / "norm.safetensors")
    t = inputs.target_of

    def pooled(ids):
        ds = SERDataset(inputs.sources, ids, [t[u] for u in ids], norm, {}, False)
        batch = ds.collate(np.arange(len(ids)))
        return statistics_pooling(batch["audio"], batch["audio_mask"]).double().numpy(), batch["target"].numpy()

    x, y = pooled(fold.train)
    ref = LogisticRegression(C=1.0 / (wd * len(y)), tol=1e-10, max_iter=20000).fit(x, y)
    ours = load_file(str(exp / "folds" / fold.name / "seed0" / "model.safetensors"))
    w, b = ours["linear.weight"].double().numpy(), ours["linear.bias"].double().numpy()
    # the softmax is unchanged by a constant added to every class's bias: compare centred biases
    np.testing.assert_allclose(w, ref.coef_, atol=2e-3 * np.abs(ref.coef_).max())
    np.testing.assert_allclose(b - b.mean(), ref.intercept_ - ref.intercept_.mean(), atol=5e-3)
    xt, _ = pooled(fold.test)
    logits = xt @ w.T + b
    probs = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(probs / probs.sum(1, keepdims=True), ref.predict_proba(xt), atol=2e-3)


def test_weight_decay_path_is_selected_on_dev(stacked_feats, tmp_path):
    path = [10.0, 1.0, 0.1, 0.01]
    exp = tmp_path / "exp"
    run_train(
        "probe",
        stacked_feats,
        exp,
        overrides=[
            "data.audio=plain",
            "optim.name=lbfgs",
            "optim.lr=1.0",
            f"optim.weight_decay_path={path}",
            "train.epochs=4",
            "run.threads=1",
        ],
        progress=False,
        log=quiet,
    )
    rows = [json.loads(line) for line in (exp / "folds" / "corpus" / "seed0" / "log.jsonl").read_text().splitlines()]
    assert [r["weight_decay"] for r in rows] == path
    best = [r for r in rows if r["best"]][-1]
    metrics = json.loads((exp / "folds" / "corpus" / "seed0" / "metrics.json").read_text())
    assert metrics["best_epoch"] == best["epoch"]
    assert rows[0]["dev_UA"] < best["dev_UA"]  # wd 10 under-fits; dev picks a weaker decay


def test_weight_decay_path_needs_lbfgs(stacked_feats, tmp_path):
    with pytest.raises(TrainError, match="weight_decay_path"):
        run_train(
            "probe",
            stacked_feats,
            tmp_path / "exp",
            overrides=["data.audio=plain", "optim.weight_decay_path=[0.1,0.01]", "train.epochs=1"],
            progress=False,
            log=quiet,
        )


@pytest.mark.parametrize("store", ["plain", "st"])
def test_full_batch_on_cached_frozen_inputs_equals_batch_by_batch(stacked_feats, tmp_path, monkeypatch, store):
    """L-BFGS on the whole training split's frozen inputs, computed once per run as one batch, gives
    the weights of the closure that sums over the epoch's batches (the path before the cache)."""
    import sertool.train as T
    from sertool.train import merge_batches

    overrides = [f"data.audio={store}", "optim.name=lbfgs", "optim.lr=1.0", "optim.weight_decay=0.01"]
    overrides += ["optim.max_iter=50", "train.epochs=2", "train.batch_size=7", "run.threads=1"]
    run_train("probe", stacked_feats, tmp_path / "cached", overrides=overrides, progress=False, log=quiet)
    monkeypatch.setattr(T, "frozen_training_batch", lambda run, frozen: None)
    run_train("probe", stacked_feats, tmp_path / "batches", overrides=overrides, progress=False, log=quiet)
    a = load_file(str(next((tmp_path / "cached").glob("folds/*/seed0/model.safetensors"))))
    b = load_file(str(next((tmp_path / "batches").glob("folds/*/seed0/model.safetensors"))))
    assert a.keys() == b.keys()
    for k in a:
        if k.endswith("logits"):  # layer-weight logits: the softmax ignores a shift, compare the weights
            a[k], b[k] = a[k].softmax(-1), b[k].softmax(-1)
        # one layer: a convex problem, the same optimum; layer weights: not convex, L-BFGS paths part slightly
        torch.testing.assert_close(a[k], b[k], atol=2e-4 if store == "plain" else 5e-3, rtol=1e-3)
    losses = [
        [json.loads(line)["train_loss"] for line in next((tmp_path / d).glob("folds/*/seed0/log.jsonl")).open()]
        for d in ("cached", "batches")
    ]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    # batches whose frames differ in length cannot be one batch
    x = {"ids": ["a"], "audio": torch.zeros(1, 3, 2), "target": torch.zeros(1)}
    y = {"ids": ["b"], "audio": torch.zeros(1, 4, 2), "target": torch.ones(1)}
    assert merge_batches([x, y]) is None
    m = merge_batches([x, {**y, "audio": torch.ones(1, 3, 2)}])
    assert m["ids"] == ["a", "b"] and m["audio"].shape == (2, 3, 2) and m["target"].tolist() == [0.0, 1.0]
