"""Property tests for the shared attention function and building blocks."""

import math

import pytest
import torch
import torch.nn as nn

from sertool.models.attention import attention, attention_entropy, key_sparse
from sertool.models.blocks import (
    GatedFusion,
    MultiHeadAttention,
    TransformerStack,
    rnn_over_real_frames,
    statistics_pooling,
)
from sertool.models.encoders import ConvRNNEncoder, ConvStack, RNNEncoder


def _lengths_mask(lengths, T):
    return torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]


def _qkv(B=3, H=2, Tq=7, Tk=9, dh=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, Tq, dh, generator=g),
        torch.randn(B, H, Tk, dh, generator=g),
        torch.randn(B, H, Tk, dh, generator=g),
    )


OPTIONS = [
    dict(),
    dict(length_scale="keys"),
    dict(length_scale="queries"),
    dict(topk_rate=0.5),
    dict(topk_rate=0.3, renormalize=False, length_scale="keys"),
]


@pytest.mark.parametrize("opts", OPTIONS)
def test_masked_keys_get_exactly_zero_weight(opts):
    q, k, v = _qkv()
    km = _lengths_mask([9, 5, 1], 9)
    qm = _lengths_mask([7, 4, 2], 7)
    out, w = attention(q, k, v, key_mask=km, query_mask=qm, return_weights=True, **opts)
    assert torch.all(w.masked_select(~km[:, None, None, :].expand_as(w)) == 0)
    # padded query rows are exactly zero (weights and outputs)
    assert torch.all(w.masked_select(~qm[:, None, :, None].expand_as(w)) == 0)
    assert torch.all(out.masked_select(~qm[:, None, :, None].expand_as(out)) == 0)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("opts", OPTIONS)
def test_appending_padding_leaves_outputs_unchanged(opts):
    q, k, v = _qkv(B=1, Tq=6, Tk=8)
    ref = attention(q, k, v, **opts)
    # pad queries by 3 and keys by 5 with garbage
    qp = torch.cat([q, 100 * torch.randn(1, 2, 3, 8)], dim=2)
    kp = torch.cat([k, 100 * torch.randn(1, 2, 5, 8)], dim=2)
    vp = torch.cat([v, 100 * torch.randn(1, 2, 5, 8)], dim=2)
    out = attention(qp, kp, vp, key_mask=_lengths_mask([8], 13), query_mask=_lengths_mask([6], 9), **opts)
    torch.testing.assert_close(out[:, :, :6], ref, rtol=1e-5, atol=1e-6)


def test_padded_queries_do_not_change_real_outputs_in_key_sparse():
    # padded queries must not vote in the key-sparse column sums
    q, k, v = _qkv(B=1, Tq=5, Tk=10)
    ref = attention(q, k, v, topk_rate=0.5)
    qp = torch.cat([q, 1e3 * torch.randn(1, 2, 4, 8)], dim=2)
    out = attention(qp, k, v, query_mask=_lengths_mask([5], 9), topk_rate=0.5)
    torch.testing.assert_close(out[:, :, :5], ref)


@pytest.mark.parametrize("renormalize", [True, False])
def test_key_sparse_keeps_k_columns_shared_by_queries(renormalize):
    B, H, Tq, Tk = 3, 4, 6, 11
    q, k, v = _qkv(B=B, H=H, Tq=Tq, Tk=Tk)
    q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
    lengths = [11, 7, 2]
    km = _lengths_mask(lengths, Tk)
    rate = 0.5
    out, w = attention(q, k, v, key_mask=km, topk_rate=rate, renormalize=renormalize, return_weights=True)
    nz = w != 0
    for b, n in enumerate(lengths):
        kk = math.ceil(rate * n)
        assert torch.all(nz[b].sum(-1) == kk), (b, nz[b].sum(-1))
        # same columns for every query of a head
        assert torch.all(nz[b] == nz[b][:, :1, :])
        # kept columns are the top-k column sums of the dense weights
        dense = torch.softmax(
            (q[b] @ k[b].transpose(-1, -2)) / math.sqrt(8) + torch.where(km[b], 0.0, float("-inf")), -1
        )
        top = dense.sum(-2).topk(kk, -1).indices
        for h in range(H):
            assert set(top[h].tolist()) == set(nz[b, h, 0].nonzero().flatten().tolist())
    rows = w.sum(-1)
    if renormalize:
        torch.testing.assert_close(rows, torch.ones_like(rows))
    else:
        assert torch.all(rows <= 1 + 1e-6) and torch.all(rows < 1 - 1e-4)
    out.square().sum().backward()
    for t in (q, k, v):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_key_sparse_function_rejects_bad_rate():
    with pytest.raises(ValueError):
        key_sparse(torch.rand(1, 1, 2, 3), 0.0)


@pytest.mark.parametrize("rate", [None, 0.5, 0.25])
def test_sdpa_path_matches_manual_path(rate):
    q, k, v = _qkv()
    q.requires_grad_(True)
    km = _lengths_mask([9, 4, 6], 9)
    qm = _lengths_mask([7, 7, 3], 7)
    for ls in (None, "keys"):
        a = attention(q, k, v, key_mask=km, query_mask=qm, length_scale=ls, topk_rate=rate)
        b, _ = attention(q, k, v, key_mask=km, query_mask=qm, length_scale=ls, topk_rate=rate, return_weights=True)
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        (ga,) = torch.autograd.grad(a.sum(), q)
        (gb,) = torch.autograd.grad(b.sum(), q)
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-5)


def test_length_scale_multiplies_logits_by_log_real_keys():
    q, k, v = _qkv(B=1, Tk=20)
    km = _lengths_mask([12], 20)
    _, w = attention(q, k, v, key_mask=km, length_scale="keys", return_weights=True)
    logits = (math.log(12) * q @ k.transpose(-1, -2) / math.sqrt(8))[..., :12]
    torch.testing.assert_close(w[..., :12], torch.softmax(logits, -1))
    # "queries": log of the number of real queries
    qm = _lengths_mask([3], 7)
    _, w = attention(q, k, v, query_mask=qm, length_scale="queries", return_weights=True)
    ref = torch.softmax(math.log(3) * q @ k.transpose(-1, -2) / math.sqrt(8), -1)
    torch.testing.assert_close(w[:, :, :3], ref[:, :, :3])


def test_length_scaling_makes_entropy_invariant_to_key_count():
    torch.manual_seed(0)
    spreads = {}
    for ls in (None, "keys"):
        ents = []
        for n in (25, 50, 100, 200, 400):
            q, k, v = torch.randn(4, 2, 16, 16), torch.randn(4, 2, n, 16), torch.randn(4, 2, n, 16)
            _, w = attention(q, k, v, length_scale=ls, return_weights=True)
            ents.append(attention_entropy(w).item())
        spreads[ls] = max(ents) - min(ents)
    # without scaling entropy grows ~ log n (spread ~ log 16 = 2.77 nats)
    assert spreads[None] > 2.0
    assert spreads["keys"] < 0.25 * spreads[None], spreads


def test_mha_matches_torch_multihead_attention():
    torch.manual_seed(0)
    E, H = 24, 4
    ours = MultiHeadAttention(E, H).eval()
    ref = nn.MultiheadAttention(E, H, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    x, y = torch.randn(2, 5, E), torch.randn(2, 8, E)
    km = _lengths_mask([8, 3], 8)
    a = ours(x, y, y, key_mask=km)
    b, _ = ref(x, y, y, key_padding_mask=~km)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_statistics_pooling_ignores_padding():
    x = torch.randn(2, 10, 4)
    mask = _lengths_mask([10, 6], 10)
    x_garbage = x.clone()
    x_garbage[1, 6:] = 1e4
    p = statistics_pooling(x_garbage, mask)
    torch.testing.assert_close(p[1, :4], x[1, :6].mean(0))
    torch.testing.assert_close(p[1, 4:], x[1, :6].std(0, unbiased=False), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(p[0, 4:], x[0].std(0, unbiased=False), rtol=1e-4, atol=1e-4)
    one = statistics_pooling(x[:, :1], None)
    assert torch.isfinite(one).all() and one[:, 4:].abs().max() < 1e-3


def test_gate_is_eq18_with_d_by_d_matrices():
    g = GatedFusion(6, "matrix")
    assert sum(p.numel() for p in g.parameters()) == 2 * 36
    f, t = torch.randn(2, 3, 6), torch.randn(2, 3, 6)
    torch.testing.assert_close(g(f, t), f @ g.compound.weight.T + t @ g.retain.weight.T)
    g2 = GatedFusion(6, "linear_ln")
    assert sum(p.numel() for p in g2.parameters()) == 2 * 42 + 12


@pytest.mark.parametrize("norm", ["post", "pre"])
@pytest.mark.parametrize("cross", [False, True])
def test_transformer_stack_padding_invariance(norm, cross):
    torch.manual_seed(0)
    st = TransformerStack(
        2,
        16,
        4,
        32,
        cross=cross,
        kdim=12 if cross else None,
        norm=norm,
        length_scale="keys",
        topk_rate=0.5,
        positions="layer",
        input_norm=True,
    ).eval()
    x, mem = torch.randn(1, 5, 16), torch.randn(1, 7, 12 if cross else 16)
    ref = st(x, None, mem if cross else None, None)
    xp = torch.cat([x, torch.randn(1, 3, 16)], 1)
    memp = torch.cat([mem, torch.randn(1, 4, mem.shape[-1])], 1)
    out = st(xp, _lengths_mask([5], 8), memp if cross else None, _lengths_mask([7], 11) if cross else None)
    torch.testing.assert_close(out[:, :5], ref, rtol=1e-4, atol=1e-5)


def test_encoders_padding_invariance():
    torch.manual_seed(0)
    encs = [
        ConvStack(6, [[8, 3, 2], [8, 3, 2]], batch_norm=True),
        RNNEncoder(6, 5, "gru"),
        ConvRNNEncoder(6, [[8, 3, 1], [8, 3, 1]], 4, "lstm"),
    ]
    for enc in encs:
        enc.eval()
        for L in (9, 10):
            x = torch.randn(1, L, 6)
            ref, rm = enc(x, torch.ones(1, L, dtype=torch.bool))
            xp = torch.cat([x, 50 * torch.randn(1, 5, 6)], 1)
            out, om = enc(xp, _lengths_mask([L], L + 5))
            n = int(rm.sum())
            assert int(om.sum()) == n
            torch.testing.assert_close(out[:, :n], ref[:, :n], rtol=1e-4, atol=1e-5)
            assert torch.all(out[:, n:] == 0)


def _packed_rnn(rnn, x, mask):
    """The packed-sequence reference that ``rnn_over_real_frames`` replaces."""
    from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

    packed = pack_padded_sequence(x, mask.sum(1), batch_first=True, enforce_sorted=False)
    return pad_packed_sequence(rnn(packed)[0], batch_first=True, total_length=x.shape[1])[0]


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
@pytest.mark.parametrize("layers", [1, 2])
def test_rnn_over_real_frames_equals_packed(cell, layers):
    torch.manual_seed(0)
    rnn = cell(6, 5, num_layers=layers, bidirectional=True, batch_first=True)
    for lengths in ([9, 4, 1, 7], [9, 9, 9, 9]):
        mask = _lengths_mask(lengths, 9)
        x = (torch.randn(4, 9, 6) * mask[..., None]).requires_grad_(True)
        ref = _packed_rnn(rnn, x, mask)
        ref_grads = torch.autograd.grad((ref * mask[..., None]).square().sum(), [x, *rnn.parameters()])
        out = rnn_over_real_frames(rnn, x, mask)
        grads = torch.autograd.grad((out * mask[..., None]).square().sum(), [x, *rnn.parameters()])
        torch.testing.assert_close(out * mask[..., None], ref, rtol=1e-5, atol=1e-6)
        for a, b in zip(grads, ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        assert out.is_contiguous()  # the packed layout: dropout after it draws the same masks


def test_rnn_encoder_same_outputs_and_dropout_masks_as_packing():
    """RNNEncoder runs unpacked; with the same seed it gives what the packed encoder gave."""
    torch.manual_seed(0)
    enc = RNNEncoder(6, 5, "lstm", dropout=0.5).train()
    x, mask = torch.randn(3, 8, 6), _lengths_mask([8, 5, 2], 8)
    torch.manual_seed(1)
    ref = enc.dropout(_packed_rnn(enc.rnn, x, mask)) * mask[..., None]
    torch.manual_seed(1)
    out, om = enc(x, mask)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(om, mask)


@pytest.mark.parametrize("rate", [None, 0.5])
def test_attention_dropout_path_draws_the_same_masks_as_sdpa(rate):
    """Training with attention dropout runs the explicit path (one logits tensor for key selection
    and softmax); it must equal SDPA with the same seed and the kept keys as its mask."""
    import torch.nn.functional as F

    from sertool.models.attention import topk_keep

    q, k, v = _qkv()
    km = _lengths_mask([9, 5, 1], 9)
    mask = km[:, None, None, :]
    if rate is not None:
        logits = (q @ k.transpose(-1, -2) * 8**-0.5).masked_fill(~mask, float("-inf"))
        mask = topk_keep(logits.softmax(-1), rate, km)[:, :, None, :]
    torch.manual_seed(3)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.3)
    torch.manual_seed(3)
    out = attention(q, k, v, key_mask=km, topk_rate=rate, dropout_p=0.3, training=True)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
