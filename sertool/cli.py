"""The `sertool` command: one thin click command per stage over the library functions."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from sertool import __version__
from sertool.corpora import READERS

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class SertoolError(click.ClickException):
    """A user-facing error: printed without a traceback, exit status 1."""


def _fail_cleanly(func):
    """Turn the library's validation errors into one clear line instead of a traceback."""
    import functools

    import yaml

    from sertool.audio import AudioError
    from sertool.config import yaml_problem
    from sertool.corpora.base import CorpusError
    from sertool.features.base import ExtractorError
    from sertool.store import StoreError

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except (CorpusError, StoreError, ExtractorError, AudioError, ValueError) as e:
            raise SertoolError(str(e)) from None
        except yaml.YAMLError as e:  # a file read without sertool.config.load_yaml: still one line
            raise SertoolError(yaml_problem(e)) from None
        except OSError as e:  # read-only or full disk, a file where a folder is expected …
            where = f"{e.filename}: " if e.filename else ""
            raise SertoolError(f"{where}{e.strerror or e}") from None

    return wrapper


class PipelineGroup(click.Group):
    """Lists commands in pipeline order, not alphabetically."""

    ORDER = ("extract", "align", "train", "distill", "evaluate", "predict")

    def list_commands(self, ctx):
        names = list(self.commands)
        return [n for n in self.ORDER if n in names] + sorted(n for n in names if n not in self.ORDER)


@click.group(cls=PipelineGroup, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="sertool")
def cli() -> None:
    """sertool: multimodal speech emotion recognition, from a corpus folder to predictions.

    Stages: extract -> align -> train -> distill -> evaluate -> predict.
    """


# ----------------------------------------------------------------------------------- extract
def _parse_shard(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not i/N (e.g. 0/4)") from None
    if n < 1 or not 0 <= i < n:
        raise click.BadParameter(f"{value!r}: need 0 <= i < N")
    return i, n


@cli.command(context_settings=CONTEXT)
@click.argument("corpus_dir", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Features folder to write (manifest.jsonl, NAME.h5 per feature, errors.tsv).",
)
@click.option(
    "-f",
    "--feature",
    "features",
    multiple=True,
    metavar="NAME[:k=v,...]",
    help="Feature set to extract (repeatable); `--list` shows them. Without any, only the manifest is written.",
)
@click.option("--corpus", type=click.Choice(list(READERS)), help="Corpus layout (detected when omitted).")
@click.option(
    "--corpus-opt",
    "corpus_opts",
    multiple=True,
    metavar="KEY=VALUE",
    help="Reader option, e.g. labels=4class (iemocap), vocal=both (ravdess), audio=false (meld).",
)
@click.option(
    "--set", "sets", multiple=True, metavar="FEATURE.PARAM=VALUE", help="Extractor parameter, e.g. mfcc.n_mfcc=20."
)
@click.option("--text-model", help="BERT-family model for -f bert: hub id, local directory or alias (minilm).")
@click.option("--ssl-model", help="wav2vec2-family model for -f wav2vec2: hub id or local directory.")
@click.option("--whisper-model", help="Whisper model for -f whisper: hub id, local directory or alias (tiny.en).")
@click.option("--asr", metavar="MODEL", help="Transcribe audio that has no text (e.g. tiny.en); sets text_source=asr.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N for model-based features.")
@click.option("--nj", default=1, show_default=True, type=click.IntRange(1), help="Worker processes for CPU features.")
@click.option(
    "--threads",
    type=click.IntRange(1),
    help="CPU threads for model-based features and --asr (torch, CTranslate2); default: torch's own, 4 for ASR.",
)
@click.option("--shard", metavar="i/N", help="Process every N-th utterance starting at i (cluster array jobs).")
@click.option("--merge", is_flag=True, help="Merge the shards in OUT into one store per feature and exit.")
@click.option("--overwrite", is_flag=True, help="Recompute stores from scratch instead of resuming.")
@click.option("--float16", is_flag=True, help="Store features as float16 (half the disk).")
@click.option(
    "--flush-every",
    default=64,
    show_default=True,
    type=click.IntRange(1),
    help="Utterances per checkpoint part: a crash loses at most this many.",
)
@click.option("--import-csd", is_flag=True, help="CMU-MOSEI/MOSI: copy the pre-extracted .csd sequences into stores.")
@click.option(
    "--degrade",
    metavar="SPEC",
    help="Degrade every clip before extraction, e.g. telephone, noise:10, telephone+pink:20, "
    "random:reverb:0.4|gain:-20 (sertool/augment.py): training copies or degraded test sets.",
)
@click.option("--list", "list_features", is_flag=True, help="List the available feature sets and exit.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@_fail_cleanly
def extract(
    corpus_dir,
    out_dir,
    features,
    corpus,
    corpus_opts,
    sets,
    text_model,
    ssl_model,
    whisper_model,
    asr,
    device,
    nj,
    threads,
    shard,
    merge,
    overwrite,
    float16,
    flush_every,
    import_csd,
    degrade,
    list_features,
    quiet,
):
    """Read CORPUS_DIR; write OUT/manifest.jsonl and one HDF5 feature store per -f.

    Re-running resumes: utterances already stored are skipped. A file that cannot be processed
    is listed in OUT/errors.tsv and the run goes on; the exit status is 3 when any failed.
    """
    from sertool.config import parse_assignment
    from sertool.extract import EXIT_SOME_FAILED, parse_overrides, run_extract
    from sertool.features import list_extractors

    if list_features:
        for name, description in list_extractors().items():
            click.echo(f"{name}\t{description}")
        return
    if out_dir is None:
        raise click.UsageError("missing -o/--out FEATS")
    if merge:
        from sertool.store import list_stores, merge_shards

        for name in list_stores(out_dir):
            path = out_dir / f"{name}.h5"
            if not path.exists():
                click.echo(f"merged {merge_shards(path)}")
        return
    if corpus_dir is None:
        raise click.UsageError("missing CORPUS_DIR")
    corpus_options = {}
    for item in corpus_opts:
        try:
            key, value = parse_assignment(item, repr(item), f"{item!r} is not KEY=VALUE")
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--corpus-opt") from None
        corpus_options[key] = value
    report = run_extract(
        corpus_dir,
        out_dir,
        list(features),
        corpus=corpus,
        corpus_options=corpus_options,
        overrides=parse_overrides(sets),
        cli_options={
            "text_model": text_model,
            "ssl_model": ssl_model,
            "whisper_model": whisper_model,
            "device": device,
            "threads": threads,
        },
        nj=nj,
        shard=_parse_shard(shard),
        overwrite=overwrite,
        asr=asr,
        dtype="float16" if float16 else "float32",
        flush_every=flush_every,
        import_csd=import_csd,
        degradation=degrade,
        progress=not quiet,
        log=click.echo,
    )
    for store, path in report.stores.items():
        if store in report.computed:
            changed = report.recomputed.get(store, 0)
            click.echo(
                f"{store}: {path} (computed {report.computed[store]}"
                + (f", recomputed {changed} changed" if changed else "")
                + f", already done {report.skipped_done[store]}, no input {report.skipped_no_input[store]})"
            )
    click.echo(f"done in {report.seconds:.1f} s")
    if report.errors:
        click.echo(f"{report.n_failed} file(s) failed: see {out_dir / 'errors.tsv'}", err=True)
        sys.exit(EXIT_SOME_FAILED)


# ----------------------------------------------------------------------------------- store
@cli.group(context_settings=CONTEXT)
def store() -> None:
    """Inspect, merge and concatenate feature stores."""


@store.command("info", context_settings=CONTEXT)
@click.argument("path", type=click.Path(path_type=Path))
@_fail_cleanly
def store_info(path):
    """Print a store's attributes and size (PATH: FEATS/NAME.h5, or a features folder)."""
    import json

    from sertool.store import list_stores, open_store

    paths = [path / f"{n}.h5" for n in list_stores(path)] if path.is_dir() else [path]
    for p in paths:
        with open_store(p) as s:
            frames = sum(s.shape(u)[0] for u in s.ids)
            click.echo(f"{p}: {len(s)} utterances, {frames} frames, dim {s.attrs.get('dim')}")
            for key, value in sorted(s.attrs.items()):
                text = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
                click.echo(f"  {key}: {text if len(text) < 300 else text[:300] + ' …'}")
    # a run that was stopped leaves NAME.h5.parts/ (and no NAME.h5 when it was the first run)
    for parts in sorted(path.glob("*.h5.parts") if path.is_dir() else path.parent.glob(path.name + ".parts")):
        click.echo(_unfinished_run(parts))
    if path.is_dir() and not paths and not list(path.glob("*.h5.parts")):
        click.echo(f"{path}: no feature stores (run `sertool extract CORPUS -o {path} -f FEATURE`)")


def _unfinished_run(parts: Path) -> str:
    import h5py

    files = sorted(parts.glob("part-*.h5"))
    count = 0
    for f in files:
        try:
            with h5py.File(f, "r") as h:
                count += len(h["utts"]) if "utts" in h else 0
        except OSError:
            pass  # a part being written by a live run
    store = parts.with_name(parts.name[: -len(".parts")])
    state = "on top of the complete store" if store.exists() else "no complete store yet"
    return (
        f"{store}: unfinished run ({len(files)} part file(s), {count} utterance(s) so far; {state}): run the same "
        f"`sertool extract ... -o {store.parent}` command again to finish it (it resumes from the parts)"
    )


@store.command("merge", context_settings=CONTEXT)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--keep", is_flag=True, help="Keep the shard files.")
@_fail_cleanly
def store_merge(path, keep):
    """Merge NAME.shard-i-of-N.h5 files into NAME.h5 (PATH: FEATS/NAME.h5)."""
    from sertool.store import merge_shards

    click.echo(f"merged {merge_shards(path, remove=not keep)}")


@store.command("concat", context_settings=CONTEXT)
@click.argument("feats", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("names", nargs=-1, required=True)
@click.option(
    "-o", "--out", "out_name", metavar="NAME", help="Name of the fused store (default: the names joined by +)."
)
@click.option("--overwrite", is_flag=True, help="Recompute the fused store from scratch instead of resuming.")
@_fail_cleanly
def store_concat(feats, names, out_name, overwrite):
    """Concatenate acoustic stores of FEATS frame by frame on the first one's frames (early fusion).

    Example: sertool store concat feats/rav whisper compare   (writes feats/rav/whisper+compare.h5;
    train on it with --audio whisper+compare; predict rebuilds the same features)."""
    from sertool.features.fusion import concat_stores

    click.echo(concat_stores(feats, list(names), out_name, overwrite=overwrite, log=click.echo))


# ----------------------------------------------------------------------------------- models
@cli.command(context_settings=CONTEXT)
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Config override, e.g. model.gates=false.")
@_fail_cleanly
def models(sets):
    """List the registered models with their parameter counts: KEY<TAB>PARAMS ('-' for cmd, whose
    size is that of the distilled student given by --init)."""
    from sertool.models import describe_models

    for key, params in describe_models(list(sets)):
        click.echo(f"{key}\t{params if params is not None else '-'}")


# ----------------------------------------------------------------------------------- train
@cli.command(context_settings=CONTEXT)
@click.argument("feats", type=click.Path(file_okay=False, path_type=Path))
@click.option("-m", "--model", required=True, help="Model key (`sertool models` lists them).")
@click.option(
    "-o",
    "--out",
    "exp",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Experiment folder to write (config.yaml, folds/, metrics.json, log.jsonl, predictor.json).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML merged over the model's defaults (an EXP/config.yaml works too).",
)
@click.option(
    "--set", "sets", multiple=True, metavar="KEY=VALUE", help="Config override, e.g. train.epochs=20 (last wins)."
)
@click.option(
    "--audio", metavar="STORE", help="Audio input: store name in FEATS, a .h5 path or an aligned file (= data.audio)."
)
@click.option("--text", metavar="STORE", help="Text input (= data.text).")
@click.option("--visual", metavar="STORE", help="Visual input (= data.visual).")
@click.option(
    "--audio-encoder",
    metavar="NAME",
    help="cma / self_attn / cross_attn: a Whisper encoder fine-tuned with the model on the waveform, "
    "e.g. tiny.en (= model.input_encoders.audio).",
)
@click.option(
    "--text-encoder",
    metavar="NAME",
    help="cma / self_attn / cross_attn: a BERT-family encoder fine-tuned with the model on the transcript, "
    "e.g. minilm (= model.input_encoders.text).",
)
@click.option(
    "--labels", metavar="PRESET", help="Label set: auto, iemocap4, iemocap7, meld7, ravdess8/7/4, mosei, or a,b,c."
)
@click.option(
    "--protocol", metavar="SPEC", help="corpus | kfold:K | loso | speaker-kfold:K | loso-session | rajan[:N]."
)
@click.option("--seeds", type=click.IntRange(1), help="Repeat every fold with this many seeds (= run.seeds).")
@click.option("--epochs", type=click.IntRange(1), help="= train.epochs.")
@click.option("--device", help="auto, cpu, cuda or cuda:N (= run.device).")
@click.option("--threads", type=click.IntRange(1), help="CPU threads for torch (= run.threads); 1 on a shared machine.")
@click.option(
    "--fold",
    "folds",
    multiple=True,
    metavar="NAME",
    help="Train only these folds (repeatable; e.g. to spread folds over jobs).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted experiment (same settings).")
@click.option("--overwrite", is_flag=True, help="Delete EXP first.")
@click.option(
    "--init",
    "init",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DISTILL_EXP",
    help="--model cmd: fine-tune the student of this `sertool distill` experiment (= model.init).",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
@_fail_cleanly
def train(
    feats,
    model,
    exp,
    config_file,
    sets,
    audio,
    text,
    visual,
    audio_encoder,
    text_encoder,
    labels,
    protocol,
    seeds,
    epochs,
    device,
    threads,
    folds,
    resume,
    overwrite,
    init,
    quiet,
):
    """Train MODEL on the feature stores in FEATS, over a protocol's folds and seeds, into EXP.

    Model selection and early stopping use a dev split carved from the training data, never the
    test split. Example: sertool train -m self_attn feats/rav --audio mfcc --text glove
    --protocol speaker-kfold:6 --labels ravdess8 --seeds 3 -o exp/rav-self

    CMD (cross-modal distillation): sertool distill FEATS -o DEXP ..., then
    sertool train FEATS -m cmd --init DEXP --protocol speaker-kfold:6 --labels ravdess8 -o EXP
    fine-tunes the distilled student like any other model (its inputs come from DEXP).

    Fine-tuned encoders: sertool train FEATS -m cma --audio-encoder tiny.en --text-encoder minilm
    (the model reads the waveform and the transcript; no stores needed).
    """
    from sertool.train import run_train

    options = {
        "data.audio": audio,
        "data.text": text,
        "data.visual": visual,
        "model.input_encoders.audio": audio_encoder,
        "model.input_encoders.text": text_encoder,
        "data.labels": labels,
        "protocol.name": protocol,
        "run.seeds": seeds,
        "train.epochs": epochs,
        "run.device": device,
        "run.threads": threads,
    }
    overrides = [f"{k}={v}" for k, v in options.items() if v is not None] + list(sets)
    if init is not None:
        from sertool.models import default_config

        if "init" not in default_config(model)["model"]:
            raise click.UsageError(
                f"--init is for --model cmd (fine-tuning a `sertool distill` student), not --model {model}"
            )
        overrides.insert(0, f"model.init={init}")
    out = run_train(
        model,
        feats,
        exp,
        config_file=config_file,
        overrides=overrides,
        resume=resume,
        overwrite=overwrite,
        progress=not quiet,
        log=(lambda s: None) if quiet else click.echo,
        folds_only=folds or None,
        warn=lambda s: click.echo(s, err=True),
    )
    import os

    if int(os.environ.get("RANK", "0") or 0) == 0:  # under torchrun every process returns the summary: print once
        shown = ", ".join(f"{k} {v['mean']:.4f} ± {v['std']:.4f}" for k, v in out["summary"].items())
        click.echo(f"{exp}: {len(out['runs'])} run(s); test {shown}")
        from sertool.train import deployment_note

        click.echo(deployment_note(exp))


# ----------------------------------------------------------------------------------- evaluate
@cli.command(context_settings=CONTEXT)
@click.argument("exp", type=click.Path(file_okay=False, path_type=Path))
@click.argument("feats", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Output folder (default EXP/eval, or EXP/eval-crop<L>).",
)
@click.option(
    "--compare",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="EXP_B",
    help="Paired t-test and Wilcoxon test against EXP_B over matched folds x seeds.",
)
@click.option("--crop-length", type=int, metavar="L", help="Evaluate on sequences cut to the first L steps.")
@click.option("--attention", metavar="UTT_ID", help="Plot the attention maps of one test utterance.")
@click.option("--device", default="auto", show_default=True)
@click.option("-q", "--quiet", is_flag=True)
@_fail_cleanly
def evaluate(exp, feats, out_dir, compare, crop_length, attention, device, quiet):
    """Predict the test split of every run of EXP and write EXP/eval/ (predictions.csv,
    metrics.json, report.md, confusion.png, curves.png). FEATS defaults to the folder EXP was
    trained on."""
    from sertool.evaluate import CLASS_METRICS, REG_METRICS, run_evaluate

    m = run_evaluate(
        exp,
        feats,
        out_dir=out_dir,
        compare=compare,
        crop_length=crop_length,
        attention=attention,
        device=device,
        log=(lambda s: None) if quiet else click.echo,
    )
    keys = REG_METRICS if m["task"] == "regression" else CLASS_METRICS
    click.echo(", ".join(f"{k} {m[k]['mean']:.4f} ± {m[k]['std']:.4f}" for k in keys))
    if "compare" in m:
        for k, v in m["compare"].items():
            if isinstance(v, dict):
                click.echo(
                    f"vs {compare}: {k} diff {v['mean_diff']:+.4f}, p(t) {v['p_ttest']:.4g}, "
                    f"p(Wilcoxon) {v['p_wilcoxon']:.4g}"
                )


# ----------------------------------------------------------------------------------- align
@cli.command(context_settings=CONTEXT)
@click.argument("feats_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--audio", required=True, metavar="STORE", help="Audio feature store in FEATS (e.g. covarep, mfcc).")
@click.option("--text", required=True, metavar="STORE", help="Text feature store in FEATS (e.g. glove, bert).")
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output file (default FEATS/aligned-AUDIO-TEXT-N.h5).",
)
@click.option(
    "--length", default=50, show_default=True, type=click.IntRange(1), help="Words per utterance (cut or padded)."
)
@click.option(
    "--timings",
    default="corpus,forced,asr,uniform",
    show_default=True,
    metavar="SOURCES",
    help="Word-timing sources in order of preference: corpus, forced, asr, uniform (comma-separated).",
)
@click.option(
    "--aligner",
    type=click.Choice(["auto", "whisper", "pocketsphinx", "wav2vec2"]),
    default="auto",
    show_default=True,
    help="Forced aligner (auto: pocketsphinx, faster-whisper tiny.en where it fails).",
)
@click.option(
    "--align-model",
    metavar="MODEL",
    help="Whisper model of auto/whisper (faster-whisper name or folder; default tiny.en), or the "
    "wav2vec2-CTC folder / hub id of --aligner wav2vec2.",
)
@click.option("--asr-model", metavar="MODEL", help="ASR model for --timings asr (default tiny.en).")
@click.option(
    "--collapse",
    type=click.Choice(["mean", "max", "first", "last"]),
    default="mean",
    show_default=True,
    help="How the audio frames inside a word are collapsed.",
)
@click.option(
    "--padding",
    type=click.Choice(["end", "start"]),
    default="end",
    show_default=True,
    help="Pad short utterances at the end (as the CMU SDK) or at the start.",
)
@click.option(
    "--truncate",
    type=click.Choice(["end", "start"]),
    default="end",
    show_default=True,
    help="Cut long utterances at the end (keep the first words) or at the start.",
)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N for the aligner.")
@click.option("--float16", is_flag=True, help="Store the tensors as float16.")
@click.option(
    "--nj",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    help="Worker processes (each reads and aligns blocks of utterances; the output does not depend on it).",
)
@click.option("--no-cache", is_flag=True, help="Neither read nor write FEATS/timings/ (cached forced and ASR timings).")
@click.option("--strict", is_flag=True, help="Exit with status 3 when any utterance is dropped.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@_fail_cleanly
def align(
    feats_dir,
    audio,
    text,
    out,
    length,
    timings,
    aligner,
    align_model,
    asr_model,
    collapse,
    padding,
    truncate,
    device,
    float16,
    nj,
    no_cache,
    strict,
    quiet,
):
    """Word-level alignment: audio frames collapsed per word, CMU-MOSEI style.

    Writes FEATS/aligned-AUDIO-TEXT-N.h5 (audio [N, n, Da], text [N, n, Dt], mask, ids, labels,
    scores, lengths, timing_source) and FEATS/align_report.tsv, which lists every dropped or
    partly aligned utterance with its reason. Example:
    sertool align feats/rav --audio mfcc --text glove --timings forced --length 50
    """
    from sertool.align import EXIT_SOME_DROPPED, run_align

    report = run_align(
        feats_dir,
        audio,
        text,
        out,
        length=length,
        timings=timings,
        collapse=collapse,
        padding=padding,
        truncate=truncate,
        aligner=aligner,
        align_model=align_model,
        asr_model=asr_model,
        device=device,
        cache=not no_cache,
        dtype="float16" if float16 else "float32",
        nj=nj,
        progress=not quiet,
        log=lambda m: click.echo(m, err=True),
    )
    for line in report.summary():
        click.echo(line, err="DROPPED" in line)
    if strict and report.dropped:
        sys.exit(EXIT_SOME_DROPPED)


# ----------------------------------------------------------------------------------- distill
@cli.command(context_settings=CONTEXT)
@click.argument("feats", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--out",
    "exp",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Experiment folder (distill.yaml, student.safetensors, distill_log.jsonl, distill_metrics.json).",
)
@click.option(
    "--teacher-audio",
    metavar="SPEC",
    help="Audio teacher: a store in FEATS / .h5 path (cached states), a "
    "wav2vec2-family transformers model (folder or hub id, run live) or a fine-tuned whisper_ft "
    "experiment EXP (or EXP/folds/FOLD/seedS).",
)
@click.option(
    "--teacher-text",
    metavar="SPEC",
    help="Text teacher: a store in FEATS / .h5 path, a BERT-family model or a fine-tuned text_ft "
    "experiment EXP (or EXP/folds/FOLD/seedS).",
)
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="YAML with student / distill sections (an EXP/distill.yaml works too).",
)
@click.option(
    "--set",
    "sets",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override, e.g. distill.kappa=0.1, student.modalities=[text].",
)
@click.option("--finetune", "--finetune-only", "finetune", is_flag=True, hidden=True)
@click.option("--overwrite", is_flag=True, help="Delete EXP first.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or per-epoch lines.")
@_fail_cleanly
def distill(feats, exp, teacher_audio, teacher_text, config_file, sets, finetune, overwrite, quiet):
    """Cross-modal distillation (CMD, Kim & Kang 2022): distil frozen speech and text teachers into
    small student transformers with a per-time-step contrastive loss, keeping the student with
    the lowest validation loss.  Fine-tune it for emotion classification with the train stage:
    sertool train FEATS -m cmd --init EXP --protocol ... -o EXP_FT.

    Example: sertool distill feats/rav -o exp/rav-cmd --teacher-audio whisper --teacher-text bert
    """
    from sertool.distill import run_distill

    if finetune:
        raise click.UsageError(
            f"fine-tuning is the train stage's: sertool train {feats} -m cmd --init {exp} "
            "--protocol ... -o EXP_FT (evaluate and predict as any experiment)"
        )
    log = (lambda s: None) if quiet else click.echo
    m = run_distill(
        feats,
        exp,
        teacher_audio=teacher_audio,
        teacher_text=teacher_text,
        config_file=config_file,
        overrides=list(sets),
        overwrite=overwrite,
        progress=not quiet,
        log=log,
    )
    click.echo(
        f"{exp}: student from epoch {m['best_epoch']}, val loss {m['best_val_loss']:.4f} "
        f"(parameters {m['parameters']['student']})"
    )


# ----------------------------------------------------------------------------------- predict
@cli.command(context_settings=CONTEXT)
@click.argument("paths", nargs=-1, metavar="[EXP] WAV_DIR")
@click.option(
    "--model",
    metavar="NAME|EXP",
    help="A packaged model (see --list-models) or an experiment folder; default: the packaged default.",
)
@click.option(
    "--list-models", is_flag=True, help="List the packaged models with their measured UA and speed, and exit."
)
@click.option(
    "-o",
    "--out",
    default="-",
    show_default=True,
    metavar="FILE",
    help="predictions.csv, predictions.jsonl, or - for stdout (CSV).",
)
@click.option(
    "--transcripts",
    type=click.Path(dir_okay=False, path_type=Path),
    metavar="FILE",
    help="Text per file for models with a text input: csv/tsv with columns file, text.",
)
@click.option("--asr", metavar="MODEL", help="Transcribe files that have no text (e.g. tiny.en, packaged, offline).")
@click.option(
    "--asr-beam",
    default=1,
    show_default=True,
    type=click.IntRange(1),
    metavar="N",
    help="ASR beam size (1 = greedy, fastest; sertool extract uses 5).",
)
@click.option("--segments", is_flag=True, help="Also write one row per segment of files longer than --window.")
@click.option(
    "--speaker-from",
    metavar="parent|csv:FILE|regex:PATTERN",
    help="Who speaks in each file (folder name; table path,speaker; regex group on the relative path): "
    "each speaker's features normalised with the speaker's own statistics (models trained with "
    "data.normalize.audio=speaker).",
)
@click.option(
    "--window",
    default=30.0,
    show_default=True,
    type=click.FloatRange(min=1.0),
    help="Seconds: longer files are cut at their speech (--vad) into segments no longer than this.",
)
@click.option(
    "--vad",
    default="energy",
    show_default=True,
    type=click.Choice(["energy", "silero", "auto", "off"]),
    help="How files longer than --window are cut: voice activity by frame energy, by Silero VAD "
    "(pip install silero-vad; auto = silero when installed), or off = equal windows.",
)
@click.option(
    "--plot",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="One PNG per file longer than --window: emotion probabilities over time above the waveform.",
)
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1), help="Segments per model call.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option(
    "--threads",
    type=click.IntRange(1),
    help="CPU threads for the model, its extractors and --asr (torch, CTranslate2); default: torch's own, 4 for ASR.",
)
@click.option(
    "--format", "fmt", type=click.Choice(["csv", "jsonl"]), help="Output format (default: from the file name)."
)
@click.option(
    "--uncertain-below",
    default=0.4,
    show_default=True,
    type=click.FloatRange(0.0, 1.0),
    metavar="P",
    help="uncertain=true on rows whose top probability is below P (docs/predict.md says why 0.4).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted run: skip the files already in the output.")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar or summary.")
@_fail_cleanly
def predict(
    paths,
    model,
    list_models,
    out,
    transcripts,
    asr,
    asr_beam,
    segments,
    speaker_from,
    window,
    vad,
    plot,
    batch_size,
    device,
    threads,
    fmt,
    uncertain_below,
    resume,
    overwrite,
    quiet,
):
    """Predict the emotion of every recording in WAV_DIR (recursive; or one audio file) with the
    model of EXP (an experiment folder, or --model NAME: a packaged model), or with the packaged
    default model when both are left out (--list-models shows them).

    The features the model was trained on are recomputed with the same extractors and
    normalisation. Rows are written as files finish; --resume continues an interrupted run. A
    file that cannot be processed gets a row with its `error` and the run goes on; the exit
    status is then 3 and the last stderr line gives their number (1 = fatal error, 2 = usage
    error). Example:
    sertool predict exp/rav-probe recordings/ -o predictions.csv
    """
    from sertool.predict import format_model_cards, model_cards, run_predict

    if list_models:
        click.echo(format_model_cards(model_cards()))
        return
    if not paths:
        raise click.UsageError("missing WAV_DIR: sertool predict [EXP] WAV_DIR (or --list-models)")
    if len(paths) > 2:
        raise click.UsageError(f"expected [EXP] WAV_DIR, got {len(paths)} arguments")
    exp, wav_dir = (None, paths[0]) if len(paths) == 1 else paths
    if model is not None:
        if exp is not None:
            raise click.UsageError(f"give the model once: EXP ({exp}) or --model ({model}), not both")
        exp = model
    if exp is None and (Path(wav_dir) / "predictor.json").exists():
        raise click.UsageError(
            f"{wav_dir} is an experiment folder; give the recordings too: sertool predict EXP WAV_DIR"
        )
    log = (lambda s: None) if quiet else (lambda s: click.echo(s, err=True))
    try:
        report = run_predict(
            exp,
            wav_dir,
            out,
            transcripts=transcripts,
            asr=asr,
            asr_beam=asr_beam,
            segments=segments,
            speaker_from=speaker_from,
            vad=vad,
            plot=plot,
            window=window,
            batch_size=batch_size,
            device=device,
            threads=threads,
            uncertain_below=uncertain_below,
            fmt=fmt,
            resume=resume,
            overwrite=overwrite,
            progress=not quiet,
            log=log,
        )
    except BrokenPipeError:  # `sertool predict ... | head`: the reader has gone, stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
    log(
        f"{report.n_done} file(s) predicted ({report.audio_seconds:.1f} s of audio, {report.seconds:.1f} s, "
        f"{report.real_time_factor:.0f}x real time)"
        + (f", {report.n_skipped} already done" if report.n_skipped else "")
        + (f" -> {report.output}" if report.output != "-" else "")
    )
    if report.asr:
        log("ASR: " + ", ".join(f"{k} {v}" for k, v in report.asr.items()))
    if report.n_failed:  # always said (also with -q), as the last line on stderr
        click.echo(f"{report.n_failed} file(s) failed (see the error column)", err=True)
        sys.exit(report.exit_status)


# ----------------------------------------------------------------------------------- export
@cli.command(context_settings=CONTEXT)
@click.argument("exp", type=click.Path(file_okay=False, path_type=Path), required=False)
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="model.onnx (ONNX) or model.pt (TorchScript).",
)
@click.option("--opset", default=17, show_default=True, type=click.IntRange(9), help="ONNX opset.")
@click.option("--no-check", is_flag=True, help="Do not check that the exported model gives the same outputs.")
@_fail_cleanly
def export(exp, out, opset, no_check):
    """Export the classifier of EXP (default: the packaged model) for deployment, with the
    normalisation built in: inputs are the raw features + masks, outputs the probabilities.

    Writes OUT and OUT.json (inputs, classes, feature provenance); checks that the exported
    model gives the same outputs as the PyTorch model."""
    from sertool.export import run_export

    info = run_export(exp, out, opset=opset, check=not no_check)
    click.echo(
        f"{out}: {info['format']}, inputs {', '.join(info['input_names'])}; outputs {info['output']}"
        + (f"; max abs difference to PyTorch {info['check']['max_abs_diff']:.2e}" if info.get("check") else "")
    )


def main() -> None:
    cli(prog_name="sertool")


if __name__ == "__main__":
    main()
