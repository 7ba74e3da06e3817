"""dQ tiles of the block-mask backward on Hopper: forward + backward wall time (CUDA events, median of 20,
best of two rounds) and the dQ kernel's time (torch.profiler) under each candidate tile, in one process on
the same inputs (16K tokens, 16 heads, d=128, bf16). Output: results/persistent-dq-s12.txt (last table).

    PYTHONPATH=src python benchmarks/tune_sparse_dq.py [sliding_window_1024,butterfly,...]
"""
import dataclasses
import sys

import torch
from torch.profiler import ProfilerActivity, profile

import cuflash
from cuflash import _bench_sparse, _dispatch
from tune_fwd import median_ms

CANDIDATES = [(128, 128, 8), (64, 64, 4), (64, 128, 4), (128, 64, 8)]  # (query rows, keys, warps)
choose_bwd = _dispatch.choose_bwd


def with_dq_tile(tile):
    def chosen(*args, **kwargs):
        pre, dkdv, dq = choose_bwd(*args, **kwargs)
        if dq.sparse and dq.wgmma:
            dq = dataclasses.replace(dq, block_m=tile[0], block_n=tile[1], warps=tile[2])
        return pre, dkdv, dq
    return chosen


S, H, D = 16384, 16, 128
q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
dout = torch.randn_like(q)


def measure(kwargs):
    run = lambda: torch.autograd.grad(cuflash.flash_attn_func(q, k, v, **kwargs), (q, k, v), dout)
    wall = median_ms(run, reps=20)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            run()
        torch.cuda.synchronize()
    dq = sum(e.device_time for e in prof.events() if e.device_type.name == "CUDA" and "bwd_dq_kernel" in e.name)
    return wall, dq / 5 / 1000


patterns = sys.argv[1].split(",") if len(sys.argv) > 1 else [
    "sliding_window_1024", "butterfly", "random_0.1", "local_global", "causal"]
print(torch.cuda.get_device_name(), "| fwd+bwd wall ms / dQ kernel ms per dQ tile (rows, keys, warps)")
for pattern in patterns:
    kwargs = dict(block_mask=_bench_sparse.build_mask(pattern, S)[0])
    res = {}
    for _ in range(2):
        for tile in CANDIDATES:
            _dispatch.choose_bwd = with_dq_tile(tile)
            res.setdefault(tile, []).append(measure(kwargs))
    print(f"{pattern:20s} " + "  ".join(f"{t}: {min(w for w, _ in r):6.3f}/{min(d for _, d in r):6.3f}"
                                       for t, r in res.items()), flush=True)
_dispatch.choose_bwd = choose_bwd
