"""Forward+backward time per batch on CPU and peak memory for every sertool model at its paper's
input sizes, compared (in the same run) with the same model whose attention modules are replaced
by plain ``torch.nn.MultiheadAttention``.

    python benchmarks/bench_models.py                 # all models, markdown table on stdout
    python benchmarks/bench_models.py --models lgcct cma --repeats 5 --threads 2

Each (model, attention) row runs in a fresh subprocess so that the peak resident set size
(``resource.getrusage(...).ru_maxrss``) belongs to that row alone; "peak MB" is the process peak
and "+MB" the increase over the process after importing torch and building the model inputs
(i.e. weights, activations, gradients and optimiser-free backward buffers).  "CPU s/batch" is
the process CPU time (all threads) per batch, less sensitive than wall time to other processes
on a shared machine; "load" is the 1-minute load average when the row finished.

The nn.MultiheadAttention variant computes exactly the same function where the model's attention
is plain scaled dot-product attention (self_attn, cross_attn, cma, cmd_student).  For lgcct
(length scaling) and ks_transformer (key-sparse top-k) it is the dense attention *without* those
options, i.e. the cost of the options themselves ("approx." in the table).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# paper input sizes: batch, {modality: (frames, dim)}, notes
SIZES = {
    "lgcct": (24, {"audio": (50, 74), "text": (50, 300)}, "CMU-MOSEI aligned n=50, COVAREP-74, GloVe-300"),
    "ks_transformer": (32, {"audio": (460, 512), "text": (20, 1024)}, "wav2vec 460x512, RoBERTa-large 20x1024"),
    "self_attn": (32, {"audio": (1000, 120), "text": (128, 300), "visual": (32, 2048)}, "fixed lengths 1000/128/32"),
    "cross_attn": (32, {"audio": (1000, 120), "text": (128, 300), "visual": (32, 2048)}, "fixed lengths 1000/128/32"),
    "cma": (32, {"audio": (250, 768), "text": (50, 768)}, "5 s of wav2vec2-base frames (50 Hz), 50 BERT tokens"),
    "cmd_student": (32, {"audio": (250, 512), "text": (50, 768)}, "5 s of wav2vec2 CNN features, 50 BERT embeddings"),
    "probe": (32, {"audio": (250, 768)}, "5 s of wav2vec2-base frames"),
}
EXACT = {"self_attn", "cross_attn", "cma", "cmd_student"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _swap_attention(model):
    """Replace every sertool MultiHeadAttention by an nn.MultiheadAttention adapter."""
    import torch.nn as nn

    from sertool.models.blocks import MultiHeadAttention

    class TorchMHA(nn.Module):
        def __init__(self, ours: MultiHeadAttention):
            super().__init__()
            E = ours.embed_dim
            kdim, vdim = ours.k_proj.in_features, ours.v_proj.in_features
            self.mha = nn.MultiheadAttention(
                E, ours.num_heads, dropout=ours.dropout, kdim=kdim, vdim=vdim, batch_first=True
            )

        def forward(self, query, key=None, value=None, query_mask=None, key_mask=None, return_attention=False):
            if key is None:
                key, key_mask = query, query_mask
            value = key if value is None else value
            out, _ = self.mha(
                query, key, value, key_padding_mask=None if key_mask is None else ~key_mask, need_weights=False
            )
            if query_mask is not None:
                out = out * query_mask[..., None].to(out.dtype)
            return out

    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, MultiHeadAttention):
                setattr(mod, cname, TorchMHA(child))
    return model


def run_one(key: str, variant: str, repeats: int, threads: int) -> dict:
    import torch

    from sertool.models import build_model, count_parameters

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    B, sizes, _ = SIZES[key]
    batch = {}
    for m, (T, D) in sizes.items():
        batch[m] = torch.randn(B, T, D)
        lengths = torch.randint(int(0.6 * T), T + 1, (B,))
        lengths[0] = T
        if key == "lgcct" and m == "text":
            batch[f"{m}_mask"] = batch["audio_mask"]  # word-aligned: same lengths
        else:
            batch[f"{m}_mask"] = torch.arange(T)[None] < lengths[:, None]
    model = build_model(key)
    n_params = count_parameters(model)
    if variant == "torch":
        model = _swap_attention(model)
    model.train()
    base = _rss_mb()
    times, cpu = [], []
    for i in range(repeats + 1):  # first = warm-up
        model.zero_grad(set_to_none=True)
        t0, c0 = time.perf_counter(), time.process_time()
        out = model(batch)
        out.float().square().mean().backward()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i:
            times.append(dt)
            cpu.append(dc)
    peak = _rss_mb()
    return {
        "key": key,
        "variant": variant,
        "params": n_params,
        "batch": B,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "cpu_s": statistics.median(cpu),
        "repeats": repeats,
        "peak_mb": peak,
        "delta_mb": peak - base,
        "threads": threads,
        "load1": os.getloadavg()[0],
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=list(SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("KEY", "VARIANT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.one[1], args.repeats, args.threads)))
        return
    import platform

    import torch

    rows = []
    load0 = os.getloadavg()
    for key in args.models:
        for variant in ("sertool", "torch"):
            if key == "probe" and variant == "torch":
                continue  # no attention
            cmd = [
                sys.executable,
                os.path.abspath(__file__),
                "--one",
                key,
                variant,
                "--repeats",
                str(args.repeats),
                "--threads",
                str(args.threads),
            ]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                print(res.stderr, file=sys.stderr)
                raise SystemExit(f"benchmark of {key}/{variant} failed")
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
            print(f"# done {key} {variant}: {rows[-1]['median_s']:.3f} s", file=sys.stderr)
    load1 = os.getloadavg()
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} after 1 warm-up; "
        f"load average (1/5/15 min) {load0[0]:.1f}/{load0[1]:.1f}/{load0[2]:.1f} at start, "
        f"{load1[0]:.1f}/{load1[1]:.1f}/{load1[2]:.1f} at end\n"
    )
    print(
        "| model | attention | params | batch | inputs | fwd+bwd wall s/batch (median) | min wall s | "
        "CPU s/batch | load | peak MB | +MB |"
    )
    print("|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        att = (
            "sertool"
            if r["variant"] == "sertool"
            else ("nn.MultiheadAttention" + ("" if r["key"] in EXACT else " (approx.)"))
        )
        inputs = ", ".join(f"{m} {T}x{D}" for m, (T, D) in SIZES[r["key"]][1].items())
        print(
            f"| {r['key']} | {att} | {r['params']:,} | {r['batch']} | {inputs} | {r['median_s']:.3f} | "
            f"{r['min_s']:.3f} | {r['cpu_s']:.3f} | {r['load1']:.1f} | {r['peak_mb']:.0f} | {r['delta_mb']:.0f} |"
        )


if __name__ == "__main__":
    main()
