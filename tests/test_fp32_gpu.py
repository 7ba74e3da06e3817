"""float32 inputs on the GPU (3xTF32 tensor-core products): forward and gradients against the
float64 reference, within 2x of a plain float32 implementation with TF32 off, alone and with the other
features."""
import pytest

import cuflash

from gpu_helpers import assert_close_2x, assert_lse_close, check_grads, grid_inputs, plain_attention, randn, reference

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def plain_fp32(monkeypatch):
    """A float32 baseline that really is float32 (no TF32 matmuls)."""
    import torch

    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


SEQLENS = [(1, 1), (17, 17), (113, 203), (300, 129), (1023, 1024)]


@pytest.mark.parametrize("seqlens", SEQLENS, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("headdim", [8, 40, 64, 128, 160, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_fp32_forward_and_grads(causal, headdim, seqlens):
    q, k, v = grid_inputs("float32", causal, headdim, seqlens, "fp32")
    out, lse, _ = cuflash.flash_attn_func(q, k, v, causal=causal, return_attn_probs=True)
    assert out.dtype == q.dtype
    ref, ref_lse = reference(q, k, v, causal)
    assert_close_2x(out, ref, plain_attention(q, k, v, causal))
    assert_lse_close(lse, ref_lse)
    # One key: dS = P (dP - delta) is exactly 0 in autograd, while the kernels' dP and delta = rowsum(dO O)
    # round differently, so dQ and dK hold rounding noise of dO·V's size: the fp16/bf16 floor there.
    floors = dict.fromkeys(("dq", "dk"), 1e-5) if seqlens[1] == 1 else None
    check_grads(q, k, v, causal, floors=floors)


@pytest.mark.parametrize("case", ["gqa_alibi_softcap_dropout", "gqa_alibi_dropout", "gqa_softcap_dropout",
                                  "alibi_softcap", "window", "block_mask", "odd_head_dim"])
def test_fp32_with_other_features(case):
    import torch

    from test_blocksparse_gpu import band, random_mask
    from test_features_gpu import alibi_slopes

    q = randn((2, 250, 8, 64), torch.float32, 10)
    k, v = randn((2, 270, 2, 64), torch.float32, 11), randn((2, 270, 2, 64), torch.float32, 12)
    if case.startswith("gqa_") or case == "alibi_softcap":
        kw = dict(dropout_p=0.2, dropout_seed=4) if "dropout" in case else {}
        check_grads(q, k, v, True, alibi_slopes=alibi_slopes(8) if "alibi" in case else None,
                    softcap=15.0 if "softcap" in case else 0.0, **kw)
    elif case == "window":
        check_grads(q, k, v, False, mask=band(250, 270, 64, 32)[None, None], window_size=(64, 32))
    elif case == "block_mask":
        mask, elements = random_mask(2, 8, 250, 270, 64, 64, seed=5)
        check_grads(q, k, v, False, mask=elements, block_mask=mask)
    else:
        q, k, v = (x[..., :33].contiguous() for x in (q, k, v))
        check_grads(q, k, v, True)


def test_fp32_varlen_and_cupy_backward():
    import cupy
    import torch

    from test_varlen_gpu import cu, per_sequence

    lens = [100, 1, 300]
    q, k, v, dout = (randn((sum(lens), 4, 64), torch.float32, 20 + i) for i in range(4))
    out = cuflash.flash_attn_varlen_func(q, k, v, cu(lens), cu(lens), max(lens), max(lens), causal=True)
    ref = per_sequence(lambda a, b, c: reference(a, b, c, True)[0], q, k, v, lens, lens)
    assert_close_2x(out, ref, per_sequence(lambda a, b, c: plain_attention(a, b, c, True), q, k, v, lens, lens))
    # CuPy arrays in, CuPy arrays out, explicit backward equal to torch autograd's.
    qb, kb, vb, db = (x[None] for x in (q, k, v, dout))
    qc, kc, vc, dc = (cupy.from_dlpack(x) for x in (qb, kb, vb, db))
    out_c, lse_c, _ = cuflash.flash_attn_func(qc, kc, vc, return_attn_probs=True)
    assert out_c.dtype == cupy.float32
    grads_c = cuflash.flash_attn_backward(dc, qc, kc, vc, out_c, lse_c)
    qt, kt, vt = (x.clone().requires_grad_() for x in (qb, kb, vb))
    torch.autograd.backward(cuflash.flash_attn_func(qt, kt, vt), db)
    for ours, theirs in zip(grads_c, (qt.grad, kt.grad, vt.grad)):
        assert torch.equal(torch.from_dlpack(ours), theirs)
