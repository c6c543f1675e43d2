"""Helpers shared by the fault tests: tiny stores, HDF5 comparison, kill -9 at a seeded point."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np

from sertool.corpora.base import Utterance, write_manifest
from sertool.store import StoreWriter

ROOT = Path(__file__).resolve().parents[2]
CLASSES = ("angry", "happy", "neutral", "sad")
# attributes that legitimately differ between two runs of the same command
VOLATILE_ATTRS = {"created", "creation_time", "created_at", "versions", "seconds", "elapsed", "command", "host"}


def make_train_feats(root, n_spk=4, per=8, seed=0, da=6, dt=5, label_of=None, drop_from_text=()):
    """Manifest + audio store `fa` + text store `ft`; class c shifts the features by c (the builder of
    tests/test_train.py, without splits)."""
    from test_train import make_feats

    return make_feats(
        root,
        n_spk=n_spk,
        per=per,
        seed=seed,
        da=da,
        dt=dt,
        label_of=label_of,
        drop_from_text=drop_from_text,
        splits=False,
    )


def make_align_feats(root, n=40, words=6, rate=100.0, seed=0):
    """FEATS for `sertool align`: manifest with word timings, audio store `aud`, text store `txt`."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    aw = StoreWriter(
        root / "aud.h5",
        {"feature": "aud", "kind": "audio", "dim": 3, "frame_rate_hz": rate, "extractor": {"name": "synthetic"}},
    )
    tw = StoreWriter(
        root / "txt.h5",
        {"feature": "txt", "kind": "text", "dim": 4, "unit": "token", "extractor": {"name": "synthetic-text"}},
    )
    utts = []
    for k in range(n):
        ws = [[f"w{j}", round(0.1 + 0.3 * j, 3), round(0.35 + 0.3 * j, 3)] for j in range(words)]
        dur = 0.2 + 0.3 * words
        utts.append(
            Utterance(
                id=f"u{k:04d}",
                audio=str(root / f"u{k:04d}.wav"),
                duration=dur,
                text=" ".join(w[0] for w in ws),
                words=ws,
                label=CLASSES[k % 4],
                speaker=f"s{k % 3}",
            )
        )
        aw.add(utts[-1].id, rng.normal(size=(int(dur * rate), 3)).astype(np.float32))
        tw.add(
            utts[-1].id,
            rng.normal(size=(words, 4)).astype(np.float32),
            {"tokens": [w[0] for w in ws], "word_index": np.arange(words, dtype=np.int32)},
        )
    aw.finalize()
    tw.finalize()
    write_manifest(utts, root / "manifest.jsonl")
    return root


def h5_contents(path) -> dict:
    """Every dataset's bytes and every attribute (less the volatile ones) of an HDF5 file."""
    out = {}

    def raw(v):
        if isinstance(v, np.ndarray):
            return v.tolist() if v.dtype.kind == "O" else (v.dtype.str, v.shape, v.tobytes())
        return v

    def attrs(obj):
        return {k: raw(v) for k, v in obj.attrs.items() if k not in VOLATILE_ATTRS}

    with h5py.File(path, "r") as f:
        out["/"] = attrs(f)

        def visit(name, obj):
            if isinstance(obj, h5py.Dataset):
                out[name] = (raw(obj[()]), attrs(obj))
            else:
                out[name] = attrs(obj)

        f.visititems(visit)
    return out


def sertool_cmd(*args) -> list[str]:
    return [sys.executable, "-m", "sertool", *map(str, args)]


def env_one_thread(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def kill_when(cmd, started, *, seed, max_delay=0.3, timeout=120, env=None) -> subprocess.CompletedProcess | None:
    """Run `cmd`; once `started()` is true (it has begun writing) wait a seeded random delay and
    SIGKILL it. Returns None when it was killed, or the finished process when it ended first."""
    delay = random.Random(seed).uniform(0.0, max_delay)
    proc = subprocess.Popen(cmd, env=env or env_one_thread(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline and proc.poll() is None and not started():
            time.sleep(0.01)
        if proc.poll() is None:
            time.sleep(delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return None
        return subprocess.CompletedProcess(cmd, proc.returncode, b"", proc.stderr.read())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()


def read_only(monkeypatch, folder):
    """Make every write below `folder` fail as on a read-only file system (chmod does not stop root)."""
    import builtins
    import errno
    import pathlib

    folder = str(Path(folder).resolve())
    real_open, real_mkdir, real_makedirs = builtins.open, pathlib.Path.mkdir, os.makedirs

    def inside(p):
        return str(Path(os.fspath(p)).resolve()).startswith(folder)

    def erofs(p):
        return OSError(errno.EROFS, "Read-only file system", os.fspath(p))

    def fake_open(file, mode="r", *a, **k):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and inside(file):
            raise erofs(file)
        return real_open(file, mode, *a, **k)

    def fake_mkdir(self, *a, **k):
        if inside(self):
            raise erofs(self)
        return real_mkdir(self, *a, **k)

    def fake_makedirs(name, *a, **k):
        if inside(name):
            raise erofs(name)
        return real_makedirs(name, *a, **k)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(pathlib.Path, "mkdir", fake_mkdir)
    monkeypatch.setattr(os, "makedirs", fake_makedirs)
