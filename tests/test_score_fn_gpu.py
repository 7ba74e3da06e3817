"""User score and mask functions on the GPU: forward, log-sum-exp and gradients against float64, with
FlashAttention's 2x rule (the plain baseline: the same math in the input dtype, scores changed in float32)."""
import math

import pytest

import cuflash
from cuflash import MaskMod, ScoreMod, _compile

from gpu_helpers import assert_close_2x, randn

pytestmark = pytest.mark.gpu
torch = pytest.importorskip("torch")


def attention(q, k, v, score=None, mask=None, scale=None, compute=None):
    """softmax(score(q kᵀ * scale)) v in `compute` (float64: the reference; None: q's dtype with the scores
    changed in float32); score(s, b, h, i, j) and mask(b, h, i, j) on broadcast index tensors."""
    dt = compute or q.dtype
    d, group = q.shape[-1], q.shape[2] // k.shape[2]
    scale = 1 / math.sqrt(d) if scale is None else scale
    qh, kh, vh = (x.to(dt).transpose(1, 2) for x in (q, k, v))
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    s = (qh @ kh.transpose(-1, -2)) * scale
    s = s.to(torch.promote_types(s.dtype, torch.float32))
    bi, hi, ii, ji = (torch.arange(n, device=q.device).view(*[n if a == i else 1 for a in range(4)])
                      for i, n in enumerate(s.shape))
    if score is not None:
        s = score(s, bi, hi, ii, ji)
    if mask is not None:
        s = s.masked_fill(~mask(bi, hi, ii, ji), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0).to(dt)
    return (p @ vh).transpose(1, 2), lse


def check(q, k, v, score_mod=None, mask_mod=None, score=None, mask=None, grads=True):
    q, k, v = (x.detach().requires_grad_(grads) for x in (q, k, v))
    out, lse, _ = cuflash.flash_attn_func(q, k, v, score_mod=score_mod, mask_mod=mask_mod, return_attn_probs=True)
    ref, ref_lse = attention(q, k, v, score, mask, compute=torch.float64)
    plain, _ = attention(q, k, v, score, mask)
    assert_close_2x(out, ref, plain)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), finite)
    assert (lse[finite].double() - ref_lse[finite]).abs().max() < 1e-3
    if not grads:
        return
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout.double())
    base = torch.autograd.grad(plain, (q, k, v), dout)
    for name, g, w, b in zip("qkv", got, want, base):
        assert_close_2x(g, w, b, f"d{name}")


SHAPES = [(2, 113, 203, 4, 2, 64), (1, 256, 256, 2, 2, 128), (2, 77, 77, 3, 1, 96)]


def inputs(shape, dtype=torch.bfloat16, seed=0):
    b, sq, sk, h, hk, d = shape
    return randn((b, sq, h, d), dtype, seed), randn((b, sk, hk, d), dtype, seed + 1), randn((b, sk, hk, d), dtype, seed + 2)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_additive_bias(shape):
    q, k, v = inputs(shape)
    b, sq, sk, h = shape[:4]
    bias = torch.randn(b, h, sq, sk, device="cuda", dtype=torch.bfloat16)
    check(q, k, v, ScoreMod("score + bias[b][h][q][kv]", bias=bias),
          score=lambda s, bi, hi, ii, ji: s + bias.float()[bi, hi, ii, ji])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_relative_position_table_broadcast_over_batch(shape):
    q, k, v = inputs(shape, seed=3)
    b, sq, sk, h = shape[:4]
    table = torch.randn(h, sq + sk - 1, device="cuda")
    check(q, k, v, ScoreMod("score + rel[h][q - kv + last]", rel=table, last=sk - 1),
          score=lambda s, bi, hi, ii, ji: s + table[hi, ii - ji + sk - 1])


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_document_mask_and_fully_masked_rows(shape):
    q, k, v = inputs(shape, seed=6)
    b, sq, sk = shape[:3]
    doc_q = torch.randint(0, 3, (sq,), device="cuda", dtype=torch.int32).sort().values
    doc_k = torch.randint(0, 3, (sk,), device="cuda", dtype=torch.int32).sort().values
    doc_q[:5] = 7  # rows that see no key: zeros and a log-sum-exp of -inf
    check(q, k, v, mask_mod=MaskMod("dq[q] == dk[kv]", dq=doc_q, dk=doc_k),
          mask=lambda bi, hi, ii, ji: doc_q[ii] == doc_k[ji])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prefix_lm_and_alibi_as_snippets(dtype):
    q, k, v = inputs((2, 300, 300, 4, 4, 64), dtype, seed=9)
    slopes = torch.rand(4, device="cuda")
    check(q, k, v, ScoreMod("score - slope[h] * fabsf((float)(q - kv))", slope=slopes),
          MaskMod("kv <= q || kv < prefix", prefix=64),
          score=lambda s, bi, hi, ii, ji: s - slopes[hi] * (ii - ji).abs(),
          mask=lambda bi, hi, ii, ji: (ji <= ii) | (ji < 64))


def test_softcap_as_a_snippet_with_its_grad_matches_the_builtin():
    q, k, v = inputs((2, 200, 200, 4, 4, 128), seed=12)
    mod = ScoreMod("cap * tanhf(score / cap)", grad="1.f - tanhf(score / cap) * tanhf(score / cap)", cap=5.0)
    check(q, k, v, mod, score=lambda s, *_: 5.0 * torch.tanh(s / 5.0))


def test_a_new_scalar_value_compiles_nothing():
    q, k, v = inputs((1, 128, 128, 2, 2, 64), seed=15)
    cuflash.flash_attn_func(q, k, v, score_mod=ScoreMod("score * t", t=0.5))
    loaded = len(_compile._loaded)
    out = cuflash.flash_attn_func(q, k, v, score_mod=ScoreMod("score * t", t=2.0))
    assert len(_compile._loaded) == loaded
    ref, _ = attention(q, k, v, lambda s, *_: s * 2.0, compute=torch.float64)
    assert_close_2x(out, ref, attention(q, k, v, lambda s, *_: s * 2.0)[0])


def test_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    q, k, v = inputs((1, 150, 150, 2, 2, 64), seed=18)
    bias = torch.randn(1, 2, 150, 150, device="cuda")
    out = cuflash.flash_attn_func(*(cupy.from_dlpack(x) for x in (q, k, v)),
                                  score_mod=ScoreMod("score + bias[b][h][q][kv]", bias=cupy.from_dlpack(bias)))
    want = cuflash.flash_attn_func(q, k, v, score_mod=ScoreMod("score + bias[b][h][q][kv]", bias=bias))
    assert torch.equal(torch.from_dlpack(out), want)


def test_gradients_of_a_bias_and_a_relative_table():
    q, k, v = (x.requires_grad_() for x in inputs((2, 113, 203, 4, 2, 64), seed=27))
    bias = torch.randn(4, 113, 203, device="cuda", requires_grad=True)  # broadcast over the batch
    rel = torch.randn(4, 113 + 203 - 1, device="cuda", requires_grad=True)
    mod = ScoreMod("score + bias[h][q][kv] + rel[h][q - kv + last]", bias=bias, rel=rel, last=202)
    out = cuflash.flash_attn_func(q, k, v, score_mod=mod)
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, bias, rel), dout)

    def run(compute):
        leaves = [x.detach().to(compute or x.dtype).requires_grad_() for x in (q, k, v)]
        b2, r2 = (x.detach().to(compute or torch.float32).requires_grad_() for x in (bias, rel))
        o, _ = attention(*leaves, lambda s, bi, hi, ii, ji: s + b2[hi, ii, ji] + r2[hi, ii - ji + 202], compute=compute)
        return o, torch.autograd.grad(o, (*leaves, b2, r2), dout.to(o.dtype))

    ref, want = run(torch.float64)
    plain, base = run(None)
    assert_close_2x(out, ref, plain)
    for name, g, w, b in zip(("dq", "dk", "dv", "dbias", "drel"), got, want, base):
        assert_close_2x(g, w, b, name)


@pytest.mark.parametrize("code, causal", [("score * w[h] + bias[h][q][kv]", False), ("w[q][kv] * score", True)])
def test_gradients_of_a_factor_of_the_score(code, causal):
    """A captured array that multiplies the score: its gradient sums dS * score (the dS kernel also stores
    the scores it saw; pairs a causal mask skips add nothing); the derivative with respect to score is
    derived (w[h], w[q][kv])."""
    shape = (2, 113, 203, 4, 2, 64)
    q, k, v = (x.requires_grad_() for x in inputs(shape, seed=33))
    per_head = "w[h]" in code
    w = (torch.rand(*((4,) if per_head else (113, 203)), device="cuda") + 0.5).requires_grad_()
    bias = torch.randn(4, 113, 203, device="cuda", requires_grad=True)
    captures = dict(w=w, bias=bias) if "bias" in code else dict(w=w)
    out = cuflash.flash_attn_func(q, k, v, causal=causal, score_mod=ScoreMod(code, **captures))
    dout = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, *captures.values()), dout)

    def run(compute):
        leaves = [x.detach().to(compute or x.dtype).requires_grad_() for x in (q, k, v)]
        arrays = {n: x.detach().to(compute or torch.float32).requires_grad_() for n, x in captures.items()}
        w2, b2 = arrays["w"], arrays.get("bias")
        score = ((lambda s, bi, hi, ii, ji: s * w2[hi] + b2[hi, ii, ji]) if per_head
                 else (lambda s, bi, hi, ii, ji: w2[ii, ji] * s))
        mask = (lambda bi, hi, ii, ji: ji <= ii + 203 - 113) if causal else None
        o, _ = attention(*leaves, score, mask, compute=compute)
        return o, torch.autograd.grad(o, (*leaves, *arrays.values()), dout.to(o.dtype))

    ref, want = run(torch.float64)
    plain, base = run(None)
    assert_close_2x(out, ref, plain)
    for name, g, w_, b in zip(("dq", "dk", "dv", *(f"d{n}" for n in captures)), got, want, base):
        assert_close_2x(g, w_, b, name)


def test_a_captured_tensor_used_otherwise_refuses_its_gradient():
    q, k, v = (x.requires_grad_() for x in inputs((1, 64, 64, 2, 2, 64)))
    scale = torch.ones(64, 64, device="cuda", requires_grad=True)
    with pytest.raises(NotImplementedError, match="'scale'"):
        cuflash.flash_attn_func(q, k, v, score_mod=ScoreMod("score / scale[q][kv]", scale=scale))


def sink_attention(q, k, v, sinks, causal, compute=None, softmax_fp32=False):
    """softmax over [scores, sink_h] then P V without the sink's column; (out, lse) as attention(). Without
    `compute`, plainly in q's dtype (scores, the sink logit, softmax and products), as plain_attention and
    gpt-oss's reference implementation."""
    dt = compute or q.dtype
    d, group = q.shape[-1], q.shape[2] // k.shape[2]
    qh, kh, vh = (x.to(dt).transpose(1, 2) for x in (q, k, v))
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    s = (qh @ kh.transpose(-1, -2)) / math.sqrt(d)
    if softmax_fp32:  # scores, the sink logit and the softmax in float32 (a stricter baseline)
        s = s.float()
    if causal:
        sq, sk = s.shape[-2:]
        hide = torch.arange(sk, device=q.device)[None] > torch.arange(sq, device=q.device)[:, None] + sk - sq
        s = s.masked_fill(hide, float("-inf"))
    sink = sinks.to(s.dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)
    full = torch.cat([s, sink], -1)
    p = torch.softmax(full, -1)[..., :-1].to(dt)
    return (p @ vh).transpose(1, 2), torch.logsumexp(full, -1)


@pytest.mark.parametrize("shape, causal", [((2, 113, 203, 4, 2, 64), False), ((2, 113, 203, 4, 2, 64), True),
                                           ((1, 300, 100, 2, 2, 128), False), ((1, 300, 100, 2, 2, 128), True)],
                         ids=str)
def test_sinks_forward_and_gradients(shape, causal):
    q, k, v = (x.requires_grad_() for x in inputs(shape, seed=21))
    sinks = (torch.randn(shape[3], device="cuda", generator=torch.Generator("cuda").manual_seed(22)) * 2).requires_grad_()
    out, lse, _ = cuflash.flash_attn_func(q, k, v, causal=causal, sinks=sinks, return_attn_probs=True)
    ref, ref_lse = sink_attention(q, k, v, sinks.double(), causal, torch.float64)
    plain, _ = sink_attention(q, k, v, sinks, causal)
    assert_close_2x(out, ref, plain)
    assert (lse.double() - ref_lse).abs().max() < 1e-3  # rows with no key: the sink's logit
    dout = torch.randn(out.shape, device="cuda", dtype=out.dtype, generator=torch.Generator("cuda").manual_seed(23))
    got = torch.autograd.grad(out, (q, k, v, sinks), dout)
    want = torch.autograd.grad(ref, (q, k, v, sinks), dout.double())
    base = torch.autograd.grad(plain, (q, k, v, sinks), dout)
    for name, g, w, b in zip(("dq", "dk", "dv", "dsinks"), got, want, base):
        assert_close_2x(g, w, b, name)
    # d(sinks) from the dQ kernel's fp32 rowsum(P dP): within 2x of a baseline whose softmax runs in fp32 too
    strict, _ = sink_attention(q, k, v, sinks, causal, softmax_fp32=True)
    assert_close_2x(got[3], want[3], torch.autograd.grad(strict, sinks, dout)[0], "dsinks (fp32 softmax)")


def test_jax_score_mod_mask_mod_and_sinks_inside_jit_with_grad():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    q, k, v = inputs((1, 130, 130, 2, 2, 64), torch.float16, seed=24)
    bias = torch.randn(2, 130, 130, device="cuda")
    sinks = torch.randn(2, device="cuda")
    want = cuflash.flash_attn_func(q, k, v, score_mod=ScoreMod("score + bias[h][q][kv]", bias=bias),
                                   mask_mod=MaskMod("kv <= q + w", w=7), sinks=sinks)
    qj, kj, vj, bj, sj = (jnp.asarray(x.cpu().numpy()) for x in (q, k, v, bias, sinks))

    def loss(qj, kj, vj, sj):
        out = cuflash.flash_attn_func(qj, kj, vj, score_mod=ScoreMod("score + bias[h][q][kv]", bias=bj),
                                      mask_mod=MaskMod("kv <= q + w", w=7), sinks=sj)
        return out.astype(jnp.float32).sum(), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(qj, kj, vj, sj)
    assert torch.equal(torch.from_dlpack(out), want)
    qt, kt, vt, st = (x.detach().requires_grad_() for x in (q, k, v, sinks))
    out_t = cuflash.flash_attn_func(qt, kt, vt, score_mod=ScoreMod("score + bias[h][q][kv]", bias=bias),
                                    mask_mod=MaskMod("kv <= q + w", w=7), sinks=st)
    torch_grads = torch.autograd.grad(out_t.float().sum(), (qt, kt, vt, st))
    for g, t in zip(grads, torch_grads):
        assert torch.allclose(torch.from_dlpack(g).float(), t.float(), rtol=1e-3, atol=1e-3)


def test_jax_gradients_of_a_bias_and_a_relative_table_inside_jit():
    """jax.grad of captured arrays (the dS kernel, then the reductions in JAX) against PyTorch's, which
    test_gradients_of_a_bias_and_a_relative_table holds to the float64 reference; an array jax.grad leaves
    alone costs nothing and may be used in any way, one it differentiates must be an additive term."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    q, k, v = (x.requires_grad_() for x in inputs((2, 113, 203, 4, 2, 64), seed=31))
    bias = torch.randn(4, 113, 203, device="cuda", requires_grad=True)
    rel = torch.randn(4, 113 + 203 - 1, device="cuda", requires_grad=True)
    code = "score + bias[h][q][kv] - rel[h][q - kv + last]"
    out = cuflash.flash_attn_func(q, k, v, score_mod=ScoreMod(code, bias=bias, rel=rel, last=202))
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, k, v, bias, rel), dout)
    qj, kj, vj, bj, rj, dj = (jnp.asarray(x.detach().float().cpu().numpy()).astype(str(x.dtype).split(".")[1])
                              for x in (q, k, v, bias, rel, dout))

    @jax.jit
    def grads(qj, kj, vj, bj, rj):
        def loss(qj, kj, vj, bj, rj):
            o = cuflash.flash_attn_func(qj, kj, vj, score_mod=ScoreMod(code, bias=bj, rel=rj, last=202))
            return (o.astype(jnp.float32) * dj.astype(jnp.float32)).sum()
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(qj, kj, vj, bj, rj)

    got = grads(qj, kj, vj, bj, rj)
    for name, g, w in zip(("dq", "dk", "dv", "dbias", "drel"), got, want):
        assert g.shape == tuple(w.shape) and str(g.dtype) == str(w.dtype).split(".")[1], name
        torch.testing.assert_close(torch.from_dlpack(g).float(), w.float(), rtol=2e-3, atol=2e-3, msg=name)

    scale = jnp.ones((113, 203), jnp.float32)
    mod = lambda sc: ScoreMod("score / scale[q][kv]", scale=sc)  # noqa: E731
    only_q = jax.grad(lambda qj: cuflash.flash_attn_func(qj, kj, vj, score_mod=mod(scale)).astype(jnp.float32).sum())
    assert only_q(qj).shape == qj.shape
    with pytest.raises(NotImplementedError, match="'scale'"):
        jax.grad(lambda sc: cuflash.flash_attn_func(qj, kj, vj, score_mod=mod(sc)).astype(jnp.float32).sum())(scale)


def test_jax_gradient_of_a_factor_of_the_score_inside_jit():
    """jax.grad of a per-head factor of the score (dS times the scores, reduced in JAX) against PyTorch's,
    which test_gradients_of_a_factor_of_the_score holds to the float64 reference."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    q, k, v = (x.requires_grad_() for x in inputs((2, 113, 203, 4, 2, 64), seed=35))
    w = (torch.rand(4, device="cuda") + 0.5).requires_grad_()
    code = "score * w[h] - 0.25f * fabsf(q - kv)"
    out = cuflash.flash_attn_func(q, k, v, causal=True, score_mod=ScoreMod(code, w=w))
    dout = torch.randn_like(out)
    want = torch.autograd.grad(out, (q, w), dout)
    qj, kj, vj, wj, dj = (jnp.asarray(x.detach().float().cpu().numpy()).astype(str(x.dtype).split(".")[1])
                          for x in (q, k, v, w, dout))

    @jax.jit
    def grads(qj, wj):
        def loss(qj, wj):
            o = cuflash.flash_attn_func(qj, kj, vj, causal=True, score_mod=ScoreMod(code, w=wj))
            return (o.astype(jnp.float32) * dj.astype(jnp.float32)).sum()
        return jax.grad(loss, argnums=(0, 1))(qj, wj)

    for name, g, w_ in zip(("dq", "dw"), grads(qj, wj), want):
        assert g.shape == tuple(w_.shape), name
        torch.testing.assert_close(torch.from_dlpack(g).float(), w_.float(), rtol=2e-3, atol=2e-3, msg=name)


def test_torch_compile_with_a_bias_gradient_and_sinks():
    q, k, v = (x.requires_grad_() for x in inputs((1, 256, 256, 2, 2, 64), seed=30))
    bias = torch.randn(2, 256, 256, device="cuda", requires_grad=True)
    sinks = torch.randn(2, device="cuda", requires_grad=True)

    def f(q, k, v, bias, sinks):
        return cuflash.flash_attn_func(q, k, v, score_mod=ScoreMod("score + bias[h][q][kv]", bias=bias),
                                       mask_mod=MaskMod("kv <= q"), sinks=sinks)

    eager = f(q, k, v, bias, sinks)
    compiled = torch.compile(f, fullgraph=True)(q, k, v, bias, sinks)
    assert torch.equal(eager, compiled)
    dout = torch.randn_like(eager)
    want = torch.autograd.grad(eager, (q, k, v, bias, sinks), dout)
    got = torch.autograd.grad(compiled, (q, k, v, bias, sinks), dout)
    for g, w in zip(got[:4], want[:4]):
        assert torch.equal(g, w)
    torch.testing.assert_close(got[4], want[4], rtol=1e-5, atol=1e-6)  # d(sinks): reductions inductor reorders


@pytest.mark.parametrize("blocks", [(128, 128), (64, 128)])
def test_block_mask_from_a_mask_function_matches_the_predicate_builder(blocks):
    import time

    import numpy as np

    from cuflash import BlockMask

    doc = torch.sort(torch.randint(0, 5, (1000,), device="cuda", dtype=torch.int32)).values
    got = BlockMask.from_cuda(MaskMod("doc[q] == doc[kv] && kv <= q", doc=doc), 1000, 1000, *blocks)
    d = doc.cpu().numpy()
    want = BlockMask.from_predicate(lambda b, h, q, kv: (d[np.minimum(q, 999)] == d[np.minimum(kv, 999)]) & (kv <= q),
                                    1, 1, 1000, 1000, *blocks)
    for field in ("full_count", "full_index", "partial_count", "partial_index", "t_full_index", "t_partial_index"):
        assert np.array_equal(getattr(got, field), getattr(want, field)), field
    assert np.array_equal(got.to_element_mask(), want.to_element_mask())
    long_doc = torch.sort(torch.randint(0, 64, (65536,), device="cuda", dtype=torch.int32)).values
    mod = MaskMod("doc[q] == doc[kv]", doc=long_doc)
    BlockMask.from_cuda(mod, 65536, 65536)  # compiles
    t0 = time.perf_counter()
    BlockMask.from_cuda(mod, 65536, 65536)
    print(f"64K x 64K document mask from a snippet: {(time.perf_counter() - t0) * 1e3:.1f} ms")
