// The kernels' shared-memory tiles and matrix products, on either path:
//   mma.sync (sm_80+, WG = false): padded row-major tiles (tile_io.cuh), each warp multiplies its own
//     16 * MT rows (warp_mma.cuh);
//   wgmma (sm_90a, WG = true): 128-byte swizzled tiles (tile_io.cuh wg_tile_offset) from 1024-byte
//     boundaries, each warpgroup of four warps multiplies its 64 rows (wgmma.cuh); every warp still
//     holds its 16 rows in the same registers.
// A kernel picks the path with one template flag and is otherwise the same code.
#pragma once
#include "tile_io.cuh"
#include "warp_mma.cuh"
#include "wgmma.cuh"

namespace cuflash {

template <typename T, int D, bool WG>
struct Tiles {
  static_assert(!WG || sizeof(T) == 2, "wgmma tiles hold 16-bit elements");
  static constexpr int row_elems = WG ? D : SmemTile<D, T>::pitch;  // elements one tile row takes
  static constexpr int row_bytes = row_elems * sizeof(T);           // a tile of R rows takes R * row_bytes

  // The start of the tiles in dynamic shared memory: wgmma tiles start on a 1024-byte boundary (their
  // swizzle pattern repeats every 1024 bytes; the launch asks for 1 KiB more).
  static __device__ __forceinline__ unsigned char* align(unsigned char* smem_raw) {
    if constexpr (WG) return smem_raw + (1024 - smem_addr(smem_raw) % 1024) % 1024;
    return smem_raw;
  }

  // Copy a ROWS x D tile from global memory (tile_io.cuh).
  template <int ROWS, int THREADS>
  static __device__ __forceinline__ void load(T* smem, const T* gmem, long long row_stride, int rows_valid,
                                              int cols_valid) {
    if constexpr (WG)
      load_tile_async_wg<ROWS, D, THREADS>(smem, gmem, row_stride, rows_valid, cols_valid);
    else
      load_tile_async<ROWS, D, THREADS>(smem, gmem, row_stride, rows_valid, cols_valid);
  }

  // Cross-proxy fence: after this thread's copies have landed and before the barrier that publishes them.
  static __device__ __forceinline__ void publish() {
    if constexpr (WG) fence_proxy_async();
  }

  // acc (16 * MT rows from row0 of A) += A Bᵀ over K columns (FRESH: acc = A Bᵀ): A and B are tiles at
  // a_tile and b_tile. Issued asynchronously on the wgmma path: acc is valid after wait (mma.sync: at
  // once). A fresh wgmma accumulator is not zeroed by other instructions, which would serialise the
  // warpgroup's products still running. B_REST: fp32 B split already (warp_mma_abt).
  template <int MT, int N, int K, bool FRESH = false, int B_REST = 0>
  static __device__ __forceinline__ void mma_abt(float (&acc)[MT][N / 8][4], unsigned a_tile, int row0, unsigned b_tile,
                                                 int lane) {
    if constexpr (WG) {
      static_assert(MT == 1, "a wgmma warp holds 16 rows");
      wg_mma_abt_async<T, N, K, D, FRESH>(acc, a_tile + (row0 / 64) * 8 * WgTile<D>::group, b_tile);
    } else {
      if constexpr (FRESH) zero(acc);
      warp_mma_abt<T, MT, N, K, row_bytes, B_REST>(acc, a_tile + row0 * row_bytes, b_tile, lane);
    }
  }

  // acc += P B: P (16 * MT x K) in registers, B = the K rows of the tile at b_tile, N columns from col0.
  // Asynchronous like mma_abt; B_REST as there.
  template <int MT, int K, int N, bool POSITIVE = false, int B_REST = 0>
  static __device__ __forceinline__ void mma_pb(float (&acc)[MT][N / 8][4], const float (&p)[MT][K / 8][4],
                                                unsigned b_tile, int col0, int lane) {
    if constexpr (WG) {
      static_assert(MT == 1, "a wgmma warp holds 16 rows");
      wg_mma_pb_async<T, K, N, D, POSITIVE>(acc, p, b_tile + (col0 / 64) * WgTile<D>::block);  // col0: 0 or 64k
    } else {
      warp_mma_pb<T, MT, K, N, row_bytes, POSITIVE, B_REST>(acc, p, b_tile + col0 * sizeof(T), lane);
    }
  }

  // Wait for the products issued on this warpgroup until at most PENDING are running; acc is the
  // accumulator of the oldest one waited for.
  template <int PENDING, int MT, int NT>
  static __device__ __forceinline__ void wait(float (&acc)[MT][NT][4]) {
    if constexpr (WG) wg_wait<PENDING>(acc);
  }
};

}  // namespace cuflash
