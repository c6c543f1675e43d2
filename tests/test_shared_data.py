"""The real RAVDESS and MELD copies in ../shared (marked `shared`: CI runs them)."""

import collections

import pytest
from click.testing import CliRunner

from sertool.cli import cli
from sertool.corpora import read_manifest

from conftest import ROOT, SHARED

pytestmark = pytest.mark.shared


def test_ravdess_manifest(tmp_path):
    r = CliRunner().invoke(cli, ["extract", str(SHARED / "ravdess"), "-o", str(tmp_path / "rav")])
    assert r.exit_code == 0, r.output
    utts = read_manifest(tmp_path / "rav", check_audio_exists=True)
    assert len(utts) == 1440
    labels = collections.Counter(u.label for u in utts)
    assert len(labels) == 8 and labels["neutral"] == 96 and labels["angry"] == 192
    assert len({u.speaker for u in utts}) == 24
    assert {u.text for u in utts} == {"Kids are talking by the door.", "Dogs are sitting by the door."}
    assert all(u.sample_rate == 16000 and 2.9 < u.duration < 5.3 for u in utts)


def test_meld_text_manifest(tmp_path):
    r = CliRunner().invoke(
        cli, ["extract", str(SHARED / "meld-text"), "-o", str(tmp_path / "meld"), "--corpus", "meld"]
    )
    assert r.exit_code == 0, r.output
    utts = read_manifest(tmp_path / "meld")
    assert len(utts) == 13708 and all(u.audio is None and u.text for u in utts)
    assert collections.Counter(u.split for u in utts) == {"train": 9989, "dev": 1109, "test": 2610}
    assert len({u.label for u in utts}) == 7


def test_demo_corpus_is_the_documented_subset_of_ravdess():
    """The embedded demo data are byte-identical copies of the shared RAVDESS files."""
    demo = sorted((ROOT / "recipes" / "demo" / "data" / "audio").rglob("*.flac"))
    assert len(demo) == 240
    assert {p.parent.name for p in demo} == {"Actor_01", "Actor_02", "Actor_03", "Actor_04"}
    for p in demo[::17]:
        assert p.read_bytes() == (SHARED / "ravdess" / "audio" / p.parent.name / p.name).read_bytes()
