"""fp32 accuracy diagnosis: cuflash's error against float64 next to plain float32 autograd and a plain float32
implementation of FlashAttention's backward formula, worst rows included (docs/kernel-design.md, float32
section; output in benchmarks/results/h100-fp32-accuracy.txt). Run from the repository root (it imports
tests/gpu_helpers.py):

    PYTHONPATH=src python benchmarks/fp32_accuracy.py
"""
import sys, torch
sys.path.insert(0, "tests")  # gpu_helpers: run from the repository root
import cuflash
from gpu_helpers import grid_inputs, reference, plain_attention, grads
torch.backends.cuda.matmul.allow_tf32 = False
for d, causal, sl in ((256, True, (300, 129)), (160, True, (300, 129)), (256, False, (300, 129)), (128, True, (1023, 1024))):
    q, k, v = grid_inputs("float32", causal, d, sl, "fp32")
    out = cuflash.flash_attn_func(q, k, v, causal=causal)
    ref, _ = reference(q, k, v, causal)
    pl = plain_attention(q, k, v, causal)
    e = (out.double() - ref).abs().amax(dim=(0, 2, 3)); eb = (pl.double() - ref).abs().amax(dim=(0, 2, 3))
    top = torch.topk(e, 5)
    print(d, causal, sl, "out err", e.max().item(), "base", eb.max().item(), "worst rows", top.indices.tolist(), [f"{x:.2e}" for x in top.values.tolist()], "base there", [f"{eb[i]:.2e}" for i in top.indices.tolist()], flush=True)
    # gradients: ours vs autograd plain fp32, and vs a plain fp32 implementation of FlashAttention's backward formula
    dout = torch.randn_like(q)
    o, dq, dk, dv = grads(lambda a, b, c: cuflash.flash_attn_func(a, b, c, causal=causal), q, k, v, dout)
    r = grads(lambda a, b, c: plain_attention(a, b, c, causal), *(x.double() for x in (q, k, v)), dout.double())
    p_ = grads(lambda a, b, c: plain_attention(a, b, c, causal), q, k, v, dout)
    # FlashAttention formula in plain fp32: P from fp32 softmax, dP = dO V^T, D = rowsum(dO * O), dS = P (dP - D)
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / d ** 0.5
    if causal:
        i = torch.arange(sl[0], device="cuda")[:, None]; j = torch.arange(sl[1], device="cuda")[None]
        s = s.masked_fill(j > i + sl[1] - sl[0], float("-inf"))
    P = torch.softmax(s, -1).nan_to_num(0.0); O = torch.einsum("bhqk,bkhd->bqhd", P, v)
    dP = torch.einsum("bqhd,bkhd->bhqk", dout, v); D = (dout * O).sum(-1).transpose(1, 2)[..., None]
    dS = P * (dP - D); dk_fa = torch.einsum("bhqk,bqhd->bkhd", dS, q) / d ** 0.5; dq_fa = torch.einsum("bhqk,bkhd->bqhd", dS, k) / d ** 0.5
    for name, ours, base, fa, ref_ in (("dq", dq, p_[1], dq_fa, r[1]), ("dk", dk, p_[2], dk_fa, r[2])):
        print("   ", name, "ours", f"{(ours.double()-ref_).abs().max().item():.2e}", "autograd fp32", f"{(base.double()-ref_).abs().max().item():.2e}", "FA-formula fp32", f"{(fa.double()-ref_).abs().max().item():.2e}", flush=True)
