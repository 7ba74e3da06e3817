"""Variant choice and launch parameters (pure Python)."""
import struct

import pytest

from cuflash import _dispatch
from cuflash._dispatch import FwdProblem, choose_fwd, fwd_launch, head_dim_bucket


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
    assert len(dense) == 2 * len(_dispatch.HEAD_DIM_BUCKETS) * 2 * 4  # dtypes x dims x causal x score mods


def test_variant_name_is_a_template_instance():
    v = choose_fwd("bfloat16", 72, True)
    assert v.name == (f"cuflash::flash_fwd_kernel<__nv_bfloat16, 96, {v.block_m}, {v.block_n}, {v.warps}, "
                      f"{v.stages}, true, false, false, false>")


def test_launch_args_are_64_bit_and_grid_is_one_dimensional():
    v = choose_fwd("float16", 128, False)
    # 70,000 (batch x heads) would overflow a 65535 grid.y; here everything is on grid.x.
    p = FwdProblem(batch=7000, seqlen_q=300, seqlen_k=300, nheads=10, nheads_k=5, head_dim=128, softmax_scale=0.1)
    big = 3 * 2**31  # strides past 2^31 elements must survive
    t = (0x7F0000000000, (big, 1280, 128))
    blocks, threads, args = fwd_launch(v, p, t, t, t, t, 0x7F0000001000)
    assert blocks == -(-300 // v.block_m) * 70000 and threads == v.threads
    assert len(args) == len(_dispatch.FWD_PARAM_FORMAT)
    packed = struct.Struct("@" + _dispatch.FWD_PARAM_FORMAT).pack(*args)  # fits the C types
    assert struct.unpack_from("@q", packed, 40)[0] == big
    assert args[_dispatch.FWD_PARAM_FORMAT.index("i") + 3] == 2  # query heads per K/V head


def test_grid_limit_is_checked():
    v = choose_fwd("float16", 64, False)
    p = FwdProblem(batch=2**20, seqlen_q=2**16, seqlen_k=1, nheads=64, nheads_k=64, head_dim=64, softmax_scale=1.0)
    t = (0, (0, 0, 0))
    with pytest.raises(ValueError, match="grid limit"):
        fwd_launch(v, p, t, t, t, t, 0)
