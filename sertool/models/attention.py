"""One attention function for every sertool model.

``attention(q, k, v, ...)`` is scaled dot-product attention over per-head tensors
``[B, H, T, d_head]`` with, by option:

* **padding masks** for keys (``key_mask``) and queries (``query_mask``), ``True`` = real frame.
  Masked keys get exactly zero weight; padded query rows return zeros (and zero weights) and
  never vote in the key-sparse column sums, so appending padding leaves real outputs unchanged.
* **length scaling** (LGCCT, Liu et al. 2022, length-scaled attention): logits are multiplied by
  ``lambda = log n``.  ``length_scale="keys"`` (default in LGCCT configs) uses ``n`` = the number
  of *real* keys of each item, which is what the entropy-invariance argument needs (the softmax
  runs over keys).  ``length_scale="queries"`` uses the number of real queries, as the released
  LGCCT code does (there it is commented out, and uses the padded query length).
* **key-sparse top-k** (KS-Transformer, Chen et al. 2022, key-sparse attention): per head, the attention
  weights are summed over (real) queries; the ``k = ceil(rate * n_real_keys)`` keys with the
  largest column sums are kept, shared by every query of that head, and all other weights are set
  to zero.  ``renormalize=True`` (default, the paper's description: softmax over the kept keys)
  divides the kept weights by their sum; ``renormalize=False`` reproduces the released KS code
  (zeroing without renormalisation, and ``k = int(rate * padded_len)`` there).
* optional return of the weights ``[B, H, Tq, Tk]`` for attention plots.

When the weights are not requested the function calls
``torch.nn.functional.scaled_dot_product_attention`` (with its ``scale`` argument; the per-item
length factor is folded into the queries).  Renormalised key-sparse attention is softmax over
the kept keys, so it also runs through SDPA, with the kept keys (selected without autograd) as
the mask; only non-renormalised key-sparse attention and requested weights use the explicit path.
In training with attention dropout SDPA has no fused CPU kernel (it falls back to its math path,
which materialises the weights), so the function computes that path itself with the same
arithmetic and dropout masks, computing the logits once for both key selection and softmax.
Masks whose frames are all real are dropped (they change nothing and cost full-size passes).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["attention", "key_sparse", "topk_keep", "length_factor", "attention_entropy"]

LENGTH_SCALES = (None, "none", "keys", "queries")


def length_factor(n: torch.Tensor) -> torch.Tensor:
    """lambda = log n (natural log), n >= 1 (a single key gives 0: uniform over one key)."""
    return torch.log(n.to(torch.float32).clamp(min=1.0))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask (True = attend) as the additive logit term 0 / -inf."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _count(mask: Optional[torch.Tensor], batch: int, length: int, device) -> torch.Tensor:
    if mask is None:
        return torch.full((batch,), float(length), device=device)
    return mask.sum(-1).to(torch.float32)


def topk_keep(
    weights: torch.Tensor,
    rate: float,
    key_mask: Optional[torch.Tensor] = None,
    query_mask: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Bool ``[B, H, Tk]``: the k = ceil(rate * real keys) keys with the largest column sums of
    ``weights [B, H, Tq, Tk]`` over real queries, per (item, head).  Ties are broken by position
    (stable sort), so exactly k keys are selected."""
    if not 0.0 < rate <= 1.0:
        raise ValueError(f"key-sparse rate must be in (0, 1], got {rate}")
    B, H, Tq, Tk = weights.shape
    w = weights.detach()
    if query_mask is not None and not bool(query_mask.all()):  # an all-real mask multiplies by 1
        w = w * query_mask[:, None, :, None].to(w.dtype)
    colsum = w.sum(-2)  # [B, H, Tk]
    n_keys = _count(key_mask, B, Tk, weights.device)
    k = torch.ceil(n_keys.double() * rate).long().clamp(min=1)  # [B]
    if key_mask is not None:
        colsum = colsum.masked_fill(~key_mask[:, None, :], float("-inf"))
    order = colsum.argsort(dim=-1, descending=True, stable=True)
    keep_sorted = (torch.arange(Tk, device=weights.device)[None, None, :] < k[:, None, None]).expand(B, H, Tk)
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def key_sparse(
    weights: torch.Tensor,
    rate: float,
    key_mask: Optional[torch.Tensor] = None,
    query_mask: Optional[torch.Tensor] = None,
    renormalize: bool = True,
) -> torch.Tensor:
    """Zero all but the top-k keys (see :func:`topk_keep`) of softmax weights ``[B, H, Tq, Tk]``;
    the same key subset is used by every query of a head; optionally renormalise the rows."""
    keep = topk_keep(weights, rate, key_mask, query_mask)
    out = weights * keep[:, :, None, :].to(weights.dtype)
    if renormalize:
        out = out / out.sum(-1, keepdim=True).clamp_min(torch.finfo(out.dtype).tiny)
    return out


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    key_mask: Optional[torch.Tensor] = None,
    query_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    length_scale: Optional[str] = None,
    topk_rate: Optional[float] = None,
    renormalize: bool = True,
    dropout_p: float = 0.0,
    training: bool = False,
    return_weights: bool = False,
):
    """Multi-head scaled dot-product attention with masks, length scaling and key-sparse top-k.

    Args:
        q: ``[B, H, Tq, dh]``; k, v: ``[B, H, Tk, dh]`` (v may have another last dim).
        key_mask: ``[B, Tk]`` bool, True = real key.  query_mask: ``[B, Tq]`` bool.
        scale: base logit scale, default ``dh ** -0.5``.
        length_scale: None/"none", "keys" or "queries" (see module docstring).
        topk_rate: fraction of real keys kept per head (None = dense attention).
        renormalize: renormalise the kept weights (paper) or not (released KS code).
        return_weights: also return the weights ``[B, H, Tq, Tk]`` (after masking / top-k,
            before dropout).

    Returns:
        ``out`` ``[B, H, Tq, dv]`` or ``(out, weights)``.
    """
    if length_scale not in LENGTH_SCALES:
        raise ValueError(f"length_scale must be one of {LENGTH_SCALES}, got {length_scale!r}")
    B, H, Tq, dh = q.shape
    Tk = k.shape[-2]
    base = float(scale) if scale is not None else dh**-0.5
    km = key_mask
    if km is not None:
        km = km.to(torch.bool)
        # an item with no real key at all would give NaN: let it attend everywhere (its output is
        # meaningless but finite, and the models never use it).
        km = km | ~km.any(-1, keepdim=True)
    qm = query_mask.to(torch.bool) if query_mask is not None else None
    # all-real masks change nothing (adding 0 to logits, multiplying by 1): drop them, which saves
    # full-size [B, H, Tq, Tk] passes and keeps SDPA on its fastest path.
    km = None if km is None or bool(km.all()) else km
    qm = None if qm is None or bool(qm.all()) else qm

    if length_scale == "keys":
        lam = length_factor(_count(km, B, Tk, q.device))
    elif length_scale == "queries":
        lam = length_factor(_count(qm, B, Tq, q.device))
    else:
        lam = None
    if lam is not None:
        q = q * lam.to(q.dtype).view(B, 1, 1, 1)

    p = dropout_p if training else 0.0
    if not return_weights and (topk_rate is None or renormalize) and p > 0.0:
        # attention dropout: SDPA would fall back to its unfused math path on CPU (weights
        # materialised anyway), so compute the logits once here and use them both for the key
        # selection and the softmax (SDPA's math-path arithmetic and dropout masks: same results)
        root = base**0.5
        logits = torch.matmul(q * root, k.transpose(-1, -2) * root)
        # masks as additive 0 / -inf terms added in place, as SDPA does (a broadcast masked_fill
        # of the full logits is several times slower on CPU, and out of place it copies them)
        if km is not None:
            logits.add_(_additive(km[:, None, None, :], logits.dtype))
        if topk_rate is not None:
            with torch.no_grad():
                keep = topk_keep(torch.softmax(logits, dim=-1), topk_rate, km, qm)
            logits.add_(_additive(keep[:, :, None, :], logits.dtype))  # softmax over the kept keys
        out = torch.matmul(F.dropout(torch.softmax(logits, dim=-1), p, training=True), v)
        weights = None
    elif not return_weights and (topk_rate is None or renormalize):
        attn_mask = km[:, None, None, :] if km is not None else None
        if topk_rate is not None:
            # renormalised key-sparse attention == softmax over the kept keys: select the keys
            # without autograd, then run SDPA with them as the mask (no [B,H,Tq,Tk] tensors kept
            # for backward beyond what SDPA needs).
            with torch.no_grad():
                logits = torch.matmul(q, k.transpose(-1, -2)) * base
                if km is not None:
                    logits = logits.masked_fill(~km[:, None, None, :], float("-inf"))
                keep = topk_keep(torch.softmax(logits, dim=-1), topk_rate, km, qm)
                del logits
            attn_mask = keep[:, :, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p, scale=base)
        weights = None
    else:
        logits = torch.matmul(q, k.transpose(-1, -2)) * base
        if km is not None:
            logits = logits.masked_fill(~km[:, None, None, :], float("-inf"))
        weights = torch.softmax(logits, dim=-1)
        if topk_rate is not None:
            weights = key_sparse(weights, topk_rate, km, qm, renormalize)
        if qm is not None:
            weights = weights * qm[:, None, :, None].to(weights.dtype)
        w = F.dropout(weights, p=p, training=True) if p > 0 else weights
        out = torch.matmul(w, v)
    if qm is not None:
        out = out * qm[:, None, :, None].to(out.dtype)
    if return_weights:
        return out, weights
    return out


def attention_entropy(weights: torch.Tensor, query_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean entropy (nats) of attention rows ``[..., Tq, Tk]`` over real query rows."""
    ent = -(weights * torch.log(weights.clamp_min(1e-30))).sum(-1)
    if query_mask is None:
        return ent.mean()
    m = query_mask[:, None, :].to(ent.dtype).expand_as(ent)
    return (ent * m).sum() / m.sum()
