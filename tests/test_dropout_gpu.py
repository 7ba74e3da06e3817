"""Fused dropout on the GPU: the kernels' mask equals the NumPy Philox stream's
(reference.dropout_keep_mask) element for element, its keep rate is right, and the forward and
gradients match the float64 reference built with that mask (the 2x rule), alone and with causal,
GQA, ALiBi, softcap, windows, block masks, packed sequences, CuPy and JAX."""
import math

import numpy as np
import pytest

import cuflash
from cuflash.reference import dropout_keep_mask

from gpu_helpers import assert_close_2x, check_grads, grads, grid, grid_inputs, plain_attention, randn

pytestmark = pytest.mark.gpu


def kernel_keep_mask(batch, nheads, seqlen_q, dropout_p, seed, dtype="bfloat16"):
    """The kernels' keep mask for 128 keys, read from the output: with q = 0 every probability is
    1/128, and with V = identity out[i, j] = keep(i, j) / (128 (1 - p))."""
    import torch

    dt = getattr(torch, dtype)
    q = torch.zeros((batch, seqlen_q, nheads, 128), dtype=dt, device="cuda")
    k = randn((batch, 128, nheads, 128), dt, 5)
    v = torch.eye(128, dtype=dt, device="cuda")[None, :, None, :].expand(batch, 128, nheads, 128)
    out = cuflash.flash_attn_func(q, k, v, dropout_p=dropout_p, dropout_seed=seed)
    keep = (65536 - cuflash._dispatch.dropout_threshold(dropout_p)) / 65536
    scaled = (out.float() * 128 * keep).permute(0, 2, 1, 3).cpu().numpy()  # (batch, nheads, seqlen_q, 128)
    assert np.all((np.abs(scaled) < 1e-2) | (np.abs(scaled - 1) < 1e-2)), "outputs are 0 or 1/keep"
    return scaled > 0.5


@pytest.mark.parametrize("dropout_p", [0.1, 0.5, 0.9])
def test_kernel_mask_is_the_philox_stream_and_keep_rate(dropout_p):
    seed = 2**40 + 12345
    mask = kernel_keep_mask(2, 3, 1000, dropout_p, seed)
    np.testing.assert_array_equal(mask, dropout_keep_mask(seed, 0, 2, 3, 1000, 128, dropout_p))
    n, keep = mask.size, 1 - dropout_p
    assert abs(mask.mean() - keep) < 5 * math.sqrt(keep * (1 - keep) / n)  # 5 sigma
    # Rows and columns are not correlated: each row's and column's keep rate is near keep too.
    assert abs(mask.mean(axis=-1) - keep).max() < 6 * math.sqrt(keep * (1 - keep) / 128)


def test_torch_generator_seed_is_reproducible_and_advances():
    import torch

    q, k, v = (randn((1, 64, 2, 64), torch.float16, i) for i in range(3))
    torch.manual_seed(7)
    a, _, rng_a = cuflash.flash_attn_func(q, k, v, dropout_p=0.3, return_attn_probs=True)
    b, _, rng_b = cuflash.flash_attn_func(q, k, v, dropout_p=0.3, return_attn_probs=True)
    torch.manual_seed(7)
    c, _, rng_c = cuflash.flash_attn_func(q, k, v, dropout_p=0.3, return_attn_probs=True)
    assert torch.equal(a, c) and rng_a == rng_c
    assert not torch.equal(a, b) and rng_a != rng_b
    assert rng_a[0] == 7


SEQLENS = [(1, 1), (17, 17), (113, 203), (300, 129), (1023, 1024)]


@grid(seqlens=SEQLENS, headdims=[40, 64, 128, 256])
def test_dropout_forward_and_grads(dtype, causal, headdim, seqlens):
    import torch

    q, k, v = grid_inputs(dtype, causal, headdim, seqlens, "dropout")
    # With one key dS, dq and dk are exactly 0, which plain autograd reproduces exactly; the kernels'
    # carry the rounding of O in delta = rowsum(dO * O) (as FlashAttention-2's do): a few ulps.
    floors = dict.fromkeys(("dq", "dk"), 4 * torch.finfo(q.dtype).eps) if seqlens[1] == 1 else None
    check_grads(q, k, v, causal, dropout_p=0.17, dropout_seed=1234 + headdim, floors=floors)


def test_dropout_with_softcap_at_head_dim_128():
    """The d = 128 forward with softcap and dropout runs 8 warps of 16 rows (registers)."""
    import torch

    q, k, v = (randn((1, 300, 4, 128), torch.bfloat16, 60 + i) for i in range(3))
    check_grads(q, k, v, True, softcap=20.0, dropout_p=0.1, dropout_seed=8)


@pytest.mark.parametrize("case", ["gqa_window", "alibi_softcap", "block_mask"])
def test_dropout_with_other_features(case):
    import torch

    from test_blocksparse_gpu import band
    from test_features_gpu import alibi_slopes

    q = randn((2, 250, 8, 64), torch.bfloat16, 10)
    k, v = randn((2, 270, 2, 64), torch.bfloat16, 11), randn((2, 270, 2, 64), torch.bfloat16, 12)
    kw = dict(dropout_p=0.25, dropout_seed=99)
    if case == "gqa_window":
        check_grads(q, k, v, True, mask=band(250, 270, 100, 0)[None, None], window_size=(100, 0), **kw)
    elif case == "alibi_softcap":
        check_grads(q, k, v, True, alibi_slopes=alibi_slopes(8), softcap=15.0, **kw)
    else:
        from test_blocksparse_gpu import random_mask

        mask, elements = random_mask(2, 8, 250, 270, 64, 64, seed=3)
        check_grads(q, k, v, False, mask=elements, block_mask=mask, **kw)


def test_dropout_varlen_matches_each_sequence():
    """Sequence b of a packed batch drops what batch element b of a fixed-length call would."""
    import torch

    from test_varlen_gpu import cu

    lens = [130, 1, 77, 300]
    q, k, v, dout = (randn((sum(lens), 4, 64), torch.float16, 20 + i) for i in range(4))
    args = (cu(lens), cu(lens), max(lens), max(lens))
    full = dropout_keep_mask(5, 0, len(lens), 4, max(lens), max(lens), 0.2)
    starts = np.cumsum([0, *lens])

    def packed(fn, a, b, c):
        return torch.cat([fn(a[s:e][None], b[s:e][None], c[s:e][None], full[i:i + 1, :, :n, :n])[0]
                          for i, (s, e, n) in enumerate(zip(starts[:-1], starts[1:], lens))])

    def plain(a, b, c):
        return packed(lambda x, y, z, m: plain_attention(x, y, z, True, dropout_mask=m, dropout_p=0.2), a, b, c)

    ours = grads(lambda a, b, c: cuflash.flash_attn_varlen_func(a, b, c, *args, dropout_p=0.2, causal=True,
                                                                dropout_seed=5), q, k, v, dout)
    base = grads(plain, q, k, v, dout)
    exact = grads(plain, *(x.double() for x in (q, k, v)), dout.double())
    for name, o, p, r in zip(("out", "dq", "dk", "dv"), ours, base, exact):
        assert_close_2x(o, r, p, name)


def test_dropout_cupy_explicit_backward_matches_torch():
    import cupy
    import torch

    q, k, v, dout = (randn((2, 200, 4, 64), torch.bfloat16, 30 + i) for i in range(4))
    out_t, dq_t, dk_t, dv_t = grads(lambda a, b, c: cuflash.flash_attn_func(a, b, c, dropout_p=0.3, dropout_seed=77),
                                    q, k, v, dout)
    qc, kc, vc, doc = (cupy.from_dlpack(x) for x in (q, k, v, dout))
    out, lse, rng = cuflash.flash_attn_func(qc, kc, vc, dropout_p=0.3, dropout_seed=77, return_attn_probs=True)
    assert rng == (77, 0)
    dq, dk, dv = cuflash.flash_attn_backward(doc, qc, kc, vc, out, lse, dropout_p=0.3, rng_state=rng)
    for ours, theirs in ((out, out_t), (dq, dq_t), (dk, dk_t), (dv, dv_t)):
        assert torch.equal(torch.from_dlpack(ours), theirs)
    with pytest.raises(ValueError, match="rng_state"):
        cuflash.flash_attn_backward(doc, qc, kc, vc, out, lse, dropout_p=0.3)


def test_dropout_torch_compile():
    import torch

    q, k, v, dout = (randn((1, 128, 2, 64), torch.bfloat16, 40 + i) for i in range(4))
    f = torch.compile(lambda a, b, c: cuflash.flash_attn_func(a, b, c, dropout_p=0.1, dropout_seed=3), fullgraph=True)
    eager = grads(lambda a, b, c: cuflash.flash_attn_func(a, b, c, dropout_p=0.1, dropout_seed=3), q, k, v, dout)
    compiled = grads(f, q, k, v, dout)
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


def test_dropout_jax_matches_torch_under_jit():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import torch

    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    q, k, v, dout = (randn((2, 130, 4, 64), torch.bfloat16, 50 + i) for i in range(4))
    out_t, dq_t, dk_t, dv_t = grads(lambda a, b, c: cuflash.flash_attn_func(a, b, c, dropout_p=0.2, dropout_seed=11),
                                    q, k, v, dout)
    qj, kj, vj, doj = (jnp.asarray(x.float().cpu().numpy()).astype(jnp.bfloat16) for x in (q, k, v, dout))

    def loss(a, b, c, seed):
        out = cuflash.flash_attn_func(a, b, c, dropout_p=0.2, dropout_seed=seed)
        return (out.astype(jnp.float32) * doj.astype(jnp.float32)).sum()

    dq, dk, dv = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)(qj, kj, vj, 11)
    for ours, theirs in ((dq, dq_t), (dk, dk_t), (dv, dv_t)):
        np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), theirs.float().cpu().numpy())
    # A PRNG key, traced under jit: same key, same result; another key, another mask.
    f = jax.jit(lambda a, b, c, key: cuflash.flash_attn_func(a, b, c, dropout_p=0.2, dropout_seed=key))
    x, y, z = (f(qj, kj, vj, jax.random.key(s)) for s in (1, 1, 2))
    assert np.array_equal(np.asarray(x), np.asarray(y)) and not np.array_equal(np.asarray(x), np.asarray(z))
