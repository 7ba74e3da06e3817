"""Per-kernel GPU time (torch.profiler) of cuflash forward+backward: dense causal attention against the
causal block mask, which visit the same tiles (16K tokens, 16 heads, d=128, bf16). Used for the
block-sparse backward notes in NOTES.md (session 7).

    PYTHONPATH=src python benchmarks/profile_sparse_kernels.py
"""
import torch
from torch.profiler import ProfilerActivity, profile

import cuflash
from cuflash import BlockMask

seqlen, head_dim = 16384, 128
nheads = 2048 // head_dim
q, k, v, dout = (torch.randn(1, seqlen, nheads, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(4))
q, k, v = (x.requires_grad_() for x in (q, k, v))
cases = {"dense causal": dict(causal=True), "block-mask causal": dict(block_mask=BlockMask.causal(seqlen, seqlen))}
for name, kwargs in cases.items():
    def step():
        torch.autograd.grad(cuflash.flash_attn_func(q, k, v, **kwargs), (q, k, v), dout)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    per_call = {}
    for event in prof.events():
        if event.device_type.name == "CUDA":
            per_call[event.name[:150]] = per_call.get(event.name[:150], 0) + event.device_time / 10
    print(f"== {name}: total {sum(per_call.values()):.1f} us")
    for kernel, us in sorted(per_call.items(), key=lambda item: -item[1])[:6]:
        print(f"   {us:8.1f} us  {kernel}")
