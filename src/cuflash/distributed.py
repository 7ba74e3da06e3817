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

__all__ = ["ring_flash_attn_func", "shard", "unshard", "LAYOUTS"]


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


def _cuflash_attend(q, k, v, causal, softmax_scale):
    from .api import flash_attn_func

    out, lse, _ = flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal, return_attn_probs=True)
    return out, lse


def _cuflash_attend_backward(dout, q, k, v, out, lse, causal, softmax_scale, deterministic):
    from .api import flash_attn_backward

    return flash_attn_backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal,
                               deterministic=deterministic)


# The per-chunk attention and its backward: cuflash's kernels. (The tests run the same ring over gloo on
# CPUs with a float64 reference in their place.)
_LOCAL = (_cuflash_attend, _cuflash_attend_backward)


def _ring_function():
    import torch

    class RingAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, group, causal, softmax_scale, layout, deterministic):
            ring = _TorchRing(group)
            attend, attend_backward = _LOCAL
            out, lse = _ring.ring_forward(q, k, v, ring, attend, causal, layout, softmax_scale)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.ring, ctx.args = ring, (causal, layout, softmax_scale)
            ctx.attend_backward = lambda *chunks: attend_backward(*chunks, deterministic)
            ctx.mark_non_differentiable(lse)
            return out, lse

        @staticmethod
        def backward(ctx, dout, _dlse):
            q, k, v, out, lse = ctx.saved_tensors
            dq, dk, dv = _ring.ring_backward(dout, q, k, v, out, lse, ctx.ring, ctx.attend_backward, *ctx.args)
            return dq, dk, dv, None, None, None, None, None

    return RingAttention


_RING_FUNCTION = None


def ring_flash_attn_func(q, k, v, group=None, causal: bool = False, softmax_scale: float | None = None,
                         layout: str = "zigzag", deterministic: bool = False, return_lse: bool = False):
    """Exact attention of this rank's queries to the keys of every rank of `group` (default: the world),
    differentiable (the backward sends the K/V chunks around again with their partial gradients).

    q: (batch, seqlen, nheads, headdim), k and v: (batch, seqlen, nheads_k, headdim), PyTorch CUDA tensors
    (float16, bfloat16 or float32), this rank's chunks in `layout` (shard): every rank the same shapes.
    causal=True masks the future of the whole sequence. GQA/MQA as in flash_attn_func. deterministic=True:
    bitwise repeatable gradients (the ring adds the chunks' parts in a fixed order, and each chunk pair's
    backward is flash_attn_backward's deterministic one). Returns out like q, or (out, lse) with lse float32
    (batch, nheads, seqlen) of the whole rows. Every rank of the group must call it with the same arguments,
    as for any collective.
    """
    global _RING_FUNCTION
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(q.shape[-1])
    _check_chunks(q, k, v, layout)
    if _RING_FUNCTION is None:
        _RING_FUNCTION = _ring_function()
    out, lse = _RING_FUNCTION.apply(q, k, v, group, causal, float(softmax_scale), layout, deterministic)
    return (out, lse) if return_lse else out


def _check_chunks(q, k, v, layout: str) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be (batch, seqlen, heads, headdim), got shape {tuple(getattr(x, 'shape', ()))}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have one shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must be chunks of one sequence: the same "
                         "batch, seqlen and headdim")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"k's heads ({k.shape[2]}) must divide q's ({q.shape[2]})")
    _ring.check_layout(layout)
    if layout == "zigzag" and q.shape[1] % 2:
        raise ValueError(f"a zigzag chunk holds two halves: q's seqlen must be even, got {q.shape[1]}")
