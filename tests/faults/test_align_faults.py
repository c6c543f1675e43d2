"""Bad inputs a user meets at the align stage: one line naming the file, exit 1, no output left behind."""

import csv
import shutil

import h5py
import pytest
from click.testing import CliRunner

from sertool.align import open_aligned
from sertool.cli import cli
from sertool.corpora.base import read_manifest, write_manifest
from sertool.store import StoreError

from fault_helpers import make_align_feats, read_only


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_align_feats(tmp_path_factory.mktemp("af") / "f", n=6)


@pytest.fixture
def feats(base, tmp_path):
    f = tmp_path / "f"
    shutil.copytree(base, f)
    return f


def align(feats, *extra, audio="aud", text="txt"):
    return CliRunner().invoke(
        cli,
        [
            "align",
            str(feats),
            "--audio",
            audio,
            "--text",
            text,
            "--timings",
            "corpus",
            "--length",
            "4",
            "-q",
            *map(str, extra),
        ],
    )


def refused(res, feats):
    assert res.exit_code == 1, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in res.output, res.output
    assert not list(feats.glob("aligned-*")), "a failed run left an output file"
    return lines[0]


def test_store_from_another_version(feats):
    shutil.copy(feats / "aud.h5", feats / "v9.h5")
    with h5py.File(feats / "v9.h5", "a") as h:
        h.attrs["format_version"] = 99
    assert refused(align(feats, audio="v9"), feats) == (
        f"Error: {feats / 'v9.h5'}: store format version 99 (written by sertool 0.1.0) is not supported by this "
        "sertool (reads versions [1]); upgrade sertool to read it."
    )
    with h5py.File(feats / "v9.h5", "a") as h:
        h.attrs["format_version"] = 0
    assert refused(align(feats, audio="v9"), feats).endswith("re-run `sertool extract` to rebuild it.")


@pytest.mark.parametrize("cut", [0, 100, 0.5])
def test_truncated_store(feats, cut):
    data = (feats / "txt.h5").read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else cut
    (feats / "txt.h5").write_bytes(data[:n])
    line = refused(align(feats), feats)
    assert line.startswith(f"Error: {feats / 'txt.h5'}: not a readable HDF5 file, it may be truncated or corrupt")


def test_foreign_hdf5_and_missing_frame_rate(feats):
    with h5py.File(feats / "other.h5", "w") as h:
        h["x"] = [1.0]
    assert "other.h5: not a sertool feature store" in refused(align(feats, audio="other"), feats)
    shutil.copy(feats / "aud.h5", feats / "norate.h5")
    with h5py.File(feats / "norate.h5", "a") as h:
        del h.attrs["frame_rate_hz"]
    assert refused(align(feats, audio="norate"), feats) == (
        f"Error: {feats / 'norate.h5'}: an audio store without frame_rate_hz cannot be aligned to words"
    )


def test_stores_of_another_corpus_are_reported_per_utterance(feats, tmp_path):
    """Stores and manifest that do not match: every missing utterance is in align_report.tsv."""
    other = make_align_feats(tmp_path / "other", n=3, seed=1)
    shutil.copy(other / "txt.h5", feats / "txt.h5")  # only u0000-u0002
    res = align(feats, "--strict")
    assert res.exit_code == 3 and "aligned 3 of 6" in res.output and "3 DROPPED" in res.output
    with open(feats / "align_report.tsv", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter="\t"))
    dropped = sorted(r["id"] for r in rows if r.get("status", "").lower().startswith("drop"))
    assert dropped == ["u0003", "u0004", "u0005"], rows
    assert all("text" in (r.get("reason") or "") for r in rows if r["id"] in dropped), rows


def test_manifest_with_unsafe_id(feats):
    utts = read_manifest(feats)
    lines = (feats / "manifest.jsonl").read_text().splitlines()
    (feats / "manifest.jsonl").write_text(lines[0].replace('"u0000"', '"../../evil"') + "\n")
    assert "utterance id '../../evil' is not safe as a file name" in refused(align(feats), feats)
    assert not (feats.parent.parent / "evil").exists()
    write_manifest(utts, feats / "manifest.jsonl")


def test_output_problems(feats, tmp_path, monkeypatch):
    res = align(feats, "-o", feats)
    assert res.exit_code == 2 and "is a directory" in res.output
    (tmp_path / "afile").write_text("mine")
    line = refused(align(feats, "-o", tmp_path / "afile" / "a.h5"), feats)
    assert str(tmp_path / "afile") in line and (tmp_path / "afile").read_text() == "mine"
    read_only(monkeypatch, feats)
    line = refused(align(feats), feats)
    assert line.startswith(f"Error: {feats}") and line.endswith("Read-only file system")


def test_truncated_aligned_file(feats):
    assert align(feats).exit_code == 0
    out = feats / "aligned-aud-txt-4.h5"
    assert open_aligned(out) is not None
    data = out.read_bytes()
    out.write_bytes(data[: len(data) // 3])
    with pytest.raises(StoreError, match="not a readable HDF5 file"):
        open_aligned(out)
    res = CliRunner().invoke(
        cli, ["train", str(feats), "-m", "probe", "--audio", str(out), "-o", str(feats / "e"), "-q"]
    )
    assert res.exit_code == 1 and "aligned-aud-txt-4.h5: not a readable HDF5 file" in res.output
