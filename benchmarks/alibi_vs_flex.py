"""cuflash with ALiBi against FlexAttention with an ALiBi score_mod, in one run on the same inputs.

    PYTHONPATH=src python benchmarks/alibi_vs_flex.py [--json PATH]

bf16, d = 128, 16 heads, batch x seqlen = 16384 tokens, seqlen 4096 and 16384, causal and not,
forward and forward+backward; flex is compiled and warmed up (`_bench.run_impl` warms up every
implementation, then takes the median of CUDA-event-timed calls). FLOPs as FlashAttention counts them
(halved when causal).
"""
import argparse
import sys

from cuflash import _bench


def main(argv):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    import cuflash

    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    heads, d, tokens = 16, 128, 16384
    slopes = torch.tensor([2 ** (-8 * (h + 1) / heads) for h in range(heads)], device="cuda")
    flex = torch.compile(flex_attention, dynamic=False)

    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    results = []
    for seqlen in (4096, 16384):
        batch = tokens // seqlen
        for causal in (False, True):
            block_mask = create_block_mask(lambda b, h, q, kv: q >= kv, None, None, seqlen, seqlen) if causal else None

            def run_flex(q, k, v, _causal):
                return flex(q, k, v, score_mod=alibi_mod, block_mask=block_mask)

            def run_cuflash(q, k, v, _causal):
                return cuflash.flash_attn_func(q, k, v, causal=_causal, alibi_slopes=slopes)

            bshd = [tuple(torch.randn(batch, seqlen, heads, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))]
            bhsd = [tuple(x.transpose(1, 2).contiguous() for x in bshd[0])]
            with torch.no_grad():
                diff = (run_cuflash(*bshd[0], causal) - run_flex(*bhsd[0], causal).transpose(1, 2)).abs().max().item()
            for pass_ in ("fwd", "fwd_bwd"):
                row = {}
                for name, fn, inputs in (("cuflash", run_cuflash, bshd), ("flex", run_flex, bhsd)):
                    r = _bench.run_impl(fn, _bench.contextlib.nullcontext, inputs, causal, _bench.Timing(), pass_)
                    flops = _bench.flops(batch, seqlen, seqlen, heads, d, causal, pass_)
                    row[name] = r["ms"]
                    results.append({"suite": "alibi", "pass": pass_, "impl": name, "dtype": "bfloat16", "headdim": d,
                                    "causal": causal, "batch": batch, "nheads": heads, "seqlen_q": seqlen,
                                    "seqlen_k": seqlen, "ms": r["ms"], "tflops": _bench.tflops_per_s(flops, r["ms"]),
                                    "peak_mib": r["peak_mib"], "reps": r["reps"], "max_abs_diff": diff})
                print(f"alibi seqlen={seqlen:5} causal={causal!s:5} {pass_:7} cuflash {row['cuflash']:7.3f} ms  "
                      f"flex {row['flex']:7.3f} ms  speedup {row['flex'] / row['cuflash']:.2f}x  maxdiff {diff:.1e}",
                      flush=True)
    if args.json:
        _bench.write_json(args.json, ["(benchmarks/alibi_vs_flex.py)", *argv], results)


if __name__ == "__main__":
    main(sys.argv[1:])
