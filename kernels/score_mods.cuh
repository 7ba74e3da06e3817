// Changes to the scores before the softmax, applied to a warp's 16 MT x NT*8 tile in the mma
// accumulator layout (rows from row0, columns from col0). The same functions serve the forward and,
// on recomputed scores, the backward, so both see exactly the same scores.
#pragma once

namespace cuflash {

// ALiBi, FlashAttention-2's convention: score(i, j) += -slope * |i + diag - j| on the scaled score,
// diag = seqlen_k - seqlen_q. `slope_unscaled` = slope / softmax_scale, as the tile holds Q Kᵀ before
// scaling. Rows are queries and columns keys; for a transposed tile (keys as rows, as in the dK/dV
// kernel) pass diag = -diag: |j - diag - i| = |i + diag - j|.
template <int MT, int NT>
__device__ __forceinline__ void add_alibi(float (&acc)[MT][NT][4], int row0, int col0, int diag, float slope_unscaled,
                                          int lane) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int row = row0 + mt * 16 + lane / 4 + (c / 2) * 8;
        const int col = col0 + nt * 8 + (lane % 4) * 2 + c % 2;
        acc[mt][nt][c] -= slope_unscaled * fabsf(static_cast<float>(row + diag - col));
      }
}

}  // namespace cuflash
