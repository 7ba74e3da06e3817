// Online softmax over the S accumulators of one warp (FlashAttention's running max and sum).
// Each thread holds, for each 16-row tile, two rows: lane/4 and lane/4 + 8 ("half" 0 and 1); the four
// threads of a quad share a row, so row reductions are two xor-shuffles.
#pragma once
#include "mma.cuh"

namespace cuflash {

// PRECISE (fp32 inputs): exp2f of (s - m) * scale instead of one ex2.approx of s * scale - m * scale,
// whose rounding of m * scale alone costs ~2^-24 |m * scale| of every probability.
template <int MT, bool PRECISE = false>
struct OnlineSoftmax {
  float row_max[MT][2];  // running max of the raw scores
  float row_sum[MT][2];  // this thread's share of the running sum of exp; see row_sum_total

  __device__ __forceinline__ OnlineSoftmax() {
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        row_max[mt][half] = kNegInf;
        row_sum[mt][half] = 0.f;
      }
  }

  // Fold a new tile of scores into the statistics and replace the scores with exp(s - m) (the scale
  // is folded into log2(e), so each exp is one exp2).
  //
  // The reference point m is moved (and O and the sums rescaled by exp(m_old - m_new)) only when some
  // row of the warp saw its max grow by more than 2^kMaxGrowthLog2; otherwise the old m is kept and
  // P stays below 2^kMaxGrowthLog2, well inside fp16/bf16 range. Any m gives the same exact result
  // (the final O / l and LSE use the same m), and most tiles of a long row skip the O rescale.
  static constexpr float kMaxGrowthLog2 = 8.f;

  // DEFER: O is left alone and its rescale goes into `deferred`, for rescale() once no product
  // accumulates into O any more (so that the softmax can run while one still does).
  struct Rescale {
    float factor[MT][2];
    bool any;
  };

  template <bool DEFER = false, int NTILES, int OTILES>
  __device__ __forceinline__ void update(float (&s)[MT][NTILES][4], float (&acc_o)[MT][OTILES][4],
                                         float scale_log2, int lane, Rescale* deferred = nullptr) {
    float tile_max[MT][2];
    bool grow = false;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float mx = row_max[mt][half];
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * half], s[mt][nt][2 * half + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        tile_max[mt][half] = mx;
        // -inf - -inf is NaN and compares false: a row with nothing seen yet needs no rescale.
        grow |= (mx - row_max[mt][half]) * scale_log2 > kMaxGrowthLog2;
      }
    const bool any = __any_sync(0xffffffffu, grow);
    if constexpr (DEFER) deferred->any = any;
    if (any) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float m_new = tile_max[mt][half];
          // exp(-inf) = 0 when the row had no finite score before; 1 when it still has none.
          const float correction =
              m_new == kNegInf ? 1.f
              : PRECISE        ? exp2f((row_max[mt][half] - m_new) * scale_log2)
                               : fast_exp2((row_max[mt][half] - m_new) * scale_log2);
          row_max[mt][half] = m_new;
          row_sum[mt][half] *= correction;
          if constexpr (DEFER) {
            deferred->factor[mt][half] = correction;
          } else {
#pragma unroll
            for (int ot = 0; ot < OTILES; ++ot) {
              acc_o[mt][ot][2 * half] *= correction;
              acc_o[mt][ot][2 * half + 1] *= correction;
            }
          }
        }
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        // A row with every score masked so far keeps max -inf; subtract 0 so exp(-inf) = 0, not NaN.
        const float m = row_max[mt][half] == kNegInf ? 0.f : row_max[mt][half];
        const float m_scaled = m * scale_log2;
        float sum = row_sum[mt][half];
#pragma unroll
        for (int nt = 0; nt < NTILES; ++nt)
#pragma unroll
          for (int c = 2 * half; c < 2 * half + 2; ++c) {
            const float p = PRECISE ? exp2f((s[mt][nt][c] - m) * scale_log2)
                                    : fast_exp2(fmaf(s[mt][nt][c], scale_log2, -m_scaled));
            s[mt][nt][c] = p;
            sum += p;
          }
        row_sum[mt][half] = sum;
      }
  }

  // A deferred rescale (update<true>) of O.
  template <int OTILES>
  __device__ __forceinline__ static void rescale(float (&acc_o)[MT][OTILES][4], const Rescale& r) {
    if (!r.any) return;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int ot = 0; ot < OTILES; ++ot) {
          acc_o[mt][ot][2 * half] *= r.factor[mt][half];
          acc_o[mt][ot][2 * half + 1] *= r.factor[mt][half];
        }
  }

  // The full row sum (the quad's four shares added).
  __device__ __forceinline__ float row_sum_total(int mt, int half) const {
    float l = row_sum[mt][half];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    return l;
  }
};

}  // namespace cuflash
