"""Issue 20 (items 1, 2, 4): one writer per output, changed audio recomputed, one model per
predictions file.

Two runs on one output at once: the second is refused at once, naming the first (PID and host),
and the output ends equal to that of a single run; a lock left by a run killed with -9 is taken
over; a re-run recomputes the utterances whose audio changed; ``predict --resume`` with another
model is refused."""

import json
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from test_kill_resume import TRAIN, _same_weights, make_corpus

from sertool.cli import cli
from sertool.corpora import read_manifest
from sertool.extract import run_extract
from sertool.locks import lock_file_of, read_holder
from sertool.predict import DEFAULT_MODEL_DIR as DEFAULT_MODEL
from sertool.predict import iter_rows, model_record_of
from sertool.train import run_train

from conftest import tone
from fault_helpers import env_one_thread, h5_contents, kill_when, make_train_feats, sertool_cmd

pytestmark = pytest.mark.usefixtures("one_torch_thread")
HOST = socket.gethostname()


def quiet(*a, **k):
    pass


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def start(cmd, env):
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def pause_when(condition, proc, timeout=120):
    """SIGSTOP ``proc`` once ``condition()`` holds (it has begun writing): the second run then meets
    a first one that is surely still running, however fast either is."""
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, f"ended before the test could start a second run: {proc.communicate()}"
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)
    proc.send_signal(signal.SIGSTOP)


def same_stores(a, b, names, drop_extractor=("toy",)):
    for name in names:
        got, ref = h5_contents(a / f"{name}.h5"), h5_contents(b / f"{name}.h5")
        if name in drop_extractor:  # `sleep` is part of the recorded extractor config
            got["/"].pop("extractor"), ref["/"].pop("extractor")
        assert got == ref, name


# ----------------------------------------------------------------------------- 1. locks
def test_two_extracts_into_one_folder_at_once(tmp_path, plugin_env):
    """The second run is refused at once, naming the first; the first's stores equal a single run's."""
    corpus = make_corpus(tmp_path / "c", 24)
    out = tmp_path / "f"
    env = env_one_thread(SERTOOL_PLUGINS=plugin_env["SERTOOL_PLUGINS"], PYTHONPATH=plugin_env["PYTHONPATH"])
    features = ["-f", "mfcc:n_mfcc=13", "-f", "toy:sleep=0.02"]
    cmd = sertool_cmd("extract", corpus, "-o", out, "-q", "--flush-every", "2", *features)
    first = start(cmd, env)
    pause_when(lambda: (out / "toy.h5.parts").is_dir(), first)
    t0 = time.time()
    second = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    refused_in = time.time() - t0
    first.send_signal(signal.SIGCONT)
    assert second.returncode == 1, second.stdout + second.stderr
    assert second.stderr.strip().splitlines() == [
        f"Error: another sertool extract (pid {first.pid} on {HOST}) is writing {out / 'mfcc.h5'}; "
        "wait for it or use another -o"
    ]
    assert refused_in < 30  # at once: before reading the corpus or computing anything
    stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr
    assert "computed 24" in stdout
    run_extract(corpus, tmp_path / "ref", ["mfcc:n_mfcc=13", "toy:sleep=0.02"], progress=False, log=quiet)
    same_stores(out, tmp_path / "ref", ["mfcc", "toy"], drop_extractor=())
    assert (out / "manifest.jsonl").read_text() == (tmp_path / "ref" / "manifest.jsonl").read_text()
    assert not list(out.glob(".*.lock")) and not list(out.glob("*.parts"))  # released, nothing left over
    # and once the first is done the same command runs and finds everything done
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "computed 0, already done 24" in again.stdout, again.stderr


def test_two_trains_on_one_exp_at_once(tmp_path):
    """The second train on EXP is refused (with or without --resume); EXP equals a single run's."""
    feats = make_train_feats(tmp_path / "f", per=16)
    exp = tmp_path / "exp"
    sets = sum((["--set", s] for s in TRAIN), [])
    cmd = sertool_cmd("train", feats, "-m", "probe", "-o", exp, "-q", *sets)
    first = start(cmd, env_one_thread())
    pause_when(lambda: any(exp.glob("folds/*/seed0/log.jsonl")), first)
    seconds = [start(cmd + extra, env_one_thread()) for extra in ([], ["--resume"], ["--overwrite"])]
    for second in seconds:
        _, stderr = second.communicate(timeout=300)
        assert second.returncode == 1, stderr
        assert stderr.strip().splitlines()[-1] == (
            f"Error: another sertool train (pid {first.pid} on {HOST}) is writing {exp}; wait for it or use another -o"
        ), second.args
    first.send_signal(signal.SIGCONT)
    _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    ref = tmp_path / "ref"
    run_train("probe", feats, ref, overrides=TRAIN, progress=False, log=quiet)
    _same_weights(ref, exp)
    ma, mb = json.loads((ref / "metrics.json").read_text()), json.loads((exp / "metrics.json").read_text())
    for key, value in ma["summary"].items():
        assert value["mean"] == pytest.approx(mb["summary"][key]["mean"], abs=1e-6), key
    assert not lock_file_of(exp).exists()


def test_a_lock_left_by_kill_9_is_taken_over(tmp_path, plugin_env):
    corpus = make_corpus(tmp_path / "c", 16)
    out = tmp_path / "f"
    env = env_one_thread(SERTOOL_PLUGINS=plugin_env["SERTOOL_PLUGINS"], PYTHONPATH=plugin_env["PYTHONPATH"])
    cmd = sertool_cmd("extract", corpus, "-o", out, "--flush-every", "2", "-f", "toy:sleep=0.05")
    parts = out / "toy.h5.parts"
    assert kill_when(cmd + ["-q"], lambda: parts.is_dir() and any(parts.glob("part-*.h5")), seed=3, env=env) is None
    holder = read_holder(lock_file_of(out / "toy.h5"))  # the killed run's record is still there ...
    assert holder and holder["stage"] == "extract" and holder["host"] == HOST
    again = subprocess.run(cmd + ["-q"], env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr  # ... but its lock died with it
    assert f"taking over from sertool extract (pid {holder['pid']} on {HOST})" in again.stdout
    run_extract(corpus, tmp_path / "ref", ["toy:sleep=0.05"], progress=False, log=quiet)
    same_stores(out, tmp_path / "ref", ["toy"], drop_extractor=())
    assert not lock_file_of(out / "toy.h5").exists()


def test_a_live_holder_is_named_and_released_outputs_are_free(tmp_path):
    """predict's output file is locked too; the message names the live holder (another process)."""
    clips = make_corpus(tmp_path / "clips", 2)
    out = tmp_path / "p.csv"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom sertool.locks import OutputLock\n"
            f"OutputLock({str(out)!r}, 'predict').acquire()\nprint('held', flush=True)\ntime.sleep(120)",
        ],
        env=env_one_thread(),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        r = run("predict", clips, "-o", out, "-q")
        assert r.exit_code == 1
        assert r.output.strip() == (
            f"Error: another sertool predict (pid {holder.pid} on {HOST}) is writing {out}; "
            "wait for it or use another -o"
        )
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    r = run("predict", clips, "-o", out, "-q")  # the holder is gone: its lock went with it
    assert r.exit_code == 0, r.output
    assert len(list(iter_rows(out))) == 2


# ----------------------------------------------------------------------------- 2. changed audio
def test_changed_audio_is_recomputed_on_resume(tmp_path, plugin_env):
    corpus = make_corpus(tmp_path / "c", 8)
    out = tmp_path / "f"
    computed = tmp_path / "computed.log"
    features = ["-f", "mfcc:n_mfcc=13", "-f", f"toy:log={computed}"]
    r = run("extract", corpus, "-o", out, "-q", *features)
    assert r.exit_code == 0, r.output
    computed.unlink()
    # two recordings are replaced (other sound, other length), one is touched but unchanged
    sf.write(corpus / "u02.wav", tone(500, 0.4), 16000)
    sf.write(corpus / "u05.wav", tone(90, 0.7), 16000)
    (corpus / "u06.wav").write_bytes((corpus / "u06.wav").read_bytes())
    r = run("extract", corpus, "-o", out, "-q", *features)
    assert r.exit_code == 0, r.output
    assert "mfcc: 2 utterance(s) changed since they were extracted (source checksum differs), recomputing" in r.output
    assert f"toy: {out / 'toy.h5'} (computed 2, recomputed 2 changed, already done 6, no input 0)" in r.output
    assert sorted(computed.read_text().split()) == ["u02", "u05"]
    # the stores and the manifest agree with a fresh extraction of the corpus as it is now
    ref = tmp_path / "ref"
    run_extract(corpus, ref, ["mfcc:n_mfcc=13", f"toy:log={computed}"], progress=False, log=quiet)
    same_stores(out, ref, ["mfcc", "toy"])
    assert (out / "manifest.jsonl").read_text() == (ref / "manifest.jsonl").read_text()
    durations = {u.id: u.duration for u in read_manifest(out)}
    from sertool.store import open_store

    with open_store(out, "toy") as s:
        assert s.shape("u05")[0] == int(durations["u05"] * 100)  # 10 ms frames of the new 0.7 s
    # nothing changed since: nothing recomputed
    computed.unlink()
    r = run("extract", corpus, "-o", out, "-q", *features)
    assert "computed 0, already done 8" in r.output and not computed.exists()


def test_changed_audio_after_a_killed_run(tmp_path, plugin_env):
    """A recomputed utterance written in a part before a kill is the one kept (the latest wins)."""
    corpus = make_corpus(tmp_path / "c", 12)
    out = tmp_path / "f"
    assert run("extract", corpus, "-o", out, "-q", "-f", "toy:sleep=0.05").exit_code == 0
    for i in range(12):
        sf.write(corpus / f"u{i:02d}.wav", tone(600 + 7 * i, 0.3), 16000)
    env = env_one_thread(SERTOOL_PLUGINS=plugin_env["SERTOOL_PLUGINS"], PYTHONPATH=plugin_env["PYTHONPATH"])
    cmd = sertool_cmd("extract", corpus, "-o", out, "-q", "--flush-every", "2", "-f", "toy:sleep=0.05")
    parts = out / "toy.h5.parts"
    assert kill_when(cmd, lambda: parts.is_dir() and any(parts.glob("part-*.h5")), seed=5, env=env) is None
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    run_extract(corpus, tmp_path / "ref", ["toy:sleep=0.05"], progress=False, log=quiet)
    same_stores(out, tmp_path / "ref", ["toy"], drop_extractor=())


# ----------------------------------------------------------------------------- 4. predict --resume
def test_predict_resume_with_another_model_is_refused(tmp_path):
    clips = make_corpus(tmp_path / "clips", 3)
    a, b, copy = tmp_path / "a", tmp_path / "b", tmp_path / "copy_of_a"
    for d in (a, b, copy):
        shutil.copytree(DEFAULT_MODEL, d)
    weights = load_file(str(b / "model.safetensors"))  # the same classes, other weights
    key = sorted(weights)[0]
    weights[key] = weights[key] + 0.01
    save_file(weights, str(b / "model.safetensors"))
    out = tmp_path / "p.csv"
    assert run("predict", a, clips, "-o", out, "-q").exit_code == 0
    rows = out.read_text()
    record = json.loads(model_record_of(out).read_text())
    assert record["experiment"] == str(a.resolve()) and record["weights"].startswith("blake2b:")
    r = run("predict", b, clips, "-o", out, "-q", "--resume")
    assert r.exit_code == 1
    line = r.output.strip()
    assert line.startswith(f"Error: --resume: {out} was written by the model in {a.resolve()} (weights blake2b:")
    assert f"this run's model is {b.resolve()} (weights blake2b:" in line
    assert line.endswith("use another output file or --overwrite")
    assert out.read_text() == rows
    # the same model, also from a copy of its folder, resumes; --overwrite takes the new model
    for exp in (a, copy):
        r = run("predict", exp, clips, "-o", out, "-q", "--resume")
        assert r.exit_code == 0 and out.read_text() == rows, r.output
    assert run("predict", b, clips, "-o", out, "-q", "--overwrite").exit_code == 0
    assert json.loads(model_record_of(out).read_text())["experiment"] == str(b.resolve())
    probabilities = [float(r["p_" + r["label"]]) for r in iter_rows(out)]
    assert all(np.isfinite(probabilities))


def test_changed_transcripts_are_found_too(tmp_path):
    """Text features record the transcript's checksum; a re-run finds the edited ones."""
    from sertool.corpora.base import Utterance
    from sertool.extract import changed_sources, text_checksum
    from sertool.store import StoreWriter

    class TextExtractor:
        needs_audio, needs_text = False, True

    utts = [Utterance(id=f"u{i}", audio="", text=f"words {i}") for i in range(4)]
    attrs = {"feature": "t", "kind": "text", "dim": 2, "unit": "token", "extractor": {"name": "t"}}
    w = StoreWriter(tmp_path / "t.h5", attrs)
    for u in utts[:3]:
        w.add(u.id, np.zeros((2, 2), np.float32), {"text_checksum": text_checksum(u.text)})
    w.finalize()
    utts[1].text = "other words"
    w = StoreWriter(tmp_path / "t.h5", attrs)
    assert changed_sources(utts, w, TextExtractor(), {}) == ["u1"]  # u3 is new, not changed
