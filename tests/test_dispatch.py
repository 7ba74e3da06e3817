"""Variant choice and launch parameters (pure Python)."""
import struct

import pytest

from cuflash import _dispatch
from cuflash._dispatch import FwdProblem, choose_fwd, fwd_launch, head_dim_bucket
from cuflash._launch import flat, param_offsets


@pytest.mark.parametrize("d, bucket", [(8, 32), (32, 32), (40, 64), (64, 64), (80, 96), (128, 128), (136, 160),
                                       (200, 224), (256, 256)])
def test_head_dim_buckets(d, bucket):
    assert head_dim_bucket(d) == bucket


@pytest.mark.parametrize("arch, limit_kib", [("sm_80", 163), ("sm_90a", 227)])
def test_every_head_dim_has_a_tile_that_fits_the_shared_memory(arch, limit_kib):
    variants = _dispatch.all_variants(arch)
    fwd = [v for v in variants if isinstance(v, _dispatch.FwdVariant)]
    for v in fwd:
        assert v.block_m % (16 * v.warps) == 0 and v.block_n % 16 == 0
    for v in variants:
        assert v.smem_bytes + 2048 <= limit_kib * 1024  # dynamic + a little static shared memory
    dense = [v for v in fwd if not v.sparse]
    dims = 2 * len(_dispatch.HEAD_DIM_BUCKETS) + len(_dispatch.FP32_HEAD_DIM_BUCKETS)  # fp16, bf16, fp32
    if arch == "sm_90a":  # short calls of these buckets take the mma.sync forward there
        dims += 2 * len(_dispatch.WS_FWD_MIN_SEQLEN_K)
    assert len(dense) == dims * 3 * 4 * 2  # dims x band (none, causal, window) x mods x dropout


def test_hopper_d64_takes_the_warp_specialised_forward_from_2048_keys():
    def variant(seqlen_k, **kw):
        short = _dispatch.short_keys_for("bfloat16", 64, seqlen_k)
        return choose_fwd("bfloat16", 64, True, arch="sm_90a", short_keys=short, **kw)
    assert variant(2048).warp_specialised and variant(65536, alibi=True).warp_specialised
    assert not variant(2047).warp_specialised and not variant(512, mask_blocks=(128, 128)).warp_specialised
    assert variant(2047).wgmma is False and variant(2047).block_m == 128  # the mma.sync forward
    assert choose_fwd("bfloat16", 128, True, arch="sm_90a",
                      short_keys=_dispatch.short_keys_for("bfloat16", 128, 1)).warp_specialised


def test_variant_name_is_a_template_instance():
    v = choose_fwd("bfloat16", 72, True)
    assert v.name == (f"cuflash::flash_fwd_kernel<__nv_bfloat16, 96, {v.block_m}, {v.block_n}, {v.warps}, "
                      f"{v.stages}, 1, false, false, false, false, false>")  # band 1: causal


def test_launch_args_are_64_bit_and_grid_is_one_dimensional():
    v = choose_fwd("float16", 128, False)
    # 70,000 (batch x heads) would overflow a 65535 grid.y; here everything is on grid.x.
    p = FwdProblem(batch=7000, seqlen_q=300, seqlen_k=300, nheads=10, nheads_k=5, head_dim=128, softmax_scale=0.1)
    big = 3 * 2**31  # strides past 2^31 elements must survive
    t = (0x7F0000000000, (big, 1280, 128))
    blocks, threads, args = fwd_launch(v, p, t, t, t, t, 0x7F0000001000)
    assert blocks == -(-300 // v.block_m) * 70000 and threads == v.threads
    packed = struct.Struct("@" + flat(_dispatch.FWD_PARAM_FORMAT)).pack(*args)  # as many as, and fitting, the C types
    assert struct.unpack_from("@q", packed, 40)[0] == big
    assert args[_dispatch.FWD_PARAM_FORMAT.index("i") + 3] == 2  # query heads per K/V head


def test_warp_specialised_forward_is_persistent():
    v = choose_fwd("bfloat16", 128, True, arch="sm_90a")
    assert v.warp_specialised and _dispatch.param_format(v) == _dispatch.FWD_PARAM_FORMAT + "Qi"
    p = FwdProblem(batch=2, seqlen_q=1000, seqlen_k=1000, nheads=8, nheads_k=8, head_dim=128, softmax_scale=0.1)
    t = (0x7F0000000000, (1024000, 1024, 128))
    tiles = -(-1000 // v.block_m) * 16
    blocks, _, args = fwd_launch(v, p, t, t, t, t, 0x7F0000001000, persistent=(0x7F0000002000, 132))
    assert blocks == min(tiles, 132) and args[-2:] == (0x7F0000002000, tiles)  # the counter, every tile
    struct.Struct("@" + flat(_dispatch.param_format(v))).pack(*args)
    assert fwd_launch(v, p, t, t, t, t, 0, persistent=(0, 1000))[0] == tiles  # never more blocks than tiles


def test_grid_limit_is_checked():
    v = choose_fwd("float16", 64, False)
    p = FwdProblem(batch=2**20, seqlen_q=2**16, seqlen_k=1, nheads=64, nheads_k=64, head_dim=64, softmax_scale=1.0)
    t = (0, (0, 0, 0))
    with pytest.raises(ValueError, match="grid limit"):
        fwd_launch(v, p, t, t, t, t, 0)


def test_dropout_variants_and_launch_fields():
    v = _dispatch.choose_fwd("bfloat16", 64, True, dropout=True)
    assert v.dropout and v.name.endswith("false, false, false, true, false>")
    _, dkdv, dq = _dispatch.choose_bwd("bfloat16", 64, False, dropout=True)
    assert dkdv.dropout and dq.dropout and dkdv.name.endswith("true, false>")  # dropout on, wgmma off
    _, dkdv, dq = _dispatch.choose_bwd("bfloat16", 64, False, dropout=True, arch="sm_90a")
    assert dkdv.wgmma and dq.wgmma and dkdv.name.endswith("true, true>")
    assert _dispatch.dropout_threshold(0.1) == 6554 and _dispatch.dropout_threshold(0.99999999) == 65535
    state, seed, offset, threshold, scale = _dispatch.dropout_args(0.5, 2**64 + 3, 8)
    assert (state, seed, offset, threshold, scale) == (0, 3, 8, 32768, 2.0)
    assert _dispatch.dropout_args(0.0) == _dispatch.NO_DROPOUT
    # The two struct parameters are one kernel parameter each: the 32nd (block lists) and the 33rd (dropout).
    fmt = _dispatch.FWD_PARAM_FORMAT
    offsets = param_offsets(fmt)
    assert len(offsets) == 35 and offsets[-2:] == [224, 296] and struct.calcsize("@" + flat(fmt)) == 328


def test_param_offsets_group_structs():
    assert param_offsets("iQ(QQi)f(Qif)") == [0, 8, 16, 40, 48]
    assert param_offsets("QQ") == [0, 8] and flat("i(QQ)") == "i0QQQ0Q"


def test_band_args():
    def band(causal=False, window=(-1, -1), sq=100, sk=300):
        p = _dispatch.FwdProblem(1, sq, sk, 1, 1, 64, 0.125, causal=causal, window=window)
        return p.band, p.band_args()

    none, causal, window = _dispatch.NO_BAND, _dispatch.CAUSAL, _dispatch.WINDOW
    assert band() == (none, (400, 400))
    assert band(causal=True) == (causal, (400, 0))  # right capped at 0; an unbounded side is seqlen_q + seqlen_k
    assert band(causal=True, window=(-1, 7)) == (causal, (400, 0))  # causal wins over the right side
    assert band(window=(3, 5)) == (window, (3, 5))
    assert band(causal=True, window=(3, 5)) == (window, (3, 0))
    assert band(window=(-1, 2)) == (window, (400, 2))
    assert band(window=(10**9, 0)) == (window, (400, 0))  # clipped, so the kernels' sums never overflow
    # A window takes narrower tiles than causal where registers are short (no spills; tests/test_compile.py).
    assert choose_fwd("bfloat16", 64, window).block_n <= choose_fwd("bfloat16", 64, causal).block_n


@pytest.mark.parametrize("head_dim, dtype", [(8, "bfloat16"), (64, "float16"), (128, "bfloat16"), (256, "float32")])
@pytest.mark.parametrize("batch, seqlen_q, nheads", [(1, 1, 1), (3, 1023, 5), (7000, 300, 10)])
def test_preprocess_grid_covers_every_row(head_dim, dtype, batch, seqlen_q, nheads):
    """The backward's preprocess: blocks_per_bh blocks per (batch, head), each 128 / lanes rows per pass times
    PREPROCESS_ROWS (kernels/flash_bwd.cu), cover seqlen_q rows, with no block left over."""
    pre, dkdv, dq = _dispatch.choose_bwd(dtype, head_dim, False)
    p = FwdProblem(batch=batch, seqlen_q=seqlen_q, seqlen_k=64, nheads=nheads, nheads_k=nheads, head_dim=head_dim,
                   softmax_scale=0.1)
    t = (0x7F0000000000, (seqlen_q * nheads * head_dim, nheads * head_dim, head_dim))
    kv = (0x7F0000000000, (64 * nheads * head_dim, nheads * head_dim, head_dim))
    launches = _dispatch.bwd_launches((pre, dkdv, dq), p, t, kv, kv, t, t, 0, 0, t, kv, kv)
    variant, blocks, threads, args = launches[0]
    assert variant is pre and threads == 128
    lanes = _dispatch.preprocess_row_lanes(head_dim, dtype)
    blocks_per_bh = args[-2]
    rows_per_block = 128 // lanes * _dispatch.PREPROCESS_ROWS
    assert blocks == batch * nheads * blocks_per_bh and args[-1] == lanes
    assert (blocks_per_bh - 1) * rows_per_block < seqlen_q <= blocks_per_bh * rows_per_block
    struct.Struct("@" + flat(_dispatch.param_format(pre))).pack(*args)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_block_masks_take_the_warp_specialised_backward_on_hopper(monkeypatch, head_dim):
    """Block masks of 128-key blocks take the warp-specialised dK/dV kernel and those of 128-row query blocks
    the warp-specialised dQ kernel on sm_90a (fp16/bf16, d = 64 and 128), each within Hopper's shared memory;
    tanh and the RNG take half-height query tiles at d = 128; the environment switches turn both off; other
    GPUs, fp32 and dense calls keep the plain kernels."""
    limit = _dispatch.shared_memory_limit("sm_90a")
    for softcap, dropout in [(False, False), (True, False), (False, True)]:
        _, dkdv, dq = _dispatch.choose_bwd("bfloat16", head_dim, _dispatch.NO_BAND, (128, 128), False, softcap,
                                            dropout, arch="sm_90a")
        assert dkdv.warp_specialised and dq.warp_specialised
        assert dkdv.threads == dq.threads == 384 and dkdv.block_n == 128 and dq.block_m == 128
        assert dkdv.smem_bytes <= limit and dq.smem_bytes <= limit
        assert dkdv.block_q == (32 if head_dim == 128 and (softcap or dropout) else 64)
        assert _dispatch.param_format(dkdv) == _dispatch.BWD_DKDV_PARAM_FORMAT
        assert _dispatch.param_format(dq) == _dispatch.BWD_DQ_WS_PARAM_FORMAT
        assert "flash_bwd_dkdv_ws_kernel<" in dkdv.name and "flash_bwd_dq_ws_kernel<" in dq.name
    _, dkdv, dq = _dispatch.choose_bwd("bfloat16", head_dim, _dispatch.NO_BAND, (64, 64), arch="sm_90a")
    assert not dkdv.warp_specialised and not dq.warp_specialised  # 64-key and 64-row blocks: the plain tiles
    for dtype, arch in [("bfloat16", "sm_80"), ("float32", "sm_90a")]:
        assert not any(getattr(v, "warp_specialised", False)
                       for v in _dispatch.choose_bwd(dtype, head_dim, _dispatch.NO_BAND, (128, 128), arch=arch))
    assert not any(getattr(v, "warp_specialised", False)
                   for v in _dispatch.choose_bwd("bfloat16", head_dim, _dispatch.CAUSAL, arch="sm_90a"))
    monkeypatch.setattr(_dispatch, "WS_DKDV", False)
    monkeypatch.setattr(_dispatch, "WS_DQ", False)
    _dispatch.choose_bwd.cache_clear()
    try:
        _, dkdv, dq = _dispatch.choose_bwd("bfloat16", head_dim, _dispatch.NO_BAND, (128, 128), arch="sm_90a")
        assert not dkdv.warp_specialised and not dq.warp_specialised
    finally:
        _dispatch.choose_bwd.cache_clear()
