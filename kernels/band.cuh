// Which keys a query sees: with a band, query i sees key j iff i + diag - left <= j <= i + diag + right,
// diag = seqlen_k - seqlen_q (bottom-right aligned). KIND (a kernel template parameter):
//   kNoBand   every key;
//   kCausal   causal attention: left unbounded, right = 0, both known at compile time (the leanest code);
//   kWindow   FlashAttention-2's sliding window_size = (left, right) (with causal, right = 0), at run time.
// The host passes an unbounded side as seqlen_q + seqlen_k, so no sum below overflows.
#pragma once

namespace cuflash {

constexpr int kNoBand = 0, kCausal = 1, kWindow = 2;

template <int KIND>
struct Band {
  int diag, left, right;

  __device__ __forceinline__ int last_key(int i) const { return i + diag + (KIND == kCausal ? 0 : right); }
  __device__ __forceinline__ int first_key(int i) const { return KIND == kCausal ? 0 : i + diag - left; }

  // (Keys are never negative: causal attention tests the right side only.)
  __device__ __forceinline__ bool visible(int i, int j) const {
    return KIND == kNoBand || ((KIND == kCausal || j >= first_key(i)) && j <= last_key(i));
  }

  // Every (row, key) of rows [i0, i1] x keys [j0, j1] lies inside the band (no element test needed).
  __device__ __forceinline__ bool covers(int i0, int i1, int j0, int j1) const {
    return KIND == kNoBand || (j1 <= last_key(i0) && (KIND == kCausal || j0 >= first_key(i1)));
  }

  // The tiles of `tile` keys that rows [i0, i1] see among seqlen_k keys: first and count (0 if none).
  __device__ __forceinline__ void key_tiles(int i0, int i1, int seqlen_k, int tile, int& first, int& count) const {
    if (KIND == kNoBand) {
      first = 0, count = (seqlen_k + tile - 1) / tile;
    } else {
      tiles_between(first_key(i0), last_key(i1), seqlen_k, tile, first, count);
    }
  }

  // The tiles of `tile` query rows that see some key of [j0, j1], among seqlen_q rows.
  __device__ __forceinline__ void query_tiles(int j0, int j1, int seqlen_q, int tile, int& first, int& count) const {
    if (KIND == kNoBand) {
      first = 0, count = (seqlen_q + tile - 1) / tile;
    } else {
      tiles_between(j0 - diag - (KIND == kCausal ? 0 : right), KIND == kCausal ? seqlen_q : j1 - diag + left,
                    seqlen_q, tile, first, count);
    }
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
