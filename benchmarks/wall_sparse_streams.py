"""Wall time (CUDA events, median of 30) of forward+backward: cuflash with its dQ kernel beside the dK/dV
kernel (two streams, the default) and queued after it (CUFLASH_BWD_STREAMS=1), and compiled FlexAttention,
in three alternating rounds, on the bench-sparse masks (16K, 16 heads, d=128, bf16); then the kernel
timeline of three cuflash calls on the first mask. Session 9, H100: results/h100-sparse-streams-wall.txt.

    PYTHONPATH=src python benchmarks/wall_sparse_streams.py [MASK ...]
"""
import os, sys, statistics, torch
from torch.profiler import profile, ProfilerActivity
from cuflash import _bench_sparse as B

s, d = 16384, 128
h = 2048 // d
pats = sys.argv[1:] or list(B.MASKS)
q, k, v, do = (torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
qf, kf, vf, dof = (x.transpose(1, 2).contiguous() for x in (q, k, v, do))
for x in (q, k, v, qf, kf, vf):
    x.requires_grad_()
def wall(fn, n=30):
    for _ in range(5): fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record(); fn(); b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)
def timeline(fn):
    for _ in range(3): fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(3): fn()
        torch.cuda.synchronize()
    ks = sorted((e.time_range.start, e.time_range.end, e.name[:60]) for e in p.events() if e.device_type.name == "CUDA")
    t0 = ks[0][0]
    for a, b, n in ks:
        print(f"   {a - t0:9.1f} {b - t0:9.1f} {b - a:8.1f}  {n}")
for pat in pats:
    m, mod = B.build_mask(pat, s)
    cu = B.cuflash_fn(m)
    fx = B.flex_fn(B.flex_block_mask(m, mod))
    fc = lambda: torch.autograd.grad(cu(q, k, v), (q, k, v), do)
    ff = lambda: torch.autograd.grad(fx(qf, kf, vf), (qf, kf, vf), dof)
    res = {"cu2": [], "cu1": [], "flex": []}
    for r in range(3):
        os.environ["CUFLASH_BWD_STREAMS"] = "2"; res["cu2"].append(wall(fc))
        os.environ["CUFLASH_BWD_STREAMS"] = "1"; res["cu1"].append(wall(fc))
        res["flex"].append(wall(ff))
    os.environ["CUFLASH_BWD_STREAMS"] = "2"
    print(pat, {k: " ".join(f"{x:.3f}" for x in v) for k, v in res.items()}, flush=True)
    if pat == pats[0]:
        timeline(fc)
