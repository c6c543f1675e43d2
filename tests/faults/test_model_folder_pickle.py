"""A downloaded transformers model folder whose weights are a malicious pickle (pytorch_model.bin):
loading it fails with a clear error and the pickle's code never runs (torch.load weights_only,
no trust_remote_code)."""

import pickle
from pathlib import Path

import pytest
import soundfile as sf
from click.testing import CliRunner

from sertool.cli import cli

from conftest import tone


class Planted:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_text_model_with_a_pickled_payload_is_refused(tmp_path):
    from transformers import BertConfig, BertTokenizerFast

    model = tmp_path / "evil-bert"
    BertConfig(
        vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8
    ).save_pretrained(model)
    (model / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world"]))
    BertTokenizerFast(vocab_file=str(model / "vocab.txt")).save_pretrained(model)
    marker = tmp_path / "PWNED"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Planted(marker)))
    corpus = tmp_path / "c"
    corpus.mkdir()
    sf.write(corpus / "a.wav", tone(200, 0.3), 16000)
    (corpus / "metadata.csv").write_text("file,text\na.wav,hello world\n")
    res = CliRunner().invoke(
        cli, ["extract", str(corpus), "-o", str(tmp_path / "f"), "-f", "bert", "--text-model", str(model), "-q"]
    )
    assert not marker.exists(), "the pickle in a model folder was executed"
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert f"Error: cannot load text model from {model} (UnpicklingError: Weights only load failed" in res.output
    assert not (tmp_path / "f" / "bert.h5").exists()
