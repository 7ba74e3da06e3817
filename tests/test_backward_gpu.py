"""The backward pass on the GPU: gradients against float64 autograd with FlashAttention's 2x rule,
PyTorch autograd (custom op, torch.compile), CuPy's explicit backward, determinism, long sequences."""
import math

import pytest

import cuflash
from cuflash._options import override

from gpu_helpers import check_grads, grads, grid, grid_inputs, randn, strided_inputs

pytestmark = pytest.mark.gpu


@grid()
def test_backward_grid(dtype, causal, headdim, seqlens):
    check_grads(*grid_inputs(dtype, causal, headdim, seqlens, "bwd"), causal)


@pytest.mark.parametrize("seqlens", [(113, 203), (1023, 1024)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("headdim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_mma_sync_kernels_on_hopper(causal, headdim, seqlens):
    """On an sm_90 GPU the grid above runs the wgmma kernels; with wgmma off (CUFLASH_WGMMA=0) the mma.sync
    ones (what sm_80 runs) are tested there too."""
    with override(wgmma=False):
        check_grads(*grid_inputs("bfloat16", causal, headdim, seqlens, "bwd"), causal)


@pytest.mark.parametrize("layout", ["qkv_packed", "bhsd_transposed", "noncontiguous_v"])
def test_backward_strided(layout):
    import torch

    q, k, v = strided_inputs(layout)
    b, s, h, d = q.shape
    check_grads(q, k, v, True, dout=randn((b, h, s, d), torch.bfloat16, 4).transpose(1, 2))


@pytest.mark.parametrize("nheads, nheads_k, causal", [(8, 2, True), (6, 1, False)])
def test_backward_gqa(nheads, nheads_k, causal):
    import torch

    q = randn((2, 257, nheads, 128), torch.float16, 5)
    k = randn((2, 190, nheads_k, 128), torch.float16, 6)
    v = randn((2, 190, nheads_k, 128), torch.float16, 7)
    check_grads(q, k, v, causal)


@pytest.mark.parametrize("seqlens", [(113, 203), (1023, 1024), (777, 1500)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("nheads_k", [8, 2])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("headdim", [64, 128])
def test_dq_accumulated_on_short_calls(headdim, causal, nheads_k, seqlens):
    """dQ accumulated by the dK/dV kernel (Hopper, d = 64 and 128), which calls take from 2K-8K queries on, forced
    onto short, odd-sized and GQA calls (CUFLASH_FUSED_DQ=all), where its edge tiles are."""
    import torch

    q = randn((2, seqlens[0], 8, headdim), torch.bfloat16, 31)
    k = randn((2, seqlens[1], nheads_k, headdim), torch.bfloat16, 32)
    v = randn((2, seqlens[1], nheads_k, headdim), torch.bfloat16, 33)
    with override(fused_dq_short=True):
        check_grads(q, k, v, causal)
        if not causal:  # with a window and ALiBi (which longer calls take without accumulating dQ)
            from test_blocksparse_gpu import band
            from test_features_gpu import alibi_slopes

            mask = band(seqlens[0], seqlens[1], 100, 30)[None, None]
            check_grads(q, k, v, False, mask=mask, alibi_slopes=alibi_slopes(8, batch=2), window_size=(100, 30))


def test_rows_that_see_no_key_get_zero_gradients():
    import torch

    q = randn((1, 150, 2, 64), torch.bfloat16, 11)
    k = randn((1, 50, 2, 64), torch.bfloat16, 12)
    v = randn((1, 50, 2, 64), torch.bfloat16, 13)
    out, dq, dk, dv = check_grads(q, k, v, True)
    assert (dq[:, :100] == 0).all()


def test_cupy_explicit_backward_matches_torch_and_is_deterministic():
    """deterministic=True gives bitwise reproducible gradients from every bridge (on Hopper the dQ kernel
    instead of dQ accumulated by the dK/dV kernel, whose additions come in any order); the default's are
    as accurate (check_grads) and agree with them closely."""
    import cupy
    import torch

    q, k, v, dout = (randn((2, 333, 4, 128), torch.float16, 20 + i) for i in range(4))
    out, lse, _ = cuflash.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    g1 = cuflash.flash_attn_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    g2 = cuflash.flash_attn_backward(dout, q, k, v, out, lse, causal=True, deterministic=True)
    for a, b in zip(g1, g2):
        assert torch.equal(a, b)  # bitwise reproducible
    c = [cupy.from_dlpack(x) for x in (dout, q, k, v, out, lse)]
    gc = cuflash.flash_attn_backward(*c, causal=True, deterministic=True)
    for a, b in zip(gc, g1):
        assert isinstance(a, cupy.ndarray)
        torch.cuda.synchronize()
        assert torch.equal(torch.from_dlpack(a), b)
    ours = grads(lambda a, b, c: cuflash.flash_attn_func(a, b, c, causal=True, deterministic=True), q, k, v, dout)
    for a, b in zip(ours[1:], g1):
        assert torch.equal(a, b)
    fast = cuflash.flash_attn_backward(dout, q, k, v, out, lse, causal=True)
    for a, b in zip(fast, g1):
        assert (a.float() - b.float()).abs().max() <= 1e-2 * b.float().abs().max()


def test_torch_compile():
    import torch

    q, k, v, dout = (randn((2, 256, 4, 64), torch.bfloat16, 30 + i) for i in range(4))

    def loss_fn(q, k, v):
        return (cuflash.flash_attn_func(q, k, v, causal=True) * dout).sum()

    compiled = torch.compile(loss_fn)
    qs = [x.detach().requires_grad_() for x in (q, k, v)]
    compiled(*qs).backward()
    eager = [x.detach().requires_grad_() for x in (q, k, v)]
    loss_fn(*eager).backward()
    for a, b in zip(qs, eager):
        assert torch.equal(a.grad, b.grad)


def test_custom_op_opcheck():
    import torch

    q, k, v = (randn((1, 64, 2, 64), torch.float16, 40 + i).requires_grad_() for i in range(3))
    cu = torch.tensor([0, 30, 64], dtype=torch.int32, device="cuda")
    for packed in (False, True):  # one op for dense and packed batches: cu_seqlens None or given
        args = (q[0], k[0], v[0], cu, cu, 34, 34) if packed else (q, k, v, None, None, 64, 64)
        for dropout in ((0.0, None), (0.1, 5)):
            torch.library.opcheck(torch.ops.cuflash.flash_attn_fwd.default,
                                  (*args, 0.125, True, None, None, None, 0.0, *dropout, -1, -1, False, "", [], None,
                                   None),
                                  test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))


def _sampled_row_grads(q, k, v, dout, rows, causal, chunk=2048):
    """float32 reference of dq[rows], dk[rows], dv[rows] for one batch element, in chunks."""
    import torch

    q, k, v, dout = (x[0].float().transpose(0, 1) for x in (q, k, v, dout))  # (h, s, d)
    h, sq, d = q.shape
    sk = k.shape[1]
    scale = 1 / math.sqrt(d)
    lse, delta = torch.empty(h, sq, device=q.device), torch.empty(h, sq, device=q.device)
    for i0 in range(0, sq, chunk):  # lse and delta = rowsum(dO * O) for every query
        s = (q[:, i0:i0 + chunk] @ k.transpose(1, 2)) * scale
        if causal:
            i = torch.arange(i0, min(i0 + chunk, sq), device=q.device)[:, None]
            s = s.masked_fill(torch.arange(sk, device=q.device)[None] > i + sk - sq, float("-inf"))
        lse[:, i0:i0 + chunk] = torch.logsumexp(s, -1)
        o = torch.softmax(s, -1) @ v
        delta[:, i0:i0 + chunk] = (o * dout[:, i0:i0 + chunk]).sum(-1)

    def p_and_ds(qi, kj, vj, doi, li, di, i, j):
        s = (qi @ kj.transpose(1, 2)) * scale
        if causal:
            s = s.masked_fill(j[None, :] > i[:, None] + sk - sq, float("-inf"))
        p = torch.exp(s - li[..., None])
        return p, p * (doi @ vj.transpose(1, 2) - di[..., None])

    all_k = torch.arange(sk, device=q.device)
    p, ds = p_and_ds(q[:, rows], k, v, dout[:, rows], lse[:, rows], delta[:, rows], rows, all_k)
    dq = (ds @ k) * scale
    dk, dv = torch.zeros(h, len(rows), d, device=q.device), torch.zeros(h, len(rows), d, device=q.device)
    for i0 in range(0, sq, chunk):
        i = torch.arange(i0, min(i0 + chunk, sq), device=q.device)
        p, ds = p_and_ds(q[:, i], k[:, rows], v[:, rows], dout[:, i], lse[:, i], delta[:, i], i, rows)
        dv += p.transpose(1, 2) @ dout[:, i]
        dk += (ds.transpose(1, 2) @ q[:, i]) * scale
    return [x.transpose(0, 1)[None] for x in (dq, dk, dv)]


@pytest.mark.parametrize("seqlen", [16384, 65536])
def test_long_backward_sampled_rows(seqlen):
    import torch

    h, d = 4 if seqlen > 16384 else 8, 128
    q, k, v, dout = (randn((1, seqlen, h, d), torch.bfloat16, 50 + i) for i in range(4))
    _, dq, dk, dv = grads(lambda a, b, c: cuflash.flash_attn_func(a, b, c, causal=True), q, k, v, dout)
    rows = torch.tensor([0, 1, 127, 4095, seqlen // 2 + 3, seqlen - 2, seqlen - 1], device="cuda")
    for name, ours, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), _sampled_row_grads(q, k, v, dout, rows, True)):
        got = ours[:, rows].float()
        err = (got - ref).abs().max().item()
        assert err <= 2e-2 * ref.abs().max().item() + 1e-3, f"{name}: error {err:.3g} vs scale {ref.abs().max():.3g}"


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_jax_grad_eager_and_jit(dtype):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import numpy as np
    import torch

    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    dt = getattr(torch, dtype)
    q, k, v, dout = (randn((2, 130, 4, 64), dt, 60 + i) for i in range(4))
    _, dq, dk, dv = grads(lambda a, b, c: cuflash.flash_attn_func(a, b, c, causal=True), q, k, v, dout)
    qj, kj, vj, doj = (jnp.asarray(x.float().cpu().numpy()).astype(dtype) for x in (q, k, v, dout))

    def loss(a, b, c):
        return (cuflash.flash_attn_func(a, b, c, causal=True).astype(jnp.float32) * doj.astype(jnp.float32)).sum()

    for fn in (jax.grad(loss, argnums=(0, 1, 2)), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))):
        gq, gk, gv = fn(qj, kj, vj)
        for ours, expected in ((gq, dq), (gk, dk), (gv, dv)):
            np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), expected.float().cpu().numpy())


def test_one_stream_backward_equals_the_side_stream_one():
    """Without the side stream (CUFLASH_BWD_STREAMS=1) the dQ kernel queues on the caller's stream instead
    of beside the dK/dV kernel: the same gradients, bit for bit."""
    import torch

    q, k, v, dout = (randn((2, 300, 4, 64), torch.bfloat16, 60 + i) for i in range(4))
    side = grads(lambda a, b, c: cuflash.flash_attn_func(a, b, c, causal=True), q, k, v, dout)
    with override(bwd_side_stream=False):
        one = grads(lambda a, b, c: cuflash.flash_attn_func(a, b, c, causal=True), q, k, v, dout)
    for x, y in zip(side, one):
        assert torch.equal(x, y)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "custom-op"])
def test_gradients_of_gradients_raise(compiled):
    """A second differentiation through the attention raises instead of returning a first-order-only result
    (under torch.compile PyTorch says so itself)."""
    import torch

    q, k, v = (randn((1, 64, 2, 64), torch.bfloat16, seed).detach().requires_grad_() for seed in (81, 82, 83))
    attention = torch.compile(cuflash.flash_attn_func, fullgraph=True) if compiled else cuflash.flash_attn_func
    (dq,) = torch.autograd.grad(attention(q, k, v).float().sum(), q, create_graph=True)
    with pytest.raises(RuntimeError, match="gradients of gradients|does not currently support double backward"):
        torch.autograd.grad(dq.float().sum(), q)


@pytest.mark.parametrize("seqlens", [(333, 517), (1023, 1024)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("headdim", [64, 80, 128])
def test_dkdv_copies_by_tma_and_by_cp_async_alike(headdim, causal, seqlens):
    """The warp-specialised dK/dV kernel (Hopper) copies Q, dO, K and V by TMA where the arrays allow it and by
    cp.async where not: both give the reference's gradients, and the same dK and dV, bitwise (dQ is summed
    by bulk reductions in no fixed order)."""
    import torch

    q = randn((2, seqlens[0], 4, headdim), torch.bfloat16, 61)
    k, v = (randn((2, seqlens[1], 2, headdim), torch.bfloat16, seed) for seed in (62, 63))
    dout = randn(q.shape, torch.bfloat16, 64)
    with override(fused_dq_short=True):
        check_grads(q, k, v, causal, dout=dout)
        by_tma = grads(lambda *a: cuflash.flash_attn_func(*a, causal=causal), q, k, v, dout)
        with override(tma=False):
            check_grads(q, k, v, causal, dout=dout)
            by_cp_async = grads(lambda *a: cuflash.flash_attn_func(*a, causal=causal), q, k, v, dout)
    for a, b in zip(by_tma[2:], by_cp_async[2:]):
        assert torch.equal(a, b)
