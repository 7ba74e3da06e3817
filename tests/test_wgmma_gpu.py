"""The Hopper warpgroup products (kernels/wgmma.cuh) on their own: a 64 x N tile of A Bᵀ (both operands
from shared memory) and of P B (P from registers), against NumPy. Needs an sm_90 GPU."""
import numpy as np
import pytest

from cuflash import _arch, _compile

pytestmark = pytest.mark.gpu

# One warpgroup: load A (64 x K) and B (N x K) as wgmma tiles (128-byte swizzled), C = A Bᵀ; then
# C2 = C B' where B' (N x N2) is the second tile read as K rows (MN-major). Outputs in fp32, row-major.
SOURCE = r"""
#include "tile_mma.cuh"
using namespace cuflash;
template <typename T, int N, int K, int N2>
__global__ void wg_products(const T* a, const T* b, const T* b2, float* c, float* c2) {
  __shared__ __align__(1024) T sA[64 * K], sB[N * K], sB2[N * N2];
  load_tile_async_wg<64, K, 128>(sA, a, K, 64, K);
  load_tile_async_wg<N, K, 128>(sB, b, K, N, K);
  load_tile_async_wg<N, N2, 128>(sB2, b2, N2, N, N2);
  cp_async_commit();
  cp_async_wait<0>();
  fence_proxy_async();
  __syncthreads();
  const int lane = threadIdx.x % 32, row0 = (threadIdx.x / 32) * 16;
  float acc[1][N / 8][4], acc2[1][N2 / 8][4];
  zero(acc);
  zero(acc2);
  wg_mma_abt_async<T, N, K, K>(acc, smem_addr(sA), smem_addr(sB));
  wg_wait<0>(acc);
  wg_mma_pb_async<T, N, N2, N2>(acc2, acc, smem_addr(sB2));
  wg_wait<0>(acc2);
  for (int nt = 0; nt < N / 8; ++nt)
    for (int e = 0; e < 4; ++e)
      c[(row0 + lane / 4 + (e / 2) * 8) * N + nt * 8 + (lane % 4) * 2 + e % 2] = acc[0][nt][e];
  for (int nt = 0; nt < N2 / 8; ++nt)
    for (int e = 0; e < 4; ++e)
      c2[(row0 + lane / 4 + (e / 2) * 8) * N2 + nt * 8 + (lane % 4) * 2 + e % 2] = acc2[0][nt][e];
}
"""


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("n,k,n2", [(64, 64, 64), (32, 128, 128), (128, 64, 128), (16, 128, 64), (32, 192, 192)])
def test_wgmma_products(dtype, n, k, n2):
    import cupy

    if _arch.device_arch() != "sm_90a":
        pytest.skip("wgmma needs an sm_90 GPU")
    import ml_dtypes  # noqa: F401  (bfloat16 for NumPy, shipped with JAX)

    np_dtype = np.float16 if dtype == "float16" else np.dtype("bfloat16")
    ctype = "__half" if dtype == "float16" else "__nv_bfloat16"
    rng = np.random.default_rng(n * 1000 + k)
    a, b, b2 = (rng.standard_normal(s).astype(np.float32).astype(np_dtype) for s in ((64, k), (n, k), (n, n2)))
    name = f"wg_products<{ctype}, {n}, {k}, {n2}>"
    module = cupy.RawModule(code=SOURCE, options=tuple(_compile.nvrtc_options("sm_90a")), name_expressions=[name])
    dev = [cupy.asarray(x.view(np.uint16)) for x in (a, b, b2)]
    c, c2 = cupy.zeros((64, n), cupy.float32), cupy.zeros((64, n2), cupy.float32)
    module.get_function(name)((1,), (128,), (*dev, c, c2))
    want = a.astype(np.float64) @ b.astype(np.float64).T
    np.testing.assert_allclose(c.get(), want, rtol=1e-3, atol=1e-3)
    # P is rounded to the element type before the second product, as in the kernels.
    p = c.get().astype(np_dtype).astype(np.float64)
    np.testing.assert_allclose(c2.get(), p @ b2.astype(np.float64), rtol=2e-3, atol=2e-2)
