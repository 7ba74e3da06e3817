// A block mask from a mask function (cuflash.BlockMask.from_cuda): the function (score_fn.cuh UserMod::mask)
// is evaluated on every (query, key) pair of every block, on the GPU. Pass 1 (BITS = false) classifies each
// block: empty (0), partial (1) or full (2), over the pairs inside the sequences; pass 2 (BITS = true) writes
// the element bits of the partial blocks into their slots of the pool (a bit per key, 32 keys a word, from a
// warp's ballot), as masks.py lays them out. A thread block per mask block; the grid is one-dimensional:
// (batch x heads, query block, key block) from blockIdx.x.
#include "score_fn.cuh"  // MaskBlocksParams, ModArgs and the user's mask function

namespace cuflash {

template <int BM, int BN, bool BITS>
__global__ void __launch_bounds__(256)
mask_blocks_kernel(const ModArgs args, signed char* __restrict__ states, const int* __restrict__ slots,
                   unsigned* __restrict__ pool, int nq, int nk, int heads, int seqlen_q, int seqlen_k) {
  static_assert(BN % 32 == 0, "32 keys a word");
  const long long blk = blockIdx.x;
  const int kb = static_cast<int>(blk % nk), qb = static_cast<int>(blk / nk % nq);
  const int bh = static_cast<int>(blk / nk / nq), b = bh / heads, h = bh % heads;
  if (BITS && slots[blk] < 0) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  unsigned* words = BITS ? pool + static_cast<long long>(slots[blk]) * BM * (BN / 32) : nullptr;
  bool all = true, any = false;
  for (int r = warp; r < BM; r += 8) {
    const int q = qb * BM + r;
    for (int w = 0; w < BN / 32; ++w) {
      const int kv = kb * BN + w * 32 + lane;
      const bool inside = q < seqlen_q && kv < seqlen_k;
      const bool shown = inside && UserMod::mask(b, h, q, kv, args);
      if constexpr (BITS) {
        const unsigned word = __ballot_sync(0xffffffffu, shown);
        if (lane == 0) words[r * (BN / 32) + w] = word;
      } else {
        all &= !inside || shown;
        any |= shown;
      }
    }
  }
  if constexpr (!BITS) {
    all = __syncthreads_and(all);
    any = __syncthreads_or(any);
    if (threadIdx.x == 0) states[blk] = any ? (all ? 2 : 1) : 0;
  }
}

}  // namespace cuflash
