"""Degraded copies (sertool.augment, extract --degrade, train data.augment) and temperature scaling."""

import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from scipy.signal import welch

from sertool import calibration as C
from sertool.augment import DegradeError, degrade, parse_degradation
from sertool.cli import cli
from sertool.store import StoreWriter, open_store
from sertool.train import load_inputs, resolve_config
from tests.conftest import tone
from tests.test_train import make_feats

SR = 16000
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def broadband(seconds=1.0, seed=0):
    return (0.1 * np.random.default_rng(seed).standard_normal(int(seconds * SR))).astype(np.float32)


def band_power(x, lo, hi):
    f, p = welch(x, SR, nperseg=1024)
    return p[(f >= lo) & (f < hi)].sum()


# ----------------------------------------------------------------------------------- the steps
def test_telephone_keeps_the_telephone_band_only():
    x = broadband()
    y = degrade(x, SR, "telephone", "u1")
    assert y.shape == x.shape and y.dtype == np.float32
    # above 4 kHz (the 8 kHz channel's Nyquist) and below 300 Hz almost nothing is left; the band passes
    assert band_power(y, 4200, 8000) < 1e-3 * band_power(x, 4200, 8000)
    assert band_power(y, 20, 150) < 0.05 * band_power(x, 20, 150)
    assert 0.5 < band_power(y, 500, 3000) / band_power(x, 500, 3000) < 1.5
    # mu-law leaves at most 256 levels at 8 kHz: the quantisation error is audible but small
    assert np.corrcoef(degrade(tone(1000.0), SR, "telephone", "u1"), tone(1000.0))[0, 1] > 0.99


@pytest.mark.parametrize("kind", ["noise", "pink"])
@pytest.mark.parametrize("snr", [0.0, 10.0, 25.0])
def test_noise_is_added_at_the_asked_snr(kind, snr):
    x = tone(440.0, 2.0)
    y = degrade(x, SR, f"{kind}:{snr}", "u1").astype(np.float64)
    noise = y - x
    measured = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean(noise**2))
    assert measured == pytest.approx(snr, abs=0.05)
    if kind == "pink":  # 1/f: more power in the lowest octaves than in the highest
        assert band_power(noise, 50, 200) > 10 * band_power(noise, 4000, 4150 * 1.0)


def test_gain_clips_and_reverb_keeps_length_and_peak():
    x = tone(300.0, 1.0, amp=0.5)
    loud = degrade(x, SR, "gain:12", "u1")
    assert np.abs(loud).max() == pytest.approx(1.0) and np.mean(np.abs(loud) >= 0.999) > 0.3
    np.testing.assert_allclose(degrade(x, SR, "gain:-20", "u1"), x * 0.1, rtol=1e-5)
    wet = degrade(x, SR, "reverb:0.6", "u1")
    assert wet.shape == x.shape and np.abs(wet).max() == pytest.approx(np.abs(x).max(), rel=1e-4)
    burst = np.zeros(SR, np.float32)
    burst[:800] = broadband(0.05)
    tail = degrade(burst, SR, "reverb:0.6", "u1")
    assert np.abs(tail[4000:]).max() > 0.01  # energy after the burst ended: a room's tail


def test_copies_are_fixed_by_the_utterance_id_and_random_picks_per_clip():
    x = broadband()
    np.testing.assert_array_equal(degrade(x, SR, "noise:5", "a"), degrade(x, SR, "noise:5", "a"))
    assert not np.allclose(degrade(x, SR, "noise:5", "a"), degrade(x, SR, "noise:5", "b"))
    spec = "random:gain:-20|gain:-40"
    picks = {round(float(np.abs(degrade(x, SR, spec, f"u{i}")).max() / np.abs(x).max()), 3) for i in range(40)}
    assert picks == {0.1, 0.01}
    assert [str(s) for s in parse_degradation("telephone + noise:10")] == ["telephone", "noise:10"]


@pytest.mark.parametrize("bad", ["foo", "noise", "telephone:3", "reverb:9", "random:noise:3", "noise:x"])
def test_bad_specs_fail_with_the_step_named(bad):
    with pytest.raises(DegradeError, match="--degrade"):
        parse_degradation(bad)


# ----------------------------------------------------------------------------------- extract --degrade
def test_extract_degrade_writes_a_store_of_the_degraded_audio(folder_corpus, tmp_path):
    run = lambda *a: CliRunner().invoke(cli, ["extract", str(folder_corpus), "-f", "mfcc", "-q", *a])  # noqa: E731
    assert run("-o", str(tmp_path / "clean")).exit_code == 0
    res = run("-o", str(tmp_path / "tel"), "--degrade", "telephone")
    assert res.exit_code == 0, res.output
    clean, tel = open_store(tmp_path / "clean" / "mfcc.h5"), open_store(tmp_path / "tel" / "mfcc.h5")
    assert tel.attrs["degradation"] == "telephone" and "degradation" not in clean.attrs
    assert sorted(tel.ids) == sorted(clean.ids)
    uid = clean.ids[0]
    assert tel[uid].shape == clean[uid].shape and not np.allclose(tel[uid], clean[uid])
    # resuming the store with another degradation is refused, never mixed
    res = run("-o", str(tmp_path / "tel"), "--degrade", "noise:10")
    assert res.exit_code != 0 and "degradation" in res.output
    res = run("-o", str(tmp_path / "x"), "--degrade", "hiss:3")
    assert res.exit_code != 0 and "unknown step 'hiss:3'" in res.output and "Traceback" not in res.output


# ----------------------------------------------------------------------------------- train data.augment
def degraded_copy(feats, out, shift=100.0, drop=()):
    """FEATS folder whose `fa` store holds every utterance's features + shift (a stand-in for a degraded copy)."""
    out.mkdir(parents=True)
    shutil.copy(feats / "manifest.jsonl", out / "manifest.jsonl")
    src = open_store(feats / "fa.h5")
    attrs = {k: src.attrs[k] for k in ("feature", "kind", "dim", "frame_rate_hz", "extractor")}
    w = StoreWriter(out / "fa.h5", {**attrs, "degradation": "noise:10"})
    for uid in src.ids:
        if uid not in drop:
            w.add(uid, src[uid] + shift)
    w.finalize()
    return out


def test_training_split_gets_the_copies_dev_and_test_stay_clean(tmp_path):
    feats = make_feats(tmp_path / "f")
    copy = degraded_copy(feats, tmp_path / "noisy", drop=("s0_u000",))
    overrides = ["data.audio=fa", "protocol.name=speaker-kfold:4", f"data.augment=[{copy}]"]
    cfg = resolve_config("probe", None, overrides)
    inputs = load_inputs(cfg, feats)
    fold = inputs.folds[0]
    train_ids = inputs.training_ids(fold.train)
    copies = [u for u in train_ids if "@aug" in u]
    assert train_ids[: len(fold.train)] == fold.train
    assert len(copies) == len(fold.train) - ("s0_u000" in fold.train)  # the copy missing from the store is left out
    src = inputs.sources["audio"]
    uid = next(u for u in fold.train if u != "s0_u000")
    np.testing.assert_allclose(src.get(f"{uid}@aug1"), src.get(uid) + 100.0)
    assert not any("@aug" in u for u in fold.dev + fold.test)
    # evaluation does not open the copies
    assert load_inputs(cfg, feats, make_protocol=False).augment_copies == 0


def test_augmented_run_trains_on_more_items_and_bad_copies_are_named(tmp_path):
    feats = make_feats(tmp_path / "f")
    copy = degraded_copy(feats, tmp_path / "noisy", shift=0.0)
    args = ["train", str(feats), "-m", "probe", "--audio", "fa", "--protocol", "speaker-kfold:4", "--fold", "fold1"]
    args += ["--epochs", "2", "--set", f"data.augment=[{copy},{copy}]", "-o", str(tmp_path / "exp")]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "data.augment: 96 degraded copies of 48 utterances in 2 store(s)" in res.output
    bad = args[:-4] + ["--set", f"data.augment=[{tmp_path / 'nowhere'}]", "-o", str(tmp_path / "exp2")]
    res = CliRunner().invoke(cli, bad)
    assert res.exit_code != 0 and "data.augment[0]" in res.output and "nowhere" in res.output
    other = tmp_path / "other"
    degraded_copy(feats, other)
    with StoreWriter(other / "fb.h5", {"feature": "fb", "kind": "audio", "dim": 3, "extractor": {"name": "fb"}}) as w:
        w.add("s0_u000", np.zeros((4, 3), np.float32))
    (other / "fa.h5").unlink()
    (other / "fb.h5").rename(other / "fa.h5")
    res = CliRunner().invoke(cli, args[:-4] + ["--set", f"data.augment=[{other}]", "-o", str(tmp_path / "exp3")])
    assert res.exit_code != 0 and "data.augment[0]" in res.output and "3-d" in res.output


# ----------------------------------------------------------------------------------- calibration
def test_temperature_is_recovered_and_ece_measures_overconfidence():
    rng = np.random.default_rng(0)
    n, k, true_t = 4000, 5, 3.0
    logits = rng.normal(size=(n, k)) * 4.0
    calibrated = np.exp(logits / true_t) / np.exp(logits / true_t).sum(1, keepdims=True)
    targets = np.array([rng.choice(k, p=p) for p in calibrated])
    over = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)  # the same model, 3x too confident
    t = C.fit_temperature(over, targets)
    assert t == pytest.approx(true_t, rel=0.1)
    assert C.expected_calibration_error(over, targets) > 0.1
    assert C.expected_calibration_error(C.scaled(over, t), targets) < 0.03
    np.testing.assert_allclose(C.scaled(over, t).sum(1), 1.0)
    assert (C.scaled(over, t).argmax(1) == over.argmax(1)).all()  # scores never move


def test_train_fits_the_temperature_on_dev_and_predictor_carries_it(tmp_path):
    feats = make_feats(tmp_path / "f")
    exp = tmp_path / "exp"
    args = ["train", str(feats), "-m", "probe", "--audio", "fa", "--protocol", "speaker-kfold:4", "--epochs", "4"]
    res = CliRunner().invoke(cli, args + ["--set", "optim.lr=0.05", "-q", "-o", str(exp)])
    assert res.exit_code == 0, res.output
    metrics = json.loads((exp / "metrics.json").read_text())
    runs = {(r["fold"], r["seed"]): r for r in metrics["runs"]}
    predictor = json.loads((exp / "predictor.json").read_text())
    sel = predictor["selection"]
    assert predictor["temperature"] == runs[sel["fold"], sel["seed"]]["calibration"]["temperature"]
    # the temperature is the one fitted on the run's dev predictions (recomputed here), not on test
    from sertool.data import Normalizer, SERDataset
    from sertool.train import build, load_experiment, load_weights, predict

    cfg, folds = load_experiment(exp)
    settings = {k: v for k, v in cfg.items() if k in ("model", "train", "data", "optim")}
    fold = next(f for f in folds if f.name == sel["fold"])
    inputs = load_inputs(resolve_config("probe", None, ["data.audio=fa"]), feats, make_protocol=False)
    target = inputs.target_of
    norm = Normalizer.load(exp / "folds" / fold.name / "norm.safetensors")
    model = build(cfg)
    load_weights(model, exp / "folds" / fold.name / f"seed{sel['seed']}" / "model.safetensors")
    ds = SERDataset(inputs.sources, fold.dev, [target[u] for u in fold.dev], norm, {}, False)
    preds, _ = predict(settings, model, ds, torch.device("cpu"))
    assert C.fit_temperature(preds, ds.targets) == pytest.approx(predictor["temperature"], rel=1e-6)
    # evaluate reports the ECE before/after per run with those temperatures
    res = CliRunner().invoke(cli, ["evaluate", str(exp), "-q"])
    assert res.exit_code == 0, res.output
    ev = json.loads((exp / "eval" / "metrics.json").read_text())
    assert ev["calibration"]["temperature"]["mean"] == pytest.approx(metrics["calibration"]["temperature"]["mean"])
    assert "## Calibration" in (exp / "eval" / "report.md").read_text()
