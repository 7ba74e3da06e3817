// FlashAttention forward pass (FlashAttention-2 work split) on mma.sync tensor cores, sm_80+. (Hopper's
// calls at the head dims it is tuned for take flash_fwd_ws.cu: producer and consumer warpgroups, wgmma.)
//
// One thread block owns BM query rows of one (batch, head); each warp owns MT = BM / (16 * WARPS)
// tiles of 16 rows. The block walks the key/value tiles of BN rows from the last to the first:
//   S = Q K^T (tensor cores) -> mask -> online softmax (row max m, row sum l, rescale O) -> O += P V
// and finally writes O / l and the log-sum-exp. K/V tiles stream through a multi-stage cp.async ring.
#include "fwd_common.cuh"
#include "params.cuh"  // FwdParams: the kernel's parameters, field for field

namespace cuflash {

template <typename T, int D, int BM, int BN, int WARPS>
struct FwdTile {
  static constexpr int threads = WARPS * 32;
  static constexpr int m_tiles = BM / (16 * WARPS);  // 16-row tiles per warp
  static constexpr int s_tiles = BN / 8;             // 8-column tiles of S per warp row tile
  static constexpr int o_tiles = D / 8;              // 8-column tiles of O
  static constexpr int pitch = Tiles<T, D, false>::row_elems;
  static_assert(BM % (16 * WARPS) == 0 && BN % 16 == 0 && D % 16 == 0, "bad tile shape");
};

// SPARSE, BAND: which key tiles a query tile visits (fwd_common.cuh KeyTiles); ALIBI, SOFTCAP, DROPOUT:
// what happens between the two products (fwd_common.cuh scores_to_probs). The log-sum-exp is that of
// the full softmax, before dropout.
// SPLIT (fp32, 3xTF32): K and V tiles are split into their TF32 parts once as they arrive, the rest
// going to a second set of slots, instead of by every warp for every fragment (tile_io.cuh).
// MOD: the user's score and mask functions (score_fn.cuh) with their captured values `mod`.
template <typename T, int D, int BM, int BN, int WARPS, int STAGES, int BAND, bool SPARSE, bool ALIBI, bool SOFTCAP,
          bool DROPOUT, bool SPLIT = false, bool MOD = false>
__global__ void __launch_bounds__(WARPS * 32, SPARSE || ALIBI || SOFTCAP || DROPOUT ? 1 : 0)  // 0: the tuned dense tiles
flash_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ o,
                 float* __restrict__ lse, long long q_sb, long long q_ss, long long q_sh, long long k_sb,
                 long long k_ss, long long k_sh, long long v_sb, long long v_ss, long long v_sh, long long o_sb,
                 long long o_ss, long long o_sh, int max_seqlen_q, int max_seqlen_k, int nheads, int kv_group,
                 int head_dim, int num_m_blocks, int window_left, int window_right, float softmax_scale,
                 float softcap_mult,
                 const float* __restrict__ alibi_slopes, long long alibi_sb, const int* __restrict__ cu_seqlens_q,
                 const int* __restrict__ cu_seqlens_k, int total_q, int total_k, long long lse_sb, long long lse_sh,
                 const BlockLists lists,
                 const DropoutArgs dropout, unsigned* /* tile_counter */, int /* num_tiles: persistent kernels */,
                 const ModArgs mod, int tma, const __grid_constant__ TmaMap q_map,
                 const __grid_constant__ TmaMap k_map, const __grid_constant__ TmaMap v_map) {  // tma: zeros here
  static_assert(!(BAND && SPARSE), "a block mask is intersected with a causal mask or window on the host");
  using Tile = FwdTile<T, D, BM, BN, WARPS>;
  using Smem = Tiles<T, D, false>;
  constexpr int MT = Tile::m_tiles;
  static_assert(STAGES >= 2, "the K/V ring needs at least two slots");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(Smem::align(smem_raw));
  T* sK = sQ + BM * Tile::pitch;           // STAGES slots of BN rows
  T* sV = sK + STAGES * BN * Tile::pitch;  // likewise
  constexpr int kPitchBytes = Tile::pitch * sizeof(T);
  constexpr unsigned kv_slot_bytes = BN * kPitchBytes;
  static_assert(!SPLIT || ElemTraits<T>::is_f32, "split tiles are fp32 tiles");
  constexpr int kRest = SPLIT ? 2 * STAGES * kv_slot_bytes : 0;  // SPLIT: the rest of K and V, after sV

  const int tid = threadIdx.x, lane = tid % 32;
  const int warp_row = (tid / 32) * MT * 16;  // first row of this warp inside the block

  const BlockCoords<BAND, SPARSE, BM> blk(num_m_blocks, nheads, lists);
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
      seq = seq_range(cu_seqlens_q, cu_seqlens_k, blk.b, max_seqlen_q, max_seqlen_k, total_q, total_k);
      kv_heads[0] = k + blk.b * k_sb + hk * k_sh + seq.k_start * k_ss;
      kv_heads[1] = v + blk.b * v_sb + hk * v_sh + seq.k_start * v_ss;
    }
    if (SPARSE) read_list_row(lists, lists.row(blk.b, blk.h, m0 / lists.row_block), list);
    if (DROPOUT && threadIdx.x == 0) rng = DropoutRng::make(dropout, blk.bh);
  }
  __syncthreads();
  const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
  if (m0 >= seqlen_q) return;  // a packed sequence shorter than the longest
  const T* q_tile = q + blk.b * q_sb + blk.h * q_sh + (seq.q_start + m0) * q_ss;
  auto k_tile = [&](int n0) { return kv_heads[0] + n0 * k_ss; };
  auto v_tile = [&](int n0) { return kv_heads[1] + n0 * v_ss; };

  const int diag = seqlen_k - seqlen_q;
  const Band<BAND> band{diag, window_left, window_right};
  const KeyTiles<BN, BAND, SPARSE> tiles(band, lists, list, m0, BM, seqlen_k);
  const int n_blocks = tiles.count;
  const float alibi_slope = ALIBI ? alibi_slopes[blk.b * alibi_sb + blk.h] / softmax_scale : 0.f;
  float acc_o[MT][Tile::o_tiles][4];
  zero(acc_o);
  OnlineSoftmax<MT, ElemTraits<T>::is_f32> softmax;
  const float scale_log2 = softmax_scale * kLog2e;

  // K/V tiles go through a ring of STAGES shared-memory slots: tile `it` (counting from the last key
  // tile down) is loaded STAGES - 1 iterations ahead of its use, so its latency hides behind whole
  // iterations of tensor-core work; one barrier per iteration frees the slot the next load reuses.
  auto load_kv = [&](int it) {
    const int n0 = tiles.first_key(lists, it, tiles.at(lists, list, it)), slot = it % STAGES;
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
    if constexpr (SPLIT) {  // this thread's chunks of tile `it` are in
      T* kv = sK + (it % STAGES) * BN * Tile::pitch;
      split_tile_tf32<BN, D, Tile::threads>(kv, kv + kRest / sizeof(T));
      kv = sV + (it % STAGES) * BN * Tile::pitch;
      split_tile_tf32<BN, D, Tile::threads>(kv, kv + kRest / sizeof(T));
    }
    Smem::publish();
    __syncthreads();  // tile `it` is in; every warp is done with the slot of tile it - 1
    if (it + STAGES - 1 < n_blocks) load_kv(it + STAGES - 1);
    cp_async_commit();

    const SparseTile at = tiles.at(lists, list, it);
    const int n0 = tiles.first_key(lists, it, at), slot = it % STAGES;
    float acc_s[MT][Tile::s_tiles][4];
    zero(acc_s);
    Smem::template mma_abt<MT, BN, D, false, kRest>(acc_s, smem_addr(sQ), warp_row, smem_addr(sK) + slot * kv_slot_bytes,
                                                 lane);
    Smem::template wait<0>(acc_s);
    auto mask_partial = [&](float (&s)[MT][BN / 8][4]) {  // SPARSE: the bits read where they are used
      if constexpr (SPARSE)
        mask_partial_block(s, lists, at.slot, m0 % lists.row_block + warp_row, at.offset, seqlen_k - n0, lane);
    };
    const ModSite site{mod, blk.b, blk.h, seqlen_q, seqlen_k};
    scores_to_probs<BM, BN, BAND, SPARSE, ALIBI, SOFTCAP, DROPOUT, false, MOD>(
        acc_s, acc_o, softmax, at, mask_partial, band, m0, warp_row, n0, seqlen_k, alibi_slope, softcap_mult,
        scale_log2, rng, lane, nullptr, &site);
    Smem::template mma_pb<MT, BN, D, false, kRest>(acc_o, acc_s, smem_addr(sV) + slot * kv_slot_bytes, 0, lane);
    Smem::template wait<0>(acc_o);
  }

  // Epilogue (fwd_common.cuh store_fwd_rows), through this warp's own rows of the Q tile. The block's
  // coordinates are derived again rather than kept in registers through the main loop.
  const BlockCoords<BAND, SPARSE, BM> out_blk(num_m_blocks, nheads, lists);
  const int out_m0 = out_blk.m_block * BM;
  T* stage = sQ + warp_row * Tile::pitch;
  store_fwd_rows<T, D>(acc_o, softmax, [=](int r, int c) { return stage + r * Tile::pitch + c; },
                       o + out_blk.b * o_sb + out_blk.h * o_sh + (seq.q_start + out_m0 + warp_row) * o_ss, o_ss,
                       lse + out_blk.b * lse_sb + out_blk.h * lse_sh + seq.q_start, out_m0 + warp_row, seqlen_q,
                       head_dim, softmax_scale, DROPOUT ? dropout.keep_scale : 1.f, lane);
}

}  // namespace cuflash

namespace cuflash {

// Learnable attention sinks (gpt-oss): per query head a logit that joins every softmax row without a
// value. After the forward, each row's LSE becomes LSE' = log(e^LSE + e^sink) and its O is scaled by
// e^(LSE - LSE'); the backward needs nothing else (it recomputes P from LSE', and delta from the scaled O).
// A warp per row: (batch, head, query) from the flat row index, as lse lies (dense (batch, nheads, seqlen),
// packed (nheads, total) with batch 1).
template <typename T>
__global__ void __launch_bounds__(128)
flash_fwd_sinks_kernel(T* __restrict__ o, float* __restrict__ lse, const float* __restrict__ sinks, long long o_sb,
                       long long o_ss, long long o_sh, long long lse_sb, long long lse_sh, int seqlen, int nheads,
                       int head_dim, long long rows) {
  const long long row = blockIdx.x * 4ll + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32, i = static_cast<int>(row % seqlen);
  const long long bh = row / seqlen;
  const int h = static_cast<int>(bh % nheads), b = static_cast<int>(bh / nheads);
  float* at = lse + b * lse_sb + h * lse_sh + i;
  const float old = *at, sink = sinks[h], top = fmaxf(old, sink);
  const float now = top + logf(expf(old - top) + expf(sink - top));  // old = -inf (no key): the sink alone
  const float factor = expf(old - now);
  __syncwarp();
  if (lane == 0) *at = now;
  T* orow = o + b * o_sb + h * o_sh + i * o_ss;
  for (int c = lane; c < head_dim; c += 32) orow[c] = static_cast<T>(static_cast<float>(orow[c]) * factor);
}

}  // namespace cuflash
