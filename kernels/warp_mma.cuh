// Warp-level matrix products on shared-memory tiles (row-major, padded rows of PITCH bytes) and
// register tiles in the mma accumulator layout. These two shapes are all FlashAttention needs:
//   warp_mma_abt: acc += A Bᵀ   (S = Q Kᵀ, dP = dO Vᵀ, and their transposes in the backward)
//   warp_mma_pb:  acc += P B    (O += P V, dV += Pᵀ dO, dK += dSᵀ Q, dQ += dS K)
// A warp owns 16 * MT rows of the result. Shared addresses are 32-bit: a per-lane base plus
// compile-time offsets, which ptxas folds into the ldmatrix instructions.
// fp16/bf16 tiles use mma m16n8k16; fp32 tiles use m16n8k8 on split TF32 parts (mma.cuh), whose fragments
// ldmatrix loads the same way (an fp32 element is a pair of 16-bit ones), except P B's B operand.
#pragma once
#include "mma.cuh"

namespace cuflash {

template <int MT, int NT>
__device__ __forceinline__ void zero(float (&acc)[MT][NT][4]) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[mt][nt][c] = 0.f;
}

// Column tiles 2 np and 2 np + 1 of every row tile: acc[mt][2 np + h] += a[mt] · (b[2h], b[2h + 1]).
template <typename T, int MT, int NT>
__device__ __forceinline__ void mma_column_pair(float (&acc)[MT][NT][4], const unsigned (&a)[MT][4],
                                                const unsigned (&b)[4], int np) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    mma_16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
    mma_16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
  }
}

// acc[mt][nt] += A[16 MT rows from a_rows] · B[N rows from b_rows]ᵀ, both K wide. fp32 with B_REST > 0:
// B is split already (split_tile_tf32), its rest B_REST bytes after it.
template <typename T, int MT, int N, int K, int PITCH, int B_REST = 0>
__device__ __forceinline__ void warp_mma_abt(float (&acc)[MT][N / 8][4], unsigned a_rows, unsigned b_rows,
                                             int lane) {
  static_assert(N % 16 == 0 && K % 16 == 0, "tiles are made of 16x16 blocks");
  const unsigned a_lane = a_rows + (lane % 16) * PITCH + (lane / 16) * 16;
  const unsigned b_lane = b_rows + (lane % 8 + (lane / 16) * 8) * PITCH + ((lane / 8) % 2) * 16;
  if constexpr (ElemTraits<T>::is_f32) {
    static_assert(MT == 1, "fp32 tiles give each warp 16 rows");
    // 3xTF32 (mma.cuh): the three products of each 8-wide k slice go into a fresh accumulator, which is
    // added to acc in fp32. The tensor cores' own accumulation truncates: summing a tile's whole k in
    // them left fp32 errors 3-5x plain fp32's (H100).
#pragma unroll
    for (int kk = 0; kk < K / 8; ++kk) {  // 8 fp32 = 32 bytes per step
      unsigned a[4];
      ldmatrix_x4(a, a_lane + kk * 32);
      const Tf32Split<4> as(a);
      Tf32Split<2> bs[N / 8];
#pragma unroll
      for (int np = 0; np < N / 16; ++np) {
        unsigned b[4], r[4];  // (b0, b1) of column tiles 2 np and 2 np + 1; r: their rest if split already
        ldmatrix_x4(b, b_lane + np * 16 * PITCH + kk * 32);
        if constexpr (B_REST > 0) ldmatrix_x4(r, b_lane + B_REST + np * 16 * PITCH + kk * 32);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const unsigned b_h[2] = {b[2 * h], b[2 * h + 1]}, r_h[2] = {r[2 * h], r[2 * h + 1]};
          bs[2 * np + h] = B_REST > 0 ? Tf32Split<2>(b_h, r_h) : Tf32Split<2>(b_h);
        }
      }
      float d[N / 8][4] = {};
      mma_1688_split(d, as, bs);
#pragma unroll
      for (int nt = 0; nt < N / 8; ++nt)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[0][nt][i] += d[nt][i];
    }
  } else {
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      unsigned a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) ldmatrix_x4(a[mt], a_lane + mt * 16 * PITCH + kk * 32);
#pragma unroll
      for (int np = 0; np < N / 16; ++np) {
        unsigned b[4];
        ldmatrix_x4(b, b_lane + np * 16 * PITCH + kk * 32);
        mma_column_pair<T>(acc, a, b, np);
      }
    }
  }
}

// Columns 16 kk .. 16 kk + 15 of a 16-row fp32 tile in the accumulator layout, as an m16n8k16 A fragment
// of T: two 8-column accumulator tiles packed into 16-bit pairs are exactly one (POSITIVE: max(p, 0)).
template <typename T, bool POSITIVE, int NT>
__device__ __forceinline__ void a_fragment(unsigned (&a)[4], const float (&p)[NT][4], int kk) {
  auto x = [&](int nt, int c) { return POSITIVE ? fmaxf(p[nt][c], 0.f) : p[nt][c]; };
  a[0] = ElemTraits<T>::pack2(x(2 * kk, 0), x(2 * kk, 1));
  a[1] = ElemTraits<T>::pack2(x(2 * kk, 2), x(2 * kk, 3));
  a[2] = ElemTraits<T>::pack2(x(2 * kk + 1, 0), x(2 * kk + 1, 1));
  a[3] = ElemTraits<T>::pack2(x(2 * kk + 1, 2), x(2 * kk + 1, 3));
}

// acc[mt][nt] += P · B[K rows from b_rows, N wide], P (16 MT x K, fp32) in the accumulator layout of
// a previous warp_mma_abt: two 8-column accumulator tiles packed into 16-bit pairs are exactly one
// A fragment of the next mma. POSITIVE: use max(P, 0) (P with dropped entries negated, dropout.cuh).
// fp32 with B_REST > 0: B is split already, as in warp_mma_abt.
template <typename T, int MT, int K, int N, int PITCH, bool POSITIVE = false, int B_REST = 0>
__device__ __forceinline__ void warp_mma_pb(float (&acc)[MT][N / 8][4], const float (&p)[MT][K / 8][4],
                                            unsigned b_rows, int lane) {
  static_assert(N % 16 == 0 && K % 16 == 0, "tiles are made of 16x16 blocks");
  if constexpr (ElemTraits<T>::is_f32) {
    // One accumulator tile of P (columns 2t, 2t + 1 of 8) is one A fragment (columns t, t + 4) if
    // the k order is permuted: slot t is column 2t, slot t + 4 column 2t + 1. B's rows follow the
    // same permutation, so B comes through plain 32-bit loads (ldmatrix cannot transpose 32-bit).
    const int g = lane / 4, t = lane % 4;
    const unsigned b_lane = b_rows + 2 * t * PITCH + g * 4;
    static_assert(MT == 1, "fp32 tiles give each warp 16 rows");
    // P's split fragments for the whole tile, then G output column tiles at a time: the tensor cores
    // sum this tile's k (at most 8 slices, short enough to keep fp32 accuracy) in fresh accumulators,
    // which are added to acc in fp32.
    Tf32Split<4> as[K / 8];
#pragma unroll
    for (int kb = 0; kb < K / 8; ++kb) {
      auto x = [&](int c) { return __float_as_uint(POSITIVE ? fmaxf(p[0][kb][c], 0.f) : p[0][kb][c]); };
      const unsigned a[4] = {x(0), x(2), x(1), x(3)};
      as[kb] = Tf32Split<4>(a);
    }
    constexpr int G = N / 8 < 4 ? N / 8 : 4;  // column tiles summed side by side (mma_1688_split)
    static_assert((N / 8) % G == 0, "whole groups of column tiles");
#pragma unroll
    for (int n0 = 0; n0 < N / 8; n0 += G) {
      float d[G][4] = {};
#pragma unroll
      for (int kb = 0; kb < K / 8; ++kb) {
        Tf32Split<2> bs[G];
#pragma unroll
        for (int j = 0; j < G; ++j) {
          const unsigned at = b_lane + kb * 8 * PITCH + (n0 + j) * 32;
          const unsigned b[2] = {lds32(at), lds32(at + PITCH)};
          if constexpr (B_REST > 0) {
            const unsigned r[2] = {lds32(at + B_REST), lds32(at + B_REST + PITCH)};
            bs[j] = Tf32Split<2>(b, r);
          } else {
            bs[j] = Tf32Split<2>(b);
          }
        }
        mma_1688_split(d, as[kb], bs);
      }
#pragma unroll
      for (int j = 0; j < G; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) acc[0][n0 + j][c] += d[j][c];
    }
  } else {
    const unsigned b_lane = b_rows + (lane % 8 + ((lane / 8) % 2) * 8) * PITCH + (lane / 16) * 16;
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      unsigned a[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) a_fragment<T, POSITIVE>(a[mt], p[mt], kk);
#pragma unroll
      for (int np = 0; np < N / 16; ++np) {
        unsigned b[4];
        ldmatrix_x4_trans(b, b_lane + kk * 16 * PITCH + np * 32);
        mma_column_pair<T>(acc, a, b, np);
      }
    }
  }
}

}  // namespace cuflash
