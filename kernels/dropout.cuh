// Fused dropout: a counter-based RNG (Philox4x32-10, Salmon et al. 2011) decides, for every score
// (query i, key j) of one (batch, query head), whether it is kept. The decision is a pure function of
// (seed, offset, batch * nheads + head, i, j), so the backward regenerates exactly the forward's mask
// from the same arguments without storing it, whatever its tile shapes.
//
// One Philox call gives eight 16-bit numbers: those of a 16 x 16 tile of scores (queries x keys) that
// one lane holds in the mma accumulator layout (rows lane/4 and lane/4 + 8, columns 2 (lane % 4) + {0,
// 1} and + 8). That "canonical lane" L and the number's position o are
//   L = (i % 8) * 4 + (j % 8) / 2,   o = ((i % 16) / 8) * 4 + ((j % 16) / 8) * 2 + j % 2,
// with counter (L + 32 * (j / 16), i / 16, batch * nheads + head, offset low word) and key (seed low
// word, seed high word ^ offset high word). A score is kept when its number is >= threshold, with
// probability (65536 - threshold) / 65536, and kept scores are scaled by 1 / that probability.
// cuflash.reference.dropout_keep_mask computes the same mask with NumPy.
#pragma once

namespace cuflash {

struct DropoutArgs {
  const unsigned* state;   // device words (seed lo, seed hi, offset lo, offset hi), or null: use the fields
  unsigned long long seed;
  unsigned long long offset;
  unsigned threshold;      // keep a score when its 16-bit number is >= threshold
  float keep_scale;        // 65536 / (65536 - threshold)
};

__device__ __forceinline__ uint4 philox4x32_10(uint4 ctr, uint2 key) {
  constexpr unsigned kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u, kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;
#pragma unroll
  for (int round = 0; round < 10; ++round) {
    const unsigned hi0 = __umulhi(kM0, ctr.x), lo0 = kM0 * ctr.x;
    const unsigned hi1 = __umulhi(kM1, ctr.z), lo1 = kM1 * ctr.z;
    ctr = make_uint4(hi1 ^ ctr.y ^ key.x, lo1, hi0 ^ ctr.w ^ key.y, lo0);
    key.x += kW0;
    key.y += kW1;
  }
  return ctr;
}

// The RNG of one (batch, query head): key and the counter words that do not depend on (i, j).
struct DropoutRng {
  uint2 key;
  unsigned bh, offset_lo, threshold;

  // A plain struct (no constructor), so that a kernel can keep it in shared memory.
  static __device__ __forceinline__ DropoutRng make(const DropoutArgs& a, unsigned bh) {
    unsigned long long seed = a.seed, offset = a.offset;
    if (a.state != nullptr) {
      seed = a.state[0] | static_cast<unsigned long long>(a.state[1]) << 32;
      offset = a.state[2] | static_cast<unsigned long long>(a.state[3]) << 32;
    }
    DropoutRng rng;
    rng.key = make_uint2(static_cast<unsigned>(seed), static_cast<unsigned>(seed >> 32) ^ static_cast<unsigned>(offset >> 32));
    rng.bh = bh;
    rng.offset_lo = static_cast<unsigned>(offset);
    rng.threshold = a.threshold;
    return rng;
  }

  // The eight numbers of canonical lane `lane` in the 16 x 16 tile whose first query is i0 and first key j0.
  __device__ __forceinline__ uint4 numbers(int i0, int j0, int lane) const {
    return philox4x32_10(make_uint4(lane + 32u * (j0 / 16), i0 / 16, bh, offset_lo), key);
  }

  __device__ __forceinline__ bool kept(const uint4& r, int o) const {
    const unsigned w = o < 2 ? r.x : o < 4 ? r.y : o < 6 ? r.z : r.w;
    return ((w >> (16 * (o % 2))) & 0xffffu) >= threshold;
  }

  // Drop entries of a warp's tile in the accumulator layout with queries as rows (the forward and dQ
  // kernels): row0, col0 (multiples of 16) are the tile's first query and key. A dropped p becomes 0,
  // or with NEGATE -p (the backward needs P of dropped scores too: see dropout_ds).
  template <bool NEGATE, int MT, int NT>
  __device__ __forceinline__ void drop_rows_queries(float (&p)[MT][NT][4], int row0, int col0, int lane) const {
    static_assert(NT % 2 == 0, "16-key tiles");
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int u = 0; u < NT / 2; ++u) {
        const uint4 r = numbers(row0 + mt * 16, col0 + u * 16, lane);
#pragma unroll
        for (int e = 0; e < 2; ++e)
#pragma unroll
          for (int c = 0; c < 4; ++c)
            if (!kept(r, (c / 2) * 4 + e * 2 + c % 2)) p[mt][2 * u + e][c] = NEGATE ? -p[mt][2 * u + e][c] : 0.f;
      }
  }

  // The same for a transposed tile (keys as rows, queries as columns; the dK/dV kernel): the scores a
  // lane holds come from two canonical lanes. Each lane computes its own canonical lane's numbers and
  // fetches the two it needs by shuffles (half the Philox work of computing both). row0 is the first
  // key, col0 the first query. Every lane of the warp must call it.
  template <bool NEGATE, int MT, int NT>
  __device__ __forceinline__ void drop_rows_keys(float (&p)[MT][NT][4], int row0, int col0, int lane) const {
    static_assert(NT % 2 == 0, "16-query tiles");
    const int g = lane / 4, t = lane % 4;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int u = 0; u < NT / 2; ++u) {
        const uint4 own = numbers(col0 + u * 16, row0 + mt * 16, lane);
#pragma unroll
        for (int b = 0; b < 2; ++b) {  // query column 2t + b of each 8-query half
          const int from = (2 * t + b) * 4 + g / 2;
          const uint4 r = make_uint4(__shfl_sync(0xffffffffu, own.x, from), __shfl_sync(0xffffffffu, own.y, from),
                                     __shfl_sync(0xffffffffu, own.z, from), __shfl_sync(0xffffffffu, own.w, from));
#pragma unroll
          for (int e = 0; e < 2; ++e)      // query half: queries 8e + 2t + b
#pragma unroll
            for (int a = 0; a < 2; ++a)    // key half: keys 8a + g
              if (!kept(r, e * 4 + a * 2 + g % 2))
                p[mt][2 * u + e][2 * a + b] = NEGATE ? -p[mt][2 * u + e][2 * a + b] : 0.f;
        }
      }
  }
};

// dS = P (dP ∘ M - delta) with M = keep_scale where kept and 0 where dropped, for p from
// drop_rows_*<true> (-P where dropped): O = (P ∘ M) V, so delta = rowsum(dO ∘ O) = Σ_j P M dP as without
// dropout.
__device__ __forceinline__ float dropout_ds(float p, float dp, float delta, float keep_scale) {
  return p >= 0.f ? p * fmaf(dp, keep_scale, -delta) : p * delta;
}

}  // namespace cuflash
