"""CMD distillation from teachers fine-tuned on the task (issue 19 item 4): ``--teacher-audio EXP``
(a ``whisper_ft`` experiment) and ``--teacher-text EXP`` (a ``text_ft`` experiment), run live.

Tiny random encoders (test_whisper_ft's Whisper, test_text_ft's BERT) fine-tuned for one epoch on
one fold of test_predict_finetuned's corpus (12 noise clips with transcripts), the whole encoder
trained from the first step.  The deployed weights' layer-weight logits are then set far from equal
(so a teacher that ignored them, or read the run's weights instead, gives other states)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from test_lm import tiny_bert  # noqa: F401 - fixture
from test_predict_finetuned import text_corpus
from test_text_ft import encoder as tiny_bert_24  # noqa: F401 - fixture
from test_whisper_ft import tiny_whisper  # noqa: F401 - fixture
from whisper_synth import tiny_whisper_config

from sertool.audio import file_checksum
from sertool.cli import cli
from sertool.distill import DEFAULTS, TextFTTeacher, WhisperFTTeacher, make_student, open_teacher
from sertool.models.blocks import masked_mean
from sertool.models.cmd import load_student
from sertool.models.cmd_inputs import LogMelStem, TeacherTokenEncoder
from sertool.predict import load_predictor
from sertool.train import run_train
from sertool.weights import load_tensors

from conftest import quiet

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FOLD = "fold1"
RUN = f"folds/{FOLD}/seed0"


def fine_tune(model: str, feats, exp, encoder) -> None:
    """One fold, one epoch, every encoder layer trained from the first step; then the deployed
    model's layer-weight logits are moved far from equal (its run keeps the trained ones)."""
    from sertool.utils import save_tensors

    settings = [
        f"model.encoder={encoder}",
        "protocol.name=kfold:2",
        "train.epochs=1",
        "train.batch_size=4",
        "train.freeze_encoder_epochs=0",
        "model.train_layers=0",
        "run.threads=1",
    ]
    run_train(model, feats, exp, overrides=settings, progress=False, log=quiet, folds_only=[FOLD])
    path = exp / "model.safetensors"
    state = load_tensors(path)
    key = next(k for k in state if k.startswith("layer_weights.") and k.endswith(".logits"))
    state[key] = torch.linspace(-2.0, 1.5, state[key].numel())
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
    save_tensors(path, state, meta)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_whisper, tiny_bert_24):  # noqa: F811
    base = tmp_path_factory.mktemp("dte")
    feats = text_corpus(base / "f")
    fine_tune("whisper_ft", feats, base / "wexp", tiny_whisper)
    fine_tune("text_ft", feats, base / "texp", tiny_bert_24)
    return {"feats": feats, "wexp": base / "wexp", "texp": base / "texp", "base": base}


def clips(feats, ids=("u00", "u03")):
    """Two clips of different lengths as the distill stage reads them (z-normalised), padded."""
    from sertool.corpora.base import read_manifest
    from sertool.data import WaveSource

    utts = [u for u in read_manifest(feats / "manifest.jsonl") if u.id in ids]
    src = WaveSource(utts)
    waves = [torch.from_numpy(np.asarray(src.get(u.id))) for u in utts]
    assert len({len(w) for w in waves}) == 2
    wave = torch.zeros(len(waves), max(len(w) for w in waves))
    mask = torch.zeros(wave.shape, dtype=torch.bool)
    for i, w in enumerate(waves):
        wave[i, : len(w)], mask[i, : len(w)] = w, True
    return wave, mask


# ----------------------------------------------------------------------------- whisper_ft teacher
def test_whisper_ft_teacher_states_are_what_the_experiments_head_pools(corpus):
    t = open_teacher(corpus["wexp"], "audio", corpus["feats"], "cpu")
    assert isinstance(t, WhisperFTTeacher) and t.live and t.dim == 32 and t.frame_rate_hz == 50.0
    wave, mask = clips(corpus["feats"])
    x, m = t(wave, mask)
    n = mask.sum(1)
    assert m.sum(1).tolist() == [int(-(-int(k) // 320)) for k in n]  # one real state per 20 ms
    # the deployed model as `sertool predict` loads it: its head on the teacher's states = its output
    model = load_predictor(corpus["wexp"], "cpu").model
    with torch.no_grad():
        want = model({"audio": wave, "audio_mask": mask})
        got = model.classifier(model.pool(x, m))  # statistics pooling (+ the head's standardisation)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a clip's states do not depend on its batch
    short = int(n.argmin())
    alone, am = t(wave[short : short + 1, : int(n[short])], mask[short : short + 1, : int(n[short])])
    k = int(m[short].sum())
    assert int(am.sum()) == k
    torch.testing.assert_close(alone[0, :k], x[short, :k], atol=1e-5, rtol=1e-5)
    # provenance: which experiment, which weights
    assert t.spec["type"] == "experiment" and t.spec["model_name"] == "whisper_ft"
    assert t.spec["weights"] == "model.safetensors"
    assert t.spec["checksum"] == file_checksum(corpus["wexp"] / "model.safetensors")


def test_whisper_ft_teacher_lends_its_fine_tuned_front_end(corpus, tiny_whisper):  # noqa: F811
    from transformers import WhisperModel

    from sertool.models.whisper_ft import WAVE_RMS

    t = open_teacher(corpus["wexp"], "audio", corpus["feats"], "cpu")
    student, vocab = make_student({**DEFAULTS["student"], "modalities": ["audio"]}, {"audio": t})
    stem = student.encoders["audio"]
    assert isinstance(stem, LogMelStem) and vocab is None and stem.out_dim == 32
    assert stem.scale == WAVE_RMS and stem.spec["init"]["checksum"] == t.spec["checksum"]
    tuned = load_tensors(corpus["wexp"] / "model.safetensors")
    pretrained = WhisperModel.from_pretrained(tiny_whisper).encoder
    for conv, name in zip(stem.convs, ("conv1", "conv2")):
        torch.testing.assert_close(conv.weight, tuned[f"encoder.encoder.{name}.weight"])
        torch.testing.assert_close(conv.bias, tuned[f"encoder.encoder.{name}.bias"])
        assert not torch.allclose(conv.weight, getattr(pretrained, name).weight), "the encoder did not train"
    # the student's stem sees the level the fine-tuned convolutions were trained on
    wave, mask = clips(corpus["feats"])
    scaled = LogMelStem.from_whisper(t.model.encoder)  # scale 1: the z-normalised wave as it is
    with torch.no_grad():
        a, b = stem(wave, mask)[0], scaled(wave * WAVE_RMS, mask)[0]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_a_fold_run_teaches_with_its_own_weights(corpus):
    """EXP/folds/FOLD/seedS: the run's weights (the deployed file differs: its layer weights were moved)."""
    run = open_teacher(corpus["wexp"] / RUN, "audio", corpus["feats"], "cpu")
    deployed = open_teacher(corpus["wexp"], "audio", corpus["feats"], "cpu")
    assert run.spec["weights"] == f"{RUN}/model.safetensors"
    assert run.spec["experiment"] == deployed.spec["experiment"] == str(corpus["wexp"].resolve())
    assert run.spec["checksum"] == file_checksum(corpus["wexp"] / RUN / "model.safetensors")
    assert run.spec["checksum"] != deployed.spec["checksum"]
    tensors = load_tensors(corpus["wexp"] / RUN / "model.safetensors")
    torch.testing.assert_close(run.layer_weights(), tensors["layer_weights.audio.logits"].softmax(0))
    wave, mask = clips(corpus["feats"])
    assert not torch.allclose(run(wave, mask)[0], deployed(wave, mask)[0], atol=1e-4)


# ----------------------------------------------------------------------------- text_ft teacher
def test_text_ft_teacher_states_tokens_and_embeddings(corpus, tiny_bert_24):  # noqa: F811
    from transformers import AutoModel

    from sertool.corpora.base import read_manifest
    from sertool.data import load_tokenizer, token_ids

    t = open_teacher(corpus["texp"], "text", corpus["feats"], "cpu")
    assert isinstance(t, TextFTTeacher) and t.spec["model_name"] == "text_ft" and t.dim == 24
    assert t.spec["model"] == str(tiny_bert_24)  # the tokenizer the fine-tuned student reads
    utts = read_manifest(corpus["feats"] / "manifest.jsonl")[:3]
    tok, limit, _ = load_tokenizer(str(tiny_bert_24))
    seqs = [t.ids(u.text) for u in utts]
    assert seqs == [token_ids(tok, u.text, limit)[0].tolist() for u in utts]
    ids = torch.zeros(3, max(map(len, seqs)), dtype=torch.long)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), True
    x, m = t(ids, mask)
    assert torch.equal(m, mask) and x.shape == (3, ids.shape[1], 24)
    model = load_predictor(corpus["texp"], "cpu").model
    with torch.no_grad():
        want = model({"text": ids, "text_mask": mask})
        got = model.classifier(masked_mean(x, m))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # the student's text input encoder: the fine-tuned embedding layer (not the checkpoint's)
    student, _ = make_student({**DEFAULTS["student"], "modalities": ["text"]}, {"text": t})
    enc = student.encoders["text"]
    assert isinstance(enc, TeacherTokenEncoder) and enc.spec["init"]["model_name"] == "text_ft"
    tuned = load_tensors(corpus["texp"] / "model.safetensors")["encoder.embeddings.word_embeddings.weight"]
    torch.testing.assert_close(enc.emb.word_embeddings.weight, tuned)
    assert not torch.allclose(tuned, AutoModel.from_pretrained(tiny_bert_24).embeddings.word_embeddings.weight)


# ----------------------------------------------------------------------------- the stage
def test_distill_from_fine_tuned_teachers_then_fine_tune_the_student(corpus, tiny_bert_24, tmp_path):  # noqa: F811
    feats, dexp = corpus["feats"], tmp_path / "dexp"
    tiny = ["distill.epochs=1", "distill.budget=24000", "student.ffn_dim=32", "distill.dev_fraction=0.25"]
    res = CliRunner().invoke(
        cli,
        ["distill", str(feats), "-o", str(dexp), "-q", "--teacher-audio", str(corpus["wexp"] / RUN)]
        + ["--teacher-text", str(corpus["texp"]), "--set", "student.freeze_input_encoders=true"]
        + [a for s in tiny for a in ("--set", s)],
    )
    assert res.exit_code == 0, res.output
    rec = yaml.safe_load((dexp / "distill.yaml").read_text())
    ta, tt = rec["teachers"]["audio"], rec["teachers"]["text"]
    assert (ta["type"], ta["model_name"], ta["weights"]) == ("experiment", "whisper_ft", f"{RUN}/model.safetensors")
    assert ta["checksum"] == file_checksum(corpus["wexp"] / RUN / "model.safetensors")
    assert (tt["model_name"], tt["checksum"]) == ("text_ft", file_checksum(corpus["texp"] / "model.safetensors"))
    # the Whisper teacher's window cut the clips, and the record says so (the fine-tuning crops the same)
    window_s = 2 * tiny_whisper_config().max_source_positions * 160 / 16000
    assert rec["distill"]["max_audio_s"] == pytest.approx(window_s)
    # the saved student (input encoders frozen) holds the fine-tuned front end, and says where it came from
    student = load_student(dexp / "student.safetensors")
    assert student.spec["inputs"]["audio"]["init"]["checksum"] == ta["checksum"]
    torch.testing.assert_close(
        student.encoders["audio"].convs[0].weight,
        load_tensors(corpus["wexp"] / RUN / "model.safetensors")["encoder.encoder.conv1.weight"],
    )
    # the chain: sertool train -m cmd --init DEXP fine-tunes the student (waveform + the teacher's tokenizer)
    ft = tmp_path / "ft"
    settings = [f"model.init={dexp}", "train.epochs=1", "protocol.name=kfold:2", "train.max_batch_frames=24000"]
    out = run_train("cmd", feats, ft, overrides=settings + ["run.threads=1"], progress=False, log=quiet)
    cfg = yaml.safe_load((ft / "config.yaml").read_text())
    assert cfg["data"]["audio"] == "wave" and cfg["data"]["text"] == f"tokenizer:{tiny_bert_24}"
    assert all(0 <= r["test"]["UA"] <= 1 for r in out["runs"])


def test_experiments_that_cannot_teach_fail_in_one_line(corpus, tmp_path):
    feats = corpus["feats"]
    probe = tmp_path / "probe"
    run_train(
        "probe",
        feats,
        probe,
        overrides=["data.audio=ta", "protocol.name=kfold:2", "train.epochs=1", "run.threads=1"],
        progress=False,
        log=quiet,
        folds_only=[FOLD],
    )
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(corpus["wexp"] / "config.yaml", unfinished / "config.yaml")
    dexp = tmp_path / "d"
    dexp.mkdir()
    (dexp / "distill.yaml").write_text("student: {}\n")
    cases = [
        ("audio", probe, "'probe' experiment"),
        ("audio", unfinished, "model.safetensors is missing"),
        ("text", corpus["wexp"], "'whisper_ft' experiment"),
        ("audio", dexp, "student cannot teach"),
    ]
    for modality, spec, message in cases:
        args = ["distill", str(feats), "-o", str(tmp_path / "out"), "-q", "--set", f"student.modalities=[{modality}]"]
        res = CliRunner().invoke(cli, args + [f"--teacher-{modality}", str(spec)])
        assert res.exit_code != 0 and message in res.output, res.output
        lines = [line for line in res.output.splitlines() if line.strip()]
        assert len(lines) == 1 and "Traceback" not in res.output, res.output
        if "probe" in message:
            assert "whisper_ft" in lines[0] and "text_ft" in lines[0]
