// FlashAttention forward on Hopper (sm_90a), warp-specialised: the thread block's first warpgroup only
// copies tiles into shared memory (the producer: one thread asking the copy engine for each tile by TMA, or
// where TMA cannot take the arrays, 128 threads copying by cp.async) and two or three more warpgroups of 64
// query rows each only compute (the consumers):
//   S = Q K^T (wgmma) -> scores to probabilities (fwd_common.cuh) -> O += P V (wgmma)
// Nothing stops the whole block inside the loop. Each K/V slot of the ring has mbarriers that say its
// K or V tile has landed (the producer's cp.async copies report to them) and that every consumer is
// done with it. The consumers take turns at the tensor cores through named barriers, so one
// warpgroup's softmax runs while another's products do; a turn issues Q K^T of a key tile together
// with P V of the previous one, and the softmax of the new tile runs while that P V still does (the
// rescale of O it may need waits for it).
#include "fwd_common.cuh"
#include "mbarrier.cuh"
#include "params.cuh"  // FwdParams: the kernel's parameters, field for field
#include "tma.cuh"

namespace cuflash {

// Registers a thread (mbarrier.cuh WarpRoles): two consumer warpgroups take 232, three (a 192-row query
// tile, d = 64) what a block of 512 threads leaves them.
template <int WARPS>
struct FwdRegisters {
  static constexpr int kProducer = WARPS == 8 ? 40 : 32, kConsumer = WARPS == 8 ? 232 : 160;
};

// Thread blocks stay resident (one per SM) and take query tiles one after another from tile_counter
// (next, exited), in the order the launch order of one block per tile would run them: query tiles of a
// head are neighbours, the heaviest first (BlockCoords). The last block to exit resets the counter for
// the next launch on its stream. The producer runs ahead across tiles: the next tile's first K/V tiles
// and its Q (once every consumer has issued their last Q Kᵀ) land while the consumers finish the
// current tile, so no block waits on its first copies, as a fresh block would.
// tma: Q, K and V come by TMA through q_map, k_map and v_map (fixed-length arrays whose strides TMA takes;
// _dispatch.fwd_launch decides). TMA issues no per-copy instructions, which the issue slots the consumers
// share with 128 copying threads felt: 10% of the d = 128 forward's cycles (docs/kernel-design.md).
template <typename T, int D, int BM, int BN, int WARPS, int STAGES, int BAND, bool SPARSE, bool ALIBI, bool SOFTCAP,
          bool DROPOUT, bool MOD = false>
__global__ void __launch_bounds__(WARPS * 32 + 128, 1)
flash_fwd_ws_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                    float* __restrict__ lse, long long q_sb, long long q_ss, long long q_sh, long long k_sb,
                    long long k_ss, long long k_sh, long long v_sb, long long v_ss, long long v_sh, long long o_sb,
                    long long o_ss, long long o_sh, int max_seqlen_q, int max_seqlen_k, int nheads, int kv_group,
                    int head_dim, int num_m_blocks, int window_left, int window_right, float softmax_scale,
                    float softcap_mult, const float* __restrict__ alibi_slopes, long long alibi_sb,
                    const int* __restrict__ cu_seqlens_q, const int* __restrict__ cu_seqlens_k,
                    int total_q, int total_k, long long lse_sb,
                    long long lse_sh, const BlockLists lists, const DropoutArgs dropout,
                    unsigned* __restrict__ tile_counter, int num_tiles, const ModArgs mod, int tma,
                    const __grid_constant__ TmaMap q_map, const __grid_constant__ TmaMap k_map,
                    const __grid_constant__ TmaMap v_map) {
#ifdef CUFLASH_HAS_WGMMA
  static_assert(!(BAND && SPARSE), "a block mask is intersected with a causal mask or window on the host");
  static_assert((WARPS == 8 || WARPS == 12) && BM == 16 * WARPS, "two or three consumer warpgroups of 64 rows");
  static_assert(BN % 16 == 0 && D % 16 == 0 && sizeof(T) == 2, "bad tile shape");
  using Roles = WarpRoles<WARPS, FwdRegisters<WARPS>::kProducer, FwdRegisters<WARPS>::kConsumer>;
  constexpr int kProducers = Roles::kProducers, kConsumers = Roles::kConsumers;
  using Smem = Tiles<T, D, true>;  // wgmma tiles (tile_mma.cuh)
  // Tiles as a TMA box writes them (tile_io.cuh WgTile): 64-column blocks of all the tile's rows, one after
  // another. The cp.async copies write the same.
  using QTile = WgTile<D, BM>;
  using KVTile = WgTile<D, BN>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = Smem::align(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * D;           // STAGES slots of BN rows
  T* sV = sK + STAGES * BN * D;  // likewise
  constexpr unsigned kv_slot_bytes = BN * D * sizeof(T);

  __shared__ MBarrier q_full, q_empty, k_full[STAGES], v_full[STAGES], kv_empty[STAGES];
  __shared__ FwdItem items[2];
  // The producer threads that copy: TMA's one warp (lane 0 issues, the warp waits with it), or all.
  const int copiers = tma ? 32 : kProducers;
  if (threadIdx.x == 0) {
    // Q: every copying thread's copies, and the item's fields (TMA: lane 0's one arrival, with Q's bytes).
    mbar_init(&q_full, tma ? 1 : kProducers + 1);
    mbar_init(&q_empty, WARPS);  // every consumer warp has issued its last Q Kᵀ
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&k_full[s], tma ? 1 : kProducers);
      mbar_init(&v_full[s], tma ? 1 : kProducers);
      mbar_init(&kv_empty[s], WARPS);  // every consumer warp reports it is done
    }
  }
  __syncthreads();
  // The key tiles of an item, as both sides compute them.
  const FwdWork<BN, BM, BAND, SPARSE, DROPOUT> work{lists, dropout, cu_seqlens_q, cu_seqlens_k, total_q, total_k,
                                                   max_seqlen_q, max_seqlen_k, nheads, num_m_blocks, window_left,
                                                   window_right, num_tiles, tile_counter};

  if (threadIdx.x < kProducers) {  // ---- producer: per item, Q, then K and V tile by tile ----
    Roles::become_producer();
    if (threadIdx.x >= copiers) return;
    if (tma && threadIdx.x == 0) {
      tma_prefetch(q_map);
      tma_prefetch(k_map);
      tma_prefetch(v_map);
    }
    int ring = 0;  // K/V tiles issued so far, over all items: the ring's slot and phase
    for (int n = 0;; ++n) {
      FwdItem& w = items[n % 2];
      // Q and item n - 2's fields are free once every consumer has issued item n - 1's last Q Kᵀ.
      if (n > 0) mbar_wait(&q_empty, (n - 1) & 1);
      if (threadIdx.x == 0) work.take(n, w);
      named_bar_sync(4, copiers);  // every copying thread sees the item (1-3: ConsumerTurns)
      if (w.n_blocks < 0) {
        if (threadIdx.x == 0) mbar_arrive(&q_full);
        if (!tma) mbar_arrive(&q_full);
        break;
      }
      const KeyTiles<BN, BAND, SPARSE> tiles = work.key_tiles(w);
      const int n_blocks = w.n_blocks, hk = w.h / kv_group;
      const T* k_head = k + w.b * k_sb + hk * k_sh + w.seq.k_start * k_ss;
      const T* v_head = v + w.b * v_sb + hk * v_sh + w.seq.k_start * v_ss;
      if (tma) {
        if (threadIdx.x == 0) {  // (the arrival also says the item's fields are written)
          if (n_blocks > 0) {
            mbar_arrive_expect_tx(&q_full, BM * D * sizeof(T));
            tma_load_tile<BM, D>(sQ, q_map, w.seq.q_start + w.m0, w.h, w.b, &q_full);
          } else {
            mbar_arrive(&q_full);
          }
        }
        produce_key_tiles_tma<BN, D, STAGES>(tiles, lists, w, n_blocks, ring, sK, sV, k_map, v_map, hk, k_full, v_full,
                                             kv_empty, threadIdx.x % 32);
        continue;
      }
      if (n_blocks > 0)
        load_tile_async_wg<BM, D, kProducers, T, QTile>(
            sQ, q + w.b * q_sb + w.h * q_sh + (w.seq.q_start + w.m0) * q_ss, q_ss, w.seq.seqlen_q - w.m0, head_dim);
      cp_async_mbar_arrive(&q_full);
      if (threadIdx.x == 0) mbar_arrive(&q_full);  // the item's fields are written
      produce_key_tiles<KVTile, BN, D, STAGES, kProducers>(tiles, lists, w, n_blocks, ring, sK, sV, k_head, k_ss,
                                                           v_head, v_ss, head_dim, k_full, v_full, kv_empty);
    }
    cp_async_wait_all();
    return;
  }

  // ---- consumers: warpgroup wg owns query rows [64 wg, 64 wg + 64) of each tile ----
  Roles::become_consumer();
  const int tid = threadIdx.x - kProducers, lane = tid % 32, wg = tid / 128;
  const int warp_row = warp_uniform((tid / 32) * 16);  // first row of this warp inside the tile
  const float scale_log2 = softmax_scale * kLog2e;
  int ring = 0;  // as the producer's
  for (int n = 0;; ++n) {
    mbar_wait(&q_full, n & 1);
    const FwdItem& w = items[n % 2];
    const int n_blocks = w.n_blocks;
    if (n_blocks < 0) break;
    const int m0 = w.m0, seqlen_k = w.seq.seqlen_k;
    const Band<BAND> band{seqlen_k - w.seq.seqlen_q, window_left, window_right};
    const KeyTiles<BN, BAND, SPARSE> tiles = work.key_tiles(w);
    const float alibi_slope = ALIBI ? alibi_slopes[w.b * alibi_sb + w.h] / softmax_scale : 0.f;
    float acc_o[1][D / 8][4];
    zero(acc_o);
    OnlineSoftmax<1> softmax;
    // Turns at the tensor cores (ConsumerTurns): warpgroup 0 goes first; each turn ends by granting the
    // next warpgroup its turn. Each takes n_blocks + 1 turns; the last warpgroup grants none after its
    // last, so every arrival is awaited.
    const ConsumerTurns turns{wg, kConsumers / 128};
    if (n_blocks > 0) {
      turns.start();
      float acc_s[1][BN / 8][4];
      unsigned p[BN / 16][4];  // P of the previous key tile, as the A operand of P V
      // SPARSE: where tile `it` lies in the mask is read one tile ahead, and a partial block's element bits
      // at the start of its turn: both global loads, whose latency the waits and products then hide.
      SparseTile at = tiles.at(lists, w.list, 0);
      // Turn `it` issues P V of key tile it - 1 (PV) and Q Kᵀ of tile it (QK); the first turn has no P V,
      // the last no Q Kᵀ. The three kinds are separate instances, so that no product is issued on a
      // branch (ptxas serialises every product of a kernel that does), and Q Kᵀ starts from a fresh
      // accumulator rather than zeros written while P V runs (likewise).
      auto turn = [&](int it, bool PV, bool QK) {
        const int g = ring + it, slot = g % STAGES, prev = (g + STAGES - 1) % STAGES;
        const SparseTile at_next = tiles.at(lists, w.list, it + 1 < n_blocks ? it + 1 : 0);
        PartialBits<1, BN / 8> bits;
        if constexpr (SPARSE)
          if (QK && at.slot >= 0) bits.load(lists, at.slot, m0 % lists.row_block + warp_row, at.offset, lane);
        if (QK) mbar_wait(&k_full[slot], (g / STAGES) & 1);
        if (PV) mbar_wait(&v_full[prev], ((g - 1) / STAGES) & 1);
        fence_proxy_async();  // the producer's cp.async writes (tma == 0), now visible, to the tensor cores' reads
        turns.begin();
        // OVERLAP: Q Kᵀ first, whose wait below leaves P V running while this warpgroup's softmax takes
        // tile it; O's rescale waits for P V. (Not with a block mask: its d = 64 forward measured 7% slower.)
        constexpr bool OVERLAP = !SPARSE;
        const unsigned q_rows = smem_addr(sQ) + (warp_row / 64) * 8 * QTile::group;  // this warpgroup's rows
        if (QK && OVERLAP)
          wg_mma_abt_async<T, BN, D, D, true, QTile, KVTile>(acc_s, q_rows, smem_addr(sK) + slot * kv_slot_bytes);
        if (PV) wg_mma_frag_b_async<T, BN, D, D, KVTile>(acc_o, p, smem_addr(sV) + prev * kv_slot_bytes);
        if (QK && !OVERLAP)
          wg_mma_abt_async<T, BN, D, D, true, QTile, KVTile>(acc_s, q_rows, smem_addr(sK) + slot * kv_slot_bytes);
        turns.end(!QK);
        if (PV && !OVERLAP) {  // P V is done: the slot of tile it - 1 is free once both warpgroups say so
          if (QK)
            wg_wait<1>(acc_o);
          else
            wg_wait<0>(acc_o);
          if (lane == 0) mbar_arrive(&kv_empty[prev]);
        }
        typename OnlineSoftmax<1>::Rescale rescale;
        if (QK) {
          if (PV && OVERLAP)
            wg_wait<1>(acc_s);
          else
            wg_wait<0>(acc_s);
          if (it == n_blocks - 1 && lane == 0) mbar_arrive(&q_empty);  // the producer may load the next Q
          const int n0 = tiles.first_key(lists, it, at);
          auto mask_partial = [&](float (&s)[1][BN / 8][4]) { bits.apply(s, at.offset, seqlen_k - n0, lane); };
          const ModSite site{mod, w.b, w.h, w.seq.seqlen_q, seqlen_k};
          scores_to_probs<BM, BN, BAND, SPARSE, ALIBI, SOFTCAP, DROPOUT, OVERLAP, MOD>(
              acc_s, acc_o, softmax, at, mask_partial, band, m0, warp_row, n0, seqlen_k, alibi_slope, softcap_mult,
              scale_log2, w.rng, lane, &rescale, &site);
        }
        if (PV && OVERLAP) {  // (likewise)
          wg_wait<0>(acc_o);
          if (lane == 0) mbar_arrive(&kv_empty[prev]);
        }
        if (QK) {  // O and P's registers are free of P V now
          if constexpr (OVERLAP) softmax.rescale(acc_o, rescale);
          wg_a_fragments<T, BN>(p, acc_s);
        }
        at = at_next;
      };
      turn(0, false, true);
      for (int it = 1; it < n_blocks; ++it) turn(it, true, true);
      turn(n_blocks, true, false);
      ring += n_blocks;
    } else if (lane == 0) {
      mbar_arrive(&q_empty);  // no product reads Q
    }
    // Epilogue (fwd_common.cuh): straight from registers to global memory, since sQ may already hold
    // the next item's Q. The fields of item n stay until the consumers are done with item n + 1's Q.
    store_fwd_rows_direct<T, D>(acc_o, softmax, o + w.b * o_sb + w.h * o_sh + (w.seq.q_start + m0 + warp_row) * o_ss,
                                o_ss, lse + w.b * lse_sb + w.h * lse_sh + w.seq.q_start, m0 + warp_row,
                                w.seq.seqlen_q, head_dim, softmax_scale, DROPOUT ? dropout.keep_scale : 1.f, lane);
  }
#else
  __trap();  // compiled for sm_90a only
#endif
}

}  // namespace cuflash
