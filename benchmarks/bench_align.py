"""Benchmarks of the align stage.

    python benchmarks/bench_align.py tensors            # 20,000 utterances x 50 words (COVAREP-74, GloVe-300)
    python benchmarks/bench_align.py tensors --utts 2000 --keep /tmp/feats
    python benchmarks/bench_align.py forced             # RTF and boundary agreement of each aligner
    python benchmarks/bench_align.py all

``tensors`` writes a synthetic features folder in the sertool store format (manifest with corpus
word timings, an audio store of 74-d frames at 100 Hz, a GloVe-like text store of 300-d rows
with ``word_index``), then runs `run_align` (one process; ``--nj N`` for worker processes) in a fresh subprocess and
reports its wall time, the CPU time of it and its workers, and the peak resident memory
(``ru_maxrss``) of the main process and of the largest worker (total: at most main + nj x worker).
Worker processes pay off for forced alignment, not here: passing the blocks back costs more CPU
than the reduction itself (measured: --nj 2 37 s and 30 s CPU against 27 s and 17.5 s CPU). Words
last ``--word-s`` seconds (0.3 s: 15 s utterances, 1,500 frames) so the audio store holds
N x 1,500 x 74 float32 (8.9 GB for 20,000 utterances); the stores are written straight with
h5py (a benchmark fixture, not the crash-safe writer). The stores were just written, so the
figures are with a warm page cache; the first run after a reboot reads the disk as well.

``forced`` synthesises espeak-ng sentences one word at a time (exact word boundaries,
`sertool.timings.synthesize_speech`), with pauses of 50-250 ms between words and with none,
and aligns them with each aligner: real-time factor (alignment seconds / audio seconds, model
loading excluded) and the share of word starts and ends within 100 ms (and 50 ms) of the truth;
a sentence an aligner fails on counts as all its boundaries missed. ``whisper-raw`` is the
Whisper aligner without its energy refinement (find_alignment's DTW boundaries as they are);
``auto`` is pocketsphinx with Whisper where it fails.
The wav2vec2 row uses a randomly initialised wav2vec2-base-sized CTC model (no trained CTC model
can be downloaded here): its speed is that of the real model, its accuracy is meaningless and
not reported.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SENTENCES = [
    "kids are talking by the door",
    "dogs are sitting by the door",
    "the quick brown fox jumps over the lazy dog while seven happy children are talking",
    "she sells sea shells on the sea shore every single morning before breakfast",
    "I never said she stole my money yesterday afternoon in the kitchen",
    "please call stella and ask her to bring these things with her from the store",
    "we also need a small plastic snake and a big toy frog for the kids",
    "when the sunlight strikes raindrops in the air they act as a prism and form a rainbow",
]


# ---------------------------------------------------------------------------- tensors
def write_feats(
    root: Path, n_utts: int, n_words: int, word_s: float, da: int = 74, dt: int = 300, seed: int = 0
) -> dict:
    import h5py

    from sertool.corpora.base import Utterance, write_manifest
    from sertool.store import FORMAT, FORMAT_VERSION, _encode_attrs

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rate = 100.0
    n_frames = int(round((n_words * word_s + 0.5) * rate))
    utts = []
    base = {"format": FORMAT, "format_version": FORMAT_VERSION, "dtype": "float32", "corpus": "bench"}
    fa = h5py.File(root / "covarep.h5", "w")
    ft = h5py.File(root / "glove.h5", "w")
    _encode_attrs(
        fa.attrs,
        {
            **base,
            "feature": "covarep",
            "kind": "audio",
            "dim": da,
            "frame_rate_hz": rate,
            "extractor": {"name": "covarep", "params": {"synthetic": True}},
        },
    )
    _encode_attrs(
        ft.attrs,
        {
            **base,
            "feature": "glove",
            "kind": "text",
            "dim": dt,
            "unit": "token",
            "extractor": {"name": "glove", "params": {"synthetic": True}},
        },
    )
    ga, gt = fa.create_group("utts"), ft.create_group("utts")
    block_a = rng.standard_normal((n_frames, da)).astype(np.float32)  # contents do not matter for speed
    block_t = rng.standard_normal((n_words, dt)).astype(np.float32)
    word_index = np.arange(n_words, dtype=np.int32)
    tokens = json.dumps([f"w{j}" for j in range(n_words)])
    for i in range(n_utts):
        uid = f"utt{i:06d}"
        starts = 0.25 + np.arange(n_words) * word_s + rng.uniform(0, 0.1 * word_s, n_words)
        ends = starts + word_s * rng.uniform(0.3, 0.85, n_words)  # pauses between words, as in speech
        words = [[f"w{j}", round(float(s), 3), round(float(e), 3)] for j, (s, e) in enumerate(zip(starts, ends))]
        utts.append(
            Utterance(
                id=uid,
                audio=f"/nonexistent/{uid}.wav",
                duration=n_frames / rate,
                text=" ".join(w[0] for w in words),
                label="neutral" if i % 2 else "happy",
                score=float(i % 7 - 3),
                words=words,
                split="train",
            )
        )
        ga.create_dataset(uid, data=block_a + np.float32(i % 13))
        ds = gt.create_dataset(uid, data=block_t)
        ds.attrs["word_index"] = word_index
        ds.attrs["tokens"] = tokens
        ds.attrs["__json__"] = '["tokens"]'
    fa.close()
    ft.close()
    write_manifest(utts, root / "manifest.jsonl")
    return {
        "frames_per_utt": n_frames,
        "audio_gb": n_utts * n_frames * da * 4 / 1e9,
        "text_gb": n_utts * n_words * dt * 4 / 1e9,
    }


_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, {root!r})
t0 = time.perf_counter()
from sertool.align import run_align
t1 = time.perf_counter()
r = run_align({feats!r}, "covarep", "glove", length=50, timings="corpus", nj={nj}, progress=False, log=lambda m: None)
t2 = time.perf_counter()
u, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print(json.dumps({{"import_s": t1 - t0, "align_s": t2 - t1, "aligned": r.n_aligned, "dropped": len(r.dropped),
                  "cpu_s": u.ru_utime + u.ru_stime + c.ru_utime + c.ru_stime, "nj": {nj},
                  "peak_rss_mb": u.ru_maxrss / 1024, "worker_peak_rss_mb": c.ru_maxrss / 1024,
                  "out_gb": __import__("os").path.getsize(r.path) / 1e9}}))
"""


def bench_tensors(n_utts: int, n_words: int, word_s: float, keep: str | None, nj: int = 2) -> dict:
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bench_align_"))
    try:
        if not (root / "manifest.jsonl").exists():
            t = time.perf_counter()
            sizes = write_feats(root, n_utts, n_words, word_s)
            sizes["write_s"] = time.perf_counter() - t
        else:
            sizes = {}
        code = _CHILD.format(root=str(ROOT), feats=str(root), nj=nj)
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        result.update(sizes, utts=n_utts, words=n_words, word_s=word_s)
        return result
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


# ---------------------------------------------------------------------------- forced
def _tiny_base_ctc(folder: Path) -> str:
    import torch
    import transformers

    vocab = {"<pad>": 0, "|": 1, **{c: i + 2 for i, c in enumerate("ABCDEFGHIJKLMNOPQRSTUVWXYZ'")}}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    transformers.Wav2Vec2CTCTokenizer(str(folder / "vocab.json"), pad_token="<pad>").save_pretrained(folder)
    transformers.Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(folder)
    torch.manual_seed(0)
    transformers.Wav2Vec2ForCTC(transformers.Wav2Vec2Config(vocab_size=len(vocab), pad_token_id=0)).save_pretrained(
        folder
    )
    return str(folder)


def bench_forced(aligners: list[str], threads: int) -> list[dict]:
    import torch

    from sertool.timings import make_aligner, synthesize_speech

    torch.set_num_threads(threads)
    rows = []
    for pauses, label in (((0.05, 0.25), "pauses 50-250 ms"), ((0.0, 0.0), "no pauses")):
        data = [(s.split(), *synthesize_speech(s.split(), seed=i, pause_s=pauses)) for i, s in enumerate(SENTENCES)]
        audio_s = sum(len(w) for _, w, _ in data) / 16000
        for name in aligners:
            tmp = None
            try:
                t = time.perf_counter()
                if name == "wav2vec2":
                    tmp = Path(tempfile.mkdtemp(prefix="bench_ctc_"))
                    aligner = make_aligner(name, _tiny_base_ctc(tmp), device="cpu")
                elif name == "whisper-raw":  # DTW boundaries as find_alignment gives them, no energy refinement
                    aligner = make_aligner("whisper", device="cpu")
                    aligner.refine = False
                else:
                    aligner = make_aligner(name, device="cpu")
                load_s = time.perf_counter() - t
                errors, t_align, failed = [], 0.0, 0
                for words, wave, truth in data:
                    t = time.perf_counter()
                    try:
                        spans = aligner.align(wave, words).spans
                    except Exception:  # noqa: BLE001 - counted: its words count as misses below
                        spans, failed = np.full_like(truth, np.inf), failed + 1
                    t_align += time.perf_counter() - t
                    errors.append(np.abs(spans - truth).ravel())
                err = np.concatenate(errors)
                row = {
                    "aligner": name,
                    "speech": label,
                    "audio_s": round(audio_s, 1),
                    "load_s": round(load_s, 2),
                    "rtf": round(t_align / audio_s, 3),
                    "failed": f"{failed}/{len(data)}",
                }
                if name != "wav2vec2":
                    row.update(
                        within_100ms=round(float((err < 0.1).mean()), 3),
                        within_50ms=round(float((err < 0.05).mean()), 3),
                        median_error_ms=round(float(np.median(err)) * 1000, 1),
                    )
                else:
                    row["failed"] = "n/a"
                rows.append(row)
            except Exception as e:  # noqa: BLE001 - report and go on with the other aligners
                rows.append({"aligner": name, "speech": label, "error": f"{type(e).__name__}: {e}"})
            finally:
                if tmp:
                    shutil.rmtree(tmp, ignore_errors=True)
            print(json.dumps(rows[-1]), file=sys.stderr)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["tensors", "forced", "all"])
    p.add_argument("--utts", type=int, default=20000)
    p.add_argument("--words", type=int, default=50)
    p.add_argument("--word-s", type=float, default=0.3, help="seconds per word (0.3: 15 s utterances)")
    p.add_argument("--keep", help="features folder to write (and reuse) instead of a temporary one")
    p.add_argument("--aligners", nargs="+", default=["whisper", "whisper-raw", "pocketsphinx", "auto", "wav2vec2"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--nj", type=int, default=1, help="align worker processes for `tensors`")
    args = p.parse_args()
    env = {"python": platform.python_version(), "cpus": os.cpu_count(), "machine": platform.machine()}
    if args.what in ("tensors", "all"):
        r = bench_tensors(args.utts, args.words, args.word_s, args.keep, args.nj)
        print(json.dumps({"bench": "tensors", **env, **r}))
        print(
            f"\n| utterances | words | nj | align wall time | CPU time (all processes) | peak RSS main / worker |\n"
            f"|---|---|---|---|---|---|\n"
            f"| {r['utts']:,} | {r['words']} | {r['nj']} | {r['align_s']:.1f} s | {r['cpu_s']:.1f} s | "
            f"{r['peak_rss_mb'] / 1024:.2f} / {r['worker_peak_rss_mb'] / 1024:.2f} GB |\n"
        )
    if args.what in ("forced", "all"):
        rows = bench_forced(args.aligners, args.threads)
        print("| aligner | speech | audio s | load s | RTF | failed | within 100 ms | within 50 ms | median error ms |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if "error" in r:
                print(f"| {r['aligner']} | {r['speech']} | error: {r['error']} |||||")
            else:
                print(
                    f"| {r['aligner']} | {r['speech']} | {r['audio_s']} | {r['load_s']} | {r['rtf']} | {r['failed']} | "
                    f"{r.get('within_100ms', 'n/a')} | {r.get('within_50ms', 'n/a')} | {r.get('median_error_ms', 'n/a')} |"  # noqa: E501
                )


if __name__ == "__main__":
    main()
