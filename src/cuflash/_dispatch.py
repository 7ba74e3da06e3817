"""Kernel variants and their launch values. Pure Python: testable without a GPU.

A variant is one template instance of a kernel family: element type, head dim rounded up to a
compiled bucket, tile shape and flags, as the tile policy (_tiles.py) chooses them. Its launch values
fill the family's parameter struct (kernels/params.cuh, read by _params.py) by field name.
"""
from __future__ import annotations

import dataclasses
import functools
import itertools
from dataclasses import dataclass

from . import _score_fn, _tiles, _tma
from ._options import Options
from ._params import fields, no_fields, param_struct
from ._tiles import BANDS, DTYPES, HEAD_DIM_BUCKETS, MASK_BLOCKS, NO_BAND, Flags, head_dim_bucket

_CUDA_TYPE = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float"}
DEFAULT_OPTIONS = Options()
UNFUSED = Options(fused_dq=False)


def _flags(*flags: bool) -> str:
    return ", ".join("true" if f else "false" for f in flags)


@dataclass(frozen=True)
class FwdVariant:
    """One compiled instance of kernels/flash_fwd.cu (mma.sync) or flash_fwd_ws.cu (Hopper, warp-specialised)."""

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
    warp_specialised: bool = False  # flash_fwd_ws.cu: `warps` consumers and a producer warpgroup, wgmma
    split: bool = False  # fp32: K and V split into TF32 parts once per tile, in a second set of slots
    mod: str = ""  # a user score function's digest (_score_fn.py): its header is compiled in
    params = "FwdParams"

    @property
    def source(self) -> str:
        return "flash_fwd_ws.cu" if self.warp_specialised else "flash_fwd.cu"

    @property
    def wgmma(self) -> bool:
        return self.warp_specialised

    @functools.cached_property
    def name(self) -> str:
        head = (f"cuflash::flash_fwd{'_ws' if self.warp_specialised else ''}_kernel<{_CUDA_TYPE[self.dtype]}, "
                f"{self.head_dim}, {self.block_m}, {self.block_n}, {self.warps}, {self.stages}, {self.band}, ")
        flags = _flags(self.sparse, self.alibi, self.softcap, self.dropout)
        if self.mod:  # (the warp-specialised kernel has no SPLIT)
            return head + flags + ("" if self.warp_specialised else f", {_flags(self.split)}") + ", true>"
        return head + flags + (", true" if self.split else "") + ">"

    @property
    def user_header(self) -> str | None:
        return _score_fn.HEADERS[self.mod] if self.mod else None

    @property
    def threads(self) -> int:
        return 32 * self.warps + (128 if self.warp_specialised else 0)

    @property
    def persistent(self) -> bool:
        return self.warp_specialised

    @property
    def smem_bytes(self) -> int:
        tile = _tiles.FwdTile(self.block_m, self.block_n, self.warps, self.stages, self.warp_specialised, self.split)
        return _tiles.fwd_smem(tile, self.dtype, self.head_dim)

    def describe(self) -> str:
        return _describe(self, f"{self.block_m} queries x {self.block_n} keys", "K/V",
                         "a producer warpgroup copies, by TMA where the arrays allow")


class _SmallKernel:
    """A small kernel (128 threads, no dynamic shared memory, one block per tile) of flash_bwd.cu or `source`:
    its template instance from kernel and template_args(), its one-line description from `what`."""

    source = "flash_bwd.cu"
    threads = 128
    smem_bytes = 0
    persistent = False

    @functools.cached_property
    def name(self) -> str:
        return f"cuflash::{self.kernel}<{', '.join(map(str, self.template_args()))}>"

    def describe(self) -> str:
        return f"{self.kernel}: {self.what}"


@dataclass(frozen=True)
class FwdSinksVariant(_SmallKernel):
    """After the forward, a sink logit per head joins every softmax row (kernels/flash_fwd.cu)."""

    dtype: str
    source = "flash_fwd.cu"
    kernel = "flash_fwd_sinks_kernel"
    params = "FwdSinksParams"
    what = "LSE' = log(e^LSE + e^sink), O *= e^(LSE - LSE'), a warp per row"

    def template_args(self):
        return (_CUDA_TYPE[self.dtype],)


@dataclass(frozen=True)
class RingMergeVariant(_SmallKernel):
    """Ring attention's merge of a partial result into the running one (kernels/ring_merge.cu)."""

    dtype: str  # the part's
    source = "ring_merge.cu"
    kernel = "ring_merge_kernel"
    params = "RingMergeParams"
    what = "LSE' = log(e^LSE + e^LSE_part), O' = O e^(LSE - LSE') + O_part e^(LSE_part - LSE'), a warp per row"

    def template_args(self):
        return (_CUDA_TYPE[self.dtype],)


@dataclass(frozen=True)
class MaskListsVariant(_SmallKernel):
    """BlockMask.from_cuda's lists from its block states, on the GPU (kernels/mask_lists.cu)."""

    mode: int  # 0: the rows' counts, 1: the rows' lists and the pool's slots, 2: the columns' lists
    source = "mask_lists.cu"
    kernel = "mask_lists_kernel"
    params = "MaskListsParams"
    what = "a block mask's lists from its block states, a warp per row or column of blocks"
    dtype = "int32"  # (no element type: for the variant listings)

    def template_args(self):
        return (self.mode,)


@dataclass(frozen=True)
class BwdPreprocessVariant(_SmallKernel):
    dtype: str
    kernel = "flash_bwd_preprocess_kernel"
    params = "BwdPreprocessParams"
    what = "delta = rowsum(dO * O), 4 rows per thread"

    def template_args(self):
        return (_CUDA_TYPE[self.dtype],)


@dataclass(frozen=True)
class _BwdVariant:
    """A backward kernel's instance: its tile (whose fields it answers for) and flags."""

    dtype: str
    head_dim: int
    tile: _tiles.DkdvTile | _tiles.DqTile
    band: int  # NO_BAND, CAUSAL or WINDOW (kernels/band.cuh)
    sparse: bool = False
    alibi: bool = False
    softcap: bool = False
    dropout: bool = False
    mod: str = ""  # a user score function's digest (_score_fn.py): its header is compiled in
    source = "flash_bwd.cu"
    mod_flag = "true"  # the kernel's MOD template argument

    @property
    def user_header(self) -> str | None:
        return _score_fn.HEADERS[self.mod] if self.mod else None

    def __getattr__(self, name):  # the tile's block sizes, warps, stages, wgmma, warp_specialised, split
        if name == "tile":
            raise AttributeError(name)
        return getattr(self.tile, name)

    @property
    def threads(self) -> int:
        return 32 * self.tile.warps + (128 if self.tile.warp_specialised else 0)

    def _template(self, kernel: str, *args) -> str:
        flags = _flags(self.sparse, self.alibi, self.softcap, self.dropout)
        ws = self.tile.warp_specialised
        tail = "" if ws else f", {_flags(self.tile.wgmma)}{', true' if self.tile.split else ''}"
        if getattr(self.tile, "fused_dq", False):
            tail = ", true"
        if self.mod or getattr(self, "row_sums", False):  # (plain kernels only)
            tail = f", {_flags(self.tile.wgmma, self.tile.split)}, {self.mod_flag}"
        return (f"cuflash::{kernel}{'_ws' if ws else ''}_kernel<{_CUDA_TYPE[self.dtype]}, {self.head_dim}, "
                f"{', '.join(map(str, args))}, {self.band}, {flags}{tail}>")


@dataclass(frozen=True)
class BwdDkdvVariant(_BwdVariant):
    params = "BwdDkdvParams"
    persistent = True  # always: a grid of resident blocks takes key tiles from a counter

    @functools.cached_property
    def name(self) -> str:
        t = self.tile
        if t.warp_specialised:
            return self._template("flash_bwd_dkdv", t.block_n, t.block_q, t.warps, t.stages)
        return self._template("flash_bwd_dkdv", self.head_dim // t.splits, t.block_n, t.block_q, t.warps, t.stages)

    @property
    def smem_bytes(self) -> int:
        return _tiles.dkdv_smem(self.tile, self.dtype, self.head_dim)

    def describe(self) -> str:
        t = self.tile
        split = f" ({t.splits} blocks per key tile, a column part each)" if t.splits > 1 else ""
        fused = ", dQ accumulated in fp32 (dS K)" if t.fused_dq else ""
        return _describe(self, f"{t.block_n} keys x {t.block_q} queries{split}{fused}", "Q/dO")


@dataclass(frozen=True)
class BwdDqConvertVariant(_SmallKernel):
    """dq = dq_accum * scale after a dK/dV kernel that accumulated dQ (kernels/dq_accum.cuh)."""

    dtype: str
    head_dim: int  # the dK/dV kernel's bucket: floats per accumulator row
    kernel = "flash_bwd_dq_convert_kernel"
    params = "BwdDqConvertParams"
    what = "dQ = fp32 accumulator * scale, a block per 64-row tile"

    def template_args(self):
        return _CUDA_TYPE[self.dtype], self.head_dim


@dataclass(frozen=True)
class BwdDqVariant(_BwdVariant):
    params = "BwdDqParams"
    score_grads: bool = False  # with mod: only store dS for captured arrays' gradients, no dQ (MOD == 2)
    row_sums: bool = False  # also rowsum(P * dP) in fp32 for the sinks' gradient (MOD & 4)

    @property
    def mod_flag(self) -> str:
        return str((2 if self.score_grads else 1 if self.mod else 0) | (4 if self.row_sums else 0))

    @property
    def persistent(self) -> bool:
        return self.tile.warp_specialised

    @functools.cached_property
    def name(self) -> str:
        t = self.tile
        if t.warp_specialised:
            return self._template("flash_bwd_dq", t.block_m, t.block_n, t.warps, t.stages)
        return self._template("flash_bwd_dq", t.block_m, t.block_n, t.warps)

    @property
    def smem_bytes(self) -> int:
        return _tiles.dq_smem(self.tile, self.dtype, self.head_dim)

    def describe(self) -> str:
        return _describe(self, f"{self.tile.block_m} queries x {self.tile.block_n} keys", "K/V")


def _describe(v, tile: str, ring: str, copies: str = "a producer warpgroup copies") -> str:
    """One line on what a variant runs: its kernel, products, tile, warps, ring slots, shared memory."""
    kernel = v.name.split("::")[1].split("<")[0]
    how = [f"warp-specialised ({copies})" if v.warp_specialised else None,
           "wgmma" if v.wgmma else "mma.sync", "3xTF32 split tiles" if getattr(v, "split", False) else None,
           "persistent" if v.persistent else None]
    warps = f"{v.warps} {'consumer ' if v.warp_specialised else ''}warps"
    return (f"{kernel} ({', '.join(h for h in how if h)}): {tile}, {warps}, {v.stages} {ring} slots, "
            f"{v.smem_bytes / 1024:.1f} KiB shared memory")


def explain(p, arch: str, options: Options = DEFAULT_OPTIONS) -> list[str]:
    """What a call (a _problem.Problem) runs on `arch`: the forward's and the backward's kernels, one line
    each, then their template instances."""
    flags = p.flags(options)
    fwd = choose_fwd(p.dtype, p.head_dim, flags, arch, options)
    bwd = choose_bwd(p.dtype, p.head_dim, flags, arch, options)
    lines = [f"forward   {fwd.describe()}"]
    lines += [f"{label:9} {v.describe()}" for label, v in zip(("backward", "", ""), bwd)]
    return lines + ["", "instances:"] + [f"  {v.name}" for v in (fwd, *bwd)]


def _mods(flags: Flags) -> tuple:
    """The variant fields after the band: sparse, alibi, softcap, dropout. A block mask holds causal and
    any window itself, so sparse variants have no band."""
    return (NO_BAND if flags.sparse else flags.band, flags.sparse, flags.alibi, flags.softcap, flags.dropout)


@functools.lru_cache(maxsize=None)
def choose_fwd(dtype: str, head_dim: int, flags: Flags = Flags(), arch: str = "sm_80",
               options: Options = DEFAULT_OPTIONS) -> FwdVariant:
    """The forward variant for a call."""
    bucket = head_dim_bucket(head_dim, dtype)
    t = _tiles.fwd_tile(arch, dtype, bucket, flags, options)
    padded = _tiles.WS_FWD_PADDED_BUCKET.get(bucket)
    if padded and not t.warp_specialised:
        wide = _tiles.fwd_tile(arch, dtype, padded, flags, options)
        if wide.warp_specialised:
            bucket, t = padded, wide
    return FwdVariant(dtype, bucket, t.block_m, t.block_n, t.warps, t.stages, *_mods(flags),
                      warp_specialised=t.warp_specialised, split=t.split, mod=flags.mod)


@functools.lru_cache(maxsize=None)
def choose_bwd(dtype: str, head_dim: int, flags: Flags = Flags(), arch: str = "sm_80",
               options: Options = DEFAULT_OPTIONS) -> tuple:
    """(preprocess, dK/dV, dQ) variants for a backward call; the third is the dQ kernel, or the conversion of
    the accumulated dQ where the dK/dV kernel accumulates it (its tile's fused_dq)."""
    bucket = head_dim_bucket(head_dim, dtype)
    dkdv, dq = _tiles.bwd_tiles(arch, dtype, bucket, flags, options)
    third = (BwdDqConvertVariant(dtype, bucket) if dkdv.fused_dq
             else BwdDqVariant(dtype, bucket, dq, *_mods(flags), mod=flags.mod, row_sums=flags.sink_grad))
    return BwdPreprocessVariant(dtype), BwdDkdvVariant(dtype, bucket, dkdv, *_mods(flags), mod=flags.mod), third


def choose_dscore(dtype: str, head_dim: int, flags: Flags, arch: str = "sm_80", options: Options = DEFAULT_OPTIONS):
    """The kernel that stores dS with respect to a score function's value (for captured arrays' gradients):
    the dQ kernel's instance with MOD == 2, on the tiles of the two-kernel backward's dQ kernel."""
    bucket = head_dim_bucket(head_dim, dtype)
    _, dq = _tiles.bwd_tiles(arch, dtype, bucket, flags, dataclasses.replace(options, fused_dq=False))
    return BwdDqVariant(dtype, bucket, dq, *_mods(flags), mod=flags.mod, score_grads=True)


DQ_ACCUM_ROWS = 64  # query rows of a dQ accumulator tile (kernels/dq_accum.cuh kDqTileRows)
TILE_STAT_ALIGN = 128  # (kernels/dq_accum.cuh kTileStatAlign)


def dq_accum_floats(variants, p, lse_numel: int) -> tuple[int, int]:
    """(offset, floats) of the dQ accumulator inside the backward's float32 workspace, after delta's
    lse_numel floats (rounded up to 128 bytes, a bulk reduction's alignment); (0, 0) when the dK/dV kernel
    does not accumulate dQ. Its 64-row tiles per (batch element, query head), or for packed sequences
    (total_q / 64 + batch) per head (kernels/dq_accum.cuh dq_accum_tile)."""
    if not isinstance(variants[2], BwdDqConvertVariant):
        return 0, 0
    offset = -(-lse_numel // 32) * 32
    return offset, _dq_accum_only_floats(p, variants[2]) + _tile_stats_floats(p)


def _dq_accum_only_floats(p, convert) -> int:
    if p.packed:
        tiles = (p.packed[0] // DQ_ACCUM_ROWS + p.batch) * p.nheads
    else:
        tiles = p.batch * p.nheads * -(-p.seqlen_q // DQ_ACCUM_ROWS)
    return tiles * DQ_ACCUM_ROWS * convert.head_dim


def _tile_stats_floats(p) -> int:
    """After the accumulator: each query row's lse and delta again, rows padded to TILE_STAT_ALIGN, which the
    dK/dV kernel copies with each query tile by TMA (kernels/dq_accum.cuh tile_stats_row); fixed lengths
    only (packed sequences are not copied by TMA)."""
    return 0 if p.packed else p.batch * p.nheads * 2 * _tile_stat_cols(p)


def _tile_stat_cols(p) -> int:
    return -(-p.seqlen_q // TILE_STAT_ALIGN) * TILE_STAT_ALIGN


def _all_flags():
    for alibi, softcap, dropout in itertools.product((False, True), repeat=3):
        mods = dict(alibi=alibi, softcap=softcap, dropout=dropout)
        for band in BANDS:
            yield Flags(band=band, **mods)
        for blocks in MASK_BLOCKS:
            yield Flags(mask_blocks=blocks, **mods)


def all_variants(arch: str = "sm_80") -> list:
    """Every kernel variant the dispatcher chooses on `arch` with the default options, and the
    warp-specialised ones for every call they can take (what compile-check and warmup build)."""
    out = []
    for flags in _all_flags():
        for short in (False, True):  # short keys: the buckets where short calls take another kernel
            f = Flags(flags.band, flags.mask_blocks, flags.alibi, flags.softcap, flags.dropout, short_keys=short)
            out += [choose_fwd(dt, d, f, arch) for dt in DTYPES for d in HEAD_DIM_BUCKETS
                    if not short or d in _tiles.WS_FWD_MIN_SEQLEN_K]
    for dt, d, flags in itertools.product(DTYPES, HEAD_DIM_BUCKETS, _all_flags()):
        out += choose_bwd(dt, d, flags, arch)
        out += choose_bwd(dt, d, flags, arch, UNFUSED)  # deterministic calls: the dQ kernel
        if flags.sparse:
            bucket = head_dim_bucket(d, dt)
            _, dkdv, dq = choose_bwd(dt, d, flags, arch)
            out += [BwdDkdvVariant(dt, bucket, _tiles.ws_dkdv_tile(dkdv.tile, bucket, flags, True), *_mods(flags)),
                    BwdDqVariant(dt, bucket, _tiles.ws_dq_tile(dq.tile, bucket, True, True), *_mods(flags))]
    out += [FwdSinksVariant(dt) for dt in DTYPES] + [RingMergeVariant(dt) for dt in DTYPES]
    out += [MaskListsVariant(mode) for mode in range(3)]
    return list(dict.fromkeys(out))  # fp32's coarser buckets repeat variants


def spill_allowance(variant) -> int:
    """Stack bytes compile-check accepts for a variant (_tiles.spill_allowance)."""
    return _tiles.spill_allowance(variant.dtype, getattr(variant, "stages", 2))


# ---- launch values -------------------------------------------------------------------------------

NO_ALIBI = (0, 0)
NO_LISTS = no_fields("BlockLists")  # what dense kernels get
NO_DROPOUT = (0, 0, 0, 0, 1.0)
NO_MOD = no_fields("ModArgs")  # what kernels without a score function get
PREPROCESS_ROWS = 4  # rows per thread of the backward's preprocess kernel (kernels/flash_bwd.cu kRows)


def dropout_threshold(dropout_p: float) -> int:
    """The kernels keep a score when its 16-bit random number is >= this (kernels/dropout.cuh):
    dropout_p rounded to a multiple of 2^-16, at most 1 - 2^-16."""
    return min(65535, round(dropout_p * 65536))


def dropout_args(dropout_p: float, seed: int = 0, offset: int = 0, state_ptr: int = 0) -> tuple:
    """DropoutArgs' fields: the RNG's seed and offset (64-bit), or a device pointer to four uint32 words
    (seed lo, seed hi, offset lo, offset hi) that replaces them."""
    if not dropout_p:
        return NO_DROPOUT
    threshold = dropout_threshold(dropout_p)
    return state_ptr, seed % 2**64, offset % 2**64, threshold, 65536.0 / (65536 - threshold)


_STRIDE_FIELDS = {a: (f"{a}_sb", f"{a}_ss", f"{a}_sh") for a in ("q", "k", "v", "o", "do", "dq", "dk", "dv")}


def _put_strides(fields: dict, **arrays) -> None:
    """The batch, sequence and head strides of each (pointer, strides) array, as fields <name>_sb, _ss, _sh."""
    for name, (_, strides) in arrays.items():
        sb, ss, sh = _STRIDE_FIELDS[name]
        fields[sb], fields[ss], fields[sh] = strides[0], strides[1], strides[2]


def _common_fields(p, alibi, varlen, dropout, mod=NO_MOD) -> dict:
    """The fields the forward, dK/dV and dQ kernels share. Fixed lengths have no cu_seqlens and a log-sum-exp
    (batch, nheads, seqlen_q); varlen = (cu_seqlens_q pointer, cu_seqlens_k pointer, total_q, total_k): packed
    sequences, whose log-sum-exp is (nheads, total_q), and whose offsets the kernels clamp to the rows."""
    window_left, window_right = p.band_args()
    softmax_scale, softcap_mult = p.kernel_scales()
    if varlen is None:
        cu_q, cu_k, total_q, total_k, lse_sb, lse_sh = 0, 0, 0, 0, p.nheads * p.seqlen_q, p.seqlen_q
    else:
        cu_q, cu_k, total_q, total_k = varlen
        lse_sb, lse_sh = 0, total_q
    return {"max_seqlen_q": p.seqlen_q, "max_seqlen_k": p.seqlen_k, "nheads": p.nheads,
            "kv_group": p.nheads // p.nheads_k, "head_dim": p.head_dim, "window_left": window_left,
            "window_right": window_right, "softmax_scale": softmax_scale, "softcap_mult": softcap_mult,
            "alibi_slopes": alibi[0], "alibi_sb": alibi[1], "cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k,
            "total_q": total_q, "total_k": total_k, "lse_sb": lse_sb, "lse_sh": lse_sh, "dropout": dropout, "mod": mod}


def row_tiles(seqlen: int, tile: int, lists: tuple) -> int:
    """Query tiles per (batch, head) over seqlen rows. With a block mask, every tile of every row block:
    the forward and dQ kernels run them heaviest first (BlockLists::heaviest_first), so any block may
    come last (its tiles past seqlen return at once)."""
    if not lists[0]:  # no block mask (a null count pointer)
        return -(-seqlen // tile)
    row_block = lists[LISTS_ROW_BLOCK]
    return -(-seqlen // row_block) * (row_block // tile)


LISTS_ROW_BLOCK = [f for f, _ in fields("BlockLists", "block_sparse.cuh")].index("row_block")


def _check_grid(blocks: int) -> None:
    if blocks >= 2**31:
        raise ValueError(f"problem too large: {blocks} thread blocks exceed the grid limit 2^31 - 1")


def fwd_launch(variant: FwdVariant, p, q, k, v, o, lse_ptr: int, lists: tuple = NO_LISTS, alibi: tuple = NO_ALIBI,
               varlen=None, dropout: tuple = NO_DROPOUT, persistent: tuple[int, int] = (0, 1), mod: tuple = NO_MOD,
               tma: bool = True):
    """(blocks, threads, FwdParams values) for the forward kernel.

    q, k, v, o are (pointer, strides) pairs with strides in elements for (batch, seq, head, dim). The
    grid is one-dimensional (query tiles x batch x heads, up to 2^31 - 1 blocks), so no grid dimension
    can pass 65535. A persistent kernel: persistent = (its tile counter, the most blocks resident at
    once); its grid is at most that. mod: ModArgs' fields (_score_fn.ScoreFn.args). tma: the warp-specialised
    kernel copies by TMA where the arrays allow (_tma.py).
    """
    num_m_blocks = row_tiles(p.seqlen_q, variant.block_m, lists)
    tiles = num_m_blocks * p.batch * p.nheads
    _check_grid(tiles)
    fields = _common_fields(p, alibi, varlen, dropout, mod)
    fields.update(q=q[0], k=k[0], v=v[0], o=o[0], lse=lse_ptr, num_m_blocks=num_m_blocks, lists=lists,
                  tile_counter=persistent[0], num_tiles=tiles)
    _put_strides(fields, q=q, k=k, v=v, o=o)
    fields.update(_tma_maps(variant, p, q, k, v) if tma and varlen is None else _NO_MAPS)
    blocks = min(tiles, persistent[1]) if variant.persistent else tiles
    return blocks, variant.threads, param_struct(variant.params).pack(fields)


_NO_MAPS = {"tma": 0, "q_map": _tma.NO_MAP, "k_map": _tma.NO_MAP, "v_map": _tma.NO_MAP}


def _tma_maps(variant: FwdVariant, p, q, k, v) -> dict:
    """The fields of the warp-specialised forward's copies by TMA: its tensor maps of q, k and v (boxes of
    its tiles' rows), or none where the kernel is another or an array's strides do not allow them."""
    if not variant.warp_specialised:
        return _NO_MAPS
    maps = (_tma.tile_map(q[0], (p.batch, p.seqlen_q, p.nheads, p.head_dim), tuple(q[1][:3]), variant.block_m),
            _tma.tile_map(k[0], (p.batch, p.seqlen_k, p.nheads_k, p.head_dim), tuple(k[1][:3]), variant.block_n),
            _tma.tile_map(v[0], (p.batch, p.seqlen_k, p.nheads_k, p.head_dim), tuple(v[1][:3]), variant.block_n))
    if None in maps:
        return _NO_MAPS
    return {"tma": 1, "q_map": maps[0], "k_map": maps[1], "v_map": maps[2]}


_NO_DKDV_MAPS = dict(_NO_MAPS, do_map=_tma.NO_MAP, stats_map=_tma.NO_MAP)


def _dkdv_tma_maps(variant, p, q, k, v, dout, tile_stats: int) -> dict:
    """The same for the warp-specialised dK/dV kernel: q and dout in boxes of its query tiles' rows, k and v in
    boxes of 8 rows (its K/V tiles' layout); where it accumulates dQ, also the row statistics at tile_stats
    (kernels/dq_accum.cuh tile_stats_row) in boxes of a query tile's lse and delta rows."""
    if not variant.tile.warp_specialised or (variant.tile.fused_dq and not tile_stats):
        return _NO_DKDV_MAPS
    bq = variant.tile.block_q
    q_shape, k_shape = (p.batch, p.seqlen_q, p.nheads, p.head_dim), (p.batch, p.seqlen_k, p.nheads_k, p.head_dim)
    maps = (_tma.tile_map(q[0], q_shape, tuple(q[1][:3]), bq),
            _tma.tile_map(k[0], k_shape, tuple(k[1][:3]), 8),
            _tma.tile_map(v[0], k_shape, tuple(v[1][:3]), 8),
            _tma.tile_map(dout[0], q_shape, tuple(dout[1][:3]), bq),
            _tma.rows_map(tile_stats, _tile_stat_cols(p), 2 * p.batch * p.nheads, (bq, 2)) if variant.tile.fused_dq
            else _tma.NO_MAP)
    if None in maps:
        return _NO_DKDV_MAPS
    return dict(zip(("q_map", "k_map", "v_map", "do_map", "stats_map"), maps), tma=1)


def sinks_launch(variant: FwdSinksVariant, p, o, lse_ptr: int, sinks_ptr: int):
    """(blocks, threads, FwdSinksParams values) of the sinks' pass over the forward's o and lse; o as for
    fwd_launch (packed arrays batched, batch stride 0)."""
    seqlen, batch, (lse_sb, lse_sh) = ((p.packed[0], 1, (0, p.packed[0])) if p.packed
                                      else (p.seqlen_q, p.batch, (p.nheads * p.seqlen_q, p.seqlen_q)))
    rows = batch * p.nheads * seqlen
    blocks = -(-rows // 4)
    _check_grid(blocks)
    fields = dict(o=o[0], lse=lse_ptr, sinks=sinks_ptr, lse_sb=lse_sb, lse_sh=lse_sh, seqlen=seqlen, nheads=p.nheads,
                  head_dim=p.head_dim, rows=rows)
    _put_strides(fields, o=o)
    return blocks, variant.threads, param_struct(variant.params).pack(fields)


def ring_merge_launch(variant: RingMergeVariant, o, lse, part, part_lse):
    """(blocks, threads, RingMergeParams values): o and part (pointer, strides) of (batch, seqlen, nheads,
    head_dim) arrays, lse and part_lse of (batch, nheads, seqlen) ones; shapes from o's."""
    (o_ptr, o_strides, (batch, seqlen, nheads, head_dim)), (lse_ptr, lse_strides) = o, lse
    rows = batch * nheads * seqlen
    blocks = -(-rows // 4)
    _check_grid(blocks)
    fields = dict(o=o_ptr, lse=lse_ptr, part=part[0], part_lse=part_lse[0], seqlen=seqlen, nheads=nheads,
                  head_dim=head_dim, rows=rows)
    for name, strides in (("o", o_strides), ("part", part[1])):
        fields[f"{name}_sb"], fields[f"{name}_ss"], fields[f"{name}_sh"] = strides[:3]
    for name, strides in (("lse", lse_strides), ("part_lse", part_lse[1])):
        fields[f"{name}_sb"], fields[f"{name}_sh"], fields[f"{name}_ss"] = strides
    return blocks, variant.threads, param_struct(variant.params).pack(fields)


def preprocess_row_lanes(head_dim: int, dtype: str) -> int:
    """Lanes per row of the backward's preprocess kernel: one per 16-byte chunk of the row, rounded up
    to a power of two, at most a warp."""
    chunks = -(-head_dim * _tiles.ITEMSIZE[dtype] // 16)
    return min(32, 1 << (chunks - 1).bit_length())


def bwd_launches(variants, p, q, k, v, dout, out, lse_ptr: int, delta_ptr: int, dq, dk, dv,
                 query_lists: tuple = NO_LISTS, key_lists: tuple = NO_LISTS, alibi: tuple = NO_ALIBI, varlen=None,
                 dropout: tuple = NO_DROPOUT, persistent: tuple[int, int] = (0, 1),
                 persistent_dq: tuple[int, int] = (0, 1), dq_accum_ptr: int = 0, mod: tuple = NO_MOD,
                 dscore: tuple | None = None, tma: bool = True):
    """[(variant, blocks, threads, values)] for the three backward kernels, in launch order.

    Arrays as for fwd_launch; lse and delta are contiguous float32 (batch, nheads, seqlen_q) buffers, or
    (nheads, total_q) with varlen (packed arrays come with batch stride 0). The dK/dV kernel is always
    persistent, the dQ kernel when warp-specialised: persistent and persistent_dq = (tile counter, the
    blocks the GPU holds at once). A dK/dV kernel that accumulates dQ does so at dq_accum_ptr (zeros, rows
    as lse's of head_dim-bucket floats), and the third launch converts it into dq. dscore = (variant,
    ModArgs' fields with its buffer): a fourth launch stores dS for captured arrays' gradients (choose_dscore).
    tma: the warp-specialised dK/dV kernel copies by TMA where the arrays allow (_tma.py).
    """
    pre, dkdv, dqv = variants
    # The dK/dV kernel's row statistics by copy follow the dQ accumulator (dq_accum_floats).
    tile_stats = dq_accum_ptr + 4 * _dq_accum_only_floats(p, dqv) if dq_accum_ptr and _tile_stats_floats(p) else 0
    # delta_i = rowsum(dO_i * O_i) for every query row; packed sequences are one batch of total_q rows.
    pre_seqlen, pre_batch = (p.seqlen_q, p.batch) if varlen is None else (varlen[2], 1)
    launches = []
    if pre_batch * p.nheads * pre_seqlen:
        lanes = preprocess_row_lanes(p.head_dim, pre.dtype)
        blocks_per_bh = -(-pre_seqlen // (PREPROCESS_ROWS * pre.threads // lanes))
        fields = {"dout": dout[0], "out": out[0], "delta": delta_ptr, "seqlen_q": pre_seqlen, "nheads": p.nheads,
                  "head_dim": p.head_dim, "blocks_per_bh": blocks_per_bh, "row_lanes": lanes, "lse": lse_ptr,
                  "tile_stats": tile_stats}
        _put_strides(fields, do=dout, o=out)
        launches.append((pre, pre_batch * p.nheads * blocks_per_bh, pre.threads, param_struct(pre.params).pack(fields)))
    common = _common_fields(p, alibi, varlen, dropout, mod)
    common.update(q=q[0], k=k[0], v=v[0], dout=dout[0], lse=lse_ptr, delta=delta_ptr)
    _put_strides(common, q=q, k=k, v=v, do=dout)
    num_n_blocks = -(-p.seqlen_k // dkdv.block_n)  # in order: the first key tiles of a causal mask are the heaviest
    items = num_n_blocks * dkdv.splits * p.batch * p.nheads_k
    if items:
        _check_grid(items)
        fields = dict(common, dk=dk[0], dv=dv[0], dq_accum=dq_accum_ptr, num_n_blocks=num_n_blocks, lists=key_lists,
                      tile_counter=persistent[0], num_items=items)
        _put_strides(fields, dk=dk, dv=dv)
        fields.update(_dkdv_tma_maps(dkdv, p, q, k, v, dout, tile_stats) if tma and varlen is None else _NO_DKDV_MAPS)
        launches.append((dkdv, min(items, persistent[1]), dkdv.threads, param_struct(dkdv.params).pack(fields)))
    if isinstance(dqv, BwdDqConvertVariant):
        m_tiles = -(-p.seqlen_q // DQ_ACCUM_ROWS)
        if p.batch * p.nheads * m_tiles:  # with no keys the accumulator holds the zeros dQ is
            blocks = p.batch * p.nheads * m_tiles
            _check_grid(blocks)
            fields = {"dq_accum": dq_accum_ptr, "dq": dq[0], "cu_seqlens_q": common["cu_seqlens_q"],
                      "max_seqlen_q": p.seqlen_q, "total_q": common["total_q"], "nheads": p.nheads,
                      "head_dim": p.head_dim, "m_tiles": m_tiles, "softmax_scale": common["softmax_scale"]}
            _put_strides(fields, dq=dq)
            launches.append((dqv, blocks, dqv.threads, param_struct(dqv.params).pack(fields)))
        return launches
    launches += _dq_launch(dqv, p, common, dq, query_lists, persistent_dq)
    if dscore is not None:
        launches += _dq_launch(dscore[0], p, dict(common, mod=dscore[1]), dq, query_lists, (0, 1))
    return launches


def _dq_launch(dqv, p, common: dict, dq, query_lists: tuple, persistent_dq: tuple[int, int]) -> list:
    num_m_blocks = row_tiles(p.seqlen_q, dqv.block_m, query_lists)
    items = num_m_blocks * p.batch * p.nheads
    if not items:
        return []
    _check_grid(items)
    fields = dict(common, dq=dq[0], num_m_blocks=num_m_blocks, lists=query_lists, tile_counter=persistent_dq[0],
                  num_items=items)
    _put_strides(fields, dq=dq)
    return [(dqv, min(items, persistent_dq[1]) if dqv.persistent else items, dqv.threads,
             param_struct(dqv.params).pack(fields))]
