"""Real-time factors of the acoustic extractors on the RAVDESS copy, measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_acoustic.py [RAVDESS_DIR] [--limit N]

RTF = seconds of audio per wall-clock second of extraction on one core (BLAS/FFT threads
pinned to 1); audio loading is excluded (files are read once before timing). Each extractor
is warmed up on one file (tables, openSMILE start-up), then timed over all files.
"""

from __future__ import annotations

import argparse
import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(ROOT / ".." / "shared" / "data" / "ravdess"))
    parser.add_argument("--limit", type=int, default=100, help="number of files (0 = all)")
    parser.add_argument("--features", default="mfcc,covarep,egemaps")
    args = parser.parse_args()

    from sertool.audio import load_audio
    from sertool.features.base import build_extractor

    files = sorted(Path(args.data).rglob("*.flac")) + sorted(Path(args.data).rglob("*.wav"))
    if args.limit:
        files = files[: args.limit]
    if not files:
        raise SystemExit(f"no audio under {args.data}")
    waves = [load_audio(f, 16000)[0] for f in files]
    seconds = sum(w.size for w in waves) / 16000
    print(
        f"{len(files)} files, {seconds:.1f} s of audio, {platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}, 1 thread"
    )
    rtf = {}
    for name in args.features.split(","):
        try:
            ex = build_extractor(name)
        except Exception as e:  # noqa: BLE001 - an optional dependency may be missing
            print(f"{name:10s} unavailable: {e}")
            continue
        ex.extract(None, waves[0])
        start = time.process_time()
        wall = time.perf_counter()
        for w in waves:
            ex.extract(None, w)
        cpu = time.process_time() - start
        wall = time.perf_counter() - wall
        rtf[name] = seconds / cpu
        print(f"{name:10s} {seconds / cpu:9.1f} x real time per core (CPU time {cpu:.2f} s, wall {wall:.2f} s)")
    if "covarep" in rtf and "egemaps" in rtf:
        print(f"covarep / egemaps speed ratio: {rtf['covarep'] / rtf['egemaps']:.2f}")


if __name__ == "__main__":
    main()
