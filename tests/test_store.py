"""HDF5 feature store: contract, crash-safe appends, resume, shards, version checks."""

import json

import h5py
import numpy as np
import pytest

from sertool.store import (
    FORMAT_VERSION,
    StoreError,
    StoreWriter,
    find_shards,
    list_stores,
    merge_shards,
    open_store,
    shard_path,
)

ATTRS = {
    "feature": "toy",
    "kind": "audio",
    "dim": 3,
    "frame_rate_hz": 100.0,
    "columns": ["a", "b", "c"],
    "extractor": {"name": "toy", "params": {"x": 1}},
}


def make(n, seed=0):
    rng = np.random.default_rng(seed)
    return {f"u{i:03d}": rng.normal(size=(5 + i, 3)).astype(np.float32) for i in range(n)}


def test_roundtrip_contract(tmp_path):
    data = make(4)
    with StoreWriter(tmp_path / "toy.h5", ATTRS) as w:
        for uid, x in data.items():
            w.add(uid, x, {"tokens": ["a", "b"], "source_checksum": "blake2b:00"})
    with open_store(tmp_path, "toy") as s:
        assert sorted(s.ids) == sorted(data)
        for uid, x in data.items():
            np.testing.assert_array_equal(s[uid], x)
        assert s.utt_attrs("u001") == {"tokens": ["a", "b"], "source_checksum": "blake2b:00"}
        assert s.attrs["columns"] == ["a", "b", "c"] and s.attrs["dim"] == 3
        assert s.extractor == {"name": "toy", "params": {"x": 1}}
        assert s.attrs["format_version"] == FORMAT_VERSION and "torch" in s.attrs["versions"]
    # raw layout is the documented one: /utts/<id>, JSON attrs readable without sertool
    with h5py.File(tmp_path / "toy.h5") as f:
        assert f["utts/u002"].shape == (7, 3) and f["utts/u002"].dtype == np.float32
        assert json.loads(f.attrs["extractor"])["name"] == "toy"
    assert not (tmp_path / "toy.h5.parts").exists()


def test_float16_option(tmp_path):
    with StoreWriter(tmp_path / "h.h5", ATTRS, dtype="float16") as w:
        w.add("u", np.ones((2, 3)))
    with h5py.File(tmp_path / "h.h5") as f:
        assert f["utts/u"].dtype == np.float16


def test_rejects_bad_arrays(tmp_path):
    w = StoreWriter(tmp_path / "toy.h5", ATTRS)
    with pytest.raises(StoreError, match="must be \\[T, D\\]"):
        w.add("x", np.zeros(3))
    with pytest.raises(StoreError, match="2 columns, store dim is 3"):
        w.add("x", np.zeros((4, 2)))
    with pytest.raises(StoreError, match="NaN"):
        w.add("x", np.full((4, 3), np.nan))


def test_interrupted_writer_keeps_flushed_parts_and_resumes(tmp_path):
    data = make(10)
    path = tmp_path / "toy.h5"
    w = StoreWriter(path, ATTRS, flush_every=3)
    for uid in list(data)[:7]:
        w.add(uid, data[uid])
    # simulate kill -9: no finalize, no flush of the last buffered item (u006)
    assert not path.exists()
    assert len(list((tmp_path / "toy.h5.parts").glob("part-*.h5"))) == 2
    (tmp_path / "toy.h5.parts" / "part-000003.h5.tmp123").write_bytes(b"half written")
    w2 = StoreWriter(path, ATTRS, flush_every=3)
    assert w2.done == set(list(data)[:6])
    for uid in data:
        if uid not in w2:
            w2.add(uid, data[uid])
    w2.finalize()
    with open_store(path) as s:
        assert sorted(s.ids) == sorted(data)
        for uid, x in data.items():
            np.testing.assert_array_equal(s[uid], x)
    assert not (tmp_path / "toy.h5.parts").exists()


def test_resume_appends_to_complete_store(tmp_path):
    data = make(6)
    path = tmp_path / "toy.h5"
    with StoreWriter(path, ATTRS) as w:
        for uid in list(data)[:3]:
            w.add(uid, data[uid])
    with StoreWriter(path, ATTRS) as w:
        assert w.done == set(list(data)[:3])
        for uid in list(data)[3:]:
            w.add(uid, data[uid])
    with open_store(path) as s:
        assert len(s) == 6


def test_different_extractor_is_refused(tmp_path):
    with StoreWriter(tmp_path / "toy.h5", ATTRS) as w:
        w.add("a", np.zeros((1, 3)))
    other = {**ATTRS, "extractor": {"name": "toy", "params": {"x": 2}}}
    with pytest.raises(StoreError, match="different extractor.*extractor"):
        StoreWriter(tmp_path / "toy.h5", other)
    StoreWriter(tmp_path / "toy.h5", other, overwrite=True).finalize()
    with open_store(tmp_path / "toy.h5") as s:
        assert len(s) == 0 and s.extractor["params"]["x"] == 2


def test_version_and_foreign_files_get_clear_errors(tmp_path):
    with StoreWriter(tmp_path / "toy.h5", ATTRS) as w:
        w.add("a", np.zeros((1, 3)))
    with h5py.File(tmp_path / "toy.h5", "a") as f:
        f.attrs["format_version"] = 99
    with pytest.raises(StoreError, match="format version 99.*upgrade sertool"):
        open_store(tmp_path / "toy.h5")
    with h5py.File(tmp_path / "toy.h5", "a") as f:
        f.attrs["format_version"] = 0
    with pytest.raises(StoreError, match="format version 0.*re-run `sertool extract`"):
        open_store(tmp_path / "toy.h5")
    with h5py.File(tmp_path / "foreign.h5", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(StoreError, match="not a sertool feature store"):
        open_store(tmp_path / "foreign.h5")
    (tmp_path / "broken.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 50)
    with pytest.raises(StoreError, match="truncated or corrupt"):
        open_store(tmp_path / "broken.h5")
    with pytest.raises(StoreError, match="does not exist"):
        open_store(tmp_path / "missing.h5")


def test_shards_read_as_one_store_and_merge_bit_identical(tmp_path):
    data = make(9)
    ids = list(data)
    with StoreWriter(tmp_path / "full" / "toy.h5", ATTRS) as w:
        for uid in ids:
            w.add(uid, data[uid])
    base = tmp_path / "sh" / "toy.h5"
    for i in range(3):
        with StoreWriter(shard_path(base, i, 3), ATTRS) as w:
            for uid in ids[i::3]:
                w.add(uid, data[uid])
    assert list_stores(tmp_path / "sh") == ["toy"]
    with open_store(base) as s:
        assert sorted(s.ids) == sorted(ids) and len(s.paths) == 3
    merged = merge_shards(base)
    assert not find_shards(base)
    with open_store(merged) as m, open_store(tmp_path / "full" / "toy.h5") as full:
        assert m.ids == full.ids
        for uid in ids:
            assert m[uid].tobytes() == full[uid].tobytes()


def test_incomplete_shard_set_is_an_error(tmp_path):
    base = tmp_path / "toy.h5"
    for i in (0, 2):
        with StoreWriter(shard_path(base, i, 3), ATTRS) as w:
            w.add(f"u{i}", np.zeros((1, 3)))
    with pytest.raises(StoreError, match=r"shard\(s\) \[1\] are missing"):
        open_store(base)


def test_fast_read_path_equals_the_plain_one(tmp_path):
    data = make(3)
    with StoreWriter(tmp_path / "toy.h5", ATTRS) as w:
        for uid, x in data.items():
            w.add(uid, x, {"word_index": np.arange(len(x), dtype=np.int32), "tokens": ["a"]})
    with open_store(tmp_path / "toy.h5") as s:
        for uid, x in data.items():
            rows, index = s.read_with_attr(uid, "word_index")
            np.testing.assert_array_equal(rows, x)
            np.testing.assert_array_equal(index, np.arange(len(x)))
            assert s.read_with_attr(uid, "missing")[1] is None
        with pytest.raises(KeyError, match="not in feature store"):
            s.read_with_attr("nope")
