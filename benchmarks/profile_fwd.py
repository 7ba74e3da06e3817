"""One cuflash forward and one SDPA FLASH forward on the same inputs, for a profiler (ncu) to compare.

    ncu --section SpeedOfLight --section WarpStateStats python benchmarks/profile_fwd.py --seqlen 1024
"""
import argparse

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import cuflash

ap = argparse.ArgumentParser()
ap.add_argument("--seqlen", type=int, default=1024)
ap.add_argument("--headdim", type=int, default=128)
ap.add_argument("--causal", action="store_true")
args = ap.parse_args()
s, d = args.seqlen, args.headdim
b, h = 16384 // s, 2048 // d
q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
for _ in range(2):
    cuflash.flash_attn_func(q, k, v, causal=args.causal)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=args.causal)
torch.cuda.synchronize()
