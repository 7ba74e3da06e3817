"""Variant choice, the tile policy and launch values (pure Python)."""
import struct

import pytest

from cuflash import _dispatch, _tiles
from cuflash._arch import shared_memory_limit
from cuflash._dispatch import choose_bwd, choose_fwd, fwd_launch
from cuflash._options import Options, override
from cuflash._params import param_struct
from cuflash._problem import Problem
from cuflash._tiles import CAUSAL, NO_BAND, WINDOW, Flags, head_dim_bucket


def problem(batch=2, seqlen_q=1000, seqlen_k=1000, nheads=8, nheads_k=8, head_dim=128, dtype="bfloat16", **kw):
    return Problem(batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, dtype, 0.1, **kw)


def values(variant, packed):
    """Launch values by field name (nested structs as tuples)."""
    out, i = {}, 0
    for name, code in param_struct(variant.params).fields:
        n = {"BlockLists": len(_dispatch.NO_LISTS), "DropoutArgs": len(_dispatch.NO_DROPOUT),
             "ModArgs": len(_dispatch.NO_MOD)}.get(code, 1)
        out[name] = packed[i] if n == 1 else packed[i:i + n]
        i += n
    assert i == len(packed)
    return out


@pytest.mark.parametrize("d, bucket", [(8, 32), (32, 32), (40, 64), (64, 64), (80, 96), (128, 128), (136, 160),
                                       (200, 224), (256, 256)])
def test_head_dim_buckets(d, bucket):
    assert head_dim_bucket(d) == bucket


# The tile policy as a table: (arch, dtype, head dim, flags) -> the forward tile and the backward's
# (dK/dV, dQ) kernels. Each row is a decision documented in _tiles.py.
FWD_TABLE = [
    ("sm_80", "bfloat16", 128, Flags(), (128, 48, 4, 2, False)),
    ("sm_80", "bfloat16", 128, Flags(band=WINDOW), (128, 32, 4, 2, False)),  # a window's bounds: 32 keys
    ("sm_80", "bfloat16", 256, Flags(softcap=True), (128, 32, 8, 2, False)),  # beyond d=128: warps of 16 rows
    ("sm_80", "bfloat16", 64, Flags(mask_blocks=(64, 64)), (64, 64, 4, 2, False)),  # tiles divide the blocks
    ("sm_90a", "bfloat16", 256, Flags(), (128, 48, 8, 3, True)),  # warp-specialised: 48 keys leave O its registers
    ("sm_90a", "bfloat16", 224, Flags(), (128, 64, 8, 2, False)),  # mma.sync (wgmma tiles: whole 64-column blocks)
    ("sm_90a", "bfloat16", 128, Flags(band=CAUSAL), (128, 128, 8, 3, True)),  # warp-specialised, 3 slots
    ("sm_90a", "bfloat16", 64, Flags(short_keys=True), (192, 128, 12, 3, True)),  # three warpgroups at any length
    ("sm_90a", "bfloat16", 64, Flags(short_keys=True, band=WINDOW), (128, 64, 4, 2, False)),  # two: short keys, mma.sync
    ("sm_90a", "bfloat16", 64, Flags(mask_blocks=(64, 128)), (64, 128, 4, 2, False)),  # 64-row blocks: mma.sync
    ("sm_90a", "float32", 128, Flags(), (128, 32, 8, 2, False)),  # fp32 split tiles
    ("sm_80", "float32", 256, Flags(), (64, 16, 4, 2, False)),
]


@pytest.mark.parametrize("arch, dtype, head_dim, flags, expected", FWD_TABLE)
def test_forward_tile_policy(arch, dtype, head_dim, flags, expected):
    t = _tiles.fwd_tile(arch, dtype, head_dim_bucket(head_dim, dtype), flags, Options())
    assert (t.block_m, t.block_n, t.warps, t.stages, t.warp_specialised) == expected


BWD_TABLE = [  # dK/dV (block_n, block_q, warps, stages, ws); dQ (block_m, block_n, warps, ws)
    ("sm_80", "bfloat16", 128, Flags(), (128, 32, 8, 2, False), (64, 64, 4, False)),
    ("sm_90a", "bfloat16", 128, Flags(), (128, 64, 8, 2, True), (192, 64, 12, False)),  # dQ accumulated
    ("sm_90a", "bfloat16", 128, Flags(softcap=True), (128, 32, 8, 3, False), (128, 64, 8, False)),
    ("sm_90a", "bfloat16", 128, Flags(mask_blocks=(128, 128)), (128, 64, 8, 3, True), (128, 64, 8, True)),
    ("sm_90a", "bfloat16", 128, Flags(mask_blocks=(128, 128), dropout=True), (128, 32, 8, 4, True),
     (128, 64, 8, True)),
    ("sm_90a", "bfloat16", 64, Flags(mask_blocks=(64, 64)), (64, 64, 4, 3, False), (64, 64, 4, False)),
    ("sm_90a", "float32", 128, Flags(), (128, 16, 8, 2, False), (128, 16, 8, False)),
]


@pytest.mark.parametrize("arch, dtype, head_dim, flags, dkdv, dq", BWD_TABLE)
def test_backward_tile_policy(arch, dtype, head_dim, flags, dkdv, dq):
    a, b = _tiles.bwd_tiles(arch, dtype, head_dim_bucket(head_dim, dtype), flags, Options())
    assert (a.block_n, a.block_q, a.warps, a.stages, a.warp_specialised) == dkdv
    assert (b.block_m, b.block_n, b.warps, b.warp_specialised) == dq


@pytest.mark.parametrize("dtype, head_dim, flags, options, fused", [
    ("bfloat16", 128, Flags(), Options(), True),
    ("float16", 128, Flags(band=1, alibi=True), Options(), True),
    ("bfloat16", 128, Flags(), Options(fused_dq=False), False),  # deterministic calls
    ("bfloat16", 128, Flags(long_queries=False), Options(), False),
    ("bfloat16", 128, Flags(band=WINDOW), Options(), True),  # (a window's calls come with long_queries=False)
    ("bfloat16", 128, Flags(softcap=True), Options(), False),
    ("bfloat16", 128, Flags(dropout=True), Options(), False),
    ("bfloat16", 128, Flags(mask_blocks=(128, 128)), Options(), False),
    ("bfloat16", 64, Flags(), Options(), True),  # 128-row tiles, a warpgroup's half of the rows
    ("bfloat16", 96, Flags(), Options(), False),
    ("float32", 128, Flags(), Options(), False),
])
def test_which_backward_accumulates_dq(dtype, head_dim, flags, options, fused):
    """The warp-specialised dK/dV kernel accumulates dQ (and the third kernel converts it) for dense fp16/bf16
    calls at d = 64 and 128 on Hopper; the others keep the dQ kernel; no variant spills (test_compile)."""
    variants = _dispatch.choose_bwd(dtype, head_dim, flags, "sm_90a", options)
    assert variants[1].tile.fused_dq == fused
    assert isinstance(variants[2], _dispatch.BwdDqConvertVariant) == fused
    if fused:
        assert variants[1].tile.warp_specialised and variants[1].smem_bytes <= _tiles.shared_memory_limit("sm_90a")
    assert not _dispatch.choose_bwd(dtype, head_dim, flags, "sm_80", options)[1].tile.fused_dq


def test_tile_policy_is_a_pure_function_of_its_arguments():
    """Same arguments, same tile; options change it only through the argument (no module state)."""
    flags = Flags(mask_blocks=(128, 128))
    first = _tiles.bwd_tiles("sm_90a", "bfloat16", 128, flags, Options())
    off = _tiles.bwd_tiles("sm_90a", "bfloat16", 128, flags, Options(dq_warp_specialised=False,
                                                                          dkdv_warp_specialised=False))
    assert _tiles.bwd_tiles("sm_90a", "bfloat16", 128, flags, Options()) == first
    assert first[0].warp_specialised and first[1].warp_specialised
    assert not off[0].warp_specialised and not off[1].warp_specialised
    assert not _tiles.fwd_tile("sm_90a", "bfloat16", 128, Flags(), Options(fwd_warp_specialised=False)).warp_specialised


def test_options_from_the_environment_and_override():
    env = {"CUFLASH_WGMMA": "0", "CUFLASH_FWD_WS": "all", "CUFLASH_DQ_WS": "0", "CUFLASH_PERSISTENT": "0",
           "CUFLASH_BWD_STREAMS": "1"}
    o = Options.from_env(env)
    assert not o.wgmma and o.fwd_warp_specialised and o.fwd_warp_specialised_short and not o.dq_warp_specialised
    assert o.dkdv_warp_specialised and not o.persistent and not o.bwd_side_stream
    assert Options.from_env({}) == Options()
    from cuflash import _options

    before = _options.current()
    with override(wgmma=False):
        assert _options.current() == Options(**{**vars(before), "wgmma": False})
    assert _options.current() == before


@pytest.mark.parametrize("arch, limit_kib", [("sm_80", 163), ("sm_90a", 227)])
def test_every_head_dim_has_a_tile_that_fits_the_shared_memory(arch, limit_kib):
    variants = _dispatch.all_variants(arch)
    fwd = [v for v in variants if isinstance(v, _dispatch.FwdVariant)]
    for v in fwd:
        assert v.block_m % (16 * v.warps) == 0 and v.block_n % 16 == 0
    for v in variants:
        assert v.smem_bytes + 2048 <= limit_kib * 1024  # dynamic + a little static shared memory
    dense = [v for v in fwd if not v.sparse]
    dims = 2 * len(_tiles.HEAD_DIM_BUCKETS) + len(_tiles.FP32_HEAD_DIM_BUCKETS)  # fp16, bf16, fp32
    short = 0
    if arch == "sm_90a":  # padded buckets share wider ones' variants; short calls of these buckets take the
        dims -= 2 * len(_tiles.WS_FWD_PADDED_BUCKET)  # mma.sync forward with a window or dropout (16 of 24)
        short = 2 * len(_tiles.WS_FWD_MIN_SEQLEN_K) * 16
    assert len(dense) == dims * 3 * 4 * 2 + short  # dims x band (none, causal, window) x mods x dropout


@pytest.mark.parametrize("head_dim, kernel_dim", [(80, 128), (96, 128), (144, 192), (160, 192), (200, 256)])
def test_hopper_buckets_without_a_warp_specialised_forward_take_a_wider_one(head_dim, kernel_dim):
    v = _dispatch.choose_fwd("bfloat16", head_dim, Flags(band=1), "sm_90a")
    assert v.warp_specialised and v.head_dim == kernel_dim
    assert _dispatch.choose_fwd("bfloat16", head_dim, Flags(), "sm_80").head_dim < kernel_dim
    off = Options(fwd_warp_specialised=False)
    assert not _dispatch.choose_fwd("bfloat16", head_dim, Flags(), "sm_90a", off).warp_specialised


def test_hopper_d64_takes_the_two_warpgroup_forward_from_2048_keys():
    def variant(seqlen_k, mask_blocks=None, **kw):
        p = problem(seqlen_k=seqlen_k, head_dim=64, causal=True, mask_blocks=mask_blocks, **kw)
        return choose_fwd("bfloat16", 64, p.flags(Options()), "sm_90a")
    assert variant(2048).warp_specialised and variant(65536, alibi_sb=0).warp_specialised
    assert variant(512).warp_specialised and variant(512).warps == 12  # three warpgroups at any length
    assert variant(2048, dropout_p=0.1).warp_specialised and variant(2048, dropout_p=0.1).warps == 8
    assert not variant(2047, dropout_p=0.1).warp_specialised
    assert not variant(512, mask_blocks=(128, 128)).warp_specialised
    assert variant(2047, dropout_p=0.1).block_m == 128  # the mma.sync forward
    assert choose_fwd("bfloat16", 64, problem(seqlen_k=1, head_dim=64).flags(Options(fwd_warp_specialised_short=True)),
                      "sm_90a").warp_specialised
    assert choose_fwd("bfloat16", 128, problem(seqlen_k=1).flags(Options()), "sm_90a").warp_specialised


def test_variant_name_is_a_template_instance():
    v = choose_fwd("bfloat16", 72, Flags(band=CAUSAL))
    assert v.name == (f"cuflash::flash_fwd_kernel<__nv_bfloat16, 96, {v.block_m}, {v.block_n}, {v.warps}, "
                      f"{v.stages}, 1, false, false, false, false>")  # band 1: causal


def test_launch_values_are_64_bit_and_grid_is_one_dimensional():
    v = choose_fwd("float16", 128)
    # 70,000 (batch x heads) would overflow a 65535 grid.y; here everything is on grid.x.
    p = problem(batch=7000, seqlen_q=300, seqlen_k=300, nheads=10, nheads_k=5, dtype="float16")
    big = 3 * 2**31  # strides past 2^31 elements must survive
    t = (0x7F0000000000, (big, 1280, 128))
    blocks, threads, packed = fwd_launch(v, p, t, t, t, t, 0x7F0000001000)
    assert blocks == -(-300 // v.block_m) * 70000 and threads == v.threads
    params = param_struct("FwdParams")
    raw = struct.Struct("@" + params.format).pack(*packed)  # as many as, and fitting, the C types
    assert struct.unpack_from("@q", raw, params.offsets()["q_sb"])[0] == big
    assert values(v, packed)["kv_group"] == 2 and values(v, packed)["q_sb"] == big


def test_warp_specialised_forward_is_persistent():
    v = choose_fwd("bfloat16", 128, Flags(band=CAUSAL), "sm_90a")
    assert v.warp_specialised and v.persistent and v.params == "FwdParams"
    p = problem()
    t = (0x7F0000000000, (1024000, 1024, 128))
    tiles = -(-1000 // v.block_m) * 16
    blocks, _, packed = fwd_launch(v, p, t, t, t, t, 0x7F0000001000, persistent=(0x7F0000002000, 132))
    f = values(v, packed)
    assert blocks == min(tiles, 132) and (f["tile_counter"], f["num_tiles"]) == (0x7F0000002000, tiles)
    assert fwd_launch(v, p, t, t, t, t, 0, persistent=(0, 1000))[0] == tiles  # never more blocks than tiles


def test_grid_limit_is_checked():
    v = choose_fwd("float16", 64)
    p = problem(batch=2**20, seqlen_q=2**16, seqlen_k=1, nheads=64, nheads_k=64, head_dim=64, dtype="float16")
    t = (0, (0, 0, 0))
    with pytest.raises(ValueError, match="grid limit"):
        fwd_launch(v, p, t, t, t, t, 0)


def test_dropout_variants_and_launch_fields():
    v = choose_fwd("bfloat16", 64, Flags(band=CAUSAL, dropout=True))
    assert v.dropout and v.name.endswith("false, false, false, true>")
    _, dkdv, dq = choose_bwd("bfloat16", 64, Flags(dropout=True))
    assert dkdv.dropout and dq.dropout and dkdv.name.endswith("true, false>")  # dropout on, wgmma off
    _, dkdv, dq = choose_bwd("bfloat16", 64, Flags(dropout=True), "sm_90a", Options(fused_dq=False))
    assert dkdv.wgmma and dq.wgmma and dkdv.name.endswith("true, true>")
    assert _dispatch.dropout_threshold(0.1) == 6554 and _dispatch.dropout_threshold(0.99999999) == 65535
    state, seed, offset, threshold, scale = _dispatch.dropout_args(0.5, 2**64 + 3, 8)
    assert (state, seed, offset, threshold, scale) == (0, 3, 8, 32768, 2.0)
    assert _dispatch.dropout_args(0.0) == _dispatch.NO_DROPOUT


def test_dq_accumulation_takes_long_enough_calls():
    """Measured thresholds (_tiles.dq_accumulation_pays): 2K queries non-causal, 4K causal, 8K causal with
    GQA, never with a window; the problem object passes them to the tile policy."""
    assert [_tiles.dq_accumulation_pays(NO_BAND, s, 1) for s in (1024, 2048)] == [False, True]
    assert [_tiles.dq_accumulation_pays(CAUSAL, s, 1) for s in (2048, 4096)] == [False, True]
    assert [_tiles.dq_accumulation_pays(CAUSAL, s, 4) for s in (4096, 8192)] == [False, True]
    assert not _tiles.dq_accumulation_pays(WINDOW, 65536, 1)
    assert problem(seqlen_q=4096, seqlen_k=4096, causal=True).flags(Options()).long_queries
    assert not problem(seqlen_q=4096, seqlen_k=4096, nheads_k=2, causal=True).flags(Options()).long_queries
    assert problem(seqlen_q=100, seqlen_k=100, causal=True).flags(Options(fused_dq_short=True)).long_queries
    assert Options.from_env({"CUFLASH_FUSED_DQ": "all"}).fused_dq_short


def test_dq_accumulator_follows_delta_in_64_row_tiles(monkeypatch):
    """The workspace: delta (lse's size), then from a 128-byte boundary the dQ accumulator, 64-row tiles of
    head_dim-bucket floats per (batch element, query head); packed sequences (total_q / 64 + batch) tiles per
    head (kernels/dq_accum.cuh dq_accum_tile). Fixed lengths: then each row's lse and delta again, per
    (batch element, query head) padded to 128 rows (tile_stats_row), which the preprocess fills and the
    dK/dV kernel copies by TMA, a query tile's two rows a box."""
    variants = choose_bwd("bfloat16", 128, Flags(), "sm_90a")
    dense = problem(batch=2, seqlen_q=100, seqlen_k=100, nheads=3, nheads_k=3)
    accum = 2 * 3 * 2 * 64 * 128
    assert _dispatch.dq_accum_floats(variants, dense, 600) == (608, accum + 2 * 3 * 2 * 128)
    t = (0x7F0000000000, (100 * 3 * 128, 3 * 128, 128))
    rows_maps = []
    monkeypatch.setattr(_dispatch._tma, "tile_map", lambda *a: b"t" * 128)
    monkeypatch.setattr(_dispatch._tma, "rows_map", lambda *a: rows_maps.append(a) or b"r" * 128)
    launches = _dispatch.bwd_launches(variants, dense, t, t, t, t, t, 0x10000, 0x20000, t, t, t, dq_accum_ptr=0x40000)
    pre, dkdv = (values(x[0], x[3]) for x in launches[:2])
    assert pre["tile_stats"] == 0x40000 + 4 * accum and pre["lse"] == 0x10000
    assert rows_maps == [(0x40000 + 4 * accum, 128, 2 * 2 * 3, (variants[1].tile.block_q, 2))]
    assert dkdv["tma"] == 1 and dkdv["stats_map"] == b"r" * 128
    packed = problem(batch=3, seqlen_q=200, seqlen_k=200, nheads=3, nheads_k=3, packed=(300, 300))
    assert _dispatch.dq_accum_floats(variants, packed, 900) == (928, (300 // 64 + 3) * 3 * 64 * 128)
    unfused = choose_bwd("bfloat16", 128, Flags(), "sm_90a", Options(fused_dq=False))
    assert _dispatch.dq_accum_floats(unfused, dense, 600) == (0, 0)


def test_band_args():
    def band(causal=False, window=(-1, -1), sq=100, sk=300):
        p = problem(seqlen_q=sq, seqlen_k=sk, causal=causal, window=window)
        return p.band, p.band_args()

    assert band() == (NO_BAND, (400, 400))
    assert band(causal=True) == (CAUSAL, (400, 0))  # right capped at 0; an unbounded side is seqlen_q + seqlen_k
    assert band(causal=True, window=(-1, 7)) == (CAUSAL, (400, 0))  # causal wins over the right side
    assert band(window=(3, 5)) == (WINDOW, (3, 5))
    assert band(causal=True, window=(3, 5)) == (WINDOW, (3, 0))
    assert band(window=(-1, 2)) == (WINDOW, (400, 2))
    assert band(window=(10**9, 0)) == (WINDOW, (400, 0))  # clipped, so the kernels' sums never overflow
    # A window takes narrower tiles than causal where registers are short (no spills; compile-check).
    assert choose_fwd("bfloat16", 64, Flags(band=WINDOW)).block_n <= choose_fwd("bfloat16", 64, Flags(band=CAUSAL)).block_n


@pytest.mark.parametrize("head_dim, dtype", [(8, "bfloat16"), (64, "float16"), (128, "bfloat16"), (256, "float32")])
@pytest.mark.parametrize("batch, seqlen_q, nheads", [(1, 1, 1), (3, 1023, 5), (7000, 300, 10)])
def test_preprocess_grid_covers_every_row(head_dim, dtype, batch, seqlen_q, nheads):
    """The backward's preprocess: blocks_per_bh blocks per (batch, head), each 128 / lanes rows per pass times
    PREPROCESS_ROWS (kernels/flash_bwd.cu), cover seqlen_q rows, with no block left over."""
    pre, dkdv, dq = choose_bwd(dtype, head_dim)
    p = problem(batch=batch, seqlen_q=seqlen_q, seqlen_k=64, nheads=nheads, nheads_k=nheads, head_dim=head_dim,
                dtype=dtype)
    t = (0x7F0000000000, (seqlen_q * nheads * head_dim, nheads * head_dim, head_dim))
    kv = (0x7F0000000000, (64 * nheads * head_dim, nheads * head_dim, head_dim))
    launches = _dispatch.bwd_launches((pre, dkdv, dq), p, t, kv, kv, t, t, 0, 0, t, kv, kv)
    variant, blocks, threads, packed = launches[0]
    assert variant is pre and threads == 128
    f = values(pre, packed)
    lanes = _dispatch.preprocess_row_lanes(head_dim, dtype)
    rows_per_block = 128 // lanes * _dispatch.PREPROCESS_ROWS
    assert blocks == batch * nheads * f["blocks_per_bh"] and f["row_lanes"] == lanes
    assert (f["blocks_per_bh"] - 1) * rows_per_block < seqlen_q <= f["blocks_per_bh"] * rows_per_block


@pytest.mark.parametrize("head_dim", [64, 128])
def test_block_masks_take_the_warp_specialised_backward_on_hopper(head_dim):
    """Block masks of 128-key blocks take the warp-specialised dK/dV kernel and those of 128-row query blocks
    the warp-specialised dQ kernel on sm_90a (fp16/bf16, d = 64 and 128), each within Hopper's shared memory;
    tanh and the RNG take half-height query tiles at d = 128; the options turn both off; other GPUs, fp32
    and dense calls that do not accumulate dQ keep the plain kernels."""
    limit = shared_memory_limit("sm_90a")
    for softcap, dropout in [(False, False), (True, False), (False, True)]:
        _, dkdv, dq = choose_bwd("bfloat16", head_dim, Flags(mask_blocks=(128, 128), softcap=softcap,
                                                             dropout=dropout), "sm_90a")
        assert dkdv.warp_specialised and dq.warp_specialised and dkdv.persistent and dq.persistent
        assert dkdv.threads == dq.threads == 384 and dkdv.block_n == 128 and dq.block_m == 128
        assert dkdv.smem_bytes <= limit and dq.smem_bytes <= limit
        assert dkdv.block_q == (32 if head_dim == 128 and (softcap or dropout) else 64)
        assert (dkdv.params, dq.params) == ("BwdDkdvParams", "BwdDqParams")
        assert "flash_bwd_dkdv_ws_kernel<" in dkdv.name and "flash_bwd_dq_ws_kernel<" in dq.name
    _, dkdv, dq = choose_bwd("bfloat16", head_dim, Flags(mask_blocks=(64, 64)), "sm_90a")
    assert not dkdv.warp_specialised and not dq.warp_specialised  # 64-key and 64-row blocks: the plain tiles
    for dtype, arch in [("bfloat16", "sm_80"), ("float32", "sm_90a")]:
        assert not any(getattr(v, "warp_specialised", False)
                       for v in choose_bwd(dtype, head_dim, Flags(mask_blocks=(128, 128)), arch))
    assert not any(getattr(v, "warp_specialised", False)  # (dense calls: the fused-dQ test above)
                   for v in choose_bwd("bfloat16", head_dim, Flags(band=CAUSAL), "sm_90a", Options(fused_dq=False)))
    off = Options(dq_warp_specialised=False, dkdv_warp_specialised=False)
    _, dkdv, dq = choose_bwd("bfloat16", head_dim, Flags(mask_blocks=(128, 128)), "sm_90a", off)
    assert not dkdv.warp_specialised and not dq.warp_specialised


def test_explain_names_each_kernel_a_call_runs(capsys):
    """`python -m cuflash explain` (no GPU needed): one line per kernel, forward and backward, then the
    template instances; a block mask on Hopper takes the warp-specialised backward; wgmma off, sm_80's."""
    from cuflash.__main__ import main

    p = Problem(1, 4096, 4096, 1, 1, 128, "bfloat16", 0.125, causal=True)
    lines = _dispatch.explain(p, "sm_90a")
    fwd = choose_fwd("bfloat16", 128, Flags(band=CAUSAL), "sm_90a")
    bwd = choose_bwd("bfloat16", 128, Flags(band=CAUSAL), "sm_90a")
    assert lines[0].startswith("forward   flash_fwd_ws_kernel (warp-specialised")
    assert [line.strip() for line in lines[-4:]] == [v.name for v in (fwd, *bwd)]
    assert main(["explain", "--head-dim", "64", "--block-mask", "128x128", "--arch", "sm_90a"]) == 0
    out = capsys.readouterr().out
    assert "flash_bwd_dkdv_ws_kernel (warp-specialised" in out and "flash_bwd_dq_ws_kernel" in out
    with override(wgmma=False):
        assert main(["explain", "--arch", "sm_90a"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("sm_90a (sm_80 kernels); options changed from the defaults: {'wgmma': False}")
    assert "wgmma" not in out.split("\n", 1)[1]
    assert main(["explain", "--head-dim", "300"]) == 1  # one line, as bench and warmup give
    assert "head dim 300 exceeds" in capsys.readouterr().err
    # the fused dQ where the call is long enough: 4K causal with 16 query heads, not with 4 K/V heads
    assert main(["explain", "--causal", "--seqlen-q", "4096", "--heads", "16", "16", "--arch", "sm_90a"]) == 0
    assert "flash_bwd_dq_convert_kernel" in capsys.readouterr().out
    assert main(["explain", "--causal", "--seqlen-q", "4096", "--heads", "16", "4", "--arch", "sm_90a"]) == 0
    assert "flash_bwd_dq_kernel" in capsys.readouterr().out
