"""The lists a block mask is kept as (masks.BlockMask): per row of blocks, how many blocks are full and
which, how many partial, which, and where their element bits are; and the same per column (the backward
walks key blocks), from block states on the host. (BlockMask.from_cuda builds the same lists on the GPU:
kernels/mask_lists.cu.)"""
from __future__ import annotations

import numpy as np


def block_lists(states, slots) -> tuple:
    """The lists a BlockMask holds, from block states (B', H', nq, nk: 0 skip, 1 partial, 2 full) and each
    partial block's slot in the pool (-1 elsewhere): (full_count, full_index, partial_count, partial_index,
    partial_slot) and the same of the transposed states, int32."""
    fc, fi = _lists(states == 2)
    pc, pi, ps = _lists(states == 1, slots)
    tstates = np.ascontiguousarray(states.transpose(0, 1, 3, 2))
    tfc, tfi = _lists(tstates == 2)
    tpc, tpi, tps = _lists(tstates == 1, slots.transpose(0, 1, 3, 2))
    return fc, fi, pc, pi, ps, tfc, tfi, tpc, tpi, tps


def _lists(visit, values=None):
    """Counts and ascending column indices (padded with -1) of the True entries of each row, and with
    `values` (visit's shape) their values in the same places (-1 padding). From the True entries' row-major
    positions, in time linear in the blocks: sorting every row took most of a 64K x 64K mask's build."""
    count = visit.sum(axis=-1, dtype=np.int32)
    flat = visit.reshape(count.size, visit.shape[-1])
    rows, cols = np.nonzero(flat)  # columns ascending within a row
    starts = np.cumsum(count.ravel()) - count.ravel()
    at = (rows, np.arange(len(cols)) - starts[rows])
    index = np.full(flat.shape, -1, np.int32)
    index[at] = cols
    if values is None:
        return count, index.reshape(visit.shape)
    gathered = np.full(flat.shape, -1, np.int32)
    gathered[at] = values.reshape(flat.shape)[rows, cols]
    return count, index.reshape(visit.shape), gathered.reshape(visit.shape)
