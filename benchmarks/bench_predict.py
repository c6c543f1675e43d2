"""Speed of `sertool predict` end to end: files/s, real-time factor, start-up, peak memory.

    python benchmarks/bench_predict.py                                  # every packaged model, 1,440 RAVDESS files
    python benchmarks/bench_predict.py --model ravdess-mfcc --limit 200   # one packaged model, 200 files
    python benchmarks/bench_predict.py --model ravdess-mfcc --long-file   # + one 10-minute recording (VAD)
    python benchmarks/bench_predict.py --exp EXP --asr tiny.en --limit 200   # a text model with ASR
    python benchmarks/bench_predict.py --data DIR --threads 1 --json out.json

Each case runs the real command in a fresh process (``python -m sertool predict [EXP] DATA -o
OUT.csv -q``), so the figures include Python and torch start-up, model loading, audio decoding,
feature extraction, normalisation, the model and writing the CSV:

* ``first_prediction_s``: from starting the process until the first data row is in the
  output file (polled every 5 ms; rows are flushed as each batch of files finishes);
* ``files_per_s`` and ``real_time_factor`` (seconds of audio / wall seconds) over the whole run,
  start-up included; ``steady_rtf`` excludes the time to the first row;
* ``peak_rss_mb``: the child process's maximum resident memory (getrusage);
* ``cpu_s``: user + system CPU seconds of the child: on a shared, loaded machine wall time
  depends on the other processes, CPU time much less, so both are reported, with the load
  average before and after.

``--limit N`` predicts the first N files only (copied as symbolic links to a temporary folder).
``--model NAME`` (repeatable) picks packaged models; without it and without ``--exp`` every
packaged model is measured.  ``--long-file`` adds, per model, one 10-minute recording: RAVDESS
clips of the data folder joined by 1-4 s pauses with faint noise (speech-like synthetic bursts
when there is no data), predicted with the default voice activity segmentation and ``--segments``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_DATA = ROOT.parent / "shared" / "data" / "ravdess"


def audio_seconds(files: list[Path]) -> float:
    import soundfile as sf

    return sum(sf.info(str(f)).duration for f in files)


def run_case(name: str, model_args: list[str], data: Path, extra: list[str], threads: int | None) -> dict:
    """One `sertool predict` process; ``model_args``: [EXP], ["--model", NAME] or [] (the default)."""
    from sertool.predict import find_inputs

    files = find_inputs(data)
    seconds = audio_seconds(files)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "pred.csv"
        cmd = [
            sys.executable,
            "-m",
            "sertool",
            "predict",
            *model_args,
            str(data),
            "-o",
            str(out),
            "-q",
            *extra,
        ]
        env = dict(os.environ)
        if threads:
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        load0 = os.getloadavg()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        first = None
        while proc.poll() is None:
            if first is None and out.exists():
                with open(out, encoding="utf-8") as f:
                    if len(f.readlines()) >= 2:
                        first = time.perf_counter() - t0
            time.sleep(0.005)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        stderr = proc.stderr.read()
        rows = out.read_text(encoding="utf-8").splitlines()[1:] if out.exists() else []
    if first is None and rows:
        first = wall
    n_err = sum(1 for r in rows if not r.endswith(","))  # the error column is last
    return {
        "case": name,
        "exp": " ".join(model_args) or "(packaged default)",
        "files": len(files),
        "rows": len(rows),
        "errors": n_err,
        "exit_status": proc.returncode,
        "audio_s": round(seconds, 1),
        "wall_s": round(wall, 2),
        "first_prediction_s": round(first, 2) if first is not None else None,
        "files_per_s": round(len(files) / wall, 1),
        "real_time_factor": round(seconds / wall, 1),
        "steady_rtf": round(seconds / max(wall - (first or 0), 1e-9), 1),
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 2),
        "peak_rss_mb": round(after.ru_maxrss / 1024, 1),
        "load_avg_before_after": [round(load0[0], 2), round(os.getloadavg()[0], 2)],
        "cpus": os.cpu_count(),
        "extra_args": extra,
        "stderr_tail": stderr[-300:] if proc.returncode else "",
    }


def limited(data: Path, n: int, tmp: Path) -> Path:
    from sertool.predict import find_inputs

    for f in find_inputs(data)[:n]:
        link = tmp / f.relative_to(data)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f.resolve())
    return tmp


def long_recording(data: Path, out: Path, seconds: float = 600.0, seed: int = 0) -> Path:
    """A 10-minute mono 16 kHz recording: RAVDESS clips joined by 1-4 s pauses, faint noise."""
    import numpy as np
    import soundfile as sf

    from sertool.audio import load_audio
    from sertool.predict import find_inputs

    rng = np.random.default_rng(seed)
    sr, parts, total = 16000, [], 0
    clips = find_inputs(data) if data.exists() else []
    k = 0
    while total < seconds * sr:
        pause = np.zeros(int(rng.uniform(1.0, 4.0) * sr), np.float32)
        if clips:
            clip = load_audio(clips[k % len(clips)], sr)[0]
        else:  # an amplitude-modulated 180 Hz tone: speech-like enough for the energy VAD
            t = np.arange(int(rng.uniform(2.0, 5.0) * sr)) / sr
            clip = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
        parts += [pause, clip]
        total += len(pause) + len(clip)
        k += 1
    x = np.concatenate(parts)[: int(seconds * sr)]
    x = x + 0.002 * rng.standard_normal(len(x)).astype(np.float32)
    out.mkdir(parents=True, exist_ok=True)
    sf.write(out / "ten_minutes.wav", x, sr)
    return out


def main() -> None:
    from sertool.predict import packaged_models

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exp", help="experiment folder")
    ap.add_argument("--model", action="append", help="a packaged model (repeatable; default: all of them)")
    ap.add_argument("--long-file", action="store_true", help="also a 10-minute recording per model")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help=f"audio folder (default {DEFAULT_DATA})")
    ap.add_argument("--limit", type=int, help="only the first N files")
    ap.add_argument("--asr", help="--asr MODEL for a text model (e.g. tiny.en)")
    ap.add_argument("--threads", type=int, help="OMP/MKL threads of the predict process")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="further `sertool predict` options")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    if not args.data.exists():
        sys.exit(f"{args.data} does not exist (give --data DIR)")
    extra = [*(["--asr", args.asr] if args.asr else []), *args.extra]
    prefix = "asr+" if args.asr else ""
    models = [(prefix + Path(args.exp).name, [args.exp])] if args.exp else []
    models += [(prefix + m, ["--model", m]) for m in (args.model or ([] if args.exp else packaged_models()))]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        data = limited(args.data, args.limit, Path(tmp) / "data") if args.limit else args.data
        long_dir = long_recording(args.data, Path(tmp) / "long") if args.long_file else None
        for name, exp in models:
            results.append(run_case(name, exp, data, extra, args.threads))
            if long_dir is not None:
                results.append(run_case(name + " 10-min file", exp, long_dir, [*extra, "--segments"], args.threads))
    print(json.dumps(results, indent=2))
    print(
        "\n| case | files | audio | wall | first prediction | files/s | x real time | CPU s | peak RSS |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    for r in results:
        print(
            f"| {r['case']} | {r['files']} | {r['audio_s']:.0f} s | {r['wall_s']:.1f} s | "
            f"{r['first_prediction_s']} s | {r['files_per_s']} | {r['real_time_factor']} | "
            f"{r['cpu_s']} | {r['peak_rss_mb']:.0f} MB |"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
