"""One forward+backward of cuflash and of FlexAttention (compiled) with the same block mask, inside a
profiler range, for Nsight Compute (16K tokens, 16 heads, d=128, bf16):

    PYTHONPATH=src ncu --profile-from-start off --section SpeedOfLight --section WarpStateStats \
        --section MemoryWorkloadAnalysis --section Occupancy --section LaunchStats \
        --section ComputeWorkloadAnalysis python benchmarks/ncu_sparse_vs_flex.py [sliding_window_1024]

Output of session 12: results/h200-ncu-window-s12.txt.
"""
import sys

import torch

import cuflash
from cuflash import _bench_sparse as BS

S, H, D = 16384, 16, 128
pattern = sys.argv[1] if len(sys.argv) > 1 else "sliding_window_1024"
torch.manual_seed(0)
q, k, v, dout = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
q, k, v = (x.requires_grad_() for x in (q, k, v))
qt, kt, vt, dot = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v, dout))
mask, mask_mod = BS.build_mask(pattern, S)
flex_mask = BS.flex_block_mask(mask, mask_mod)
flex = BS.compiled_flex()
ours = lambda: torch.autograd.grad(cuflash.flash_attn_func(q, k, v, block_mask=mask), (q, k, v), dout)
theirs = lambda: torch.autograd.grad(flex(qt, kt, vt, block_mask=flex_mask), (qt, kt, vt), dot.detach())
for _ in range(3):
    ours(), theirs()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStart()
ours(), theirs()
torch.cuda.synchronize()
torch.cuda.cudart().cudaProfilerStop()
