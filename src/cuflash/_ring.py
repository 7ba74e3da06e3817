"""Ring attention: a sequence split over the ranks of a ring, each holding one chunk of Q, K and V.

The K/V chunks travel around the ring; at each step a rank attends its queries to the chunk in hand and
merges the partial result into its running (out, log-sum-exp) exactly. The backward sends the chunks
around again, each with the fp32 partial gradients (dK, dV) that the ranks it visited added to it; after
the last step they reach the chunk's owner. The plan of each step is plain Python; the loops work on
PyTorch tensors (jax_distributed.py has JAX's) but know neither collectives nor kernels: a ring
(`pass_on`) and the attention of one chunk pair (`attend`, `attend_backward`) are handed in, so the same
loops run over NCCL on GPUs and over in-process queues or gloo in the tests.

Layouts of a sequence of n tokens over W ranks (shard, unshard):
- "contiguous": rank r holds tokens [r n / W, (r + 1) n / W). Causal attention then leaves a rank with
  more work the later its chunk: rank W - 1 attends to every chunk, rank 0 to its own only.
- "zigzag": the sequence is cut into 2W chunks and rank r holds chunks r and 2W - 1 - r, one early and one
  late, so every rank does the same causal work. Its local tokens stay in sequence order, so within its
  own chunk pair a plain causal mask is exact; against an earlier rank's pair all its queries see the
  first chunk; against a later one only its second chunk's queries see anything, and then all of it.
"""
from __future__ import annotations

from dataclasses import dataclass

LAYOUTS = ("zigzag", "contiguous")


@dataclass(frozen=True)
class Step:
    """What a rank computes at one step: its query rows q_rows against rows kv_rows of the chunk in hand
    (rank `source`'s), causal (top-left aligned; the two ranges have equal lengths) or in full."""
    q_rows: slice
    kv_rows: slice
    causal: bool
    source: int = 0


def plan(rank: int, source: int, seqlen: int, causal: bool, layout: str) -> Step | None:
    """The step of `rank` holding the K/V chunk of rank `source` (local chunks of `seqlen` tokens each),
    or None where none of its queries sees any of those keys."""
    every = slice(0, seqlen)
    if not causal:
        return Step(every, every, False, source)
    if source == rank:
        return Step(every, every, True, source)
    if layout == "contiguous":
        return Step(every, every, False, source) if source < rank else None
    half = seqlen // 2
    if source < rank:
        return Step(every, slice(0, half), False, source)
    return Step(slice(half, seqlen), every, False, source)


def positions(rank: int, world_size: int, seqlen: int, layout: str):
    """The positions in the whole sequence of the `seqlen` tokens rank `rank` holds (increasing)."""
    import numpy as np

    if layout == "contiguous":
        return np.arange(rank * seqlen, (rank + 1) * seqlen)
    half = seqlen // 2
    late = 2 * world_size - 1 - rank
    return np.concatenate([np.arange(rank * half, (rank + 1) * half), np.arange(late * half, (late + 1) * half)])


def document_offsets(cu_seqlens, q_pos, kv_pos, keep_empty: bool = False):
    """Packed documents (cu_seqlens: their offsets in the whole sequence) cut down to one chunk pair:
    (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) of the queries at positions q_pos and the keys
    at kv_pos (both increasing), every document that has either (keep_empty: every document), in order; a
    document's queries see only its own keys. Within a chunk pair the positions of either side are in
    order, so each document's rows are contiguous."""
    import numpy as np

    cu = np.asarray(cu_seqlens, dtype=np.int64)
    docs = len(cu) - 1
    doc_of = lambda pos: np.searchsorted(cu, pos, side="right") - 1  # noqa: E731
    q_counts = np.bincount(doc_of(q_pos), minlength=docs)
    kv_counts = np.bincount(doc_of(kv_pos), minlength=docs)
    present = (q_counts >= 0) if keep_empty else (q_counts > 0) | (kv_counts > 0)
    q_counts, kv_counts = q_counts[present], kv_counts[present]
    offsets = lambda counts: np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)  # noqa: E731
    return offsets(q_counts), offsets(kv_counts), int(q_counts.max(initial=0)), int(kv_counts.max(initial=0))


class MaskParts:
    """A block mask of the whole sequence (a cuflash.BlockMask, world_size x seqlen square) cut to chunk pairs:
    part(rank, step) is the BlockMask of the pair's blocks, with their element bits, or None where the mask
    leaves the pair empty; built on the host once per pair. The chunks' pieces (seqlen, or seqlen / 2 with
    zigzag) must be whole blocks."""

    def __init__(self, mask, size: int, seqlen: int, layout: str):
        piece = seqlen // 2 if layout == "zigzag" else seqlen
        whole = size * seqlen
        if (mask.seqlen_q, mask.seqlen_k) != (whole, whole):
            raise ValueError(f"block_mask must cover the whole sequence ({whole}, {whole}), got "
                             f"({mask.seqlen_q}, {mask.seqlen_k})")
        if piece % mask.block_m or piece % mask.block_n:
            raise ValueError(f"block_mask's blocks ({mask.block_m}, {mask.block_n}) must divide the chunks' "
                             f"pieces of {piece} tokens ({layout})")
        self.mask, self.size, self.seqlen, self.layout = mask, size, seqlen, layout
        self.states = mask.to_dense()
        self.parts = {}

    def part(self, rank: int, step: Step):
        import numpy as np

        from .masks import BlockMask

        key = (rank, step.source, step.q_rows.start, step.q_rows.stop, step.kv_rows.start, step.kv_rows.stop)
        if key not in self.parts:
            m, pos = self.mask, lambda r: positions(r, self.size, self.seqlen, self.layout)  # noqa: E731
            q_pos, kv_pos = pos(rank)[step.q_rows], pos(step.source)[step.kv_rows]
            q_blocks, kv_blocks = q_pos[::m.block_m] // m.block_m, kv_pos[::m.block_n] // m.block_n
            states = self.states[:, :, q_blocks][:, :, :, kv_blocks]
            coords = np.argwhere(states == 1)
            words = m.block_words(np.stack([coords[:, 0], coords[:, 1], q_blocks[coords[:, 2]],
                                            kv_blocks[coords[:, 3]]], 1))
            self.parts[key] = None if not states.any() else BlockMask.from_block_states(
                states, len(q_pos), len(kv_pos), m.block_m, m.block_n, coords, words)
        return self.parts[key]


def check_layout(layout: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")


def merge(out, lse, part_out, part_lse) -> None:
    """Fold a partial result into the running one, in place: out (batch, seqlen, heads, d) and lse (batch,
    heads, seqlen) in float32 become those of the union of both key sets. Rows that saw no key on either
    side (lse = -inf) stay 0 and -inf. On a GPU one kernel does it (kernels/ring_merge.cu)."""
    import torch

    if out.is_cuda:
        return _merge_on_gpu(out, lse, part_out, part_lse)
    new = torch.logaddexp(lse, part_lse)
    ref = torch.where(new == float("-inf"), torch.zeros_like(new), new)  # both empty: weights exp(-inf) = 0
    old_weight = torch.exp(lse - ref).transpose(1, 2).unsqueeze(-1)
    part_weight = torch.exp(part_lse - ref).transpose(1, 2).unsqueeze(-1)
    out.mul_(old_weight).add_(part_out.float() * part_weight)
    lse.copy_(new)


def _merge_on_gpu(out, lse, part_out, part_lse) -> None:
    from . import _bridge, _engine
    from ._tiles import DTYPES

    arrays = [_bridge.describe(x, name) for x, name in
              ((out, "out"), (lse, "lse"), (part_out, "part_out"), (part_lse, "part_lse"))]
    o, l, p, pl = arrays
    if o.dtype != "float32" or l.dtype != "float32" or pl.dtype != "float32" or p.dtype not in DTYPES:
        raise TypeError(f"merge: out, lse and part_lse must be float32 and part_out one of {DTYPES}, got "
                        f"{o.dtype}, {l.dtype}, {pl.dtype} and {p.dtype}")
    batch, seqlen, heads, _ = o.shape
    if p.shape != o.shape or l.shape != (batch, heads, seqlen) or pl.shape != l.shape:
        raise ValueError(f"merge: shapes out {o.shape}, part_out {p.shape}, lse {l.shape}, part_lse {pl.shape} "
                         f"do not agree")
    if len({a.device for a in arrays}) != 1:
        raise ValueError("merge: the arrays are on different devices")
    if o.strides[3] != 1:
        raise ValueError("merge: out's head dimension must have stride 1")
    if p.strides[3] != 1:  # (the kernel reads a row's elements one after another)
        part_out = part_out.contiguous()
        p = _bridge.describe(part_out, "part_out")
    _engine.ring_merge(o, l, p, pl, _bridge.current_stream(o))


def ring_forward(q, k, v, ring, attend, causal: bool, layout: str, softmax_scale: float):
    """(out in q's dtype, lse float32 (batch, heads, seqlen)) of this rank's queries against the whole
    sequence. attend(q, k, v, step, softmax_scale) -> (out, lse) is the attention of one chunk pair (the
    rows `step` names), or None where a mask leaves its queries nothing of those keys."""
    import torch

    batch, seqlen, heads, _ = q.shape
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, heads, seqlen), float("-inf"), dtype=torch.float32, device=q.device)
    kv = (k, v)
    for step in range(ring.size):
        # the next chunk travels while this one is computed
        incoming = ring.pass_on(kv) if step + 1 < ring.size else None
        s = plan(ring.rank, (ring.rank - step) % ring.size, seqlen, causal, layout)
        if s is not None:
            part = attend(q[:, s.q_rows], kv[0][:, s.kv_rows], kv[1][:, s.kv_rows], s, softmax_scale)
            if part is not None:
                merge(out[:, s.q_rows], lse[:, :, s.q_rows], *part)
        if incoming is not None:
            kv = incoming.wait()
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, ring, attend_backward, causal: bool, layout: str, softmax_scale: float):
    """(dq, dk, dv) of this rank's chunks. attend_backward(dout, q, k, v, out, lse, step, softmax_scale)
    -> (dq, dk, dv) is the backward of one chunk pair given the whole row's out and lse, which make its
    probabilities the full softmax's (None where attend gave None)."""
    import torch

    seqlen = q.shape[1]
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    kv, incoming_grads = (k, v), None
    for step in range(ring.size):
        incoming = ring.pass_on(kv) if step + 1 < ring.size else None
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        s = plan(ring.rank, (ring.rank - step) % ring.size, seqlen, causal, layout)
        if s is not None:
            r, c = s.q_rows, s.kv_rows
            parts = attend_backward(dout[:, r], q[:, r], kv[0][:, c], kv[1][:, c], out[:, r],
                                    lse[:, :, r].contiguous(), s, softmax_scale)
            if parts is not None:
                dq[:, r] += parts[0]
                dk[:, c] += parts[1]
                dv[:, c] += parts[2]
        if incoming_grads is not None:  # what the ranks before added for the chunk in hand
            earlier_dk, earlier_dv = incoming_grads.wait()
            dk += earlier_dk
            dv += earlier_dv
        if ring.size == 1:
            return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
        incoming_grads = ring.pass_on((dk, dv))  # after the last step: this rank's own chunk's, complete
        if incoming is not None:
            kv = incoming.wait()
    dk, dv = incoming_grads.wait()
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
