"""Tensor maps (CUtensorMap) for the Hopper kernels' bulk tensor copies (kernels/tma.cuh), encoded by the
CUDA driver's cuTensorMapEncodeTiled: a (batch, sequence, head, dim) array of 16-bit elements read in boxes
of 64 dims x `rows` rows, 128-byte swizzled (the layout wgmma reads), zeros outside the array (tile_map);
rows of 32-bit words in plain boxes (rows_map: the dK/dV kernel's row statistics).

TMA takes an array whose start and strides are multiples of 16 bytes (dims are contiguous in every array
the kernels take); anything else gets None, and the kernel copies with cp.async instead."""
from __future__ import annotations

import ctypes
import functools
import sys

_MAP_BYTES = 128
NO_MAP = bytes(_MAP_BYTES)  # what a kernel gets where it copies without TMA

# CUtensorMapDataType, CUtensorMapInterleave, CUtensorMapSwizzle, CUtensorMapL2promotion,
# CUtensorMapFloatOOBfill values (cuda.h)
_UINT16, _UINT32, _NO_INTERLEAVE, _NO_SWIZZLE, _SWIZZLE_128B, _L2_PROMOTION_256B, _OOB_ZEROS = 1, 2, 0, 0, 3, 3, 0
_MAX_STRIDE = 1 << 40


@functools.lru_cache(maxsize=1)
def _encode_tiled():
    """The driver's cuTensorMapEncodeTiled, or None where the driver has none (CUDA < 12)."""
    try:
        lib = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
        fn = lib.cuTensorMapEncodeTiled
    except (OSError, AttributeError):
        return None
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return fn


@functools.lru_cache(maxsize=1024)
def tile_map(ptr: int, shape: tuple[int, int, int, int], strides: tuple[int, int, int], rows: int) -> bytes | None:
    """The tensor map of a (batch, seqlen, heads, head_dim) array of 16-bit elements at ptr with element
    strides (sb, ss, sh), for boxes of 64 x rows; None where TMA cannot take it."""
    batch, seqlen, heads, head_dim = shape
    sb, ss, sh = strides
    if ptr % 16 or min(strides) < 0 or not 8 <= rows <= 256:
        return None
    # (dims, then batch, sequence and head; a stride of a dim of one element is never used: any valid one)
    sizes = (seqlen, heads, batch)
    byte_strides = [2 * x for x in (ss, sh, sb)]
    valid = [x for n, x in zip(sizes, byte_strides) if n > 1]
    any_valid = max(valid, default=16)
    byte_strides = [x if n > 1 else any_valid for n, x in zip(sizes, byte_strides)]
    if any(x % 16 or not 0 < x < _MAX_STRIDE for x in byte_strides) or max(shape) >= 1 << 32:
        return None
    encode = _encode_tiled()
    if encode is None:
        return None
    return _encode(encode, _UINT16, ptr, (head_dim, seqlen, heads, batch), byte_strides, (64, rows, 1, 1),
                   _SWIZZLE_128B)


@functools.lru_cache(maxsize=256)
def rows_map(ptr: int, cols: int, rows: int, box: tuple[int, int]) -> bytes | None:
    """The tensor map of a row-major (rows, cols) array of 32-bit words at ptr (cols a multiple of 4), for
    unswizzled boxes of box = (columns, rows); None where TMA cannot take it."""
    encode = _encode_tiled()
    if encode is None or ptr % 16 or cols % 4 or not 0 < cols < 1 << 32 or not 0 < rows < 1 << 32:
        return None
    return _encode(encode, _UINT32, ptr, (cols, rows), (4 * cols,), box, _NO_SWIZZLE)


def _encode(encode, dtype: int, ptr: int, dims, byte_strides, box, swizzle: int) -> bytes | None:
    """cuTensorMapEncodeTiled of a len(dims)-D array (innermost first; byte strides of all but the first),
    zeros outside it; None where the driver refuses."""
    n = len(dims)
    out = ctypes.create_string_buffer(_MAP_BYTES + 64)
    at = -ctypes.addressof(out) % 64  # a CUtensorMap is 64-byte aligned
    err = encode(ctypes.addressof(out) + at, dtype, n, ptr, (ctypes.c_uint64 * n)(*dims),
                 (ctypes.c_uint64 * (n - 1))(*byte_strides), (ctypes.c_uint32 * n)(*box),
                 (ctypes.c_uint32 * n)(*([1] * n)), _NO_INTERLEAVE, swizzle, _L2_PROMOTION_256B, _OOB_ZEROS)
    return None if err else out.raw[at:at + _MAP_BYTES]
