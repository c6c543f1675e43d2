"""The extract stage: corpus folder -> FEATS/manifest.jsonl + one HDF5 store per feature set.

    run_extract("corpus/", "feats/demo", ["mfcc", "covarep"], nj=2)

1. Read the corpus with its reader (validated utterances) and probe each audio file.
2. Optionally transcribe audio without text (`asr=`), then write the manifest atomically.
3. For every feature set, open its store for appending; utterances already in it (from an
   interrupted or earlier run) are skipped, so a re-run computes only what is missing, and
   those whose audio (or transcript) changed since: each utterance's features record the
   checksum of their source, which a re-run compares; changed ones are recomputed and counted
   (``ExtractReport.recomputed``). One run at a time writes a store: a second run on the same
   store is refused at once, naming the first (sertool.locks).
4. Per-utterance extractors run in `nj` worker processes (results written in manifest order,
   so the output does not depend on `nj`); batched extractors (GPU models) run in this
   process over batches.
5. A file that fails is listed in FEATS/errors.tsv (file, id, feature, reason) and the run
   goes on; the report says how many failed and the CLI's exit status is non-zero.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from tqdm.auto import tqdm

from sertool.audio import AudioError, audio_info, file_checksum, is_silent, load_audio
from sertool.config import parse_assignment
from sertool.corpora import EmptyCorpusError, read_corpus, write_manifest
from sertool.corpora.base import Utterance
from sertool.features.base import Extractor, FeatureResult, build_extractor, resolve
from sertool.locks import locking
from sertool.store import StoreWriter, library_versions, shard_path, store_path
from sertool.utils import append_jsonl, pick_device, show_bar, write_tsv

EXIT_SOME_FAILED = 3


@dataclass
class FeatureSpec:
    """One `-f` option: the store name, the extractor name and its parameters."""

    store: str
    extractor: str
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExtractReport:
    out_dir: Path
    corpus: str
    n_utterances: int
    stores: dict[str, Path] = field(default_factory=dict)
    computed: dict[str, int] = field(default_factory=dict)
    skipped_done: dict[str, int] = field(default_factory=dict)
    skipped_no_input: dict[str, int] = field(default_factory=dict)
    recomputed: dict[str, int] = field(default_factory=dict)  # in the store, but the source changed since
    errors: list[tuple[str, str, str, str]] = field(default_factory=list)  # file, id, feature, reason
    seconds: float = 0.0

    @property
    def n_failed(self) -> int:
        return len({(e[0], e[1]) for e in self.errors})


def parse_feature_spec(text: str, overrides: dict[str, dict[str, Any]] | None = None) -> FeatureSpec:
    """`mfcc`, `mfcc:n_mfcc=20,deltas=0` or `mfcc20=mfcc:n_mfcc=20` (store name = ...)."""
    store, _, rest = text.partition("=") if "=" in text.split(":")[0] else ("", "", text)
    name, _, param_text = rest.partition(":")
    params: dict[str, Any] = {}
    for item in filter(None, param_text.split(",")):
        where = f"feature option {item!r} in {text!r}"
        key, value = parse_assignment(item, where, f"{where} is not key=value")
        params[key] = value
    store = store or name
    params.update((overrides or {}).get(store, {}))
    return FeatureSpec(store=store, extractor=name, params=params)


def parse_overrides(items: Iterable[str]) -> dict[str, dict[str, Any]]:
    """`--set mfcc.n_mfcc=20` -> {"mfcc": {"n_mfcc": 20}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        malformed = f"--set {item!r}: expected FEATURE.PARAM=VALUE, e.g. mfcc.n_mfcc=20"
        key, value = parse_assignment(item, f"--set {item!r}", malformed)
        store, dot, param = key.partition(".")
        if not dot or not param.strip():
            raise ValueError(malformed)
        out.setdefault(store.strip(), {})[param.strip()] = value
    return out


def build_extractors(specs: list[FeatureSpec], cli_options: dict[str, Any]) -> dict[str, Extractor]:
    extractors = {}
    for spec in specs:
        cls, _ = resolve(spec.extractor)
        params = dict(spec.params)
        for option, param in cls.cli_options.items():
            if cli_options.get(option) is not None and param not in params:
                params[param] = cli_options[option]
        extractors[spec.store] = build_extractor(spec.extractor, params)
    return extractors


def probe_audio(utts: list[Utterance], problems: list[tuple[str, str]]) -> None:
    """Fill duration and sample rate; mark (do not drop) utterances whose audio is unusable."""
    for u in utts:
        if not u.audio:
            continue
        try:
            info = audio_info(u.audio)
            if info.frames == 0:
                raise AudioError(f"{u.audio}: zero-length audio (0 samples)")
        except AudioError as e:
            u.extra["audio_error"] = str(e)  # reported per utterance by run_extract
            continue
        u.sample_rate = info.sample_rate
        if u.start is None and u.end is None:
            u.duration = round(info.duration, 4)


# ------------------------------------------------------------------------------ workers
_WORKER_EXTRACTORS: dict[str, Extractor] = {}
_WORKER_DEGRADATION: str | None = None


def _init_worker(configs: dict[str, dict], degradation: str | None = None) -> None:
    global _WORKER_EXTRACTORS, _WORKER_DEGRADATION
    import torch

    torch.set_num_threads(1)  # one process per core: no oversubscription
    _WORKER_EXTRACTORS = {store: build_extractor(cfg) for store, cfg in configs.items()}
    _WORKER_DEGRADATION = degradation


def _extract_one(job: tuple[dict, list[str]]) -> tuple[str, list[tuple[str, Any]]]:
    record, stores = job
    return record["id"], _compute(Utterance(**record), stores, _WORKER_EXTRACTORS, _WORKER_DEGRADATION)


def load_wave(utt: Utterance, sample_rate: int | None, degradation: str | None = None) -> np.ndarray:
    """The utterance's audio at ``sample_rate``, through ``--degrade`` (sertool.augment) when given."""
    wave, sr = load_audio(utt.audio, sample_rate, start=utt.start, end=utt.end)
    if degradation:
        from sertool.augment import degrade

        wave = degrade(wave, sr, degradation, utt.id)
    return wave


def _compute(
    utt: Utterance, stores: list[str], extractors: dict[str, Extractor], degradation: str | None = None
) -> list[tuple[str, Any]]:
    """Run the per-utterance extractors on one utterance; exceptions become error strings."""
    out: list[tuple[str, Any]] = []
    waves: dict[int | None, np.ndarray] = {}
    checksum = None
    for store in stores:
        ex = extractors[store]
        try:
            wave = None
            if ex.needs_audio:
                if ex.sample_rate not in waves:
                    waves[ex.sample_rate] = load_wave(utt, ex.sample_rate, degradation)
                wave = waves[ex.sample_rate]
                checksum = checksum or file_checksum(utt.audio)
            result = ex.extract(utt, wave)
            result = _checked(result, store, utt.id)
            if checksum:
                result.attrs.setdefault("source_checksum", checksum)
            if ex.needs_text:
                result.attrs.setdefault("text_checksum", text_checksum(utt.text))
            if wave is not None and is_silent(wave):
                result.attrs.setdefault("silent", True)
            out.append((store, result))
        except Exception as e:  # noqa: BLE001 - one bad file never stops the run
            out.append((store, _reason(e)))
    return out


def _checked(result: FeatureResult, store: str, uid: str) -> FeatureResult:
    data = np.asarray(result.data, dtype=np.float32)
    if data.ndim != 2:
        raise ValueError(f"extractor {store!r} returned shape {data.shape} for {uid!r}, expected [T, D]")
    if not np.isfinite(data).all():
        raise ValueError(f"extractor {store!r} returned NaN/inf values for {uid!r}")
    return FeatureResult(data, dict(result.attrs))


def text_checksum(text: str) -> str:
    """Checksum of a transcript, recorded with text features as ``source_checksum`` is with audio ones."""
    return "blake2b:" + hashlib.blake2b((text or "").encode("utf-8"), digest_size=16).hexdigest()


def changed_sources(
    utts: list[Utterance], writer: StoreWriter, ex: Extractor, audio_sums: dict[tuple[str, str], str]
) -> list[str]:
    """Ids in the store whose recorded source checksum (audio file, transcript) differs from the
    source now. ``audio_sums`` caches file checksums across stores. Features written before
    checksums were recorded cannot be checked and count as unchanged."""
    keys = (("source_checksum",) if ex.needs_audio else ()) + (("text_checksum",) if ex.needs_text else ())
    done = [u for u in utts if u.id in writer]
    recorded = writer.recorded(keys) if keys and done else {}
    changed = []
    for u in done:
        old = recorded.get(u.id)
        if not old:
            continue
        was = old.get("source_checksum")
        if isinstance(was, str) and u.audio:
            algorithm = was.partition(":")[0]
            if (u.audio, algorithm) not in audio_sums:
                try:
                    audio_sums[u.audio, algorithm] = file_checksum(u.audio, algorithm)
                except (OSError, ValueError):
                    audio_sums[u.audio, algorithm] = ""
            if audio_sums[u.audio, algorithm] != was:
                changed.append(u.id)
                continue
        was = old.get("text_checksum")
        if isinstance(was, str) and was != text_checksum(u.text):
            changed.append(u.id)
    return changed


def _reason(e: Exception) -> str:
    text = str(e) if isinstance(e, (AudioError,)) else f"{type(e).__name__}: {e}"
    return " ".join(text.split())[:500]


# ------------------------------------------------------------------------------ the stage
def _store_targets(args: dict) -> list[Path]:
    """The store files a run writes (for their locks)."""
    specs = [f if isinstance(f, FeatureSpec) else parse_feature_spec(f, args["overrides"]) for f in args["features"]]
    paths = [store_path(args["out_dir"], s.store) for s in specs]
    return paths if args["shard"] is None else [shard_path(p, *args["shard"]) for p in paths]


@locking("extract", _store_targets, hint="wait for it or use another -o")
def run_extract(
    corpus_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    features: list[str] | list[FeatureSpec] = (),
    *,
    corpus: str | None = None,
    corpus_options: dict[str, Any] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    cli_options: dict[str, Any] | None = None,
    nj: int = 1,
    shard: tuple[int, int] | None = None,
    overwrite: bool = False,
    asr: str | None = None,
    dtype: str = "float32",
    flush_every: int = 64,
    import_csd: bool = False,
    degradation: str | None = None,
    progress: bool = True,
    log=print,
) -> ExtractReport:
    t0 = time.perf_counter()
    if (cli_options or {}).get("device") not in (None, "auto", "cpu"):  # cpu always exists: no torch import
        pick_device(cli_options["device"])  # a device that does not exist here fails before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cli_options = dict(cli_options or {})
    specs = [f if isinstance(f, FeatureSpec) else parse_feature_spec(f, overrides) for f in features]
    if degradation:
        from sertool.augment import parse_degradation

        degradation = "+".join(str(s) for s in parse_degradation(degradation))  # a bad spec fails before any work
    if len({s.store for s in specs}) != len(specs):
        raise ValueError("the same feature store name is given twice; name one `NAME=feature:...`")
    # Build the extractors first: a bad feature name or parameter fails before any work.
    extractors = build_extractors(specs, cli_options)
    if cli_options.get("threads"):  # model-based extractors run here, in torch's thread pool
        import torch

        torch.set_num_threads(int(cli_options["threads"]))

    # 1. corpus -> validated utterances
    problems: list[tuple[str, str]] = []
    try:
        corpus_name, utts = read_corpus(corpus_dir, corpus, problems=problems, **(corpus_options or {}))
    except EmptyCorpusError as e:  # the reasons are written, not dropped
        if not e.problems:
            raise
        _write_errors(out_dir / "errors.tsv", [(f, "", "corpus", r) for f, r in e.problems])
        raise EmptyCorpusError(f"{e}; all {len(e.problems)} in {out_dir / 'errors.tsv'}", e.problems) from None
    probe_audio(utts, problems)

    # 2. ASR for utterances without text, then the manifest
    if asr:
        from sertool.features.asr import transcribe_utterances

        needs = [u for u in utts if u.audio and not u.text and "audio_error" not in u.extra]
        if needs:
            done = {
                u.id: u
                for u in transcribe_utterances(
                    needs,
                    model=asr,
                    device=cli_options.get("device") or "auto",
                    progress=progress,
                    threads=cli_options.get("threads"),
                )
            }
            utts = [done.get(u.id, u) for u in utts]
    manifest = write_manifest(utts, out_dir / "manifest.jsonl")
    report = ExtractReport(out_dir=out_dir, corpus=corpus_name, n_utterances=len(utts))
    report.errors.extend((f, "", "corpus", r) for f, r in problems)
    report.errors.extend((u.audio, u.id, "audio", u.extra["audio_error"]) for u in utts if "audio_error" in u.extra)
    log(f"manifest: {manifest} ({len(utts)} utterances, corpus layout {corpus_name!r})")

    if import_csd:
        report.stores.update(_import_csd_sequences(Path(corpus_dir), utts, out_dir, log))

    # 3. open the stores; decide what is left to do
    mine = utts if shard is None else [u for i, u in enumerate(utts) if i % shard[1] == shard[0]]
    writers: dict[str, StoreWriter] = {}
    pending: dict[str, set[str]] = {}
    audio_sums: dict[tuple[str, str], str] = {}  # (file, algorithm) -> checksum, shared by the stores
    try:
        for spec in specs:
            ex = extractors[spec.store]
            path = store_path(out_dir, spec.store)
            if shard is not None:
                path = shard_path(path, *shard)
            attrs = {
                "feature": spec.store,
                "kind": ex.kind,
                **ex.file_attrs(),
                "extractor": ex.config(),
                "corpus": corpus_name,
                **({"degradation": degradation} if degradation else {}),
            }
            writers[spec.store] = w = StoreWriter(
                path, attrs, dtype=dtype, overwrite=overwrite, flush_every=flush_every
            )
            report.stores[spec.store] = path
            usable = [
                u
                for u in mine
                if (not ex.needs_audio or (u.audio and "audio_error" not in u.extra))
                and (not ex.needs_text or u.text.strip())
            ]
            report.skipped_no_input[spec.store] = len(mine) - len(usable)
            changed = [] if overwrite else changed_sources(usable, w, ex, audio_sums)
            if changed:
                log(
                    f"{spec.store}: {len(changed)} utterance(s) changed since they were extracted (source "
                    f"checksum differs), recomputing: {', '.join(changed[:5])}" + (" ..." if len(changed) > 5 else "")
                )
            report.recomputed[spec.store] = len(changed)
            pending[spec.store] = {u.id for u in usable if u.id not in w} | set(changed)
            report.skipped_done[spec.store] = len(usable) - len(pending[spec.store])
            report.computed[spec.store] = 0

        # 4a. per-utterance extractors, fanned out to worker processes
        simple = [s.store for s in specs if not extractors[s.store].batched]
        jobs = [(u, [s for s in simple if u.id in pending[s]]) for u in mine]
        jobs = [(u, stores) for u, stores in jobs if stores]
        if jobs:
            by_id = {u.id: u for u in mine}
            results = _run_jobs(jobs, {s: extractors[s].config() for s in simple}, extractors, nj, degradation)
            for uid, outputs in tqdm(
                results, total=len(jobs), desc="extract", unit="utt", disable=not show_bar(progress)
            ):
                u = by_id[uid]
                for store, result in outputs:
                    if isinstance(result, FeatureResult):
                        writers[store].add(uid, result.data, result.attrs)
                        report.computed[store] += 1
                    else:
                        report.errors.append((u.audio or "", uid, store, result))

        # 4b. batched extractors (models on GPU/CPU) in this process
        for spec in specs:
            ex = extractors[spec.store]
            if not ex.batched:
                continue
            todo = [u for u in mine if u.id in pending[spec.store]]
            bar = tqdm(total=len(todo), desc=f"extract {spec.store}", unit="utt", disable=not show_bar(progress))
            for start in range(0, len(todo), max(1, ex.batch_size)):
                batch = todo[start : start + max(1, ex.batch_size)]
                items, loaded = [], []
                for u in batch:
                    try:
                        wave = load_wave(u, ex.sample_rate, degradation) if ex.needs_audio else None
                        items.append((u, wave))
                        loaded.append(u)
                    except AudioError as e:
                        report.errors.append((u.audio or "", u.id, spec.store, _reason(e)))
                for u, result in zip(loaded, ex.extract_batch(items) if items else []):
                    try:
                        if isinstance(result, Exception):
                            raise result
                        result = _checked(result, spec.store, u.id)
                        if ex.needs_audio and u.audio:
                            if not audio_sums.get((u.audio, "blake2b")):
                                audio_sums[u.audio, "blake2b"] = file_checksum(u.audio)
                            result.attrs.setdefault("source_checksum", audio_sums[u.audio, "blake2b"])
                        if ex.needs_text:
                            result.attrs.setdefault("text_checksum", text_checksum(u.text))
                        writers[spec.store].add(u.id, result.data, result.attrs)
                        report.computed[spec.store] += 1
                    except Exception as e:  # noqa: BLE001
                        report.errors.append((u.audio or "", u.id, spec.store, _reason(e)))
                bar.update(len(batch))
            bar.close()
    except BaseException:
        for w in writers.values():  # keep what was computed; the next run resumes from it
            w.__exit__(*sys.exc_info())
        raise
    for w in writers.values():
        w.finalize()

    # 5. errors and provenance
    report.seconds = time.perf_counter() - t0
    _write_errors(
        out_dir / ("errors.tsv" if shard is None else f"errors.shard-{shard[0]}-of-{shard[1]}.tsv"), report.errors
    )
    _append_log(out_dir / "extract_log.jsonl", corpus_dir, specs, extractors, report, shard, nj)
    return report


def _import_csd_sequences(root: Path, utts: list[Utterance], out_dir: Path, log) -> dict[str, Path]:
    """CMU-MOSEI/MOSI: copy every pre-extracted `.csd` sequence into a store named csd_<sequence>."""
    from sertool.corpora.mosei import import_csd_features

    stores = {}
    for csd in sorted(root.glob("*.csd")):
        stem = csd.stem.lower()
        for prefix in ("cmu_mosei_", "cmu_mosi_"):
            stem = stem.removeprefix(prefix)
        if any(k in stem for k in ("label", "opinion")) or stem in ("timestampedwords", "words"):
            continue  # labels and word strings are read by the corpus reader
        kind = (
            "text"
            if "word" in stem or "glove" in stem
            else "visual"
            if any(k in stem for k in ("facet", "openface", "visual"))
            else "audio"
        )
        name = f"csd_{stem}"
        stores[name] = import_csd_features(csd, utts, out_dir / f"{name}.h5", name=name, kind=kind)
        log(f"imported {csd.name} -> {stores[name]}")
    return stores


def _run_jobs(jobs, configs, extractors, nj, degradation=None):
    if nj <= 1 or len(jobs) < 2:
        for u, stores in jobs:
            yield u.id, _compute(u, stores, extractors, degradation)
        return
    import dataclasses

    # spawn, not fork: the parent may hold torch/OpenMP threads, which a forked child inherits broken
    ctx = mp.get_context("spawn")
    with ctx.Pool(nj, initializer=_init_worker, initargs=(configs, degradation)) as pool:
        records = [(dataclasses.asdict(u), stores) for u, stores in jobs]
        yield from pool.imap(_extract_one, records, chunksize=4)


def _write_errors(path: Path, errors: list[tuple[str, str, str, str]]) -> None:
    if not errors:
        path.unlink(missing_ok=True)
        return
    write_tsv(path, ["file", "id", "feature", "reason"], errors)


def _append_log(path: Path, corpus_dir, specs, extractors, report: ExtractReport, shard, nj) -> None:
    entry = {
        "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "corpus_dir": str(Path(corpus_dir).resolve()),
        "corpus": report.corpus,
        "features": {s.store: extractors[s.store].config() for s in specs},
        "computed": report.computed,
        "skipped_done": report.skipped_done,
        "skipped_no_input": report.skipped_no_input,
        "recomputed_changed": report.recomputed,
        "failed": report.n_failed,
        "shard": list(shard) if shard else None,
        "nj": nj,
        "seconds": round(report.seconds, 2),
        "versions": library_versions(),
        "argv": sys.argv,
    }
    append_jsonl(path, entry)
