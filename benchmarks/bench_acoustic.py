"""Real-time factors of the acoustic extractors on the RAVDESS copy, measured in one run.

    OMP_NUM_THREADS=1 python benchmarks/bench_acoustic.py [RAVDESS_DIR] [--limit N]
    OMP_NUM_THREADS=1 python benchmarks/bench_acoustic.py --cli 240 [--rounds 3]

In-process mode: RTF = seconds of audio per CPU second of extraction on one core (BLAS/FFT
threads pinned to 1); audio loading is excluded (files are read once before timing). Each
extractor is warmed up on one file (tables, openSMILE start-up), then timed over all files.

CLI mode (`--cli N`, the comparison of issue 22): `sertool extract -f covarep --nj 1` as a
subprocess on a folder of symlinks to the first N files, against openSMILE's eGeMAPSv02 LLDs
(`opensmile.Smile(...).process_file`, which decodes the file itself) on the same files in this
process, Smile built and warmed up before timing. The CLI's start-up (interpreter, imports,
building the extractor, manifest, store merge, log) is measured by the same command on the
first file alone: sertool's time per file is (T(N) - T(1)) / (N - 1), and start-up is T(1)
less one file's time. Rounds alternate which side runs first (load on a shared machine
drifts); CPU times are the child's rusage (user + system), wall times perf_counter. The ratio
printed is openSMILE time per file / sertool time per file: > 1 means sertool is faster.
"""

from __future__ import annotations

import argparse
import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import platform  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(ROOT / ".." / "shared" / "data" / "ravdess"))
    parser.add_argument("--limit", type=int, default=100, help="number of files (0 = all)")
    parser.add_argument("--features", default="mfcc,covarep,egemaps")
    parser.add_argument("--cli", type=int, default=0, metavar="N", help="CLI mode on the first N files (e.g. 240)")
    parser.add_argument("--rounds", type=int, default=3, help="CLI mode: rounds (medians are reported)")
    args = parser.parse_args()
    if args.cli:
        cli_ratio(Path(args.data), args.cli, args.rounds)
        return

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


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _run_cli(corpus: Path, out: Path) -> tuple[float, float]:
    """(wall, CPU) seconds of one `sertool extract -f covarep --nj 1` process from scratch."""
    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, "-m", "sertool", "extract", str(corpus), "--corpus", "ravdess"]
    command += ["-o", str(out), "-f", "covarep", "--nj", "1", "-q"]
    cpu, wall = _children_cpu(), time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.perf_counter() - wall, _children_cpu() - cpu


def _link_corpus(files: list[Path], data: Path, folder: Path) -> Path:
    """A corpus folder of symlinks to `files`, keeping their paths under `data`."""
    for f in files:
        link = folder / f.relative_to(data)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(f.resolve())
    return folder


def cli_ratio(data: Path, n: int, rounds: int) -> None:
    import soundfile as sf

    try:
        import opensmile
    except ImportError:
        raise SystemExit("CLI mode compares against openSMILE: pip install 'sertool[opensmile]'") from None

    files = sorted(data.rglob("*.flac"))[:n]
    if len(files) < 2:
        raise SystemExit(f"need at least 2 audio files under {data}")
    n = len(files)
    seconds = sum(sf.info(str(f)).duration for f in files)
    smile = opensmile.Smile(
        feature_set=opensmile.FeatureSet.eGeMAPSv02, feature_level=opensmile.FeatureLevel.LowLevelDescriptors
    )
    smile.process_file(str(files[0]))  # warm-up: openSMILE's start-up is not counted
    print(
        f"CLI mode: {n} files, {seconds:.1f} s of audio, {platform.processor() or platform.machine()}, "
        f"python {platform.python_version()}, 1 thread, {rounds} rounds, load average "
        f"{os.getloadavg()[0]:.1f} at start"
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_acoustic_") as tmp:
        tmp = Path(tmp)
        corpus_all = _link_corpus(files, data, tmp / "all")
        corpus_one = _link_corpus(files[:1], data, tmp / "one")
        for r in range(rounds):

            def sertool_side():
                one = _run_cli(corpus_one, tmp / "feats_one")
                every = _run_cli(corpus_all, tmp / "feats_all")
                return one, every

            def opensmile_side():
                cpu, wall = time.process_time(), time.perf_counter()
                for f in files:
                    smile.process_file(str(f))
                return time.perf_counter() - wall, time.process_time() - cpu

            if r % 2 == 0:
                (one, every), smile_t = sertool_side(), opensmile_side()
            else:
                smile_t = opensmile_side()
                one, every = sertool_side()
            row = {}
            for i, kind in enumerate(("wall", "cpu")):
                per_file = (every[i] - one[i]) / (n - 1)
                row[f"{kind}_sertool"] = per_file * n
                row[f"{kind}_startup"] = one[i] - per_file
                row[f"{kind}_opensmile"] = smile_t[i]
                row[f"{kind}_ratio"] = smile_t[i] / (per_file * n)
            rows.append(row)
            print(
                f"round {r + 1}: sertool CLI {every[0]:.2f} s wall / {every[1]:.2f} s CPU for {n} files "
                f"(1 file: {one[0]:.2f} / {one[1]:.2f}); start-up {row['wall_startup']:.2f} s wall / "
                f"{row['cpu_startup']:.2f} s CPU; without it {row['wall_sertool']:.2f} / {row['cpu_sertool']:.2f}; "
                f"openSMILE {smile_t[0]:.2f} / {smile_t[1]:.2f}; ratio opensmile/sertool "
                f"wall {row['wall_ratio']:.2f}, CPU {row['cpu_ratio']:.2f}",
                flush=True,
            )
    med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    print(
        f"median over {rounds} rounds, {n} files ({seconds:.1f} s of audio): sertool CLI without start-up "
        f"{med['wall_sertool']:.2f} s wall ({seconds / med['wall_sertool']:.1f}x real time), "
        f"{med['cpu_sertool']:.2f} s CPU; start-up {med['wall_startup']:.2f} s wall, {med['cpu_startup']:.2f} s CPU; "
        f"openSMILE {med['wall_opensmile']:.2f} s wall ({seconds / med['wall_opensmile']:.1f}x), "
        f"{med['cpu_opensmile']:.2f} s CPU"
    )
    each = {kind: ", ".join(f"{r[kind + '_ratio']:.2f}" for r in rows) for kind in ("wall", "cpu")}
    print(
        f"covarep CLI vs egemaps ratio (opensmile time / sertool time, > 1: sertool faster): "
        f"wall {med['wall_ratio']:.2f} (rounds {each['wall']}), CPU {med['cpu_ratio']:.2f} (rounds {each['cpu']})"
    )


if __name__ == "__main__":
    main()
