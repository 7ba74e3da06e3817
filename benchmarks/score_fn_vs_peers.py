"""cuflash's score and mask functions (cuflash.ScoreMod / MaskMod) against FlexAttention's score_mod and
mask_mod on the same functions, in one run on the same inputs; the built-in ALiBi and softcap beside their
snippets show what the snippet path costs.

    PYTHONPATH=src python benchmarks/score_fn_vs_peers.py [--json PATH] [--cases relative_bias ...]

bf16, d = 128, 16 query heads, batch x seqlen = 16384 tokens, seqlen 8192 and 16384, forward and
forward+backward. FlexAttention is compiled and warmed up. A mask is a block mask for both, built once per
shape and not timed with the attention (each builder's time is printed): FlexAttention's from its mask_mod by
create_block_mask, cuflash's from the same function as a MaskMod snippet by BlockMask.from_cuda.
"""
import argparse
import sys
import time

from cuflash import _bench
from cuflash._bench_sparse import compiled_flex

CASES = ("relative_bias", "document_mask", "prefix_lm", "alibi_snippet", "alibi_builtin", "softcap_snippet",
         "softcap_builtin")
HEADS, D, TOKENS, SOFTCAP, PREFIX, DOCS = 16, 128, 16384, 30.0, 1024, 8


def main(argv):
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    import cuflash
    from cuflash import BlockMask, MaskMod, ScoreMod

    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES))
    args = ap.parse_args(argv)
    flex = compiled_flex()
    slopes = torch.tensor([2 ** (-8 * (h + 1) / HEADS) for h in range(HEADS)], device="cuda")
    results = []
    for seqlen in (8192, 16384):
        batch = TOKENS // seqlen
        rel = torch.randn(HEADS, 2 * seqlen - 1, device="cuda")
        doc = torch.sort(torch.randint(0, DOCS, (seqlen,), device="cuda", dtype=torch.int32)).values
        for case in args.cases:
            causal = case in ("document_mask", "alibi_snippet", "alibi_builtin")
            flex_score, flex_mask, kw, cu_mask = None, None, {}, None
            if case == "relative_bias":
                kw = dict(score_mod=ScoreMod("score + rel[h][q - kv + last]", rel=rel, last=seqlen - 1))
                flex_score = lambda s, b, h, q, kv: s + rel[h, q - kv + seqlen - 1]  # noqa: E731
            elif case == "document_mask":
                cu_mask, causal = MaskMod("doc[q] == doc[kv] && kv <= q", doc=doc), False
                flex_mask = lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv)  # noqa: E731
            elif case == "prefix_lm":
                cu_mask = MaskMod("kv <= q || kv < prefix", prefix=PREFIX)
                flex_mask = lambda b, h, q, kv: (kv <= q) | (kv < PREFIX)  # noqa: E731
            elif case.startswith("alibi"):
                kw = (dict(score_mod=ScoreMod("score - slope[h] * fabsf((float)(q - kv))", slope=slopes))
                      if case == "alibi_snippet" else dict(alibi_slopes=slopes))
                flex_score = lambda s, b, h, q, kv: s - slopes[h] * (q - kv).abs()  # noqa: E731
                flex_mask = lambda b, h, q, kv: q >= kv  # noqa: E731
            else:
                kw = (dict(score_mod=ScoreMod("c * tanhf(score / c)", grad="1.f - tanhf(score / c) * tanhf(score / c)",
                                              c=SOFTCAP)) if case == "softcap_snippet" else dict(softcap=SOFTCAP))
                flex_score = lambda s, b, h, q, kv: SOFTCAP * torch.tanh(s / SOFTCAP)  # noqa: E731
            block_mask = create_block_mask(flex_mask, None, None, seqlen, seqlen) if flex_mask else None
            if cu_mask is not None:
                kw = dict(block_mask=BlockMask.from_cuda(cu_mask, seqlen, seqlen))  # (compiles its kernel)
                builds = []
                for builder in (lambda: BlockMask.from_cuda(cu_mask, seqlen, seqlen),
                                lambda: create_block_mask(flex_mask, None, None, seqlen, seqlen)):
                    torch.cuda.synchronize()
                    t0 = time.perf_counter()
                    builder()
                    torch.cuda.synchronize()
                    builds.append((time.perf_counter() - t0) * 1e3)
                print(f"{case:16} seqlen={seqlen:5} block mask: cuflash from_cuda {builds[0]:.2f} ms, flex "
                      f"create_block_mask {builds[1]:.2f} ms", flush=True)

            def run_cuflash(q, k, v, _causal, kw=kw):
                return cuflash.flash_attn_func(q, k, v, causal=_causal, **kw)

            def run_flex(q, k, v, _causal, score_mod=flex_score, block_mask=block_mask):
                return flex(q, k, v, score_mod=score_mod, block_mask=block_mask)

            shape = (batch, seqlen, HEADS, D)
            bshd = [tuple(torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))]
            bhsd = [tuple(x.transpose(1, 2).contiguous() for x in bshd[0])]
            with torch.no_grad():
                diff = (run_cuflash(*bshd[0], causal) - run_flex(*bhsd[0], causal).transpose(1, 2)).abs().max().item()
            for pass_ in ("fwd", "fwd_bwd"):
                row = {}
                for name, fn, inputs in (("cuflash", run_cuflash, bshd), ("flex", run_flex, bhsd)):
                    r = _bench.run_impl(fn, _bench.contextlib.nullcontext, inputs, causal, _bench.Timing(), pass_)
                    row[name] = r["ms"]
                    results.append({"suite": "score_fn", "case": case, "pass": pass_, "impl": name, "dtype": "bfloat16",
                                    "headdim": D, "causal": causal, "batch": batch, "nheads": HEADS, "seqlen_q": seqlen,
                                    "seqlen_k": seqlen, "ms": r["ms"], "peak_mib": r["peak_mib"], "reps": r["reps"],
                                    "max_abs_diff": diff})
                print(f"{case:16} seqlen={seqlen:5} {pass_:7} cuflash {row['cuflash']:7.3f} ms  flex {row['flex']:7.3f} ms"
                      f"  speedup {row['flex'] / row['cuflash']:.2f}x  maxdiff {diff:.1e}", flush=True)
    results.append(_mask_build_64k(torch, BlockMask, MaskMod, create_block_mask))
    if args.json:
        _bench.write_json(args.json, argv, results, program="PYTHONPATH=src python3 benchmarks/score_fn_vs_peers.py")


def _mask_build_64k(torch, BlockMask, MaskMod, create_block_mask, docs=64, reps=5) -> dict:
    """A 64K x 64K causal document mask built from its function: median of `reps` builds by each library."""
    seqlen = 65536
    doc = torch.sort(torch.randint(0, docs, (seqlen,), device="cuda", dtype=torch.int32)).values
    mod = MaskMod("doc[q] == doc[kv] && kv <= q", doc=doc)
    builders = {"cuflash": lambda: BlockMask.from_cuda(mod, seqlen, seqlen),
                "flex": lambda: create_block_mask(lambda b, h, q, kv: (doc[q] == doc[kv]) & (q >= kv), None, None,
                                                  seqlen, seqlen)}
    row = {"suite": "score_fn", "case": "document_mask_build", "seqlen_q": seqlen, "seqlen_k": seqlen, "docs": docs}
    for name, build in builders.items():
        build()  # (compiles)
        times = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            build()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t0) * 1e3)
        row[f"{name}_ms"] = sorted(times)[reps // 2]
    print(f"document mask 64K x 64K ({docs} documents, causal) built from its function: cuflash from_cuda "
          f"{row['cuflash_ms']:.2f} ms, flex create_block_mask {row['flex_ms']:.2f} ms", flush=True)
    return row


if __name__ == "__main__":
    main(sys.argv[1:])
