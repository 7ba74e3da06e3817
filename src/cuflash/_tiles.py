"""The tile policy: which kernel kind and tile shape a call runs, as pure functions of
(arch, pass, dtype, head-dim bucket, flags, options), with the measured reason beside each choice.

Measurements are bf16 unless said otherwise; the benchmarks that made them are named in
docs/kernel-design.md. Every tile here fits its arch's registers without spilling and its shared
memory (checked for every variant by `python -m cuflash compile-check`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ._arch import shared_memory_limit
from ._options import Options

DTYPES = ("float16", "bfloat16", "float32")
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}
HEAD_DIM_BUCKETS = (32, 64, 96, 128, 160, 192, 224, 256)
FP32_HEAD_DIM_BUCKETS = (64, 128, 256)  # fewer fp32 instances: each compiles slowly and runs far from peak anyway
MAX_HEAD_DIM = HEAD_DIM_BUCKETS[-1]
MASK_BLOCKS = ((64, 64), (64, 128), (128, 64), (128, 128))  # block-mask shapes compile-check builds for

# The kernels' band of keys per query (kernels/band.cuh): none, causal, or a sliding window.
NO_BAND, CAUSAL, WINDOW = 0, 1, 2
BANDS = (NO_BAND, CAUSAL, WINDOW)


def head_dim_bucket(head_dim: int, dtype: str = "float16") -> int:
    """Smallest compiled head dim >= head_dim (as FlashAttention-2 rounds head dims up)."""
    for bucket in FP32_HEAD_DIM_BUCKETS if dtype == "float32" else HEAD_DIM_BUCKETS:
        if head_dim <= bucket:
            return bucket
    raise ValueError(f"head dim {head_dim} exceeds the largest supported ({MAX_HEAD_DIM})")


def row_bytes(dtype: str, head_dim: int, wgmma: bool = False) -> int:
    """Bytes of one shared-memory tile row: head_dim elements plus one 16-byte chunk of padding
    (kernels/tile_io.cuh); wgmma tiles (kernels/wgmma.cuh) are swizzled and have no padding."""
    return head_dim * ITEMSIZE[dtype] + (0 if wgmma else 16)


def tiles_smem(rows: int, dtype: str, head_dim: int, wgmma: bool) -> int:
    """Dynamic shared memory for `rows` tile rows: wgmma tiles start on a 1024-byte boundary
    (kernels/tile_mma.cuh Tiles::align), so they ask for 1 KiB more."""
    return rows * row_bytes(dtype, head_dim, wgmma) + (1024 if wgmma else 0)


@dataclass(frozen=True)
class Flags:
    """What a call asks of the kernels beyond the plain product."""

    band: int = NO_BAND  # NO_BAND, CAUSAL or WINDOW; a block mask's causal/window is inside the mask
    mask_blocks: tuple[int, int] | None = None  # (block_m, block_n) of a block mask
    alibi: bool = False
    softcap: bool = False
    dropout: bool = False
    short_keys: bool = False  # fewer keys than WS_FWD_MIN_SEQLEN_K asks of the bucket
    long_queries: bool = True  # enough query rows for accumulating dQ to pay (dq_accumulation_pays)
    mod: str = ""  # the digest of a user score function (_score_fn.py): mma.sync kernels, tiles as softcap's
    mod_grad: bool = False  # its derivative with respect to the score is not 1 everywhere (kept per score)
    sink_grad: bool = False  # the backward also sums P * dP per row (the sinks' gradient): in the dQ kernel

    @property
    def sparse(self) -> bool:
        return self.mask_blocks is not None


def _divides(tile: int, block: int, smaller=(128, 64, 32)) -> int:
    """The largest of tile and `smaller` (<= tile) that divides a mask's block."""
    return tile if block % tile == 0 else max(s for s in smaller if s <= tile and block % s == 0)


# ---- forward -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FwdTile:
    block_m: int
    block_n: int
    warps: int  # consumer warps (the warp-specialised kernel adds a producer warpgroup)
    stages: int  # K/V ring slots
    warp_specialised: bool = False  # kernels/flash_fwd_ws.cu (Hopper, wgmma) instead of flash_fwd.cu
    split: bool = False  # fp32: K and V split into TF32 parts once per tile, in a second set of slots


# mma.sync forward per head-dim bucket: (block_m, block_n, warps, stages). Each warp owns block_m / warps
# query rows; K/V tiles of block_n rows stream through `stages` slots. Tuned on an H100 (tune sweeps over
# block_n and warps): the widest key tile that fits 255 registers wins.
FWD_TILES = {32: (128, 128, 4, 2), 64: (128, 128, 4, 2), 96: (128, 64, 4, 2), 128: (128, 48, 4, 2),
             160: (128, 32, 4, 2), 192: (128, 48, 8, 2), 224: (128, 32, 8, 2), 256: (128, 32, 8, 2)}
# Hopper's 227 KiB of shared memory holds wider key tiles at the largest head dims (174 and 169 KiB).
FWD_TILES_SM90 = {224: (128, 64, 8, 2), 256: (128, 48, 8, 3)}
# Hopper warp-specialised forward (fp16/bf16): (block_m, block_n, consumer warps, stages). At d=128,
# 1.04-1.27x of SDPA FLASH where the mma.sync forward runs at 1.04-1.11x (H100); 3 K/V slots ran 11-37%
# faster than 2 (H200). At d=64, 373/385 against 338/325 TFLOP/s at 16K (non-causal/causal, H100). At d=256
# O takes 128 of a consumer's 232 registers: 64-key tiles spilled in every variant with a band, ALiBi or
# dropout, 48-key tiles (Q·Kᵀ one m64n48 instruction a k step, wgmma.cuh abt_rows) in none: 1.48-1.80x the
# mma.sync forward's TFLOP/s (H100, fp16/bf16, 1K-16K) while Q·Kᵀ went as 32 + 16 columns, 22% fewer cycles
# since. 64- and 80-key tiles fit two K/V slots, not three: 7.33 M and 6.90 M cycles against 4.72 M (16K, bf16).
# At d = 192 (24 16-byte chunks a row: 120 of the producer's 128 threads copy) 64- to 112-key tiles compile
# with no spill in every variant; 128 x 112 ran at 1.57-1.68x the mma.sync forward (bf16, 2K-16K, H100).
WS_FWD_TILES = {64: (128, 128, 8, 2), 128: (128, 128, 8, 3), 192: (128, 112, 8, 2), 256: (128, 48, 8, 3)}
# Buckets without a warp-specialised forward of their own take the next one's, zero-padded (the kernels
# read head_dim columns and store head_dim columns), where its tile policy takes the warp-specialised kernel:
# against their own mma.sync forward, d = 80 and 96 ran at 1.15-1.58x, 160 at 1.11-1.26x, 224 at 1.54-1.60x
# (bf16, 4K-16K, H100).
WS_FWD_PADDED_BUCKET = {96: 128, 160: 192, 224: 256}
# At d = 64 the softmax of a 64 x 128 score tile takes about as long as its two products, so two consumer
# warpgroups taking turns leave the tensor cores idle; three (192 query rows, 160 registers each) keep them
# busy, and share each K/V tile among more rows: with three K/V slots 1.04-1.23x the two-warpgroup forward's
# speed (plain, causal, ALiBi, softcap; 2K-16K; H100), with two 0.96-1.08x. A window, dropout, a block mask or
# a score function spill there (12-64 bytes) and keep two.
WS_FWD_WIDE_TILES = {64: (192, 128, 12, 3)}
# Keys per tile with a window's bounds: d = 192's 112-key tiles spilled 20-40 bytes.
WS_FWD_WINDOW_BLOCK_N = {192: 96}
# Keys per tile with a score function: the full tiles spilled (4-88 bytes) with a captured table's reads.
WS_FWD_MOD_BLOCK_N = {64: 64, 128: 112}
# Below this many keys the bucket's two-warpgroup warp-specialised forward (d = 64 with a window, dropout, a
# block mask or a score function), whose pipeline fills and drains in a few key tiles, gives way to the
# mma.sync forward: it ran at 0.86-0.89x of it at 512 keys, 0.96-1.00x at 1K. The three-warpgroup forward
# runs at every length: against the mma.sync forward 1.10x at 512 keys and 1.17x at 1K non-causal, 0.98x and
# 1.01x causal, equal at 2K (H100, bf16, 16K tokens a batch, 32 heads).
WS_FWD_MIN_SEQLEN_K = {64: 2048}


def short_keys(dtype: str, head_dim: int, seqlen_k: int, options: Options) -> bool:
    """Whether a call with seqlen_k keys counts as short for its bucket (Flags.short_keys)."""
    if options.fwd_warp_specialised_short:
        return False
    return seqlen_k < WS_FWD_MIN_SEQLEN_K.get(head_dim_bucket(head_dim, dtype), 0)


def fp32_split_tiles(bucket: int, arch: str) -> bool:
    """Whether fp32 kernels of this bucket split their streamed tiles (K, V in the forward and dQ kernels;
    Q, dO in dK/dV) into TF32 parts once per tile instead of per fragment. It needs sm_90's shared memory
    for the second set of slots; 3xTF32 products then ran 1.07-1.19x of SDPA float32 forward (H100)."""
    return arch == "sm_90a" and bucket <= 128


def fp32_fwd_tile(bucket: int, arch: str) -> tuple[int, int, int, int]:
    """fp32 tiles hold twice the bytes and the 3xTF32 products need more registers: warps of 16 rows,
    32 keys (16 beyond d = 128); with split tiles, 128 query rows in one block of 8 warps per SM."""
    if fp32_split_tiles(bucket, arch):
        return 128, 32, 8, 2
    return 64, 32 if bucket <= 128 else 16, 4, 2


def fwd_tile(arch: str, dtype: str, bucket: int, flags: Flags, options: Options) -> FwdTile:
    """The forward's kernel and tile for a call."""
    ws = WS_FWD_TILES.get(bucket) if options.fwd_warp_specialised else None
    wide = bucket in WS_FWD_WIDE_TILES and not (flags.sparse or flags.dropout or flags.mod or flags.band == WINDOW)
    if (arch == "sm_90a" and dtype != "float32" and ws and (wide or not flags.short_keys)
            and not (flags.mod and bucket > 128)  # a score function at d = 256 spilled (48-56 bytes)
            and (not flags.sparse or flags.mask_blocks[0] % ws[0] == 0)):
        block_m, block_n, warps, stages = ws
        if wide:
            block_m, block_n, warps, stages = WS_FWD_WIDE_TILES[bucket]
        if flags.mod:
            block_n = WS_FWD_MOD_BLOCK_N[bucket]
        elif flags.band == WINDOW:
            block_n = WS_FWD_WINDOW_BLOCK_N.get(bucket, block_n)
        if flags.sparse:
            block_n = _divides(block_n, flags.mask_blocks[1])
        return FwdTile(block_m, block_n, warps, stages, warp_specialised=True)
    if dtype == "float32":
        block_m, block_n, warps, stages = fp32_fwd_tile(bucket, arch)
    else:
        block_m, block_n, warps, stages = (arch == "sm_90a" and FWD_TILES_SM90.get(bucket)) or FWD_TILES[bucket]
    if flags.sparse:  # kernel tiles divide the mask's blocks
        block_m = _divides(block_m, flags.mask_blocks[0])
        warps = min(warps, block_m // 16)
    if (flags.sparse or flags.alibi or flags.softcap or flags.dropout or flags.band == WINDOW) and block_m > 16 * warps:
        # Warps of 32 rows have no registers left for a mask, window, score change or RNG on wide tiles:
        # fewer keys (tanh needs the most), and beyond d = 128 warps of 16 rows.
        if bucket > 128 or (flags.softcap and flags.dropout and bucket == 128):
            warps = block_m // 16
        else:  # the RNG's registers and a window's bounds tip d = 128 over at 48 keys
            block_n = min(block_n, 32 if flags.softcap or (bucket == 128 and (flags.dropout or flags.band == WINDOW))
                          else 64)
    if flags.mod and block_m > 16 * warps:  # a score function's captured views and positions: warps of 16 rows
        warps = block_m // 16
    if flags.sparse:
        block_n = _divides(block_n, flags.mask_blocks[1])
    return FwdTile(block_m, block_n, warps, stages, split=dtype == "float32" and fp32_split_tiles(bucket, arch))


def fwd_smem(tile: FwdTile, dtype: str, bucket: int) -> int:
    """Dynamic shared memory of the forward: the Q tile and `stages` slots each of K and V (twice with
    split fp32 tiles)."""
    kv_rows = 2 * tile.stages * tile.block_n * (2 if tile.split else 1)
    return tiles_smem(tile.block_m + kv_rows, dtype, bucket, tile.warp_specialised)


# ---- backward ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DkdvTile:
    block_n: int  # keys per block
    block_q: int  # query rows per tile of the walk
    warps: int  # consumer warps (the warp-specialised kernel adds a producer warpgroup)
    splits: int  # column splits of the head dim (blocks per key tile)
    stages: int = 2  # query-tile ring slots
    wgmma: bool = False
    warp_specialised: bool = False
    split: bool = False  # fp32: Q and dO split into TF32 parts once per tile
    fused_dq: bool = False  # accumulates dQ too (kernels/dq_accum.cuh): no dQ kernel


@dataclass(frozen=True)
class DqTile:
    block_m: int
    block_n: int
    warps: int
    stages: int = 2  # K/V ring slots
    wgmma: bool = False
    warp_specialised: bool = False
    split: bool = False  # fp32: K and V split into TF32 parts once per tile


# dK/dV (mma.sync): (block_n keys, query tile rows, warps, column splits). Heads above 128 are split in
# two column halves (two blocks per key tile) so that the dK and dV accumulators fit in registers.
BWD_DKDV_TILES = {32: (128, 64, 8, 1), 64: (128, 64, 8, 1), 96: (128, 64, 8, 1), 128: (128, 32, 8, 1),
                  160: (64, 64, 4, 2), 192: (64, 64, 4, 2), 224: (64, 32, 4, 2), 256: (64, 32, 4, 2)}
# dQ (mma.sync): (block_m queries, block_n keys, warps).
BWD_DQ_TILES = {32: (64, 64, 4), 64: (64, 64, 4), 96: (64, 64, 4), 128: (64, 64, 4),
                160: (64, 32, 4), 192: (64, 32, 4), 224: (64, 32, 4), 256: (64, 32, 4)}
# Hopper wgmma backward (fp16/bf16): warpgroups own 64 rows. The largest tiles that fit registers win
# (one-warpgroup tiles ran at 0.55-0.6x of these); dQ takes three warpgroups (192 query rows share each
# K/V tile). dK/dV: (block_n, block_q, warps); dQ: (block_m, block_n, warps).
WGMMA_BWD_DKDV_TILES = {64: (128, 128, 8), 128: (128, 64, 8), 256: (64, 64, 4)}
WGMMA_BWD_DQ_TILES = {64: (192, 64, 12), 128: (192, 64, 12), 256: (64, 64, 4)}
# Column splits of the wgmma dK/dV kernel (blocks per key tile, each a part of dK's and dV's columns, Sᵀ and
# dPᵀ recomputed by each): at d = 256 a warpgroup's whole dK and dV would take 256 registers. Two halves on
# wgmma ran forward+backward at 1.68-1.74x the mma.sync backward (bf16, 2K-16K, causal or not, H100).
WGMMA_BWD_DKDV_SPLITS = {256: 2}
# Warp-specialised dQ for block masks of 128-row query blocks: 13-14% faster than the plain one on window
# and butterfly masks. (block_m, block_n, warps, K/V slots).
WS_DQ_TILES = {64: (128, 64, 8, 3), 128: (128, 64, 8, 3)}
# Warp-specialised dK/dV for block masks of 128-key blocks: 5-12% faster than the plain one at d = 128
# (H100). (query tile rows, query-tile slots); with tanh or the RNG at d = 128, WS_DKDV_HALF_TILE (64-row
# tiles spill there, as in the plain kernel).
WS_DKDV_TILES = {64: (64, 4), 128: (64, 3)}
WS_DKDV_HALF_TILE = (32, 4)


def fp32_bwd_tiles(bucket: int, arch: str) -> tuple[int, int, int, int, int]:
    """fp32 backward tiles, warps of 16 rows (see fp32_fwd_tile): (dK/dV keys, its query tile, column
    splits, dQ queries, its key tile); beyond d = 128 dK/dV is computed in two column halves."""
    if fp32_split_tiles(bucket, arch):
        return 128, 16, 1, 128, 16
    return (64, 16, 1, 64, 16) if bucket <= 128 else (32, 16, 2, 32, 16)


def dkdv_smem(tile: DkdvTile, dtype: str, bucket: int) -> int:
    """K and V (and, with three slots in the plain kernel, the next item's K and V, copied ahead), then the
    slots of Q and dO (twice with split fp32 tiles), then (fused_dq) two tiles' dSᵀ and two tiles' fp32 dQ
    staging (one at d = 64); the small row statistics are static."""
    kv_buffers = 2 if tile.stages == 3 and not tile.warp_specialised else 1
    q_rows = 2 * tile.stages * tile.block_q * (2 if tile.split else 1)
    staging = 1 if bucket == 64 else 2  # (flash_bwd.cu kStageBufs)
    fused = tile.block_q * (2 * tile.block_n * ITEMSIZE[dtype] + staging * bucket * 4) if tile.fused_dq else 0
    return tiles_smem(2 * kv_buffers * tile.block_n + q_rows, dtype, bucket, tile.wgmma) + fused


def dq_smem(tile: DqTile, dtype: str, bucket: int) -> int:
    """Q and dO tiles and `stages` slots each of K and V."""
    kv_rows = 2 * tile.stages * tile.block_n * (2 if tile.split else 1)
    return tiles_smem(2 * tile.block_m + kv_rows, dtype, bucket, tile.wgmma)


def _three_stages(tile: DkdvTile, dtype: str, bucket: int) -> DkdvTile:
    """Three query-tile slots where the dK/dV kernel runs wgmma on tiles of at most 64 queries and they fit:
    a tile's dK product runs on while the next tile loads (H100, d = 128, 16K: 9% faster causal, 2-3%
    with tanh or dropout, 4.5-7% with ALiBi). With 128-query tiles ptxas serialises the products for want
    of registers."""
    if not tile.wgmma or tile.block_q > 64:
        return tile
    three = dataclasses.replace(tile, stages=3)
    return three if dkdv_smem(three, dtype, bucket) <= shared_memory_limit("sm_90a") else tile


# dQ accumulated in the warp-specialised dK/dV kernel (kernels/dq_accum.cuh), dense Hopper backward:
# (query tile rows, query-tile slots). At d = 128 64-row tiles give each warpgroup whole 64-column halves of
# dQ, at d = 64 128-row tiles give each 64 of the rows; two slots leave room for two tiles' dSᵀ and dQ
# staging.
FUSED_DQ_TILES = {64: (128, 2), 128: (64, 2)}


def dq_accumulation_pays(band: int, seqlen_q: int, kv_group: int) -> bool:
    """Whether a call is long enough for the fused dQ's fixed costs (zeroing and converting the accumulator,
    a barrier between the warpgroups per tile) to pay. Forward+backward against the dQ kernel (H100, bf16,
    d = 128, 16K tokens a batch, 16 query heads): non-causal 1.03x at 1K, 0.92-0.94x at 2K, 0.87-0.93x
    from 4K; causal 1.02x at 1K, 1.04x at 2K, 0.91x at 4K, 0.89-0.92x from 8K; with 4 K/V heads causal
    1.10-1.18x up to 4K, 0.97x at 8K, 0.91x at 16K; a window 1.16x at 4K. At d = 64 (32 query heads) the same
    thresholds hold: non-causal 0.97x at 1K, 0.92x at 2K; causal 1.07-1.11x at 1K, 1.00-1.05x at 2K, 0.92-0.97x
    at 4K."""
    if band == WINDOW:
        return False
    if band == NO_BAND:
        return seqlen_q >= 2048
    return seqlen_q >= (4096 if kv_group == 1 else 8192)


def fused_dq_tile(tile: DkdvTile, bucket: int, flags: Flags, enabled: bool) -> DkdvTile:
    """The warp-specialised dK/dV tile that accumulates dQ too, where it applies (fp16/bf16 wgmma tiles of
    128 keys, no block mask, tanh or RNG, whose tiles are narrower; long_queries) and is enabled, else
    `tile`."""
    fused = FUSED_DQ_TILES.get(bucket)
    if not (enabled and fused and tile.wgmma and tile.block_n == 128 and not tile.split and flags.long_queries
            and not (flags.sparse or flags.softcap or flags.mod or flags.dropout or flags.sink_grad)):
        return tile
    block_q, stages = fused
    return dataclasses.replace(tile, block_q=block_q, warps=8, stages=stages, warp_specialised=True,
                               fused_dq=True)


def ws_dq_tile(tile: DqTile, bucket: int, sparse: bool, enabled: bool) -> DqTile:
    """The warp-specialised dQ tile where it applies (wgmma, a block mask of 128-row query blocks) and is
    enabled, else `tile`."""
    ws = WS_DQ_TILES.get(bucket)
    if not (enabled and tile.wgmma and sparse and ws and tile.block_m == ws[0]):
        return tile
    m, n, warps, stages = ws
    return dataclasses.replace(tile, block_m=m, block_n=min(n, tile.block_n), warps=warps, stages=stages,
                               warp_specialised=True)


def ws_dkdv_tile(tile: DkdvTile, bucket: int, flags: Flags, enabled: bool) -> DkdvTile:
    """The warp-specialised dK/dV tile where it applies (wgmma, a block mask of 128-key blocks) and is
    enabled, else `tile`."""
    ws = WS_DKDV_TILES.get(bucket)
    if ws and bucket == 128 and (flags.softcap or flags.dropout):
        ws = WS_DKDV_HALF_TILE
    if not (enabled and tile.wgmma and flags.sparse and ws and tile.block_n == 128
            and flags.mask_blocks[0] % ws[0] == 0):
        return tile
    block_q, stages = ws
    return dataclasses.replace(tile, block_q=block_q, warps=8, stages=stages, warp_specialised=True)


def bwd_tiles(arch: str, dtype: str, bucket: int, flags: Flags, options: Options) -> tuple[DkdvTile, DqTile]:
    """The dK/dV and dQ kernels' tiles for a backward call."""
    block_n, block_q, warps, splits = BWD_DKDV_TILES[bucket]
    dq_m, dq_n, dq_warps = BWD_DQ_TILES[bucket]
    wgmma = arch == "sm_90a" and dtype != "float32" and bucket in WGMMA_BWD_DKDV_TILES
    if wgmma:
        (block_n, block_q, warps), splits = WGMMA_BWD_DKDV_TILES[bucket], WGMMA_BWD_DKDV_SPLITS.get(bucket, 1)
        dq_m, dq_n, dq_warps = WGMMA_BWD_DQ_TILES[bucket]
        # No registers left on the widest dK/dV tiles for a mask, window, tanh or RNG (ALiBi's bias fits).
        if flags.sparse or flags.softcap or flags.mod or flags.dropout or flags.band == WINDOW:
            block_q = min(block_q, 64)
        # dQ: tanh and the RNG take two warpgroups on 64-key tiles (three spill with tanh); a block mask
        # (whose blocks 192 rows do not divide) or a window takes two warpgroups on 128-key tiles.
        if bucket > 128:  # one warpgroup of 64 queries (its dQ alone takes 128 registers at d = 256); tanh's
            if flags.softcap or flags.mod:  # derivative spilled 4-20 bytes on 64-key tiles
                dq_n = 32
        elif flags.softcap or flags.mod or flags.dropout or flags.sink_grad:  # (row sums: 192-row tiles spilled)
            dq_m, dq_n, dq_warps = 128, 64, 8
        elif flags.sparse or flags.band == WINDOW:
            dq_m, dq_n, dq_warps = 128, 128, 8
    split = dtype == "float32" and fp32_split_tiles(bucket, arch)
    if dtype == "float32":
        block_n, block_q, splits, dq_m, dq_n = fp32_bwd_tiles(bucket, arch)
        warps, dq_warps = block_n // 16, dq_m // 16
    if flags.softcap or flags.mod or (flags.dropout and flags.alibi):  # a score function's derivative or the RNG:
        block_q = max(16, block_q // 2)                                # half the query rows
    if flags.dropout and (flags.alibi or flags.softcap or flags.mod):  # likewise in the dQ kernel: half the keys
        dq_n = min(dq_n, 32 if bucket <= 128 or not flags.mod else 16)  # (a score function at d = 256: 16)
    if flags.mod and bucket > 128 and dtype != "float32":  # a score function beside 256-column accumulators
        dq_n, splits = 16, 4
    if flags.mod and arch != "sm_90a" and dtype != "float32":  # (spilled 16-72 bytes on 64-key mma.sync tiles)
        dq_n = min(dq_n, 32)
    if flags.sparse:  # kernel tiles divide the mask's blocks
        mask_m, mask_n = flags.mask_blocks
        block_n, block_q = _divides(block_n, mask_n), _divides(block_q, mask_m)
        warps = min(warps, block_n // 16)
        dq_m = _divides(dq_m, mask_m)
        dq_n, dq_warps = _divides(dq_n, mask_n), min(dq_warps, dq_m // 16)
    dkdv = _three_stages(DkdvTile(block_n, block_q, warps, splits, wgmma=wgmma, split=split), dtype, bucket)
    dkdv = fused_dq_tile(dkdv, bucket, flags, options.fused_dq)
    dq = DqTile(dq_m, dq_n, dq_warps, wgmma=wgmma, split=split)
    if flags.sparse and not flags.mod:
        dkdv = ws_dkdv_tile(dkdv, bucket, flags, options.dkdv_warp_specialised)
        dq = ws_dq_tile(dq, bucket, True, options.dq_warp_specialised and not flags.sink_grad)
    return dkdv, dq


def spill_allowance(dtype: str, stages: int) -> int:
    """Stack bytes compile-check accepts: none, except
    - fp32, whose accumulators plus split-TF32 fragments and per-slice partial sums overflow 255 registers
      in the backward and beyond d = 128 (it costs fp32 speed, not accuracy);
    - three-slot kernels: the dK/dV kernel with ALiBi and a window at d = 128, and the persistent
      warp-specialised forward with a block mask and dropout (a partial block's element bits): 8-16 bytes."""
    if dtype == "float32":
        return 512
    return 16 if stages == 3 else 0
