// FlashAttention forward pass (FlashAttention-2 work split) on mma.sync tensor cores, sm_80+, or with
// WG on Hopper's warpgroup wgmma (tile_mma.cuh; warps of 16 rows, four to a warpgroup).
//
// One thread block owns BM query rows of one (batch, head); each warp owns MT = BM / (16 * WARPS)
// tiles of 16 rows. The block walks the key/value tiles of BN rows from the last to the first:
//   S = Q K^T (tensor cores) -> mask -> online softmax (row max m, row sum l, rescale O) -> O += P V
// and finally writes O / l and the log-sum-exp. K/V tiles stream through a multi-stage cp.async ring.
#include "band.cuh"
#include "block_sparse.cuh"
#include "dropout.cuh"
#include "mma.cuh"
#include "score_mods.cuh"
#include "softmax.cuh"
#include "tile_mma.cuh"
#include "varlen.cuh"

namespace cuflash {

template <typename T, int D, int BM, int BN, int WARPS, bool WG>
struct FwdTile {
  static constexpr int threads = WARPS * 32;
  static constexpr int m_tiles = BM / (16 * WARPS);  // 16-row tiles per warp
  static constexpr int s_tiles = BN / 8;             // 8-column tiles of S per warp row tile
  static constexpr int o_tiles = D / 8;              // 8-column tiles of O
  static constexpr int pitch = Tiles<T, D, WG>::row_elems;
  static_assert(BM % (16 * WARPS) == 0 && BN % 16 == 0 && D % 16 == 0, "bad tile shape");
  static_assert(!WG || (m_tiles == 1 && WARPS % 4 == 0), "wgmma: warpgroups of 64 rows");
};

// Set S to -inf where visible(i, j) is false for query i and key j (rows from row0, keys from col0).
template <int MT, int NTILES, typename Visible>
__device__ __forceinline__ void mask_scores(float (&acc_s)[MT][NTILES][4], int row0, int col0, int lane,
                                            const Visible& visible) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NTILES; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const int i = row0 + mt * 16 + lane / 4 + (c / 2) * 8;
        const int j = col0 + nt * 8 + (lane % 4) * 2 + c % 2;
        if (!visible(i, j)) acc_s[mt][nt][c] = kNegInf;
      }
}

// Thread block -> (query tile, batch, head); query tiles of one head are neighbours in launch order.
// REVERSE (with a band): the last query tiles of a head start first (the heaviest, when causal).
// blockIdx is read through a volatile asm so that a second instance recomputes the coordinates instead
// of keeping them live (and spilled).
template <bool REVERSE>
struct BlockCoords {
  int m_block, b, h, bh;  // the grid has < 2^31 blocks, so 32 bits suffice
  __device__ __forceinline__ BlockCoords(int num_m_blocks, int nheads) {
    unsigned block;
    asm volatile("mov.u32 %0, %%ctaid.x;" : "=r"(block));
    bh = block / num_m_blocks;
    m_block = block - bh * num_m_blocks;
    if (REVERSE) m_block = num_m_blocks - 1 - m_block;
    b = bh / nheads;
    h = bh - b * nheads;
  }
};

// SPARSE: visit only the key tiles a block mask lists for this query tile (see block_sparse.cuh);
// otherwise every key tile inside the band (BAND: kNoBand, kCausal or kWindow, band.cuh), from the last
// to the first.
// ALIBI: add -slope * |i + diag - j| to the scaled scores (slopes per head, or per batch and head).
// SOFTCAP: scores s -> cap * tanh(s / cap), with softmax_scale = cap and softcap_mult = scale / cap.
// DROPOUT: after the row sums have taken P, dropped entries of P are zeroed (dropout.cuh) and O is
// scaled by 1 / keep probability; the log-sum-exp is that of the full softmax.
template <typename T, int D, int BM, int BN, int WARPS, int STAGES, int BAND, bool SPARSE, bool ALIBI, bool SOFTCAP,
          bool DROPOUT, bool WG>
__global__ void __launch_bounds__(WARPS * 32, SPARSE || ALIBI || SOFTCAP || DROPOUT ? 1 : 0)  // 0: the tuned dense tiles
flash_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                 float* __restrict__ lse, long long q_sb, long long q_ss, long long q_sh, long long k_sb,
                 long long k_ss, long long k_sh, long long v_sb, long long v_ss, long long v_sh, long long o_sb,
                 long long o_ss, long long o_sh, int max_seqlen_q, int max_seqlen_k, int nheads, int kv_group,
                 int head_dim, int num_m_blocks, int window_left, int window_right, float softmax_scale,
                 float softcap_mult,
                 const float* __restrict__ alibi_slopes, long long alibi_sb, const int* __restrict__ cu_seqlens_q,
                 const int* __restrict__ cu_seqlens_k, long long lse_sb, long long lse_sh, const BlockLists lists,
                 const DropoutArgs dropout) {
  static_assert(!(BAND && SPARSE), "a block mask is intersected with a causal mask or window on the host");
  using Tile = FwdTile<T, D, BM, BN, WARPS, WG>;
  using Smem = Tiles<T, D, WG>;
  constexpr int MT = Tile::m_tiles;
  static_assert(STAGES >= 2, "the K/V ring needs at least two slots");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(smem_raw);
  T* sK = sQ + BM * Tile::pitch;           // STAGES slots of BN rows
  T* sV = sK + STAGES * BN * Tile::pitch;  // likewise
  constexpr int kPitchBytes = Tile::pitch * sizeof(T);
  constexpr unsigned kv_slot_bytes = BN * kPitchBytes;

  const int tid = threadIdx.x, lane = tid % 32;
  const int warp_row = (tid / 32) * MT * 16;  // first row of this warp inside the block

  const BlockCoords<BAND != kNoBand> blk(num_m_blocks, nheads);
  const int m0 = blk.m_block * BM;
  // This block's sequences and K and V heads. Kept in shared memory, not registers: the main loop
  // needs every register for accumulators, and a shared-memory load per tile is cheap.
  __shared__ const T* kv_heads[2];
  __shared__ SeqRange seq;
  __shared__ ListRow list;  // SPARSE: this query tile's list of key blocks
  __shared__ DropoutRng rng;
  {
    const int hk = blk.h / kv_group;
    if (threadIdx.x == 0) {
      seq = seq_range(cu_seqlens_q, cu_seqlens_k, blk.b, max_seqlen_q, max_seqlen_k);
      kv_heads[0] = k + blk.b * k_sb + hk * k_sh + seq.k_start * k_ss;
      kv_heads[1] = v + blk.b * v_sb + hk * v_sh + seq.k_start * v_ss;
    }
    if (SPARSE) read_list_row(lists, lists.row(blk.b, blk.h, m0 / lists.block_m), list);
    if (DROPOUT && threadIdx.x == 0) rng = DropoutRng::make(dropout, blk.bh);
  }
  __syncthreads();
  const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
  if (m0 >= seqlen_q) return;  // a packed sequence shorter than the longest
  const T* q_tile = q + blk.b * q_sb + blk.h * q_sh + (seq.q_start + m0) * q_ss;
  auto k_tile = [&](int n0) { return kv_heads[0] + n0 * k_ss; };
  auto v_tile = [&](int n0) { return kv_heads[1] + n0 * v_ss; };

  // Key tiles this query tile can see: n_blocks of them from tile n_first.
  const int diag = seqlen_k - seqlen_q;
  const Band<BAND> band{diag, window_left, window_right};
  int n_first = 0, n_blocks = (seqlen_k + BN - 1) / BN;
  if (BAND) band.key_tiles(m0, m0 + BM - 1, seqlen_k, BN, n_first, n_blocks);
  if (SPARSE) n_blocks = list.count * (lists.block_n / BN);
  // Tile `it` in the mask (SPARSE), and its first key.
  auto mask_tile = [&](int it) {
    return SPARSE ? sparse_tile(lists, list.entries, it, lists.block_n / BN, BN) : SparseTile{0, -1, 0};
  };
  auto first_key = [&](int it, const SparseTile& at) {
    return SPARSE ? at.block * lists.block_n + at.offset : (n_first + n_blocks - 1 - it) * BN;
  };

  const float alibi_slope = ALIBI ? alibi_slopes[blk.b * alibi_sb + blk.h] / softmax_scale : 0.f;
  float acc_o[MT][Tile::o_tiles][4];
  zero(acc_o);
  OnlineSoftmax<MT, ElemTraits<T>::is_f32> softmax;
  const float scale_log2 = softmax_scale * 1.4426950408889634f;

  // K/V tiles go through a ring of STAGES shared-memory slots: tile `it` (counting from the last key
  // tile down) is loaded STAGES - 1 iterations ahead of its use, so its latency hides behind whole
  // iterations of tensor-core work; one barrier per iteration frees the slot the next load reuses.
  auto load_kv = [&](int it) {
    const int n0 = first_key(it, mask_tile(it)), slot = it % STAGES;
    Smem::template load<BN, Tile::threads>(sK + slot * BN * Tile::pitch, k_tile(n0), k_ss, seqlen_k - n0, head_dim);
    Smem::template load<BN, Tile::threads>(sV + slot * BN * Tile::pitch, v_tile(n0), v_ss, seqlen_k - n0, head_dim);
  };
  if (n_blocks > 0) Smem::template load<BM, Tile::threads>(sQ, q_tile, q_ss, seqlen_q - m0, head_dim);
#pragma unroll
  for (int it = 0; it < STAGES - 1; ++it) {
    if (it < n_blocks) load_kv(it);
    cp_async_commit();  // one group per stage, empty or not, so wait_group counts stay uniform
  }

  for (int it = 0; it < n_blocks; ++it) {
    cp_async_wait<STAGES - 2>();
    Smem::publish();
    __syncthreads();  // tile `it` is in; every warp is done with the slot of tile it - 1
    if (it + STAGES - 1 < n_blocks) load_kv(it + STAGES - 1);
    cp_async_commit();

    const SparseTile at = mask_tile(it);
    const int n0 = first_key(it, at), slot = it % STAGES;
    float acc_s[MT][Tile::s_tiles][4];
    zero(acc_s);
    Smem::template mma_abt<MT, BN, D>(acc_s, smem_addr(sQ), warp_row, smem_addr(sK) + slot * kv_slot_bytes, lane);
    Smem::template wait<0>(acc_s);

    if constexpr (SOFTCAP) apply_softcap<ElemTraits<T>::is_f32>(acc_s, softcap_mult);
    if constexpr (ALIBI) add_alibi(acc_s, m0 + warp_row, n0, diag, alibi_slope, lane);
    auto in_range = [&](int i, int j) { return j < seqlen_k && (!BAND || band.visible(i, j)); };
    if constexpr (SPARSE) {
      if (at.slot >= 0)  // a partial block: its element bits decide
        mask_partial_block(acc_s, lists, at.slot, m0 % lists.block_m + warp_row, at.offset, seqlen_k - n0, lane);
      else if (n0 + BN > seqlen_k)
        mask_scores(acc_s, m0 + warp_row, n0, lane, in_range);
    } else if (n0 + BN > seqlen_k || (BAND && !band.covers(m0, m0 + BM - 1, n0, n0 + BN - 1))) {
      mask_scores(acc_s, m0 + warp_row, n0, lane, in_range);
    }

    softmax.update(acc_s, acc_o, scale_log2, lane);  // acc_s now holds P (unnormalised)
    if constexpr (DROPOUT) rng.drop_rows_queries<false>(acc_s, m0 + warp_row, n0, lane);
    Smem::template mma_pb<MT, BN, D>(acc_o, acc_s, smem_addr(sV) + slot * kv_slot_bytes, 0, lane);
    Smem::template wait<0>(acc_o);
  }

  // Epilogue: O = acc_o / l, LSE = m * scale + log(l). Rows that saw no key: O = 0, LSE = -inf.
  // The block's coordinates are derived again rather than kept in registers through the main loop.
  const BlockCoords<BAND != kNoBand> out_blk(num_m_blocks, nheads);
  const int out_m0 = out_blk.m_block * BM;
  float* lse_head = lse + out_blk.b * lse_sb + out_blk.h * lse_sh + seq.q_start;
  // O goes out through this warp's own rows of the Q tile (tile_io.cuh; wgmma tiles: the same bytes,
  // as unpadded rows). Each row's scale is 1 / l, and its log-sum-exp is written on the way.
  T* sO = sQ + warp_row * Tile::pitch;
  stage_rows(acc_o, sO, Tile::pitch, lane, [&](int mt, int half) {
    const float l = softmax.row_sum_total(mt, half);
    const int row = out_m0 + warp_row + mt * 16 + lane / 4 + half * 8;
    if (lane % 4 == 0 && row < seqlen_q)
      lse_head[row] = l > 0.f ? softmax.row_max[mt][half] * softmax_scale + logf(l) : kNegInf;
    return l > 0.f ? (DROPOUT ? dropout.keep_scale : 1.f) / l : 0.f;
  });
  copy_rows_out<MT * 16, D>(o + out_blk.b * o_sb + out_blk.h * o_sh + (seq.q_start + out_m0 + warp_row) * o_ss, o_ss,
                            sO, Tile::pitch, seqlen_q - out_m0 - warp_row, head_dim, lane);
}

}  // namespace cuflash
