"""Packed variable-length batches on the GPU: each sequence equals attention over it alone (float64
reference, the 2x rule, gradients), and the padded <-> packed helpers."""
import numpy as np
import pytest

import cuflash

from gpu_helpers import assert_close_2x, assert_lse_close, grads, plain_attention, randn, reference

pytestmark = pytest.mark.gpu


def cu(lengths):
    import torch

    return torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")


def per_sequence(fn, q, k, v, lens_q, lens_k):
    """fn(q_b, k_b, v_b) on each sequence as a batch of one, outputs concatenated: (total_q, h, d)."""
    import torch

    outs, cq, ck = [], np.cumsum([0, *lens_q]), np.cumsum([0, *lens_k])
    for b in range(len(lens_q)):
        qs, ks, vs = (x[s:e][None] for x, s, e in ((q, cq[b], cq[b + 1]), (k, ck[b], ck[b + 1]), (v, ck[b], ck[b + 1])))
        outs.append(fn(qs, ks, vs)[0])
    return torch.cat(outs)


LENGTHS = [([5, 0, 130, 1, 77], [9, 3, 130, 200, 1]), ([1000, 17, 300], [1000, 17, 300]), ([64], [64])]


@pytest.mark.parametrize("lengths", LENGTHS, ids=lambda l: f"{len(l[0])}seq")
@pytest.mark.parametrize("headdim", [64, 128, 40])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_varlen_matches_each_sequence(dtype, causal, headdim, lengths):
    import torch

    lens_q, lens_k = lengths
    dt = getattr(torch, dtype)
    q = randn((sum(lens_q), 4, headdim), dt, 1)
    k, v = randn((sum(lens_k), 2, headdim), dt, 2), randn((sum(lens_k), 2, headdim), dt, 3)  # GQA
    dout = randn(q.shape, dt, 4)
    args = (cu(lens_q), cu(lens_k), max(lens_q), max(lens_k))

    out, lse, _ = cuflash.flash_attn_varlen_func(q, k, v, *args, causal=causal, return_attn_probs=True)
    assert out.shape == q.shape and lse.shape == (4, sum(lens_q))
    ref = per_sequence(lambda a, b, c: reference(a, b, c, causal)[0], q, k, v, lens_q, lens_k)
    plain = per_sequence(lambda a, b, c: plain_attention(a, b, c, causal), q, k, v, lens_q, lens_k)
    assert_close_2x(out, ref, plain)
    ref_lse = torch.cat([reference(q[s:e][None], k[t:u][None], v[t:u][None], causal)[1][0]
                         for s, e, t, u in zip(np.cumsum([0, *lens_q])[:-1], np.cumsum(lens_q),
                                               np.cumsum([0, *lens_k])[:-1], np.cumsum(lens_k))], dim=1)
    assert_lse_close(lse, ref_lse)

    def packed_plain(a, b, c):
        return per_sequence(lambda x, y, z: plain_attention(x, y, z, causal), a, b, c, lens_q, lens_k)

    ours = grads(lambda a, b, c: cuflash.flash_attn_varlen_func(a, b, c, *args, causal=causal), q, k, v, dout)
    base = grads(packed_plain, q, k, v, dout)
    exact = grads(packed_plain, *(x.double() for x in (q, k, v)), dout.double())
    for name, o, p, r in zip(("out", "dq", "dk", "dv"), ours, base, exact):
        assert_close_2x(o, r, p, name)


@pytest.mark.parametrize("lengths", LENGTHS[:2], ids=lambda l: f"{len(l[0])}seq")
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("headdim", [64, 128])
def test_varlen_with_dq_accumulated(headdim, causal, lengths):
    """Packed sequences through the dK/dV kernel that accumulates dQ (Hopper, d = 128; forced onto these
    short sequences), whose accumulator places each sequence's 64-row tiles apart."""
    from cuflash._options import override

    with override(fused_dq_short=True):
        test_varlen_matches_each_sequence("bfloat16", causal, headdim, lengths)


def test_varlen_is_bitwise_each_sequence_alone_with_alibi_and_softcap():
    import torch

    lens = [300, 1, 129, 64]
    q, k, v = (randn((sum(lens), 2, 64), torch.bfloat16, 10 + i) for i in range(3))
    slopes = torch.tensor([0.5, 0.25], device="cuda")
    packed = cuflash.flash_attn_varlen_func(q, k, v, cu(lens), cu(lens), max(lens), max(lens), causal=True,
                                            alibi_slopes=slopes, softcap=20.0)
    alone = per_sequence(lambda a, b, c: cuflash.flash_attn_func(a, b, c, causal=True, alibi_slopes=slopes,
                                                                 softcap=20.0), q, k, v, lens, lens)
    assert torch.equal(packed, alone)


def test_varlen_cupy_explicit_backward_matches_torch():
    import cupy
    import torch

    lens = [33, 250, 8]
    q, k, v, dout = (randn((sum(lens), 3, 96), torch.float16, 20 + i) for i in range(4))
    args = (cu(lens), cu(lens), max(lens), max(lens))
    _, dq, dk, dv = grads(lambda a, b, c: cuflash.flash_attn_varlen_func(a, b, c, *args), q, k, v, dout)
    c = [cupy.from_dlpack(x) for x in (q, k, v, dout, args[0], args[1])]
    out, lse, _ = cuflash.flash_attn_varlen_func(c[0], c[1], c[2], c[4], c[5], *args[2:], return_attn_probs=True)
    g = cuflash.flash_attn_varlen_backward(c[3], c[0], c[1], c[2], out, lse, c[4], c[5], *args[2:])
    torch.cuda.synchronize()
    for ours, expected in zip(g, (dq, dk, dv)):
        assert torch.equal(torch.from_dlpack(ours), expected)


def test_unpad_and_pad_round_trip_and_match_padded_attention():
    import torch

    batch, seqlen = 3, 200
    lengths = [200, 57, 1]
    mask = torch.arange(seqlen, device="cuda")[None] < torch.tensor(lengths, device="cuda")[:, None]
    x = randn((batch, seqlen, 4, 64), torch.float16, 30)
    packed, indices, cu_seqlens, max_seqlen = cuflash.unpad_input(x, mask)
    assert packed.shape == (sum(lengths), 4, 64) and max_seqlen == 200
    assert cu_seqlens.tolist() == [0, 200, 257, 258]
    back = cuflash.pad_input(packed, indices, batch, seqlen)
    assert torch.equal(back[mask], x[mask]) and (back[~mask] == 0).all()
    out = cuflash.flash_attn_varlen_func(packed, packed, packed, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)
    for b, n in enumerate(lengths):
        alone = cuflash.flash_attn_func(x[b:b + 1, :n], x[b:b + 1, :n], x[b:b + 1, :n])
        assert torch.equal(cuflash.pad_input(out, indices, batch, seqlen)[b:b + 1, :n], alone)


def test_varlen_argument_errors():
    import torch

    q = randn((10, 2, 64), torch.float16, 40)
    good = cu([4, 6])
    with pytest.raises(ValueError, match="cu_seqlens_q must be a contiguous int32"):
        cuflash.flash_attn_varlen_func(q, q, q, good.long(), good, 6, 6)
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        cuflash.flash_attn_varlen_func(q[None], q, q, good, good, 6, 6)
    with pytest.raises(ValueError, match="max_seqlen_k"):
        cuflash.flash_attn_varlen_func(q, q, q, good, good, 6, -1)
    with pytest.raises(ValueError, match="longer than max_seqlen_q = 5"):  # read with a block mask and a window
        cuflash.flash_attn_varlen_func(q, q, q, good, good, 5, 6, window_size=(4, 0),
                                       block_mask=cuflash.BlockMask.from_dense(np.ones((1, 1), bool), 5, 6))
    with pytest.raises(ValueError, match="window_size must be a pair"):
        cuflash.flash_attn_varlen_func(q, q, q, good, good, 6, 6, window_size=(4, -2))


@pytest.mark.parametrize("offsets, clamped", [
    ([0, 100, 1000], [0, 100, 300]),    # the last offset past the rows
    ([-64, 100, 300], [0, 100, 300]),   # a negative first offset
    ([0, 300, 100], [0, 300, 300]),     # decreasing: the second sequence is empty
], ids=["past-end", "negative", "decreasing"])
@pytest.mark.parametrize("causal", [False, True])
def test_bad_offsets_touch_nothing_outside_the_tensors(offsets, clamped, causal):
    """Unchecked offsets (check_inputs off) are clamped by the kernels to the packed rows: the result is the
    clamped offsets' result, bit for bit, and the NaN rows around q, k, v and dout are neither read (the
    outputs stay finite) nor written."""
    import torch

    rows, guard = 300, 64
    buffers = [torch.full((rows + 2 * guard, 2, 64), float("nan"), dtype=torch.float16, device="cuda")
               for _ in range(4)]
    for i, b in enumerate(buffers):
        b[guard:guard + rows] = randn((rows, 2, 64), torch.float16, 60 + i)
    q, k, v, dout = (b[guard:guard + rows] for b in buffers)
    bad, good = (torch.tensor(o, dtype=torch.int32, device="cuda") for o in (offsets, clamped))

    def run(cu_seqlens):
        return grads(lambda a, b, c: cuflash.flash_attn_varlen_func(a, b, c, cu_seqlens, cu_seqlens, 300, 300,
                                                                    causal=causal), q, k, v, dout)

    ours, expected = run(bad), run(good)
    for x, y in zip(ours, expected):
        assert torch.isfinite(x).all()
        assert torch.equal(x, y)
    for b in buffers:
        assert b[:guard].isnan().all() and b[guard + rows:].isnan().all()


@pytest.mark.parametrize("window, causal", [((32, 0), False), ((100, 17), True), ((-1, 5), False), ((0, 0), False)])
def test_varlen_window_is_bitwise_each_sequence_alone(window, causal):
    """window_size with packed sequences: each sequence's own window (bottom-right aligned), forward and
    gradients bitwise equal to flash_attn_func over the sequence alone (tested against float64 there)."""
    import torch

    lens_q, lens_k = [5, 130, 1, 77, 300], [9, 130, 200, 1, 280]
    q = randn((sum(lens_q), 4, 64), torch.bfloat16, 60)
    k, v = randn((sum(lens_k), 2, 64), torch.bfloat16, 61), randn((sum(lens_k), 2, 64), torch.bfloat16, 62)  # GQA
    dout = randn(q.shape, torch.bfloat16, 63)
    args = (cu(lens_q), cu(lens_k), max(lens_q), max(lens_k))
    packed = grads(lambda a, b, c: cuflash.flash_attn_varlen_func(a, b, c, *args, causal=causal, window_size=window),
                   q, k, v, dout)
    alone = grads(lambda a, b, c: per_sequence(
        lambda x, y, z: cuflash.flash_attn_func(x, y, z, causal=causal, window_size=window), a, b, c, lens_q, lens_k),
        q, k, v, dout)
    for name, p, a in zip(("out", "dq", "dk", "dv"), packed, alone):
        assert torch.equal(p, a), name


def test_varlen_window_with_empty_sequences_and_block_mask():
    import torch

    lens_q, lens_k = [0, 200, 64, 3], [7, 0, 256, 3]
    q = randn((sum(lens_q), 2, 64), torch.float16, 70)
    k, v = randn((sum(lens_k), 2, 64), torch.float16, 71), randn((sum(lens_k), 2, 64), torch.float16, 72)
    args = (cu(lens_q), cu(lens_k), 256, 256)
    out = cuflash.flash_attn_varlen_func(q, k, v, *args, window_size=(64, 0))
    assert torch.equal(out[:200], torch.zeros_like(out[:200]))  # sequence 1 has no key
    for s, e, t, u in ((200, 264, 7, 263), (264, 267, 263, 266)):
        alone = cuflash.flash_attn_func(q[s:e][None], k[t:u][None], v[t:u][None], window_size=(64, 0))[0]
        assert torch.equal(out[s:e], alone)
    # A block mask counts from each sequence's start; with causal it is intersected per sequence.
    block = cuflash.BlockMask.from_dense(np.array([[True, False], [True, True]]), 256, 256)
    out = cuflash.flash_attn_varlen_func(q, k, v, *args, causal=True, block_mask=block)
    s, e, t, u = 200, 264, 7, 263
    alone = cuflash.flash_attn_func(q[s:e][None], k[t:u][None], v[t:u][None], causal=True,
                                    block_mask=cuflash.BlockMask.from_dense(np.array([[True, False]]), 64, 256))[0]
    assert torch.equal(out[s:e], alone)


def test_varlen_jax_grad_and_jit_match_torch():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp
    import torch

    if jax.default_backend() != "gpu":
        pytest.skip("JAX has no GPU backend here")
    lens = [70, 1, 130]
    q, k, v, dout = (randn((sum(lens), 2, 64), torch.bfloat16, 50 + i) for i in range(4))
    args = (cu(lens), cu(lens), max(lens), max(lens))
    expected = grads(lambda a, b, c: cuflash.flash_attn_varlen_func(a, b, c, *args, causal=True), q, k, v, dout)
    qj, kj, vj, doj = (jnp.asarray(x.float().cpu().numpy()).astype(jnp.bfloat16) for x in (q, k, v, dout))
    cu_j = jnp.asarray(args[0].cpu().numpy())

    def loss(a, b, c):
        out = cuflash.flash_attn_varlen_func(a, b, c, cu_j, cu_j, max(lens), max(lens), causal=True)
        return (out.astype(jnp.float32) * doj.astype(jnp.float32)).sum()

    out_j = jax.jit(lambda a, b, c: cuflash.flash_attn_varlen_func(a, b, c, cu_j, cu_j, 130, 130, causal=True))(qj, kj, vj)
    np.testing.assert_array_equal(np.asarray(out_j.astype(jnp.float32)), expected[0].detach().float().cpu().numpy())
    # A window is the kernels' band, aligned per sequence on the device: traced cu_seqlens work under jit.
    window = cuflash.flash_attn_varlen_func(q, k, v, *args, window_size=(20, 3))
    window_j = jax.jit(lambda a, b, c, cu: cuflash.flash_attn_varlen_func(a, b, c, cu, cu, 130, 130,
                                                                          window_size=(20, 3)))(qj, kj, vj, cu_j)
    np.testing.assert_array_equal(np.asarray(window_j.astype(jnp.float32)), window.float().cpu().numpy())
    for fn in (jax.grad(loss, argnums=(0, 1, 2)), jax.jit(jax.grad(loss, argnums=(0, 1, 2)))):
        for ours, exp in zip(fn(qj, kj, vj), expected[1:]):
            np.testing.assert_array_equal(np.asarray(ours.astype(jnp.float32)), exp.float().cpu().numpy())
