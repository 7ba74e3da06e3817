"""The warp-specialised Hopper forward (kernels/flash_fwd_ws.cu) under several tile settings
(_dispatch.WS_FWD_TILES; {} = the mma.sync forward) against SDPA FLASH, in one process on the same
inputs (CUDA events, warm-up, median of 30). Prints TFLOP/s per shape (bf16; batch x seqlen = 16384
tokens, hidden 2048). Output: results/h100-tune-fwd-ws.txt, results/h200-tune-fwd-ws.txt; d=64 after the forward's products were
unserialised: results/h100-tune-fwd-ws-d64-s9.txt.

    PYTHONPATH=src python benchmarks/tune_fwd_ws.py
"""
import torch, torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
import cuflash
from cuflash import _dispatch

def timeit(fn, reps=30):
    for _ in range(3): fn()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in ev:
        a.record(); fn(); b.record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in ev)[reps // 2]

configs = {"mma.sync": {}, "ws2": {64: (128, 128, 8, 2)}, "ws3": {64: (128, 128, 8, 3), 128: (128, 128, 8, 3)},
           "ws4": {64: (128, 128, 8, 4)}}
_dispatch.WS_FWD_MIN_SEQLEN_K.clear()  # every length takes the configuration under test
for d in (64, 128):
    if d == 128: configs = {k: v for k, v in configs.items() if k in ('mma.sync', 'ws3')}
    for causal in (False, True):
        for s in (1024, 4096, 16384):
            b, h = 16384 // s, 2048 // d
            q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
            flops = 4 * b * s * s * h * d / (2 if causal else 1)
            row = {}
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                row["flash"] = timeit(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
            for name, tiles in configs.items():
                _dispatch.WS_FWD_TILES.clear(); _dispatch.WS_FWD_TILES.update(tiles); _dispatch.choose_fwd.cache_clear()
                row[name] = timeit(lambda: cuflash.flash_attn_func(q, k, v, causal=causal))
            print(f"d={d} causal={causal!s:5} s={s:5} " + " ".join(f"{n} {flops / t / 1e9:6.1f}" for n, t in row.items()), flush=True)
