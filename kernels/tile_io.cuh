// Moving tiles between global and shared memory.
// Shared tiles are row-major with rows padded by one 16-byte chunk: with a row pitch of an odd
// number of 16-byte chunks, the 8 row addresses of one ldmatrix fall in 8 different bank groups.
#pragma once
#include "mma.cuh"

namespace cuflash {

template <int D, typename T>
struct SmemTile {
  static constexpr int pitch = D + kChunk<T>;  // elements per padded row
  static_assert((pitch / kChunk<T>) % 2 == 1, "row pitch must be an odd number of 16-byte chunks");
};

// Asynchronously copy a ROWS x D tile (row stride `row_stride` elements) into shared memory.
// Rows >= rows_valid and columns >= cols_valid are filled with zeros and never read.
// threadIdx.x through a volatile asm: address arithmetic built on it is redone at each use instead of
// being hoisted out of the main loop into long-lived (64-bit) registers.
__device__ __forceinline__ int thread_index_uncached() {
  int tid;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(tid));
  return tid;
}

template <int ROWS, int D, int THREADS, typename T>
__device__ __forceinline__ void load_tile_async(T* smem, const T* gmem, long long row_stride, int rows_valid,
                                                int cols_valid) {
  const int tid = thread_index_uncached();
  constexpr int chunks_per_row = D / kChunk<T>, pitch = SmemTile<D, T>::pitch;
  if constexpr (THREADS % chunks_per_row != 0) {  // e.g. D = 96: chunk i of the tile is (i / cpr, i % cpr)
#pragma unroll
    for (int i = tid; i < ROWS * chunks_per_row; i += THREADS) {
      const int r = i / chunks_per_row, c = (i % chunks_per_row) * kChunk<T>;
      const bool valid = r < rows_valid && c < cols_valid;
      cp_async_16(smem + r * pitch + c, valid ? gmem + r * row_stride + c : gmem, valid);
    }
    return;
  }
  constexpr int rows_per_pass = THREADS / chunks_per_row;
  const int c = (tid % chunks_per_row) * kChunk<T>;
  int r = tid / chunks_per_row;
  // Advance pointers by addition (not base + i * stride) so the compiler does not keep one
  // precomputed 64-bit offset per chunk alive across the main loop.
  const T* src = gmem + r * row_stride + c;
  T* dst = smem + r * pitch + c;
  const long long src_step = rows_per_pass * row_stride;
#pragma unroll
  for (int pass = 0; pass < (ROWS + rows_per_pass - 1) / rows_per_pass; ++pass) {
    if (ROWS % rows_per_pass == 0 || r < ROWS) {
      const bool valid = r < rows_valid && c < cols_valid;
      cp_async_16(dst, valid ? src : gmem, valid);
    }
    r += rows_per_pass;
    src += src_step;
    dst += rows_per_pass * pitch;
  }
}

// fp32 tiles for 3xTF32 products (mma.cuh): split the 16-byte chunks this thread copied into `tile`
// (load_tile_async: chunk i = tid + j * THREADS, complete once this thread's cp.async group is waited
// for, no barrier needed) into their TF32 parts, rounded, in place, and the rest, at the same offsets
// in `rest`. Done once per tile instead of by every warp for every fragment it reads.
template <int ROWS, int D, int THREADS>
__device__ __forceinline__ void split_tile_tf32(float* tile, float* rest) {
  const int tid = thread_index_uncached();
  constexpr int chunks_per_row = D / 4, pitch = SmemTile<D, float>::pitch;
#pragma unroll
  for (int i = tid; i < ROWS * chunks_per_row; i += THREADS) {
    const int at = (i / chunks_per_row) * pitch + (i % chunks_per_row) * 4;
    uint4 x = *reinterpret_cast<const uint4*>(tile + at), big, small;
    tf32_split(x.x, big.x, small.x);
    tf32_split(x.y, big.y, small.y);
    tf32_split(x.z, big.z, small.z);
    tf32_split(x.w, big.w, small.w);
    *reinterpret_cast<uint4*>(tile + at) = big;
    *reinterpret_cast<uint4*>(rest + at) = small;
  }
}

// The layout of wgmma tiles (wgmma.cuh) of 16-bit elements, D a multiple of 64: 128-byte swizzled rows
// (what wgmma and TMA call SWIZZLE_128B). In row r of an 8-row group's 1024 bytes the 16-byte chunk j sits
// at chunk j ^ (r % 8), so the 8 chunks of a row and the 8 rows of a chunk each fall in 8 different bank
// groups. Tiles start on 1024-byte boundaries (Tiles::align). Two orders of the 1024-byte pieces:
//   ROWS = 0: each 8-row group takes D / 64 pieces, one per 64 columns, then the next group;
//   ROWS > 0: each 64-column block takes ROWS / 8 pieces, one per 8 rows, then the next block (what one
//     TMA box of 64 columns x ROWS rows writes: tma.cuh).
template <int D, int ROWS = 0>
struct WgTile {
  static_assert(D % 64 == 0 && ROWS % 8 == 0, "rows of whole 128-byte blocks, whole 8-row groups");
  static constexpr unsigned group = ROWS ? 1024 : (D / 64) * 1024;  // from one 8-row group to the next
  static constexpr unsigned block = ROWS ? ROWS * 128 : 1024;       // from one 64-column block to the next
};

// Byte offset of element (r, c) in a tile of layout L (a WgTile).
template <typename L>
__device__ __forceinline__ unsigned wg_tile_offset(int r, int c) {
  return (r / 8) * L::group + (c / 64) * L::block + (r % 8) * 128 + ((((c % 64) / 8) ^ (r % 8)) * 16) + (c % 8) * 2;
}

// Asynchronously copy a ROWS x D tile into layout L. Each thread copies whole 16-byte chunks and a warp
// whole rows: full 128-byte lines of global memory (reading half lines of more rows costs the L2 twice the
// requests), written without bank conflicts.
template <int ROWS, int D, int THREADS, typename T, typename L = WgTile<D>>
__device__ __forceinline__ void load_tile_async_wg(T* smem, const T* gmem, long long row_stride, int rows_valid,
                                                   int cols_valid) {
  static_assert(D % 64 == 0 && sizeof(T) == 2, "whole 128-byte column blocks of 16-bit elements");
  // A pass copies whole rows: at D = 192 (24 chunks a row) 120 of 128 threads copy 5 rows, the rest idle.
  constexpr int CPR = D / 8, ROWS_PER_PASS = THREADS / CPR;
  static_assert(ROWS_PER_PASS > 0, "a pass copies whole rows");
  const int tid = thread_index_uncached();
  if (THREADS % CPR != 0 && tid >= ROWS_PER_PASS * CPR) return;
  const int c = (tid % CPR) * 8;
  int r = tid / CPR;
  const T* src = gmem + r * row_stride + c;
  const long long src_step = ROWS_PER_PASS * row_stride;
  unsigned char* base = reinterpret_cast<unsigned char*>(smem);
  // Passes of whole 8-row groups keep r % 8, so a chunk's offset steps by a constant from pass to pass
  // (the compiler, not knowing that tid >= 0, would keep one offset per pass in a register).
  const unsigned first = wg_tile_offset<L>(r, c);
  constexpr unsigned kPassBytes = ROWS_PER_PASS % 8 == 0 ? ROWS_PER_PASS / 8 * L::group : 0;
#pragma unroll
  for (int pass = 0; pass < (ROWS + ROWS_PER_PASS - 1) / ROWS_PER_PASS; ++pass) {
    if (ROWS % ROWS_PER_PASS == 0 || r < ROWS) {
      const bool valid = r < rows_valid && c < cols_valid;
      cp_async_16(base + (kPassBytes ? first + pass * kPassBytes : wg_tile_offset<L>(r, c)), valid ? src : gmem,
                  valid);
    }
    r += ROWS_PER_PASS;
    src += src_step;
  }
}

// ---- Epilogues: register tiles out through shared memory -----------------------------------------
// A warp writes its 16 * MT accumulator rows (each times row_scale(mt, half)) into staging rows that only
// this warp still uses, element (r, c) at at(r, c) (rows of a padded tile: stage + r * pitch + c);
// copy_rows_out then stores them as whole 16-byte chunks of rows, which costs far less than scattered
// 4-byte pairs.
template <typename T, int MT, int NT, typename At, typename RowScale>
__device__ __forceinline__ void stage_rows_at(const float (&acc)[MT][NT][4], const At& at, int lane,
                                              RowScale row_scale) {
  __syncwarp();  // every lane is done reading these rows as an operand
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float scale = row_scale(mt, half);
      const int r = frag_row(mt * 16, lane, half);
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        store2(static_cast<T*>(at(r, nt * 8 + (lane % 4) * 2)), acc[mt][nt][2 * half] * scale,
               acc[mt][nt][2 * half + 1] * scale);
    }
  __syncwarp();
}

template <typename T, int MT, int NT, typename RowScale>
__device__ __forceinline__ void stage_rows(const float (&acc)[MT][NT][4], T* stage, int pitch, int lane,
                                           RowScale row_scale) {
  stage_rows_at<T>(acc, [=](int r, int c) { return stage + r * pitch + c; }, lane, row_scale);
}

// Copy ROWS x COLS staged elements (at(r, c), 16-byte chunks) to global rows `row_stride` apart, keeping
// rows < rows_valid and columns < cols_valid (a multiple of 16 bytes).
template <int ROWS, int COLS, typename T, typename At>
__device__ __forceinline__ void copy_rows_out_at(T* gmem, long long row_stride, const At& at, int rows_valid,
                                                 int cols_valid, int lane) {
  constexpr int chunks_per_row = COLS / kChunk<T>;
#pragma unroll
  for (int i = lane; i < ROWS * chunks_per_row; i += 32) {
    const int r = i / chunks_per_row, c = (i % chunks_per_row) * kChunk<T>;
    if (r < rows_valid && c < cols_valid)
      *reinterpret_cast<uint4*>(gmem + r * row_stride + c) = *reinterpret_cast<const uint4*>(at(r, c));
  }
}

template <int ROWS, int COLS, typename T>
__device__ __forceinline__ void copy_rows_out(T* gmem, long long row_stride, const T* stage, int pitch,
                                              int rows_valid, int cols_valid, int lane) {
  copy_rows_out_at<ROWS, COLS>(gmem, row_stride, [=](int r, int c) { return stage + r * pitch + c; }, rows_valid,
                               cols_valid, lane);
}

// Both steps with one scale for every row.
template <typename T, int MT, int NT>
__device__ __forceinline__ void store_rows_staged(const float (&acc)[MT][NT][4], T* stage, int pitch, T* gmem,
                                                  long long row_stride, int rows_valid, int cols_valid, float scale,
                                                  int lane) {
  stage_rows(acc, stage, pitch, lane, [scale](int, int) { return scale; });
  copy_rows_out<MT * 16, NT * 8>(gmem, row_stride, stage, pitch, rows_valid, cols_valid, lane);
}

// A warp's 16 accumulator rows (times scale) straight from registers, pairs of elements per store, for a
// kernel whose shared memory holds the next tile's operands by then: rows < rows_valid, columns <
// cols_valid (a multiple of 8, so that a pair is inside or outside together).
template <typename T, int NT>
__device__ __forceinline__ void store_rows_direct(const float (&acc)[1][NT][4], T* gmem, long long row_stride,
                                                  int rows_valid, int cols_valid, float scale, int lane) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = frag_row(0, lane, half);
    if (r >= rows_valid) continue;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      const int c = nt * 8 + (lane % 4) * 2;
      if (c < cols_valid)
        store2(gmem + r * row_stride + c, acc[0][nt][2 * half] * scale, acc[0][nt][2 * half + 1] * scale);
    }
  }
}

}  // namespace cuflash
