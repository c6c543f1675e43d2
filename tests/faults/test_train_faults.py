"""Bad inputs a user meets at the train stage: one line naming the file or key, exit 1, nothing trained."""

import shutil

import h5py
import pytest
from click.testing import CliRunner

from sertool.cli import cli

from fault_helpers import make_train_feats, read_only

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def feats(tmp_path_factory):
    return make_train_feats(tmp_path_factory.mktemp("tf") / "f")


def train(feats, exp, *extra):
    return CliRunner().invoke(
        cli,
        [
            "train",
            str(feats),
            "-m",
            "probe",
            "-o",
            str(exp),
            "-q",
            "--threads",
            "1",
            "--epochs",
            "2",
            "--protocol",
            "speaker-kfold:2",
            *map(str, extra),
        ],
    )


def refused(res, exp):
    """The failure contract: exit 1, one `Error:` line, no traceback, no weights written."""
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    assert "Traceback" not in res.output
    assert not list(exp.glob("**/*.safetensors")) if exp.exists() else True
    return lines[0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.epochz=3", "Error: unknown config key 'train.epochz' (in override 'train.epochz=3')"),
        ("model.hiddenn=8", "Error: unknown config key 'model.hiddenn' (in override 'model.hiddenn=8')"),
        ("trian.epochs=3", "Error: unknown config key 'trian' (in override 'trian.epochs=3')"),
        ("train.epochs=abc", "Error: config key 'train.epochs': expected a number, got 'abc'"),
        ("optim.lr=[1, 2]", "Error: config key 'optim.lr': expected a number, got [1, 2]"),
        ("optim.lr={a: 1}", "Error: config key 'optim.lr': expected a number, got {'a': 1}"),
        ("train.epochs=true", "Error: config key 'train.epochs': expected a number, got True"),
        ("train", "Error: override 'train' is not of the form key.sub=value"),
    ],
)
def test_bad_override_names_the_key(feats, tmp_path, override, message):
    exp = tmp_path / "e"
    assert refused(train(feats, exp, "--audio", "fa", "--set", override), exp) == message


def test_bad_config_file_names_the_key(feats, tmp_path):
    exp = tmp_path / "e"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("train:\n  epochs: 2\n  batch_sise: 4\n")
    assert "train.batch_sise" in refused(train(feats, exp, "--audio", "fa", "--config", cfg), exp)
    cfg.write_text("optim:\n  lr: fast\n")
    assert (
        refused(train(feats, exp, "--audio", "fa", "--config", cfg), exp)
        == f"Error: {cfg}: config key 'optim.lr': expected a number, got 'fast'"
    )
    cfg.write_text("train: 3\n")
    assert "config key 'train' is a section" in refused(train(feats, exp, "--audio", "fa", "--config", cfg), exp)


def test_label_outside_a_closed_label_set(tmp_path):
    f = make_train_feats(tmp_path / "f", label_of=lambda s, i: ("angry", "happy", "neutral", "bored")[i % 4])
    exp = tmp_path / "e"
    line = refused(train(f, exp, "--audio", "fa", "--labels", "ravdess8"), exp)
    assert line == (
        "Error: utterance 's0_u003' has label 'bored', which label set 'ravdess8' "
        "(neutral, calm, happy, sad, angry, fearful, disgust, surprised) does not contain"
    )


def test_custom_label_list_records_what_it_dropped(tmp_path):
    """A class list selects classes: the others are dropped, but counted in the experiment."""
    import yaml

    f = make_train_feats(tmp_path / "f", label_of=lambda s, i: ("angry", "happy", "neutral", "bored")[i % 4])
    exp = tmp_path / "e"
    res = train(f, exp, "--audio", "fa", "--labels", "angry,happy,neutral")
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load((exp / "config.yaml").read_text())
    assert cfg["label_set"]["dropped"] == {"bored": 8} and cfg["label_set"]["classes"] == ["angry", "happy", "neutral"]


def test_store_from_another_version_and_foreign_hdf5(feats, tmp_path):
    f = tmp_path / "f"
    shutil.copytree(feats, f)
    shutil.copy(f / "fa.h5", f / "new.h5")
    with h5py.File(f / "new.h5", "a") as h:
        h.attrs["format_version"] = 99
    exp = tmp_path / "e"
    line = refused(train(f, exp, "--audio", "new"), exp)
    assert "new.h5: store format version 99 (written by sertool 0.1.0) is not supported" in line
    assert "upgrade sertool" in line
    with h5py.File(f / "other.h5", "w") as h:
        h["x"] = [1, 2, 3]
    line = refused(train(f, exp, "--audio", "other"), exp)
    assert "other.h5: not a sertool feature store (attribute 'format' is None" in line


def test_truncated_and_empty_store(feats, tmp_path):
    f = tmp_path / "f"
    shutil.copytree(feats, f)
    data = (f / "fa.h5").read_bytes()
    (f / "cut.h5").write_bytes(data[: len(data) // 2])
    (f / "zero.h5").write_bytes(b"")
    exp = tmp_path / "e"
    for name in ("cut", "zero"):
        line = refused(train(f, exp, "--audio", name), exp)
        assert f"{name}.h5: not a readable HDF5 file, it may be truncated or corrupt" in line


def test_mismatched_ids_between_stores(tmp_path):
    f = make_train_feats(tmp_path / "f", drop_from_text=("s1_u003",))
    exp = tmp_path / "e"
    res = CliRunner().invoke(
        cli,
        [
            "train",
            str(f),
            "-m",
            "self_attn",
            "-o",
            str(exp),
            "-q",
            "--audio",
            "fa",
            "--text",
            "ft",
            "--set",
            "model.modalities=[audio,text]",
        ],
    )
    line = refused(res, exp)
    assert "1 of 32 utterances are missing from the text store" in line and "s1_u003" in line


def test_broken_manifest(feats, tmp_path):
    f = tmp_path / "f"
    shutil.copytree(feats, f)
    lines = (f / "manifest.jsonl").read_text().splitlines()
    exp = tmp_path / "e"
    (f / "manifest.jsonl").write_text("\n".join(lines[:2] + ["{not json"] + lines[2:]) + "\n")
    assert refused(train(f, exp, "--audio", "fa"), exp).startswith(f"Error: {f / 'manifest.jsonl'}:3: not valid JSON")
    (f / "manifest.jsonl").write_text("\n".join(lines + [lines[0]]) + "\n")
    assert "duplicate utterance id 's0_u000' (entries 0 and 32)" in refused(train(f, exp, "--audio", "fa"), exp)
    (f / "manifest.jsonl").write_text(lines[0][:-1] + ', "colour": "red"}\n')
    assert "unknown manifest field(s) ['colour']" in refused(train(f, exp, "--audio", "fa"), exp)
    (f / "manifest.jsonl").unlink()
    assert "manifest.jsonl does not exist (run `sertool extract` first)" in refused(train(f, exp, "--audio", "fa"), exp)


def test_read_only_output_folder(feats, tmp_path, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    read_only(monkeypatch, out)
    exp = out / "e"
    line = refused(train(feats, exp, "--audio", "fa"), exp)
    assert line.startswith(f"Error: {out}") and line.endswith("Read-only file system")
    assert not exp.exists()


def test_store_of_the_wrong_modality_is_refused(feats, tmp_path):
    """A text store given as --audio (or an audio store as --text) is refused before training."""
    exp = tmp_path / "e"
    assert (
        refused(train(feats, exp, "--audio", "ft"), exp)
        == "Error: --audio ft: store 'ft' holds text (token) features, not audio frames; pass it as --text"
    )
    res = CliRunner().invoke(
        cli,
        [
            "train",
            str(feats),
            "-m",
            "self_attn",
            "-o",
            str(exp),
            "-q",
            "--audio",
            "fa",
            "--text",
            "fa",
            "--set",
            "model.modalities=[audio,text]",
        ],
    )
    assert (
        refused(res, exp)
        == "Error: --text fa: store 'fa' holds audio frames, not text (word) features; pass it as --audio"
    )
    assert not exp.exists()  # refused while the inputs are read, before the experiment folder is made


def test_store_without_a_known_kind_is_taken_as_given(feats, tmp_path):
    """Stores of other kinds (or none recorded) are not second-guessed: only audio/text/visual clash."""
    f = tmp_path / "f"
    shutil.copytree(feats, f)
    with h5py.File(f / "fa.h5", "a") as h:
        del h.attrs["kind"]
    res = train(f, tmp_path / "e", "--audio", "fa", "--epochs", "1")
    assert res.exit_code == 0, res.output
