"""Forward time (ms per call, mean of back-to-back calls between CUDA events) of cuflash from one source
tree, for an A/B of kernel changes: run it once per tree (a checkout of the old commit and this one),
alternating, in the same session on the same GPU. bf16, 16K tokens, 16 heads; dense masks and
the block masks of `python -m cuflash bench-sparse` (d = HEADDIM, default 128).

    python benchmarks/ab_fwd_kernels.py TREE [HEADDIM]

Used for the unserialised warp-specialised forward (results/h100-fwd-unserialised.txt).
"""
import sys, os
tree = sys.argv[1]
sys.path.insert(0, os.path.join(tree, "src"))
import torch
import cuflash
from cuflash import BlockMask
assert cuflash.__file__.startswith(os.path.abspath(tree))
from cuflash import _bench_sparse as BS
S, H, D = 16384, 16, int(sys.argv[2]) if len(sys.argv) > 2 else 128
torch.manual_seed(0)
q, k, v = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
cases = {"causal": dict(causal=True), "noncausal": dict(), "window": dict(causal=True, window_size=(1023, 0)),
         "alibi_nc": dict(alibi_slopes=torch.rand(H, device="cuda")),
         "bm_causal": dict(block_mask=BS.build_mask("causal", S)[0]),
         "bm_window": dict(block_mask=BS.build_mask("sliding_window_1024", S)[0]),
         "bm_butterfly": dict(block_mask=BS.build_mask("butterfly", S)[0]),
         "bm_local_global": dict(block_mask=BS.build_mask("local_global", S)[0]),
         "bm_random": dict(block_mask=BS.build_mask("random_0.1", S)[0])}
out = []
with torch.no_grad():
    for name, kw in cases.items():
        f = lambda: cuflash.flash_attn_func(q, k, v, **kw)
        for _ in range(5): f()
        torch.cuda.synchronize()
        n = 200 if "bm_" in name and name != "bm_causal" or name == "window" else 40
        s, e = torch.cuda.Event(True), torch.cuda.Event(True)
        s.record()
        for _ in range(n): f()
        e.record(); torch.cuda.synchronize()
        out.append(f"{name} {s.elapsed_time(e) / n:.4f}")
print(os.path.basename(tree.rstrip('/')) or '.', f"d={D}", " | ".join(out), flush=True)
