"""The embedded demo corpus: present, licensed, readable (no ../shared needed)."""

import collections

from sertool.corpora import read_corpus

from conftest import ROOT

DEMO = ROOT / "recipes" / "demo" / "data"


def test_demo_corpus_layout_and_license():
    name, utts = read_corpus(DEMO)
    assert name == "ravdess" and len(utts) == 240
    assert collections.Counter(u.extra["gender"] for u in utts) == {"male": 120, "female": 120}
    assert len({u.label for u in utts}) == 8
    assert "CC BY-NC-SA 4.0" in (DEMO / "LICENSE.md").read_text()
    assert "Livingstone" in (DEMO / "README.md").read_text()
