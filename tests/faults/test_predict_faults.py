"""Bad inputs a user meets at the predict stage: bad recordings get a row with an `error` and the
run goes on; a bad experiment folder is one line naming the file; nothing is read from outside it."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from click.testing import CliRunner

import sertool
from sertool.cli import cli
from sertool.predict import iter_rows

from conftest import tone
from fault_helpers import read_only

DEFAULT_MODEL = Path(sertool.__file__).parent / "pretrained" / "ravdess-mfcc"
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("pf") / "clips"
    d.mkdir()
    sf.write(d / "a_good.wav", tone(220, 0.5), 16000)
    sf.write(d / "b_good.flac", tone(330, 0.6), 16000)
    sf.write(d / "new\nline.wav", tone(220, 0.5), 16000)  # odd but legal names are quoted, not fatal
    sf.write(d / 'ü,comma "q".wav', tone(330, 0.6), 16000)
    x = tone(220, 0.5)
    x[4000] = np.nan
    sf.write(d / "c_nan.wav", x, 16000, subtype="FLOAT")
    (d / "d_empty.wav").write_bytes(b"")
    (d / "e_text.wav").write_text("I am a text file with a .wav name")
    sf.write(d / "f_zero.wav", np.zeros(0, np.float32), 16000)
    sf.write(d / "g_cut.wav", tone(220, 0.5), 16000)
    (d / "g_cut.wav").write_bytes((d / "g_cut.wav").read_bytes()[:3000])
    (d / "h_folder.wav").mkdir()  # a folder with an audio name is not a file to predict
    (d / "readme.txt").write_text("not audio, ignored")
    return d


EXPECTED_ERRORS = {
    "c_nan.wav": "contains NaN or infinite samples",
    "d_empty.wav": "empty file (0 bytes)",
    "e_text.wav": "not a readable audio file",
    "f_zero.wav": "zero-length audio (0 samples)",
    "g_cut.wav": "truncated",
}
GOOD = {"a_good.wav", "b_good.flac", "new\nline.wav", 'ü,comma "q".wav'}


def predict(*args):
    return CliRunner().invoke(cli, ["predict", *map(str, args)])


def test_bad_recordings_get_an_error_row_and_the_run_goes_on(clips, tmp_path):
    out = tmp_path / "p.csv"
    res = predict(clips, "-o", out, "-q")
    assert res.exit_code == 3, res.output  # EXIT_SOME_FAILED, as extract
    assert f"{len(EXPECTED_ERRORS)} file(s) failed (see the error column)" in res.output
    rows = {Path(r["file"]).name: r for r in iter_rows(out)}
    assert set(rows) == GOOD | set(EXPECTED_ERRORS)
    for name, reason in EXPECTED_ERRORS.items():
        assert rows[name]["error"].startswith(str(clips / name) + ": ") and reason in rows[name]["error"], rows[name]
        assert rows[name]["label"] == ""
    for name in GOOD:
        assert rows[name]["error"] == "" and rows[name]["label"]
        probs = [float(v) for k, v in rows[name].items() if k.startswith("p_")]
        assert len(probs) == 8 and sum(probs) == pytest.approx(1.0, abs=1e-4)
    # the good files get exactly what they get in a folder without the bad ones
    clean = tmp_path / "clean"
    clean.mkdir()
    for name in GOOD:
        shutil.copy(clips / name, clean / name)
    res = predict(clean, "-o", tmp_path / "c.csv", "-q")
    assert res.exit_code == 0, res.output
    for r in iter_rows(tmp_path / "c.csv"):
        assert {k: v for k, v in r.items() if k != "file"} == {
            k: v for k, v in rows[Path(r["file"]).name].items() if k != "file"
        }


@pytest.fixture
def exp(tmp_path):
    e = tmp_path / "exp"
    shutil.copytree(DEFAULT_MODEL, e)
    return e


def _edit(exp, **changes):
    spec = json.loads((exp / "predictor.json").read_text())
    spec.update(changes)
    (exp / "predictor.json").write_text(json.dumps(spec))


def refused(res):
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in res.output, res.output
    return lines[0]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"version": 99}, "predictor.json: predictor version 99 is not supported by this sertool (reads version 1)"),
        ({"format": "pickle"}, "predictor.json: not a sertool predictor file (format 'pickle')"),
        ({"classes": "abc"}, "predictor.json: 'classes' must be a list of class names, got 'abc'"),
        (
            {"model": "../outside.safetensors"},
            "predictor.json: 'model' must name a file inside the experiment folder, got '../outside.safetensors'",
        ),
        (
            {"normalizer": "/etc/hostname"},
            "predictor.json: 'normalizer' must name a file inside the experiment folder, got '/etc/hostname'",
        ),
    ],
)
def test_bad_predictor_file(exp, clips, tmp_path, changes, message):
    shutil.copy(exp / "model.safetensors", tmp_path / "outside.safetensors")  # would load, if it were looked at
    _edit(exp, **changes)
    line = refused(predict(exp, clips / "a_good.wav", "-o", tmp_path / "p.csv", "-q"))
    assert line == f"Error: {exp / message}"
    assert not (tmp_path / "p.csv").exists()


def test_bad_model_config_names_the_key(exp, clips, tmp_path):
    spec = json.loads((exp / "predictor.json").read_text())
    _edit(exp, model_config={**spec["model_config"], "bogus": 1})
    assert "unknown config key 'model.bogus'" in refused(predict(exp, clips / "a_good.wav", "-q"))
    _edit(exp, model_config={**spec["model_config"], "input_dim": "abc"})
    assert "config key 'model.input_dim': expected a number, got 'abc'" in refused(
        predict(exp, clips / "a_good.wav", "-q")
    )
    (exp / "predictor.json").write_text('{"format": "sertool-predictor", "vers')
    assert refused(predict(exp, clips / "a_good.wav", "-q")).startswith(f"Error: {exp / 'predictor.json'}: unreadable")


def test_truncated_weights(exp, clips):
    data = (exp / "model.safetensors").read_bytes()
    (exp / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = refused(predict(exp, clips / "a_good.wav", "-q"))
    assert f"{exp / 'model.safetensors'}: not a readable safetensors file" in line
    (exp / "model.safetensors").unlink()
    assert (
        refused(predict(exp, clips / "a_good.wav", "-q"))
        == f"Error: {exp / 'model.safetensors'} is missing: the experiment folder is incomplete"
    )


def test_read_only_output_folder(clips, tmp_path, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    read_only(monkeypatch, ro)
    line = refused(predict(clips / "a_good.wav", "-o", ro / "p.csv", "-q"))
    assert line.startswith(f"Error: {ro}") and line.endswith("Read-only file system")
    assert list(ro.iterdir()) == []


def test_output_is_never_clobbered(clips, tmp_path):
    out = tmp_path / "p.csv"
    out.write_text("my,own\n1,2\n")
    res = predict(clips / "a_good.wav", "-o", out, "-q")
    assert res.exit_code != 0 and "--resume" in res.output and out.read_text() == "my,own\n1,2\n"
    (tmp_path / "d").mkdir()
    res = predict(clips / "a_good.wav", "-o", tmp_path / "d", "-q")
    assert res.exit_code != 0 and "Traceback" not in res.output


@pytest.mark.parametrize(
    "device, message",
    [
        ("tpu", "Error: device 'tpu': expected auto, cpu, cuda or cuda:N"),
        ("cuda:x", "Error: device 'cuda:x': expected auto, cpu, cuda or cuda:N"),
    ],
)
def test_unknown_device_is_one_line(clips, tmp_path, device, message):
    line = refused(predict(clips / "a_good.wav", "-o", tmp_path / "p.csv", "--device", device, "-q"))
    assert line == message
    assert not (tmp_path / "p.csv").exists()


# ----------------------------------------------------------------------------------- issue 21 options
@pytest.mark.parametrize(
    "args, message",
    [
        (["--speaker-from", "folder"], "--speaker-from 'folder': use parent, csv:FILE"),
        (["--speaker-from", "regex:(unclosed"], "not a regular expression"),
        (["--speaker-from", "csv:/nonexistent/speakers.csv"], "no such file"),
        (["--model", "no-such-model"], "neither an experiment folder nor a packaged model"),
    ],
)
def test_bad_issue21_options_are_one_line(clips, tmp_path, args, message):
    res = predict(clips, "-o", tmp_path / "p.csv", *args)
    assert res.exit_code == 1 and message in res.output, res.output
    assert not (tmp_path / "p.csv").exists()  # refused before any row


def test_speaker_table_without_the_columns(clips, tmp_path):
    table = tmp_path / "t.csv"
    table.write_text("name,who\na_good.wav,x\n")
    res = predict(clips, "-o", tmp_path / "p.csv", "--speaker-from", f"csv:{table}")
    assert res.exit_code == 1 and "needs columns path and speaker" in res.output


def test_silero_without_the_package_is_one_line(clips, tmp_path, monkeypatch):
    import sertool.segment as segment

    monkeypatch.setattr(segment, "silero_available", lambda: False)
    res = predict(clips, "-o", tmp_path / "p.csv", "--vad", "silero")
    assert res.exit_code == 1 and "pip install silero-vad" in res.output


def test_a_failing_plot_keeps_the_predictions(tmp_path, monkeypatch):
    import sertool.segment as segment

    d = tmp_path / "long"
    d.mkdir()
    t = np.arange(40 * 16000) / 16000
    x = (0.3 * np.sin(2 * np.pi * 180 * t) * (np.sin(2 * np.pi * 0.2 * t) > 0)).astype(np.float32)  # 2.5 s on/off
    sf.write(d / "x.wav", x + 0.001 * np.random.default_rng(0).standard_normal(x.size).astype(np.float32), 16000)

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(segment, "plot_timeline", broken)
    out = tmp_path / "p.csv"
    res = predict(d, "-o", out, "--plot", tmp_path / "plots")
    assert res.exit_code == 0, res.output
    assert "warning: --plot" in res.output and "disk full" in res.output
    (row,) = iter_rows(out)
    assert row["label"] and int(row["n_segments"]) >= 7
