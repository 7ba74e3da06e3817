// What the two forward kernels share (flash_fwd.cu: every warp loads and computes; flash_fwd_ws.cu:
// Hopper, warp-specialised): the block's coordinates, the key tiles a query tile visits, and the work
// between the two products of each key tile (score modifications, mask, online softmax, dropout).
#pragma once
#include "band.cuh"
#include "block_sparse.cuh"
#include "dropout.cuh"
#include "mbarrier.cuh"
#include "mma.cuh"
#include "score_fn.cuh"
#include "score_mods.cuh"
#include "softmax.cuh"
#include "tile_mma.cuh"
#include "tma.cuh"
#include "varlen.cuh"

namespace cuflash {

// Set S to -inf where visible(i, j) is false for query i and key j (rows from row0, keys from col0).
template <int MT, int NTILES, typename Visible>
__device__ __forceinline__ void mask_scores(float (&acc_s)[MT][NTILES][4], int row0, int col0, int lane,
                                            const Visible& visible) {
  for_each_element<MT, NTILES>([&](int mt, int nt, int c) {
    const int i = row0 + mt * 16 + lane / 4 + (c / 2) * 8;  // frag_row spelled out: through it, ptxas's code changes
    const int j = col0 + nt * 8 + (lane % 4) * 2 + c % 2;
    if (!visible(i, j)) acc_s[mt][nt][c] = kNegInf;
  });
}

// Thread block -> (query tile of BM rows, batch, head); query tiles of one head are neighbours in
// launch order. With a band, the last query tiles of a head start first (the heaviest, when causal);
// SPARSE: those whose lists are longest (BlockLists::heaviest_first). blockIdx is read through a
// volatile asm so that a second instance recomputes the coordinates instead of keeping them live.
template <int BAND, bool SPARSE, int BM>
struct BlockCoords {
  int m_block, b, h, bh;  // the grid has < 2^31 blocks, so 32 bits suffice
  __device__ __forceinline__ BlockCoords(int num_m_blocks, int nheads, const BlockLists& lists)
      : BlockCoords(block_index(), num_m_blocks, nheads, lists) {}
  // The coordinates of the block-th query tile in launch order (a persistent kernel's work item).
  __device__ __forceinline__ BlockCoords(unsigned block, int num_m_blocks, int nheads, const BlockLists& lists) {
    bh = block / num_m_blocks;
    m_block = block - bh * num_m_blocks;
    if (BAND != kNoBand) m_block = num_m_blocks - 1 - m_block;
    b = bh / nheads;
    h = bh - b * nheads;
    if (SPARSE) m_block = lists.heaviest_first(b, h, m_block, BM);
  }
  static __device__ __forceinline__ unsigned block_index() {
    unsigned block;
    asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(block));
    return block;
  }
};

// One work item of a warp-specialised kernel (a query tile of one batch element and head: the forward's,
// flash_fwd_ws.cu, and the backward's dQ, flash_bwd.cu) as the producer hands it to the consumers through
// shared memory: two of them, so that the producer fills item n + 1's while the consumers still read item n's.
struct FwdItem {
  int m0, b, h, n_blocks;  // n_blocks < 0: no item left
  SeqRange seq;
  ListRow list;
  DropoutRng rng;
};

// The key tiles (BN keys each) that the query tile of rows [m0, m0 + BM) visits, in visiting order.
// SPARSE: the tiles of the blocks a block mask lists for it (block_sparse.cuh); otherwise every key
// tile inside the band (BAND: kNoBand, kCausal or kWindow, band.cuh), from the last to the first.
template <int BN, int BAND, bool SPARSE>
struct KeyTiles {
  int first, count;

  __device__ __forceinline__ KeyTiles(const Band<BAND>& band, const BlockLists& lists, const ListRow& list, int m0,
                                      int bm, int seqlen_k) {
    first = 0, count = (seqlen_k + BN - 1) / BN;
    if (BAND) band.key_tiles(m0, m0 + bm - 1, seqlen_k, BN, first, count);
    if (SPARSE) count = list.count * (lists.col_block / BN);
  }
  // Where tile `it` lies in the block mask (SPARSE).
  __device__ __forceinline__ SparseTile at(const BlockLists& lists, const ListRow& list, int it) const {
    return SPARSE ? sparse_tile(lists, list.entries, it, lists.col_block / BN, BN) : SparseTile{0, -1, 0};
  }
  // The first key of tile `it`, which lies at `at`.
  __device__ __forceinline__ int first_key(const BlockLists& lists, int it, const SparseTile& at) const {
    return SPARSE ? at.block * lists.col_block + at.offset : (first + count - 1 - it) * BN;
  }
};

// gridDim.x through a volatile asm, read where it is used: the compiler would otherwise hold it (or
// gridDim.x - 1) through a whole loop, which a producer's 40 registers cannot spare.
__device__ __forceinline__ unsigned grid_blocks_uncached() {
  unsigned blocks;
  asm volatile("mov.u32 %0, %%nctaid.x;" : "=r"(blocks));
  return blocks;
}

// A persistent kernel's block that finds no item left counts its exit in tile_counter (next, exited); the
// last block to exit resets both for the next launch on its stream. One thread.
__device__ __forceinline__ void count_block_exit(unsigned* tile_counter) {
  __threadfence();  // this block's last take from the counter comes before its exit count
  if (atomicAdd(tile_counter + 1, 1u) == grid_blocks_uncached() - 1) tile_counter[0] = tile_counter[1] = 0;
}

// The kernel parameters that place the work items of a persistent warp-specialised kernel walking key
// tiles (the forward and the backward's dQ): items are query tiles of BM rows, taken in BlockCoords order.
template <int BN, int BM, int BAND, bool SPARSE, bool DROPOUT>
struct FwdWork {
  const BlockLists& lists;
  const DropoutArgs& dropout;
  const int *cu_seqlens_q, *cu_seqlens_k;
  int total_q, total_k;
  int max_seqlen_q, max_seqlen_k, nheads, num_m_blocks, window_left, window_right, num_items;
  unsigned* tile_counter;

  // Item w's key tiles.
  __device__ __forceinline__ KeyTiles<BN, BAND, SPARSE> key_tiles(const FwdItem& w) const {
    const Band<BAND> band{w.seq.seqlen_k - w.seq.seqlen_q, window_left, window_right};
    return KeyTiles<BN, BAND, SPARSE>(band, lists, w.list, w.m0, BM, w.seq.seqlen_k);
  }
  // The block's n-th item into w (the first is blockIdx.x, the rest come from the counter); past the last,
  // w.n_blocks = -1. One thread.
  __device__ __forceinline__ void take(int n, FwdItem& w) const {
    const int item = n == 0 ? blockIdx.x : gridDim.x + atomicAdd(tile_counter, 1u);
    if (item >= num_items) {
      w.n_blocks = -1;
      count_block_exit(tile_counter);
      return;
    }
    const BlockCoords<BAND, SPARSE, BM> blk(item, num_m_blocks, nheads, lists);
    w.m0 = blk.m_block * BM, w.b = blk.b, w.h = blk.h;
    w.seq = seq_range(cu_seqlens_q, cu_seqlens_k, blk.b, max_seqlen_q, max_seqlen_k, total_q, total_k);
    if (SPARSE) {
      const long long row = lists.row(blk.b, blk.h, w.m0 / lists.row_block);
      w.list = ListRow{row * lists.cap, __ldg(lists.count + row)};
    }
    if (DROPOUT) w.rng = DropoutRng::make(dropout, blk.bh);
    w.n_blocks = w.m0 < w.seq.seqlen_q ? key_tiles(w).count : 0;  // a packed sequence shorter than the longest
  }
};

// The producer warpgroup's copies of item w's key tiles in a warp-specialised kernel whose consumers walk
// them (the forward, flash_fwd_ws.cu, and the backward's dQ, flash_bwd.cu): K, then V, of each tile into
// ring slot ring % STAGES, in layout L (tile_io.cuh WgTile), once both consumers are done with the slot's
// last tile (kv_empty), each landing on its mbarrier. `ring` counts the tiles of every item so far;
// n_blocks = w.n_blocks.
template <typename L, int BN, int D, int STAGES, int THREADS, int BAND, bool SPARSE, typename T>
__device__ __forceinline__ void produce_key_tiles(const KeyTiles<BN, BAND, SPARSE>& tiles, const BlockLists& lists,
                                                  const FwdItem& w, int n_blocks, int& ring, T* sK, T* sV,
                                                  const T* k_head, long long k_ss, const T* v_head, long long v_ss,
                                                  int head_dim, MBarrier* k_full, MBarrier* v_full,
                                                  MBarrier* kv_empty) {
  for (int it = 0; it < n_blocks; ++it, ++ring) {
    const int slot = ring % STAGES;
    if (ring >= STAGES) mbar_wait(&kv_empty[slot], (ring / STAGES - 1) & 1);  // the slot's last tile is done
    const int n0 = tiles.first_key(lists, it, tiles.at(lists, w.list, it));
    load_tile_async_wg<BN, D, THREADS, T, L>(sK + slot * BN * D, k_head + n0 * k_ss, k_ss, w.seq.seqlen_k - n0,
                                             head_dim);
    cp_async_mbar_arrive(&k_full[slot]);
    load_tile_async_wg<BN, D, THREADS, T, L>(sV + slot * BN * D, v_head + n0 * v_ss, v_ss, w.seq.seqlen_k - n0,
                                             head_dim);
    cp_async_mbar_arrive(&v_full[slot]);
  }
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// The same by TMA (tma.cuh), layout WgTile<D, BN>: lane 0 of the producer warp asks for each tile's copies
// and tells the slot's mbarrier how many bytes are coming (the whole tile: rows past the end arrive as zeros).
template <int BN, int D, int STAGES, int BAND, bool SPARSE, typename T>
__device__ __forceinline__ void produce_key_tiles_tma(const KeyTiles<BN, BAND, SPARSE>& tiles, const BlockLists& lists,
                                                      const FwdItem& w, int n_blocks, int& ring, T* sK, T* sV,
                                                      const TmaMap& k_map, const TmaMap& v_map, int hk,
                                                      MBarrier* k_full, MBarrier* v_full, MBarrier* kv_empty,
                                                      int lane) {
  for (int it = 0; it < n_blocks; ++it, ++ring) {
    const int slot = ring % STAGES;
    if (ring >= STAGES) mbar_wait(&kv_empty[slot], (ring / STAGES - 1) & 1);  // the slot's last tile is done
    const int n0 = tiles.first_key(lists, it, tiles.at(lists, w.list, it));
    if (lane == 0) {
      mbar_arrive_expect_tx(&k_full[slot], BN * D * sizeof(T));
      tma_load_tile<BN, D>(sK + slot * BN * D, k_map, w.seq.k_start + n0, hk, w.b, &k_full[slot]);
      mbar_arrive_expect_tx(&v_full[slot], BN * D * sizeof(T));
      tma_load_tile<BN, D>(sV + slot * BN * D, v_map, w.seq.k_start + n0, hk, w.b, &v_full[slot]);
    }
  }
}
#endif

// From the scores S of key tile n0 (this warp's rows from row0 = m0 + warp_row) to the probabilities
// P that multiply V, in place:
// ALIBI: add -slope * |i + diag - j| to the scaled scores (slopes per head, or per batch and head).
// SOFTCAP: scores s -> cap * tanh(s / cap), with softmax_scale = cap and softcap_mult = scale / cap.
// Then the mask (SPARSE: for a partial block, mask_partial(acc_s) applies its element bits; the band;
// the sequence's end), the online softmax
// (which may rescale acc_o), and DROPOUT: after the row sums have taken P, dropped entries of P are
// zeroed (dropout.cuh); O is scaled by 1 / keep probability in the epilogue.
// DEFER_RESCALE: O's rescale goes into `deferred` instead (OnlineSoftmax::update<true>).
// MOD: first of all the user's score and mask functions (score_fn.cuh) where `site` says.
template <int BM, int BN, int BAND, bool SPARSE, bool ALIBI, bool SOFTCAP, bool DROPOUT, bool DEFER_RESCALE = false,
          bool MOD = false, int MT, int OT, bool PRECISE, typename MaskPartial>
__device__ __forceinline__ void scores_to_probs(float (&acc_s)[MT][BN / 8][4], float (&acc_o)[MT][OT][4],
                                                OnlineSoftmax<MT, PRECISE>& softmax, const SparseTile& at,
                                                const MaskPartial& mask_partial, const Band<BAND>& band, int m0,
                                                int warp_row,
                                                int n0, int seqlen_k, float alibi_slope, float softcap_mult,
                                                float scale_log2, const DropoutRng& rng, int lane,
                                                typename OnlineSoftmax<MT, PRECISE>::Rescale* deferred = nullptr,
                                                const ModSite* site = nullptr) {
  if constexpr (MOD) {
    float no_grad[1][1][4];
    apply_score_fn<false, false>(acc_s, no_grad, m0 + warp_row, n0, *site, lane);
  }
  if constexpr (SOFTCAP) apply_softcap<PRECISE>(acc_s, softcap_mult);
  if constexpr (ALIBI) add_alibi(acc_s, m0 + warp_row, n0, band.diag, alibi_slope, lane);
  auto in_range = [&](int i, int j) { return j < seqlen_k && (!BAND || band.visible(i, j)); };
  if constexpr (SPARSE) {
    if (at.slot >= 0)  // a partial block: its element bits decide
      mask_partial(acc_s);
    else if (n0 + BN > seqlen_k)
      mask_scores(acc_s, m0 + warp_row, n0, lane, in_range);
  } else if (n0 + BN > seqlen_k || (BAND && !band.covers(m0, m0 + BM - 1, n0, n0 + BN - 1))) {
    mask_scores(acc_s, m0 + warp_row, n0, lane, in_range);
  }
  softmax.template update<DEFER_RESCALE>(acc_s, acc_o, scale_log2, lane, deferred);  // acc_s now holds P
  if constexpr (DROPOUT) rng.drop_rows_queries<false>(acc_s, m0 + warp_row, n0, lane);
}

// The epilogue of a warp's rows from row0 of its (batch, head): O = acc_o / l (times out_scale, the
// dropout's 1 / keep probability), LSE = m * scale + log(l). Rows that saw no key: O = 0, LSE = -inf.
// O goes out through staging rows that only this warp uses, element (r, c) at at(r, c) (tile_io.cuh);
// each row's log-sum-exp is written on the way.
template <typename T, int D, int MT, bool PRECISE, typename At>
__device__ __forceinline__ void store_fwd_rows(const float (&acc_o)[MT][D / 8][4],
                                               const OnlineSoftmax<MT, PRECISE>& softmax, const At& at, T* o_rows,
                                               long long o_ss, float* lse_head, int row0, int seqlen_q, int head_dim,
                                               float softmax_scale, float out_scale, int lane) {
  stage_rows_at<T>(acc_o, at, lane, [&](int mt, int half) {
    const float l = softmax.row_sum_total(mt, half);
    const int row = frag_row(row0 + mt * 16, lane, half);
    if (lane % 4 == 0 && row < seqlen_q)
      lse_head[row] = l > 0.f ? softmax.row_max[mt][half] * softmax_scale + logf(l) : kNegInf;
    return l > 0.f ? out_scale / l : 0.f;
  });
  copy_rows_out_at<MT * 16, D>(o_rows, o_ss, at, seqlen_q - row0, head_dim, lane);
}

// The same epilogue with no staging: each thread stores its pairs of O's elements straight from the
// accumulators (for a kernel whose shared memory holds the next tile's operands by then).
template <typename T, int D, int MT, bool PRECISE>
__device__ __forceinline__ void store_fwd_rows_direct(const float (&acc_o)[MT][D / 8][4],
                                                      const OnlineSoftmax<MT, PRECISE>& softmax, T* o_rows,
                                                      long long o_ss, float* lse_head, int row0, int seqlen_q,
                                                      int head_dim, float softmax_scale, float out_scale, int lane) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const float l = softmax.row_sum_total(mt, half);
      const int r = frag_row(mt * 16, lane, half);
      if (row0 + r >= seqlen_q) continue;
      if (lane % 4 == 0) lse_head[row0 + r] = l > 0.f ? softmax.row_max[mt][half] * softmax_scale + logf(l) : kNegInf;
      const float scale = l > 0.f ? out_scale / l : 0.f;
#pragma unroll
      for (int nt = 0; nt < D / 8; ++nt) {
        const int c = nt * 8 + (lane % 4) * 2;  // head_dim is a multiple of 8, so c < head_dim covers c + 1
        if (c < head_dim)
          store2(o_rows + r * o_ss + c, acc_o[mt][nt][2 * half] * scale, acc_o[mt][nt][2 * half + 1] * scale);
      }
    }
}

}  // namespace cuflash
