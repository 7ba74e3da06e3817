"""Packed variable-length attention (cuflash.flash_attn_varlen_func) against PyTorch SDPA on the same
sequences padded to the longest, in one run.

    PYTHONPATH=src python benchmarks/varlen_vs_padded.py [--json PATH]

16 sequences with lengths drawn uniformly from [512, 4096] (seeded), 16 heads, d = 128, bf16, causal
and not, forward and forward+backward. Peers: SDPA FLASH on the padded batch (no mask, so it also
computes the padding: the usual cost of padding) and SDPA EFFICIENT with the key-padding (and causal)
mask (the same result as cuflash on real rows). FLOPs count real tokens only (sum of len^2 terms).
"""
import argparse
import sys

import numpy as np

from cuflash import _bench

HEADS, D, N_SEQ, LO, HI = 16, 128, 16, 512, 4096


def main(argv):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash

    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    lengths = np.random.default_rng(0).integers(LO, HI + 1, N_SEQ)
    total, longest = int(lengths.sum()), int(lengths.max())
    cu = torch.tensor(np.concatenate([[0], np.cumsum(lengths)]), dtype=torch.int32, device="cuda")
    valid = torch.arange(longest, device="cuda")[None] < torch.as_tensor(lengths, device="cuda")[:, None]
    results = []
    for causal in (False, True):
        packed = tuple(torch.randn(total, HEADS, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        padded = tuple(cuflash.pad_input(x, torch.nonzero(valid.reshape(-1), as_tuple=True)[0], N_SEQ, longest)
                       .transpose(1, 2).contiguous() for x in packed)  # (batch, heads, seq, dim)
        mask = valid[:, None, None, :]
        if causal:
            mask = mask & torch.ones(longest, longest, dtype=torch.bool, device="cuda").tril()

        def run_cuflash(q, k, v, _causal):
            return cuflash.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest, causal=_causal)

        def run_flash_padded(q, k, v, _causal):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=_causal)

        def run_efficient_masked(q, k, v, _causal):
            with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

        with torch.no_grad():
            ours = run_cuflash(*packed, causal)
            theirs = run_efficient_masked(*padded, causal).transpose(1, 2)[valid]
            diff = (ours - theirs).abs().max().item()
        pair_flops = float((lengths.astype(np.float64) ** 2).sum()) * 4 * HEADS * D * (0.5 if causal else 1.0)
        for pass_ in ("fwd", "fwd_bwd"):
            row = {}
            for name, fn, inputs in (("cuflash_varlen", run_cuflash, [packed]),
                                     ("sdpa_flash_padded", run_flash_padded, [padded]),
                                     ("sdpa_efficient_masked", run_efficient_masked, [padded])):
                r = _bench.run_impl(fn, _bench.contextlib.nullcontext, inputs, causal, _bench.Timing(), pass_)
                flops = pair_flops * _bench.PASS_FLOP_FACTOR[pass_]
                row[name] = r["ms"]
                results.append({"suite": "varlen", "pass": pass_, "impl": name, "dtype": "bfloat16", "headdim": D,
                                "causal": causal, "batch": N_SEQ, "nheads": HEADS, "lengths": lengths.tolist(),
                                "ms": r["ms"], "tflops": _bench.tflops_per_s(flops, r["ms"]),
                                "peak_mib": r["peak_mib"], "reps": r["reps"], "max_abs_diff": diff})
            print(f"varlen causal={causal!s:5} {pass_:7} cuflash {row['cuflash_varlen']:7.3f} ms  flash(padded) "
                  f"{row['sdpa_flash_padded']:7.3f} ms  efficient(masked) {row['sdpa_efficient_masked']:7.3f} ms  "
                  f"maxdiff {diff:.1e}", flush=True)
    if args.json:
        _bench.write_json(args.json, argv, results, program="PYTHONPATH=src python3 benchmarks/varlen_vs_padded.py")


if __name__ == "__main__":
    main(sys.argv[1:])
