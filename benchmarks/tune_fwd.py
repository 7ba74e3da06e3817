"""Time candidate forward tile shapes side by side with SDPA's FLASH backend (same inputs, same run).

    PYTHONPATH=src python benchmarks/tune_fwd.py [--headdims 64 128] [--seqlens 1024 4096 16384]

Prints TFLOP/s per candidate (block_m, block_n, warps) and the ratio to SDPA FLASH; the winners go
into cuflash._dispatch.FWD_TILES.
"""
import argparse

# Tiles with warps of 16 rows (block_m == 16 * warps) take the wgmma kernels on sm_90a (WGMMA_FWD_TILES).
CANDIDATES = {
    32: [(128, 128, 4, 2), (128, 64, 4, 2), (128, 64, 4, 3)],
    64: [(128, 128, 4, 2), (128, 128, 8, 2), (128, 64, 8, 2), (128, 128, 8, 3), (64, 128, 4, 2), (192, 128, 12, 2)],
    96: [(128, 48, 4, 2), (128, 64, 4, 2), (128, 32, 4, 2)],
    128: [(128, 48, 4, 2), (128, 128, 8, 2), (128, 64, 8, 2), (128, 64, 8, 3), (64, 128, 4, 2), (192, 128, 12, 2)],
    160: [(128, 64, 8, 2), (128, 32, 4, 2), (128, 48, 8, 2)],
    192: [(128, 64, 8, 2), (128, 48, 8, 2), (128, 32, 8, 2)],
    224: [(128, 32, 8, 2), (128, 48, 8, 2), (128, 64, 8, 2)],
    256: [(128, 32, 8, 2), (128, 48, 8, 2)],
}


def median_ms(fn, reps=30):
    """Median of per-call CUDA-event times, calls queued back to back (host overhead hidden)."""
    import torch

    for _ in range(5):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for a, b in events:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return sorted(a.elapsed_time(b) for a, b in events)[reps // 2]


def main():
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash
    from cuflash import _compile, _dispatch

    ap = argparse.ArgumentParser()
    ap.add_argument("--headdims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--seqlens", type=int, nargs="+", default=[1024, 4096, 16384])
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    arch = _compile.device_arch()
    variants = [_dispatch.choose_fwd(args.dtype, d, c, t, arch) for d in args.headdims for t in CANDIDATES[d]
                for c in (False, True)]
    list(_compile.precompile(variants, arch))
    for v in variants:  # this NVRTC's resource report: a spilling candidate may not be chosen
        r = _compile.resource_report(v.source, v.name, arch, v.smem_bytes)
        print(f"{v.head_dim:3d} {(v.block_m, v.block_n, v.warps)} band={v.band} regs={r.registers} "
              f"spill={r.spill_store_bytes}{' SPILLS' if r.spills else ''}", flush=True)
    dt = getattr(torch, args.dtype)
    for d in args.headdims:
        for causal in (False, True):
            for s in args.seqlens:
                b, h = 16384 // s, 2048 // d
                q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dt) for _ in range(3))
                flops = 4 * b * s * s * h * d / (2 if causal else 1)
                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
                    ref_ms = median_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal))
                    ref = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
                row = [f"d={d} causal={causal!s:5} s={s:5}  flash {flops / ref_ms / 1e9:6.1f}"]
                for t in CANDIDATES[d]:
                    bucket = _dispatch.head_dim_bucket(d)
                    _dispatch.FWD_TILES[bucket] = t
                    _dispatch.FWD_TILES_BY_ARCH.get(arch, {}).pop(bucket, None)
                    if arch == "sm_90a" and t[0] == 16 * t[2]:
                        _dispatch.WGMMA_FWD_TILES[bucket] = t
                    else:
                        _dispatch.WGMMA_FWD_TILES.pop(bucket, None)
                    _dispatch.choose_fwd.cache_clear()
                    ms = median_ms(lambda: cuflash.flash_attn_func(q, k, v, causal=causal))
                    err = (cuflash.flash_attn_func(q, k, v, causal=causal).float() - ref.float()).abs().max().item()
                    bad = " BAD" if err > 2e-2 else ""
                    row.append(f"{t}: {flops / ms / 1e9:6.1f} ({ref_ms / ms:4.2f}x){bad}")
                print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
