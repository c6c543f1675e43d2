"""Bad inputs a user meets at the extract stage: each gives the exact report, nothing is lost."""

import json

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

from sertool.cli import cli
from sertool.corpora import read_corpus, read_manifest
from sertool.store import open_store

from conftest import tone


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_transcript_problems(tmp_path, plugin_env):
    root = tmp_path / "c"
    root.mkdir()
    for name in ("latin", "long", "empty", "none"):
        sf.write(root / f"{name}.wav", tone(200, 0.3), 16000)
    (root / "latin.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    (root / "long.txt").write_text("word " * 20000)
    (root / "empty.txt").write_text("  \n")
    r = run("extract", root, "-o", tmp_path / "f", "-f", "toy", "-q")
    assert r.exit_code == 3  # the encoding guess is reported
    utts = {u.id: u for u in read_manifest(tmp_path / "f")}
    assert utts["latin"].text == "café crème"
    assert len(utts["long"].text.split()) == 20000 and utts["empty"].text == "" and utts["none"].text == ""
    errors = (tmp_path / "f" / "errors.tsv").read_text()
    assert "latin.txt" in errors and "not UTF-8; read as Latin-1" in errors
    with open_store(tmp_path / "f", "toy") as s:
        assert len(s) == 4  # text problems never cost the audio features


def test_metadata_path_traversal_is_refused(tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    sf.write(root / "a.wav", tone(200, 0.3), 16000)
    sf.write(tmp_path / "secret.wav", tone(200, 0.3), 16000)
    (root / "metadata.csv").write_text("file,label\na.wav,sad\n../secret.wav,happy\n/etc/passwd,sad\n")
    problems = []
    _, utts = read_corpus(root, problems=problems)
    assert [u.id for u in utts] == ["a"]
    assert sum("outside the corpus folder" in r for _, r in problems) == 2


def test_manifest_with_unsafe_ids_is_rejected(tmp_path):
    path = tmp_path / "manifest.jsonl"
    for bad in ("../escape", "/abs", "a\nb"):
        path.write_text(json.dumps({"id": bad, "text": "x"}) + "\n")
        with pytest.raises(Exception, match="not safe as a file name"):
            read_manifest(path)


def test_missing_corpus_and_bad_options(tmp_path):
    r = run("extract", tmp_path / "nope", "-o", tmp_path / "f")
    assert r.exit_code == 1 and "does not exist or is not a folder" in r.output
    r = run("extract", tmp_path, "-o", tmp_path / "f", "--set", "mfcc")
    assert r.exit_code == 1 and "expected FEATURE.PARAM=VALUE" in r.output
    r = run("extract", tmp_path, "-o", tmp_path / "f", "--corpus-opt", "labels")
    assert r.exit_code == 2 and "is not KEY=VALUE" in r.output


def test_empty_corpus_folder(tmp_path):
    (tmp_path / "c").mkdir()
    r = run("extract", tmp_path / "c", "-o", tmp_path / "f")
    assert r.exit_code == 1 and "no utterances found" in r.output


def test_output_is_a_file(tmp_path, folder_corpus):
    (tmp_path / "f").write_text("I am a file")
    r = run("extract", folder_corpus, "-o", tmp_path / "f")
    assert r.exit_code == 2 and "is a file" in r.output
    assert (tmp_path / "f").read_text() == "I am a file"  # the user's file is untouched


def test_unwritable_output_gets_one_clear_line(tmp_path, folder_corpus, monkeypatch):
    """A read-only or full disk: an OSError becomes one line naming the path, no traceback."""
    import sertool.utils as utils

    def no_space(*args, **kwargs):
        raise OSError(28, "No space left on device", str(tmp_path / "f" / "manifest.jsonl.tmp1"))

    monkeypatch.setattr(utils, "open", no_space, raising=False)
    r = run("extract", folder_corpus, "-o", tmp_path / "f")
    assert r.exit_code == 1 and "manifest.jsonl.tmp1: No space left on device" in r.output
    assert "Traceback" not in r.output


def test_corrupt_store_is_reported_not_overwritten(tmp_path, folder_corpus, plugin_env):
    out = tmp_path / "f"
    out.mkdir()
    (out / "toy.h5").write_bytes(b"garbage that is not HDF5")
    r = run("extract", folder_corpus, "-o", out, "-f", "toy", "-q")
    assert r.exit_code == 1 and "toy.h5: not a readable HDF5 file" in r.output
    assert (out / "toy.h5").read_bytes() == b"garbage that is not HDF5"
    r = run("extract", folder_corpus, "-o", out, "-f", "toy", "-q", "--overwrite")
    assert r.exit_code == 0
    with open_store(out, "toy") as s:
        assert len(s) == 6 and np.isfinite(s["spk1__utt0"]).all()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("mfcc:n_mfcc=-3", "feature 'mfcc': n_mfcc must be a positive integer, got -3"),
        ("mfcc:n_mfcc=0", "feature 'mfcc': n_mfcc must be a positive integer, got 0"),
        ("mfcc:n_mfcc=2.5", "feature 'mfcc': n_mfcc must be a positive integer, got 2.5"),
        ("mfcc:n_mels=0", "feature 'mfcc': n_mels must be a positive integer, got 0"),
        ("mfcc:n_mfcc=50", "feature 'mfcc': n_mfcc (50) must not exceed n_mels (40)"),
        ("mfcc:n_fft=-512", "feature 'mfcc': n_fft must be a positive integer, got -512"),
        ("mfcc:n_fft=128", "feature 'mfcc': window of 25.0 ms (400 samples at 16000 Hz) is longer than n_fft 128"),
        ("mfcc:win_ms=-25", "feature 'mfcc': win_ms must be a finite number > 0, got -25"),
        ("mfcc:hop_ms=0", "feature 'mfcc': hop_ms must be a finite number > 0, got 0"),
        ("mfcc:hop_ms=0.01", "feature 'mfcc': window 25.0 ms / hop 0.01 ms too short at 16000 Hz"),
        ("mfcc:fmin=-10", "feature 'mfcc': fmin must be a finite number >= 0 and <= 8000, got -10"),
        ("mfcc:fmax=9000", "feature 'mfcc': fmax must be a finite number > 0 and <= 8000, got 9000"),
        ("mfcc:fmin=4000,fmax=2000", "feature 'mfcc': fmax (2000) must be greater than fmin (4000)"),
        ("mfcc:fmin=8000", "feature 'mfcc': fmin (8000) must be below fmax (default sample_rate / 2 = 8000)"),
        ("mfcc:sample_rate=0", "feature 'mfcc': sample_rate must be a positive integer, got 0"),
        ("mfcc:power=0", "feature 'mfcc': power must be a finite number > 0, got 0"),
        ("mfcc:top_db=-5", "feature 'mfcc': top_db must be a finite number > 0, got -5"),
        ("mfcc:deltas=3", "feature 'mfcc': deltas must be 0, 1 or 2, got 3"),
        ("mfcc80:n_mfcc=-1", "feature 'mfcc': n_mfcc must be a positive integer, got -1"),
    ],
)
def test_out_of_range_extractor_parameters_are_refused_before_writing(tmp_path, spec, message):
    """Checked when the extractor is built: one line naming the feature and parameter, nothing written
    (a negative n_mfcc used to fail only after the manifest, as "store dim is -9")."""
    root = tmp_path / "c"
    root.mkdir()
    sf.write(root / "a.wav", tone(200, 0.3), 16000)
    out = tmp_path / "f"
    r = run("extract", root, "-o", out, "-f", spec, "-q")
    assert r.exit_code == 1, r.output
    assert "Traceback" not in r.output
    assert [ln for ln in r.output.splitlines() if ln.strip()] == [f"Error: {message}"]
    assert not out.exists() or not list(out.iterdir())


def test_unknown_device_is_one_line_before_any_work(tmp_path, folder_corpus):
    r = run("extract", folder_corpus, "-o", tmp_path / "f", "--device", "tpu", "-q")
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    assert r.output.strip().splitlines() == ["Error: device 'tpu': expected auto, cpu, cuda or cuda:N"]
    assert not (tmp_path / "f").exists()
