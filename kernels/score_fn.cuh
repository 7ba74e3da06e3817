// User score and mask functions (cuflash.ScoreMod, cuflash.MaskMod; src/cuflash/_score_fn.py writes them
// as `struct UserMod` into a header that NVRTC compiles with the kernel, named by its hash in the cache
// key). A kernel instance with MOD calls them on every score it computes, the forward's and the
// backward's recomputed ones alike, so both see exactly the same scores.
//
// Conventions, as in score_mods.cuh: the tile holds Q Kᵀ. The function sees the scaled score
// s = Q Kᵀ * scale and returns u = f(s, b, h, q, kv) (or -inf where the mask function hides the pair);
// the tile becomes u, and the kernel runs its softmax with scale 1 (the host passes softmax_scale = 1
// and the scale in ModArgs). The backward keeps du / d(Q Kᵀ) = f'(s) * scale beside it, as softcap keeps
// dtanh, and multiplies dS by it.
//
// b is the batch element (the sequence of a packed batch), h the query head, q and kv positions inside
// the sequences.
#pragma once
#include "mma.cuh"

namespace cuflash {

// What the functions read besides the score: up to four captured arrays (their data and strides in
// elements, up to four dimensions; the header knows their types and ranks) and eight scalars. Captured
// values are launch arguments: changing one compiles nothing.
struct ModArgs {
  const void* array0;
  const void* array1;
  const void* array2;
  const void* array3;
  long long stride0_0;
  long long stride0_1;
  long long stride0_2;
  long long stride0_3;
  long long stride1_0;
  long long stride1_1;
  long long stride1_2;
  long long stride1_3;
  long long stride2_0;
  long long stride2_1;
  long long stride2_2;
  long long stride2_3;
  long long stride3_0;
  long long stride3_1;
  long long stride3_2;
  long long stride3_3;
  float scalar0;
  float scalar1;
  float scalar2;
  float scalar3;
  float scalar4;
  float scalar5;
  float scalar6;
  float scalar7;
  float scale;  // the softmax scale (the kernel's own is 1 with a score function)
  float* dscore;  // dQ kernel with MOD == 2: dS with respect to the function's value, fp32 (batch, head, query, key)
  long long dscore_sb;
  long long dscore_sh;
  long long dscore_ss;
  float* scores;  // with dscore, if not null: the scores s the function saw, in dscore's layout (captures that scale s)
  float* dpsum;  // dQ kernel with MOD & 4: rowsum(P * dP) over the keys in fp32, laid out as lse (sinks' gradient)
};

// mask_blocks_kernel's parameters (mask_blocks.cu; a kernel family of its own, kept beside ModArgs): a block mask's block states and partial blocks' bits from a mask function.
struct MaskBlocksParams {
  ModArgs args;
  signed char* __restrict__ states;  // (batch, heads, nq, nk): 0 empty, 1 partial, 2 full
  const int* __restrict__ slots;     // pass 2: each block's slot in the pool, -1 for blocks not partial
  unsigned* __restrict__ pool;       // pass 2: (slots, block_m, block_n / 32) words
  int nq;
  int nk;
  int heads;
  int seqlen_q;
  int seqlen_k;
};

// A captured array as the snippet indexes it: a[i][j]... down to an element, read as float (floating
// types) or int (integer types).
template <typename E>
__device__ __forceinline__ float mod_value(E x) {
  return static_cast<float>(x);
}
__device__ __forceinline__ float mod_value(__half x) { return __half2float(x); }
__device__ __forceinline__ float mod_value(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ int mod_value(int x) { return x; }
__device__ __forceinline__ long long mod_value(long long x) { return x; }
__device__ __forceinline__ int mod_value(bool x) { return x; }

// I: the index type (int where the header knows the array spans fewer than 2^31 elements: one multiply-add
// per index instead of 64-bit arithmetic); UNIT: the last dimension's stride is 1.
template <typename E, int N, typename I = long long, bool UNIT = false>
struct View {
  const E* data;
  I stride[N];
  __device__ __forceinline__ View<E, N - 1, I, UNIT> operator[](I i) const {
    View<E, N - 1, I, UNIT> next{data + i * (UNIT && N == 1 ? I(1) : stride[0]), {}};
#pragma unroll
    for (int d = 1; d < N; ++d) next.stride[d - 1] = stride[d];
    return next;
  }
};
template <typename E, typename I, bool UNIT>
struct View<E, 0, I, UNIT> {
  const E* data;
  I stride[1];  // (unused: a zero-length array is not C++)
  __device__ __forceinline__ operator decltype(mod_value(E())) () const { return mod_value(*data); }
};

}  // namespace cuflash

#ifdef CUFLASH_USER_MOD
#include "cuflash_user_mod.cuh"  // in memory: struct UserMod (_score_fn.py)
#else
namespace cuflash {
struct UserMod {  // the instances without MOD never call it
  static constexpr bool kMask = false, kScore = false, kUnitGrad = true;
  __device__ static float score(float s, int, int, int, int, const ModArgs&) { return s; }
  __device__ static float grad(float, int, int, int, int, const ModArgs&) { return 1.f; }
  __device__ static bool mask(int, int, int, int, const ModArgs&) { return true; }
};
}  // namespace cuflash
#endif

namespace cuflash {

// Whether a MOD kernel keeps the function's derivative per score: not where it is 1 everywhere (additive
// terms, masks), where dS is only scaled by the softmax scale (the kernels' own is 1 with MOD).
template <bool MOD>
constexpr bool kModGrad = MOD && UserMod::kScore && !UserMod::kUnitGrad;

// Where the functions run: the tile's batch element and query head, and its sequences' lengths.
struct ModSite {
  const ModArgs& args;
  int b, h, seqlen_q, seqlen_k;
};
struct NoModSite {  // where a kernel has no score function
  __device__ ModSite operator()() const;  // (never called, never defined)
};

// The functions on a warp's tile (rows from row0, columns from col0; KEY_ROWS: rows are keys, as in the
// dK/dV kernels), in place: u = f(s) or -inf; GRAD: dmod = du / d(Q Kᵀ) (0 where hidden). Elements past a
// sequence's end are left as they are (their indices may lie outside the captured arrays): the kernels
// mask them.
template <bool KEY_ROWS, bool GRAD, int MT, int NT, int DM, int DN>
__device__ __forceinline__ void apply_score_fn(float (&acc)[MT][NT][4], float (&dmod)[DM][DN][4], int row0, int col0,
                                               const ModSite& site, int lane) {
  // (A test per element, even on tiles inside both sequences: without these branches, ptxas issues all of
  // a tile's reads of captured arrays at once, which takes more registers than the kernels have.)
  for_each_element<MT, NT>([&](int mt, int nt, int c) {
    const int row = row0 + mt * 16 + lane / 4 + (c / 2) * 8, col = col0 + nt * 8 + (lane % 4) * 2 + c % 2;
    const int q = KEY_ROWS ? col : row, kv = KEY_ROWS ? row : col;
    if (q >= site.seqlen_q || kv >= site.seqlen_k) {
      if constexpr (GRAD) dmod[mt][nt][c] = 0.f;
      return;
    }
    const float s = acc[mt][nt][c] * site.args.scale;
    const bool shown = !UserMod::kMask || UserMod::mask(site.b, site.h, q, kv, site.args);
    acc[mt][nt][c] = shown ? UserMod::score(s, site.b, site.h, q, kv, site.args) : kNegInf;
    if constexpr (GRAD)
      dmod[mt][nt][c] = shown ? UserMod::grad(s, site.b, site.h, q, kv, site.args) * site.args.scale : 0.f;
  });
}

// For the gradients of captured arrays (_capture_grads.py), in the layout of dscore (fp32 (batch, head, query,
// key)): dS with respect to the score function's value u (before its derivative) into a.dscore, or the
// scores s it saw (x = Q Kᵀ, factor = the softmax scale) into a.scores. Each (query, key) of the sequences
// is written once, by the dQ kernel that owns the query rows; pairs the kernels skip keep the buffer's zeros.
template <int MT, int NT>
__device__ __forceinline__ void store_score_pairs(const float (&x)[MT][NT][4], float factor, float* buffer,
                                                  const ModArgs& a, int b, int h, int row0, int col0, int seqlen_q,
                                                  int seqlen_k, int lane) {
  float* base = buffer + b * a.dscore_sb + h * a.dscore_sh;
  for_each_element<MT, NT>([&](int mt, int nt, int c) {
    const int i = row0 + mt * 16 + lane / 4 + (c / 2) * 8, j = col0 + nt * 8 + (lane % 4) * 2 + c % 2;
    if (i < seqlen_q && j < seqlen_k) base[i * a.dscore_ss + j] = x[mt][nt][c] * factor;
  });
}

}  // namespace cuflash
