// What the backward kernels share (flash_bwd.cu: flash_bwd_dkdv_kernel, flash_bwd_dq_kernel and their
// warp-specialised Hopper versions): the work between a query/key tile's products, from the recomputed
// scores to the probabilities P and on to dS, written once for the dK/dV kernels' Sᵀ (keys as rows,
// queries as columns) and the dQ kernels' S (queries as rows, keys as columns). All four form dS with
// bwd_probs_to_ds; all but flash_bwd_dkdv_ws_kernel (see there) form P with bwd_score_mods and
// bwd_recompute_p.
#pragma once
#include "band.cuh"
#include "block_sparse.cuh"
#include "dropout.cuh"
#include "mma.cuh"
#include "score_fn.cuh"
#include "score_mods.cuh"

namespace cuflash {

// p = exp(s * scale - lse) for a visible score, 0 otherwise (and for a row that saw no key, lse = -inf),
// from scale and lse in the exponent's units: times log2(e) (ex2.approx), or as they are for PRECISE (fp32
// inputs: expf of one fused s * scale - lse, not ex2.approx after rounding lse * log2(e)).
template <bool PRECISE>
__device__ __forceinline__ float exp_units(float x) {
  return PRECISE ? x : x * kLog2e;
}
template <bool PRECISE>
__device__ __forceinline__ float recompute_p_units(float s, float scale_u, float lse_u, bool visible) {
  if (!visible || lse_u == kNegInf) return 0.f;
  return PRECISE ? expf(fmaf(s, scale_u, -lse_u)) : fast_exp2(fmaf(s, scale_u, -lse_u));
}
// p = exp(s * scale - lse) of a score already masked to -inf (mask_scores), from scale and -lse in ex2's
// units (neg_lse_units: a row that saw no key gets 0 rather than NaN). Two instructions a score.
__device__ __forceinline__ float neg_lse_units(float lse) { return lse == kNegInf ? kNegInf : -exp_units<false>(lse); }
__device__ __forceinline__ float masked_p_units(float s, float scale_u, float neg_lse_u) {
  return fast_exp2(fmaf(s, scale_u, neg_lse_u));
}
template <bool PRECISE>
__device__ __forceinline__ float recompute_p(float s, float scale, float lse, bool visible) {
  return recompute_p_units<PRECISE>(s, exp_units<PRECISE>(scale), exp_units<PRECISE>(lse), visible);
}

// A query's statistic (its lse or delta) for element c of fragment (mt, nt) of a warp's tile, `col` being
// the element's column: for Sᵀ a query is a column, its statistics a row of shared memory (stat[col]); for S
// a query is a row, this thread's two rows of each fragment held in registers (stat[mt][half]).
__device__ __forceinline__ float query_stat(const float* per_col, int /* mt */, int col, int /* c */) {
  return per_col[col];
}
template <int MT>
__device__ __forceinline__ float query_stat(const float (&per_row)[MT][2], int mt, int /* col */, int c) {
  return per_row[mt][c / 2];
}

// A warp's tile of recomputed scores in a backward kernel, in the mma accumulator layout. KEY_ROWS: Sᵀ
// (the dK/dV kernels: rows are keys, columns queries); otherwise S (the dQ kernels: rows are queries). The
// block's tile starts at query q0 and key k0; this warp's rows start warp_row into it. PRECISE: fp32
// inputs (softcap's tanh in double, expf; see recompute_p).
//
// A kernel runs the steps in this order, exactly as the forward saw the scores: bwd_score_mods, its own
// needs_mask (whether the tile crosses the band's edge or a sequence's end), bwd_recompute_p. The
// kernels' code depends on how these are cut (ptxas's code changed, with the same operations, when the
// mask test or dropout moved into these functions, or when scalars came by reference: the compiler
// optimises each function before inlining it), hence scalars by value, and needs_mask's two lines written
// in each kernel. q0 comes by reference, so that a dK/dV kernel reads it from its tile's shared fields
// where used.

// MOD (first: the user's score and mask functions where site() says, score_fn.cuh, called only then; dtanh
// keeps their derivative), SOFTCAP (dtanh keeps the derivative for dS), ALIBI (alibi_slope() = slope / softmax_scale,
// called where used, so that a kernel reads it only there; diag = seqlen_k - seqlen_q), SPARSE
// (mask_partial(s) hides the scores that a partial block's bits hide).
template <bool KEY_ROWS, bool PRECISE, bool SPARSE, bool ALIBI, bool SOFTCAP, bool MOD = false, int MT, int NT, int DM,
          int DN, typename AlibiSlope, typename MaskPartial, typename Site = NoModSite>
__device__ __forceinline__ void bwd_score_mods(float (&s)[MT][NT][4], float (&dtanh)[DM][DN][4], const int& q0, int k0,
                                               int diag, int warp_row, int lane, float softcap_mult,
                                               const AlibiSlope& alibi_slope, const MaskPartial& mask_partial,
                                               const Site& site = Site()) {
  static_assert(!(MOD && SOFTCAP), "a score function writes its own cap");
  if constexpr (MOD)
    apply_score_fn<KEY_ROWS, kModGrad<MOD>>(s, dtanh, (KEY_ROWS ? k0 : q0) + warp_row, KEY_ROWS ? q0 : k0, site(), lane);
  if constexpr (SOFTCAP) apply_softcap<PRECISE>(s, softcap_mult, dtanh);
  if constexpr (ALIBI)  // for Sᵀ, keys are rows: -diag
    add_alibi(s, (KEY_ROWS ? k0 : q0) + warp_row, KEY_ROWS ? q0 : k0, KEY_ROWS ? -diag : diag, alibi_slope(), lane);
  if constexpr (SPARSE) mask_partial(s);
}

// The scores s to P, in place: p = exp(s * scale - lse) where visible (only tested where needs_mask: the
// band, the sequences' ends), lse per query (query_stat; UNITS: scale and lse already in the exponent's
// units). A query row of S past the end has lse = -inf, so p = 0 there; Sᵀ tests its columns.
template <bool KEY_ROWS, bool PRECISE, bool UNITS, int BAND, int MT, int NT, typename Lse>
__device__ __forceinline__ void bwd_recompute_p(float (&s)[MT][NT][4], bool needs_mask, const int& q0, int k0,
                                                int seqlen_q, int seqlen_k, Band<BAND> band, int warp_row, int lane,
                                                float scale, const Lse& lse) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        // frag_row's sums, spelled out and grouped as the kernels had them: through frag_row, or regrouped,
        // ptxas's code for these loops changes.
        const int col = nt * 8 + (lane % 4) * 2 + c % 2;
        const int i = KEY_ROWS ? q0 + col : q0 + warp_row + mt * 16 + lane / 4 + (c / 2) * 8;
        const int j = KEY_ROWS ? k0 + (warp_row + mt * 16 + lane / 4 + (c / 2) * 8) : k0 + nt * 8 + (lane % 4) * 2 + c % 2;
        const bool visible = !needs_mask || (KEY_ROWS ? i < seqlen_q && j < seqlen_k && (!BAND || band.visible(i, j))
                                                      : j < seqlen_k && (!BAND || band.visible(i, j)));
        const float l = query_stat(lse, mt, col, c);
        s[mt][nt][c] = UNITS ? recompute_p_units<PRECISE>(s[mt][nt][c], scale, l, visible)
                             : recompute_p<PRECISE>(s[mt][nt][c], scale, l, visible);
      }
}

// dS = P ∘ (dP − delta) (DROPOUT: P ∘ (dP ∘ M − delta), dropout_ds), times dtanh (SOFTCAP: tanh's derivative,
// or a score function's), into ds; delta
// per query as lse above. IN_PLACE: ds is dp itself, written element by element. Otherwise dS is formed in
// a local array and then copied to ds: written through ds at once, the compiler (optimising this function
// before inlining it) would have to keep each element's reads of p and dp behind the writes of the
// elements before, in case they overlap, and the dK/dV kernel's code changes.
template <bool DROPOUT, bool SOFTCAP, bool IN_PLACE, int MT, int NT, int DM, int DN, typename Delta>
__device__ __forceinline__ void bwd_probs_to_ds(float (&ds)[MT][NT][4], const float (&p)[MT][NT][4],
                                                const float (&dp)[MT][NT][4], const float (&dtanh)[DM][DN][4],
                                                const Delta& delta, float keep_scale, int lane) {
  float local[MT][NT][4];
  float(&out)[MT][NT][4] = IN_PLACE ? ds : local;
  for_each_element<MT, NT>([&](int mt, int nt, int c) {
    const float d = query_stat(delta, mt, nt * 8 + (lane % 4) * 2 + c % 2, c);
    out[mt][nt][c] = DROPOUT ? dropout_ds(p[mt][nt][c], dp[mt][nt][c], d, keep_scale)
                             : p[mt][nt][c] * (dp[mt][nt][c] - d);
    if constexpr (SOFTCAP) out[mt][nt][c] *= dtanh[mt][nt][c];
  });
  if constexpr (!IN_PLACE) for_each_element<MT, NT>([&](int mt, int nt, int c) { ds[mt][nt][c] = out[mt][nt][c]; });
}

}  // namespace cuflash
