"""cuflash's FlashAttention-2 features against the peer that has each, in one run on the same inputs.

    PYTHONPATH=src python benchmarks/features_vs_peers.py [--json PATH] [--features alibi softcap gqa window]

bf16, d = 128, 16 query heads, batch x seqlen = 16384 tokens, seqlen 4096 and 16384, causal and not,
forward and forward+backward. Peers:
  alibi    FlexAttention with an ALiBi score_mod (compiled, warmed up)
  softcap  FlexAttention with a tanh score_mod
  window   FlexAttention with a sliding-window block mask (window 1024 to the left, causal)
  gqa      SDPA FLASH with enable_gqa (4 K/V heads)
  dropout  SDPA FLASH with dropout_p = 0.1 (each draws its own mask; max_abs_diff compares both at p = 0)
  fp32     SDPA on float32 inputs, TF32 off (PyTorch picks its memory-efficient kernel), cuflash's 3xTF32
`_bench.run_impl` warms every implementation up, then takes the median of CUDA-event-timed calls.
FLOPs as FlashAttention counts them (halved when causal; for the window, visited pairs only).
"""
import argparse
import sys

from cuflash import _bench
from cuflash._bench_sparse import compiled_flex

FEATURES = ("alibi", "softcap", "gqa", "window", "dropout", "fp32")
HEADS, D, TOKENS, WINDOW, SOFTCAP, DROPOUT = 16, 128, 16384, 1024, 30.0, 0.1


def main(argv):
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.nn.attention.flex_attention import create_block_mask

    import cuflash

    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--features", nargs="+", choices=FEATURES, default=list(FEATURES))
    args = ap.parse_args(argv)
    slopes = torch.tensor([2 ** (-8 * (h + 1) / HEADS) for h in range(HEADS)], device="cuda")
    flex = compiled_flex()  # one compiled flex_attention, with a recompile limit above the cases (else it runs eagerly)

    def alibi_mod(score, b, h, q_idx, kv_idx):
        return score - slopes[h] * (q_idx - kv_idx).abs()

    def softcap_mod(score, b, h, q_idx, kv_idx):
        return SOFTCAP * torch.tanh(score / SOFTCAP)

    results = []
    for feature in args.features:
        for seqlen in (4096, 16384):
            batch = TOKENS // seqlen
            for causal in ((True,) if feature == "window" else (False, True)):
                heads_k = 4 if feature == "gqa" else HEADS
                kw = {"alibi": dict(alibi_slopes=slopes), "softcap": dict(softcap=SOFTCAP),
                      "window": dict(window_size=(WINDOW - 1, 0)), "gqa": {}, "dropout": dict(dropout_p=DROPOUT),
                      "fp32": {}}[feature]
                dtype = torch.float32 if feature == "fp32" else torch.bfloat16

                def run_cuflash(q, k, v, _causal, kw=kw, p=None):
                    return cuflash.flash_attn_func(q, k, v, causal=_causal, **(kw if p is None else dict(dropout_p=p)))

                if feature == "fp32":
                    peer_name = "sdpa_fp32"
                    torch.backends.cuda.matmul.allow_tf32 = False

                    def run_peer(q, k, v, _causal, p=None):
                        return F.scaled_dot_product_attention(q, k, v, is_causal=_causal)
                elif feature in ("gqa", "dropout"):
                    peer_name = "sdpa_flash"

                    def run_peer(q, k, v, _causal, p=None):
                        p = (DROPOUT if feature == "dropout" else 0.0) if p is None else p
                        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                            return F.scaled_dot_product_attention(q, k, v, is_causal=_causal, dropout_p=p,
                                                                  enable_gqa=feature == "gqa")
                else:
                    peer_name = "flex"
                    if feature == "window":
                        mask_mod = lambda b, h, q, kv: (q >= kv) & (q - kv < WINDOW)  # noqa: E731
                    else:
                        mask_mod = lambda b, h, q, kv: q >= kv  # noqa: E731
                    block_mask = create_block_mask(mask_mod, None, None, seqlen, seqlen) if causal else None
                    score_mod = {"alibi": alibi_mod, "softcap": softcap_mod}.get(feature)

                    def run_peer(q, k, v, _causal, block_mask=block_mask, score_mod=score_mod, p=None):
                        return flex(q, k, v, score_mod=score_mod, block_mask=block_mask)

                shapes = [(batch, seqlen, HEADS, D), (batch, seqlen, heads_k, D), (batch, seqlen, heads_k, D)]
                bshd = [tuple(torch.randn(s, device="cuda", dtype=dtype) for s in shapes)]
                bhsd = [tuple(x.transpose(1, 2).contiguous() for x in bshd[0])]
                with torch.no_grad():
                    check_p = 0.0 if feature == "dropout" else None  # masks differ: compare without dropout
                    diff = (run_cuflash(*bshd[0], causal, p=check_p)
                            - run_peer(*bhsd[0], causal, p=check_p).transpose(1, 2)).abs().max()
                diff = diff.item()
                visited = 1.0
                if feature == "window":  # pairs inside the causal window, over the causal count
                    visited = (WINDOW * seqlen - WINDOW * (WINDOW - 1) / 2) / (seqlen * (seqlen + 1) / 2)
                for pass_ in ("fwd", "fwd_bwd"):
                    row = {}
                    for name, fn, inputs in (("cuflash", run_cuflash, bshd), (peer_name, run_peer, bhsd)):
                        r = _bench.run_impl(fn, _bench.contextlib.nullcontext, inputs, causal, _bench.Timing(), pass_)
                        flops = _bench.flops(batch, seqlen, seqlen, HEADS, D, causal, pass_) * visited
                        row[name] = r["ms"]
                        results.append({"suite": "features", "feature": feature, "pass": pass_, "impl": name,
                                        "dtype": str(dtype).removeprefix("torch."), "headdim": D, "causal": causal, "batch": batch,
                                        "nheads": HEADS, "nheads_k": heads_k, "seqlen_q": seqlen, "seqlen_k": seqlen,
                                        "ms": r["ms"], "tflops": _bench.tflops_per_s(flops, r["ms"]),
                                        "peak_mib": r["peak_mib"], "reps": r["reps"], "max_abs_diff": diff})
                    print(f"{feature:7} seqlen={seqlen:5} causal={causal!s:5} {pass_:7} cuflash {row['cuflash']:7.3f} ms"
                          f"  {peer_name} {row[peer_name]:7.3f} ms  speedup {row[peer_name] / row['cuflash']:.2f}x"
                          f"  maxdiff {diff:.1e}", flush=True)
    if args.json:
        _bench.write_json(args.json, argv, results, program="PYTHONPATH=src python3 benchmarks/features_vs_peers.py")


if __name__ == "__main__":
    main(sys.argv[1:])
