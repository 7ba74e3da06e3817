"""Time candidate Hopper (wgmma) backward tiles side by side with SDPA's FLASH backend (same inputs,
same run; needs an sm_90 GPU).

    PYTHONPATH=src python benchmarks/tune_bwd.py [--headdims 64 128] [--seqlens 4096 16384]

Prints backward TFLOP/s (2.5x the forward's FLOPs) per candidate ((dK/dV block_n, block_q, warps),
(dQ block_m, block_n, warps)) and the ratio to SDPA FLASH; the winners go into
cuflash._dispatch.WGMMA_BWD_DKDV_TILES and WGMMA_BWD_DQ_TILES.
"""
import argparse

from tune_fwd import median_ms

CANDIDATES = {
    64: [((128, 128, 8), (128, 128, 8)), ((128, 64, 8), (128, 64, 8)), ((128, 128, 8), (192, 64, 12)),
         ((64, 64, 4), (64, 64, 4))],
    128: [((128, 64, 8), (128, 64, 8)), ((128, 64, 8), (128, 128, 8)), ((128, 64, 8), (192, 64, 12)),
          ((64, 64, 4), (64, 64, 4))],
}


def set_tiles(bucket, tiles):
    from cuflash import _dispatch

    _dispatch.WGMMA_BWD_DKDV_TILES[bucket], _dispatch.WGMMA_BWD_DQ_TILES[bucket] = tiles
    _dispatch.choose_bwd.cache_clear()


def main():
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash
    from cuflash import _compile, _dispatch

    ap = argparse.ArgumentParser()
    ap.add_argument("--headdims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[4096, 16384])
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    arch = _compile.device_arch()
    assert arch == "sm_90a", "the wgmma backward needs an sm_90 GPU"
    variants = []
    for d in args.headdims:
        for tiles in CANDIDATES[d]:
            set_tiles(d, tiles)
            variants += [v for c in (False, True) for v in _dispatch.choose_bwd(args.dtype, d, c, arch=arch)]
    list(_compile.precompile(list(dict.fromkeys(variants)), arch))
    for v in dict.fromkeys(variants):  # a spilling candidate may not be chosen
        r = _compile.resource_report(v.source, v.name, arch, v.smem_bytes)
        if r.spills:
            print(f"SPILLS: {v.name} regs={r.registers} stack={r.stack_bytes}", flush=True)
    dt = getattr(torch, args.dtype)
    for d in args.headdims:
        for causal in (False, True):
            for s in args.seqlens:
                b, h = 16384 // s, 2048 // d
                q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=dt) for _ in range(4))
                q, k, v = (x.requires_grad_() for x in (q, k, v))
                flops = 2.5 * 4 * b * s * s * h * d / (2 if causal else 1)
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                    ref_out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                    ref_ms = median_ms(lambda: torch.autograd.grad(ref_out, (q, k, v), do.transpose(1, 2),
                                                                   retain_graph=True))
                    ref = torch.autograd.grad(ref_out, (q, k, v), do.transpose(1, 2), retain_graph=True)
                row = [f"d={d} causal={causal!s:5} s={s:5}  flash {flops / ref_ms / 1e9:6.1f}"]
                for tiles in CANDIDATES[d]:
                    set_tiles(d, tiles)
                    out = cuflash.flash_attn_func(q, k, v, causal=causal)
                    ms = median_ms(lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True))
                    got = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
                    err = max((g.float() - r.float()).abs().max().item() for g, r in zip(got, ref))
                    bad = " BAD" if err > 5e-2 else ""
                    row.append(f"{tiles}: {flops / ms / 1e9:6.1f} ({ref_ms / ms:4.2f}x){bad}")
                print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
