"""Shared fixtures: small synthetic corpora and the ../shared data marker."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
PLUGINS = Path(__file__).resolve().parent / "plugins"


def pytest_collection_modifyitems(config, items):
    """`shared` tests need ../shared/data; they run in CI and skip elsewhere, saying why."""
    if SHARED.is_dir():
        return
    if os.environ.get("CI") == "true" and any("shared" in item.keywords for item in items):
        # In CI the copies must be there: fail loudly rather than skip silently.
        raise pytest.UsageError(f"CI=true but {SHARED} does not exist; shared-data tests cannot run")
    skip = pytest.mark.skip(reason=f"needs the RAVDESS/MELD copies in {SHARED} (present in CI, absent here)")
    for item in items:
        if "shared" in item.keywords:
            item.add_marker(skip)


def quiet(*args, **kwargs) -> None:
    """A ``log`` callback that prints nothing (library calls in tests)."""


def tone(freq: float = 220.0, seconds: float = 1.0, sr: int = 16000, amp: float = 0.3, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    x = (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)
    return np.stack([x] * channels, axis=1) if channels > 1 else x


@pytest.fixture
def folder_corpus(tmp_path):
    """A generic-layout corpus: 6 wav files in two speakers' folders, metadata.csv with labels."""
    root = tmp_path / "corpus"
    rows = ["file,label,text,speaker,split"]
    for spk in ("spk1", "spk2"):
        for i, (label, freq) in enumerate((("happy", 300.0), ("sad", 150.0), ("angry", 400.0))):
            path = root / spk / f"utt{i}.wav"
            path.parent.mkdir(parents=True, exist_ok=True)
            sf.write(path, tone(freq, 0.5 + 0.1 * i), 16000)
            rows.append(f"{spk}/utt{i}.wav,{label},hello number {i},{spk},{'train' if spk == 'spk1' else 'test'}")
    (root / "metadata.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.fixture
def plugin_env(monkeypatch):
    """Registers the test-only `toy` extractor (tests/plugins/toy_plugin.py), also in subprocesses."""
    monkeypatch.setenv("SERTOOL_PLUGINS", "toy_plugin")
    path = str(PLUGINS)
    monkeypatch.setenv("PYTHONPATH", path + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.syspath_prepend(path)
    env = dict(os.environ)
    return env


@pytest.fixture
def one_torch_thread():
    """The machine is shared: one torch thread is faster than two contended ones.
    Test modules that train models use it with `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def sertool_cmd() -> list[str]:
    return [sys.executable, "-m", "sertool"]


def make_distill_feats(root, classes=("angry", "happy", "sad"), n=12):
    """A corpus for CMD: ``n`` short noise wavs (labels cycling through ``classes``, 4 speakers), a
    50 Hz audio teacher store ``ta`` and a token-level text teacher store ``tt`` (tokens recorded)."""
    import math

    import soundfile as sf

    from sertool.corpora.base import Utterance, write_manifest
    from sertool.store import StoreWriter

    root = Path(root)
    (root / "wav").mkdir(parents=True)
    rng = np.random.default_rng(0)
    wa = StoreWriter(
        root / "ta.h5",
        {"feature": "ta", "kind": "audio", "dim": 12, "frame_rate_hz": 50.0, "extractor": {"name": "ta"}},
    )
    wt = StoreWriter(
        root / "tt.h5", {"feature": "tt", "kind": "text", "dim": 10, "unit": "token", "extractor": {"name": "tt"}}
    )
    utts = []
    words = ["yes", "no", "maybe", "so", "good", "bad"]
    for i in range(n):
        c = i % len(classes)
        k = int(rng.integers(4000, 8000))
        path = root / "wav" / f"u{i:02d}.wav"
        sf.write(path, (0.1 * rng.normal(size=k)).astype(np.float32), 16000)
        toks = [words[int(j)] for j in rng.integers(0, 6, size=int(rng.integers(3, 6)))]
        utts.append(
            Utterance(
                id=f"u{i:02d}",
                audio=str(path),
                duration=k / 16000,
                sample_rate=16000,
                text=" ".join(toks),
                label=classes[c],
                speaker=f"s{i % 4}",
            )
        )
        wa.add(f"u{i:02d}", rng.normal(size=(int(math.ceil(k / 320)), 12)).astype(np.float32))
        wt.add(f"u{i:02d}", rng.normal(size=(len(toks), 10)).astype(np.float32), {"tokens": toks})
    wa.finalize()
    wt.finalize()
    write_manifest(utts, root / "manifest.jsonl")
    return root
