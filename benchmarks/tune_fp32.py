"""float32 tiles side by side with SDPA float32 (TF32 off), same inputs, same run (H100; d=128, 16 heads,
4K tokens x 4 batch): forward tiles (block_m, block_n, warps, stages) with K/V split once per tile, and
backward tiles (dK/dV keys, query tile, dQ queries, key tile) with the streamed tiles split or not;
backward time = forward+backward - forward (CUDA-event medians). The winners go into
cuflash._dispatch.fp32_fwd_tile, fp32_bwd_tiles and fp32_split_tiles (results/h100-fp32-ab-s11.txt).

    PYTHONPATH=src python benchmarks/tune_fp32.py
"""
from cuflash import _compile, _dispatch
from tune_fwd import median_ms  # benchmarks/ is on the path when this script runs

FWD_TILES = [(128, 32, 8, 2), (64, 16, 4, 2), (128, 16, 8, 2)]
BWD_TILES = [(True, (128, 16, 128, 16)), (False, (64, 16, 64, 16)), (False, (128, 16, 128, 16)),
             (True, (64, 16, 64, 16))]


def use(fwd_tile=FWD_TILES[0], split=True, bwd_tile=BWD_TILES[0][1]):
    _dispatch.fp32_split_tiles = lambda bucket, arch: split
    _dispatch.fp32_fwd_tile = lambda bucket, arch="sm_80": fwd_tile
    _dispatch.fp32_bwd_tiles = lambda bucket, arch="sm_80": (bwd_tile[0], bwd_tile[1], 1, bwd_tile[2], bwd_tile[3])
    _dispatch.choose_fwd.cache_clear()
    _dispatch.choose_bwd.cache_clear()


def main():
    import torch
    import torch.nn.functional as F

    import cuflash

    configs = [dict(fwd_tile=t) for t in FWD_TILES] + [dict(split=s, bwd_tile=t) for s, t in BWD_TILES]
    variants = []
    for c in configs:
        use(**c)
        for band in (0, 1):
            variants.append(_dispatch.choose_fwd("float32", 128, band, arch="sm_90a"))
            variants += _dispatch.choose_bwd("float32", 128, band, arch="sm_90a")
    list(_compile.precompile(list(dict.fromkeys(variants)), _compile.device_arch()))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    q, k, v = (torch.randn(4, 4096, 16, 128, device="cuda", requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)
    for causal in (False, True):
        def sdpa():
            return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                  is_causal=causal).transpose(1, 2)

        def ours():
            return cuflash.flash_attn_func(q, k, v, causal=causal)

        for name, f, cfgs in (("sdpa_fp32", sdpa, [{}]), ("cuflash", ours, configs)):
            for c in cfgs:
                use(**c) if c else None
                with torch.no_grad():
                    fwd = median_ms(f, reps=10)
                bwd = median_ms(lambda: f().backward(dout), reps=10) - fwd
                print(f"causal={causal} {name} {c} fwd {fwd:.3f} bwd {bwd:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
