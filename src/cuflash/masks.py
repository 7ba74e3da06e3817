"""Block masks for block-sparse attention: which key blocks each query block visits.

A BlockMask is built once and read by the kernels. For every (batch, head, query block) it lists the
key blocks to visit, split as FlexAttention does into

- *full* blocks: every (query, key) pair inside is visible, no element test needed, and
- *partial* blocks: an element mask applies; its bits (block_m x block_n, from the same predicate
  that built the mask, so results are exact) sit in a shared pool,

plus the transposed, key-major lists (for every key block, the query blocks that visit it) that the
backward pass walks. Leading dimensions of size 1 broadcast over batch and heads.

Builders: `BlockMask.from_dense` (a boolean block matrix), `BlockMask.from_predicate` (a vectorised
predicate over element indices, evaluated block row by block row, on the GPU when `xp=cupy`),
`BlockMask.from_cuda` (a cuflash.MaskMod snippet evaluated on every pair in one GPU kernel), and
the patterns `causal`, `sliding_window`, `butterfly` and `local_global_random`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._block_lists import block_lists

# Block sizes: the builders accept multiples of 16 (block_n of 32, for the element bits' 32-bit words); the
# kernels run masks whose blocks are multiples of 64 (_sparse.KERNEL_BLOCK_MULTIPLE).


def _blocks(n: int, size: int) -> int:
    return -(-n // size)


@dataclass(frozen=True)
class BlockMask:
    seqlen_q: int
    seqlen_k: int
    block_m: int
    block_n: int
    # Per (batch', head', query block): counts and key-block indices (ascending, padded with -1).
    full_count: np.ndarray  # int32 (B', H', nq)
    full_index: np.ndarray  # int32 (B', H', nq, nk)
    partial_count: np.ndarray  # int32 (B', H', nq)
    partial_index: np.ndarray  # int32 (B', H', nq, nk)
    partial_slot: np.ndarray  # int32 (B', H', nq, nk): where each listed partial block's bits live
    partial_bits: np.ndarray  # uint32 (n_partial, block_m, block_n / 32): bit j%32 of word j/32 = key j visible
    # Transposed (key-major) lists for the backward: per key block, the query blocks visiting it.
    t_full_count: np.ndarray  # int32 (B', H', nk)
    t_full_index: np.ndarray  # int32 (B', H', nk, nq)
    t_partial_count: np.ndarray  # int32 (B', H', nk)
    t_partial_index: np.ndarray  # int32 (B', H', nk, nq)
    t_partial_slot: np.ndarray  # int32 (B', H', nk, nq)

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def from_block_states(cls, states: np.ndarray, seqlen_q: int, seqlen_k: int, block_m: int, block_n: int,
                          partial_coords: np.ndarray | None = None, partial_words: np.ndarray | None = None):
        """states: int8 (B', H', nq, nk) with 0 = skip, 1 = partial, 2 = full. Each partial block's
        element bits: partial_words[n] (uint32, block_m x block_n / 32; bit j % 32 of word j / 32 set
        when key j of the block is visible) for the block at partial_coords[n] = (b, h, q block, k block)."""
        _check_block_sizes(block_m, block_n)
        states = np.asarray(states, dtype=np.int8)
        if states.ndim != 4:
            raise ValueError(f"block states must have 4 dimensions (batch, heads, q blocks, k blocks), got {states.shape}")
        nq, nk = _blocks(seqlen_q, block_m), _blocks(seqlen_k, block_n)
        if states.shape[2:] != (nq, nk):
            raise ValueError(f"block states must have {nq} x {nk} blocks for seqlens ({seqlen_q}, {seqlen_k}) and "
                             f"blocks ({block_m}, {block_n}), got {states.shape[2:]}")
        partial = states == 1
        n_partial = int(partial.sum())
        coords = np.zeros((0, 4), np.int64) if partial_coords is None else np.asarray(partial_coords).reshape(-1, 4)
        if len(coords) != n_partial or (n_partial and not partial[tuple(coords.T)].all()):
            raise ValueError("every partial block needs its element bits, and only partial blocks have them")
        slots = np.full(states.shape, -1, np.int32)
        slots[tuple(coords.T)] = np.arange(n_partial, dtype=np.int32)
        pool = (np.zeros((0, block_m, block_n // 32), np.uint32) if partial_words is None
                else np.ascontiguousarray(partial_words, np.uint32).reshape(n_partial, block_m, block_n // 32))
        return cls._from_lists(seqlen_q, seqlen_k, block_m, block_n, block_lists(states, slots), pool)

    @classmethod
    def _from_lists(cls, seqlen_q: int, seqlen_k: int, block_m: int, block_n: int, lists, pool):
        fc, fi, pc, pi, ps, tfc, tfi, tpc, tpi, tps = lists
        return cls(seqlen_q, seqlen_k, block_m, block_n, fc, fi, pc, pi, ps, pool, tfc, tfi, tpc, tpi, tps)

    @classmethod
    def from_dense(cls, block_mask, seqlen_q: int, seqlen_k: int, block_m: int = 128, block_n: int = 128):
        """From a boolean (B', H', nq, nk) (or (nq, nk)) block matrix: True blocks are visited in full."""
        m = np.asarray(block_mask, dtype=bool)
        if m.ndim == 2:
            m = m[None, None]
        return cls.from_block_states(np.where(m, 2, 0).astype(np.int8), seqlen_q, seqlen_k, block_m, block_n)

    @classmethod
    def from_cuda(cls, mask_mod, seqlen_q: int, seqlen_k: int, block_m: int = 128, block_n: int = 128,
                  batch: int = 1, nheads: int = 1, device: int | None = None):
        """From a cuflash.MaskMod (a CUDA snippet of b, h, q, kv and its captures), evaluated on every pair on
        the GPU (kernels/mask_blocks.cu): blocks it shows entirely are full, those it shows in part partial
        with their element bits. batch or nheads = 1 builds a mask broadcast over that dimension; device: the
        GPU (default: the captured arrays', else 0)."""
        from . import _mask_blocks

        _check_block_sizes(block_m, block_n)
        return _mask_blocks.build(cls, mask_mod, seqlen_q, seqlen_k, block_m, block_n, batch, nheads, device)

    @classmethod
    def from_predicate(cls, predicate, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, block_m: int = 128,
                       block_n: int = 128, xp=np):
        """From predicate(b, h, q_idx, kv_idx) -> bool array, written with array operations so that it
        broadcasts over index arrays (b: (B,1,1,1), h: (1,H,1,1), q_idx: (1,1,M,1), kv_idx: (1,1,1,N)).
        batch or nheads = 1 builds a mask broadcast over that dimension. It is evaluated one query
        block row at a time (block_m x seqlen_k elements per batch and head), with `xp` = numpy or
        cupy (on the GPU)."""
        _check_block_sizes(block_m, block_n)
        nq, nk = _blocks(seqlen_q, block_m), _blocks(seqlen_k, block_n)
        b = xp.arange(batch).reshape(-1, 1, 1, 1)
        h = xp.arange(nheads).reshape(1, -1, 1, 1)
        kv = xp.arange(nk * block_n).reshape(1, 1, 1, -1)
        weights = xp.asarray((1 << np.arange(32, dtype=np.uint64)).astype(np.uint32))
        states = np.zeros((batch, nheads, nq, nk), np.int8)
        coords, words = [], []
        for qb in range(nq):
            q = xp.arange(qb * block_m, (qb + 1) * block_m).reshape(1, 1, -1, 1)
            inside = (q < seqlen_q) & (kv < seqlen_k)
            visible = xp.broadcast_to(xp.asarray(predicate(b, h, q, kv), dtype=bool), (batch, nheads, block_m, kv.shape[-1]))
            per_block = (visible & inside).reshape(batch, nheads, block_m, nk, block_n)
            any_ = per_block.any(axis=(2, 4))
            # Full: every in-range element visible (out-of-range ones are masked by the lengths anyway).
            all_ = (per_block | ~inside.reshape(1, 1, block_m, nk, block_n)).all(axis=(2, 4))
            row = _to_numpy(xp.where(all_ & any_, 2, xp.where(any_, 1, 0)).astype(xp.int8))
            states[:, :, qb] = row
            bb, hh, kb = np.nonzero(row == 1)
            if len(kb):
                bits = per_block.reshape(batch, nheads, block_m, nk, block_n // 32, 32).astype(xp.uint32) @ weights
                words.append(_to_numpy(bits[xp.asarray(bb), xp.asarray(hh), :, xp.asarray(kb)]))
                coords.append(np.stack([bb, hh, np.full_like(kb, qb), kb], axis=1))
        return cls.from_block_states(states, seqlen_q, seqlen_k, block_m, block_n,
                                     np.concatenate(coords) if coords else None,
                                     np.concatenate(words) if words else None)

    # ---- patterns ------------------------------------------------------------------------------

    @classmethod
    def causal(cls, seqlen_q: int, seqlen_k: int, block_m: int = 128, block_n: int = 128):
        """Query i sees key j iff j <= i + seqlen_k - seqlen_q (bottom-right aligned, as causal=True)."""
        return cls.sliding_window(seqlen_q, seqlen_k, -1, 0, block_m, block_n)

    @classmethod
    def sliding_window(cls, seqlen_q: int, seqlen_k: int, left: int, right: int, block_m: int = 128,
                       block_n: int = 128):
        """Query i sees key j iff i + d - left <= j <= i + d + right, d = seqlen_k - seqlen_q
        (FlashAttention-2's window_size=(left, right); -1 means unbounded on that side)."""
        d = seqlen_k - seqlen_q
        lo = -np.inf if left < 0 else d - left  # bounds on j - i
        hi = np.inf if right < 0 else d + right
        return cls._from_band(lo, hi, seqlen_q, seqlen_k, block_m, block_n)

    @classmethod
    def butterfly(cls, seqlen_q: int, seqlen_k: int, block_m: int = 128, block_n: int = 128):
        """The flat block butterfly pattern (Pixelated Butterfly, used with FlashAttention's block-sparse
        kernels): block (r, c) is visited iff r XOR c is 0 or a power of two."""
        nq, nk = _blocks(seqlen_q, block_m), _blocks(seqlen_k, block_n)
        x = np.arange(nq)[:, None] ^ np.arange(nk)[None, :]
        return cls.from_dense((x & (x - 1)) == 0, seqlen_q, seqlen_k, block_m, block_n)

    @classmethod
    def local_global_random(cls, seqlen_q: int, seqlen_k: int, local_blocks: int = 1, global_blocks: int = 1,
                            random_blocks: int = 1, seed: int = 0, block_m: int = 128, block_n: int = 128):
        """BigBird/Longformer style: each query block visits the key blocks within `local_blocks` of its
        diagonal block, the first `global_blocks` key blocks, `random_blocks` other key blocks drawn
        with `seed`; the first `global_blocks` query blocks visit everything."""
        nq, nk = _blocks(seqlen_q, block_m), _blocks(seqlen_k, block_n)
        r = np.arange(nq)[:, None]
        c = np.arange(nk)[None, :]
        diag = (r * nk) // max(nq, 1)  # the key block on query block r's diagonal
        m = (np.abs(c - diag) <= local_blocks) | (c < global_blocks) | (r < global_blocks)
        rng = np.random.default_rng(seed)
        for row in range(nq):
            free = np.flatnonzero(~m[row])
            m[row, rng.choice(free, size=min(random_blocks, free.size), replace=False)] = True
        return cls.from_dense(m, seqlen_q, seqlen_k, block_m, block_n)

    @classmethod
    def _from_band(cls, lo, hi, seqlen_q, seqlen_k, block_m, block_n):
        """Key j visible to query i iff lo <= j - i <= hi. Over a block, j - i takes every integer in
        [c0 - r1, c1 - r0], so block states follow from the corners and only the O(seqlen / block)
        blocks the band's edges cross need element bits: a 64K-token mask builds in milliseconds."""
        _check_block_sizes(block_m, block_n)
        nq, nk = _blocks(seqlen_q, block_m), _blocks(seqlen_k, block_n)
        r0 = np.arange(nq)[:, None] * block_m
        r1 = np.minimum(r0 + block_m, seqlen_q) - 1
        c0 = np.arange(nk)[None, :] * block_n
        c1 = np.minimum(c0 + block_n, seqlen_k) - 1
        full = (c0 - r1 >= lo) & (c1 - r0 <= hi)
        any_ = (c1 - r0 >= lo) & (c0 - r1 <= hi)
        states = np.where(full, 2, np.where(any_, 1, 0)).astype(np.int8)
        qb, kb = np.nonzero(states == 1)
        i = qb[:, None, None] * block_m + np.arange(block_m)[None, :, None]
        j = kb[:, None, None] * block_n + np.arange(block_n)[None, None, :]
        visible = (j - i >= lo) & (j - i <= hi) & (i < seqlen_q) & (j < seqlen_k)
        coords = np.stack([np.zeros_like(qb), np.zeros_like(qb), qb, kb], axis=1)
        return cls.from_block_states(states[None, None], seqlen_q, seqlen_k, block_m, block_n, coords,
                                     pack_bits(visible))

    # ---- combining -----------------------------------------------------------------------------

    def __and__(self, other: "BlockMask") -> "BlockMask":
        """The intersection: an element is visible iff both masks show it (how `causal=True` composes
        with a block mask). Both need the same seqlens and blocks; batch and heads broadcast."""
        if not isinstance(other, BlockMask):
            return NotImplemented
        if (self.seqlen_q, self.seqlen_k, self.block_m, self.block_n) != (
                other.seqlen_q, other.seqlen_k, other.block_m, other.block_n):
            raise ValueError(f"cannot intersect masks of seqlens ({self.seqlen_q}, {self.seqlen_k}) and blocks "
                             f"({self.block_m}, {self.block_n}) with seqlens ({other.seqlen_q}, {other.seqlen_k}) "
                             f"and blocks ({other.block_m}, {other.block_n})")
        a, b = np.broadcast_arrays(self.to_dense(), other.to_dense())
        states = np.minimum(a, b)  # skip (0) wins, then partial (1), full (2) only if both are full
        coords = np.argwhere(states == 1)
        words = self.block_words(coords) & other.block_words(coords)
        empty = ~words.any(axis=(1, 2))
        states[tuple(coords[empty].T)] = 0  # partial blocks whose elements all vanished
        return BlockMask.from_block_states(states, self.seqlen_q, self.seqlen_k, self.block_m, self.block_n,
                                           coords[~empty], words[~empty])

    def block_words(self, coords: np.ndarray) -> np.ndarray:
        """Element bits (n, block_m, block_n / 32) of the blocks at coords (n, 4) = (b, h, q block,
        k block) (b and h broadcast): all ones for a full block, zeros for a skipped one."""
        coords = np.asarray(coords, np.int64).reshape(-1, 4)
        b = np.where(self.shape[0] == 1, 0, coords[:, 0])
        h = np.where(self.shape[1] == 1, 0, coords[:, 1])
        where = (b, h, coords[:, 2], coords[:, 3])
        slots = self.slot_matrix()[where]
        words = np.zeros((len(coords), self.block_m, self.block_n // 32), np.uint32)
        words[self.to_dense()[where] == 2] = 0xFFFFFFFF
        words[slots >= 0] = self.partial_bits[slots[slots >= 0]]
        return words

    def slot_matrix(self) -> np.ndarray:
        """int32 (B', H', nq, nk): each partial block's slot in partial_bits, -1 elsewhere."""
        slots = np.full(self.shape, -1, np.int32)
        b, h, q, s = np.nonzero(np.arange(self.partial_index.shape[-1]) < self.partial_count[..., None])
        slots[b, h, q, self.partial_index[b, h, q, s]] = self.partial_slot[b, h, q, s]
        return slots

    # ---- reading -------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """(B', H', query blocks, key blocks)."""
        return (*self.full_count.shape, self.full_index.shape[-1])

    @property
    def density(self) -> float:
        """Fraction of (query block, key block) pairs visited (full or partial)."""
        total = np.prod(self.shape)
        return float((self.full_count.sum() + self.partial_count.sum()) / total) if total else 0.0

    def to_dense(self) -> np.ndarray:
        """int8 (B', H', nq, nk): 0 skipped, 1 partial, 2 full."""
        states = np.zeros(self.shape, np.int8)
        for index, count, value in ((self.partial_index, self.partial_count, 1), (self.full_index, self.full_count, 2)):
            valid = np.arange(index.shape[-1]) < count[..., None]
            b, h, q, slot = np.nonzero(valid)
            states[b, h, q, index[b, h, q, slot]] = value
        return states

    def to_element_mask(self) -> np.ndarray:
        """bool (B', H', seqlen_q, seqlen_k): the exact mask the kernels apply."""
        states = self.to_dense()
        bm, bn = self.block_m, self.block_n
        out = np.repeat(np.repeat(states == 2, bm, axis=2), bn, axis=3)
        valid = np.arange(self.partial_index.shape[-1]) < self.partial_count[..., None]
        for b, h, q, s in zip(*np.nonzero(valid)):
            k = self.partial_index[b, h, q, s]
            out[b, h, q * bm:(q + 1) * bm, k * bn:(k + 1) * bn] = unpack_bits(self.partial_bits[self.partial_slot[b, h, q, s]])
        return out[:, :, :self.seqlen_q, :self.seqlen_k]

    def check(self, batch: int, nheads: int, seqlen_q: int, seqlen_k: int) -> None:
        """ValueError unless this mask fits q (batch, seqlen_q, nheads, .) and k (batch, seqlen_k, ., .)."""
        mb, mh = self.shape[:2]
        if (self.seqlen_q, self.seqlen_k) != (seqlen_q, seqlen_k):
            raise ValueError(f"block_mask was built for seqlens ({self.seqlen_q}, {self.seqlen_k}), "
                             f"q and k have ({seqlen_q}, {seqlen_k})")
        if mb not in (1, batch) or mh not in (1, nheads):
            raise ValueError(f"block_mask's (batch, heads) = ({mb}, {mh}) must be 1 or match q's ({batch}, {nheads})")

    def __repr__(self) -> str:
        b, h, nq, nk = self.shape
        head = (f"BlockMask(batch={b}, heads={h}, seqlens=({self.seqlen_q}, {self.seqlen_k}), "
                f"blocks=({self.block_m}, {self.block_n}) -> {nq} x {nk}, density={self.density:.3f}, "
                f"full={int(self.full_count.sum())}, partial={int(self.partial_count.sum())})")
        if nq > 32 or nk > 32:
            return head
        chars = np.array([" ", "░", "█"])
        picture = "\n".join("  " + "".join(chars[row]) for row in self.to_dense()[0, 0])
        return head + "\n" + picture


def _check_block_sizes(block_m: int, block_n: int) -> None:
    for name, v in (("block_m", block_m), ("block_n", block_n)):
        if not isinstance(v, (int, np.integer)) or v < 16 or v % 16:
            raise ValueError(f"{name} must be a positive multiple of 16 (the kernels run multiples of 64), got {v}")
    if block_n % 32:
        raise ValueError(f"block_n must be a multiple of 32 (element bits are packed in 32-bit words), got {block_n}")


def pack_bits(visible: np.ndarray) -> np.ndarray:
    """bool (..., rows, cols) -> uint32 (..., rows, cols / 32), bit c % 32 of word c / 32 = column c."""
    *lead, cols = visible.shape
    v = visible.reshape(*lead, cols // 32, 32).astype(np.uint64) << np.arange(32, dtype=np.uint64)
    return v.sum(-1).astype(np.uint32)


def unpack_bits(words: np.ndarray) -> np.ndarray:
    return ((words[..., None] >> np.arange(32, dtype=np.uint32)) & 1).astype(bool).reshape(*words.shape[:-1], -1)


def _to_numpy(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)
