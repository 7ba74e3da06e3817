"""Per-kernel GPU time (torch.profiler, ms per call) of cuflash forward+backward from one source tree, for
an A/B of kernel changes: run it once per tree (a checkout of the old commit and this one), alternating,
in the same session on the same GPU. bf16, 16K tokens, 16 heads, d = 128.

    python benchmarks/ab_bwd_kernels.py TREE [causal,bm_causal,window,alibi_nc,alibi_c,dropout_nc,softcap_nc,
                                              bm_window,bm_butterfly,bm_local_global,dense]

Used for the three-slot dK/dV kernel (results/h100-bwd-stages.txt, and with ALiBi, softcap and dropout
results/h100-bwd-stages-flagged.txt), and the persistent dK/dV kernel (results/h100-persistent-s10.txt).
"""
import sys, os
tree = sys.argv[1]
sys.path.insert(0, os.path.join(tree, "src"))
import torch
from torch.profiler import ProfilerActivity, profile
import cuflash
from cuflash import BlockMask
from cuflash import _bench_sparse as BS
assert cuflash.__file__.startswith(os.path.abspath(tree)), cuflash.__file__
S, H, D = 16384, 16, 128
torch.manual_seed(0)
q, k, v, dout = (torch.randn(1, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(4))
q, k, v = (x.requires_grad_() for x in (q, k, v))
cases = {"causal": dict(causal=True), "bm_causal": dict(block_mask=BlockMask.causal(S, S)),
         "window": dict(causal=True, window_size=(1024, 0)), "alibi_nc": dict(alibi_slopes=torch.rand(H, device="cuda")),
         "alibi_c": dict(causal=True, alibi_slopes=torch.rand(H, device="cuda")),
         "dropout_nc": dict(dropout_p=0.1), "softcap_nc": dict(softcap=30.0),
         "bm_window": dict(block_mask=BS.build_mask("sliding_window_1024", S)[0]),
         "bm_butterfly": dict(block_mask=BS.build_mask("butterfly", S)[0]),
         "bm_local_global": dict(block_mask=BS.build_mask("local_global", S)[0]), "dense": dict()}
only = sys.argv[2].split(",") if len(sys.argv) > 2 else list(cases)
for name in only:
    kw = cases[name]
    step = lambda: torch.autograd.grad(cuflash.flash_attn_func(q, k, v, **kw), (q, k, v), dout)
    for _ in range(3): step()
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(True), torch.cuda.Event(True)
    s.record()
    for _ in range(10): step()
    e.record(); torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10): step()
        torch.cuda.synchronize()
    per = {}
    for ev in prof.events():
        if ev.device_type.name == "CUDA":
            key = ev.name.split("<")[0].replace("void cuflash::", "")
            per[key] = per.get(key, 0) + ev.device_time / 10 / 1000
    print(f"{os.path.basename(tree.rstrip('/')):6} {name:10} wall {s.elapsed_time(e)/10:7.3f} ms | " +
          "  ".join(f"{k.replace('flash_','').replace('_kernel','')} {v:.3f}" for k, v in sorted(per.items()) if v > 0.01), flush=True)
