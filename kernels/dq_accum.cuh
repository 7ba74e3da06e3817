// dQ accumulated inside the warp-specialised dK/dV kernel (Hopper): the backward's fifth product,
// dQ += dS K, computed where dS already is instead of recomputing S and dP in a dQ kernel (seven products
// become five).
//
// A dK/dV block owns BN = 128 keys and walks the query tiles; its two consumer warpgroups hold dSᵀ of 64
// keys each. Each writes its dSᵀ to shared memory as it lies (keys as rows: an MN-major operand), and
// after a barrier each computes half of the tile's dQ columns over all 128 keys. The half is staged in
// shared memory in the accumulator's own order and added into global memory by one bulk reduction
// (cp.reduce.async.bulk, the copy engine), which runs while the warpgroup computes the next tile.
//
// At d = 64 the query tiles have 128 rows and each warpgroup takes 64 of them, all columns.
//
// The accumulator (fp32, zeroed before the kernel) holds 64-row query tiles, each as dq_chunks(D) chunks
// of 64 x dq_chunk_cols(D) floats (what one warpgroup computes) in fragment order: float4 number
// nt * 128 + thread of a chunk holds the wgmma accumulator values acc[nt][0..3] of that warpgroup thread
// (rows warp * 16 + lane / 4 and + 8, columns nt * 8 + (lane % 4) * 2 and + 1), so a warp stages 512
// contiguous bytes and a chunk is one reduction.
// flash_bwd_dq_convert_kernel then scales, reorders and converts it. The order of the additions varies
// from run to run: deterministic calls take the dQ kernel instead.
#pragma once
#include "dtypes.cuh"
#include "mma.cuh"  // sts32
#include "varlen.cuh"

namespace cuflash {

constexpr int kDqTileRows = 64;  // query rows of an accumulator tile (_dispatch.DQ_ACCUM_ROWS)
// Columns of an accumulator chunk: half the head at d >= 128 (the warpgroups split the columns), all of it
// at d = 64 (they split the rows); and chunks per tile.
__host__ __device__ constexpr int dq_chunk_cols(int d) { return d >= 128 ? d / 2 : d; }
__host__ __device__ constexpr int dq_chunks(int d) { return d / dq_chunk_cols(d); }

// The accumulator tile of query rows [64 m_tile, 64 m_tile + 64) of batch element b, query head h. Per
// batch element its heads' tiles lie together; a packed batch (varlen) places element b at tile
// q_start / 64 + b (times nheads), which no earlier element reaches, so the accumulator holds
// (total_q / 64 + batch) * nheads tiles.
__device__ __forceinline__ long long dq_accum_tile(const SeqRange& seq, bool packed, int b, int h, int nheads,
                                                   int m_tile) {
  const int tiles = (seq.seqlen_q + kDqTileRows - 1) / kDqTileRows;
  const long long first = packed ? seq.q_start / kDqTileRows + b : 1ll * b * tiles;
  return first * nheads + 1ll * h * tiles + m_tile;
}

// The row statistics of the warp-specialised dK/dV kernel with TMA (fixed lengths), as the preprocess writes
// them: per (batch element, query head) its queries' lse (as neg_lse_units) and then their delta, each row
// padded to a multiple of 128 queries with zeros (the workspace is zeroed; rows of a 16-byte multiple, as a
// tensor map needs), so that a query tile's lse and delta are one box of two rows of a 2D tensor map
// (_tma.stats_map). Where row `which` (0: lse, 1: delta) of head bh starts.
constexpr int kTileStatAlign = 128;
__host__ __device__ __forceinline__ long long tile_stats_row(int bh, int which, int seqlen_q) {
  const long long rows = (seqlen_q + kTileStatAlign - 1) / kTileStatAlign * kTileStatAlign;
  return (2ll * bh + which) * rows;
}

// This warp's dSᵀ (16 keys from key0, a multiple of 8; QUERIES columns in the accumulator layout) into
// the swizzled tile (tile_io.cuh wg_tile_offset) at shared address `tile`, rows are keys, rounded as the dK
// product's A operand. Rows key0 + lane / 4 (+ 8) have r % 8 = lane / 4, so chunk nt % 8 of every 64-column
// block lies at row_start ^ ((nt % 8) << 4): one XOR per store from a base that changes with `tile`
// (addresses ptxas cannot hoist out of the loop into registers).
template <typename T, int QUERIES>
__device__ __forceinline__ void store_ds_rows(const float (&ds)[1][QUERIES / 8][4], unsigned tile, int key0, int lane) {
  constexpr unsigned kGroup = QUERIES / 64 * 1024;  // from one 8-row group to the next
  const unsigned x = lane / 4, row = tile + (key0 / 8) * kGroup + x * 128 + (x << 4) + (lane % 4) * 4;
#pragma unroll
  for (int half = 0; half < 2; ++half)
#pragma unroll
    for (int nt = 0; nt < QUERIES / 8; ++nt)
      sts32((row ^ ((nt % 8) << 4)) + (nt / 8) * 1024 + half * kGroup,
            ElemTraits<T>::pack2(ds[0][nt][2 * half], ds[0][nt][2 * half + 1]));
}

// A warpgroup's dQ accumulator into its staging half, in fragment order (tid: the thread in the warpgroup).
template <int NT>
__device__ __forceinline__ void stage_dq(const float (&acc)[1][NT][4], float* stage, int tid) {
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
    *reinterpret_cast<float4*>(stage + (nt * 128 + tid) * 4) =
        make_float4(acc[0][nt][0], acc[0][nt][1], acc[0][nt][2], acc[0][nt][3]);
}

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
// *global += *shared, `bytes` of fp32 (a multiple of 16), by the copy engine; one bulk group.
__device__ __forceinline__ void bulk_reduce_add(float* global, unsigned shared, int bytes) {
  asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;\n"
               "cp.async.bulk.commit_group;\n" ::"l"(global), "r"(shared), "r"(bytes) : "memory");
}
// Until at most N of this thread's bulk groups still read shared memory.
template <int N>
__device__ __forceinline__ void bulk_wait_read() { asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory"); }
// Until this thread's bulk groups are complete.
__device__ __forceinline__ void bulk_wait_all() { asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory"); }
#else
__device__ __forceinline__ void bulk_reduce_add(float*, unsigned, int) { __trap(); }
template <int N>
__device__ __forceinline__ void bulk_wait_read() {}
__device__ __forceinline__ void bulk_wait_all() {}
#endif

}  // namespace cuflash
