"""Peak extra GPU memory of cuflash forward+backward against sequence length (batch 1, 16 heads,
d = 128, bf16, causal): everything allocated beyond q, k, v and dout, which is O(seqlen).

    PYTHONPATH=src python benchmarks/memory_fwd_bwd.py [--json PATH]
"""
import argparse
import datetime
import json

import torch

import cuflash

ap = argparse.ArgumentParser()
ap.add_argument("--json")
ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536])
args = ap.parse_args()
rows = []
for s in args.seqlens:
    q, k, v, dout = (torch.randn(1, s, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    for x in (q, k, v):
        x.requires_grad_()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = cuflash.flash_attn_func(q, k, v, causal=True)
    out.backward(dout)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    inputs = 4 * q.numel() * q.element_size()
    rows.append({"seqlen": s, "peak_extra_mib": extra / 2**20, "inputs_mib": inputs / 2**20,
                 "extra_bytes_per_token": extra / s})
    print(f"seqlen {s:6d}: peak extra {extra / 2**20:9.1f} MiB ({extra / s:8.0f} B/token); q,k,v,dout {inputs / 2**20:8.1f} MiB")
    del q, k, v, dout, out
if args.json:
    json.dump({"device": torch.cuda.get_device_name(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
               "command": "PYTHONPATH=src python benchmarks/memory_fwd_bwd.py --json " + args.json,
               "results": rows}, open(args.json, "w"), indent=1)
