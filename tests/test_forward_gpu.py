"""The forward kernel on the GPU against the float64 reference, with FlashAttention's 2x rule."""
import pytest

import cuflash
from cuflash._options import override

from gpu_helpers import (assert_close_2x, assert_lse_close, grid, grid_inputs, plain_attention, randn, reference,
                         strided_inputs)

pytestmark = pytest.mark.gpu


def torch_dtype(name):
    import torch

    return getattr(torch, name)


def check(q, k, v, causal, scale=None):
    out, lse, _ = cuflash.flash_attn_func(q, k, v, causal=causal, softmax_scale=scale, return_attn_probs=True)
    assert type(out) is type(q) and out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])
    ref, ref_lse = reference(q, k, v, causal, scale)
    assert_close_2x(out, ref, plain_attention(q, k, v, causal, scale))
    assert_lse_close(lse, ref_lse)
    return out


@grid()
def test_forward_grid(dtype, causal, headdim, seqlens):
    check(*grid_inputs(dtype, causal, headdim, seqlens, "fwd"), causal)


@pytest.mark.parametrize("layout", ["qkv_packed", "bhsd_transposed", "padded_rows", "noncontiguous_v"])
@pytest.mark.parametrize("causal", [False, True])
def test_strided_views(layout, causal):
    q, k, v = strided_inputs(layout)
    assert not (q.is_contiguous() and v.is_contiguous())
    check(q, k, v, causal)


@pytest.mark.parametrize("nheads, nheads_k", [(8, 2), (6, 1)])
def test_gqa_and_mqa(nheads, nheads_k):
    import torch

    q = randn((2, 257, nheads, 128), torch.float16, 5)
    k = randn((2, 190, nheads_k, 128), torch.float16, 6)
    v = randn((2, 190, nheads_k, 128), torch.float16, 7)
    check(q, k, v, True)


def test_custom_scale_and_large_values():
    import torch

    q = randn((1, 333, 2, 64), torch.bfloat16, 8) * 8
    k = randn((1, 333, 2, 64), torch.bfloat16, 9) * 8
    v = randn((1, 333, 2, 64), torch.bfloat16, 10)
    check(q, k, v, False, scale=0.5)


def test_rows_that_see_no_key_are_zero_not_nan():
    import torch

    # seqlen_q > seqlen_k with causal: the first 100 queries see no key (bottom-right alignment).
    q = randn((1, 150, 2, 64), torch.float16, 11)
    k = randn((1, 50, 2, 64), torch.float16, 12)
    v = randn((1, 50, 2, 64), torch.float16, 13)
    out, lse, _ = cuflash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert (out[:, :100] == 0).all() and torch.isneginf(lse[..., :100]).all()
    check(q, k, v, True)


def test_zero_length_sequences():
    import torch

    q = randn((2, 16, 2, 64), torch.float16, 14)
    kv = randn((2, 0, 2, 64), torch.float16, 15)
    out, lse, _ = cuflash.flash_attn_func(q, kv, kv, return_attn_probs=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    out = cuflash.flash_attn_func(q[:, :0], randn((2, 5, 2, 64), torch.float16, 1), randn((2, 5, 2, 64), torch.float16, 2))
    assert out.shape == (2, 0, 2, 64)


def test_cupy_inputs_give_cupy_outputs():
    import cupy
    import torch

    q, k, v = (randn((2, 200, 3, 64), torch.float16, i) for i in range(3))
    qc, kc, vc = (cupy.from_dlpack(x) for x in (q, k, v))
    out = cuflash.flash_attn_func(qc, kc, vc, causal=True)
    assert isinstance(out, cupy.ndarray) and out.dtype == cupy.float16
    torch.cuda.synchronize()
    expected = cuflash.flash_attn_func(q, k, v, causal=True)
    assert torch.equal(torch.from_dlpack(out), expected)


def test_torch_output_is_zero_copy_and_on_current_stream():
    import torch

    q, k, v = (randn((1, 512, 2, 128), torch.bfloat16, i) for i in range(3))
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        out = cuflash.flash_attn_func(q, k, v)
        out2 = out * 1  # queued behind the kernel on the same stream
    s.synchronize()
    assert torch.equal(out, out2)
    assert torch.equal(out, cuflash.flash_attn_func(q, k, v))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_jax_inputs_eager_and_jit(dtype):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import numpy as np

    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    dt = torch_dtype(dtype)
    q, k, v = (randn((2, 130, 4, 64), dt, 20 + i) for i in range(3))
    expected = cuflash.flash_attn_func(q, k, v, causal=True).float().cpu().numpy()
    qj, kj, vj = (jnp.asarray(x.float().cpu().numpy()).astype(dtype) for x in (q, k, v))
    out = cuflash.flash_attn_func(qj, kj, vj, causal=True)
    assert isinstance(out, jax.Array) and out.dtype == qj.dtype
    np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), expected)
    jitted = jax.jit(lambda a, b, c: cuflash.flash_attn_func(a, b, c, causal=True) * 2)
    np.testing.assert_array_equal(np.asarray(jitted(qj, kj, vj).astype(jnp.float32)), expected * 2)
    out, lse, _ = cuflash.flash_attn_func(qj, kj, vj, causal=True, return_attn_probs=True)
    assert lse.shape == (2, 4, 130) and lse.dtype == jnp.float32


def test_64k_tokens_causal_sampled_rows():
    import torch

    s, h, d = 65536, 8, 128
    q, k, v = (randn((1, s, h, d), torch.bfloat16, 30 + i) for i in range(3))
    out = cuflash.flash_attn_func(q, k, v, causal=True)
    rows = torch.tensor([0, 1, 127, 128, 4095, 30000, 65407, 65535], device="cuda")
    # Reference for the sampled rows: row i sees keys 0..i.
    qs = q[:, rows].double()
    sc = torch.einsum("bqhd,bkhd->bhqk", qs, k.double()) / d**0.5
    mask = torch.arange(s, device="cuda")[None, :] > rows[:, None]
    sc = sc.masked_fill(mask, float("-inf"))
    ref = torch.einsum("bhqk,bkhd->bqhd", torch.softmax(sc, -1), v.double())
    qh = q[:, rows].transpose(1, 2)
    sl = (qh @ k.transpose(1, 2).transpose(-1, -2)) / d**0.5
    sl = sl.masked_fill(mask, float("-inf"))
    plain = (torch.softmax(sl, -1) @ v.transpose(1, 2)).transpose(1, 2)
    assert_close_2x(out[:, rows], ref, plain)


def test_past_2_to_the_31_elements():
    import torch

    # q, k, v, out each hold 2^31 elements (4 GiB in bf16): offsets must be 64-bit.
    b, s, h, d = 16384, 1024, 1, 128
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * 2**30:
        pytest.skip("needs 24 GiB of free GPU memory")
    q, k, v = (torch.empty((b, s, h, d), dtype=torch.bfloat16, device="cuda").normal_() for _ in range(3))
    out = cuflash.flash_attn_func(q, k, v)
    for bi in (0, b // 2, b - 1):
        ref, _ = reference(q[bi:bi + 1], k[bi:bi + 1], v[bi:bi + 1], False)
        assert_close_2x(out[bi:bi + 1], ref, plain_attention(q[bi:bi + 1], k[bi:bi + 1], v[bi:bi + 1], False))


@pytest.mark.parametrize("seqlens", [(1, 1), (17, 300), (1023, 113), (300, 1023)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_warp_specialised_forward_where_hopper_keeps_mma_sync_for_short_keys(dtype, causal, seqlens):
    """On Hopper, d <= 64 with a window, dropout, a block mask or a score function takes kernels/flash_fwd_ws.cu
    from WS_FWD_MIN_SEQLEN_K keys on; the grid's short sequences run it here (its edge tiles), as
    CUFLASH_FWD_WS=all does for every test."""
    with override(fwd_warp_specialised_short=True):
        for head_dim in (64, 40):
            check(*grid_inputs(dtype, causal, head_dim, seqlens, "fwd-ws-short"), causal)


def test_persistent_forward_over_more_tiles_than_sms_on_two_streams():
    """The warp-specialised forward (Hopper) keeps one block per SM, which takes query tiles from a counter
    per stream that its last block resets: more tiles than SMs, calls back to back on one stream and
    overlapping on two give the reference's result, bitwise the same each time."""
    import torch

    q, k, v = (randn((3, 1500, 12, 128), torch.bfloat16, seed) for seed in (31, 32, 33))
    first = check(q, k, v, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    outs = []
    for i in range(6):
        with torch.cuda.stream(side if i % 2 else torch.cuda.current_stream()):
            outs.append(cuflash.flash_attn_func(q, k, v, causal=True))
    torch.cuda.current_stream().wait_stream(side)
    for out in outs:
        assert torch.equal(out, first)


def test_persistent_launches_in_flight_never_share_a_tile_counter():
    """More streams launch the persistent forward (Hopper) at once than the counter pool holds pairs: each
    launch takes a pair of its own until it is done, so every result equals a lone launch's, bitwise."""
    import torch

    from cuflash._launch import TileCounters

    q, k, v = (randn((1, 1500, 4, 128), torch.bfloat16, seed) for seed in (41, 42, 43))
    first = cuflash.flash_attn_func(q, k, v)
    streams = [torch.cuda.Stream() for _ in range(TileCounters.CHUNK + 64)]
    outs = []
    for stream in streams:
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            outs.append(cuflash.flash_attn_func(q, k, v))
    for stream in streams:
        torch.cuda.current_stream().wait_stream(stream)
    for out in outs:
        assert torch.equal(out, first)


@pytest.mark.parametrize("seqlens", [(1, 1), (17, 300), (1023, 113), (300, 1023)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_mma_sync_forward_where_hopper_takes_the_warp_specialised_one(dtype, causal, seqlens):
    """On Hopper the 64, 128 and 256 buckets run kernels/flash_fwd_ws.cu; the mma.sync forward, which every other
    GPU runs there, is checked here on the same inputs so that both families stay covered on any test GPU."""
    with override(fwd_warp_specialised=False):
        for head_dim in (64, 128, 112, 256, 200):
            check(*grid_inputs(dtype, causal, head_dim, seqlens, "fwd-mma-sync"), causal)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("head_dim", [40, 64, 80, 128, 192, 256])
def test_warp_specialised_forward_copies_by_tma_and_by_cp_async_alike(head_dim, causal):
    """The warp-specialised forward (Hopper) copies Q, K and V by TMA where the arrays allow it and by cp.async
    where not (packed sequences, strides that are not multiples of 16 bytes): both give the reference's result
    and the same output, bitwise. Odd lengths leave rows past the ends in the last tiles (zeros by both), and
    head dims below the bucket's leave columns past the end."""
    import torch

    q = randn((2, 333, 4, head_dim), torch.bfloat16, 51)
    k, v = (randn((2, 517, 2, head_dim), torch.bfloat16, seed) for seed in (52, 53))
    with override(fwd_warp_specialised_short=True):
        by_tma = check(q, k, v, causal)
        with override(tma=False):
            by_cp_async = check(q, k, v, causal)
    assert torch.equal(by_tma, by_cp_async)


def test_tma_takes_arrays_with_16_byte_strides_only():
    import torch

    from cuflash import _tma

    x = torch.empty((2, 100, 3, 72), dtype=torch.bfloat16, device="cuda")
    assert len(_tma.tile_map(x.data_ptr(), (2, 100, 3, 72), x.stride()[:3], 128)) == 128
    odd = torch.empty((2, 100, 1, 36), dtype=torch.bfloat16, device="cuda")  # rows 72 bytes apart
    assert _tma.tile_map(odd.data_ptr(), (2, 100, 1, 36), odd.stride()[:3], 128) is None
    assert _tma.tile_map(x.data_ptr() + 2, (2, 100, 3, 72), x.stride()[:3], 128) is None  # start not aligned
