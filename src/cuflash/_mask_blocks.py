"""BlockMask.from_cuda: a block mask from a mask function (cuflash.MaskMod), built on the GPU.

Two launches of kernels/mask_blocks.cu evaluate the function on every pair: the first classifies each
block (empty, partial, full), the second writes the element bits of the partial blocks into their slots in
the pool (in row-major order of the blocks, as masks.block_lists numbers them). Between them
kernels/mask_lists.cu builds the lists (_block_lists.py's, without its dozens of array operations and
their syncs) and the slots, where the states are; one copy brings them to the host.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

from . import _compile, _score_fn
from ._launch import Launcher
from ._dispatch import MaskListsVariant
from ._params import param_struct


@dataclass(frozen=True)
class MaskBlocksVariant:
    block_m: int
    block_n: int
    bits: bool  # pass 2: the partial blocks' bits
    mod: str  # the mask function's digest (_score_fn.HEADERS)
    source = "mask_blocks.cu"
    params = "MaskBlocksParams"
    threads = 256
    smem_bytes = 0
    persistent = False

    @property
    def name(self) -> str:
        return f"cuflash::mask_blocks_kernel<{self.block_m}, {self.block_n}, {'true' if self.bits else 'false'}>"

    @property
    def user_header(self) -> str:
        return _score_fn.HEADERS[self.mod]


@functools.lru_cache(maxsize=None)
def _launcher(variant, device: int) -> Launcher:
    kernel = _compile.get_kernel(variant.source, variant.name, 0, device, getattr(variant, "user_header", None))
    return Launcher(kernel, param_struct(variant.params))


def _launch(variant, device: int, blocks: int, stream: int, fields: dict) -> None:
    if blocks:
        _launcher(variant, device)(blocks, variant.threads, 0, stream, param_struct(variant.params).pack(fields))


def build(cls, mask_mod, seqlen_q: int, seqlen_k: int, block_m: int, block_n: int, batch: int, heads: int,
          device: int | None):
    import cupy
    import numpy as np

    if not isinstance(mask_mod, _score_fn.MaskMod):
        raise TypeError(f"mask_mod must be a cuflash.MaskMod, got {type(mask_mod).__name__}")
    fn = _score_fn.score_fn(None, mask_mod)
    nq, nk = -(-seqlen_q // block_m), -(-seqlen_k // block_n)
    device = fn.device() if device is None and fn.device() is not None else (device or 0)
    rows, cols = batch * heads * nq, batch * heads * nk
    with cupy.cuda.Device(device):
        stream = cupy.cuda.get_current_stream().ptr
        states = cupy.empty((batch, heads, nq, nk), cupy.int8)
        slots = cupy.empty(states.shape, cupy.int32)
        fields = dict(args=fn.args(1.0), states=states.data.ptr, slots=0, pool=0, nq=nq, nk=nk, heads=heads,
                      seqlen_q=seqlen_q, seqlen_k=seqlen_k)
        _launch(MaskBlocksVariant(block_m, block_n, False, fn.digest), device, rows * nk, stream, fields)
        # The ten lists of block_lists' order, in one buffer: one copy to the host, no sync between the
        # kernels but the one that sizes the pool.
        row, col = (batch, heads, nq), (batch, heads, nk)
        shapes = [row, (*row, nk), row, (*row, nk), (*row, nk), col, (*col, nq), col, (*col, nq), (*col, nq)]
        sizes = [int(np.prod(x)) for x in shapes]
        flat = cupy.empty(sum(sizes), cupy.int32)
        fc, fi, pc, pi, ps, tfc, tfi, tpc, tpi, tps = (
            flat[a:a + n] for a, n in zip(np.cumsum([0, *sizes[:-1]]), sizes))

        def lists(mode, lines, first_slot, *arrays):
            out = dict(zip(("full_count", "full_index", "partial_count", "partial_index", "partial_slot"), arrays))
            _launch(MaskListsVariant(mode), device, -(-lines // 4), stream,
                    dict(states=states.data.ptr, slots=slots.data.ptr, first_slot=first_slot, lines=lines, nq=nq,
                         nk=nk, **{k: v.data.ptr for k, v in out.items()}))

        lists(0, rows, 0, fc, fi, pc, pi, ps)  # the rows' counts
        first_slot = cupy.cumsum(pc, dtype=cupy.int32) - pc
        n_partial = int(first_slot[-1] + pc[-1]) if rows else 0
        lists(1, rows, first_slot.data.ptr, fc, fi, pc, pi, ps)
        lists(2, cols, 0, tfc, tfi, tpc, tpi, tps)
        pool = cupy.zeros((n_partial, block_m, block_n // 32), cupy.uint32)
        if n_partial:
            fields.update(slots=slots.data.ptr, pool=pool.data.ptr)
            _launch(MaskBlocksVariant(block_m, block_n, True, fn.digest), device, rows * nk, stream, fields)
        host = flat.get()
        parts = np.split(host, np.cumsum(sizes)[:-1])
        return cls._from_lists(seqlen_q, seqlen_k, block_m, block_n,
                               [h.reshape(x) for h, x in zip(parts, shapes)], pool.get())
