"""Files from others never run code: weights only through safetensors, YAML through safe_load,
and "model" files that are really pickles are refused with a clear error."""

import pickle
import shutil
from pathlib import Path

import pytest
import soundfile as sf
from click.testing import CliRunner

import sertool
from sertool.cli import cli

from conftest import tone

DEFAULT_MODEL = Path(sertool.__file__).parent / "pretrained" / "ravdess-mfcc"


class Planted:
    """Unpickling this object would create the marker file: the proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def malicious_pickle(marker) -> bytes:
    return pickle.dumps(Planted(marker))


@pytest.fixture
def clip_dir(tmp_path):
    d = tmp_path / "clips"
    d.mkdir()
    sf.write(d / "a.wav", tone(220, 1.0), 16000)
    return d


def test_weights_that_are_a_pickle_are_refused(tmp_path, clip_dir):
    exp = tmp_path / "exp"
    shutil.copytree(DEFAULT_MODEL, exp)
    marker = tmp_path / "PWNED"
    (exp / "model.safetensors").write_bytes(malicious_pickle(marker))
    (exp / "model.pt").write_bytes(malicious_pickle(marker))  # a decoy sertool never opens
    r = CliRunner().invoke(cli, ["predict", str(exp), str(clip_dir), "-o", str(tmp_path / "p.csv"), "-q"])
    assert r.exit_code != 0
    assert "model.safetensors" in r.output
    assert not marker.exists(), "a pickle in an experiment folder was executed"


def test_normaliser_that_is_a_pickle_is_refused(tmp_path, clip_dir):
    exp = tmp_path / "exp"
    shutil.copytree(DEFAULT_MODEL, exp)
    marker = tmp_path / "PWNED"
    (exp / "norm.safetensors").write_bytes(malicious_pickle(marker))
    r = CliRunner().invoke(cli, ["predict", str(exp), str(clip_dir), "-o", str(tmp_path / "p.csv"), "-q"])
    assert r.exit_code != 0 and not marker.exists()


def test_yaml_config_with_python_tags_is_not_executed(tmp_path):
    marker = tmp_path / "PWNED"
    config = tmp_path / "evil.yaml"
    config.write_text(f'model: !!python/object/apply:os.system ["touch {marker}"]\n')
    feats = tmp_path / "feats"
    feats.mkdir()
    r = CliRunner().invoke(
        cli, ["train", str(feats), "-m", "probe", "--config", str(config), "-o", str(tmp_path / "e")]
    )
    assert r.exit_code == 1 and not marker.exists()
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith(
        f"Error: {config}: line 1, column 8: the tag '!!python/object/apply:os.system' is not allowed"
    ), r.output
    r = CliRunner().invoke(cli, ["models", "--set", f'model.d=!!python/object/apply:os.system ["touch {marker}"]'])
    assert r.exit_code == 1 and not marker.exists()
    assert (
        r.output.startswith("Error: override 'model.d=!!python/object/apply:os.system") and "is not allowed" in r.output
    )


def test_yaml_config_with_a_syntax_error_is_one_line_naming_the_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model:\n  d: [1, 2\n  gates: false\n")
    feats = tmp_path / "feats"
    feats.mkdir()
    r = CliRunner().invoke(
        cli, ["train", str(feats), "-m", "probe", "--config", str(config), "-o", str(tmp_path / "e")]
    )
    assert r.exit_code == 1 and "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    assert r.output.startswith(f"Error: {config}: line 3, column 8: expected ',' or ']'"), r.output


def test_path_traversal_ids_never_write_outside_the_output(tmp_path):
    """An id like ../../x in a hand-edited manifest is refused before any output is written."""
    feats = tmp_path / "feats"
    feats.mkdir()
    (feats / "manifest.jsonl").write_text('{"id": "../../escape", "text": "hello", "label": "sad"}\n')
    r = CliRunner().invoke(cli, ["train", str(feats), "-m", "probe", "--audio", "mfcc", "-o", str(tmp_path / "e")])
    assert r.exit_code != 0 and "not safe as a file name" in r.output
    assert not (tmp_path / "escape").exists() and not (tmp_path.parent / "escape").exists()


def test_truncated_and_missing_safetensors_give_one_clear_error(tmp_path):
    import torch
    from safetensors.torch import save_file

    from sertool.weights import WeightsError, load_tensors

    save_file({"w": torch.ones(100, 100)}, str(tmp_path / "ok.safetensors"))
    data = (tmp_path / "ok.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert torch.equal(load_tensors(tmp_path / "ok.safetensors")["w"], torch.ones(100, 100))
    with pytest.raises(WeightsError, match=r"cut.safetensors: not a readable safetensors file"):
        load_tensors(tmp_path / "cut.safetensors")
    with pytest.raises(WeightsError, match="does not exist"):
        load_tensors(tmp_path / "none.safetensors")
