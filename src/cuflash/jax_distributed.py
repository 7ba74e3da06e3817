"""Context parallelism for JAX: ring attention (`_ring.py`) over a mesh axis, inside jax.shard_map and
jax.jit, with cuflash's kernels on each chunk pair and `jax.lax.ppermute` moving the K/V chunks.

    x = to_layout(x, mesh.shape["sp"])                       # whole sequences, tokens reordered (zigzag)
    attend = jax.shard_map(lambda q, k, v: ring_attention(q, k, v, "sp", causal=True), mesh=mesh,
                           in_specs=P(None, "sp"), out_specs=P(None, "sp"))
    out = from_layout(jax.jit(attend)(q, k, v), mesh.shape["sp"])

Each device holds one chunk of the sequence dimension. Differentiable (jax.grad): the backward sends the
chunks around the ring again with their partial gradients, as the PyTorch version does.
"""
from __future__ import annotations

import functools
import math

from . import _ring

__all__ = ["ring_attention", "to_layout", "from_layout"]


def _order(n: int, world_size: int, layout: str):
    """Token positions of the reordered sequence: device r's chunk is block r of it."""
    import numpy as np

    _ring.check_layout(layout)
    pieces = 2 * world_size if layout == "zigzag" else world_size
    if n % pieces:
        raise ValueError(f"x's {n} tokens do not split into {pieces} equal chunks for {world_size} devices ({layout})")
    return np.concatenate([_ring.positions(r, world_size, n // world_size, layout) for r in range(world_size)])


def to_layout(x, world_size: int, layout: str = "zigzag", axis: int = 1):
    """x (whole sequences along `axis`, not yet sharded) with its tokens reordered so that splitting `axis`
    into world_size equal blocks gives each device its chunk of `layout`."""
    import jax.numpy as jnp

    return jnp.take(x, _order(x.shape[axis], world_size, layout), axis=axis)


def from_layout(x, world_size: int, layout: str = "zigzag", axis: int = 1):
    """The inverse of to_layout (on a gathered array): tokens back in sequence order."""
    import jax.numpy as jnp
    import numpy as np

    return jnp.take(x, np.argsort(_order(x.shape[axis], world_size, layout)), axis=axis)


def _cuflash_attend(q, k, v, causal, softmax_scale, block_mask=None):
    from .jax import attention_parts

    return attention_parts(q, k, v, softmax_scale=softmax_scale, causal=causal, block_mask=block_mask)


def _cuflash_attend_backward(dout, q, k, v, out, lse, causal, softmax_scale, deterministic, block_mask=None):
    from .jax import attention_backward

    return attention_backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal,
                              deterministic=deterministic, block_mask=block_mask)


def _cuflash_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, softmax_scale):
    from .jax import attention_parts

    return attention_parts(q, k, v, softmax_scale=softmax_scale, causal=causal, cu_seqlens=(cu_q, cu_k),
                           max_seqlen=(max_q, max_k))


def _cuflash_varlen_backward(dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, causal, softmax_scale,
                             deterministic):
    from .jax import attention_backward

    return attention_backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal,
                              cu_seqlens=(cu_q, cu_k), max_seqlen=(max_q, max_k), deterministic=deterministic)


# The attention of one chunk pair and its backward, dense and packed: cuflash's kernels (the CPU tests put
# references in their place).
_LOCAL = (_cuflash_attend, _cuflash_attend_backward)
_LOCAL_VARLEN = (_cuflash_varlen, _cuflash_varlen_backward)


class _Dense:
    """Chunk pairs of dense (batch, seqlen, heads, d) chunks. run(...) stages one step's chunk pair (_step)."""

    def __init__(self, size: int, seqlen: int, causal: bool, layout: str):
        self.size, self.seqlen, self.causal, self.layout = size, seqlen, causal, layout

    def run(self, rank, step: int, compute, empty):
        return _step(rank, step, self.size, self.seqlen, self.causal, self.layout, compute, empty)

    def attend(self, q, k, v, s, step, rank, softmax_scale):
        return _LOCAL[0](q, k, v, s.causal, softmax_scale)

    def attend_backward(self, dout, q, k, v, out, lse, s, step, rank, softmax_scale, deterministic):
        return _LOCAL[1](dout, q, k, v, out, lse, s.causal, softmax_scale, deterministic)


class _Masked(_Dense):
    """A block mask of the whole sequence across the ring: each chunk pair runs with the part of it that
    covers the pair (_ring.MaskParts). The parts differ from device to device and the rank is traced, so each
    step stages every device's chunk pair with its concrete part and lax.switch takes this device's; a pair
    the mask leaves empty stages nothing."""

    def __init__(self, mask, size: int, seqlen: int, causal: bool, layout: str):
        super().__init__(size, seqlen, causal, layout)
        self.parts = _ring.MaskParts(mask, size, seqlen, layout)

    def run(self, rank, step: int, compute, empty):
        import jax

        branches = []
        for r in range(self.size):
            s = _ring.plan(r, (r - step) % self.size, self.seqlen, self.causal, self.layout)
            seen = s is not None and self.parts.part(r, s) is not None
            branches.append((lambda s=s, r=r: compute(s, r)) if seen else empty)
        if len(branches) == 1:
            return branches[0]()
        return jax.lax.switch(rank, branches)

    def attend(self, q, k, v, s, step, rank, softmax_scale):
        return _LOCAL[0](q, k, v, s.causal, softmax_scale, block_mask=self.parts.part(rank, s))

    def attend_backward(self, dout, q, k, v, out, lse, s, step, rank, softmax_scale, deterministic):
        return _LOCAL[1](dout, q, k, v, out, lse, s.causal, softmax_scale, deterministic,
                         block_mask=self.parts.part(rank, s))


class _Documents(_Dense):
    """Documents packed into one sequence across the ring (distributed._Documents' twin): each chunk pair one
    packed call over the parts of the documents it holds. The rank is traced here, so the offsets of every
    (step, plan) are tables with a row per rank, built on the host (every document kept, so rows have one
    length) and indexed on the device. The loops see a batch of one."""

    def __init__(self, cu_seqlens, size: int, seqlen: int, causal: bool, layout: str):
        import numpy as np

        super().__init__(size, seqlen, causal, layout)
        if cu_seqlens[-1] != size * seqlen:
            raise ValueError(f"cu_seqlens must end at the whole packed sequence's {size} x {seqlen} tokens, got "
                             f"{cu_seqlens[-1]}")
        pos = [_ring.positions(r, size, seqlen, layout) for r in range(size)]
        self.tables, sizes = {}, [0]
        for step in range(size):
            for rank in range(size):
                source = (rank - step) % size
                s = _ring.plan(rank, source, seqlen, causal, layout)
                if s is None:
                    continue
                cu_q, cu_k, max_q, max_k = _ring.document_offsets(cu_seqlens, pos[rank][s.q_rows],
                                                                  pos[source][s.kv_rows], keep_empty=True)
                sizes += [max_q, max_k]
                table = self.tables.setdefault(self._key(step, s), np.zeros((2, size, len(cu_q)), np.int32))
                table[:, rank] = cu_q, cu_k
        self.max_seqlen = max(sizes)  # (one bound for all: the grid's size)

    @staticmethod
    def _key(step, s):
        return step, s.q_rows.start, s.q_rows.stop, s.kv_rows.start, s.kv_rows.stop, s.causal

    def offsets(self, s, step, rank):
        import jax.numpy as jnp

        table = jnp.asarray(self.tables[self._key(step, s)])
        return table[0, rank], table[1, rank], self.max_seqlen, self.max_seqlen

    def attend(self, q, k, v, s, step, rank, softmax_scale):
        out, lse = _LOCAL_VARLEN[0](q[0], k[0], v[0], *self.offsets(s, step, rank), s.causal, softmax_scale)
        return out[None], lse[None]

    def attend_backward(self, dout, q, k, v, out, lse, s, step, rank, softmax_scale, deterministic):
        grads = _LOCAL_VARLEN[1](dout[0], q[0], k[0], v[0], out[0], lse[0], *self.offsets(s, step, rank), s.causal,
                                 softmax_scale, deterministic)
        return tuple(g[None] for g in grads)


def _step(rank, step: int, size: int, seqlen: int, causal: bool, layout: str, compute, empty):
    """compute(plan, rank) for this device's chunk pair at `step` (the chunk of device rank - step in hand), or
    empty() where it sees nothing. The rank is traced, so where the plan depends on it both plans are
    staged and lax.cond takes one: which one depends only on whether the chunk in hand comes from an earlier
    device."""
    import jax

    if step == 0:
        return compute(_ring.plan(0, 0, seqlen, causal, layout), rank)
    earlier, later = _ring.plan(1, 0, seqlen, causal, layout), _ring.plan(0, 1, seqlen, causal, layout)
    if earlier == later:
        return compute(earlier, rank)
    from_earlier = (rank - step) % size < rank
    branch = lambda plan: (lambda: compute(plan, rank)) if plan is not None else empty  # noqa: E731
    return jax.lax.cond(from_earlier, branch(earlier), branch(later))


def _ring_forward(q, k, v, axis_name, chunks, causal, softmax_scale, layout):
    import jax
    import jax.numpy as jnp

    size, rank = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    ring = [(i, (i + 1) % size) for i in range(size)]
    batch, seqlen, heads, _ = q.shape
    out = jnp.zeros_like(q, jnp.float32)
    lse = jnp.full_like(q, -jnp.inf, jnp.float32, shape=(batch, heads, seqlen))
    # (zeros_like of this device's arrays: values that vary over the mesh axis, as the other branch's do)
    empty = lambda: (jnp.zeros_like(q, jnp.float32), jnp.full_like(lse, -jnp.inf))  # noqa: E731
    kv = (k, v)
    for step in range(size):
        def compute(s, who, kv=kv, step=step):  # who: this device's rank, traced or (a switch's branch) known
            part_out, part_lse = chunks.attend(q[:, s.q_rows], kv[0][:, s.kv_rows], kv[1][:, s.kv_rows], s, step,
                                               who, softmax_scale)
            return (jnp.zeros_like(q, jnp.float32).at[:, s.q_rows].set(part_out.astype(jnp.float32)),
                    jnp.full_like(lse, -jnp.inf).at[:, :, s.q_rows].set(part_lse.astype(jnp.float32)))

        part = chunks.run(rank, step, compute, empty)
        out, lse = _merge(out, lse, *part)
        if step + 1 < size:
            kv = jax.lax.ppermute(kv, axis_name, ring)
    return out.astype(q.dtype), lse


def _merge(out, lse, part_out, part_lse):
    """_ring.merge, functionally: (out, lse) of the union of both key sets; empty rows stay 0 and -inf."""
    import jax.numpy as jnp

    new = jnp.logaddexp(lse, part_lse)
    ref = jnp.where(new == -jnp.inf, 0.0, new)
    weight = lambda x: jnp.exp(x - ref).transpose(0, 2, 1)[..., None]  # noqa: E731
    return out * weight(lse) + part_out * weight(part_lse), new


def _ring_backward(dout, q, k, v, out, lse, axis_name, chunks, causal, softmax_scale, layout, deterministic):
    import jax
    import jax.numpy as jnp

    size, rank = jax.lax.axis_size(axis_name), jax.lax.axis_index(axis_name)
    ring = [(i, (i + 1) % size) for i in range(size)]
    seqlen = q.shape[1]
    zeros = lambda x: jnp.zeros_like(x, jnp.float32)  # noqa: E731 (varying over the mesh axis, as x)
    dq, kv, dkv = zeros(q), (k, v), (zeros(k), zeros(v))
    for step in range(size):
        def compute(s, who, kv=kv, step=step):
            r, c = s.q_rows, s.kv_rows
            parts = chunks.attend_backward(dout[:, r], q[:, r], kv[0][:, c], kv[1][:, c], out[:, r], lse[:, :, r], s,
                                           step, who, softmax_scale, deterministic)
            return tuple(zeros(x).at[:, rows].set(g.astype(jnp.float32))
                         for x, rows, g in zip((q, k, v), (r, c, c), parts))

        part = chunks.run(rank, step, compute, lambda: (zeros(q), zeros(k), zeros(v)))
        dq = dq + part[0]
        dkv = (dkv[0] + part[1], dkv[1] + part[2])  # the chunk in hand's, from every device it has visited
        if size > 1:
            dkv = jax.lax.ppermute(dkv, axis_name, ring)  # after the last step: this device's own chunk's
        if step + 1 < size:
            kv = jax.lax.ppermute(kv, axis_name, ring)
    return dq.astype(q.dtype), dkv[0].astype(k.dtype), dkv[1].astype(v.dtype)


class _Identity:
    """A value as a cache key by identity (a BlockMask holds arrays, so it has no hash of its own)."""

    def __init__(self, value):
        self.value = value

    def __hash__(self):
        return id(self.value)

    def __eq__(self, other):
        return isinstance(other, _Identity) and other.value is self.value


@functools.lru_cache(maxsize=64)
def _differentiable(axis_name, causal: bool, softmax_scale: float, layout: str, deterministic: bool, cu_seqlens,
                    block_mask: _Identity | None):
    """The ring as a function of (q, k, v) with its custom VJP; cu_seqlens (a tuple) packs documents,
    block_mask masks the whole sequence."""
    import jax

    built = {}  # the chunk pairs' offsets or mask parts, per (devices, chunk length): built once

    def chunks(q):
        size, seqlen = jax.lax.axis_size(axis_name), q.shape[1]
        if (size, seqlen) not in built:
            if cu_seqlens is not None:
                built[size, seqlen] = _Documents(cu_seqlens, size, seqlen, causal, layout)
            elif block_mask is not None:
                built[size, seqlen] = _Masked(block_mask.value, size, seqlen, causal, layout)
            else:
                built[size, seqlen] = _Dense(size, seqlen, causal, layout)
        return built[size, seqlen]

    @jax.custom_vjp
    def ring(q, k, v):
        return _ring_forward(q, k, v, axis_name, chunks(q), causal, softmax_scale, layout)

    def ring_fwd(q, k, v):
        out, lse = _ring_forward(q, k, v, axis_name, chunks(q), causal, softmax_scale, layout)
        return (out, lse), (q, k, v, out, lse)

    def ring_bwd(res, cotangents):
        q = res[0]
        return _ring_backward(cotangents[0].astype(q.dtype), *res, axis_name, chunks(q), causal, softmax_scale, layout,
                              deterministic)

    ring.defvjp(ring_fwd, ring_bwd)
    return ring


def ring_attention(q, k, v, axis_name, *, causal: bool = False, softmax_scale: float | None = None,
                   layout: str = "zigzag", deterministic: bool = False, cu_seqlens=None, block_mask=None):
    """(out, lse) of this device's queries against the keys of every device along mesh axis `axis_name`,
    called inside jax.shard_map (under jax.jit or not). q: (batch, seqlen, nheads, headdim), k and v:
    (batch, seqlen, nheads_k, headdim), this device's chunks in `layout` (to_layout). causal=True masks the
    future of the whole sequence; GQA/MQA as in cuflash.jax.attention. Differentiable with respect to q, k
    and v (not through lse); deterministic=True as for the PyTorch version.

    cu_seqlens: documents packed into one sequence (as cuflash.jax.attention packs them): q (tokens, nheads,
    headdim), k and v (tokens, nheads_k, headdim) are this device's chunk of it (to_layout(x, n, axis=0)),
    cu_seqlens the documents' offsets in the whole sequence, concrete ints (a list, tuple or NumPy array: the
    chunk pairs' offsets are tables built when tracing); a query sees only its own document's keys. lse is
    then (nheads, tokens).

    block_mask: a cuflash.BlockMask of the whole sequence (devices x seqlen square, built on the host, e.g.
    BlockMask.sliding_window), intersected with causal, as for ring_flash_attn_func: each chunk pair takes the
    part of it that covers the pair, so the chunks' pieces (seqlen, or seqlen / 2 with zigzag) must be whole
    blocks. Each step stages every device's chunk pair (its part of the mask is known on the host) and a
    lax.switch on the device's index takes its own."""
    import numpy as np

    packed = cu_seqlens is not None
    ndim = 3 if packed else 4
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != ndim:
            shape = "(tokens, heads, headdim)" if packed else "(batch, seqlen, heads, headdim)"
            raise ValueError(f"{name} must be {shape}, got shape {tuple(x.shape)}")
    if (k.shape != v.shape or q.shape[:-2] != k.shape[:-2] or q.shape[-1] != k.shape[-1]
            or q.shape[-2] % k.shape[-2]):
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)} and v {tuple(v.shape)} must be chunks of one "
                         "sequence: k and v alike, the same batch, seqlen and headdim, k's heads dividing q's")
    _ring.check_layout(layout)
    seqlen = q.shape[-3]
    if layout == "zigzag" and seqlen % 2:
        raise ValueError(f"a zigzag chunk holds two halves: q's seqlen must be even, got {seqlen}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if softmax_scale is None else float(softmax_scale)
    offsets = None
    if packed:
        offsets = tuple(int(x) for x in np.asarray(cu_seqlens).reshape(-1))
        if len(offsets) < 2 or offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"cu_seqlens must be non-decreasing offsets from 0, got {list(offsets)[:8]}")
        q, k, v = q[None], k[None], v[None]
    mask = None
    if block_mask is not None:
        if packed:
            raise ValueError("block_mask with cu_seqlens: mask the documents in the block mask instead")
        block_mask.check(q.shape[0], q.shape[2], block_mask.seqlen_q, block_mask.seqlen_k)
        mask = _Identity(block_mask)
    out, lse = _differentiable(axis_name, causal, scale, layout, deterministic, offsets, mask)(q, k, v)
    return (out[0], lse[0]) if packed else (out, lse)
