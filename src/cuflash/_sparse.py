"""Block masks as the kernels read them (kernels/block_sparse.cuh).

A cuflash.BlockMask is packed, once per device, GQA group size and framework, into one int32 buffer:

- query-major lists (forward and dQ kernels): per (batch', head', query block) the key blocks to
  visit, partial ones first, each with its bit slot (-1 for a full block);
- key-major lists (dK/dV kernel): per (batch', K/V head', key block) the (query head of the group,
  query block) pairs that visit it, encoded g << group_shift | query block (a shift, so that the
  kernel needs no division);
- per (batch', head'), the query blocks by descending count: the forward and dQ kernels run the rows
  with the longest lists first (the dK/dV kernel runs key blocks in order: in a causal mask, the
  first are the heaviest);
- the partial blocks' element bits, query-major (rows are queries) and transposed (rows are keys), so
  that each kernel reads whole 32-bit words along its own columns.

`causal=True` with a block mask runs the intersection of the two, built here and cached, so the
kernels only ever see one mask.
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np

from .masks import BlockMask, pack_bits, unpack_bits

KERNEL_BLOCK_MULTIPLE = 64  # block sizes the kernel tiles divide: 64, 128, 192, 256, ...


@dataclass(frozen=True)
class ListsLayout:
    """Where one direction's lists live in the packed buffer (offsets in int32 elements)."""

    count: int
    index: int
    slot: int
    order: int  # -1: none (the key-major lists)
    b_stride: int
    h_stride: int
    cap: int
    group_shift: int  # key-major: entry = g << group_shift | query block (0 for query-major lists)


@dataclass(frozen=True)
class PackedLayout:
    query: ListsLayout
    key: ListsLayout
    bits: int  # (slots, block_m, block_n / 32) words: rows are queries
    bits_t: int  # (slots, block_n, block_m / 32) words: rows are keys
    block_m: int
    block_n: int

    def to_ints(self) -> list[int]:
        """A flat list (a torch custom op argument)."""
        return [*vars(self.query).values(), *vars(self.key).values(), self.bits, self.bits_t, self.block_m,
                self.block_n]

    @classmethod
    def from_ints(cls, ints) -> "PackedLayout":
        ints, n = [int(i) for i in ints], len(dataclasses.fields(ListsLayout))
        return cls(ListsLayout(*ints[:n]), ListsLayout(*ints[n:2 * n]), *ints[2 * n:])

    def lists_args(self, ptr: int, key_major: bool) -> tuple:
        """BlockLists' fields (kernels/block_sparse.cuh, in order) for the packed buffer at `ptr`."""
        lay, bits = (self.key, self.bits_t) if key_major else (self.query, self.bits)
        row_block, col_block = (self.block_n, self.block_m) if key_major else (self.block_m, self.block_n)
        return (ptr + 4 * lay.count, ptr + 4 * lay.index, ptr + 4 * lay.slot, ptr + 4 * bits, 0 if lay.order < 0 else ptr + 4 * lay.order,
                lay.b_stride, lay.h_stride, lay.cap, row_block, col_block, lay.group_shift)


def check_mask(mask, batch: int, nheads: int, seqlen_q: int, seqlen_k: int) -> None:
    """TypeError/ValueError naming block_mask unless the kernels can run it on this problem."""
    if not isinstance(mask, BlockMask):
        raise TypeError(f"block_mask must be a cuflash.BlockMask, got {type(mask).__module__}.{type(mask).__name__}")
    try:
        mask.check(batch, nheads, seqlen_q, seqlen_k)
    except ValueError as e:
        raise ValueError(f"block_mask: {e}") from None
    for name, size in (("block_m", mask.block_m), ("block_n", mask.block_n)):
        if size % KERNEL_BLOCK_MULTIPLE:
            raise ValueError(f"block_mask.{name} must be a multiple of {KERNEL_BLOCK_MULTIPLE} for the kernels "
                             f"(their tiles divide 64), got {size}")


def effective_mask(mask: BlockMask, causal: bool) -> BlockMask:
    """The mask the kernels run: `mask`, or its intersection with the causal mask (cached on it)."""
    if not causal:
        return mask
    cache = _cache_of(mask)
    if "causal" not in cache:
        cache["causal"] = mask & BlockMask.causal(mask.seqlen_q, mask.seqlen_k, mask.block_m, mask.block_n)
    return cache["causal"]


def window_mask(block_mask, window_size, q, k):
    """(block_mask, window) for the kernels: window_size = (left, right) is FlashAttention-2's sliding
    window (query i sees key j iff i + d - left <= j <= i + d + right, d = seqlen_k - seqlen_q, -1
    unbounded). Without a block mask the kernels run it as their band: (None, window). With one, it is
    intersected into the mask: (mask & window, (-1, -1))."""
    window = check_window(window_size)
    if window == (-1, -1) or block_mask is None:
        return block_mask, window
    for x, name in ((q, "q"), (k, "k")):
        if len(getattr(x, "shape", ())) != 4:
            raise ValueError(f"{name} must have 4 dimensions (batch, seqlen, nheads, headdim), got "
                             f"shape {getattr(x, 'shape', None)}")
    seqlen_q, seqlen_k = int(q.shape[1]), int(k.shape[1])
    mask_bh = block_mask.shape[:2] if isinstance(block_mask, BlockMask) else (1, 1)
    check_mask(block_mask, *mask_bh, seqlen_q, seqlen_k)  # batch and heads are checked with the problem
    cache = _cache_of(block_mask)
    key = ("window", *window)
    if key not in cache:
        cache[key] = block_mask & _window(seqlen_q, seqlen_k, *window, block_mask.block_m, block_mask.block_n)
    return cache[key], (-1, -1)


@functools.lru_cache(maxsize=64)
def _window(seqlen_q, seqlen_k, left, right, block_m, block_n) -> BlockMask:
    return BlockMask.sliding_window(seqlen_q, seqlen_k, left, right, block_m, block_n)


def check_window(window_size) -> tuple[int, int]:
    """window_size as a (left, right) pair of ints >= -1; ValueError otherwise."""
    try:
        left, right = (int(w) for w in window_size)
        ok = all(w == x and w >= -1 for w, x in zip((left, right), window_size))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"window_size must be a pair (left, right) of ints >= -1, got {window_size!r}")
    return left, right


def varlen_mask(block_mask, window_size, causal: bool, host_lengths, max_seqlen_q: int, max_seqlen_k: int):
    """(block mask or None, causal, window) that the kernels run for packed sequences. Without a block
    mask, causal and the window go to the kernels' band, which aligns them to each sequence's
    bottom-right corner itself. A block mask's indices are relative to each sequence's start (shape:
    seqlens (max_seqlen_q, max_seqlen_k), batch 1 or one per sequence); a window, or causal, together
    with one depends on each sequence's own lengths: it becomes a per-sequence band mask intersected
    with the block mask, for which host_lengths() -> (lengths_q, lengths_k) reads cu_seqlens on the
    host; causal and the window are then part of the mask and the kernels run without them."""
    left, right = check_window(window_size)
    if block_mask is None:  # the kernels' band runs causal and the window, per sequence
        return None, causal, (left, right)
    mask_bh = block_mask.shape[:2] if isinstance(block_mask, BlockMask) else (1, 1)
    check_mask(block_mask, *mask_bh, max_seqlen_q, max_seqlen_k)  # batch and heads: with the problem
    if (left, right) == (-1, -1) and not causal:
        return block_mask, causal, (-1, -1)
    if causal:  # FlashAttention-2: causal is a window with right = 0
        right = 0 if right == -1 else min(right, 0)
    lengths_q, lengths_k = host_lengths()
    for lengths, most, name in ((lengths_q, max_seqlen_q, "q"), (lengths_k, max_seqlen_k, "k")):
        if max(lengths, default=0) > most:
            raise ValueError(f"cu_seqlens_{name} holds a sequence of {max(lengths)} tokens, longer than "
                             f"max_seqlen_{name} = {most}")
    band = _varlen_band(tuple(lengths_q), tuple(lengths_k), max_seqlen_q, max_seqlen_k, left, right,
                        block_mask.block_m, block_mask.block_n)
    cache = _cache_of(block_mask)
    key = ("varlen", tuple(lengths_q), tuple(lengths_k), left, right)
    if key not in cache:
        cache[key] = block_mask & band
    return cache[key], False, (-1, -1)


@functools.lru_cache(maxsize=16)
def _varlen_band(lengths_q, lengths_k, max_seqlen_q, max_seqlen_k, left, right, block_m, block_n) -> BlockMask:
    """One band (window) mask per packed sequence, each for its own lengths, in a (batch, 1) mask of
    seqlens (max_seqlen_q, max_seqlen_k)."""
    nq, nk = -(-max_seqlen_q // block_m), -(-max_seqlen_k // block_n)
    states = np.zeros((len(lengths_q), 1, nq, nk), np.int8)
    coords, words = [], []
    for b, (sq, sk) in enumerate(zip(lengths_q, lengths_k)):
        if sq == 0 or sk == 0:
            continue
        own = _window(sq, sk, left, right, block_m, block_n)
        dense = own.to_dense()
        states[b, 0, :dense.shape[2], :dense.shape[3]] = dense[0, 0]
        partial = np.argwhere(dense == 1)
        if len(partial):
            words.append(own.block_words(partial))
            partial[:, 0] = b
            coords.append(partial)
    return BlockMask.from_block_states(states, max_seqlen_q, max_seqlen_k, block_m, block_n,
                                       np.concatenate(coords) if coords else None,
                                       np.concatenate(words) if words else None)


def pack(mask: BlockMask, kv_group: int) -> tuple[np.ndarray, PackedLayout]:
    """(int32 buffer, layout) for a problem whose K/V heads serve `kv_group` query heads each."""
    states = mask.to_dense()
    slots = mask.slot_matrix()
    mb, mh, nq, nk = states.shape
    q_count, q_index, q_slot = _entries(states, slots)

    t_states, t_slots = states.transpose(0, 1, 3, 2), slots.transpose(0, 1, 3, 2)  # (B', H', nk, nq)
    if mh == 1:  # every query head of a group visits the same lists
        t_states, t_slots = np.tile(t_states, (1, 1, 1, kv_group)), np.tile(t_slots, (1, 1, 1, kv_group))
    else:  # merge the group's heads: row (b, K/V head, key block), entry g * nq + query block
        hk = mh // kv_group

        def merge(x):
            return x.reshape(mb, hk, kv_group, nk, nq).transpose(0, 1, 3, 2, 4).reshape(mb, hk, nk, kv_group * nq)

        t_states, t_slots = merge(t_states), merge(t_slots)
    k_count, k_index, k_slot = _entries(t_states, t_slots)
    group_shift = max(nq - 1, 0).bit_length()  # entry g * nq + query block -> g << shift | query block
    k_index = np.where(k_index >= 0, (k_index // max(nq, 1) << group_shift) | (k_index % max(nq, 1)), -1)

    bits = mask.partial_bits
    bits_t = (pack_bits(unpack_bits(bits).transpose(0, 2, 1)) if len(bits)
              else np.zeros((0, mask.block_n, mask.block_m // 32), np.uint32))
    parts = [q_count, q_index, q_slot, _heaviest_first(q_count), k_count, k_index.astype(np.int32), k_slot,
             bits.view(np.int32), bits_t.view(np.int32)]
    offsets = [int(o) for o in np.cumsum([0] + [p.size for p in parts])]
    # Row strides: 0 where the mask broadcasts over batch or heads.
    query = ListsLayout(*offsets[:4], mh * nq if mb > 1 else 0, nq if mh > 1 else 0, nk, 0)
    key_heads = t_states.shape[1]
    key = ListsLayout(*offsets[4:7], -1, key_heads * nk if mb > 1 else 0, nk if mh > 1 else 0, t_states.shape[-1],
                      group_shift)
    buffer = np.concatenate([p.reshape(-1) for p in parts] + [np.zeros(1, np.int32)])  # never empty
    return buffer, PackedLayout(query, key, offsets[7], offsets[8], mask.block_m, mask.block_n)


def _heaviest_first(count: np.ndarray) -> np.ndarray:
    """Per (batch', head'), the rows by descending count (ties in row order)."""
    return np.argsort(-count, axis=-1, kind="stable").astype(np.int32)


def device_mask(mask, causal: bool, batch: int, nheads: int, nheads_k: int, seqlen_q: int, seqlen_k: int,
                device: int, framework: str):
    """Check a block mask against a problem's shape; (its packed lists on `device` in `framework`'s type,
    their layout), built once per mask."""
    check_mask(mask, batch, nheads, seqlen_q, seqlen_k)
    return device_lists(mask, causal, nheads // nheads_k, device, framework)


def device_lists(mask: BlockMask, causal: bool, kv_group: int, device: int, framework: str):
    """(array holding the packed lists on `device` in `framework`'s type, layout), built once."""
    mask = effective_mask(mask, causal)
    cache = _cache_of(mask)
    key = (device, kv_group, framework)
    if key not in cache:
        buffer, layout = pack(mask, kv_group)
        cache[key] = (_upload(buffer, device, framework), layout)
    return cache[key]


def _upload(buffer: np.ndarray, device: int, framework: str):
    if framework == "torch":
        import torch

        return torch.from_numpy(buffer).to(f"cuda:{device}")
    if framework == "jax":
        import jax

        gpus = [d for d in jax.devices() if d.id == device]
        # Placed now even when first asked for while tracing (jit, shard_map): the cached array is a
        # constant, not a tracer that later calls would find.
        with jax.ensure_compile_time_eval():
            return jax.device_put(buffer, gpus[0] if gpus else None)
    import cupy

    with cupy.cuda.Device(device):
        return cupy.asarray(buffer)


def _cache_of(mask: BlockMask) -> dict:
    cache = mask.__dict__.get("_kernel_cache")
    if cache is None:
        cache = {}
        object.__setattr__(mask, "_kernel_cache", cache)  # BlockMask is frozen; this is derived data
    return cache


def _entries(states: np.ndarray, slots: np.ndarray):
    """Per row of (..., rows, cols) block states: (count, index, slot) with partial blocks first, then
    full ones, each ascending; padded with -1."""
    cols = states.shape[-1]
    pos = np.arange(cols)
    order_key = np.where(states == 1, pos, np.where(states == 2, cols + pos, 2 * cols + pos))
    order = np.argsort(order_key, axis=-1, kind="stable").astype(np.int32)
    count = (states > 0).sum(axis=-1).astype(np.int32)
    valid = pos < count[..., None]
    index = np.where(valid, order, -1).astype(np.int32)
    slot = np.where(valid, np.take_along_axis(slots, order, axis=-1), -1).astype(np.int32)
    return count, index, slot
