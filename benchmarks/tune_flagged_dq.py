"""dQ tiles of the flagged Hopper backward variants (block mask, window, dropout, softcap): forward +
backward time under each candidate tile, in one process on the same inputs (CUDA events, warm-up,
median of 15, best of two rounds; 16K tokens, 16 heads, d=128, bf16). Output:
results/h100-tune-flagged-dq.txt.

    PYTHONPATH=src python benchmarks/tune_flagged_dq.py
"""
import dataclasses

import torch

import cuflash
from cuflash import _bench_sparse, _dispatch

CANDIDATES = [(128, 64, 8), (192, 64, 12), (128, 128, 8)]  # (query rows, keys, warps) of the dQ tile
choose_bwd = _dispatch.choose_bwd


def with_dq_tile(tile):
    """choose_bwd, with `tile` for the flagged variants' dQ kernel (a block mask takes 128-row tiles)."""
    def chosen(*args, **kwargs):
        pre, dkdv, dq = choose_bwd(*args, **kwargs)
        if dq.wgmma and (dq.sparse or dq.dropout or dq.softcap or dq.band == _dispatch.WINDOW):
            m, n, warps = (128, tile[1], 8) if dq.sparse else tile
            dq = dataclasses.replace(dq, block_m=m, block_n=n, warps=warps)
        return pre, dkdv, dq
    return chosen


def fwd_bwd_ms(kwargs, seqlen=16384, nheads=16, head_dim=128, reps=15):
    q, k, v = (torch.randn(1, seqlen, nheads, head_dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    run = lambda: torch.autograd.grad(cuflash.flash_attn_func(q, k, v, **kwargs), (q, k, v), dout)
    for _ in range(3):
        run()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in events:
        a.record(); run(); b.record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in events)[reps // 2]


cases = {p: dict(block_mask=_bench_sparse.build_mask(p, 16384)[0])
         for p in ["causal", "random_0.1", "butterfly", "local_global"]}
cases.update({"dropout 0.1": dict(dropout_p=0.1), "window 1024 causal": dict(window_size=(1023, 0), causal=True),
              "softcap 30": dict(softcap=30.0)})
print(torch.cuda.get_device_name(), "| forward + backward ms, dQ tile (rows, keys, warps); block masks: 128 rows")
for name, kwargs in cases.items():
    times = {}
    for _ in range(2):
        for tile in CANDIDATES:
            _dispatch.choose_bwd = with_dq_tile(tile)
            times.setdefault(tile, []).append(fwd_bwd_ms(kwargs))
    print(f"{name:20s} " + "  ".join(f"{t}: {min(ms):7.3f}" for t, ms in times.items()), flush=True)
_dispatch.choose_bwd = choose_bwd
