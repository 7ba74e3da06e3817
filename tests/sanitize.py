"""compute-sanitizer over one small forward and backward of every kernel family: memcheck, racecheck and
synccheck, failing on any report. Needs a GPU, PyTorch and compute-sanitizer on the PATH.

    python tests/sanitize.py [--tools memcheck racecheck synccheck] [--log DIR] [--cases NAME ...]

It first runs the calls plainly (filling the kernel cache, so the sanitized runs compile nothing), then
once under each tool; the exit status is the number of tools that reported anything.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np


def calls():
    """One small call of each kernel family, forward and backward (PyTorch autograd)."""
    import torch

    import cuflash
    from cuflash import BlockMask, _arch
    from cuflash._options import override

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, device="cuda", dtype=dtype).requires_grad_()

    only = [c for c in os.environ.get("SANITIZE_CASES", "").split(",") if c]

    def run(name, q, k, v, packed=None, **kw):
        """Forward and backward of one case (packed = (cu_seqlens, max_seqlen): a varlen call)."""
        if only and not any(c in name for c in only):
            return
        if packed:
            out = cuflash.flash_attn_varlen_func(q, k, v, packed[0], packed[0], packed[1], packed[1], **kw)
        else:
            out = cuflash.flash_attn_func(q, k, v, **kw)
        out.float().sum().backward()
        torch.cuda.synchronize()
        print(f"  {name}", flush=True)

    q, k, v = randn(1, 200, 4, 64), randn(1, 300, 2, 64), randn(1, 300, 2, 64)
    run("dense, GQA, causal", q, k, v, causal=True)
    run("window", q, k, v, window_size=(64, 16))
    run("softcap", q, k, v, softcap=20.0)
    run("ALiBi", q, k, v, alibi_slopes=torch.rand(4, device="cuda"))
    run("dropout", q, k, v, dropout_p=0.2)
    run("fp32", *(randn(1, 130, 2, 64, dtype=torch.float32) for _ in range(3)), causal=True)
    for d in (40, 72, 128, 256):
        run(f"head dim {d}", *(randn(1, 150, 2, d) for _ in range(3)))
    for block in (64, 128):
        mask = BlockMask.local_global_random(512, 512, local_blocks=1, global_blocks=1, random_blocks=1,
                                             block_m=block, block_n=block, seed=0)
        qb, kb, vb = (randn(1, 512, 2, 128) for _ in range(3))
        run(f"block mask {block}", qb, kb, vb, block_mask=mask)
        run(f"block mask {block}, d=64, dropout", *(randn(1, 512, 2, 64) for _ in range(3)), block_mask=mask,
            dropout_p=0.1)
    lengths = [37, 130, 64]
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
    run("varlen", *(randn(sum(lengths), 2, 64) for _ in range(3)), packed=(cu, max(lengths)), causal=True)
    with override(fused_dq_short=True):  # (on Hopper; short calls take the dQ kernel by default)
        run("varlen, d=128 (dQ accumulated)", *(randn(sum(lengths), 2, 128) for _ in range(3)),
            packed=(cu, max(lengths)), causal=True)
        run("dense, d=128, GQA, causal (dQ accumulated)", randn(2, 200, 4, 128), randn(2, 300, 2, 128),
            randn(2, 300, 2, 128), causal=True)
        run("dense, d=64, GQA (dQ accumulated)", randn(2, 200, 4, 64), randn(2, 300, 2, 64), randn(2, 300, 2, 64))
    bad = torch.tensor([-8, 100, 1000], dtype=torch.int32, device="cuda")  # clamped by the kernels to the rows
    run("varlen, offsets outside the rows", *(randn(300, 2, 64) for _ in range(3)), packed=(bad, 300), causal=True)
    if _arch.device_arch() == "sm_90a":
        with override(fwd_warp_specialised_short=True):
            run("warp-specialised forward, d=64, short keys", *(randn(1, 300, 2, 64) for _ in range(3)))
            run("warp-specialised forward, d=192, short keys", *(randn(1, 300, 2, 192) for _ in range(3)))
            run("warp-specialised forward, d=96 padded to 128, short keys",
                *(randn(1, 300, 2, 96) for _ in range(3)), causal=True)
        with override(wgmma=False):
            run("mma.sync kernels on Hopper", q, k, v, causal=True)
    if not only or any(c in "ring merge" for c in only):
        from cuflash import _ring

        out, part = torch.randn(1, 70, 3, 128, device="cuda"), torch.randn(1, 70, 3, 128, device="cuda").half()
        lse, part_lse = torch.randn(1, 3, 70, device="cuda"), torch.randn(1, 3, 70, device="cuda")
        part_lse[:, :, :5] = float("-inf")
        _ring.merge(out, lse, part, part_lse)
        print("  ring merge", flush=True)
    torch.cuda.synchronize()


_SUMMARY = re.compile(r"(ERROR|RACECHECK) SUMMARY: (\d+) (errors?|hazards?)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tools", nargs="+", default=["memcheck", "racecheck", "synccheck"])
    ap.add_argument("--log", type=Path, default=None, help="write each tool's full output here")
    ap.add_argument("--cases", nargs="+", default=[], help="only the cases whose names contain one of these")
    ap.add_argument("--calls", action="store_true", help=argparse.SUPPRESS)  # the sanitized child process
    args = ap.parse_args(argv)
    if args.calls:
        calls()
        return 0
    os.environ["SANITIZE_CASES"] = ",".join(args.cases)  # read by the child processes' calls()
    me = [sys.executable, os.path.abspath(__file__), "--calls"]
    print("plain run (fills the kernel cache)", flush=True)
    subprocess.run(me, check=True)
    failed = 0
    for tool in args.tools:
        print(f"compute-sanitizer --tool {tool}", flush=True)
        res = subprocess.run(["compute-sanitizer", "--tool", tool, "--target-processes", "all", *me],
                             capture_output=True, text=True)
        text = res.stdout + res.stderr
        if args.log:
            args.log.mkdir(parents=True, exist_ok=True)
            (args.log / f"sanitize-{tool}.txt").write_text(text)
        counts = [int(m.group(2)) for m in _SUMMARY.finditer(text)]
        bad = res.returncode != 0 or not counts or any(counts)
        failed += bad
        print(f"  {tool}: {'FAILED' if bad else 'clean'} (summaries {counts}, exit {res.returncode})", flush=True)
        if bad:
            print("\n".join(text.splitlines()[-40:]))
    return failed


if __name__ == "__main__":
    sys.exit(main())
