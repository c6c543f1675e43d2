"""Property-based tests (hypothesis): corpus readers on generated layouts, the manifest round trip,
and ids that can never address a path outside their folder."""

import csv
import os
import shutil
import tempfile
from pathlib import Path

# hypothesis caches to ./.hypothesis by default; keep the checkout clean
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", os.path.join(tempfile.gettempdir(), "sertool-hypothesis"))

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from sertool.corpora import read_corpus
from sertool.corpora.base import MAX_ID_LENGTH, CorpusError, Utterance, check_id, read_manifest, safe_id, write_manifest
from sertool.corpora.ravdess import EMOTIONS, INTENSITY, STATEMENTS, read_ravdess

BOUNDED = settings(
    max_examples=40,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

# file-system-valid name pieces: any unicode except '/', NUL and surrogates, at most 40 bytes
name_piece = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="/\x00"), min_size=1, max_size=12
).filter(lambda s: s not in (".", "..") and len(s.encode()) <= 40)
text = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=60)
label = st.text(
    st.characters(blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters=","),
    min_size=1,
    max_size=10,
)


def fresh_dir():
    return Path(tempfile.mkdtemp(prefix="prop-"))


@BOUNDED
@given(
    st.lists(
        st.tuples(st.lists(name_piece, min_size=1, max_size=3), text, label),
        min_size=1,
        max_size=6,
        unique_by=lambda t: tuple(t[0]),
    ),
    st.booleans(),
)
def test_folder_reader_on_generated_corpora(entries, sidecars):
    """Every audio file is either one utterance with its label and text, or reported; ids are safe."""
    root = fresh_dir()
    try:
        written = {}
        for parts, transcript, lab in entries:
            rel = Path(*parts[:-1], parts[-1] + ".wav")
            path = root / rel
            if (
                parts[0] in ("metadata.csv", "metadata.tsv", "feats")
                or path.is_dir()
                or path.exists()
                or any(p.is_file() for p in path.parents if p != root)
            ):
                continue  # a generated folder name equals an earlier file name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"RIFF")  # the reader never opens the audio
            written[path.resolve()] = (transcript, lab)
            if sidecars:
                path.with_suffix(".txt").write_text(transcript, encoding="utf-8")
        assume(written)
        with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["file", "label"] if sidecars else ["file", "label", "text"])
            for path, (transcript, lab) in written.items():
                rel = path.relative_to(root.resolve()).as_posix()
                w.writerow([rel, lab] if sidecars else [rel, lab, transcript])
        problems = []
        _, utts = read_corpus(root, "folder", problems=problems)
        by_audio = {Path(u.audio): u for u in utts}
        clashes = [p for p, r in problems if "clashes with" in r]
        assert len(utts) + len(clashes) == len(written), problems  # nothing lost silently
        assert len({u.id for u in utts}) == len(utts)
        for u in utts:
            check_id(u.id)
            assert (root / u.id).resolve().parent == root.resolve()
            transcript, lab = written[Path(u.audio)]
            assert u.label == lab
            expected = " ".join(transcript.split()) if sidecars else transcript.strip()
            assert u.text == expected
        # the manifest keeps everything
        out = root / "feats"
        write_manifest(utts, out / "manifest.jsonl")
        again = read_manifest(out)
        assert [(Path(u.audio), u.id, u.text, u.label) for u in again] == [
            (Path(u.audio), u.id, u.text, u.label) for u in utts
        ]
        assert set(by_audio) <= set(written)
    finally:
        shutil.rmtree(root, ignore_errors=True)


safe_ids = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._\-\[\]+=,@]{0,30}\Z")
finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
optional_text = st.none() | st.text(min_size=1, max_size=20)
json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | finite | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8,
)


@st.composite
def utterances(draw):
    start = draw(st.none() | st.floats(0, 1e4))
    words = draw(
        st.none()
        | st.lists(
            st.tuples(st.text(max_size=8), st.floats(0, 100), st.floats(0, 100)).map(
                lambda w: [w[0], min(w[1], w[2]), max(w[1], w[2])]
            ),
            max_size=4,
        )
    )
    return Utterance(
        id=draw(safe_ids),
        text=draw(text),
        label=draw(st.none() | label),
        score=draw(st.none() | finite),
        speaker=draw(optional_text),
        session=draw(optional_text),
        split=draw(st.sampled_from([None, "train", "dev", "test"])),
        duration=draw(st.none() | st.floats(0, 1e5)),
        sample_rate=draw(st.none() | st.integers(1, 384000)),
        words=words,
        start=start,
        end=None if start is None else start + draw(st.floats(0, 100)),
        extra=draw(st.dictionaries(st.text(min_size=1, max_size=6), json_value, max_size=3)),
        audio=draw(st.none() | st.sampled_from(["a.wav", "sub/ü b.flac", "../elsewhere/c.wav"])),
    )


@BOUNDED
@given(st.lists(utterances(), max_size=5, unique_by=lambda u: u.id))
def test_manifest_round_trip(utts):
    root = fresh_dir()
    try:
        feats = root / "corpus" / "feats"
        for u in utts:
            if u.audio is not None:
                u.audio = str((root / "corpus" / u.audio).resolve())
            if u.audio is None and not u.text.strip():
                u.text = "x"  # validate: an utterance needs audio or text
        write_manifest(utts, feats / "manifest.jsonl")
        assert read_manifest(feats) == utts
    finally:
        shutil.rmtree(root, ignore_errors=True)


@settings(max_examples=500, deadline=None, database=None, derandomize=True)
@given(st.text(max_size=300))
def test_safe_id_never_escapes_its_folder(raw):
    uid = safe_id(raw)
    check_id(uid)  # always a valid id
    assert 0 < len(uid) <= MAX_ID_LENGTH and "/" not in uid and "\\" not in uid and not uid.startswith(".")
    base = Path("/srv/out")
    assert os.path.normpath(base / uid) == str(base / uid) and Path(os.path.normpath(base / uid)).parent == base


@settings(max_examples=500, deadline=None, database=None, derandomize=True)
@given(st.text(max_size=60) | st.sampled_from(["..", ".", "../x", "/abs", "a/../../b", "a\nb", "a\x00b", "~", "C:\\x"]))
def test_accepted_ids_never_escape_their_folder(raw):
    try:
        check_id(raw)
    except CorpusError:
        return
    base = Path("/srv/out")
    assert Path(os.path.normpath(base / raw)).parent == base and "\n" not in raw and "\x00" not in raw


codes = st.tuples(*[st.sampled_from(["01", "02", "03", "04", "05", "08", "09", "٠٣", "1"])] * 7)


@BOUNDED
@given(st.lists(codes, min_size=1, max_size=6, unique=True))
def test_ravdess_reader_reads_or_reports_every_file(names):
    root = fresh_dir()
    try:
        for fields in names:
            (root / ("-".join(fields) + ".wav")).write_bytes(b"RIFF")
        problems = []
        utts = read_ravdess(root, problems=problems, vocal="both")
        by_id = {u.id: u for u in utts}
        reported = {Path(p).stem for p, _ in problems}
        for fields in names:
            stem = "-".join(fields)
            valid = all(len(f) == 2 and f.isascii() and f.isdigit() for f in fields)
            if not valid:
                assert stem in reported and stem not in by_id
            elif fields[0] != "03" or fields[1] not in ("01", "02"):
                assert stem not in by_id  # video files and other channels are not audio utterances
            elif fields[2] in EMOTIONS and fields[4] in STATEMENTS and fields[3] in INTENSITY:
                u = by_id[stem]
                assert u.label == EMOTIONS[fields[2]] and u.text == STATEMENTS[fields[4]]
                assert u.speaker == f"Actor_{int(fields[6]):02d}"
            else:
                assert stem in reported and stem not in by_id
    finally:
        shutil.rmtree(root, ignore_errors=True)
