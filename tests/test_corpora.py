"""Corpus readers on small corpora built in the layouts of the real ones."""

import json

import h5py
import numpy as np
import pytest
import soundfile as sf

from sertool.corpora import CorpusError, Utterance, detect_corpus, read_corpus, read_manifest, write_manifest
from sertool.corpora.base import check_id, safe_id, validate
from sertool.corpora.mosei import import_csd_features
from sertool.store import open_store

from conftest import tone


def write_wav(path, seconds=0.3, freq=220.0):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, tone(freq, seconds), 16000)


# ------------------------------------------------------------------ folder
def test_folder_with_metadata(folder_corpus):
    name, utts = read_corpus(folder_corpus)
    assert name == "folder" and len(utts) == 6
    u = {x.id: x for x in utts}["spk2__utt1"]
    assert (u.label, u.text, u.speaker, u.split) == ("sad", "hello number 1", "spk2", "test")
    assert u.extra["text_source"] == "metadata"


def test_folder_tsv_sidecar_and_problems(tmp_path):
    root = tmp_path / "c"
    write_wav(root / "a" / "x.wav")
    write_wav(root / "a" / "y.flac")
    write_wav(root / "stray.wav")
    (root / "a" / "x.txt").write_text("  spoken   words \n")
    (root / "metadata.tsv").write_text(
        "path\temotion\tscore\nа/none.wav\tsad\t1\na/x.wav\thappy\t0.5\na/y.flac\tsad\tnot-a-number\n"
    )
    problems = []
    _, utts = read_corpus(root, problems=problems)
    by_id = {u.id: u for u in utts}
    assert set(by_id) == {"a__x", "a__y"}
    assert by_id["a__x"].text == "spoken words" and by_id["a__x"].extra["text_source"] == "sidecar"
    assert by_id["a__x"].score == 0.5 and by_id["a__y"].score is None
    reasons = " | ".join(r for _, r in problems)
    assert "does not exist" in reasons and "not listed in metadata.tsv" in reasons and "not a number" in reasons


def test_folder_without_metadata_is_unlabelled(tmp_path):
    for i in range(3):
        write_wav(tmp_path / "rec" / f"{i}.ogg")
    _, utts = read_corpus(tmp_path / "rec", "folder")
    assert [u.label for u in utts] == [None] * 3 and len(utts) == 3


def test_missing_metadata_column_names_the_file(tmp_path):
    write_wav(tmp_path / "x.wav")
    (tmp_path / "metadata.csv").write_text("name,label\nx.wav,sad\n")
    with pytest.raises(CorpusError, match="metadata.csv: metadata needs a 'file' column"):
        read_corpus(tmp_path)


# ------------------------------------------------------------------ RAVDESS
def test_ravdess_names(tmp_path):
    for name in ("03-01-05-02-01-01-12", "03-01-01-01-02-02-01", "03-02-03-01-01-01-01", "01-01-03-01-01-01-01"):
        write_wav(tmp_path / "Actor_x" / f"{name}.wav")
    assert detect_corpus(tmp_path) == "ravdess"
    _, utts = read_corpus(tmp_path)
    by_id = {u.id: u for u in utts}
    assert set(by_id) == {"03-01-05-02-01-01-12", "03-01-01-01-02-02-01"}  # song and video skipped
    u = by_id["03-01-05-02-01-01-12"]
    assert (u.label, u.speaker, u.text) == ("angry", "Actor_12", "Kids are talking by the door.")
    assert u.extra["gender"] == "female" and u.extra["intensity"] == "strong"
    v = by_id["03-01-01-01-02-02-01"]
    assert (v.label, v.extra["gender"], v.text) == ("neutral", "male", "Dogs are sitting by the door.")
    _, both = read_corpus(tmp_path, "ravdess", vocal="both")
    assert len(both) == 3


# ------------------------------------------------------------------ IEMOCAP
def make_iemocap(root):
    s = root / "Session1"
    (s / "dialog" / "EmoEvaluation").mkdir(parents=True)
    (s / "dialog" / "transcriptions").mkdir(parents=True)
    lines = [
        "% header",
        "[6.2901 - 8.2357]\tSes01F_impro01_F000\tneu\t[2.5000, 2.5000, 2.5000]",
        "[10.0 - 12.0]\tSes01F_impro01_M001\texc\t[4.0, 3.5, 3.0]",
        "[13.0 - 14.0]\tSes01F_impro01_F002\tfru\t[2.0, 3.0, 3.0]",
        "[15.0 - 16.0]\tSes01F_impro01_F003\txxx\t[2.0, 3.0, 3.0]",
    ]
    (s / "dialog" / "EmoEvaluation" / "Ses01F_impro01.txt").write_text("\n".join(lines) + "\n")
    (s / "dialog" / "transcriptions" / "Ses01F_impro01.txt").write_text(
        "Ses01F_impro01_F000 [006.2901-008.2357]: Excuse me.\nSes01F_impro01_M001 [010.0-012.0]: Do you have your forms?\n"  # noqa: E501
    )
    for u in ("F000", "M001", "F002", "F003"):
        write_wav(s / "sentences" / "wav" / "Ses01F_impro01" / f"Ses01F_impro01_{u}.wav")
    wd = s / "sentences" / "ForcedAlignment" / "Ses01F_impro01"
    wd.mkdir(parents=True)
    (wd / "Ses01F_impro01_F000.wdseg").write_text(
        " SFrm  EFrm    SegAScr Word\n    0    10    -1000 <s>\n   11    40    -2000 EXCUSE\n   41    60    -2000 ME(2)\n   61    70 -100 </s>\n Total score: 1\n"  # noqa: E501
    )


def test_iemocap_layout_and_label_sets(tmp_path):
    make_iemocap(tmp_path)
    assert detect_corpus(tmp_path) == "iemocap"
    _, utts = read_corpus(tmp_path)
    by_id = {u.id: u for u in utts}
    assert len(utts) == 4
    f0 = by_id["Ses01F_impro01_F000"]
    assert (f0.label, f0.text, f0.speaker, f0.session, f0.score) == (
        "neutral",
        "Excuse me.",
        "Ses01_F",
        "Session1",
        2.5,
    )
    assert f0.words == [["excuse", 0.11, 0.41], ["me", 0.41, 0.61]]
    assert by_id["Ses01F_impro01_M001"].speaker == "Ses01_M"
    _, four = read_corpus(tmp_path, "iemocap", labels="4class")
    assert {u.id: u.label for u in four} == {"Ses01F_impro01_F000": "neutral", "Ses01F_impro01_M001": "happy"}
    _, seven = read_corpus(tmp_path, "iemocap", labels="7class")
    assert sorted(u.label for u in seven) == ["excited", "frustrated", "neutral"]


# ------------------------------------------------------------------ MELD
def test_meld_text_only_and_with_audio(tmp_path):
    header = "Sr No.,Utterance,Speaker,Emotion,Sentiment,Dialogue_ID,Utterance_ID,Season,Episode,StartTime,EndTime\n"
    (tmp_path / "train_sent_emo.csv").write_text(
        header + '1,"Oh, hi!",Ross,joy,positive,0,0,1,1,"0:0:1,0","0:0:2,0"\n2,,Rachel,neutral,neutral,0,1,1,1,a,b\n'
    )
    (tmp_path / "test_sent_emo.csv").write_text(header + "1,No way.,Joey,surprise,negative,3,2,1,1,a,b\n")
    problems = []
    name, utts = read_corpus(tmp_path, problems=problems)
    assert name == "meld" and [u.id for u in utts] == ["train_dia0_utt0", "test_dia3_utt2"]
    assert utts[0].text == "Oh, hi!" and utts[0].score == 1.0 and utts[0].audio is None and utts[0].split == "train"
    assert "empty utterance text and no audio" in problems[0][1]
    write_wav(tmp_path / "train_splits" / "dia0_utt1.wav")
    _, with_audio = read_corpus(tmp_path)
    assert [u.id for u in with_audio][1] == "train_dia0_utt1" and with_audio[1].audio.endswith("dia0_utt1.wav")


# ------------------------------------------------------------------ CMU-MOSEI .csd
def write_csd(path, name, data):
    with h5py.File(path, "w") as f:
        g = f.create_group(name)
        g.create_group("metadata")
        d = g.create_group("data")
        for video, (feats, intervals) in data.items():
            v = d.create_group(video)
            v["features"] = feats
            v["intervals"] = np.asarray(intervals, dtype=np.float64)


def test_mosei_csd(tmp_path):
    write_csd(
        tmp_path / "CMU_MOSEI_Labels.csd",
        "All Labels",
        {"vidA": (np.array([[1.5, 1, 0, 0, 0, 0, 0], [-2.0, 0, 1, 0, 0, 0, 0]], np.float32), [[0.0, 2.0], [2.0, 4.0]])},
    )
    words = np.array([[b"hello"], [b"sp"], [b"world"], [b"bad"]])
    write_csd(
        tmp_path / "CMU_MOSEI_TimestampedWords.csd",
        "words",
        {"vidA": (words, [[0.1, 0.5], [0.5, 0.7], [0.7, 1.9], [2.1, 2.6]])},
    )
    covarep = np.arange(400 * 74, dtype=np.float32).reshape(400, 74)
    write_csd(
        tmp_path / "CMU_MOSEI_COVAREP.csd",
        "COVAREP",
        {"vidA": (covarep, np.stack([np.arange(400) / 100, np.arange(1, 401) / 100], axis=1))},
    )
    assert detect_corpus(tmp_path) == "mosei"
    _, utts = read_corpus(tmp_path)
    assert [u.id for u in utts] == ["vidA__0", "vidA__1"]
    assert utts[0].text == "hello world" and utts[0].score == 1.5 and utts[0].extra["emotions"]["happy"] == 1.0
    assert utts[0].words == [["hello", 0.1, 0.5], ["world", 0.7, 1.9]]
    assert utts[1].words == [["bad", pytest.approx(0.1), pytest.approx(0.6)]]
    out = import_csd_features(
        tmp_path / "CMU_MOSEI_COVAREP.csd", utts, tmp_path / "feats" / "csd_covarep.h5", name="csd_covarep"
    )
    with open_store(out) as s:
        assert s.attrs["frame_rate_hz"] == 100.0 and s["vidA__0"].shape == (200, 74)
        np.testing.assert_array_equal(s["vidA__1"], covarep[200:400])
    vectors = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)  # row 1 is the `sp` padding token
    write_csd(
        tmp_path / "CMU_MOSEI_TimestampedWordVectors.csd",
        "glove_vectors",
        {"vidA": (vectors, [[0.1, 0.5], [0.5, 0.7], [0.7, 1.9], [2.1, 2.6]])},
    )
    out = import_csd_features(
        tmp_path / "CMU_MOSEI_TimestampedWordVectors.csd",
        utts,
        tmp_path / "feats" / "csd_glove.h5",
        name="csd_glove",
        kind="text",
    )
    with open_store(out) as s:  # one row per kept word: the `sp` row is dropped
        np.testing.assert_array_equal(s["vidA__0"], vectors[[0, 2]])
        np.testing.assert_array_equal(s["vidA__1"], vectors[[3]])


# ------------------------------------------------------------------ manifest and validation
def test_manifest_roundtrip_relative_paths(folder_corpus, tmp_path):
    _, utts = read_corpus(folder_corpus)
    path = write_manifest(utts, folder_corpus / "feats" / "manifest.jsonl")
    first = json.loads(path.read_text().splitlines()[0])
    assert first["audio"].startswith("../spk1/")  # relative: the folder can move with its corpus
    back = read_manifest(path, check_audio_exists=True)
    assert [u.to_json() for u in back] == [u.to_json() for u in utts]


def test_manifest_errors_name_line_and_key(tmp_path):
    path = tmp_path / "manifest.jsonl"
    path.write_text('{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n')
    with pytest.raises(CorpusError, match="duplicate utterance id 'a'"):
        read_manifest(path)
    path.write_text('{"id": "a", "text": "x"}\nnot json\n')
    with pytest.raises(CorpusError, match=r"manifest.jsonl:2: not valid JSON"):
        read_manifest(path)
    path.write_text('{"id": "a", "text": "x", "colour": "red"}\n')
    with pytest.raises(CorpusError, match=r"unknown manifest field\(s\) \['colour'\]"):
        read_manifest(path)


@pytest.mark.parametrize("bad", ["../x", "/abs/path", "a/b", "line\nbreak", ".hidden", "", "x" * 300])
def test_unsafe_ids_are_rejected(bad):
    with pytest.raises(CorpusError, match="not safe|non-empty"):
        check_id(bad)
    check_id(safe_id(bad) if bad else "utt")  # safe_id always yields an acceptable id


def test_validate_checks_fields():
    with pytest.raises(CorpusError, match="'u1' has neither audio nor text"):
        validate([Utterance(id="u1")])
    with pytest.raises(CorpusError, match="split 'holdout' is not train, dev or test"):
        validate([Utterance(id="u1", text="x", split="holdout")])
    with pytest.raises(CorpusError, match="score nan is not a finite number"):
        validate([Utterance(id="u1", text="x", score=float("nan"))])


def test_mosei_import_through_cli(tmp_path):
    from click.testing import CliRunner

    from sertool.cli import cli

    test_mosei_csd(tmp_path)
    r = CliRunner().invoke(cli, ["extract", str(tmp_path), "-o", str(tmp_path / "out"), "--import-csd", "-q"])
    assert r.exit_code == 0, r.output
    with open_store(tmp_path / "out", "csd_covarep") as s:
        assert s.attrs["kind"] == "audio" and len(s) == 2


def test_cli_corpus_choices_are_the_registered_readers():
    """Adding a reader to READERS is all `sertool extract --corpus` needs (docs/extending.md)."""
    from sertool.cli import extract
    from sertool.corpora import READERS

    option = next(p for p in extract.params if p.name == "corpus")
    assert list(option.type.choices) == list(READERS)
