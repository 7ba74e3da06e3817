"""Host-side cost of one cuflash call (Python, validation, launches), against SDPA FLASH, on a tiny
problem whose GPU time is negligible: the forward alone, and forward+backward through torch autograd,
both by cuflash's eager path (a torch.autograd.Function) and through its torch.library custom ops
(what torch.compile uses). --profile prints cProfiles of the eager forward+backward.

    PYTHONPATH=src python benchmarks/call_overhead.py [--profile]
"""
import cProfile
import pstats
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import cuflash
from cuflash import torch as cf_torch

q, k, v = (torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
dout = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
dout_t = dout.transpose(1, 2)


def per_call_us(fn, n=1000):
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def cuflash_fwd():
    with torch.no_grad():
        cuflash.flash_attn_func(q, k, v, causal=True)


def cuflash_fwd_bwd():
    torch.autograd.grad(cuflash.flash_attn_func(q, k, v, causal=True), (q, k, v), dout)


def sdpa_fwd():
    with torch.no_grad(), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)


def sdpa_fwd_bwd():
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        torch.autograd.grad(F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), (qt, kt, vt), dout_t)


print(f"cuflash forward (no grad)            {per_call_us(cuflash_fwd):7.1f} us/call")
print(f"cuflash forward+backward, eager      {per_call_us(cuflash_fwd_bwd):7.1f} us/call")
eager = getattr(cf_torch, "_eager", None)  # the switch between the eager path and the custom ops
if eager is None:
    print("cuflash forward+backward, custom ops  (not measured: cuflash.torch has no _eager switch)")
else:
    cf_torch._eager = lambda *tensors: False
    print(f"cuflash forward+backward, custom ops {per_call_us(cuflash_fwd_bwd):7.1f} us/call")
    cf_torch._eager = eager
print(f"sdpa_flash forward (no grad)         {per_call_us(sdpa_fwd):7.1f} us/call")
print(f"sdpa_flash forward+backward          {per_call_us(sdpa_fwd_bwd):7.1f} us/call")
if "--profile" in sys.argv:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        cuflash_fwd_bwd()
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)
