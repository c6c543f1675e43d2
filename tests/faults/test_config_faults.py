"""Configs with unknown keys or wrong types, for every stage that takes them: rejected with the key
named in one line (exit 1, no traceback), before any work is done."""

import pytest
import soundfile as sf
from click.testing import CliRunner

from sertool.cli import cli

from conftest import tone
from fault_helpers import make_train_feats


def one_error_line(res):
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    errors = [ln for ln in res.output.splitlines() if ln.startswith("Error: ")]
    assert len(errors) == 1, res.output
    return errors[0]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    c = tmp_path_factory.mktemp("cc") / "c"
    c.mkdir()
    sf.write(c / "a.wav", tone(200, 0.3), 16000)
    return c


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["-f", "mfcc", "--set", "mfcc.n_mfc=20"],
            "Error: feature 'mfcc': bad parameters {'n_mfc': 20}: MFCC.__init__() got an unexpected keyword argument 'n_mfc'",  # noqa: E501
        ),
        (
            ["-f", "mfcc", "--set", "mfcc.n_mfcc=abc"],
            "Error: feature 'mfcc': bad parameters {'n_mfcc': 'abc'}: invalid literal for int() with base 10: 'abc'",
        ),
        (
            ["-f", "mfcc:bogus=1"],
            "Error: feature 'mfcc': bad parameters {'bogus': 1}: MFCC.__init__() got an unexpected keyword argument 'bogus'",  # noqa: E501
        ),
        (
            ["-f", "mfcc:n_mfcc=[1,2]"],
            "Error: feature option 'n_mfcc=[1' in 'mfcc:n_mfcc=[1,2]': '[1' is not a valid value",
        ),
        (["-f", "mfcc", "--set", "mfcc.n_mfcc={"], "Error: --set 'mfcc.n_mfcc={': '{' is not a valid value"),
        (["-f", "mfcc:n_mfcc"], "Error: feature option 'n_mfcc' in 'mfcc:n_mfcc' is not key=value"),
        (["-f", "nosuchfeature"], "Error: unknown feature 'nosuchfeature'"),
    ],
)
def test_extract_parameters(corpus, tmp_path, args, message):
    res = CliRunner().invoke(cli, ["extract", str(corpus), "-o", str(tmp_path / "f"), "-q", *args])
    assert one_error_line(res).startswith(message)
    assert not list((tmp_path / "f").glob("*.h5")) if (tmp_path / "f").exists() else True


@pytest.mark.parametrize(
    "override, message",
    [
        ("distill.kapa=0.1", "Error: unknown config key 'distill.kapa' (in override 'distill.kapa=0.1')"),
        ("distill.kappa=abc", "Error: config key 'distill.kappa': expected a number, got 'abc'"),
        ("distill.kappa=[1]", "Error: config key 'distill.kappa': expected a number, got [1]"),
    ],
)
def test_distill_config(tmp_path, override, message):
    f = make_train_feats(tmp_path / "f", n_spk=2, per=4)
    res = CliRunner().invoke(
        cli,
        [
            "distill",
            str(f),
            "-o",
            str(tmp_path / "d"),
            "--teacher-audio",
            "fa",
            "--teacher-text",
            "ft",
            "--set",
            override,
            "-q",
        ],
    )
    assert one_error_line(res) == message
    assert not list((tmp_path / "d").glob("*.safetensors")) if (tmp_path / "d").exists() else True


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.bogus=1", "Error: unknown config key 'model.bogus' (applies to no model)"),
        ("model", "Error: override 'model' is not of the form key.sub=value"),
    ],
)
def test_models_overrides(override, message):
    assert one_error_line(CliRunner().invoke(cli, ["models", "--set", override])) == message
