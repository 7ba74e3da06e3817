"""FlashAttention-2's extra features on the GPU, forward and gradients against the float64 reference
with the 2x rule: ALiBi (alone and with causal, windows, GQA and block masks) and head dims that are
not a multiple of 8."""
import numpy as np
import pytest

import cuflash

from gpu_helpers import assert_close_2x, assert_lse_close, check_grads, grid, plain_attention, randn, reference

pytestmark = pytest.mark.gpu


FEATURE_GRID = grid(seqlens=[(1, 1), (17, 17), (113, 203), (300, 129), (1023, 1024)], headdims=[64, 128, 160, 256])


def alibi_slopes(nheads, batch=None):
    """FlashAttention-2's / the ALiBi paper's geometric slopes, per head or per (batch, head)."""
    import torch

    slopes = torch.tensor([2 ** (-8 * (h + 1) / nheads) for h in range(nheads)], device="cuda")
    return slopes if batch is None else slopes[None] * torch.linspace(0.5, 1.5, batch, device="cuda")[:, None]


@FEATURE_GRID
def test_alibi_forward_and_grads(dtype, causal, headdim, seqlens):
    import torch

    sq, sk = seqlens
    dt = getattr(torch, dtype)
    q, k, v = randn((2, sq, 4, headdim), dt, 1), randn((2, sk, 4, headdim), dt, 2), randn((2, sk, 4, headdim), dt, 3)
    slopes = alibi_slopes(4)
    out, lse, _ = cuflash.flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes, return_attn_probs=True)
    ref, ref_lse = reference(q, k, v, causal, alibi_slopes=slopes)
    assert_close_2x(out, ref, plain_attention(q, k, v, causal, alibi_slopes=slopes))
    assert_lse_close(lse, ref_lse)
    check_grads(q, k, v, causal, alibi_slopes=slopes)


@pytest.mark.parametrize("window", [(-1, -1), (64, 0), (40, 40)])
def test_alibi_per_batch_with_gqa_and_window(window):
    import torch

    from test_blocksparse_gpu import band

    q = randn((3, 250, 8, 64), torch.bfloat16, 10)
    k, v = randn((3, 270, 2, 64), torch.bfloat16, 11), randn((3, 270, 2, 64), torch.bfloat16, 12)
    mask = None if window == (-1, -1) else band(250, 270, *window)[None, None]
    check_grads(q, k, v, False, mask=mask, alibi_slopes=alibi_slopes(8, batch=3), window_size=window)


@pytest.mark.parametrize("headdim, blocks, softcap", [(128, (64, 128), 0.0), (160, (128, 128), 0.0),
                                                     (160, (128, 64), 10.0)])
def test_alibi_with_block_mask(headdim, blocks, softcap):
    import torch

    from test_blocksparse_gpu import random_mask

    mask, elements = random_mask(1, 2, 400, 400, *blocks, seed=5)
    q, k, v = (randn((2, 400, 2, headdim), torch.float16, 20 + i) for i in range(3))
    check_grads(q, k, v, True, mask=elements, alibi_slopes=alibi_slopes(2), block_mask=mask, softcap=softcap)


def test_alibi_cupy_and_jax_match_torch():
    import cupy
    import torch

    q, k, v, dout = (randn((2, 150, 4, 64), torch.float16, 30 + i) for i in range(4))
    slopes = alibi_slopes(4)
    out, lse, _ = cuflash.flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes, return_attn_probs=True)
    grads_t = cuflash.flash_attn_backward(dout, q, k, v, out, lse, causal=True, alibi_slopes=slopes)
    c = [cupy.from_dlpack(x) for x in (q, k, v, dout, slopes)]
    out_c = cuflash.flash_attn_func(c[0], c[1], c[2], causal=True, alibi_slopes=c[4])
    torch.cuda.synchronize()
    assert torch.equal(torch.from_dlpack(out_c), out)
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    qj, kj, vj, doj = (jnp.asarray(x.float().cpu().numpy()).astype(jnp.float16) for x in (q, k, v, dout))
    sj = jnp.asarray(slopes.cpu().numpy())

    def loss(a, b, c):
        o = cuflash.flash_attn_func(a, b, c, causal=True, alibi_slopes=sj)
        return (o.astype(jnp.float32) * doj.astype(jnp.float32)).sum()

    for ours, expected in zip(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(qj, kj, vj), grads_t):
        np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), expected.float().cpu().numpy())


def test_bad_alibi_slopes_are_named():
    import torch

    q = randn((2, 64, 4, 64), torch.float16, 40)
    for slopes, exc in ((torch.ones(3, device="cuda"), ValueError), (torch.ones(4, device="cuda").double(), TypeError),
                        (torch.ones(4), TypeError), (torch.ones(3, 4, device="cuda"), ValueError)):
        with pytest.raises(exc, match="alibi_slopes"):
            cuflash.flash_attn_func(q, q, q, alibi_slopes=slopes)


@pytest.mark.parametrize("headdim", [1, 3, 12, 33, 100, 250])
@pytest.mark.parametrize("causal", [False, True])
def test_any_head_dim(headdim, causal):
    import torch

    q = randn((2, 97, 3, headdim), torch.bfloat16, 50)
    k, v = randn((2, 130, 3, headdim), torch.bfloat16, 51), randn((2, 130, 3, headdim), torch.bfloat16, 52)
    out, lse, _ = cuflash.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert out.shape == q.shape
    ref, ref_lse = reference(q, k, v, causal)
    assert_close_2x(out, ref, plain_attention(q, k, v, causal))
    assert_lse_close(lse, ref_lse)
    check_grads(q, k, v, causal)


@pytest.mark.parametrize("dqk, dv", [(192, 128), (128, 64), (64, 128), (72, 40)])
@pytest.mark.parametrize("causal", [False, True])
def test_qk_and_v_head_dims_differ(dqk, dv, causal):
    """dqk != dv (MLA's 192/128): out and dv have v's head dim, dq and dk q's, GQA included."""
    import torch

    q = randn((2, 97, 4, dqk), torch.bfloat16, 53)
    k, v = randn((2, 130, 2, dqk), torch.bfloat16, 54), randn((2, 130, 2, dv), torch.bfloat16, 55)
    out, lse, _ = cuflash.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert out.shape == (2, 97, 4, dv)
    ref, ref_lse = reference(q, k, v, causal)
    assert_close_2x(out, ref, plain_attention(q, k, v, causal))
    assert_lse_close(lse, ref_lse)
    _, dq, dk, dv_ = check_grads(q, k, v, causal)
    assert dq.shape == q.shape and dk.shape == k.shape and dv_.shape == v.shape


def test_qk_and_v_head_dims_differ_cupy_explicit_backward_and_jax_grad():
    import cupy
    import torch

    q, k = randn((1, 70, 2, 192), torch.float16, 61), randn((1, 90, 2, 192), torch.float16, 62)
    v, dout = randn((1, 90, 2, 128), torch.float16, 63), randn((1, 70, 2, 128), torch.float16, 64)
    out, lse, _ = cuflash.flash_attn_func(q, k, v, return_attn_probs=True)
    assert torch.equal(torch.compile(cuflash.flash_attn_func, fullgraph=True)(q, k, v), out)
    want = torch.autograd.grad(cuflash.flash_attn_func(*(x.requires_grad_() for x in (q, k, v))), (q, k, v), dout)
    c = [cupy.from_dlpack(x.detach()) for x in (dout, q, k, v, out, lse)]
    grads_c = cuflash.flash_attn_backward(*c)
    torch.cuda.synchronize()
    for a, b in zip(grads_c, want):
        assert a.shape == b.shape and torch.equal(torch.from_dlpack(cupy.ascontiguousarray(a)), b.contiguous())
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    qj, kj, vj, dj = (jnp.asarray(x.detach().float().cpu().numpy()).astype(jnp.float16) for x in (q, k, v, dout))

    @jax.jit
    def grads(qj, kj, vj):
        out, vjp = jax.vjp(cuflash.flash_attn_func, qj, kj, vj)
        return out, vjp(dj)

    out_j, grads_j = grads(qj, kj, vj)
    assert out_j.shape == (1, 70, 2, 128)
    np.testing.assert_array_equal(np.asarray(out_j.astype(jnp.float32)), out.float().cpu().numpy())
    for g, w in zip(grads_j, want):
        np.testing.assert_array_equal(np.asarray(g.astype(jnp.float32)), w.float().cpu().numpy())


def test_any_head_dim_cupy_explicit_backward_and_jax():
    import cupy
    import torch

    q, k, v, dout = (randn((1, 70, 2, 20), torch.float16, 60 + i) for i in range(4))
    out, lse, _ = cuflash.flash_attn_func(q, k, v, return_attn_probs=True)
    grads_t = cuflash.flash_attn_backward(dout, q, k, v, out, lse)
    c = [cupy.from_dlpack(x) for x in (dout, q, k, v, out, lse)]
    grads_c = cuflash.flash_attn_backward(*c)
    torch.cuda.synchronize()
    for a, b in zip(grads_c, grads_t):
        assert a.shape == b.shape and torch.equal(torch.from_dlpack(cupy.ascontiguousarray(a)), b.contiguous())
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    qj, kj, vj = (jnp.asarray(x.float().cpu().numpy()).astype(jnp.float16) for x in (q, k, v))
    out_j = jax.jit(cuflash.flash_attn_func)(qj, kj, vj)
    assert out_j.shape == (1, 70, 2, 20)
    np.testing.assert_array_equal(np.asarray(out_j.astype(jnp.float32)), out.float().cpu().numpy())


@FEATURE_GRID
def test_softcap_forward_and_grads(dtype, causal, headdim, seqlens):
    import torch

    sq, sk = seqlens
    dt = getattr(torch, dtype)
    # Scores of order 5-10 so that the cap (tanh) really bends them.
    q = randn((2, sq, 3, headdim), dt, 70) * 3
    k, v = randn((2, sk, 3, headdim), dt, 71), randn((2, sk, 3, headdim), dt, 72)
    out, lse, _ = cuflash.flash_attn_func(q, k, v, causal=causal, softcap=5.0, return_attn_probs=True)
    ref, ref_lse = reference(q, k, v, causal, softcap=5.0)
    assert_close_2x(out, ref, plain_attention(q, k, v, causal, softcap=5.0))
    assert_lse_close(lse, ref_lse)
    check_grads(q, k, v, causal, softcap=5.0)


def test_softcap_with_alibi_window_gqa_and_block_mask():
    import torch

    from test_blocksparse_gpu import band, random_mask

    q = randn((2, 260, 4, 128), torch.bfloat16, 80) * 2
    k, v = randn((2, 300, 2, 128), torch.bfloat16, 81), randn((2, 300, 2, 128), torch.bfloat16, 82)
    check_grads(q, k, v, True, mask=band(260, 300, 100, 0)[None, None], alibi_slopes=alibi_slopes(4), softcap=8.0,
                window_size=(100, 0))
    mask, elements = random_mask(2, 1, 260, 300, 64, 64, seed=3)
    check_grads(q, k, v, False, mask=elements, alibi_slopes=alibi_slopes(4, batch=2), softcap=8.0, block_mask=mask)


def test_softcap_jax_matches_torch():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import torch

    from gpu_helpers import grads

    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    q, k, v, dout = (randn((1, 100, 2, 64), torch.float16, 90 + i) for i in range(4))
    expected = grads(lambda a, b, c: cuflash.flash_attn_func(a, b, c, softcap=4.0), q, k, v, dout)[1:]
    qj, kj, vj, doj = (jnp.asarray(x.float().cpu().numpy()).astype(jnp.float16) for x in (q, k, v, dout))

    def loss(a, b, c):
        return (cuflash.flash_attn_func(a, b, c, softcap=4.0).astype(jnp.float32) * doj.astype(jnp.float32)).sum()

    for ours, exp in zip(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(qj, kj, vj), expected):
        np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), exp.float().cpu().numpy())
