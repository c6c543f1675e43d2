"""Issue 20 (items 3, 5, 7, 8, 9): any file name, honest summaries, no silent omissions."""

import unicodedata

import soundfile as sf
from click.testing import CliRunner

from sertool.cli import cli
from sertool.corpora import read_corpus, read_manifest
from sertool.corpora.base import check_id, safe_id
from sertool.store import open_store

from conftest import tone


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ----------------------------------------------------------------------------- 3. Unicode names
NAMES = ("привет", "пока", "καλημέρα", "γεια", "你好", "世界", "café", "cafe", "日本 語", "a b", "a_b")


def test_unicode_file_names_get_unique_stable_safe_ids(tmp_path, plugin_env):
    root = tmp_path / "c"
    (root / "дом").mkdir(parents=True)
    for name in NAMES:
        sf.write(root / f"{name}.wav", tone(200, 0.2), 16000)
        sf.write(root / "дом" / f"{name}.wav", tone(300, 0.2), 16000)
    problems = []
    _, utts = read_corpus(root, problems=problems)
    assert len(utts) == 2 * len(NAMES) and not problems  # no file dropped, none reported
    ids = [u.id for u in utts]
    assert len(set(ids)) == len(ids)
    for uid in ids:
        check_id(uid)
    by_file = {u.audio: u.id for u in utts}
    assert by_file[str((root / "café.wav").resolve())].startswith("cafe-")  # readable where it can be
    assert by_file[str((root / "cafe.wav").resolve())] == "cafe"  # ASCII names keep their old ids
    # stable: a second read, and the NFD spelling of a name (macOS), give the same ids
    assert [u.id for u in read_corpus(root)[1]] == ids
    assert safe_id(unicodedata.normalize("NFD", "дом/café")) == safe_id("дом/café")
    # end to end: every file extracted, none in errors.tsv
    r = run("extract", root, "-o", tmp_path / "f", "-f", "toy", "-q")
    assert r.exit_code == 0, r.output
    assert len(read_manifest(tmp_path / "f")) == 2 * len(NAMES)
    with open_store(tmp_path / "f", "toy") as s:
        assert len(s) == 2 * len(NAMES)


# ----------------------------------------------------------------------------- 5. one class
def test_a_training_split_with_one_class_is_an_error_naming_the_fold(tmp_path, one_torch_thread):
    from fault_helpers import make_train_feats

    f = make_train_feats(tmp_path / "f", label_of=lambda s, i: "angry")
    exp = tmp_path / "e"
    args = ["-m", "probe", "--audio", "fa", "-q", "--threads", "1", "--epochs", "1"]
    res = run("train", f, "-o", exp, *args, "--protocol", "speaker-kfold:2")
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 1 and len(lines) == 1, res.output
    assert lines[0].startswith("Error: fold ") and "training split has 1 class(es) (angry)" in lines[0]
    assert "at least two" in lines[0] and not list(exp.glob("**/*.safetensors"))
