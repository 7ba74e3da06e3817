// Which keys a query sees: with a band, query i sees key j iff i + diag - left <= j <= i + diag + right,
// diag = seqlen_k - seqlen_q (bottom-right aligned). Causal attention is the band left = unbounded,
// right = 0; FlashAttention-2's sliding window_size = (left, right) is the band itself. The host passes
// an unbounded side as seqlen_q + seqlen_k, so no sum below overflows.
#pragma once

namespace cuflash {

struct Band {
  int diag, left, right;

  __device__ __forceinline__ bool visible(int i, int j) const { return j >= i + diag - left && j <= i + diag + right; }

  // Every (row, key) of rows [i0, i1] x keys [j0, j1] lies inside the band (no element test needed).
  __device__ __forceinline__ bool covers(int i0, int i1, int j0, int j1) const {
    return j1 <= i0 + diag + right && j0 >= i1 + diag - left;
  }

  // The tiles of `tile` keys that rows [i0, i1] see among seqlen_k keys: first and count (0 if none).
  __device__ __forceinline__ void key_tiles(int i0, int i1, int seqlen_k, int tile, int& first, int& count) const {
    tiles_between(i0 + diag - left, i1 + diag + right, seqlen_k, tile, first, count);
  }

  // The tiles of `tile` query rows that see some key of [j0, j1], among seqlen_q rows.
  __device__ __forceinline__ void query_tiles(int j0, int j1, int seqlen_q, int tile, int& first, int& count) const {
    tiles_between(j0 - diag - right, j1 - diag + left, seqlen_q, tile, first, count);
  }

 private:
  __device__ __forceinline__ static void tiles_between(int lo, int hi, int n, int tile, int& first, int& count) {
    lo = max(lo, 0);
    hi = min(hi, n - 1);
    first = hi < lo ? 0 : lo / tile;
    count = hi < lo ? 0 : hi / tile - first + 1;
  }
};

}  // namespace cuflash
