"""Context parallelism for PyTorch: attention over a sequence split across the ranks of a process group
(ring attention, `_ring.py`), with cuflash's kernels on each chunk pair and NCCL moving the K/V chunks.

    q, k, v = (shard(x, world_size, rank) for x in (q_full, k_full, v_full))   # (batch, n / W, heads, d)
    out = ring_flash_attn_func(q, k, v, causal=True)                           # this rank's rows
    full = unshard(all_gathered_outs)

Each rank holds one chunk of the sequence in the layout given to shard ("zigzag" by default: the same
causal work on every rank). The next K/V chunk is sent and received while the current one is computed.
"""
from __future__ import annotations

import math

from . import _ring
from ._ring import LAYOUTS

__all__ = ["ring_flash_attn_func", "ring_flash_attn_varlen_func", "shard", "unshard", "LAYOUTS"]


def shard(x, world_size: int, rank: int, dim: int = 1, layout: str = "zigzag"):
    """Rank `rank`'s part of a whole sequence x (along `dim`, tokens in order) among world_size ranks."""
    import torch

    _ring.check_layout(layout)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    n, pieces = x.shape[dim], 2 * world_size if layout == "zigzag" else world_size
    if n % pieces:
        raise ValueError(f"x's {n} tokens (dim {dim}) do not split into {pieces} equal chunks for {world_size} "
                         f"ranks ({layout})")
    chunks = x.chunk(pieces, dim)
    if layout == "contiguous":
        return chunks[rank]
    return torch.cat([chunks[rank], chunks[pieces - 1 - rank]], dim)


def unshard(parts, dim: int = 1, layout: str = "zigzag"):
    """The whole sequence from every rank's part (a list in rank order, e.g. from all_gather): the inverse
    of shard."""
    import torch

    _ring.check_layout(layout)
    if layout == "contiguous":
        return torch.cat(list(parts), dim)
    halves = [p.chunk(2, dim) for p in parts]
    return torch.cat([h[0] for h in halves] + [h[1] for h in reversed(halves)], dim)


class _TorchRing:
    """The ring of a process group: pass_on sends tensors to the next rank and receives the previous rank's
    (same shapes) without blocking; the returned handle's wait() gives them."""

    def __init__(self, group):
        import torch.distributed as dist

        self.group = group if group is not None else dist.group.WORLD
        self.size = dist.get_world_size(self.group)
        self.rank = dist.get_rank(self.group)
        self.next = dist.get_global_rank(self.group, (self.rank + 1) % self.size)
        self.prev = dist.get_global_rank(self.group, (self.rank - 1) % self.size)

    def pass_on(self, tensors):
        import torch
        import torch.distributed as dist

        sent = [t.contiguous() for t in tensors]
        received = [torch.empty_like(t) for t in sent]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in sent]
        ops += [dist.P2POp(dist.irecv, t, self.prev, self.group) for t in received]
        return _Transfer(dist.batch_isend_irecv(ops), sent, received)


class _Transfer:
    def __init__(self, works, sent, received):
        self.works, self.sent, self.received = works, sent, received  # sent: alive until the sends complete

    def wait(self):
        for w in self.works:
            w.wait()
        return tuple(self.received)


def _cuflash_attend(q, k, v, step, softmax_scale, block_mask=None):
    from .api import flash_attn_func

    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=step.causal, return_attn_probs=True,
                                  block_mask=block_mask)
    return out, lse


def _cuflash_attend_backward(dout, q, k, v, out, lse, step, softmax_scale, deterministic, block_mask=None):
    from .api import flash_attn_backward

    return flash_attn_backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=step.causal,
                               deterministic=deterministic, block_mask=block_mask)


def _cuflash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, softmax_scale):
    from .api import flash_attn_varlen_func

    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=softmax_scale,
                                         causal=causal, return_attn_probs=True)
    return out, lse


def _cuflash_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, softmax_scale,
                             deterministic):
    from .api import flash_attn_varlen_backward

    return flash_attn_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, softmax_scale=softmax_scale,
                                      causal=causal, deterministic=deterministic)


def _cuflash_check(q, k, v) -> None:
    """What the kernels would refuse (a host tensor, a dtype, a head dim, a layout) raised before the ring
    starts sending, rather than at the first chunk pair with transfers in flight."""
    from . import _bridge, _problem

    _problem.build(*(_bridge.describe(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"))))


# The attention of one chunk pair and its backward, dense and packed, and the check of a rank's chunks:
# cuflash's kernels. (The tests run the same ring over gloo on CPUs with float64 references in their place.)
_LOCAL = (_cuflash_attend, _cuflash_attend_backward)
_LOCAL_VARLEN = (_cuflash_varlen, _cuflash_varlen_backward)
_CHECK = _cuflash_check


class _Documents:
    """Packed documents across the ring: each chunk pair runs as a packed (varlen) call over the parts of
    the documents it holds (_ring.document_offsets), so a query sees only keys of its own document. The
    ring loops see a batch of one: (1, tokens, heads, d) and lse (1, heads, tokens)."""

    def __init__(self, cu_seqlens, ring, seqlen: int, layout: str, device):
        if cu_seqlens[-1] != ring.size * seqlen:
            raise ValueError(f"cu_seqlens must end at the whole packed sequence's {ring.size} x {seqlen} tokens, "
                             f"got {int(cu_seqlens[-1])}")
        self.cu_seqlens, self.ring, self.seqlen, self.layout, self.device = cu_seqlens, ring, seqlen, layout, device
        self.offsets_of = {}

    def offsets(self, step):
        import torch

        key = (step.source, step.q_rows.start, step.q_rows.stop, step.kv_rows.start, step.kv_rows.stop)
        if key not in self.offsets_of:
            pos = lambda rank: _ring.positions(rank, self.ring.size, self.seqlen, self.layout)  # noqa: E731
            cu_q, cu_k, max_q, max_k = _ring.document_offsets(self.cu_seqlens, pos(self.ring.rank)[step.q_rows],
                                                              pos(step.source)[step.kv_rows])
            to_device = lambda a: torch.as_tensor(a, dtype=torch.int32).to(self.device)  # noqa: E731
            self.offsets_of[key] = (to_device(cu_q), to_device(cu_k), max_q, max_k)
        return self.offsets_of[key]

    def attend(self, q, k, v, step, softmax_scale):
        out, lse = _LOCAL_VARLEN[0](q[0], k[0], v[0], *self.offsets(step), step.causal, softmax_scale)
        return out[None], lse[None]

    def attend_backward(self, dout, q, k, v, out, lse, step, softmax_scale, deterministic):
        grads = _LOCAL_VARLEN[1](dout[0], q[0], k[0], v[0], out[0], lse[0], *self.offsets(step), step.causal,
                                 softmax_scale, deterministic)
        return tuple(g[None] for g in grads)


class _MaskedPairs:
    """A block mask of the whole sequence across the ring: each chunk pair runs with the part of it that
    covers the pair (_ring.MaskParts); a pair the mask leaves empty is skipped."""

    def __init__(self, mask, ring, seqlen: int, layout: str):
        self.parts, self.rank = _ring.MaskParts(mask, ring.size, seqlen, layout), ring.rank

    def part(self, step):
        return self.parts.part(self.rank, step)

    def attend(self, q, k, v, step, softmax_scale):
        part = self.part(step)
        return None if part is None else _LOCAL[0](q, k, v, step, softmax_scale, block_mask=part)

    def attend_backward(self, dout, q, k, v, out, lse, step, softmax_scale, deterministic):
        part = self.part(step)
        return None if part is None else _LOCAL[1](dout, q, k, v, out, lse, step, softmax_scale, deterministic,
                                                   block_mask=part)


def _ring_function():
    import torch

    class RingAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, group, causal, softmax_scale, layout, deterministic, cu_seqlens, block_mask):
            ring = _TorchRing(group)
            packed = cu_seqlens is not None
            if packed:  # the loops see a batch of one
                q, k, v = q[None], k[None], v[None]
                docs = _Documents(cu_seqlens, ring, q.shape[1], layout, q.device)
                attend, attend_backward = docs.attend, docs.attend_backward
            elif block_mask is not None:
                block_mask.check(q.shape[0], q.shape[2], ring.size * q.shape[1], ring.size * q.shape[1])
                pairs = _MaskedPairs(block_mask, ring, q.shape[1], layout)
                attend, attend_backward = pairs.attend, pairs.attend_backward
            else:
                attend, attend_backward = _LOCAL
            out, lse = _ring.ring_forward(q, k, v, ring, attend, causal, layout, softmax_scale)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.ring, ctx.args, ctx.packed = ring, (causal, layout, softmax_scale), packed
            ctx.attend_backward = lambda *chunks: attend_backward(*chunks, deterministic)
            if packed:
                out, lse = out[0], lse[0]
            ctx.mark_non_differentiable(lse)
            return out, lse

        @staticmethod
        def backward(ctx, dout, _dlse):
            q, k, v, out, lse = ctx.saved_tensors
            dout = dout.contiguous()  # autograd may hand any strides (a sum's is all zero); the kernels want rows
            dout = dout[None] if ctx.packed else dout
            grads = _ring.ring_backward(dout, q, k, v, out, lse, ctx.ring, ctx.attend_backward, *ctx.args)
            if ctx.packed:
                grads = tuple(g[0] for g in grads)
            return (*grads, None, None, None, None, None, None, None)

    return RingAttention


_RING_FUNCTION = None


def _apply(q, k, v, group, causal, softmax_scale, layout, deterministic, cu_seqlens, block_mask=None):
    global _RING_FUNCTION
    _CHECK(*(x if x.ndim == 4 else x[None] for x in (q, k, v)))
    if _RING_FUNCTION is None:
        _RING_FUNCTION = _ring_function()
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    return _RING_FUNCTION.apply(q, k, v, group, causal, scale, layout, deterministic, cu_seqlens, block_mask)


def ring_flash_attn_func(q, k, v, group=None, causal: bool = False, softmax_scale: float | None = None,
                         layout: str = "zigzag", deterministic: bool = False, return_lse: bool = False, *,
                         block_mask=None):
    """Exact attention of this rank's queries to the keys of every rank of `group` (default: the world),
    differentiable (the backward sends the K/V chunks around again with their partial gradients).

    q: (batch, seqlen, nheads, headdim), k and v: (batch, seqlen, nheads_k, headdim), PyTorch CUDA tensors
    (float16, bfloat16 or float32), this rank's chunks in `layout` (shard): every rank the same shapes.
    causal=True masks the future of the whole sequence. GQA/MQA as in flash_attn_func. deterministic=True:
    bitwise repeatable gradients (the ring adds the chunks' parts in a fixed order, and each chunk pair's
    backward is flash_attn_backward's deterministic one). block_mask: a cuflash.BlockMask of the whole
    sequence (world_size x seqlen square; a sliding window is BlockMask.sliding_window), intersected with
    causal; each chunk pair takes the part of it that covers the pair, so the chunks' pieces (seqlen, or
    seqlen / 2 with zigzag) must be whole blocks. Returns out like q, or (out, lse) with lse float32 (batch,
    nheads, seqlen) of the whole rows; a row the mask leaves empty gives zeros and -inf. Every rank of the
    group must call it with the same arguments, as for any collective.
    """
    _check_chunks(q, k, v, layout, 4)
    out, lse = _apply(q, k, v, group, causal, softmax_scale, layout, deterministic, None, block_mask)
    return (out, lse) if return_lse else out


def ring_flash_attn_varlen_func(q, k, v, cu_seqlens, group=None, causal: bool = False,
                                softmax_scale: float | None = None, layout: str = "zigzag",
                                deterministic: bool = False, return_lse: bool = False):
    """ring_flash_attn_func over documents packed into one sequence (as flash_attn_varlen_func packs them):
    a query sees only keys of its own document (and with causal=True none after it).

    q: (tokens, nheads, headdim), k and v: (tokens, nheads_k, headdim), this rank's chunk of the packed
    sequence in `layout` (shard(x, world_size, rank, dim=0)). cu_seqlens: the documents' offsets in the whole
    packed sequence (world_size x tokens long), int, the same on every rank: a list, NumPy array or tensor
    (one on the GPU is read once, a synchronising copy). Each chunk pair runs as one packed call over the
    parts of the documents it holds. Returns out like q, or (out, lse) with lse float32 (nheads, tokens).
    """
    import numpy as np

    _check_chunks(q, k, v, layout, 3)
    offsets = np.asarray(cu_seqlens.cpu() if hasattr(cu_seqlens, "cpu") else cu_seqlens, dtype=np.int64)
    if offsets.ndim != 1 or offsets.size < 2 or offsets[0] != 0 or (np.diff(offsets) < 0).any():
        raise ValueError(f"cu_seqlens must be non-decreasing offsets from 0, got {offsets.tolist()[:8]}")
    out, lse = _apply(q, k, v, group, causal, softmax_scale, layout, deterministic, offsets)
    return (out, lse) if return_lse else out


def _check_chunks(q, k, v, layout: str, ndim: int) -> None:
    shape = "(batch, seqlen, heads, headdim)" if ndim == 4 else "(tokens, heads, headdim)"
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != ndim:
            raise ValueError(f"{name} must be {shape}, got shape {tuple(getattr(x, 'shape', ()))}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be chunks of one sequence: the same "
                         "batch, seqlen and headdim")
    if q.shape[-2] % k.shape[-2]:
        raise ValueError(f"k's heads ({k.shape[-2]}) must divide q's ({q.shape[-2]})")
    _ring.check_layout(layout)
    seqlen = q.shape[-3]
    if layout == "zigzag" and seqlen % 2:
        raise ValueError(f"a zigzag chunk holds two halves: q's seqlen must be even, got {seqlen}")
