"""Host-side cost of one cuflash call (Python, validation, launch), against SDPA FLASH, on a tiny
problem whose GPU time is negligible. Optionally prints a cProfile of cuflash's calls."""
import cProfile
import pstats
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import cuflash

q, k, v = (torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.float16) for _ in range(3))


def per_call_us(fn, n=2000):
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


print(f"cuflash    {per_call_us(lambda: cuflash.flash_attn_func(q, k, v)):7.1f} us/call")
qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
    print(f"sdpa_flash {per_call_us(lambda: F.scaled_dot_product_attention(qt, kt, vt)):7.1f} us/call")
if "--profile" in sys.argv:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(2000):
        cuflash.flash_attn_func(q, k, v)
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(25)
