"""Where cuflash and compiled FlexAttention spend a forward+backward on the bench-sparse masks (16K tokens,
16 heads, d=128, bf16). Session 9, H100.

    PYTHONPATH=src python benchmarks/profile_sparse_vs_flex.py [MASK ...]         # per kernel
    PYTHONPATH=src python benchmarks/profile_sparse_vs_flex.py --wall [MASK ...]  # wall time

Per kernel: torch.profiler, us per call (results/h100-profile-sparse-vs-flex.txt). --wall: CUDA events,
median of 30, in three alternating rounds: cuflash with its dQ kernel beside the dK/dV kernel (two
streams, the default) and after it (CUFLASH_BWD_STREAMS=1), and flex; then the kernel timeline of three
cuflash calls on the first mask (results/h100-sparse-streams-wall.txt).
"""
import os, sys, statistics, torch
from torch.profiler import profile, ProfilerActivity
from cuflash import _bench_sparse as B

wall_mode = "--wall" in sys.argv
pats = [a for a in sys.argv[1:] if a != "--wall"] or list(B.MASKS)
s, d = 16384, 128
h = 2048 // d
q, k, v, do = (torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
qf, kf, vf, dof = (x.transpose(1, 2).contiguous() for x in (q, k, v, do))  # flex's (batch, heads, seq, dim)
for x in (q, k, v, qf, kf, vf):
    x.requires_grad_()


def kernel_us(fn, calls):
    """[(start, end, name)] of the CUDA kernels of `calls` calls after warm-up, in us."""
    for _ in range(5): fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as p:
        for _ in range(calls): fn()
        torch.cuda.synchronize()
    return sorted((e.time_range.start, e.time_range.end, e.name) for e in p.events() if e.device_type.name == "CUDA")


def per_kernel(name, fn, calls=10):
    tot = {}
    for a, b, kname in kernel_us(fn, calls):
        tot[kname[:110]] = tot.get(kname[:110], 0) + (b - a) / calls
    print(f"== {name}: total {sum(tot.values()):.1f} us", flush=True)
    for kname, us in sorted(tot.items(), key=lambda x: -x[1])[:5]:
        print(f"   {us:8.1f} us  {kname}", flush=True)


def wall_ms(fn, n=30):
    for _ in range(5): fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for a, b in ev:
        a.record(); fn(); b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev)


for pat in pats:
    m, mod = B.build_mask(pat, s)
    cu, fx = B.cuflash_fn(m), B.flex_fn(B.flex_block_mask(m, mod))
    fc = lambda: torch.autograd.grad(cu(q, k, v), (q, k, v), do)
    ff = lambda: torch.autograd.grad(fx(qf, kf, vf), (qf, kf, vf), dof)
    if not wall_mode:
        per_kernel(f"{pat} cuflash", fc)
        per_kernel(f"{pat} flex", ff)
        continue
    res = {"cu2": [], "cu1": [], "flex": []}
    for _ in range(3):
        os.environ["CUFLASH_BWD_STREAMS"] = "2"; res["cu2"].append(wall_ms(fc))
        os.environ["CUFLASH_BWD_STREAMS"] = "1"; res["cu1"].append(wall_ms(fc))
        res["flex"].append(wall_ms(ff))
    os.environ["CUFLASH_BWD_STREAMS"] = "2"
    print(pat, {key: " ".join(f"{x:.3f}" for x in val) for key, val in res.items()}, flush=True)
    if pat == pats[0]:
        ks = kernel_us(fc, 3)
        for a, b, kname in ks:
            print(f"   {a - ks[0][0]:9.1f} {b - ks[0][0]:9.1f} {b - a:8.1f}  {kname[:60]}")
