"""The extract stage end to end through the CLI: manifest, stores, errors, resume, nj, shards."""

import csv
import os
import signal
import subprocess
import time

import numpy as np
import soundfile as sf
from click.testing import CliRunner

from sertool.cli import cli
from sertool.corpora import read_manifest
from sertool.extract import run_extract
from sertool.store import open_store

from conftest import sertool_cmd, tone


def corpus_with_bad_files(root, n_good=8):
    root.mkdir(parents=True)
    for i in range(n_good):
        sf.write(root / f"good{i:02d}.wav", tone(150 + 20 * i, 0.4 + 0.05 * i), 16000)
    (root / "empty.wav").write_bytes(b"")
    (root / "text.wav").write_text("not audio at all " * 10)
    sf.write(root / "zero.wav", np.zeros(0, np.float32), 16000)
    nan = tone(200, 0.3)
    nan[10] = np.nan
    sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
    sf.write(root / "silent.wav", np.zeros(4000, np.float32), 16000)
    sf.write(root / "stereo96k.wav", tone(300, 0.5, sr=96000, channels=2), 96000)
    return root


def test_help_lists_every_stage():
    out = CliRunner().invoke(cli, ["--help"]).output
    for stage in ("extract", "align", "train", "distill", "evaluate", "predict", "models"):
        assert f"  {stage} " in out


def test_manifest_only(folder_corpus, tmp_path):
    result = CliRunner().invoke(cli, ["extract", str(folder_corpus), "-o", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    utts = read_manifest(tmp_path / "f")
    assert len(utts) == 6 and {u.label for u in utts} == {"happy", "sad", "angry"}
    assert all(u.duration and u.sample_rate == 16000 for u in utts)


def test_bad_files_are_listed_and_the_rest_is_extracted(tmp_path, plugin_env):
    root = corpus_with_bad_files(tmp_path / "c")
    result = CliRunner().invoke(cli, ["extract", str(root), "-o", str(tmp_path / "f"), "-f", "toy", "-q"])
    assert result.exit_code == 3, result.output
    assert "4 file(s) failed" in result.output
    with open(tmp_path / "f" / "errors.tsv") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    reasons = {os.path.basename(r["file"]): r["reason"] for r in rows}
    assert set(reasons) == {"empty.wav", "text.wav", "zero.wav", "nan.wav"}
    assert "empty file" in reasons["empty.wav"] and "not a readable audio file" in reasons["text.wav"]
    assert "zero-length" in reasons["zero.wav"] and "NaN" in reasons["nan.wav"]
    with open_store(tmp_path / "f" / "toy.h5") as s:
        assert len(s) == 10  # 8 good + silent + 96 kHz stereo
        assert s.utt_attrs("silent")["silent"] is True
        assert s["stereo96k"].shape[0] == 50  # 0.5 s at 100 Hz after resampling to 16 kHz
        assert s.utt_attrs("good00")["source_checksum"].startswith("blake2b:")
        assert s.extractor["name"] == "toy"
    # the manifest keeps every utterance, with the audio problem recorded
    utts = {u.id: u for u in read_manifest(tmp_path / "f")}
    assert "empty file" in utts["empty"].extra["audio_error"]


def test_extractor_failure_is_per_utterance(folder_corpus, tmp_path, plugin_env):
    report = run_extract(folder_corpus, tmp_path / "f", ["toy:fail_on=utt1"], progress=False, log=lambda *a: None)
    assert report.n_failed == 2 and report.computed["toy"] == 4
    assert all("toy failure" in e[3] for e in report.errors)


def test_unknown_feature_fails_before_any_work(folder_corpus, tmp_path):
    result = CliRunner().invoke(cli, ["extract", str(folder_corpus), "-o", str(tmp_path / "f"), "-f", "nosuch"])
    assert result.exit_code == 1 and "unknown feature 'nosuch'" in result.output
    assert not (tmp_path / "f" / "manifest.jsonl").exists()


def test_options_reach_the_extractor(folder_corpus, tmp_path, plugin_env):
    run_extract(
        folder_corpus,
        tmp_path / "f",
        ["toy:hop_ms=20", "toy5=toy"],
        overrides={"toy5": {"hop_ms": 5}},
        progress=False,
        log=lambda *a: None,
    )
    with open_store(tmp_path / "f", "toy") as a, open_store(tmp_path / "f", "toy5") as b:
        assert a.attrs["frame_rate_hz"] == 50.0 and b.attrs["frame_rate_hz"] == 200.0
        assert b["spk1__utt0"].shape[0] == 4 * a["spk1__utt0"].shape[0]


def test_kill_9_then_rerun_computes_only_the_missing(tmp_path, plugin_env):
    root = tmp_path / "c"
    root.mkdir()
    for i in range(30):
        sf.write(root / f"u{i:02d}.wav", tone(100 + 10 * i, 0.2), 16000)
    log = tmp_path / "computed.log"
    out = tmp_path / "f"
    cmd = sertool_cmd() + [
        "extract",
        str(root),
        "-o",
        str(out),
        "-q",
        "--flush-every",
        "4",
        "-f",
        f"toy:log={log},sleep=0.1",
    ]
    proc = subprocess.Popen(cmd, env=plugin_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while time.time() < deadline and not (log.exists() and len(log.read_text().split()) >= 13):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first = log.read_text().split()
    assert 13 <= len(first) < 30, "the run was not killed in the middle"
    assert not (out / "toy.h5").exists() and (out / "toy.h5.parts").exists()
    saved = (len(first) // 4) * 4  # utterances in the flushed parts; the rest were in memory

    # a different extractor configuration must not be mixed into the unfinished store
    other = subprocess.run(cmd[:-1] + [f"toy:log={log},sleep=0"], env=plugin_env, capture_output=True, text=True)
    assert other.returncode == 1 and "different extractor" in other.stderr

    again = subprocess.run(cmd, env=plugin_env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    second = log.read_text().split()[len(first) :]
    assert sorted(second) == sorted(set(f"u{i:02d}" for i in range(30)) - set(first[:saved]))
    assert not (out / "toy.h5.parts").exists()
    reference = run_extract(root, tmp_path / "ref", ["toy"], progress=False, log=lambda *a: None)
    with open_store(out / "toy.h5") as s, open_store(reference.stores["toy"]) as ref:
        assert sorted(s.ids) == sorted(ref.ids) and len(s) == 30
        for uid in ref.ids:
            assert s[uid].tobytes() == ref[uid].tobytes()


def test_nj_does_not_change_the_output(folder_corpus, tmp_path, plugin_env):
    run_extract(folder_corpus, tmp_path / "a", ["toy"], nj=1, progress=False, log=lambda *a: None)
    run_extract(folder_corpus, tmp_path / "b", ["toy"], nj=2, progress=False, log=lambda *a: None)
    with open_store(tmp_path / "a", "toy") as a, open_store(tmp_path / "b", "toy") as b:
        assert a.ids == b.ids
        for uid in a.ids:
            assert a[uid].tobytes() == b[uid].tobytes()


def test_three_shards_merge_to_the_unsharded_store(folder_corpus, tmp_path, plugin_env):
    run_extract(folder_corpus, tmp_path / "one", ["toy"], progress=False, log=lambda *a: None)
    for i in range(3):
        r = CliRunner().invoke(
            cli, ["extract", str(folder_corpus), "-o", str(tmp_path / "sh"), "-f", "toy", "--shard", f"{i}/3", "-q"]
        )
        assert r.exit_code == 0, r.output
    with open_store(tmp_path / "sh", "toy") as s:
        assert len(s) == 6  # readable as one store before merging
    r = CliRunner().invoke(cli, ["extract", "-o", str(tmp_path / "sh"), "--merge"])
    assert r.exit_code == 0 and "merged" in r.output
    with open_store(tmp_path / "one", "toy") as a, open_store(tmp_path / "sh", "toy") as b:
        assert len(b.paths) == 1 and a.ids == b.ids
        for uid in a.ids:
            assert a[uid].tobytes() == b[uid].tobytes()


def test_bad_shard_option(folder_corpus, tmp_path):
    r = CliRunner().invoke(cli, ["extract", str(folder_corpus), "-o", str(tmp_path / "f"), "--shard", "3/3"])
    assert r.exit_code == 2 and "need 0 <= i < N" in r.output


def test_each_builtin_extractor_is_found_in_its_own_module_first():
    """features.base._HOME names the module that registers each built-in extractor (building one
    imports that module first); a wrong entry would import the others before finding it."""
    from sertool.features import base

    base._load_modules()
    for name, module in base._HOME.items():
        if module in base._IMPORT_ERRORS:  # an optional dependency (e.g. opensmile) is not installed
            continue
        assert name in base._REGISTRY, name
        assert base._REGISTRY[name].__module__ == module, name
    builtin = {n for n, cls in base._REGISTRY.items() if cls.__module__.startswith("sertool.features.")}
    assert builtin <= set(base._HOME), builtin - set(base._HOME)
