"""Kernel variant choice and launch parameters. Pure Python: testable without a GPU.

A variant is one template instance of a kernel family: element type, head dim rounded up to a
compiled bucket (as FlashAttention-2 does), tile shape and flags. Families are chosen here, so a
Hopper-specific forward (wgmma/TMA) can slot in beside the mma.sync one without touching the API.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
import os
from dataclasses import dataclass

from ._compile import shared_memory_limit
from ._sparse import BLOCK_LISTS_FORMAT, LISTS_ROW_BLOCK, NO_LISTS

DTYPES = ("float16", "bfloat16", "float32")
_CUDA_TYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


def row_bytes(dtype: str, head_dim: int, wgmma: bool = False) -> int:
    """Bytes of one shared-memory tile row: head_dim elements plus one 16-byte chunk of padding
    (kernels/tile_io.cuh); wgmma tiles (kernels/wgmma.cuh) have no padding."""
    return head_dim * ITEMSIZE[dtype] + (0 if wgmma else 16)


def tiles_smem(rows: int, dtype: str, head_dim: int, wgmma: bool) -> int:
    """Dynamic shared memory for `rows` tile rows: wgmma tiles start on a 1024-byte boundary
    (kernels/tile_mma.cuh Tiles::align), so they ask for 1 KiB more."""
    return rows * row_bytes(dtype, head_dim, wgmma) + (1024 if wgmma else 0)
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
# Hopper (sm_90a) forward with wgmma for fp16/bf16 at these buckets (kernels/tile_mma.cuh): warps of
# 16 rows, four to a warpgroup. Empty for now: without overlap between the softmax and the products,
# the wgmma forward ran at 0.7-1.0x of SDPA FLASH where the mma.sync one runs at 1.04-1.12x
# (benchmarks/tune_fwd.py, results/h200-tune-fwd-wgmma.txt).
WGMMA_FWD_TILES: dict = {}
# Hopper (sm_90a) warp-specialised forward (kernels/flash_fwd_ws.cu) for fp16/bf16 at these buckets:
# (block_m, block_n, consumer warps, stages); a producer warpgroup comes on top. It takes every call
# there except block masks with blocks of 64 query rows (its query tile is 128 rows). H100, d=128, bf16,
# against SDPA FLASH in one run (benchmarks/tune_fwd_ws.py, results/h100-fwd-ws.json): 1.04-1.27x, where the
# mma.sync forward runs at 1.04-1.11x; 3 K/V slots ran 11-37% faster than 2 (H200). At d=64, since its products
# run unserialised (session 9, H100, bf16, TFLOP/s against the mma.sync forward): 2 slots 373/385 vs 338/325 at
# 16K (non-causal/causal), 356/332 vs 336/307 at 4K, 297/226 vs 312/241 at 1K; 3 slots 380/366 at 16K.
# CUFLASH_FWD_WS=0 turns it off.
WS_FWD_TILES = {} if os.environ.get("CUFLASH_FWD_WS") == "0" else {64: (128, 128, 8, 2), 128: (128, 128, 8, 3)}
# Below this many keys (max_seqlen_k with varlen) a bucket's calls keep the mma.sync forward: at d=64 the
# warp-specialised one, whose pipeline fills and drains in a few key tiles, ran at 0.86-0.89x of it at 512 keys
# and 0.96-1.00x at 1K (H100, bf16; results/h100-fwd-s9.json against results/h100-fwd-ws.json).
# CUFLASH_FWD_WS=all takes the warp-specialised forward at every length (for tests on short sequences).
WS_FWD_MIN_SEQLEN_K = {} if os.environ.get("CUFLASH_FWD_WS") == "all" else {64: 2048}
ARCHS = ("sm_80", "sm_90a")  # what compile-check builds; any other arch uses the sm_80 table


def spill_allowance(variant) -> int:
    """Stack bytes compile-check accepts: none, except
    - fp32, whose accumulators plus split-TF32 fragments and per-slice partial sums (kernels/mma.cuh)
      overflow 255 registers in the backward and beyond d = 128. That costs fp32 speed, not accuracy;
    - the three-slot dK/dV kernel (bwd_stages): 16 bytes of stack with ALiBi and a window at d = 128
      (NVRTC 13.5), none elsewhere (8 bytes at d = 128 before session 10);
    - the persistent warp-specialised forward (three K/V slots) with a block mask and dropout: 8-16 bytes,
      three words of a partial block's element bits (NVRTC 13.5)."""
    if variant.dtype == "float32":
        return 512
    return 16 if getattr(variant, "stages", 2) == 3 else 0


def fp32_fwd_tile(bucket: int, arch: str = "sm_80") -> tuple[int, int, int, int]:
    """fp32 tiles hold twice the bytes and the 3xTF32 products need more registers: warps of 16 rows,
    32 keys (16 beyond d = 128). Up to d = 128 on sm_90a, K and V are split once per tile
    (fp32_split_tiles), which doubles their slots: 128 query rows in one block of 8 warps per SM."""
    if fp32_split_tiles(bucket, arch):
        return 128, 32, 8, 2
    return 64, 32 if bucket <= 128 else 16, 4, 2


def fp32_split_tiles(bucket: int, arch: str) -> bool:
    """Whether the fp32 kernels of this bucket split their streamed tiles (K and V in the forward and dQ
    kernels, Q and dO in dK/dV) into TF32 parts once per tile (SPLIT in kernels/flash_fwd.cu and
    flash_bwd.cu) instead of per fragment. This needs sm_90's shared memory for the second set of slots."""
    return arch == "sm_90a" and bucket <= 128


def fp32_bwd_tiles(bucket: int, arch: str = "sm_80") -> tuple[int, int, int, int, int]:
    """fp32 backward tiles, warps of 16 rows (see fp32_fwd_tile): (dK/dV keys, its query tile, column
    splits, dQ queries, its key tile); beyond d = 128 dK/dV is computed in two column halves. With split
    tiles (fp32_split_tiles), one block of 8 warps per SM instead of two of 4."""
    if fp32_split_tiles(bucket, arch):
        return 128, 16, 1, 128, 16
    return (64, 16, 1, 64, 16) if bucket <= 128 else (32, 16, 2, 32, 16)


FP32_HEAD_DIM_BUCKETS = (64, 128, 256)  # fewer fp32 instances: each compiles slowly and runs far from peak anyway


def head_dim_bucket(head_dim: int, dtype: str = "float16") -> int:
    """Smallest compiled head dim >= head_dim."""
    for bucket in FP32_HEAD_DIM_BUCKETS if dtype == "float32" else HEAD_DIM_BUCKETS:
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
    band: int  # NO_BAND, CAUSAL or WINDOW (kernels/band.cuh)
    sparse: bool = False  # reads a block mask's lists (kernels/block_sparse.cuh)
    alibi: bool = False  # adds ALiBi biases (kernels/score_mods.cuh)
    softcap: bool = False  # caps scores with tanh (kernels/score_mods.cuh)
    dropout: bool = False  # drops scores with the in-kernel RNG (kernels/dropout.cuh)
    wgmma: bool = False  # Hopper warpgroup products (kernels/tile_mma.cuh)
    warp_specialised: bool = False  # kernels/flash_fwd_ws.cu (Hopper): `warps` consumers and a producer warpgroup
    split: bool = False  # fp32: K and V split into TF32 parts once per tile, in a second set of slots

    @property
    def source(self) -> str:
        return "flash_fwd_ws.cu" if self.warp_specialised else "flash_fwd.cu"

    @functools.cached_property
    def name(self) -> str:
        head = (f"cuflash::flash_fwd{'_ws' if self.warp_specialised else ''}_kernel<{_CUDA_TYPE[self.dtype]}, "
                f"{self.head_dim}, {self.block_m}, {self.block_n}, {self.warps}, {self.stages}, {self.band}, ")
        flags = (self.sparse, self.alibi, self.softcap, self.dropout) + (() if self.warp_specialised else (self.wgmma,))
        return head + _flags(*flags) + (", true" if self.split else "") + ">"

    @property
    def threads(self) -> int:
        return 32 * self.warps + (128 if self.warp_specialised else 0)

    @property
    def smem_bytes(self) -> int:
        kv_rows = 2 * self.stages * self.block_n * (2 if self.split else 1)
        return tiles_smem(self.block_m + kv_rows, self.dtype, self.head_dim, self.wgmma)


def _flags(*flags: bool) -> str:
    return ", ".join("true" if f else "false" for f in flags)


SCORE_MODS = ((False, False), (True, False), (False, True), (True, True))  # (alibi, softcap)


# Block-sparse variants: kernel tiles must divide the mask's blocks (multiples of 64), so a tile
# shrinks to the largest size that does (64 rows; 128, 64 or 32 keys), with no more warps than rows
# allow. A causal block mask is intersected on the host, so sparse variants are never causal.
MASK_BLOCKS = ((64, 64), (64, 128), (128, 64), (128, 128))  # what compile-check builds for


def _divides(tile: int, block: int, smaller=(128, 64, 32)) -> int:
    return tile if block % tile == 0 else max(s for s in smaller if s <= tile and block % s == 0)


# The kernels' band of keys per query (kernels/band.cuh): none, causal, or a sliding window.
NO_BAND, CAUSAL, WINDOW = 0, 1, 2
BANDS = (NO_BAND, CAUSAL, WINDOW)


@functools.lru_cache(maxsize=None)
def choose_fwd(dtype: str, head_dim: int, band: int, tile: tuple[int, int, int, int] | None = None,
               arch: str = "sm_80", mask_blocks: tuple[int, int] | None = None, alibi: bool = False,
               softcap: bool = False, dropout: bool = False, short_keys: bool = False) -> FwdVariant:
    """The variant for a call (cached; call choose_fwd.cache_clear() after editing FWD_TILES).
    band: NO_BAND, CAUSAL (or True) or WINDOW; mask_blocks = (block_m, block_n) of a block mask picks a
    block-sparse variant; alibi and softcap the score modifications; dropout the fused dropout;
    short_keys: fewer keys than WS_FWD_MIN_SEQLEN_K asks of the bucket (short_keys_for)."""
    bucket = head_dim_bucket(head_dim, dtype)
    sparse = mask_blocks is not None
    if (arch == "sm_90a" and dtype != "float32" and tile is None and bucket in WS_FWD_TILES and not short_keys
            and (not sparse or mask_blocks[0] % WS_FWD_TILES[bucket][0] == 0)):
        block_m, block_n, warps, stages = WS_FWD_TILES[bucket]
        if sparse:
            block_n = _divides(block_n, mask_blocks[1])
        return FwdVariant(dtype, bucket, block_m, block_n, warps, stages, NO_BAND if sparse else int(band), sparse,
                          bool(alibi), bool(softcap), bool(dropout), wgmma=True, warp_specialised=True)
    split = dtype == "float32" and fp32_split_tiles(bucket, arch)
    if dtype == "float32":
        tile = tile or fp32_fwd_tile(bucket, arch)
    wgmma = arch == "sm_90a" and dtype != "float32" and bucket in WGMMA_FWD_TILES
    tile = tile or (WGMMA_FWD_TILES[bucket] if wgmma else None)
    block_m, block_n, warps, stages = tile or FWD_TILES_BY_ARCH.get(arch, {}).get(bucket) or FWD_TILES[bucket]
    wgmma = wgmma and block_m == 16 * warps  # a tile given with warps of 32 rows takes mma.sync
    if sparse:
        block_m = _divides(block_m, mask_blocks[0])
        warps = min(warps, block_m // 16)
    if (sparse or alibi or softcap or dropout or band == WINDOW) and block_m > 16 * warps:
        # Warps of 32 rows have no registers left for a mask, window, score change or RNG on wide tiles:
        # fewer keys (tanh needs the most), and beyond d = 128 warps of 16 rows.
        if bucket > 128 or (softcap and dropout and bucket == 128):  # tanh and the RNG together, too
            warps = block_m // 16
        else:  # the RNG's registers (dropout) and a window's bounds tip d = 128 over at 48 keys
            block_n = min(block_n, 32 if softcap or (bucket == 128 and (dropout or band == WINDOW)) else 64)
    if sparse:
        block_n = _divides(block_n, mask_blocks[1])
    return FwdVariant(dtype, bucket, block_m, block_n, warps, stages, NO_BAND if sparse else int(band), sparse,
                      bool(alibi), bool(softcap), bool(dropout), wgmma, split=split)


def short_keys_for(dtype: str, head_dim: int, seqlen_k: int) -> bool:
    """Whether a call with seqlen_k keys is below its bucket's WS_FWD_MIN_SEQLEN_K (choose_fwd's short_keys)."""
    return seqlen_k < WS_FWD_MIN_SEQLEN_K.get(head_dim_bucket(head_dim, dtype), 0)


def all_variants(arch: str = "sm_80") -> list:
    """Every kernel variant the dispatcher can choose on `arch` (what compile-check and warmup build)."""
    fwd = []
    for (alibi, softcap), dropout in itertools.product(SCORE_MODS, (False, True)):
        mods = dict(alibi=alibi, softcap=softcap, dropout=dropout)
        for short in (False, True):  # short: the buckets where short calls take another kernel
            dims = [d for d in HEAD_DIM_BUCKETS if not short or d in WS_FWD_MIN_SEQLEN_K]
            fwd += [choose_fwd(dt, d, band, arch=arch, short_keys=short, **mods) for dt in DTYPES for d in dims
                    for band in BANDS]
            for blocks in MASK_BLOCKS:
                fwd += [v for v in (choose_fwd(dt, d, NO_BAND, arch=arch, mask_blocks=blocks, short_keys=short, **mods)
                                    for dt in DTYPES for d in dims) if v not in fwd]
    return list(dict.fromkeys(fwd)) + all_bwd_variants(arch)  # fp32's coarser buckets repeat variants


@dataclass(frozen=True)
class FwdProblem:
    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    head_dim: int
    softmax_scale: float
    softcap: float = 0.0  # 0: off
    dropout_p: float = 0.0  # 0: off
    causal: bool = False
    window: tuple[int, int] = (-1, -1)  # FlashAttention-2's window_size; -1: unbounded on that side

    @property
    def band(self) -> int:
        """The kernels' band (kernels/band.cuh): NO_BAND, CAUSAL (left unbounded, right 0) or WINDOW."""
        if self.window[0] == -1 and (self.causal or self.window[1] == -1):
            return CAUSAL if self.causal else NO_BAND
        return WINDOW

    def band_args(self) -> tuple[int, int]:
        """The kernels' (window_left, window_right): query i sees key j iff i + d - left <= j <= i + d +
        right, d = seqlen_k - seqlen_q. Causal caps right at 0; an unbounded side is seqlen_q + seqlen_k."""
        unbounded = self.seqlen_q + self.seqlen_k
        left, right = (unbounded if w < 0 else min(w, unbounded) for w in self.window)
        return left, min(right, 0) if self.causal else right

    def kernel_scales(self) -> tuple[float, float]:
        """(softmax scale, softcap multiplier) as the kernels take them: with a softcap the kernels
        compute tanh(Q Kᵀ * scale / cap) and run the softmax with scale cap."""
        if self.softcap:
            return self.softcap, self.softmax_scale / self.softcap
        return self.softmax_scale, 0.0


# flash_fwd_kernel's parameters as struct codes (see _launch.Launcher): q, k, v, o, lse pointers;
# batch/seq/head strides of q, k, v, o; seqlen_q, seqlen_k, nheads, kv_group, head_dim, num_m_blocks,
# the band's window_left and window_right (FwdProblem.band_args);
# softmax scale and softcap multiplier (FwdProblem.kernel_scales); ALiBi slopes pointer and batch stride;
# the sequences (cu_seqlens_q, cu_seqlens_k pointers, 0 for fixed lengths; the log-sum-exp's batch and
# head strides, see seq_args); the block mask's lists (zeros for dense variants); the dropout RNG
# (kernels/dropout.cuh DropoutArgs, see dropout_args).
ALIBI_FORMAT = "Qq"
NO_ALIBI = (0, 0)
SEQ_FORMAT = "QQqq"
DROPOUT_FORMAT = "(QQQIf)"
NO_DROPOUT = (0, 0, 0, 0, 1.0)
FWD_PARAM_FORMAT = ("QQQQQ" + "q" * 12 + "i" * 8 + "ff" + ALIBI_FORMAT + SEQ_FORMAT + BLOCK_LISTS_FORMAT
                    + DROPOUT_FORMAT)
# The warp-specialised forward is persistent: it also takes its tile counter and the number of tiles.
FWD_WS_PARAM_FORMAT = FWD_PARAM_FORMAT + "Qi"


def dropout_threshold(dropout_p: float) -> int:
    """The kernels keep a score when its 16-bit random number is >= this (kernels/dropout.cuh):
    dropout_p rounded to a multiple of 2^-16, at most 1 - 2^-16."""
    return min(65535, round(dropout_p * 65536))


def dropout_args(dropout_p: float, seed: int = 0, offset: int = 0, state_ptr: int = 0) -> tuple:
    """The DROPOUT_FORMAT launch fields: the RNG's seed and offset (64-bit), or a device pointer to
    four uint32 words (seed lo, seed hi, offset lo, offset hi) that replaces them."""
    if not dropout_p:
        return NO_DROPOUT
    threshold = dropout_threshold(dropout_p)
    return state_ptr, seed % 2**64, offset % 2**64, threshold, 65536.0 / (65536 - threshold)


def seq_args(p: "FwdProblem", varlen=None) -> tuple:
    """The SEQ_FORMAT launch fields. Fixed lengths: no cu_seqlens, log-sum-exp (batch, nheads,
    seqlen_q). varlen = (cu_seqlens_q pointer, cu_seqlens_k pointer, total_q): packed sequences, whose
    log-sum-exp is (nheads, total_q) as in FlashAttention-2."""
    if varlen is None:
        return 0, 0, p.nheads * p.seqlen_q, p.seqlen_q
    cu_q, cu_k, total_q = varlen
    return cu_q, cu_k, 0, total_q


def row_tiles(seqlen: int, tile: int, lists: tuple) -> int:
    """Query tiles per (batch, head) over seqlen rows. With a block mask, every tile of every row block:
    the forward and dQ kernels run them heaviest first (BlockLists::heaviest_first), so any block may
    come last (its tiles past seqlen return at once)."""
    if not lists[0]:  # no block mask (a null count pointer)
        return -(-seqlen // tile)
    row_block = lists[LISTS_ROW_BLOCK]
    return -(-seqlen // row_block) * (row_block // tile)


def fwd_launch(variant: FwdVariant, p: FwdProblem, q, k, v, o, lse_ptr: int,
               lists: tuple = NO_LISTS, alibi: tuple = NO_ALIBI, varlen=None,
               dropout: tuple = NO_DROPOUT, persistent: tuple[int, int] = (0, 1)) -> tuple[int, int, tuple]:
    """(blocks, threads, arguments in param_format(variant) order) for the forward kernel.

    q, k, v, o are (pointer, strides) pairs with strides in elements for (batch, seq, head, dim);
    the log-sum-exp is a contiguous float32 (batch, nheads, seqlen_q) buffer.
    The grid is one-dimensional (query tiles x batch x heads, up to 2^31 - 1 blocks), so no grid
    dimension can pass 65535. The warp-specialised forward is persistent: persistent = (its tile
    counter, the most blocks that are resident at once: SMs x blocks per SM); its grid is at most that.
    """
    num_m_blocks = row_tiles(p.seqlen_q, variant.block_m, lists)
    blocks = num_m_blocks * p.batch * p.nheads
    if blocks >= 2**31:
        raise ValueError(f"problem too large: {blocks} thread blocks exceed the grid limit 2^31 - 1")
    args = (
        q[0], k[0], v[0], o[0], lse_ptr,
        *q[1][:3], *k[1][:3], *v[1][:3], *o[1][:3],
        p.seqlen_q, p.seqlen_k, p.nheads, p.nheads // p.nheads_k, p.head_dim, num_m_blocks, *p.band_args(),
        *p.kernel_scales(), *alibi, *seq_args(p, varlen), *lists, *dropout,
    )
    if variant.warp_specialised:
        counter, resident = persistent
        return min(blocks, resident), variant.threads, args + (counter, blocks)
    return blocks, variant.threads, args


# ---- backward ----------------------------------------------------------------------------------

# dK/dV kernel per head-dim bucket: (block_n keys, query tile rows, warps, column splits). Heads
# above 128 are split in two column halves (two blocks per key tile) so that the dK and dV
# accumulators fit in registers; every tile fits sm_80's 163 KiB of shared memory.
BWD_DKDV_TILES = {
    32: (128, 64, 8, 1),
    64: (128, 64, 8, 1),
    96: (128, 64, 8, 1),
    128: (128, 32, 8, 1),
    160: (64, 64, 4, 2),
    192: (64, 64, 4, 2),
    224: (64, 32, 4, 2),
    256: (64, 32, 4, 2),
}
# dQ kernel: (block_m queries, block_n keys, warps).
BWD_DQ_TILES = {32: (64, 64, 4), 64: (64, 64, 4), 96: (64, 64, 4), 128: (64, 64, 4),
                160: (64, 32, 4), 192: (64, 32, 4), 224: (64, 32, 4), 256: (64, 32, 4)}
# Hopper (sm_90a) backward with wgmma for fp16/bf16 at these buckets: the same kernels with the WG
# flag (kernels/tile_mma.cuh); warpgroups own 64 rows, so the dK/dV and dQ tiles are warpgroups of 64.
# dK/dV: (block_n, block_q, warps); dQ: (block_m, block_n, warps).
# Tuned with benchmarks/tune_bwd.py (results/h200-tune-bwd.txt, h100-tune-bwd-dq.txt): the largest
# tiles that fit registers win (one-warpgroup tiles ran at 0.55-0.6x of these); the dQ kernel takes
# three warpgroups (192 query rows share each K/V tile).
WGMMA_BWD_DKDV_TILES = {64: (128, 128, 8), 128: (128, 64, 8)}
WGMMA_BWD_DQ_TILES = {64: (192, 64, 12), 128: (192, 64, 12)}

BWD_PREPROCESS_PARAM_FORMAT = "QQQ" + "q" * 6 + "iii" + "ii"
BWD_DKDV_PARAM_FORMAT = ("Q" * 8 + "q" * 18 + "i" * 8 + "ff" + ALIBI_FORMAT + SEQ_FORMAT + BLOCK_LISTS_FORMAT
                         + DROPOUT_FORMAT + "Qi")  # persistent: its tile counter and the number of items
BWD_DQ_PARAM_FORMAT = ("Q" * 7 + "q" * 15 + "i" * 8 + "ff" + ALIBI_FORMAT + SEQ_FORMAT + BLOCK_LISTS_FORMAT
                       + DROPOUT_FORMAT)
BWD_DQ_WS_PARAM_FORMAT = BWD_DQ_PARAM_FORMAT + "Qi"  # persistent: its tile counter and the number of items


@dataclass(frozen=True)
class BwdPreprocessVariant:
    dtype: str
    source: str = "flash_bwd.cu"
    threads: int = 128
    smem_bytes: int = 0

    @functools.cached_property
    def name(self) -> str:
        return f"cuflash::flash_bwd_preprocess_kernel<{_CUDA_TYPE[self.dtype]}>"


@dataclass(frozen=True)
class BwdDkdvVariant:
    dtype: str
    head_dim: int
    block_n: int
    block_q: int
    warps: int
    splits: int
    band: int  # NO_BAND, CAUSAL or WINDOW (kernels/band.cuh)
    sparse: bool = False
    alibi: bool = False
    softcap: bool = False
    dropout: bool = False
    wgmma: bool = False  # Hopper warpgroup products (kernels/tile_mma.cuh)
    stages: int = 2  # query-tile ring slots (3: wgmma products run on across tiles; bwd_stages)
    source: str = "flash_bwd.cu"
    split: bool = False  # fp32: Q and dO split into TF32 parts once per tile, in a second set of slots
    warp_specialised: bool = False  # flash_bwd_dkdv_ws_kernel: a producer warpgroup (wgmma only; ws_dkdv)

    @functools.cached_property
    def name(self) -> str:
        flags = _flags(self.sparse, self.alibi, self.softcap, self.dropout)
        if self.warp_specialised:
            return (f"cuflash::flash_bwd_dkdv_ws_kernel<{_CUDA_TYPE[self.dtype]}, {self.head_dim}, {self.block_n}, "
                    f"{self.block_q}, {self.warps}, {self.stages}, {self.band}, {flags}>")
        return (f"cuflash::flash_bwd_dkdv_kernel<{_CUDA_TYPE[self.dtype]}, {self.head_dim}, "
                f"{self.head_dim // self.splits}, {self.block_n}, {self.block_q}, {self.warps}, {self.stages}, "
                f"{self.band}, {flags}, {_flags(self.wgmma)}"
                f"{', true' if self.split else ''}>")

    @property
    def threads(self) -> int:
        return 32 * self.warps + (128 if self.warp_specialised else 0)

    @property
    def smem_bytes(self) -> int:  # K, V tiles and the slots of Q and dO (the small stats are static)
        # Three slots: the next item's K and V land ahead in a second buffer (the warp-specialised kernel
        # copies them once the last query tile's products have read K and V).
        kv_buffers = 2 if self.stages == 3 and not self.warp_specialised else 1
        q_rows = 2 * self.stages * self.block_q * (2 if self.split else 1)
        return tiles_smem(2 * kv_buffers * self.block_n + q_rows, self.dtype, self.head_dim, self.wgmma)


@dataclass(frozen=True)
class BwdDqVariant:
    dtype: str
    head_dim: int
    block_m: int
    block_n: int
    warps: int
    band: int  # NO_BAND, CAUSAL or WINDOW (kernels/band.cuh)
    sparse: bool = False
    alibi: bool = False
    softcap: bool = False
    dropout: bool = False
    wgmma: bool = False  # Hopper warpgroup products (kernels/tile_mma.cuh)
    source: str = "flash_bwd.cu"
    split: bool = False  # fp32: K and V split into TF32 parts once per tile, in a second set of slots
    warp_specialised: bool = False  # flash_bwd_dq_ws_kernel: a producer warpgroup, persistent (wgmma only)
    stages: int = 2  # K/V ring slots

    @functools.cached_property
    def name(self) -> str:
        flags = _flags(self.sparse, self.alibi, self.softcap, self.dropout)
        if self.warp_specialised:
            return (f"cuflash::flash_bwd_dq_ws_kernel<{_CUDA_TYPE[self.dtype]}, {self.head_dim}, {self.block_m}, "
                    f"{self.block_n}, {self.warps}, {self.stages}, {self.band}, {flags}>")
        return (f"cuflash::flash_bwd_dq_kernel<{_CUDA_TYPE[self.dtype]}, {self.head_dim}, {self.block_m}, "
                f"{self.block_n}, {self.warps}, "
                f"{self.band}, {flags}, {_flags(self.wgmma)}"
                f"{', true' if self.split else ''}>")

    @property
    def threads(self) -> int:
        return 32 * self.warps + (128 if self.warp_specialised else 0)

    @property
    def smem_bytes(self) -> int:  # Q, dO tiles and `stages` slots each of K and V
        kv_rows = 2 * self.stages * self.block_n * (2 if self.split else 1)
        return tiles_smem(2 * self.block_m + kv_rows, self.dtype, self.head_dim, self.wgmma)


def bwd_stages(variant: BwdDkdvVariant) -> BwdDkdvVariant:
    """The dK/dV variant with three query-tile slots where it runs wgmma on tiles of at most 64 queries and
    they fit Hopper's shared memory: a tile's dK product then runs on while the next tile loads and starts
    (kernels/flash_bwd.cu; on the H100 at d = 128, 16K: 9% faster causal, 2-3% with tanh or dropout, 4.5-7%
    with ALiBi). Its operand registers stay taken meanwhile: with 128-query tiles ptxas serialises the
    products for want of registers. (ALiBi spilled 16-56 bytes here until session 10, when the persistent
    kernel moved a work item's fields to shared memory.)"""
    if not variant.wgmma or variant.block_q > 64:
        return variant
    three = dataclasses.replace(variant, stages=3)
    return three if three.smem_bytes <= shared_memory_limit("sm_90a") else variant


@functools.lru_cache(maxsize=None)
def choose_bwd(dtype: str, head_dim: int, band: int, mask_blocks: tuple[int, int] | None = None,
               alibi: bool = False, softcap: bool = False, dropout: bool = False, arch: str = "sm_80"):
    """(preprocess, dK/dV, dQ) variants for a backward call; the flags as for choose_fwd. On sm_90a,
    fp16/bf16 at the WGMMA_BWD buckets take the wgmma kernels."""
    bucket = head_dim_bucket(head_dim, dtype)
    block_n, block_q, warps, splits = BWD_DKDV_TILES[bucket]
    dq_m, dq_n, dq_warps = BWD_DQ_TILES[bucket]
    wgmma = arch == "sm_90a" and dtype != "float32" and bucket in WGMMA_BWD_DKDV_TILES
    if wgmma:
        (block_n, block_q, warps), splits = WGMMA_BWD_DKDV_TILES[bucket], 1
        dq_m, dq_n, dq_warps = WGMMA_BWD_DQ_TILES[bucket]
        # No registers left on the widest dK/dV tiles for a mask, window, tanh or RNG (ALiBi's bias fits):
        if mask_blocks or softcap or dropout or band == WINDOW:
            block_q = min(block_q, 64)
        # dQ (benchmarks/tune_flagged_dq.py): a block mask (whose blocks 192 rows do not divide) or a
        # window takes two warpgroups on 128-key tiles; tanh and the RNG take two warpgroups on 64-key
        # tiles (three warpgroups spill with tanh, and with the RNG on NVRTC 13.0).
        if softcap or dropout:
            dq_m, dq_n, dq_warps = 128, 64, 8
        elif mask_blocks or band == WINDOW:
            dq_m, dq_n, dq_warps = 128, 128, 8
    split = dtype == "float32" and fp32_split_tiles(bucket, arch)
    if dtype == "float32":
        block_n, block_q, splits, dq_m, dq_n = fp32_bwd_tiles(bucket, arch)
        warps, dq_warps = block_n // 16, dq_m // 16
    mods = (bool(alibi), bool(softcap), bool(dropout))
    if softcap or (dropout and alibi):  # tanh's derivative per score, or the RNG: half the query rows per tile
        block_q = max(16, block_q // 2)
    if dropout and (alibi or softcap):  # likewise in the dQ kernel: half the keys per tile
        dq_n = min(dq_n, 32)
    if mask_blocks is None:
        return (BwdPreprocessVariant(dtype),
                bwd_stages(BwdDkdvVariant(dtype, bucket, block_n, block_q, warps, splits, int(band), False, *mods,
                                          wgmma, split=split)),
                BwdDqVariant(dtype, bucket, dq_m, dq_n, dq_warps, int(band), False, *mods, wgmma, split=split))
    mask_m, mask_n = mask_blocks
    block_n = _divides(block_n, mask_n)
    dq_m = _divides(dq_m, mask_m)
    dq = BwdDqVariant(dtype, bucket, dq_m, _divides(dq_n, mask_n), min(dq_warps, dq_m // 16), NO_BAND, True, *mods,
                      wgmma, split=split)
    return (BwdPreprocessVariant(dtype),
            ws_dkdv(bwd_stages(BwdDkdvVariant(dtype, bucket, block_n, _divides(block_q, mask_m),
                                              min(warps, block_n // 16), splits, NO_BAND, True, *mods, wgmma,
                                              split=split)), mask_m),
            ws_dq(dq))


# The warp-specialised dQ kernel (benchmarks/results/ws-dq-s12.txt: 13-14% faster than the plain one on window
# and butterfly masks), taken for block masks whose query blocks its 128-row tiles divide; CUFLASH_DQ_WS=0 turns
# it off (for A/B timing). (block_m, block_n, warps, K/V slots) by head dim.
WS_DQ_TILES = {64: (128, 64, 8, 3), 128: (128, 64, 8, 3)}
WS_DQ = os.environ.get("CUFLASH_DQ_WS", "1") != "0"


def ws_dq(variant: BwdDqVariant, enabled: bool | None = None) -> BwdDqVariant:
    """The warp-specialised dQ variant (WS_DQ_TILES) where it applies and is enabled (default: WS_DQ), else
    `variant`."""
    tile = WS_DQ_TILES.get(variant.head_dim)
    if not ((WS_DQ if enabled is None else enabled) and variant.wgmma and variant.sparse and tile
            and variant.block_m == tile[0]):
        return variant
    m, n, warps, stages = tile
    return dataclasses.replace(variant, block_m=m, block_n=min(n, variant.block_n), warps=warps, stages=stages,
                               warp_specialised=True)


# The warp-specialised dK/dV kernel (benchmarks/results/h100-s13-ws-dkdv.txt: 5-12% faster than the plain one
# on block masks at d = 128), taken for block masks whose key blocks its 128-key tiles divide; CUFLASH_DKDV_WS=0
# turns it off (for A/B timing). (query tile rows, query-tile slots) by head dim; with tanh or the RNG at d = 128,
# WS_DKDV_HALF_TILE (64-row tiles spill there, as in the plain kernel).
WS_DKDV_TILES = {64: (64, 4), 128: (64, 3)}
WS_DKDV_HALF_TILE = (32, 4)
WS_DKDV = os.environ.get("CUFLASH_DKDV_WS", "1") != "0"


def ws_dkdv(variant: BwdDkdvVariant, mask_m: int, enabled: bool | None = None) -> BwdDkdvVariant:
    """The warp-specialised dK/dV variant (WS_DKDV_TILES) for a block mask of mask_m-row query blocks where it
    applies and is enabled (default: WS_DKDV), else `variant`."""
    tile = WS_DKDV_TILES.get(variant.head_dim)
    if tile and variant.head_dim == 128 and (variant.softcap or variant.dropout):
        tile = WS_DKDV_HALF_TILE
    if not ((WS_DKDV if enabled is None else enabled) and variant.wgmma and variant.sparse and tile
            and variant.block_n == 128 and mask_m % tile[0] == 0):
        return variant
    block_q, stages = tile
    return dataclasses.replace(variant, block_q=block_q, warps=8, stages=stages, warp_specialised=True)


def all_bwd_variants(arch: str = "sm_80") -> list:
    out = []
    for dt in DTYPES:
        for d in HEAD_DIM_BUCKETS:
            for (alibi, softcap), dropout in itertools.product(SCORE_MODS, (False, True)):
                for band in BANDS:
                    out += [v for v in choose_bwd(dt, d, band, None, alibi, softcap, dropout, arch) if v not in out]
                for blocks in MASK_BLOCKS:
                    chosen = choose_bwd(dt, d, NO_BAND, blocks, alibi, softcap, dropout, arch)
                    # built whether CUFLASH_DQ_WS / CUFLASH_DKDV_WS are set or not
                    chosen += (ws_dq(chosen[2], enabled=True), ws_dkdv(chosen[1], blocks[0], enabled=True))
                    out += [v for v in chosen if v not in out]
    return out


PREPROCESS_ROWS = 4  # rows per thread of the backward's preprocess kernel (kernels/flash_bwd.cu kRows)


def preprocess_row_lanes(head_dim: int, dtype: str) -> int:
    """Lanes per row of the backward's preprocess kernel: one per 16-byte chunk of the row, rounded up
    to a power of two, at most a warp."""
    chunks = -(-head_dim * ITEMSIZE[dtype] // 16)
    return min(32, 1 << (chunks - 1).bit_length())


def bwd_launches(variants, p: FwdProblem, q, k, v, dout, out, lse_ptr: int, delta_ptr: int, dq, dk, dv,
                 query_lists: tuple = NO_LISTS, key_lists: tuple = NO_LISTS, alibi: tuple = NO_ALIBI, varlen=None,
                 dropout: tuple = NO_DROPOUT, persistent: tuple[int, int] = (0, 1),
                 persistent_dq: tuple[int, int] = (0, 1)):
    """[(variant, blocks, threads, args)] for the three backward kernels, in launch order.

    Arrays are (pointer, strides) pairs with strides in elements for (batch, seq, head, dim); lse and
    delta are contiguous float32 (batch, nheads, seqlen_q) buffers, or (nheads, total_q) with varlen
    (see seq_args; packed arrays come with batch stride 0). The dK/dV kernel is persistent:
    persistent = (its tile counter, the blocks the GPU holds at once); its grid is no larger.
    """
    pre, dkdv, dqv = variants
    group = p.nheads // p.nheads_k
    # delta_i = rowsum(dO_i * O_i) for every query row; packed sequences are one batch of total_q rows.
    pre_seqlen, pre_batch = (p.seqlen_q, p.batch) if varlen is None else (varlen[2], 1)
    rows = pre_batch * p.nheads * pre_seqlen
    launches = []
    if rows:
        lanes = preprocess_row_lanes(p.head_dim, pre.dtype)
        blocks_per_bh = -(-pre_seqlen // (PREPROCESS_ROWS * pre.threads // lanes))
        launches.append((pre, pre_batch * p.nheads * blocks_per_bh, pre.threads,
                         (dout[0], out[0], delta_ptr, *dout[1][:3], *out[1][:3], pre_seqlen, p.nheads, p.head_dim,
                          blocks_per_bh, lanes)))
    num_n_blocks = -(-p.seqlen_k // dkdv.block_n)  # in order: no heaviest-first mapping
    blocks = num_n_blocks * dkdv.splits * p.batch * p.nheads_k
    common = (p.seqlen_q, p.seqlen_k, p.nheads, group, p.head_dim)
    if blocks:
        launches.append((dkdv, min(blocks, persistent[1]), dkdv.threads,
                         (q[0], k[0], v[0], dout[0], lse_ptr, delta_ptr, dk[0], dv[0],
                          *q[1][:3], *k[1][:3], *v[1][:3], *dout[1][:3], *dk[1][:3], *dv[1][:3],
                          *common, num_n_blocks, *p.band_args(), *p.kernel_scales(), *alibi, *seq_args(p, varlen),
                          *key_lists, *dropout, persistent[0], blocks)))
    num_m_blocks = row_tiles(p.seqlen_q, dqv.block_m, query_lists)
    blocks = num_m_blocks * p.batch * p.nheads
    if blocks:
        ws = (persistent_dq[0], blocks) if dqv.warp_specialised else ()  # persistent: counter, items
        launches.append((dqv, min(blocks, persistent_dq[1]) if ws else blocks, dqv.threads,
                         (q[0], k[0], v[0], dout[0], lse_ptr, delta_ptr, dq[0],
                          *q[1][:3], *k[1][:3], *v[1][:3], *dout[1][:3], *dq[1][:3],
                          *common, num_m_blocks, *p.band_args(), *p.kernel_scales(), *alibi, *seq_args(p, varlen),
                          *query_lists, *dropout, *ws)))
    for variant, n, _, args in launches:
        n = args[-1] if variant is dkdv or getattr(variant, "warp_specialised", False) else n  # persistent: items
        if n >= 2**31:
            raise ValueError(f"problem too large: {n} thread blocks exceed the grid limit 2^31 - 1")
    return launches


PARAM_FORMATS = {BwdPreprocessVariant: BWD_PREPROCESS_PARAM_FORMAT, BwdDkdvVariant: BWD_DKDV_PARAM_FORMAT,
                 BwdDqVariant: BWD_DQ_PARAM_FORMAT, FwdVariant: FWD_PARAM_FORMAT}


def param_format(variant) -> str:
    """The kernel parameters of a variant, as struct codes (_launch.Launcher)."""
    if getattr(variant, "warp_specialised", False) and not isinstance(variant, BwdDkdvVariant):
        return FWD_WS_PARAM_FORMAT if isinstance(variant, FwdVariant) else BWD_DQ_WS_PARAM_FORMAT
    return PARAM_FORMATS[type(variant)]
