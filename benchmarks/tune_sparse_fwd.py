"""Time candidate block-sparse forward tiles on block masks (same inputs, same run).

    PYTHONPATH=src python benchmarks/tune_sparse_fwd.py

For each head dim and candidate (block_m, block_n, warps, stages), the sparse forward on 128 x 128
block masks at 16K tokens (dense, and random 10%), in TFLOP/s over the visited blocks. The winner
becomes the tile choose_fwd derives for block masks (cuflash._dispatch).
"""
import numpy as np

from tune_fwd import median_ms

CANDIDATES = {
    64: [(128, 64, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2)],
    128: [(128, 32, 4, 2), (128, 64, 8, 2), (128, 128, 8, 2)],
}


def main():
    import torch

    import cuflash
    from cuflash import _dispatch

    n, hidden = 16384, 2048
    rng = np.random.default_rng(0)
    nb = n // 128
    masks = {"dense": cuflash.BlockMask.from_dense(np.ones((nb, nb), bool), n, n),
             "random_0.1": cuflash.BlockMask.from_dense((rng.random((nb, nb)) < 0.1) | np.eye(nb, dtype=bool), n, n)}
    for d, tiles in CANDIDATES.items():
        h = hidden // d
        q, k, v = (torch.randn(1, n, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        for name, m in masks.items():
            flops = 4 * n * n * h * d * m.density
            for tile in tiles:
                original = _dispatch.FWD_TILES[d], _dispatch.FWD_TILES_BY_ARCH["sm_90a"].get(d)
                _dispatch.FWD_TILES[d] = tile
                _dispatch.FWD_TILES_BY_ARCH["sm_90a"].pop(d, None)
                _dispatch.choose_fwd.cache_clear()
                try:
                    ms = median_ms(lambda: cuflash.flash_attn_func(q, k, v, block_mask=m))
                    print(f"d={d:3} {name:10} tile={tile}: {ms:7.3f} ms {flops / ms / 1e9:6.1f} TFLOP/s", flush=True)
                finally:
                    _dispatch.FWD_TILES[d] = original[0]
                    if original[1]:
                        _dispatch.FWD_TILES_BY_ARCH["sm_90a"][d] = original[1]
                    _dispatch.choose_fwd.cache_clear()


if __name__ == "__main__":
    main()
