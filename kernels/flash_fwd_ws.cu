// FlashAttention forward on Hopper (sm_90a), warp-specialised: the thread block's first warpgroup only
// copies tiles into shared memory (the producer) and two more warpgroups of 64 query rows each only
// compute (the consumers):
//   S = Q K^T (wgmma) -> scores to probabilities (fwd_common.cuh) -> O += P V (wgmma)
// Nothing stops the whole block inside the loop. Each K/V slot of the ring has mbarriers that say its
// K or V tile has landed (the producer's cp.async copies report to them) and that both consumers are
// done with it. The consumers take turns at the tensor cores through two named barriers, so one
// warpgroup's softmax runs while the other's products do; a turn issues P V of the previous key tile
// together with Q K^T of the next.
#include "fwd_common.cuh"
#include "mbarrier.cuh"

namespace cuflash {

constexpr int kProducerRegisters = 40, kConsumerRegisters = 232;  // 128 * 40 + 256 * 232 <= 65536

template <typename T, int D, int BM, int BN, int WARPS, int STAGES, int BAND, bool SPARSE, bool ALIBI, bool SOFTCAP,
          bool DROPOUT>
__global__ void __launch_bounds__(WARPS * 32 + 128, 1)
flash_fwd_ws_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                    float* __restrict__ lse, long long q_sb, long long q_ss, long long q_sh, long long k_sb,
                    long long k_ss, long long k_sh, long long v_sb, long long v_ss, long long v_sh, long long o_sb,
                    long long o_ss, long long o_sh, int max_seqlen_q, int max_seqlen_k, int nheads, int kv_group,
                    int head_dim, int num_m_blocks, int window_left, int window_right, float softmax_scale,
                    float softcap_mult, const float* __restrict__ alibi_slopes, long long alibi_sb,
                    const int* __restrict__ cu_seqlens_q, const int* __restrict__ cu_seqlens_k, long long lse_sb,
                    long long lse_sh, const BlockLists lists, const DropoutArgs dropout) {
#ifdef CUFLASH_HAS_WGMMA
  static_assert(!(BAND && SPARSE), "a block mask is intersected with a causal mask or window on the host");
  static_assert(WARPS == 8 && BM == 16 * WARPS, "two consumer warpgroups of 64 rows");
  static_assert(BN % 16 == 0 && D % 16 == 0 && sizeof(T) == 2, "bad tile shape");
  constexpr int kProducers = 128, kConsumers = WARPS * 32;
  using Smem = Tiles<T, D, true>;  // wgmma tiles (tile_mma.cuh)
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* smem = Smem::align(smem_raw);
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + BM * D;           // STAGES slots of BN rows
  T* sV = sK + STAGES * BN * D;  // likewise
  constexpr unsigned kv_slot_bytes = BN * D * sizeof(T);

  __shared__ MBarrier q_full, k_full[STAGES], v_full[STAGES], kv_empty[STAGES];
  __shared__ const T* kv_heads[2];
  __shared__ SeqRange seq;
  __shared__ ListRow list;
  __shared__ DropoutRng rng;
  const BlockCoords<BAND, SPARSE, BM> blk(num_m_blocks, nheads, lists);
  const int m0 = blk.m_block * BM;
  {
    const int hk = blk.h / kv_group;
    if (threadIdx.x == 0) {
      seq = seq_range(cu_seqlens_q, cu_seqlens_k, blk.b, max_seqlen_q, max_seqlen_k);
      kv_heads[0] = k + blk.b * k_sb + hk * k_sh + seq.k_start * k_ss;
      kv_heads[1] = v + blk.b * v_sb + hk * v_sh + seq.k_start * v_ss;
      mbar_init(&q_full, kProducers);  // every producer thread reports its copies
      for (int s = 0; s < STAGES; ++s) {
        mbar_init(&k_full[s], kProducers);
        mbar_init(&v_full[s], kProducers);
        mbar_init(&kv_empty[s], WARPS);  // every consumer warp reports it is done
      }
    }
    if (SPARSE) read_list_row(lists, lists.row(blk.b, blk.h, m0 / lists.row_block), list);
    if (DROPOUT && threadIdx.x == 0) rng = DropoutRng::make(dropout, blk.bh);
  }
  __syncthreads();
  const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
  if (m0 >= seqlen_q) return;  // a packed sequence shorter than the longest
  const int diag = seqlen_k - seqlen_q;
  const Band<BAND> band{diag, window_left, window_right};
  const KeyTiles<BN, BAND, SPARSE> tiles(band, lists, list, m0, BM, seqlen_k);
  const int n_blocks = tiles.count;

  if (threadIdx.x < kProducers) {  // ---- producer: Q once, then K and V tile by tile ----
    warpgroup_release_registers<kProducerRegisters>();
    if (n_blocks > 0)
      Smem::template load<BM, kProducers>(sQ, q + blk.b * q_sb + blk.h * q_sh + (seq.q_start + m0) * q_ss, q_ss,
                                          seqlen_q - m0, head_dim);
    cp_async_mbar_arrive(&q_full);
    for (int it = 0; it < n_blocks; ++it) {
      const int slot = it % STAGES;
      if (it >= STAGES) mbar_wait(&kv_empty[slot], (it / STAGES - 1) & 1);  // the slot's last tile is done
      const int n0 = tiles.first_key(lists, it, tiles.at(lists, list, it));
      Smem::template load<BN, kProducers>(sK + slot * BN * D, kv_heads[0] + n0 * k_ss, k_ss, seqlen_k - n0, head_dim);
      cp_async_mbar_arrive(&k_full[slot]);
      Smem::template load<BN, kProducers>(sV + slot * BN * D, kv_heads[1] + n0 * v_ss, v_ss, seqlen_k - n0, head_dim);
      cp_async_mbar_arrive(&v_full[slot]);
    }
    cp_async_wait_all();
    return;
  }

  // ---- consumers: warpgroup wg owns query rows [64 wg, 64 wg + 64) of the tile ----
  warpgroup_claim_registers<kConsumerRegisters>();
  const int tid = threadIdx.x - kProducers, lane = tid % 32, wg = tid / 128;
  const int warp_row = (tid / 32) * 16;  // first row of this warp inside the tile
  const float alibi_slope = ALIBI ? alibi_slopes[blk.b * alibi_sb + blk.h] / softmax_scale : 0.f;
  const float scale_log2 = softmax_scale * 1.4426950408889634f;
  float acc_o[1][D / 8][4];
  zero(acc_o);
  OnlineSoftmax<1> softmax;
  // Turns at the tensor cores: named barrier 1 + w opens warpgroup w's turn, which the other one's
  // arrival grants. Warpgroup 0 goes first; each turn ends by granting the other warpgroup its next.
  // Both take n_blocks + 1 turns; warpgroup 1 grants none after its last, so every arrival is awaited.
  auto begin_turn = [&] { named_bar_sync(1 + wg, kConsumers); };
  auto end_turn = [&](bool last) {
    if (!(last && wg == 1)) named_bar_arrive(2 - wg, kConsumers);
  };
  if (n_blocks > 0) {
    if (wg == 1) named_bar_arrive(1, kConsumers);
    mbar_wait(&q_full, 0);
    float acc_s[1][BN / 8][4];
    unsigned p[BN / 16][4];  // P of the previous key tile, as the A operand of P V
    // SPARSE: where tile `it` lies in the mask is read one tile ahead, and a partial block's element bits
    // at the start of its turn: both global loads, whose latency the waits and products then hide.
    SparseTile at = tiles.at(lists, list, 0);
    // Turn `it` issues P V of key tile it - 1 (PV) and Q Kᵀ of tile it (QK); the first turn has no P V,
    // the last no Q Kᵀ. The three kinds are separate instances, so that no product is issued on a
    // branch (ptxas serialises every product of a kernel that does), and Q Kᵀ starts from a fresh
    // accumulator rather than zeros written while P V runs (likewise).
    auto turn = [&](int it, bool PV, bool QK) {
      const int slot = it % STAGES, prev = (it + STAGES - 1) % STAGES;
      const SparseTile at_next = tiles.at(lists, list, it + 1 < n_blocks ? it + 1 : 0);
      PartialBits<1, BN / 8> bits;
      if constexpr (SPARSE)
        if (QK && at.slot >= 0) bits.load(lists, at.slot, m0 % lists.row_block + warp_row, at.offset, lane);
      if (QK) mbar_wait(&k_full[slot], (it / STAGES) & 1);
      if (PV) mbar_wait(&v_full[prev], ((it - 1) / STAGES) & 1);
      fence_proxy_async();  // the producer's cp.async writes, now visible, to the tensor cores' reads
      begin_turn();
      if (PV) wg_mma_frag_b_async<T, BN, D, D>(acc_o, p, smem_addr(sV) + prev * kv_slot_bytes);
      if (QK)
        Smem::template mma_abt<1, BN, D, true>(acc_s, smem_addr(sQ), warp_row, smem_addr(sK) + slot * kv_slot_bytes,
                                               lane);
      end_turn(!QK);
      if (PV) {  // P V is done: the slot of tile it - 1 is free once both warpgroups say so
        if (QK)
          wg_wait<1>(acc_o);
        else
          wg_wait<0>(acc_o);
        if (lane == 0) mbar_arrive(&kv_empty[prev]);
      }
      if (QK) {
        wg_wait<0>(acc_s);
        const int n0 = tiles.first_key(lists, it, at);
        auto mask_partial = [&](float (&s)[1][BN / 8][4]) { bits.apply(s, at.offset, seqlen_k - n0, lane); };
        scores_to_probs<BM, BN, BAND, SPARSE, ALIBI, SOFTCAP, DROPOUT>(acc_s, acc_o, softmax, at, mask_partial, band,
                                                                       m0, warp_row, n0, seqlen_k, alibi_slope,
                                                                       softcap_mult, scale_log2, rng, lane);
        wg_a_fragments<T, BN>(p, acc_s);
      }
      at = at_next;
    };
    turn(0, false, true);
    for (int it = 1; it < n_blocks; ++it) turn(it, true, true);
    turn(n_blocks, true, false);
  }

  // Epilogue (fwd_common.cuh), through this warp's own rows of the (swizzled) Q tile: row r, column c at
  // wg_tile_offset (tile_io.cuh), so that the stores and the 16-byte reads meet no bank conflicts.
  const BlockCoords<BAND, SPARSE, BM> out_blk(num_m_blocks, nheads, lists);
  const int out_m0 = out_blk.m_block * BM;
  store_fwd_rows<T, D>(acc_o, softmax, [=](int r, int c) { return reinterpret_cast<T*>(smem + wg_tile_offset<D>(warp_row + r, c)); },
                       o + out_blk.b * o_sb + out_blk.h * o_sh + (seq.q_start + out_m0 + warp_row) * o_ss, o_ss,
                       lse + out_blk.b * lse_sb + out_blk.h * lse_sh + seq.q_start, out_m0 + warp_row, seqlen_q,
                       head_dim, softmax_scale, DROPOUT ? dropout.keep_scale : 1.f, lane);
#else
  __trap();  // compiled for sm_90a only
#endif
}

}  // namespace cuflash
