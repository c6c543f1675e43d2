"""Forward+backward time per batch on CPU and peak memory for every sertool model at its paper's
input sizes, compared (in the same run) with the same model whose attention modules are replaced
by plain ``torch.nn.MultiheadAttention``.

    python benchmarks/bench_models.py                 # all models, markdown table on stdout
    python benchmarks/bench_models.py --models lgcct cma --repeats 5 --threads 2
    python benchmarks/bench_models.py --versus-reference --rounds 5 --threads 1   # vs reference code
    PYTHONPATH=OLD_TREE python benchmarks/bench_models.py --outputs save old.pt    # then, in this tree:
    python benchmarks/bench_models.py --outputs compare old.pt                      # same outputs?

``--versus-reference`` trains self_attn, cross_attn, lgcct and ks_transformer side by side with
plain PyTorch renderings of their reference code (see ``_reference_models``): forward + backward
+ Adam step on the same batch, interleaved, medians; it prints wall and CPU ratios sertool /
reference (docs/models.md).

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


# ---------------------------------------------------------------------------- versus reference
# Plain PyTorch renderings of each paper's released configuration (built-in nn.GRU / nn.LSTM run
# unpacked over the padded batch, nn.MultiheadAttention, the released codes' layer layout), with
# the same parameter count as the sertool model they are timed against.  They ignore padding the
# way the released codes do (fixed-length zero-padded inputs; MulT: no masks; KS: key padding
# masks in the FEM and MIM only), so they set the cost an implementation of the paper needs.
VERSUS = {
    # key: (sertool overrides, batch, {modality: (frames, dim)})
    "self_attn": ([], 32, {"audio": (1000, 120), "text": (128, 300), "visual": (32, 2048)}),
    "cross_attn": ([], 32, {"audio": (1000, 120), "text": (128, 300), "visual": (32, 2048)}),
    # the released code's gate and pre-LN stacks: 423,005 parameters, as the reference
    "lgcct": (["model.gate_mode=linear_ln", "model.norm=pre"], 24, {"audio": (50, 74), "text": (50, 300)}),
    "ks_transformer": ([], 8, {"audio": (460, 512), "text": (20, 1024)}),
}


def _reference_models():
    """The reference classes (torch imported lazily, like the rest of the benchmark)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from sertool.models.blocks import sinusoidal_positions

    class RajanReference(nn.Module):
        """Rajan et al.: kernel-1 Conv1d over the fixed time axis (audio 1000 -> 500, visual 32 -> 25)
        + ReLU, BiGRU(60), 6-head attention (self or every ordered pair), mean over time, [mean, std]
        across the modality vectors, FC 60 + ReLU + dropout, FC classes."""

        def __init__(self, cross, dims, conv_out=(("audio", 1000, 500), ("visual", 32, 25)), hidden=60, heads=6):
            super().__init__()
            self.mods = tuple(dims)
            self.convs = nn.ModuleDict({m: nn.Conv1d(t, o, 1) for m, t, o in conv_out if m in dims})
            self.grus = nn.ModuleDict(
                {m: nn.GRU(d, hidden, batch_first=True, bidirectional=True) for m, d in dims.items()}
            )
            self.pairs = [(t, s) for t in self.mods for s in self.mods if (t != s) == cross]
            D = 2 * hidden
            self.attn = nn.ModuleDict(
                {f"{t}_{s}": nn.MultiheadAttention(D, heads, batch_first=True) for t, s in self.pairs}
            )
            self.fc = nn.Linear(2 * D, 60)
            self.out = nn.Linear(60, 7)

        def forward(self, batch):
            hs = {}
            for m in self.mods:
                x = batch[m]
                if m in self.convs:
                    x = F.relu(self.convs[m](x))
                hs[m] = F.dropout(self.grus[m](x)[0], 0.1, self.training)
            vecs = [self.attn[f"{t}_{s}"](hs[t], hs[s], hs[s], need_weights=False)[0].mean(1) for t, s in self.pairs]
            v = torch.stack(vecs, 1)
            z = torch.cat([v.mean(1), torch.sqrt(v.var(1, unbiased=False) + 1e-8)], -1)
            return self.out(F.dropout(F.relu(self.fc(z)), 0.1, self.training))

        def load_sertool(self, model):
            """Copy a sertool Rajan model's weights (fused in_proj from its q/k/v projections)."""
            sd = {}
            for k, v in model.state_dict().items():
                k = k.replace(".rnn.", ".").replace(".conv.", ".")
                for i, p in enumerate(("q_proj", "k_proj", "v_proj")):
                    if f".{p}." in k:
                        name = k.replace(f"{p}.", "in_proj_")
                        sd.setdefault(name, [None] * 3)[i] = v
                        break
                else:
                    sd[k] = v
            sd = {k: torch.cat(v) if isinstance(v, list) else v for k, v in sd.items()}
            self.load_state_dict(sd)
            return self

    class Layer(nn.Module):
        """One transformer layer on nn.MultiheadAttention (self or cross), pre- or post-LN."""

        def __init__(self, d, heads, ffn, kdim=None, pre=False, attn_dropout=0.0, dropout=0.1, relu_dropout=0.1):
            super().__init__()
            self.attn = nn.MultiheadAttention(d, heads, dropout=attn_dropout, kdim=kdim, vdim=kdim, batch_first=True)
            self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            self.fc1, self.fc2 = nn.Linear(d, ffn), nn.Linear(ffn, d)
            self.pre, self.dropout, self.relu_dropout = pre, dropout, relu_dropout

        def attend(self, q, k, v, key_padding_mask):
            return self.attn(q, k, v, key_padding_mask=key_padding_mask, need_weights=False)[0]

        def forward(self, x, memory=None, key_padding_mask=None, pos=None, mpos=None):
            h = self.norm1(x) if self.pre else x
            m = h if memory is None else (self.norm1(memory) if self.pre else memory)
            q = h if pos is None else h + pos
            k = m if mpos is None and memory is not None else (q if memory is None else m + mpos)
            x = x + F.dropout(self.attend(q, k, m, key_padding_mask), self.dropout, self.training)
            x = x if self.pre else self.norm1(x)
            h = self.norm2(x) if self.pre else x
            h = F.dropout(F.relu(self.fc1(h)), self.relu_dropout, self.training)
            x = x + F.dropout(self.fc2(h), self.dropout, self.training)
            return x if self.pre else self.norm2(x)

    class KeySparseLayer(Layer):
        """KS-Transformer layer: explicit softmax weights, per head the keys with the top half of the
        column sums kept (the released code's threshold, no renormalisation), dropout, weights @ V."""

        def __init__(self, *a, rate=0.5, **kw):
            super().__init__(*a, **kw)
            self.rate = rate

        def attend(self, q, k, v, key_padding_mask):
            a = self.attn
            B, Tq, E = q.shape
            H, dh = a.num_heads, E // a.num_heads
            if a._qkv_same_embed_dim:
                wq, wk, wv = a.in_proj_weight.chunk(3)
            else:
                wq, wk, wv = a.q_proj_weight, a.k_proj_weight, a.v_proj_weight
            bq, bk, bv = a.in_proj_bias.chunk(3)
            q = F.linear(q, wq, bq).view(B, Tq, H, dh).transpose(1, 2) * dh**-0.5
            k = F.linear(k, wk, bk).view(B, -1, H, dh).transpose(1, 2)
            v = F.linear(v, wv, bv).view(B, -1, H, dh).transpose(1, 2)
            w = q @ k.transpose(-1, -2)
            if key_padding_mask is not None:
                w = w.masked_fill(key_padding_mask[:, None, None, :], float("-inf"))
            w = w.softmax(-1)
            colsum = w.sum(-2, keepdim=True)
            kth = colsum.topk(max(1, int(self.rate * w.shape[-1])), dim=-1).values[..., -1:]
            w = F.dropout(w * (colsum >= kth), a.dropout, self.training)
            out = (w @ v).transpose(1, 2).reshape(B, Tq, E)
            return a.out_proj(out)

    class Stack(nn.Module):
        """Layers with the released codes' input processing: MulT (sqrt(d)-scaled inputs + positions,
        pre-LN, final LayerNorm) or KS (input LayerNorms, positions on every layer's q/k)."""

        def __init__(self, layers, style, d, kdim=None):
            super().__init__()
            self.layers, self.style = nn.ModuleList(layers), style
            cross = kdim is not None
            if style == "mult":
                self.final = nn.LayerNorm(d)
            else:
                self.norm_q = nn.LayerNorm(d)
                self.norm_k = nn.LayerNorm(kdim) if cross else None

        def forward(self, x, memory=None, key_padding_mask=None):
            d = x.shape[-1]
            pos = mpos = None
            if self.style == "mult":
                x = x * d**0.5 + sinusoidal_positions(x.shape[1], d)
                if memory is not None:
                    memory = memory * d**0.5 + sinusoidal_positions(memory.shape[1], d)
                x = F.dropout(x, 0.25, self.training)
                memory = None if memory is None else F.dropout(memory, 0.25, self.training)
            else:
                x = self.norm_q(x)
                pos = sinusoidal_positions(x.shape[1], d)
                if memory is not None:
                    memory = self.norm_k(memory)
                    mpos = sinusoidal_positions(memory.shape[1], memory.shape[-1])
            for layer in self.layers:
                x = layer(x, memory, key_padding_mask, pos, mpos)
            return self.final(x) if self.style == "mult" else x

    class LGCCTReference(nn.Module):
        """LGCCT released code (MulT-derived): CNN + BiLSTM and BiLSTM encoders, bias-free 1x1
        projections to 30, two 5-layer cross-modal pre-LN transformers, LayerNorm(Linear + Linear)
        gates, a 5-layer transformer on the 60-d concatenation, the last step, residual FC block."""

        def __init__(self, a_dim=74, t_dim=300, d=30, heads=5, layers=5):
            super().__init__()
            self.conv = nn.Sequential(
                nn.Conv1d(a_dim, 64, 3, padding=1), nn.ReLU(), nn.Conv1d(64, 64, 3, padding=1), nn.ReLU()
            )
            self.lstm_a = nn.LSTM(64, 16, batch_first=True, bidirectional=True)
            self.lstm_t = nn.LSTM(t_dim, 16, batch_first=True, bidirectional=True)
            self.proj_a, self.proj_t = nn.Linear(32, d, bias=False), nn.Linear(32, d, bias=False)

            def stack(width, attn_dropout, cross):
                kw = dict(kdim=width if cross else None, pre=True, attn_dropout=attn_dropout)
                return Stack([Layer(width, heads, 4 * width, **kw) for _ in range(layers)], "mult", width)

            self.cross_t, self.cross_a = stack(d, 0.0, True), stack(d, 0.1, True)
            self.gate_t = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d), nn.LayerNorm(d)])
            self.gate_a = nn.ModuleList([nn.Linear(d, d), nn.Linear(d, d), nn.LayerNorm(d)])
            self.trans = stack(2 * d, 0.1, False)
            self.proj1, self.proj2, self.out = nn.Linear(2 * d, 2 * d), nn.Linear(2 * d, 2 * d), nn.Linear(2 * d, 1)

        def forward(self, batch):
            xa = self.conv(batch["audio"].transpose(1, 2)).transpose(1, 2)
            xa = F.dropout(self.lstm_a(xa)[0], 0.5, self.training)
            xt = F.dropout(F.dropout(self.lstm_t(batch["text"])[0], 0.5, self.training), 0.25, self.training)
            pa, pt = self.proj_a(xa), self.proj_t(xt)
            ht, ha = self.cross_t(pt, pa), self.cross_a(pa, pt)
            ht = self.gate_t[2](self.gate_t[0](ht) + self.gate_t[1](pt))
            ha = self.gate_a[2](self.gate_a[0](ha) + self.gate_a[1](pa))
            z = self.trans(torch.cat([ht, ha], -1))[:, -1]
            z = z + self.proj2(F.dropout(F.relu(self.proj1(z)), 0.1, self.training))
            return self.out(z)

    class KSReference(nn.Module):
        """KS-Transformer released code: FEM (5 layers per modality), 3 CCABs each way (key-sparse
        cross then key-sparse self layer), the skip, DFM (2 key-sparse layers), average pooling,
        classifier (Da+Dt) -> /2 -> /4 -> 4; 8 heads, FFN 256 / 512, post-LN, dropout 0.1."""

        def __init__(self, da=512, dt=1024, ffn=(256, 512), heads=8):
            super().__init__()
            dims = {"audio": (da, ffn[0]), "text": (dt, ffn[1])}

            def stack(m, n, sparse, kdim=None):
                d, f = dims[m]
                cls = KeySparseLayer if sparse else Layer
                return Stack([cls(d, heads, f, kdim=kdim, attn_dropout=0.1) for _ in range(n)], "ks", d, kdim)

            self.fem = nn.ModuleDict({m: stack(m, 5, False) for m in dims})
            other = {"audio": "text", "text": "audio"}
            self.mim = nn.ModuleDict(
                {
                    m: nn.ModuleList(
                        nn.ModuleList([stack(m, 1, True, dims[other[m]][0]), stack(m, 1, True)]) for _ in range(3)
                    )
                    for m in dims
                }
            )
            self.dfm = nn.ModuleDict({m: stack(m, 2, True) for m in dims})
            fc = da + dt
            self.classifier = nn.Sequential(
                nn.Linear(fc, fc // 2),
                nn.ReLU(),
                nn.Dropout(0.5),
                nn.Linear(fc // 2, fc // 4),
                nn.ReLU(),
                nn.Dropout(0.5),
                nn.Linear(fc // 4, 4),
            )

        def forward(self, batch):
            pad = {m: ~batch[f"{m}_mask"] for m in ("audio", "text")}
            xs = {m: self.fem[m](batch[m], key_padding_mask=pad[m]) for m in pad}
            fused = {}
            for m, o in (("audio", "text"), ("text", "audio")):
                h = xs[m]
                for cross, self_stack in self.mim[m]:
                    h = self_stack(cross(h, xs[o], pad[o]))
                fused[m] = xs[m] + h
            pooled = [self.dfm[m](fused[m]).mean(1) for m in ("audio", "text")]
            return self.classifier(torch.cat(pooled, -1))

    return {
        "self_attn": lambda dims: RajanReference(False, dims),
        "cross_attn": lambda dims: RajanReference(True, dims),
        "lgcct": lambda dims: LGCCTReference(),
        "ks_transformer": lambda dims: KSReference(),
    }


def _versus_batch(key: str, seed: int = 0) -> dict:
    """The benchmark batch: random frames, real lengths in [0.6 T, T] (item 0 full length), frames
    zero at padding (what a padded data loader gives; the fixed-length reference codes see it)."""
    import torch

    _, B, sizes = VERSUS[key]
    gen = torch.Generator().manual_seed(seed)
    batch = {}
    for m, (T, D) in sizes.items():
        if key == "lgcct" and m == "text":
            mask = batch["audio_mask"]  # word-aligned: the same lengths
        else:
            lengths = torch.randint(int(0.6 * T), T + 1, (B,), generator=gen)
            lengths[0] = T
            mask = torch.arange(T)[None] < lengths[:, None]
        batch[m] = torch.randn(B, T, D, generator=gen) * mask[..., None]
        batch[f"{m}_mask"] = mask
    return batch


def _train_step(model, optimiser, batch) -> tuple[float, float]:
    """Wall and CPU seconds of one forward + backward + Adam step."""
    optimiser.zero_grad(set_to_none=True)
    t0, c0 = time.perf_counter(), time.process_time()
    model(batch).float().square().mean().backward()
    optimiser.step()
    return time.perf_counter() - t0, time.process_time() - c0


def versus_reference(key: str, rounds: int, threads: int) -> dict:
    """sertool and the reference rendering trained side by side on the same batch, one step each per
    round (the order alternating), after one warm-up step each: medians of wall and CPU time."""
    import torch

    from sertool.models import build_model, count_parameters

    torch.set_num_threads(threads)
    overrides, _, sizes = VERSUS[key]
    dims = {m: D for m, (_, D) in sizes.items()}
    torch.manual_seed(0)
    ours = build_model(key, overrides).train()
    ref = _reference_models()[key](dims).train()
    n_ours, n_ref = count_parameters(ours), count_parameters(ref)
    if n_ours != n_ref:
        raise SystemExit(f"{key}: parameter counts differ (sertool {n_ours:,}, reference {n_ref:,})")
    check = None
    if key in ("self_attn", "cross_attn"):  # the same function: copy the weights, compare unpadded
        ref.load_sertool(ours).eval()
        ours.eval()
        full = {k: v for k, v in _versus_batch(key, seed=1).items() if not k.endswith("_mask")}
        with torch.no_grad():
            check = float((ours(full) - ref(full)).abs().max())
        ours.train(), ref.train()
    batch = _versus_batch(key)
    opts = {"sertool": torch.optim.Adam(ours.parameters(), 1e-4), "reference": torch.optim.Adam(ref.parameters(), 1e-4)}
    models = {"sertool": ours, "reference": ref}
    times = {name: [] for name in models}
    for r in range(rounds + 1):
        order = ("sertool", "reference") if r % 2 == 0 else ("reference", "sertool")
        for name in order:
            res = _train_step(models[name], opts[name], batch)
            if r:  # round 0 = warm-up
                times[name].append(res)
    med = {n: [statistics.median(t[i] for t in times[n]) for i in (0, 1)] for n in models}
    paired = statistics.median(a[0] / b[0] for a, b in zip(times["sertool"], times["reference"]))
    return {
        "key": key,
        "params": n_ours,
        "batch": VERSUS[key][1],
        "sertool_wall": med["sertool"][0],
        "sertool_cpu": med["sertool"][1],
        "reference_wall": med["reference"][0],
        "reference_cpu": med["reference"][1],
        "wall_ratio": med["sertool"][0] / med["reference"][0],
        "cpu_ratio": med["sertool"][1] / med["reference"][1],
        "paired_wall_ratio": paired,
        "rounds": rounds,
        "threads": threads,
        "max_abs_diff": check,
        "load1": os.getloadavg()[0],
    }


# ---------------------------------------------------------------------------- same outputs as before
# `--outputs save FILE` under one revision (PYTHONPATH=OLD_TREE), then `--outputs compare FILE` under
# another: the same weights, inputs and seed for each model (eval and training mode, an unpadded and
# a padded batch), max abs differences of the outputs and gradients.
OUTPUT_CHECKS = {
    "self_attn": ([], 4, VERSUS["self_attn"][2]),
    "cross_attn": ([], 4, VERSUS["cross_attn"][2]),
    "lgcct": ([], 4, VERSUS["lgcct"][2]),
    "lgcct (released code)": (VERSUS["lgcct"][0], 4, VERSUS["lgcct"][2]),
    "ks_transformer": ([], 2, {"audio": (120, 512), "text": (20, 1024)}),
    "cma": ([], 4, {"audio": (250, 768), "text": (50, 768)}),
}


def _outputs(name: str, state=None) -> dict:
    import torch

    from sertool.models import build_model

    overrides, B, sizes = OUTPUT_CHECKS[name]
    key = name.split()[0]
    gen = torch.Generator().manual_seed(0)
    full, padded = {}, {}
    for m, (T, D) in sizes.items():
        full[m] = torch.randn(B, T, D, generator=gen)
        if key == "lgcct" and m == "text":
            mask = padded["audio_mask"]
        else:
            lengths = torch.randint(int(0.6 * T), T + 1, (B,), generator=gen)
            lengths[0] = T
            mask = torch.arange(T)[None] < lengths[:, None]
        padded[m], padded[f"{m}_mask"] = full[m] * mask[..., None], mask
    torch.manual_seed(0)
    model = build_model(key, overrides)
    if state is not None:
        model.load_state_dict(state)
    res = {"state": {k: v.clone() for k, v in model.state_dict().items()}}
    for batch_name, batch in (("unpadded", full), ("padded", padded)):
        for mode in ("eval", "train"):
            model.train(mode == "train")
            model.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            out = model(batch)
            out.float().square().mean().backward()
            res[f"{batch_name} {mode}"] = (
                out.detach(),
                {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None},
            )
    return res


def check_outputs(action: str, path: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    if action == "save":
        torch.save({name: _outputs(name) for name in OUTPUT_CHECKS}, path)
        return
    print("| model | batch, mode | outputs: max abs diff | gradients: max abs diff |\n|---|---|---:|---:|")
    for name, old in torch.load(path).items():
        new = _outputs(name, old["state"])
        if list(new["state"]) != list(old["state"]):
            raise SystemExit(f"{name}: state_dict keys differ")
        for case in (c for c in old if c != "state"):
            out, grads = old[case]
            d_out = float((new[case][0] - out).abs().max())
            d_grad = max(float((new[case][1][k] - g).abs().max()) for k, g in grads.items())
            print(f"| {name} | {case} | {d_out:.1e} | {d_grad:.1e} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="*", default=list(SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--one", nargs=2, metavar=("KEY", "VARIANT"), help=argparse.SUPPRESS)
    ap.add_argument(
        "--versus-reference",
        action="store_true",
        help="train each of self_attn, cross_attn, lgcct, ks_transformer side by side with a plain PyTorch "
        "rendering of its reference code (forward + backward + Adam step, interleaved); print the ratios",
    )
    ap.add_argument("--rounds", type=int, default=5, help="--versus-reference: timed steps per model")
    ap.add_argument(
        "--outputs",
        nargs=2,
        metavar=("save|compare", "FILE"),
        help="save the four models' outputs and gradients (same weights, inputs, seed) or compare with a saved file",
    )
    args = ap.parse_args(argv)
    if args.outputs:
        check_outputs(args.outputs[0], args.outputs[1], args.threads)
        return
    if args.versus_reference:
        _print_versus([k for k in args.models if k in VERSUS] if args.models != list(SIZES) else list(VERSUS), args)
        return
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


def _print_versus(keys, args):
    import platform

    import torch

    load0 = os.getloadavg()
    rows = []
    for key in keys:
        rows.append(versus_reference(key, args.rounds, args.threads))
        r = rows[-1]
        print(f"# done {key}: wall ratio {r['wall_ratio']:.2f}, CPU ratio {r['cpu_ratio']:.2f}", file=sys.stderr)
    load1 = os.getloadavg()
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"torch {torch.__version__}, {args.threads} thread(s), forward + backward + Adam step, "
        f"median of {args.rounds} interleaved rounds after 1 warm-up; "
        f"load average (1 min) {load0[0]:.1f} at start, {load1[0]:.1f} at end\n"
    )
    print(
        "| model | params | batch | sertool wall s | reference wall s | wall ratio | paired wall ratio | "
        "sertool CPU s | reference CPU s | CPU ratio | max abs diff (same weights, unpadded) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        diff = "—" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        print(
            f"| {r['key']} | {r['params']:,} | {r['batch']} | {r['sertool_wall']:.3f} | {r['reference_wall']:.3f} | "
            f"**{r['wall_ratio']:.2f}** | {r['paired_wall_ratio']:.2f} | {r['sertool_cpu']:.3f} | "
            f"{r['reference_cpu']:.3f} | **{r['cpu_ratio']:.2f}** | {diff} |"
        )


if __name__ == "__main__":
    main()
