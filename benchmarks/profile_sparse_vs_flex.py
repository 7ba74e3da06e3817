"""Per-kernel GPU time (torch.profiler) of cuflash and compiled FlexAttention forward+backward on the
bench-sparse masks (16K tokens, 16 heads, d=128, bf16): where each spends its time. Session 9, H100:
results/h100-profile-sparse-vs-flex.txt.

    PYTHONPATH=src python benchmarks/profile_sparse_vs_flex.py [MASK ...]
"""
import sys, torch
from torch.profiler import profile, ProfilerActivity
from cuflash import _bench_sparse as B

s, d = 16384, 128
h = 2048 // d
pats = sys.argv[1:] or list(B.MASKS)
q, k, v, do = (torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
qf, kf, vf, dof = (x.transpose(1, 2).contiguous() for x in (q, k, v, do))
for x in (q, k, v, qf, kf, vf):
    x.requires_grad_()
def prof(name, fn):
    for _ in range(5): fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(10): fn()
        torch.cuda.synchronize()
    tot = {}
    for e in p.events():
        if e.device_type.name == "CUDA":
            tot[e.name[:110]] = tot.get(e.name[:110], 0) + e.device_time / 10
    print(f"== {name}: total {sum(tot.values()):.1f} us", flush=True)
    for kname, us in sorted(tot.items(), key=lambda x: -x[1])[:5]:
        print(f"   {us:8.1f} us  {kname}", flush=True)
for pat in pats:
    m, mod = B.build_mask(pat, s)
    cu = B.cuflash_fn(m)
    fx = B.flex_fn(B.flex_block_mask(m, mod))
    prof(f"{pat} cuflash", lambda: torch.autograd.grad(cu(q, k, v), (q, k, v), do))
    prof(f"{pat} flex", lambda: torch.autograd.grad(fx(qf, kf, vf), (qf, kf, vf), dof))
