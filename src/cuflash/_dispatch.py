"""Kernel variant choice and launch parameters. Pure Python: testable without a GPU.

A variant is one template instance of a kernel family: element type, head dim rounded up to a
compiled bucket (as FlashAttention-2 does), tile shape and flags. Families are chosen here, so a
Hopper-specific forward (wgmma/TMA) can slot in beside the mma.sync one without touching the API.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

DTYPES = ("float16", "bfloat16")
_CUDA_TYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16"}
HEAD_DIM_BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)
MAX_HEAD_DIM = HEAD_DIM_BUCKETS[-1]

# Forward tile per head-dim bucket: (block_m, block_n, warps, stages). Each warp owns block_m / warps
# query rows; K/V tiles of block_n rows stream through `stages` shared-memory slots. Chosen to fit
# 255 registers with no spill (checked by `python -m cuflash compile-check`) and tuned on an H100
# with benchmarks/tune_fwd.py.
FWD_TILES = {
    32: (128, 128, 4, 2),
    64: (128, 128, 4, 2),
    96: (128, 64, 4, 2),
    128: (128, 48, 4, 2),
    160: (128, 32, 4, 2),
    192: (128, 48, 8, 2),
    224: (128, 32, 8, 2),
    256: (128, 32, 8, 2),
}
# Where an arch has more shared memory than sm_80's 163 KiB, a larger tile can win.
FWD_TILES_BY_ARCH = {
    "sm_90a": {224: (128, 64, 8, 2), 256: (128, 48, 8, 2)},  # 174 and 169 KiB
}
ARCHS = ("sm_80", "sm_90a")  # what compile-check builds; any other arch uses the sm_80 table


def head_dim_bucket(head_dim: int) -> int:
    """Smallest compiled head dim >= head_dim."""
    for bucket in HEAD_DIM_BUCKETS:
        if head_dim <= bucket:
            return bucket
    raise ValueError(f"head dim {head_dim} exceeds the largest supported ({MAX_HEAD_DIM})")


@dataclass(frozen=True)
class FwdVariant:
    """One compiled instance of kernels/flash_fwd.cu (the sm_80+ mma.sync forward)."""

    dtype: str
    head_dim: int
    block_m: int
    block_n: int
    warps: int
    stages: int
    causal: bool
    source: str = "flash_fwd.cu"

    @functools.cached_property
    def name(self) -> str:
        return (
            f"cuflash::flash_fwd_kernel<{_CUDA_TYPE[self.dtype]}, {self.head_dim}, {self.block_m}, "
            f"{self.block_n}, {self.warps}, {self.stages}, {'true' if self.causal else 'false'}>"
        )

    @property
    def threads(self) -> int:
        return 32 * self.warps

    @property
    def smem_bytes(self) -> int:
        pitch = self.head_dim + 8  # padded shared-memory rows (kernels/tile_io.cuh)
        return (self.block_m + 2 * self.stages * self.block_n) * pitch * 2


@functools.lru_cache(maxsize=None)
def choose_fwd(dtype: str, head_dim: int, causal: bool, tile: tuple[int, int, int, int] | None = None,
               arch: str = "sm_80") -> FwdVariant:
    """The variant for a call (cached; call choose_fwd.cache_clear() after editing FWD_TILES)."""
    bucket = head_dim_bucket(head_dim)
    block_m, block_n, warps, stages = tile or FWD_TILES_BY_ARCH.get(arch, {}).get(bucket) or FWD_TILES[bucket]
    return FwdVariant(dtype, bucket, block_m, block_n, warps, stages, bool(causal))


def all_variants(arch: str = "sm_80") -> list[FwdVariant]:
    """Every variant the dispatcher can choose on `arch` (what compile-check and warmup build)."""
    return [choose_fwd(dt, d, c, arch=arch) for dt in DTYPES for d in HEAD_DIM_BUCKETS for c in (False, True)]


@dataclass(frozen=True)
class FwdProblem:
    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    head_dim: int
    softmax_scale: float


# flash_fwd_kernel's parameters as struct codes (see _launch.Launcher): q, k, v, o, lse pointers;
# batch/seq/head strides of q, k, v, o; seqlen_q, seqlen_k, nheads, kv_group, head_dim, num_m_blocks;
# softmax_scale.
FWD_PARAM_FORMAT = "QQQQQ" + "q" * 12 + "iiiiii" + "f"


def fwd_launch(variant: FwdVariant, p: FwdProblem, q, k, v, o, lse_ptr: int) -> tuple[int, int, tuple]:
    """(blocks, threads, arguments in FWD_PARAM_FORMAT order) for flash_fwd_kernel.

    q, k, v, o are (pointer, strides) pairs with strides in elements for (batch, seq, head, dim);
    the log-sum-exp is a contiguous float32 (batch, nheads, seqlen_q) buffer.
    The grid is one-dimensional (query tiles x batch x heads, up to 2^31 - 1 blocks), so no grid
    dimension can pass 65535.
    """
    num_m_blocks = -(-p.seqlen_q // variant.block_m)
    blocks = num_m_blocks * p.batch * p.nheads
    if blocks >= 2**31:
        raise ValueError(f"problem too large: {blocks} thread blocks exceed the grid limit 2^31 - 1")
    args = (
        q[0], k[0], v[0], o[0], lse_ptr,
        *q[1][:3], *k[1][:3], *v[1][:3], *o[1][:3],
        p.seqlen_q, p.seqlen_k, p.nheads, p.nheads // p.nheads_k, p.head_dim, num_m_blocks,
        p.softmax_scale,
    )
    return blocks, variant.threads, args
