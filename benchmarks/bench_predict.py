"""Speed of `sertool predict` end to end: files/s, real-time factor, start-up, peak memory.

    python benchmarks/bench_predict.py                                  # default model, RAVDESS copy
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


def run_case(name: str, exp: str | None, data: Path, extra: list[str], threads: int | None) -> dict:
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
            *([exp] if exp else []),
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
        "exp": exp or "(packaged default)",
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exp", help="experiment folder (default: the packaged default model)")
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
    with tempfile.TemporaryDirectory() as tmp:
        data = limited(args.data, args.limit, Path(tmp)) if args.limit else args.data
        name = ("asr+" if args.asr else "") + (Path(args.exp).name if args.exp else "default")
        result = run_case(name, args.exp, data, extra, args.threads)
    print(json.dumps(result, indent=2))
    print(
        f"\n| case | files | audio | wall | first prediction | files/s | x real time | CPU s | peak RSS |\n"
        f"|---|---|---|---|---|---|---|---|---|\n"
        f"| {result['case']} | {result['files']} | {result['audio_s']:.0f} s | {result['wall_s']:.1f} s | "
        f"{result['first_prediction_s']} s | {result['files_per_s']} | {result['real_time_factor']} | "
        f"{result['cpu_s']} | {result['peak_rss_mb']:.0f} MB |"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
