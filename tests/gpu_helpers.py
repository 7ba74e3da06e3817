"""Shared pieces of the GPU tests: random inputs, the float64 reference, the same-dtype baseline and
FlashAttention's tolerance rule."""
import math
import zlib

import numpy as np

import cuflash


def randn(shape, dtype, seed, device="cuda"):
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)


def reference(q, k, v, causal, scale=None, mask=None, alibi_slopes=None, softcap=0.0):
    """float64 (out, lse) for torch tensors, through CuPy; mask: an element mask (see plain_attention)."""
    import cupy
    import torch

    from cuflash.reference import attention_reference

    out, lse = attention_reference(*(cupy.from_dlpack(x.detach().double().contiguous()) for x in (q, k, v)),
                                   causal=causal, softmax_scale=scale,
                                   mask=None if mask is None else cupy.asarray(mask),
                                   alibi_slopes=None if alibi_slopes is None else cupy.from_dlpack(alibi_slopes),
                                   softcap=softcap)
    return torch.from_dlpack(out), torch.from_dlpack(lse)


def plain_attention(q, k, v, causal, scale=None, mask=None, alibi_slopes=None, softcap=0.0, dropout_mask=None,
                    dropout_p=0.0):
    """The same math done plainly in the input dtype (scores, softmax and products in q.dtype).
    mask: bool (B', H', seqlen_q, seqlen_k) NumPy array, True where a query sees a key;
    alibi_slopes: a float32 tensor (nheads,) or (batch, nheads); softcap: FlashAttention-2's;
    dropout_mask: bool like mask, True where a probability is kept (reference.dropout_keep_mask)."""
    import torch

    d = q.shape[-1]
    scale = 1 / math.sqrt(d) if scale is None else scale
    group = q.shape[2] // k.shape[2]
    qh, kh, vh = (x.transpose(1, 2) for x in (q, k, v))
    kh, vh = kh.repeat_interleave(group, 1), vh.repeat_interleave(group, 1)
    s = (qh @ kh.transpose(-1, -2)) * scale
    if softcap or alibi_slopes is not None:
        # Score modifications and the softmax in float32, as the kernels do: ALiBi biases reach
        # hundreds, and rounding them in bf16 would make the 2x rule meaningless.
        s = s.to(torch.promote_types(s.dtype, torch.float32))  # float64 stays float64
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if alibi_slopes is not None:
        from cuflash.reference import alibi_bias

        bias = alibi_bias(alibi_slopes.cpu().numpy(), q.shape[0], q.shape[1], k.shape[1])
        s = s + torch.as_tensor(bias, device=q.device, dtype=s.dtype)
    if causal:
        sq, sk = q.shape[1], k.shape[1]
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    if mask is not None:
        s = s.masked_fill(~torch.as_tensor(mask, device=q.device), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)
    if dropout_mask is not None:
        keep = (65536 - cuflash._dispatch.dropout_threshold(dropout_p)) / 65536
        p = torch.where(torch.as_tensor(dropout_mask, device=q.device), p / keep, 0.0)
    return (p.to(vh.dtype) @ vh).transpose(1, 2)


def assert_close_2x(out, ref, plain, what="out", floor=None):
    """FlashAttention's rule: max error vs float64 at most 2x the same-dtype baseline's (+ floor). The
    default floor is 1e-5 for fp16/bf16 (errors near 1e-3) and four float32 ulps of the largest
    reference value for float32, whose errors are near 1e-6: a fixed 1e-5 would hide a 5x loss."""
    import torch

    assert not torch.isnan(out).any(), f"{what} has NaN (unwritten or bad masking)"
    if floor is None:
        big = ref.abs().max().item() if out.numel() else 0.0
        floor = 4 * 2.0**-24 * max(1.0, big) if out.dtype == torch.float32 else 1e-5
    err = (out.double() - ref).abs().max().item() if out.numel() else 0.0
    base = (plain.double() - ref).abs().max().item() if out.numel() else 0.0
    assert err <= 2 * base + floor, f"{what}: max error {err:.3g} > 2 x baseline {base:.3g} + {floor:.3g}"
    return err, base


def assert_lse_close(lse, ref_lse):
    import torch

    assert not torch.isnan(lse).any(), "lse has NaN"
    lse, ref_lse = lse.double(), ref_lse
    neg = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), neg), "lse = -inf exactly where a row sees no key"
    finite = ~neg
    if finite.any():
        err = (lse[finite] - ref_lse[finite]).abs().max().item()
        assert err <= 1e-3 * max(1.0, ref_lse[finite].abs().max().item()), f"lse error {err}"


def grads(fn, q, k, v, dout):
    """(out, dq, dk, dv) of fn through torch autograd."""
    import torch

    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = fn(q, k, v)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    return out, dq, dk, dv


def check_grads(q, k, v, causal, dout=None, mask=None, alibi_slopes=None, softcap=0.0, dropout_p=0.0,
                dropout_seed=None, floors=None, **kwargs):
    """cuflash's out, dq, dk, dv (called with **kwargs, e.g. block_mask) against float64 autograd,
    within 2x of plain same-dtype autograd; mask is the equivalent element mask. With dropout_p, the
    baselines drop what reference.dropout_keep_mask(dropout_seed, 0, ...) drops. floors: absolute
    error allowances by output name (default: assert_close_2x's)."""
    dout = randn((*q.shape[:-1], v.shape[-1]), q.dtype, 99) if dout is None else dout
    keep = None
    if dropout_p:
        from cuflash.reference import dropout_keep_mask

        keep = dropout_keep_mask(dropout_seed, 0, q.shape[0], q.shape[2], q.shape[1], k.shape[1], dropout_p)
        kwargs.update(dropout_p=dropout_p, dropout_seed=dropout_seed)

    def plain(a, b, c):
        return plain_attention(a, b, c, causal, mask=mask, alibi_slopes=alibi_slopes, softcap=softcap,
                               dropout_mask=keep, dropout_p=dropout_p)

    ref = grads(plain, *(x.double() for x in (q, k, v)), dout.double())
    base = grads(plain, q, k, v, dout)
    ours = grads(lambda a, b, c: cuflash.flash_attn_func(a, b, c, causal=causal, alibi_slopes=alibi_slopes,
                                                         softcap=softcap, **kwargs), q, k, v, dout)
    for name, o, p, r in zip(("out", "dq", "dk", "dv"), ours, base, ref):
        assert o.shape == r.shape and o.dtype == q.dtype
        assert_close_2x(o, r, p, name, (floors or {}).get(name))
    return ours


def np_to(x, dtype):
    return np.asarray(x, dtype=dtype)


SEQLENS = [(1, 1), (17, 17), (113, 203), (128, 217), (1023, 1024), (1024, 1023), (2048, 2048)]
HEADDIMS = [8, 32, 40, 64, 80, 96, 128, 160, 192, 256]


def grid(seqlens=SEQLENS, headdims=HEADDIMS, dtypes=("float16", "bfloat16")):
    """The test grid as one decorator: dtype x causal x head dim x (seqlen_q, seqlen_k)."""
    import pytest

    marks = [pytest.mark.parametrize("dtype", dtypes), pytest.mark.parametrize("causal", [False, True]),
             pytest.mark.parametrize("headdim", headdims),
             pytest.mark.parametrize("seqlens", seqlens, ids=lambda s: f"{s[0]}x{s[1]}")]

    def apply(test):
        for mark in marks:
            test = mark(test)
        return test
    return apply


def grid_inputs(dtype: str, causal: bool, headdim: int, seqlens, tag: str):
    """q, k, v for one point of the test grid; a stable seed per point (hash() is salted per run)."""
    import torch

    sq, sk = seqlens
    batch, nheads = (2, 3) if sq * sk < 2**21 else (1, 2)
    dt = getattr(torch, dtype)
    seed = zlib.crc32(repr((dtype, causal, headdim, seqlens, tag)).encode())
    return (randn((batch, sq, nheads, headdim), dt, seed), randn((batch, sk, nheads, headdim), dt, seed + 1),
            randn((batch, sk, nheads, headdim), dt, seed + 2))


def strided_inputs(layout: str, b=2, s=300, h=4, d=64):
    """q, k, v as non-contiguous views: packed QKV, (b, h, s, d) transposed, padded rows, or every
    other row of a longer V."""
    import torch

    dt = torch.bfloat16
    if layout == "qkv_packed":
        return randn((b, s, 3, h, d), dt, 1).unbind(2)
    if layout == "bhsd_transposed":
        return tuple(randn((b, h, s, d), dt, i).transpose(1, 2) for i in range(3))
    if layout == "padded_rows":
        return tuple(randn((b, s, h, d + 24), dt, i)[..., :d] for i in range(3))
    assert layout == "noncontiguous_v"
    return randn((b, s, h, d), dt, 1), randn((b, s, h, d), dt, 2), randn((b, 2 * s, h, d), dt, 3)[:, ::2]

