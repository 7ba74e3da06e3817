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


_PHILOX_M = (0xD2511F53, 0xCD9E8D57)
_PHILOX_W = (0x9E3779B9, 0xBB67AE85)


def philox4x32_10(counter, key):
    """Philox4x32-10 (Salmon et al., 2011) on NumPy arrays: counter (..., 4) and key (..., 2) of
    uint32, broadcast together; returns (..., 4) uint32. What kernels/dropout.cuh computes."""
    c = [np.asarray(counter, dtype=np.uint32)[..., i].astype(np.uint64) for i in range(4)]
    k = [np.asarray(key, dtype=np.uint32)[..., i].astype(np.uint64) for i in range(2)]
    lo32 = np.uint64(0xFFFFFFFF)
    for _ in range(10):
        p0, p1 = np.uint64(_PHILOX_M[0]) * c[0], np.uint64(_PHILOX_M[1]) * c[2]
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k[0], p1 & lo32, (p0 >> np.uint64(32)) ^ c[3] ^ k[1], p0 & lo32]
        k = [(k[0] + np.uint64(_PHILOX_W[0])) & lo32, (k[1] + np.uint64(_PHILOX_W[1])) & lo32]
    return np.stack(np.broadcast_arrays(*c), axis=-1).astype(np.uint32)


def dropout_keep_mask(seed: int, offset: int, batch: int, nheads: int, seqlen_q: int, seqlen_k: int,
                      dropout_p: float):
    """Boolean (batch, nheads, seqlen_q, seqlen_k) NumPy mask, True where the kernels keep the score
    of query i and key j, from the same Philox stream (see kernels/dropout.cuh for the numbering)."""
    threshold = min(65535, round(dropout_p * 65536))
    # One Philox call per (batch * nheads + head, 16-query tile, 16-key tile, canonical lane).
    bh = np.arange(batch * nheads, dtype=np.uint64)[:, None, None, None]
    ti = np.arange(-(-seqlen_q // 16), dtype=np.uint64)[None, :, None, None]
    tj = np.arange(-(-seqlen_k // 16), dtype=np.uint64)[None, None, :, None]
    lane = np.arange(32, dtype=np.uint64)[None, None, None, :]
    counter = np.stack(np.broadcast_arrays(lane + 32 * tj, ti, bh, np.uint64(offset % 2**32)), axis=-1)
    key = np.array([seed % 2**32, (seed >> 32) % 2**32 ^ (offset >> 32) % 2**32], dtype=np.uint64)
    words = philox4x32_10(counter, key)  # (batch * nheads, tiles_q, tiles_k, 32, 4)
    i = np.arange(seqlen_q)[:, None]
    j = np.arange(seqlen_k)[None, :]
    lane_of = (i % 8) * 4 + (j % 8) // 2
    o = ((i % 16) // 8) * 4 + ((j % 16) // 8) * 2 + j % 2
    word = words[:, i // 16, j // 16, lane_of, o // 2]  # (batch * nheads, seqlen_q, seqlen_k)
    numbers = (word >> (16 * (o % 2)).astype(np.uint32)) & 0xFFFF
    return (numbers >= threshold).reshape(batch, nheads, seqlen_q, seqlen_k)


def attention_reference(q, k, v, causal: bool = False, softmax_scale: float | None = None, mask=None,
                        alibi_slopes=None, softcap: float = 0.0, dropout_mask=None, dropout_p: float = 0.0):
    """(out, lse) in float64: out (batch, seqlen_q, nheads, headdim), lse (batch, nheads, seqlen_q).

    mask: optional boolean array broadcastable to (batch, nheads, seqlen_q, seqlen_k), True where a
    query may see a key (e.g. BlockMask.to_element_mask()); it combines with causal.
    softcap > 0: scaled scores s become softcap * tanh(s / softcap) (before ALiBi, as in FlashAttention-2).
    alibi_slopes: (nheads,) or (batch, nheads); adds alibi_bias to the scaled scores.
    dropout_mask: boolean, broadcastable to (batch, nheads, seqlen_q, seqlen_k), True where a
    probability is kept (dropout_keep_mask); kept ones are scaled by 1 / keep probability, where the
    keep probability is 1 - dropout_p rounded as the kernels round it. lse is the undropped softmax's.
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
    if dropout_mask is not None:
        keep = (65536 - min(65535, round(dropout_p * 65536))) / 65536
        p = xp.where(xp.asarray(dropout_mask, dtype=bool), p / keep, 0.0)
    out = xp.einsum("bhqk,bkhd->bqhd", p, v)
    return out, lse
