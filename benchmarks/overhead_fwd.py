"""Per-block fixed cost of the forward: time with seqlen_k = one key tile against a long seqlen_k,
same grid, for cuflash and SDPA FLASH (same inputs, same run)."""
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import cuflash
from tune_fwd import median_ms

b, sq, h, d = 16, 1024, 16, 128
q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
for sk in (16, 48, 64, 1024):
    k, v = (torch.randn(b, sk, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms_cf = median_ms(lambda: cuflash.flash_attn_func(q, k, v))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        ms_fa = median_ms(lambda: F.scaled_dot_product_attention(qt, kt, vt))
    print(f"seqlen_q={sq} seqlen_k={sk:5d}: cuflash {ms_cf * 1e3:8.1f} us   sdpa_flash {ms_fa * 1e3:8.1f} us")
