"""Float64 reference attention: the oracle for tests and notebooks (NumPy on the host, CuPy on a GPU).

Layout (batch, seqlen, nheads, headdim), K/V heads shared by groups of query heads (GQA), and the
causal mask aligned to the bottom-right corner: query i sees key j iff j <= i + seqlen_k - seqlen_q.
"""
from __future__ import annotations

import math

import numpy as np


def _xp(a):
    try:
        import cupy

        return cupy.get_array_module(a)
    except ImportError:
        return np


def causal_mask(seqlen_q: int, seqlen_k: int, xp=np):
    """Boolean (seqlen_q, seqlen_k) matrix, True where query i may see key j."""
    i = xp.arange(seqlen_q)[:, None]
    j = xp.arange(seqlen_k)[None, :]
    return j <= i + (seqlen_k - seqlen_q)


def alibi_bias(slopes, batch: int, seqlen_q: int, seqlen_k: int, xp=np):
    """(batch or 1, nheads, seqlen_q, seqlen_k) float64 bias -slope * |i + seqlen_k - seqlen_q - j|
    (FlashAttention-2's ALiBi) from slopes of shape (nheads,) or (batch, nheads)."""
    slopes = xp.asarray(slopes, dtype=xp.float64)
    slopes = slopes.reshape((1 if slopes.ndim == 1 else batch), -1)[:, :, None, None]
    i = xp.arange(seqlen_q)[:, None]
    j = xp.arange(seqlen_k)[None, :]
    return -slopes * xp.abs(i + seqlen_k - seqlen_q - j)


def attention_reference(q, k, v, causal: bool = False, softmax_scale: float | None = None, mask=None,
                        alibi_slopes=None, softcap: float = 0.0):
    """(out, lse) in float64: out (batch, seqlen_q, nheads, headdim), lse (batch, nheads, seqlen_q).

    mask: optional boolean array broadcastable to (batch, nheads, seqlen_q, seqlen_k), True where a
    query may see a key (e.g. BlockMask.to_element_mask()); it combines with causal.
    softcap > 0: scaled scores s become softcap * tanh(s / softcap) (before ALiBi, as in FlashAttention-2).
    alibi_slopes: (nheads,) or (batch, nheads); adds alibi_bias to the scaled scores.
    A row that sees no key gives out = 0 and lse = -inf.
    """
    xp = _xp(q)
    q, k, v = (xp.asarray(x, dtype=xp.float64) for x in (q, k, v))
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale
    group = nheads // nheads_k
    k = xp.repeat(k, group, axis=2)
    v = xp.repeat(v, group, axis=2)
    s = xp.einsum("bqhd,bkhd->bhqk", q, k) * scale
    if softcap:
        s = softcap * xp.tanh(s / softcap)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes, batch, seqlen_q, seqlen_k, xp)
    if causal:
        s = xp.where(causal_mask(seqlen_q, seqlen_k, xp), s, -xp.inf)
    if mask is not None:
        s = xp.where(xp.asarray(mask, dtype=bool), s, -xp.inf)
    m = s.max(axis=-1, keepdims=True) if seqlen_k else xp.full(s.shape[:-1] + (1,), -xp.inf)
    m_safe = xp.where(xp.isfinite(m), m, 0.0)
    p = xp.exp(s - m_safe)
    l = p.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = xp.where(l > 0, xp.log(xp.where(l > 0, l, 1.0)) + m_safe, -xp.inf)[..., 0]
        p = p / xp.where(l > 0, l, 1.0)
    out = xp.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse
