// Hopper bulk tensor copies (TMA): one thread asks the copy engine for a whole box of a tensor, which lands
// in shared memory in the 128-byte swizzled layout wgmma reads (tile_io.cuh WgTile with ROWS > 0: one box of
// 64 columns x ROWS rows per column block) and reports its bytes to an mbarrier. Rows and columns outside
// the tensor arrive as zeros. The tensor map describing the array is made on the host by the driver
// (cuflash/_tma.py) and passed by value as a __grid_constant__ kernel parameter.
#pragma once
#include "mbarrier.cuh"

namespace cuflash {

// A CUtensorMap, opaque: 128 bytes, 64-byte aligned.
struct alignas(64) TmaMap {
  unsigned long long words[16];
};

// Arrive on `bar` and tell it `bytes` more are coming by bulk copies (the phase completes when both the
// arrivals and the bytes are in).
__device__ __forceinline__ void mbar_arrive_expect_tx(MBarrier* bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(bytes)
               : "memory");
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // (as CUFLASH_HAS_WGMMA: the kernels that copy by TMA are sm_90a's)
// Fetch a tensor map into the copy engine's cache ahead of its first copy.
__device__ __forceinline__ void tma_prefetch(const TmaMap& map) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(&map)) : "memory");
}

// Copy the box at coordinates (c0, c1) (innermost first) of a 2D tensor map to dst (128-byte aligned).
__device__ __forceinline__ void tma_load_2d(void* dst, const TmaMap& map, int c0, int c1, MBarrier* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
      ::"r"(smem_addr(dst)), "l"(reinterpret_cast<unsigned long long>(&map)), "r"(c0), "r"(c1), "r"(smem_addr(bar))
      : "memory");
}

// Copy the box at coordinates (c0, c1, c2, c3) (innermost first) of a 4D tensor map to dst.
__device__ __forceinline__ void tma_load_4d(void* dst, const TmaMap& map, int c0, int c1, int c2, int c3,
                                            MBarrier* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
      "%5}], [%6];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<unsigned long long>(&map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_addr(bar))
      : "memory");
}

// A ROWS x D tile (D / 64 boxes of 64 columns x ROWS rows: layout WgTile<D, ROWS>) of a (batch, sequence,
// head, dim) array from row `row` of head h of batch element b; reports ROWS * D * 2 bytes to bar, which
// the caller has told to expect them.
template <int ROWS, int D>
__device__ __forceinline__ void tma_load_tile(void* dst, const TmaMap& map, int row, int h, int b, MBarrier* bar) {
#pragma unroll
  for (int c = 0; c < D / 64; ++c)
    tma_load_4d(static_cast<unsigned char*>(dst) + c * ROWS * 128, map, c * 64, row, h, b, bar);
}

// The same tile in layout WgTile<D> (8-row groups one after another, tile_io.cuh): one box of 64 columns
// x 8 rows per 1024-byte piece, ROWS / 8 x D / 64 of them (a map of 8-row boxes).
template <int ROWS, int D>
__device__ __forceinline__ void tma_load_tile_row_groups(void* dst, const TmaMap& map, int row, int h, int b,
                                                         MBarrier* bar) {
#pragma unroll
  for (int g = 0; g < ROWS / 8; ++g)
#pragma unroll
    for (int c = 0; c < D / 64; ++c)
      tma_load_4d(static_cast<unsigned char*>(dst) + (g * (D / 64) + c) * 1024, map, c * 64, row + 8 * g, h, b, bar);
}
#endif

}  // namespace cuflash
