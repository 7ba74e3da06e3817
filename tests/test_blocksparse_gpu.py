"""Block-sparse attention on the GPU: outputs and gradients equal dense attention with the block
mask's exact element mask (float64 reference, FlashAttention's 2x rule), from PyTorch, CuPy and JAX."""
import numpy as np
import pytest

import cuflash
from cuflash._options import override
from cuflash import BlockMask

from gpu_helpers import assert_close_2x, assert_lse_close, check_grads, grads, plain_attention, randn, reference

pytestmark = pytest.mark.gpu


def random_mask(batch, nheads, sq, sk, block_m, block_n, seed, empty_rows=True):
    """A BlockMask with skipped, full and partial blocks (random element bits) and, optionally, a
    query block that sees nothing; built from a predicate over a random element mask."""
    rng = np.random.default_rng(seed)
    nq, nk = -(-sq // block_m), -(-sk // block_n)
    states = rng.choice(3, size=(batch, nheads, nq, nk), p=[0.4, 0.3, 0.3])
    if empty_rows and nq > 1:
        states[..., nq // 2, :] = 0
    elements = np.repeat(np.repeat(states, block_m, axis=2), block_n, axis=3)
    elements = np.where(elements == 1, rng.random(elements.shape) < 0.5, elements == 2)
    mask = BlockMask.from_predicate(lambda b, h, q, kv: elements[b, h, q, kv], batch, nheads, sq, sk, block_m, block_n)
    return mask, elements[:, :, :sq, :sk]


CASES = [  # (batch, nheads, nheads_k, mask batch, mask heads, seqlen_q, seqlen_k, headdim, block_m, block_n)
    (2, 3, 3, 1, 1, 256, 256, 64, 128, 128),
    (2, 3, 3, 2, 3, 300, 517, 128, 64, 64),
    (1, 4, 2, 1, 4, 333, 200, 128, 128, 64),   # GQA with a mask per query head
    (2, 4, 1, 2, 1, 129, 1023, 96, 64, 128),   # MQA
    (1, 2, 2, 1, 2, 1, 130, 40, 64, 64),       # one query row
    (1, 2, 2, 1, 1, 1000, 1000, 256, 128, 128),
    (1, 2, 2, 1, 1, 500, 700, 160, 64, 128),
    (1, 2, 2, 1, 2, 300, 300, 160, 128, 128),  # 8 warps of 16 rows at d = 160
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_random_masks_forward_and_grads(dtype, causal, case):
    import torch

    b, h, hk, mb, mh, sq, sk, d, bm, bn = case
    mask, elements = random_mask(mb, mh, sq, sk, bm, bn, seed=sum(case) + causal)
    assert np.array_equal(mask.to_element_mask(), elements)
    dt = getattr(torch, dtype)
    q, k, v = randn((b, sq, h, d), dt, 1), randn((b, sk, hk, d), dt, 2), randn((b, sk, hk, d), dt, 3)
    out, lse, _ = cuflash.flash_attn_func(q, k, v, causal=causal, block_mask=mask, return_attn_probs=True)
    ref, ref_lse = reference(q, k, v, causal, mask=elements)
    assert_close_2x(out, ref, plain_attention(q, k, v, causal, mask=elements))
    assert_lse_close(lse, ref_lse)
    check_grads(q, k, v, causal, mask=elements, block_mask=mask)


@pytest.mark.parametrize("pattern", ["causal", "sliding_window", "butterfly", "local_global"])
def test_patterns(pattern):
    import torch

    sq = sk = 1100
    mask = {
        "causal": lambda: BlockMask.causal(sq, sk),
        "sliding_window": lambda: BlockMask.sliding_window(sq, sk, 200, 50, 64, 64),
        "butterfly": lambda: BlockMask.butterfly(sq, sk),
        "local_global": lambda: BlockMask.local_global_random(sq, sk, 1, 1, 1, seed=3, block_m=64, block_n=128),
    }[pattern]()
    q, k, v = (randn((2, sq, 2, 128), torch.bfloat16, 10 + i) for i in range(3))
    check_grads(q, k, v, False, mask=mask.to_element_mask(), block_mask=mask)


def test_causal_block_mask_equals_dense_causal():
    import torch

    q, k, v = (randn((1, 777, 4, 64), torch.float16, 20 + i) for i in range(3))
    dense = cuflash.flash_attn_func(q, k, v, causal=True)
    sparse = cuflash.flash_attn_func(q, k, v, block_mask=BlockMask.causal(777, 777))
    assert (dense.float() - sparse.float()).abs().max().item() < 2e-3


def test_empty_mask_gives_zeros_and_zero_grads():
    import torch

    mask = BlockMask.from_dense(np.zeros((2, 3), bool), 200, 300)
    q, k, v = (randn((1, n, 2, 64), torch.bfloat16, 30 + i) for i, n in enumerate((200, 300, 300)))
    out, dq, dk, dv = grads(lambda a, b, c: cuflash.flash_attn_func(a, b, c, block_mask=mask), q, k, v,
                            randn(q.shape, q.dtype, 33))
    for x in (out, dq, dk, dv):
        assert (x == 0).all()


def test_cupy_forward_and_explicit_backward():
    import cupy
    import torch

    mask, elements = random_mask(1, 1, 300, 300, 64, 64, seed=7)
    q, k, v, dout = (randn((2, 300, 2, 64), torch.float16, 40 + i) for i in range(4))
    out_t, dq_t, dk_t, dv_t = grads(lambda a, b, c: cuflash.flash_attn_func(a, b, c, block_mask=mask), q, k, v, dout)
    qc, kc, vc, doc = (cupy.from_dlpack(x) for x in (q, k, v, dout))
    out, lse, _ = cuflash.flash_attn_func(qc, kc, vc, block_mask=mask, return_attn_probs=True)
    assert isinstance(out, cupy.ndarray)
    dq, dk, dv = cuflash.flash_attn_backward(doc, qc, kc, vc, out, lse, block_mask=mask)
    torch.cuda.synchronize()
    for ours, expected in zip((out, dq, dk, dv), (out_t, dq_t, dk_t, dv_t)):
        assert torch.equal(torch.from_dlpack(ours), expected)


def test_jax_grad_eager_and_jit():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import torch

    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    mask, _ = random_mask(1, 1, 200, 260, 64, 64, seed=8)
    q, k, v, dout = (randn((2, n, 2, 64), torch.bfloat16, 50 + i) for i, n in enumerate((200, 260, 260, 200)))
    _, dq, dk, dv = grads(lambda a, b, c: cuflash.flash_attn_func(a, b, c, causal=True, block_mask=mask), q, k, v,
                          dout)
    qj, kj, vj, doj = (jnp.asarray(x.float().cpu().numpy()).astype(jnp.bfloat16) for x in (q, k, v, dout))

    def loss(a, b, c):
        out = cuflash.flash_attn_func(a, b, c, causal=True, block_mask=mask)
        return (out.astype(jnp.float32) * doj.astype(jnp.float32)).sum()

    for fn in (jax.grad(loss, argnums=(0, 1, 2)), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))):
        for ours, expected in zip(fn(qj, kj, vj), (dq, dk, dv)):
            np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), expected.float().cpu().numpy())


def test_bad_masks_raise_before_launch():
    import torch

    q = randn((1, 256, 2, 64), torch.float16, 60)
    with pytest.raises(TypeError, match="block_mask"):
        cuflash.flash_attn_func(q, q, q, block_mask=np.ones((2, 2), bool))
    with pytest.raises(ValueError, match="block_mask"):
        cuflash.flash_attn_func(q, q, q, block_mask=BlockMask.causal(128, 256))
    with pytest.raises(ValueError, match="block_m"):
        cuflash.flash_attn_func(q, q, q, block_mask=BlockMask.causal(256, 256, 32, 32))
    with pytest.raises(ValueError, match="heads"):
        cuflash.flash_attn_func(q, q, q, block_mask=BlockMask.from_dense(np.ones((1, 3, 2, 2), bool), 256, 256))


def test_long_local_global_64k_forward_backward():
    """65,536 tokens with a local + global mask: runs, and matches on sampled rows of out."""
    import torch

    n = 65536
    mask = BlockMask.local_global_random(n, n, 1, 1, 1, seed=0)
    q, k, v = (randn((1, n, 4, 128), torch.bfloat16, 70 + i) for i in range(3))
    out, dq, dk, dv = grads(lambda a, b, c: cuflash.flash_attn_func(a, b, c, block_mask=mask), q, k, v,
                            randn(q.shape, q.dtype, 73))
    for x in (out, dq, dk, dv):
        assert torch.isfinite(x).all()
    rows = [0, 1, 5000, n // 2 + 7, n - 1]
    allowed = mask.to_dense()[0, 0] > 0  # every block here is full
    for r in rows:
        keys = torch.as_tensor(np.repeat(allowed[r // 128], 128), device="cuda")
        s = (q[0, r].float()[:, None, :] * k[0].float().transpose(0, 1)).sum(-1) / 128 ** 0.5  # (h, n)
        p = torch.softmax(s.masked_fill(~keys, float("-inf")), -1)
        expected = (p[:, :, None] * v[0].float().transpose(0, 1)).sum(1)
        assert (out[0, r].float() - expected).abs().max().item() < 2e-2


def band(sq, sk, left, right):
    i, j = np.arange(sq)[:, None], np.arange(sk)[None, :]
    d = sk - sq
    return ((left < 0) | (j >= i + d - left)) & ((right < 0) | (j <= i + d + right))


@pytest.mark.parametrize("window", [(100, 0), (50, 70), (-1, 30), (0, 0), (300, -1)])
@pytest.mark.parametrize("seqlens", [(300, 300), (200, 517), (517, 200), (1, 129)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window_forward_and_grads(causal, seqlens, window):
    import torch

    sq, sk = seqlens
    q = randn((2, sq, 4, 64), torch.bfloat16, 80)
    k, v = randn((2, sk, 2, 64), torch.bfloat16, 81), randn((2, sk, 2, 64), torch.bfloat16, 82)  # GQA
    check_grads(q, k, v, causal, mask=band(sq, sk, *window)[None, None], window_size=window)


@pytest.mark.parametrize("window, causal", [((256, 0), False), ((100, 100), False), ((300, 40), True)])
def test_sliding_window_head_dim_128_long(window, causal):
    """The kernels' band on the widest backward tiles (d=128), windows spanning several tiles."""
    import torch

    q, k, v = (randn((1, 1000, 2, 128), torch.float16, 95 + i) for i in range(3))
    check_grads(q, k, v, causal, mask=band(1000, 1000, window[0], 0 if causal else window[1])[None, None],
                window_size=window)


def test_window_with_block_mask_and_head_dim_128():
    import torch

    mask, elements = random_mask(1, 2, 700, 700, 64, 64, seed=9, empty_rows=False)
    q, k, v = (randn((1, 700, 2, 128), torch.float16, 90 + i) for i in range(3))
    check_grads(q, k, v, False, mask=elements & band(700, 700, 256, 0)[None, None], window_size=(256, 0),
                block_mask=mask)


WS_CASES = [  # as CASES; the warp-specialised kernels' shapes: head dims 64 and 128, 128-row query or key blocks
    (2, 3, 3, 1, 1, 256, 256, 64, 128, 128),
    (1, 4, 2, 1, 4, 333, 200, 128, 128, 128),   # GQA with a mask per query head
    (2, 2, 1, 2, 1, 1023, 517, 128, 64, 128),   # MQA, 64-row query blocks (the dQ kernel's plain tiles)
    (1, 2, 2, 1, 2, 17, 300, 128, 128, 64),     # 17 queries, 64-key blocks (the dK/dV kernel's plain tiles)
]
FEATURES = {"plain": {}, "alibi": {"alibi_slopes": 0.5}, "softcap": {"softcap": 5.0},
            "dropout": {"dropout_p": 0.2, "dropout_seed": 11}}


@pytest.mark.parametrize("case", WS_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("feature", list(FEATURES))
@pytest.mark.parametrize("warp_specialised", [True, False], ids=["ws", "plain"])
def test_warp_specialised_backward_kernels(warp_specialised, feature, causal, case):
    """On Hopper, block masks of 128-row query blocks take the warp-specialised dQ kernel and block masks of
    128-key blocks the warp-specialised dK/dV kernel (kernels/flash_bwd.cu flash_bwd_dq_ws_kernel,
    flash_bwd_dkdv_ws_kernel) at head dims 64 and 128; with them off (CUFLASH_DQ_WS=0, CUFLASH_DKDV_WS=0), the plain
    ones. Both ways must be right, with each score modification."""
    import torch

    from cuflash import _arch, _dispatch
    from cuflash._options import Options
    from cuflash._tiles import Flags

    if _arch.device_arch() != "sm_90a":
        pytest.skip("the warp-specialised backward kernels need an sm_90 GPU")
    options = dict(dq_warp_specialised=warp_specialised, dkdv_warp_specialised=warp_specialised)
    b, h, hk, mb, mh, sq, sk, d, bm, bn = case
    kw = dict(FEATURES[feature])
    flags = Flags(mask_blocks=(bm, bn), alibi="alibi_slopes" in kw, softcap="softcap" in kw, dropout="dropout_p" in kw)
    _, dkdv, dq = _dispatch.choose_bwd("bfloat16", d, flags, "sm_90a", Options(**options))
    assert dq.warp_specialised == (warp_specialised and bm == 128)
    assert dkdv.warp_specialised == (warp_specialised and bn == 128)
    if "alibi_slopes" in kw:
        seeded = torch.Generator("cuda").manual_seed(sum(case))  # (an error near the 2x rule reproduces)
        kw["alibi_slopes"] = torch.rand(h, device="cuda", generator=seeded) * kw["alibi_slopes"]
    mask, elements = random_mask(mb, mh, sq, sk, bm, bn, seed=sum(case) + causal + 7)
    q = randn((b, sq, h, d), torch.bfloat16, 1)
    k, v = randn((b, sk, hk, d), torch.bfloat16, 2), randn((b, sk, hk, d), torch.bfloat16, 3)
    with override(**options):
        check_grads(q, k, v, causal, mask=elements, block_mask=mask, **kw)
