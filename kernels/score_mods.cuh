// Changes to the scores before the softmax, applied to a warp's 16 MT x NT*8 tile in the mma
// accumulator layout (rows from row0, columns from col0). The same functions serve the forward and,
// on recomputed scores, the backward, so both see exactly the same scores.
#pragma once
#include "mma.cuh"

namespace cuflash {

// ALiBi, FlashAttention-2's convention: score(i, j) += -slope * |i + diag - j| on the scaled score,
// diag = seqlen_k - seqlen_q. `slope_unscaled` = slope / softmax_scale, as the tile holds Q Kᵀ before
// scaling. Rows are queries and columns keys; for a transposed tile (keys as rows, as in the dK/dV
// kernel) pass diag = -diag: |j - diag - i| = |i + diag - j|.
template <int MT, int NT>
__device__ __forceinline__ void add_alibi(float (&acc)[MT][NT][4], int row0, int col0, int diag, float slope_unscaled,
                                          int lane) {
  // row + diag - col = base + a constant per element: one int-to-float conversion per tile instead of one
  // per score (exact below 2^24, like the conversion of the int difference).
  const float base = static_cast<float>(row0 + lane / 4 + diag - col0 - (lane % 4) * 2);
  for_each_element<MT, NT>([&](int mt, int nt, int c) {
    const float offset = static_cast<float>(mt * 16 + (c / 2) * 8 - nt * 8 - c % 2);
    acc[mt][nt][c] -= slope_unscaled * fabsf(base + offset);
  });
}

// tanh in one instruction (sm_75+; relative error about 2^-11, as FlashAttention-2's fast_tanh):
// tanhf's software path needs registers the main loops do not have.
__device__ __forceinline__ float fast_tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Softcapping (FlashAttention-2's softcap, as in Gemma 2): the scaled score s becomes cap * tanh(s / cap).
// The tile holds Q Kᵀ and mult = softmax_scale / cap, so the tile becomes tanh(Q Kᵀ * mult) and the
// kernel runs its softmax with scale cap. The backward also keeps dtanh = mult * (1 - tanh²): dS times
// dtanh, times cap when dQ and dK are stored, is the gradient with respect to Q Kᵀ * softmax_scale / scale.
// PRECISE (fp32 inputs): tanh in double, since tanh.approx's 2^-11 would dominate fp32's error, and
// with --use_fast_math tanhf is tanh.approx too.
template <bool PRECISE>
__device__ __forceinline__ float softcap_tanh(float x) {
  return PRECISE ? static_cast<float>(tanh(static_cast<double>(x))) : fast_tanh(x);
}

template <bool PRECISE, int MT, int NT>
__device__ __forceinline__ void apply_softcap(float (&acc)[MT][NT][4], float mult) {
  for_each_element<MT, NT>(
      [&](int mt, int nt, int c) { acc[mt][nt][c] = softcap_tanh<PRECISE>(acc[mt][nt][c] * mult); });
}

template <bool PRECISE, int MT, int NT>
__device__ __forceinline__ void apply_softcap(float (&acc)[MT][NT][4], float mult, float (&dtanh)[MT][NT][4]) {
  for_each_element<MT, NT>([&](int mt, int nt, int c) {
    const float t = softcap_tanh<PRECISE>(acc[mt][nt][c] * mult);
    acc[mt][nt][c] = t;
    dtanh[mt][nt][c] = mult * (1.f - t * t);
  });
}

}  // namespace cuflash
