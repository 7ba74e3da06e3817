// FlashAttention backward pass: gradients recomputed tile by tile from Q, K, V, dO and the saved
// log-sum-exp, never reading or writing an N x N matrix. Three kernels, none with atomics, so the
// gradients are bitwise reproducible:
//   flash_bwd_preprocess_kernel  delta_i = rowsum(dO_i * O_i)                       (fp32)
//   flash_bwd_dkdv_kernel        a block owns BN keys and walks the query tiles (and, for GQA, every
//                                query head of its K/V head): Sᵀ = K Qᵀ, Pᵀ = exp(Sᵀ - lse),
//                                dV += Pᵀ dO, dPᵀ = V dOᵀ, dSᵀ = Pᵀ (dPᵀ - delta), dK += dSᵀ Q
//   flash_bwd_dq_kernel          a block owns BM queries and walks the key tiles:
//                                S = Q Kᵀ, P = exp(S - lse), dP = dO Vᵀ, dS = P (dP - delta), dQ += dS K
// dK and dQ carry the softmax scale. Score modifications (score_mods.cuh: ALiBi, softcap) apply to the
// recomputed S exactly as in the forward; softcap also multiplies dS by its derivative. Dropout
// regenerates the forward's mask (dropout.cuh): dV takes the dropped, rescaled P, dS = P (dP ∘ M - delta).
// Working on Sᵀ (keys as rows) lets every product of the dK/dV kernel use the same two shapes as the
// forward pass. WG: the products run as Hopper warpgroup wgmma on swizzled tiles (tile_mma.cuh). On Hopper,
// block masks take warp-specialised versions of the dK/dV and dQ kernels (flash_bwd_dkdv_ws_kernel,
// flash_bwd_dq_ws_kernel): a producer warpgroup copies, two consumer warpgroups take turns at the tensor cores.
#include "band.cuh"
#include "block_sparse.cuh"
#include "bwd_common.cuh"  // BwdScores: scores to P and dS
#include "dq_accum.cuh"
#include "dropout.cuh"
#include "fwd_common.cuh"  // BlockCoords, KeyTiles
#include "mbarrier.cuh"
#include "mma.cuh"
#include "params.cuh"  // Bwd*Params: the kernels' parameters, field for field
#include "score_mods.cuh"
#include "tile_mma.cuh"
#include "varlen.cuh"

namespace cuflash {

// delta = sum_d dO * O in fp32 for each row of (batch, head, query): row_lanes lanes per row (a power
// of two <= 32 covering its 16-byte chunks, so that no lane idles at small head dims), kRows rows per
// thread (their loads in flight together), blocks_per_bh blocks per (batch, head). A block's (batch,
// head) comes from one 32-bit division: per-row 64-bit divisions made this kernel compute-bound (53 us
// under ncu for 16K x 16 heads x 128 on the H200, FlexAttention's 34; 41 -> 38 us timed).
// tile_stats (if not null): each row's lse (as neg_lse_units) and delta again, in the layout the
// warp-specialised dK/dV kernel copies with its query tiles by TMA (dq_accum.cuh tile_stats_row).
template <typename T>
__global__ void __launch_bounds__(128)
flash_bwd_preprocess_kernel(const T* __restrict__ dout, const T* __restrict__ out, float* __restrict__ delta,
                            long long do_sb, long long do_ss, long long do_sh, long long o_sb, long long o_ss,
                            long long o_sh, int seqlen_q, int nheads, int head_dim, int blocks_per_bh, int row_lanes,
                            const float* __restrict__ lse, float* __restrict__ tile_stats) {
  constexpr int kRows = 4;  // _dispatch.PREPROCESS_ROWS
  const unsigned bh = blockIdx.x / static_cast<unsigned>(blocks_per_bh);
  const int per_pass = 128 / row_lanes;
  const int i0 = static_cast<int>(blockIdx.x - bh * blocks_per_bh) * per_pass * kRows + threadIdx.x / row_lanes;
  const int lane = threadIdx.x % row_lanes, h = static_cast<int>(bh % nheads), b = static_cast<int>(bh / nheads);
  const T* do_head = dout + b * do_sb + h * do_sh;
  const T* o_head = out + b * o_sb + h * o_sh;
  float acc[kRows];
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    const int i = i0 + r * per_pass;
    acc[r] = 0.f;
    if (i < seqlen_q)
      for (int c = lane * kChunk<T>; c < head_dim; c += row_lanes * kChunk<T>)
        acc[r] += dot_chunk(do_head + i * do_ss + c, o_head + i * o_ss + c);
  }
#pragma unroll
  for (int r = 0; r < kRows; ++r) {
    for (int off = row_lanes / 2; off > 0; off /= 2) acc[r] += __shfl_xor_sync(0xffffffffu, acc[r], off);
    const int i = i0 + r * per_pass;
    if (i < seqlen_q && lane == 0) {
      delta[static_cast<long long>(bh) * seqlen_q + i] = acc[r];
      if (tile_stats != nullptr) {
        tile_stats[tile_stats_row(bh, 0, seqlen_q) + i] = neg_lse_units(lse[static_cast<long long>(bh) * seqlen_q + i]);
        tile_stats[tile_stats_row(bh, 1, seqlen_q) + i] = acc[r];
      }
    }
  }
}

// dQ = dq_accum * softmax_scale in T, after a dK/dV kernel that accumulated it (dq_accum.cuh): a block per
// accumulator tile (batch element, query head, 64 rows; blocks past a packed sequence's end return). The
// tile is read a float4 per thread in turn (two rows' pairs of columns, in the accumulator's fragment
// order), put in row order in shared memory, and written out in 16-byte pieces of rows: stored straight
// from the fragment order, each warp's 4-byte pairs fell on 8 rows and ran at a third of the bandwidth.
template <typename T, int D>
__global__ void __launch_bounds__(128)
flash_bwd_dq_convert_kernel(const float* __restrict__ dq_accum, T* __restrict__ dq, long long dq_sb, long long dq_ss,
                            long long dq_sh, const int* __restrict__ cu_seqlens_q, int max_seqlen_q, int total_q,
                            int nheads, int head_dim, int m_tiles, float softmax_scale) {
  constexpr int DQN = dq_chunk_cols(D), kChunk = kDqTileRows * DQN;  // a warpgroup's chunk of a tile (dq_accum.cuh)
  static_assert(sizeof(T) == 2, "16-bit outputs: a 16-byte piece is 8 elements");
  constexpr int kPitch = D + 8;  // elements a staged row takes: 16 bytes of padding against bank conflicts
  __shared__ __align__(16) T stage[kDqTileRows * kPitch];
  const int m_tile = static_cast<int>(blockIdx.x % m_tiles), bh = static_cast<int>(blockIdx.x / m_tiles);
  const int h = bh % nheads, b = bh / nheads;
  const SeqRange seq = seq_range(cu_seqlens_q, cu_seqlens_q, b, max_seqlen_q, max_seqlen_q, total_q, total_q);
  const int m0 = m_tile * kDqTileRows;
  if (m0 >= seq.seqlen_q) return;
  const float* tile = dq_accum + dq_accum_tile(seq, cu_seqlens_q != nullptr, b, h, nheads, m_tile) * D * kDqTileRows;
  T* out = dq + b * dq_sb + h * dq_sh + static_cast<long long>(seq.q_start + m0) * dq_ss;
  const int rows = min(seq.seqlen_q - m0, kDqTileRows);
#pragma unroll 4
  for (int f = threadIdx.x; f < kDqTileRows * D / 4; f += 128) {
    const float4 x = reinterpret_cast<const float4*>(tile)[f];
    const int chunk = f / (kChunk / 4), nt = f % (kChunk / 4) / 128, t = f % 128;  // t: the staging thread
    const int r = (t / 32) * 16 + (t % 32) / 4, c = chunk * DQN + nt * 8 + (t % 4) * 2;
    store2(stage + r * kPitch + c, x.x * softmax_scale, x.y * softmax_scale);
    store2(stage + (r + 8) * kPitch + c, x.z * softmax_scale, x.w * softmax_scale);
  }
  __syncthreads();
  for (int i = threadIdx.x; i < rows * (D / 8); i += 128) {
    const int r = i / (D / 8), c = i % (D / 8) * 8;
    if (c >= head_dim) continue;
    const T* src = stage + r * kPitch + c;
    T* dst = out + r * dq_ss + c;
    if (c + 8 <= head_dim && reinterpret_cast<unsigned long long>(dst) % 16 == 0) {
      *reinterpret_cast<uint4*>(dst) = *reinterpret_cast<const uint4*>(src);
    } else {  // the row's end, or an output view not 16-byte aligned
      for (int j = 0; j < 8 && c + j < head_dim; ++j) dst[j] = src[j];
    }
  }
}

// ---- dK, dV work items ------------------------------------------------------------------------------
// The dK/dV kernels (flash_bwd_dkdv_kernel; flash_bwd_dkdv_ws_kernel on Hopper) are persistent: blocks
// stay resident and take work items (BN keys of one batch element and K/V head, output columns from c0)
// from tile_counter (next, exited), in the order one block per item would run them (a causal mask's
// heaviest key blocks first); the last block to exit resets the counter for the next launch on its
// stream. One thread fills an item's fields in shared memory, the next item's while the block finishes
// this one, so that its K, V and first query tile can be copied ahead.
struct DkdvItem {
  int b, hk, c0, n0, n_iters;  // n_iters < 0: no item left
  int m_first, tiles_per_head;  // the query tiles of each head that can see these keys (BAND: the band's)
  long long q_off, do_off, lse_off;  // where query head 0 of the group starts in q, dout and lse (delta)
  SeqRange seq;                 // this batch element's sequences (varlen.cuh)
  ListRow list;                 // SPARSE: the key block's list
  DropoutRng rng;               // for query head 0 of batch b; bh is moved to each tile's head
};

// An item's query tiles, walked by a cursor with no division: tile `sub` of listed entry `e` (SPARSE),
// or of group member `e` (tiles m_first + sub of query head e).
struct QueryTile {
  int m0, g, slot, offset;  // first query, group member; SPARSE: bit slot (-1: full), offset in the block
  TileCursor next;          // where the tile after this one is
};

// The kernel parameters that place work items and their query tiles.
template <int BN, int BMQ, int DV, int SPLITS, int BAND, bool SPARSE, bool DROPOUT>
struct DkdvWork {
  long long q_sb, q_ss, q_sh, do_sb, do_ss, do_sh, lse_sb, lse_sh;
  const int *cu_seqlens_q, *cu_seqlens_k;
  int total_q, total_k;
  int max_seqlen_q, max_seqlen_k, nheads, kv_group, nheads_k, num_n_blocks, window_left, window_right, num_items;
  unsigned* tile_counter;
  const BlockLists& lists;
  const DropoutArgs& dropout;

  // Item `index` into w; past the last item, w.n_iters = -1 and this block's exit is counted. One thread.
  __device__ __forceinline__ void fill(unsigned index, DkdvItem& w) const {
    if (index >= static_cast<unsigned>(num_items)) {
      w.n_iters = -1;
      count_block_exit(tile_counter);
      return;
    }
    const int n_block = index % num_n_blocks;
    index /= num_n_blocks;
    w.c0 = (index % SPLITS) * DV;
    index /= SPLITS;
    w.b = index / nheads_k, w.hk = index % nheads_k;
    w.seq = seq_range(cu_seqlens_q, cu_seqlens_k, w.b, max_seqlen_q, max_seqlen_k, total_q, total_k);
    if (DROPOUT) w.rng = DropoutRng::make(dropout, w.b * nheads);
    const int h0 = w.hk * kv_group;
    w.q_off = w.b * q_sb + h0 * q_sh + w.seq.q_start * q_ss;
    w.do_off = w.b * do_sb + h0 * do_sh + w.seq.q_start * do_ss;
    w.lse_off = w.b * lse_sb + h0 * lse_sh + w.seq.q_start;
    w.n0 = n_block * BN;
    // Query tiles that can see these keys: for each query head g of the group, all of them or those
    // inside the band (BAND, band.cuh); or (SPARSE) the tiles of the listed (g, query block) pairs.
    int m_first = 0, tiles_per_head = (w.seq.seqlen_q + BMQ - 1) / BMQ;
    if (BAND)
      Band<BAND>{w.seq.seqlen_k - w.seq.seqlen_q, window_left, window_right}.query_tiles(
          w.n0, w.n0 + BN - 1, w.seq.seqlen_q, BMQ, m_first, tiles_per_head);
    w.m_first = m_first, w.tiles_per_head = tiles_per_head;
    int n_iters = tiles_per_head * kv_group;
    if (SPARSE) {
      const long long row = lists.row(w.b, w.hk, w.n0 / lists.row_block);
      w.list = ListRow{row * lists.cap, __ldg(lists.count + row)};
      n_iters = w.list.count * (lists.col_block / BMQ);
    }
    w.n_iters = w.n0 < w.seq.seqlen_k ? n_iters : 0;  // a packed sequence shorter than the longest: no keys
  }

  // The query tile of item w at cursor `at`.
  __device__ __forceinline__ QueryTile tile(const DkdvItem& w, TileCursor at) const {
    QueryTile t;
    if constexpr (SPARSE) {
      const SparseTile e = at.in(lists, w.list.entries, BMQ);
      t = {(e.block & ((1 << lists.group_shift) - 1)) * lists.col_block + e.offset, e.block >> lists.group_shift,
           e.slot, e.offset, at};
      t.next.advance(lists.col_block / BMQ);
    } else {
      t = {(w.m_first + at.sub) * BMQ, at.e, -1, 0, at};
      t.next.advance(w.tiles_per_head);
    }
    return t;
  }
};

// ---- dK, dV ------------------------------------------------------------------------------------
// Work item: BN = 16 * MT * WARPS keys of one (batch, K/V head), output columns [c0, c0 + DV) (DV = D, or
// D / 2 for large heads so that the dK and dV accumulators fit in registers). Query tiles of BMQ rows
// (of every query head sharing this K/V head) stream through a cp.async ring of STAGES slots. SPARSE: only
// the query tiles that the block mask's key-major list names for this key block. With three slots, a
// tile's last (wgmma) product runs on while the next tile loads and starts. The kernel is persistent:
// each block runs items one after another (see Item below).
// SPLIT (fp32, 3xTF32): each query tile's Q and dO are split into their TF32 parts once as they arrive,
// the rest going to a second set of slots (tile_io.cuh split_tile_tf32).
template <typename T, int D, int DV, int BN, int BMQ, int WARPS, int STAGES, int BAND, bool SPARSE, bool ALIBI,
          bool SOFTCAP, bool DROPOUT, bool WG, bool SPLIT = false, bool MOD = false>
__global__ void __launch_bounds__(WARPS * 32, 1)
flash_bwd_dkdv_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                      const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                      T* __restrict__ dk, T* __restrict__ dv, float* __restrict__ /* dq_accum: the ws kernel's */,
                      long long q_sb, long long q_ss, long long q_sh, long long k_sb, long long k_ss, long long k_sh, long long v_sb, long long v_ss, long long v_sh,
                      long long do_sb, long long do_ss, long long do_sh, long long dk_sb, long long dk_ss,
                      long long dk_sh, long long dv_sb, long long dv_ss, long long dv_sh, int max_seqlen_q,
                      int max_seqlen_k, int nheads, int kv_group, int head_dim, int num_n_blocks, int window_left,
                      int window_right, float softmax_scale, float softcap_mult, const float* __restrict__ alibi_slopes, long long alibi_sb,
                      const int* __restrict__ cu_seqlens_q, const int* __restrict__ cu_seqlens_k,
                      int total_q, int total_k, long long lse_sb,
                      long long lse_sh, const BlockLists lists, const DropoutArgs dropout,
                      unsigned* __restrict__ tile_counter, int num_items, const ModArgs mod, int /* tma */,
                      const __grid_constant__ TmaMap /* q_map */, const __grid_constant__ TmaMap /* k_map */,
                      const __grid_constant__ TmaMap /* v_map */, const __grid_constant__ TmaMap /* do_map */,
                      const __grid_constant__ TmaMap /* stats_map */) {
  static_assert(!(BAND && SPARSE), "a block mask is intersected with a causal mask or window on the host");
  constexpr int THREADS = WARPS * 32, MT = BN / (16 * WARPS), SPLITS = D / DV;
  using Tile = Tiles<T, D, WG>;
  constexpr int PITCH = Tile::row_elems, PB = Tile::row_bytes;
  static_assert(BN % (16 * WARPS) == 0 && D % DV == 0 && DV % 16 == 0 && BMQ % 16 == 0, "bad tile shape");
  static_assert(!WG || (MT == 1 && WARPS % 4 == 0), "wgmma: warpgroups of 64 rows");
  static_assert(STAGES == 2 || (WG && STAGES == 3), "two slots, or three for asynchronous products");
  // With three slots (Hopper), K and V have two buffers: the next item's land while this one's last query
  // tile computes.
  constexpr bool kPrefetchKV = STAGES == 3;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sKV = reinterpret_cast<T*>(Tile::align(smem_raw));  // K, V (and the next item's K, V)
  T* sQ = sKV + (kPrefetchKV ? 4 : 2) * BN * PITCH;     // STAGES slots of BMQ rows
  T* sdO = sQ + STAGES * BMQ * PITCH;                    // STAGES slots
  static_assert(!SPLIT || (ElemTraits<T>::is_f32 && !WG), "split tiles are fp32 mma.sync tiles");
  constexpr int kRest = SPLIT ? 2 * STAGES * BMQ * PB : 0;  // SPLIT: the rest of the Q and dO slots, after sdO
  __shared__ float s_lse[2][BMQ], s_delta[2][BMQ];

  // (wgmma: the warp's rows broadcast from lane 0, so that the products' descriptors live in uniform
  // registers; three-slot variants with a window spilled 24-32 bytes without it)
  const int lane = threadIdx.x % 32, warp_row = WG ? warp_uniform((threadIdx.x / 32) * MT * 16) : (threadIdx.x / 32) * MT * 16;

  const DkdvWork<BN, BMQ, DV, SPLITS, BAND, SPARSE, DROPOUT> work{
      q_sb, q_ss, q_sh, do_sb, do_ss, do_sh, lse_sb, lse_sh, cu_seqlens_q, cu_seqlens_k, total_q, total_k,
      max_seqlen_q, max_seqlen_k, nheads, kv_group, nheads / kv_group, num_n_blocks, window_left, window_right, num_items,
      tile_counter, lists, dropout};
  using Item = DkdvItem;
  __shared__ Item items[2];

  // A tile's place, and the cursor of the next, go through shared memory (thread 0 writes them with the
  // tile's copy; read after the barrier).
  __shared__ QueryTile tile_at[2];
  // Copy the query tile of item w at cursor `at`, the block's g-th, into ring slot g % STAGES; its rows'
  // lse and delta, one per thread.
  auto load_q_tile = [&](const Item& w, int g, TileCursor at, float& l, float& d) {
    const QueryTile t = work.tile(w, at);
    if (threadIdx.x == 0) tile_at[g % 2] = t;
    const int slot = g % STAGES, seqlen_q = w.seq.seqlen_q;
    Tile::template load<BMQ, THREADS>(sQ + slot * BMQ * PITCH, q + w.q_off + t.g * q_sh + t.m0 * q_ss, q_ss,
                                      seqlen_q - t.m0, head_dim);
    Tile::template load<BMQ, THREADS>(sdO + slot * BMQ * PITCH, dout + w.do_off + t.g * do_sh + t.m0 * do_ss, do_ss,
                                      seqlen_q - t.m0, head_dim);
    const int i = t.m0 + static_cast<int>(threadIdx.x);
    const long long at_row = w.lse_off + t.g * lse_sh + i;
    l = threadIdx.x < BMQ && i < seqlen_q ? lse[at_row] : kNegInf;
    d = threadIdx.x < BMQ && i < seqlen_q ? delta[at_row] : 0.f;
  };
  static_assert(BMQ <= THREADS, "one thread per query row of a tile");
  // An item's K and V into buffer `buf`.
  auto load_kv = [&](const Item& w, int buf) {
    const int key_row = w.seq.k_start + w.n0;
    T* k_tile = sKV + buf * 2 * BN * PITCH;
    Tile::template load<BN, THREADS>(k_tile, k + w.b * k_sb + w.hk * k_sh + key_row * k_ss, k_ss,
                                     w.seq.seqlen_k - w.n0, head_dim);
    Tile::template load<BN, THREADS>(k_tile + BN * PITCH, v + w.b * v_sb + w.hk * v_sh + key_row * v_ss, v_ss,
                                     w.seq.seqlen_k - w.n0, head_dim);
  };
  // An item's K, V and first query tile (the block's g-th), when they were not copied ahead.
  auto start_item = [&](const Item& w, int buf, int g) {
    if (w.n_iters < 0) return;
    load_kv(w, buf);
    if (w.n_iters > 0) {
      float l, d;
      load_q_tile(w, g, TileCursor{0, 0}, l, d);
      if (threadIdx.x < BMQ) s_lse[g % 2][threadIdx.x] = l, s_delta[g % 2][threadIdx.x] = d;
    }
    cp_async_commit();
  };

  if (threadIdx.x == 0) work.fill(blockIdx.x, items[0]);
  __syncthreads();
  start_item(items[0], 0, 0);
  int g = 0;  // query tiles so far, over every item: ring slot g % STAGES, pair g % 2
  for (int n = 0;; ++n) {
    const Item& w = items[n % 2];
    if (w.n_iters < 0) break;
    const Item& next = items[(n + 1) % 2];
    const int buf = kPrefetchKV ? n % 2 : 0, n_iters = w.n_iters, n0 = w.n0, c0 = SPLITS == 1 ? 0 : w.c0;
    // The next item is taken one query tile before this one's last (whose barrier publishes it), not
    // earlier: a block that took it while far from done would hold it back from a block that is free.
    auto take_next = [&] {
      if (threadIdx.x == 0) work.fill(gridDim.x + atomicAdd(tile_counter, 1u), items[(n + 1) % 2]);
    };
    if (n_iters < 2) take_next();
    const T* sK = sKV + buf * 2 * BN * PITCH;
    const T* sV = sK + BN * PITCH;
    const int seqlen_q = w.seq.seqlen_q, seqlen_k = w.seq.seqlen_k, diag = seqlen_k - seqlen_q;
    const Band<BAND> band{diag, window_left, window_right};
    const int key_in_block = SPARSE ? n0 % lists.row_block : 0;  // SPARSE: this tile's first key inside its block

    // Zeroed here, on every path: zeros written after the loop's last product was issued (when the loop
    // is skipped) make ptxas serialise the loop's products.
    float acc_dk[MT][DV / 8][4], acc_dv[MT][DV / 8][4];
    zero(acc_dk);
    zero(acc_dv);
    if constexpr (STAGES == 3) {
      pin(acc_dk);
      pin(acc_dv);
    }

    for (int it = 0; it < n_iters; ++it, ++g) {
      cp_async_wait<0>();
      if constexpr (SPLIT) {  // this thread's chunks of query tile g are in
        T* tile = sQ + (g % STAGES) * BMQ * PITCH;
        split_tile_tf32<BMQ, D, THREADS>(tile, tile + kRest / sizeof(T));
        tile = sdO + (g % STAGES) * BMQ * PITCH;
        split_tile_tf32<BMQ, D, THREADS>(tile, tile + kRest / sizeof(T));
      }
      Tile::publish();
      __syncthreads();  // tile `it` is in; every warp has waited for tile it + 1 - STAGES's products
      if (it + 2 == n_iters) take_next();
      // The next query tile: this item's, or after its last, the next item's first (whose K and V go into
      // the other buffer). One copy path for both, so that the compiler keeps one set of addresses.
      float next_l = kNegInf, next_d = 0.f;
      const bool last = it + 1 == n_iters;
      if (kPrefetchKV && last && next.n_iters >= 0) load_kv(next, buf ^ 1);
      if (!last || (kPrefetchKV && next.n_iters > 0))
        load_q_tile(last ? next : w, g + 1, last ? TileCursor{0, 0} : tile_at[g % 2].next, next_l, next_d);
      cp_async_commit();

      const int slot = g % STAGES, stat = g % 2;  // ring slot; slot of the lse, delta and tile_at pairs
      const QueryTile& t = tile_at[stat];  // read where used, not held in registers
      const unsigned q_tile = smem_addr(sQ) + slot * BMQ * PB, do_tile = smem_addr(sdO) + slot * BMQ * PB;

      // Pᵀ (keys x queries).
      // Three slots: fresh accumulators (wgmma scale-d 0), as zeros written while the previous tile's
      // products run would make ptxas serialise them. Two: zeroed (fewer registers than fresh ones).
      constexpr bool FRESH = STAGES == 3;
      float p[MT][BMQ / 8][4], dp[MT][BMQ / 8][4];
      if constexpr (!FRESH) {
        zero(p);
        zero(dp);
      }
      Tile::template mma_abt<MT, BMQ, D, FRESH, kRest>(p, smem_addr(sK), warp_row, q_tile, lane);
      // wgmma runs asynchronously: dPᵀ = V dOᵀ is issued now and computes during the softmax below. The
      // wait for Pᵀ also waits for the previous tile's dK product.
      if constexpr (WG) Tile::template mma_abt<MT, BMQ, D, FRESH>(dp, smem_addr(sV), warp_row, do_tile, lane);
      Tile::template wait<WG ? 1 : 0>(p);
      constexpr bool kDtanh = SOFTCAP || kModGrad<MOD>;  // a derivative kept per score
      float dtanh[kDtanh ? MT : 1][kDtanh ? BMQ / 8 : 1][4];
      bwd_score_mods<true, ElemTraits<T>::is_f32, SPARSE, ALIBI, SOFTCAP, MOD>(
          p, dtanh, t.m0, n0, diag, warp_row, lane, softcap_mult,
          [&] { return alibi_slopes[w.b * alibi_sb + w.hk * kv_group + t.g] / softmax_scale; },
          [&](float (&s)[MT][BMQ / 8][4]) {  // a partial block (bits transposed: rows are keys): hidden -> -inf
            if (t.slot >= 0) mask_partial_block(s, lists, t.slot, key_in_block + warp_row, t.offset, seqlen_q - t.m0, lane);
          },
          [&] { return ModSite{mod, w.b, w.hk * kv_group + t.g, seqlen_q, seqlen_k}; });
      const bool needs_mask = t.m0 + BMQ > seqlen_q || n0 + BN > seqlen_k ||
                              (BAND && !band.covers(t.m0, t.m0 + BMQ - 1, n0, n0 + BN - 1));
      bwd_recompute_p<true, ElemTraits<T>::is_f32, false>(p, needs_mask, t.m0, n0, seqlen_q, seqlen_k, band, warp_row,
                                                          lane, softmax_scale, s_lse[stat]);
      if constexpr (DROPOUT) {  // dropped scores keep -P: dV takes max(P, 0), dS needs P
        DropoutRng head_rng = w.rng;
        head_rng.bh += w.hk * kv_group + t.g;
        head_rng.drop_rows_keys<true>(p, n0 + warp_row, t.m0, lane);
      }
      Tile::template mma_pb<MT, BMQ, DV, DROPOUT, kRest>(acc_dv, p, do_tile, c0, lane);

      // dSᵀ = Pᵀ (dPᵀ - delta), dPᵀ = V dOᵀ.
      if constexpr (!WG) Tile::template mma_abt<MT, BMQ, D, FRESH, kRest>(dp, smem_addr(sV), warp_row, do_tile, lane);
      Tile::template wait<1>(dp);  // dV's product may still run
      // dSᵀ goes to its own registers: with three slots, ptxas would serialise the products around
      // writes to dPᵀ's accumulator registers, which the next tile's product reuses.
      float ds[MT][BMQ / 8][4];
      bwd_probs_to_ds<DROPOUT, kDtanh, false>(ds, p, dp, dtanh, s_delta[stat], dropout.keep_scale, lane);
      if constexpr (MOD && !kDtanh) for_each_element<MT, BMQ / 8>([&](int mt, int nt, int c) { ds[mt][nt][c] *= mod.scale; });
      Tile::template mma_pb<MT, BMQ, DV, false, kRest>(acc_dk, ds, q_tile, c0, lane);
      if constexpr (STAGES == 2) {  // before the next tile overwrites this one's slot
        Tile::template wait<0>(acc_dk);
        Tile::template wait<0>(acc_dv);
      }
      if (threadIdx.x < BMQ) s_lse[stat ^ 1][threadIdx.x] = next_l, s_delta[stat ^ 1][threadIdx.x] = next_d;
    }
    Tile::template wait<0>(acc_dk);
    Tile::template wait<0>(acc_dv);

    // dK and dV go out through this warp's own rows of sK and sV. With no query tile, K and V (copied
    // by every thread) may still be landing there: wait for all of them.
    if (n_iters == 0) cp_async_wait<0>();
    __syncthreads();
    const int rows_valid = seqlen_k - n0 - warp_row, out_row = w.seq.k_start + n0 + warp_row;
    store_rows_staged(acc_dk, const_cast<T*>(sK) + warp_row * PITCH, PITCH,
                      dk + w.b * dk_sb + w.hk * dk_sh + out_row * dk_ss + c0, dk_ss, rows_valid, head_dim - c0,
                      softmax_scale, lane);
    store_rows_staged(acc_dv, const_cast<T*>(sV) + warp_row * PITCH, PITCH,
                      dv + w.b * dv_sb + w.hk * dv_sh + out_row * dv_ss + c0, dv_ss, rows_valid, head_dim - c0,
                      DROPOUT ? dropout.keep_scale : 1.f, lane);
    __syncthreads();  // the staging rows are read and this item's fields used: both may be refilled
    if (!(kPrefetchKV && n_iters > 0)) start_item(next, kPrefetchKV ? buf ^ 1 : 0, g);
  }
}

// ---- dK, dV, warp-specialised (Hopper) -------------------------------------------------------------
// As flash_bwd_dq_ws_kernel does for dQ: the block's first warpgroup only copies (each item's K and V, then
// its query tiles' Q and dO through a STAGES-slot ring whose slots have mbarriers: landed, and both
// consumers done; tma: one thread asking for them by TMA, else 128 threads' cp.async), and two consumer
// warpgroups of 64 keys compute (each walks the tiles as the producer does, so no thread-written field
// crosses an mbarrier; a tile's lse and delta come with it by TMA, FUSED_DQ, or each copies them itself),
// taking turns at the tensor cores through two named barriers. A turn issues Sᵀ = K Qᵀ and dPᵀ = V dOᵀ of
// a query tile; dV += Pᵀ dO and dK += dSᵀ Q follow, outside the turn, and are waited for before the next
// one. So one warpgroup's softmax and dS run while the other's products do. Persistent, with the work
// items of flash_bwd_dkdv_kernel (DkdvWork); the producer copies the next item's K and V once both
// consumers' last Sᵀ and dPᵀ have completed, while they finish the item's last products and store dK, dV.
// A consumer holds dK, dV (64 + 64 floats at D = 128), Sᵀ and dPᵀ (32 + 32): 232 registers leave room for
// little else (docs/kernel-design.md).
// FUSED_DQ (dq_accum.cuh): the block also adds each query tile's dQ = dS K into an fp32 accumulator, and
// no dQ kernel runs (five products instead of seven). Both warpgroups write their dSᵀ to shared memory;
// after a barrier, each computes half of the tile's dQ columns over all BN keys, stages it in shared
// memory and one of its threads hands it to the copy engine as one bulk reduction, which runs while the
// warpgroup goes on to the next tile.
template <typename T, int D, int BN, int BMQ, int WARPS, int STAGES, int BAND, bool SPARSE, bool ALIBI,
          bool SOFTCAP, bool DROPOUT, bool FUSED_DQ = false>
__global__ void __launch_bounds__(WARPS * 32 + 128, 1)
flash_bwd_dkdv_ws_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                         const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                         T* __restrict__ dk, T* __restrict__ dv, float* __restrict__ dq_accum, long long q_sb,
                         long long q_ss, long long q_sh, long long k_sb, long long k_ss, long long k_sh, long long v_sb, long long v_ss,
                         long long v_sh, long long do_sb, long long do_ss, long long do_sh, long long dk_sb,
                         long long dk_ss, long long dk_sh, long long dv_sb, long long dv_ss, long long dv_sh,
                         int max_seqlen_q, int max_seqlen_k, int nheads, int kv_group, int head_dim, int num_n_blocks,
                         int window_left, int window_right, float softmax_scale, float softcap_mult,
                         const float* __restrict__ alibi_slopes, long long alibi_sb,
                         const int* __restrict__ cu_seqlens_q, const int* __restrict__ cu_seqlens_k,
                         int total_q, int total_k, long long lse_sb,
                         long long lse_sh, const BlockLists lists, const DropoutArgs dropout,
                         unsigned* __restrict__ tile_counter, int num_items, const ModArgs /* mod */, int tma,
                         const __grid_constant__ TmaMap q_map, const __grid_constant__ TmaMap k_map,
                         const __grid_constant__ TmaMap v_map, const __grid_constant__ TmaMap do_map,
                         const __grid_constant__ TmaMap stats_map) {
#ifdef CUFLASH_HAS_WGMMA
  static_assert(!(BAND && SPARSE), "a block mask is intersected with a causal mask or window on the host");
  static_assert(WARPS == 8 && BN == 16 * WARPS, "two consumer warpgroups of 64 keys");
  static_assert(BMQ % 16 == 0 && BN % BMQ == 0 && D % 64 == 0 && sizeof(T) == 2, "bad tile shape");
  using Roles = WarpRoles<WARPS, 40, 232>;
  constexpr int kProducers = Roles::kProducers, kConsumers = Roles::kConsumers;
  static_assert(2 * BMQ <= 128 || BMQ == 128, "a consumer thread per row's lse and delta");
  // FUSED_DQ: each warpgroup computes one accumulator chunk of a tile's dQ (dq_accum.cuh): at d >= 128 half
  // the columns of a 64-row tile (whole 64-column blocks), at d = 64 half the rows of a 128-row tile.
  constexpr bool kRowHalves = FUSED_DQ && D == 64;
  // dQ staging buffers per warpgroup: two tiles' (a reduction may still read one while the next tile is
  // staged), one at d = 64, where two 128-row tiles' would not fit beside two dSᵀ tiles.
  constexpr int kStageBufs = kRowHalves ? 1 : 2;
  // FUSED_DQ: dQ's product is issued before dK's, so that dQ's staging and reduction run while dK's product
  // does (at d = 64 their registers together spill: there dK's product is issued first and waited for).
  constexpr bool kDkAfterDq = FUSED_DQ && !kRowHalves;
  static_assert(!FUSED_DQ || (!SPARSE && (kRowHalves ? BMQ == 2 * kDqTileRows : BMQ == kDqTileRows && D % 128 == 0)),
                "fused dQ: 64-row query tiles at d >= 128, 128-row ones at d = 64");
  using Smem = Tiles<T, D, true>;
  // Q and dO slots as a TMA box of a query tile's rows writes them (64-column blocks one after another,
  // tile_io.cuh WgTile); K and V in 8-row groups (boxes of 8 rows), as the products that read them expect.
  using QTile = WgTile<D, BMQ>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sK = reinterpret_cast<T*>(Smem::align(smem_raw));
  T* sV = sK + BN * D;
  T* sQ = sV + BN * D;             // STAGES slots of BMQ rows
  T* sdO = sQ + STAGES * BMQ * D;  // likewise
  constexpr unsigned q_slot_bytes = BMQ * D * sizeof(T);
  // FUSED_DQ: two tiles' dSᵀ (BN x BMQ), then kStageBufs tiles' dQ staging, a chunk per warpgroup (fp32).
  constexpr int DQN = dq_chunk_cols(D);  // dQ columns per warpgroup
  constexpr unsigned ds_bytes = BN * BMQ * sizeof(T);
  unsigned char* sdS = reinterpret_cast<unsigned char*>(sdO + STAGES * BMQ * D);
  float* sdQ = reinterpret_cast<float*>(sdS + 2 * ds_bytes);
  // A query tile's lse (as neg_lse_units) and delta: FUSED_DQ with TMA, copied by the producer with the tile
  // into its slot (stats_map), s_slot_stat[slot][lse, delta][row]; else per consumer warpgroup, which copies
  // them itself (see the consumers), s_stat[parity][warpgroup][lse, delta][row]: two, by the parity of the
  // block's tile count (FUSED_DQ: one, the staging barrier orders their reuse). The two share the storage.
  const bool stats_by_copy = FUSED_DQ && tma;
  __shared__ union {
    float s_stat[FUSED_DQ ? 1 : 2][2][2][BMQ];  // [parity][warpgroup][lse, delta][row]
    __align__(128) float s_slot_stat[STAGES][2][BMQ];  // [slot][lse, delta][row] (TMA: 128-byte aligned)
  } stats_smem;
  auto& s_stat = stats_smem.s_stat;
  auto& s_slot_stat = stats_smem.s_slot_stat;
  __shared__ DkdvItem items[2];
  __shared__ MBarrier kv_full, kv_empty, q_full[STAGES], q_empty[STAGES];
  // The producer threads that copy: with TMA one warp (lane 0 issues, the warp waits with it), else all.
  // (Re-read from the parameter where used: held in a register, the producer's 40 spilled.)
  if (threadIdx.x == 0) {
    // every copying thread's copies of K and V, and the item's fields (TMA: lane 0's one arrival, with the bytes)
    mbar_init(&kv_full, tma ? 1 : kProducers + 1);
    mbar_init(&kv_empty, WARPS);  // every consumer warp's last Sᵀ and dPᵀ of the item have completed
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&q_full[s], tma ? 1 : kProducers);  // every copying thread's copies
      mbar_init(&q_empty[s], WARPS);  // every consumer warp's dK and dV products have read the slot
    }
  }
  __syncthreads();
  const DkdvWork<BN, BMQ, D, 1, BAND, SPARSE, DROPOUT> work{
      q_sb, q_ss, q_sh, do_sb, do_ss, do_sh, lse_sb, lse_sh, cu_seqlens_q, cu_seqlens_k, total_q, total_k,
      max_seqlen_q, max_seqlen_k, nheads, kv_group, nheads / kv_group, num_n_blocks, window_left, window_right, num_items,
      tile_counter, lists, dropout};

  if (threadIdx.x < kProducers) {  // ---- producer: per item, K and V, then the query tiles one by one ----
    Roles::become_producer();
    if (threadIdx.x >= (tma ? 32 : kProducers)) return;
    int ring = 0;  // query tiles issued so far, over all items: the ring's slot and phase
    for (int n = 0;; ++n) {
      DkdvItem& w = items[n % 2];
      if (n > 0) mbar_wait(&kv_empty, (n - 1) & 1);  // K, V and item n - 2's fields are free
      if (threadIdx.x == 0) work.fill(n == 0 ? blockIdx.x : grid_blocks_uncached() + atomicAdd(tile_counter, 1u), w);
      named_bar_sync(3, tma ? 32 : kProducers);  // every copying thread sees the item
      const int n_iters = w.n_iters;
      if (n_iters < 0) {
        if (threadIdx.x == 0) mbar_arrive(&kv_full);
        if (!tma) mbar_arrive(&kv_full);
        break;
      }
      const int key_row = w.seq.k_start + w.n0, keys_left = w.seq.seqlen_k - w.n0, seqlen_q = w.seq.seqlen_q;
      if (tma) {
        const bool issues = threadIdx.x == 0;
        if (issues) {  // (the arrival also says the item's fields are written)
          mbar_arrive_expect_tx(&kv_full, 2 * BN * D * sizeof(T));
          tma_load_tile_row_groups<BN, D>(sK, k_map, key_row, w.hk, w.b, &kv_full);
          tma_load_tile_row_groups<BN, D>(sV, v_map, key_row, w.hk, w.b, &kv_full);
        }
        TileCursor at{0, 0};
        for (int it = 0; it < n_iters; ++it, ++ring) {
          const int slot = ring % STAGES;
          if (ring >= STAGES) mbar_wait(&q_empty[slot], (ring / STAGES - 1) & 1);  // the slot's last tile is done
          const QueryTile t = work.tile(w, at);
          at = t.next;
          if (issues) {
            const int h = w.hk * kv_group + t.g, row = w.seq.q_start + t.m0;
            mbar_arrive_expect_tx(&q_full[slot], 2 * BMQ * D * sizeof(T) + (stats_by_copy ? sizeof(s_slot_stat[0]) : 0));
            // (A tensor copy, not a plain bulk copy of the same rows: racecheck orders the consumers' reads of
            // a tensor copy's bytes by the mbarrier, and of a bulk copy's it does not.)
            if (stats_by_copy) tma_load_2d(s_slot_stat[slot], stats_map, t.m0, 2 * (w.b * nheads + h), &q_full[slot]);
            tma_load_tile<BMQ, D>(sQ + slot * BMQ * D, q_map, row, h, w.b, &q_full[slot]);
            tma_load_tile<BMQ, D>(sdO + slot * BMQ * D, do_map, row, h, w.b, &q_full[slot]);
          }
        }
        continue;
      }
      // (The query-tile walk above and below is the same; one loop for both copy paths spilled 8-12 bytes of
      // the producer's 40 registers at d = 128.)
#pragma unroll 1
      for (int r = 0; r < BN; r += BMQ) {  // in tiles of BMQ rows: the copies of all BN rows at once spill
        Smem::template load<BMQ, kProducers>(sK + r * D, k + w.b * k_sb + w.hk * k_sh + (key_row + r) * k_ss, k_ss,
                                             keys_left - r, head_dim);
        Smem::template load<BMQ, kProducers>(sV + r * D, v + w.b * v_sb + w.hk * v_sh + (key_row + r) * v_ss, v_ss,
                                             keys_left - r, head_dim);
      }
      cp_async_mbar_arrive(&kv_full);
      if (threadIdx.x == 0) mbar_arrive(&kv_full);  // the item's fields are written
      TileCursor at{0, 0};
      for (int it = 0; it < n_iters; ++it, ++ring) {
        const int slot = ring % STAGES;
        if (ring >= STAGES) mbar_wait(&q_empty[slot], (ring / STAGES - 1) & 1);  // the slot's last tile is done
        const QueryTile t = work.tile(w, at);
        at = t.next;
        load_tile_async_wg<BMQ, D, kProducers, T, QTile>(sQ + slot * BMQ * D, q + w.q_off + t.g * q_sh + t.m0 * q_ss,
                                                         q_ss, seqlen_q - t.m0, head_dim);
        load_tile_async_wg<BMQ, D, kProducers, T, QTile>(
            sdO + slot * BMQ * D, dout + w.do_off + t.g * do_sh + t.m0 * do_ss, do_ss, seqlen_q - t.m0, head_dim);
        cp_async_mbar_arrive(&q_full[slot]);
      }
    }
    cp_async_wait_all();
    return;
  }

  // ---- consumers: warpgroup wg owns keys [64 wg, 64 wg + 64) of each item ----
  Roles::become_consumer();
  const int tid = threadIdx.x - kProducers, lane = tid % 32, wg = tid / 128;
  const int warp_row = warp_uniform((tid / 32) * 16);  // this warp's first key inside the item
  int ring = 0;  // as the producer's
  for (int n = 0;; ++n) {
    mbar_wait(&kv_full, n & 1);
    const DkdvItem& w = items[n % 2];
    const int n_iters = w.n_iters;
    if (n_iters < 0) break;
    const int n0 = w.n0, seqlen_q = w.seq.seqlen_q, seqlen_k = w.seq.seqlen_k, diag = seqlen_k - seqlen_q;
    const Band<BAND> band{diag, window_left, window_right};
    const int key_in_block = SPARSE ? n0 % lists.row_block : 0;  // SPARSE: this item's first key in its block
    float acc_dk[1][D / 8][4], acc_dv[1][D / 8][4];
    zero(acc_dk);
    zero(acc_dv);
    pin(acc_dk);
    pin(acc_dv);
    const ConsumerTurns turns{wg, kConsumers / 128};
    if (n_iters > 0) {
      turns.start();
      float acc_s[1][BMQ / 8][4], acc_dp[1][BMQ / 8][4];
      // Turn `it` issues Sᵀ and dPᵀ of query tile it; dV += Pᵀ dO and dK += dSᵀ Q follow, outside the turn,
      // once Pᵀ and dSᵀ are known: while this warpgroup waits for them, the other's Sᵀ and dPᵀ are queued.
      TileCursor at{0, 0};  // the item's query tiles, walked as the producer walks them
      auto turn = [&](int it) {
        const int g = ring + it, slot = g % STAGES;
        const QueryTile t = work.tile(w, at);
        at = t.next;
        // The tile's lse (stored as neg_lse_units) and delta: copied with the tile (stats_by_copy), else this
        // warpgroup copies them itself, a thread per row of each (rows past the end: zeros, which no visible
        // score reads), loaded while the products are issued and published with a named barrier. (Threads'
        // stores behind the slot's mbarrier were as correct, but racecheck cannot order an mbarrier between
        // warps except after a tensor copy: docs/kernel-design.md.)
        // (128-row tiles: a thread's lse and delta of row tw.)
        constexpr int kStats = (2 * BMQ + 127) / 128;  // rows of lse and delta per thread
        const int tw = tid % 128, r = tw % BMQ, i = t.m0 + r;
        float stat[kStats] = {};
        if (!stats_by_copy) {
          if constexpr (kStats == 1) {
            if (tw < 2 * BMQ && i < seqlen_q) stat[0] = __ldg((tw < BMQ ? lse : delta) + w.lse_off + t.g * lse_sh + i);
          } else if (i < seqlen_q) {
            stat[0] = __ldg(lse + w.lse_off + t.g * lse_sh + i);
            stat[1] = __ldg(delta + w.lse_off + t.g * lse_sh + i);
          }
        }
        PartialBits<1, BMQ / 8> bits;
        mbar_wait(&q_full[slot], (g / STAGES) & 1);
        if constexpr (SPARSE)  // rows are keys, columns queries (the key-major lists' bits)
          if (t.slot >= 0) bits.load(lists, t.slot, key_in_block + warp_row, t.offset, lane);
        fence_proxy_async();  // the producer's cp.async writes, now visible, to the tensor cores' reads
        turns.begin();
        const unsigned key_rows = (warp_row / 64) * 8 * WgTile<D>::group;  // this warpgroup's keys
        wg_mma_abt_async<T, BMQ, D, D, true, WgTile<D>, QTile>(acc_s, smem_addr(sK) + key_rows,
                                                               smem_addr(sQ) + slot * q_slot_bytes);
        wg_mma_abt_async<T, BMQ, D, D, true, WgTile<D>, QTile>(acc_dp, smem_addr(sV) + key_rows,
                                                               smem_addr(sdO) + slot * q_slot_bytes);
        turns.end(it == n_iters - 1);
        // (s_stat: its last readers passed this barrier)
        float(&stats)[2][BMQ] = stats_by_copy ? s_slot_stat[slot] : s_stat[FUSED_DQ ? 0 : g % 2][wg];
        if (!stats_by_copy) {
          if constexpr (kStats == 1) {
            if (tw < 2 * BMQ) stats[tw / BMQ][r] = tw < BMQ ? neg_lse_units(stat[0]) : stat[0];
          } else {
            stats[0][tw] = neg_lse_units(stat[0]), stats[1][tw] = stat[1];
          }
          named_bar_sync(4 + wg, 128);  // (1 + wg: ConsumerTurns; 3: the producers)
        }
        wg_wait<1>(acc_s);
        float dtanh[SOFTCAP ? 1 : 1][SOFTCAP ? BMQ / 8 : 1][4];
        // (This kernel keeps its own copy of bwd_score_mods and bwd_recompute_p's steps: through them, ptxas's
        // code for its block-sparse variants changed.)
        if constexpr (SOFTCAP) apply_softcap<false>(acc_s, softcap_mult, dtanh);
        if constexpr (ALIBI)  // keys are rows here, hence -diag
          add_alibi(acc_s, n0 + warp_row, t.m0, -diag,
                    alibi_slopes[w.b * alibi_sb + w.hk * kv_group + t.g] / softmax_scale, lane);
        if constexpr (SPARSE)
          if (t.slot >= 0) bits.apply(acc_s, t.offset, seqlen_q - t.m0, lane);
        // P: masked scores set to -inf first, on the tiles that need it only, then two instructions a score;
        // with a window, a test per score instead (masking first spilled there).
        auto visible = [&](int key, int query) {
          return query < seqlen_q && key < seqlen_k && (!BAND || band.visible(query, key));
        };
        const bool needs_mask = t.m0 + BMQ > seqlen_q || n0 + BN > seqlen_k ||
                                (BAND && !band.covers(t.m0, t.m0 + BMQ - 1, n0, n0 + BN - 1));
        constexpr bool kTestEach = BAND == kWindow;
        if (!kTestEach && needs_mask) mask_scores(acc_s, n0 + warp_row, t.m0, lane, visible);  // (rows are keys)
        const float scale_u = exp_units<false>(softmax_scale);
        for_each_element<1, BMQ / 8>([&](int, int nt, int c) {
          const int col = nt * 8 + (lane % 4) * 2 + c % 2;  // query
          const float p = masked_p_units(acc_s[0][nt][c], scale_u, stats[0][col]);
          const int key = n0 + warp_row + lane / 4 + (c / 2) * 8;
          acc_s[0][nt][c] = !kTestEach || !needs_mask || visible(key, t.m0 + col) ? p : 0.f;
        });
        if constexpr (DROPOUT) {  // dropped scores keep -P: dV takes max(P, 0), dS needs P
          DropoutRng head_rng = w.rng;
          head_rng.bh += w.hk * kv_group + t.g;
          head_rng.drop_rows_keys<true>(acc_s, n0 + warp_row, t.m0, lane);
        }
        wg_wait<0>(acc_dp);
        // The producer may load the next K, V (FUSED_DQ: once dQ's product has read K, below).
        if (!FUSED_DQ && it == n_iters - 1) mbar_arrive_warp(&kv_empty, lane);
        float (&ds)[1][BMQ / 8][4] = acc_dp;  // dSᵀ overwrites dPᵀ
        bwd_probs_to_ds<DROPOUT, SOFTCAP, true>(ds, acc_s, acc_dp, dtanh, stats[1], dropout.keep_scale, lane);
        wg_mma_pb_async<T, BMQ, D, D, DROPOUT, QTile>(acc_dv, acc_s, smem_addr(sdO) + slot * q_slot_bytes);
        if constexpr (!kDkAfterDq)
          wg_mma_pb_async<T, BMQ, D, D, false, QTile>(acc_dk, ds, smem_addr(sQ) + slot * q_slot_bytes);
        if constexpr (FUSED_DQ) {
          store_ds_rows<T, BMQ>(ds, smem_addr(sdS) + (g % 2) * ds_bytes, warp_row, lane);
          // dQ (this warpgroup's chunk: DQN columns of 64 rows) = dS K over all BN keys, once both
          // warpgroups' dSᵀ are in.
          fence_proxy_async();
          // One staging buffer: free once the reduction of the previous tile has read it, which had this
          // tile's products so far to do so.
          if (kStageBufs == 1 && tw == 0) bulk_wait_read<0>();
          named_bar_sync(6, 256);
          if constexpr (!kDkAfterDq) wg_wait<0>(acc_dk);
          float acc_dq[1][DQN / 8][4];
          wg_mma_mn_async<T, BN, DQN, BMQ, D>(acc_dq, smem_addr(sdS) + (g % 2) * ds_bytes + (kRowHalves ? wg * 1024 : 0),
                                              smem_addr(sK) + (kRowHalves ? 0 : wg * (D / 128) * 1024));
          if constexpr (kDkAfterDq) {
            wg_mma_pb_async<T, BMQ, D, D, false, QTile>(acc_dk, ds, smem_addr(sQ) + slot * q_slot_bytes);
            wg_wait<1>(acc_dq);  // dV's product and dQ's are done, dK's may still run
          } else {
            wg_wait<0>(acc_dq);
          }
          pin(acc_dv);
          if (it == n_iters - 1) mbar_arrive_warp(&kv_empty, lane);
          float* stage = sdQ + (g % kStageBufs * 2 + wg) * (kDqTileRows * DQN);
          stage_dq(acc_dq, stage, tw);
          fence_proxy_async();  // the staged values, to the copy engine's reads
          // Two staging buffers: the other one is free for the next tile once the reduction that read it, a
          // tile ago, has (one buffer: above).
          if (kStageBufs == 2 && tw == 0) bulk_wait_read<0>();
          named_bar_sync(4 + wg, 128);  // the whole half is staged
          const int row0 = t.m0 + (kRowHalves ? wg * kDqTileRows : 0);  // (past the end: zeros, not added)
          if (tw == 0 && (!kRowHalves || row0 < seqlen_q)) {
            const int h = w.hk * kv_group + t.g;
            const long long at = dq_accum_tile(w.seq, cu_seqlens_q != nullptr, w.b, h, nheads, row0 / kDqTileRows);
            constexpr int kChunk = kDqTileRows * DQN;
            bulk_reduce_add(dq_accum + (at * dq_chunks(D) + (kRowHalves ? 0 : wg)) * kChunk, smem_addr(stage),
                            kChunk * 4);
          }
          wg_wait<0>(acc_dk);  // (before the next turn: see below)
          mbar_arrive_warp(&q_empty[slot], lane);  // the slot is free
        } else {
          // Done before the next turn: register operands of products still running at the loop's back edge
          // make ptxas serialise every product of the kernel (it keeps them live through the next turn).
          wg_wait<0>(acc_dk);
          pin(acc_dv);
          mbar_arrive_warp(&q_empty[slot], lane);  // the slot is free
        }
      };
      for (int it = 0; it < n_iters; ++it) turn(it);
      ring += n_iters;
    } else if (lane == 0) {
      mbar_arrive(&kv_empty);  // no product reads K or V
    }
    // dK and dV straight from registers: sK and sV may already hold the next item's. An item with no query
    // tile writes zeros; rows past the sequence's end nothing.
    const int rows_valid = seqlen_k - n0 - warp_row, out_row = w.seq.k_start + n0 + warp_row;
    store_rows_direct(acc_dk, dk + w.b * dk_sb + w.hk * dk_sh + out_row * dk_ss, dk_ss, rows_valid, head_dim,
                      softmax_scale, lane);
    store_rows_direct(acc_dv, dv + w.b * dv_sb + w.hk * dv_sh + out_row * dv_ss, dv_ss, rows_valid, head_dim,
                      DROPOUT ? dropout.keep_scale : 1.f, lane);
  }
  if (FUSED_DQ && tid % 128 == 0) bulk_wait_all();  // this block's reductions are done (and its staging free)
#else
  __trap();  // compiled for sm_90a only
#endif
}

// ---- dQ ----------------------------------------------------------------------------------------
// Block: BM = 16 * MT * WARPS queries of one (batch, head); Q and dO stay in shared memory while
// K/V tiles of BN rows stream through a two-slot ring (SPARSE: only the key tiles the block mask lists).
// (A third slot, to let a tile's dQ product run on into the next tile, costs registers that the
// three-warpgroup tiles do not have: ptxas then serialises the products, 11% slower on the H100.)
// SPLIT (fp32, 3xTF32): each key tile's K and V are split into their TF32 parts once as they arrive,
// the rest going to a second set of slots (tile_io.cuh split_tile_tf32).
// MOD & 3: the user's score and mask functions (score_fn.cuh); 2: instead of dQ, store dS with respect to
// the function's value for the gradients of captured arrays (launched beside the backward when needed).
// MOD & 4: also each row's sum of P * dP over its keys in fp32 (ModArgs::dpsum), for the sinks' gradient:
// delta = rowsum(dO * O) reads O rounded to the output's dtype.
template <typename T, int D, int BM, int BN, int WARPS, int BAND, bool SPARSE, bool ALIBI, bool SOFTCAP,
          bool DROPOUT, bool WG, bool SPLIT = false, int MOD = 0>
__global__ void __launch_bounds__(WARPS * 32, 1)
flash_bwd_dq_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                    const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                    T* __restrict__ dq, long long q_sb, long long q_ss, long long q_sh, long long k_sb, long long k_ss,
                    long long k_sh, long long v_sb, long long v_ss, long long v_sh, long long do_sb, long long do_ss,
                    long long do_sh, long long dq_sb, long long dq_ss, long long dq_sh, int max_seqlen_q,
                    int max_seqlen_k,
                    int nheads, int kv_group, int head_dim, int num_m_blocks, int window_left, int window_right,
                    float softmax_scale,
                    float softcap_mult, const float* __restrict__ alibi_slopes, long long alibi_sb,
                    const int* __restrict__ cu_seqlens_q, const int* __restrict__ cu_seqlens_k,
                    int total_q, int total_k, long long lse_sb,
                    long long lse_sh, const BlockLists lists, const DropoutArgs dropout,
                    unsigned* /* tile_counter */, int /* num_items: persistent kernels */, const ModArgs mod) {
  static_assert(!(BAND && SPARSE), "a block mask is intersected with a causal mask or window on the host");
  constexpr int THREADS = WARPS * 32, MT = BM / (16 * WARPS);
  constexpr int kMod = MOD & 3;
  constexpr bool kRowSums = (MOD & 4) != 0;
  using Tile = Tiles<T, D, WG>;
  constexpr int PITCH = Tile::row_elems, PB = Tile::row_bytes;
  static_assert(BM % (16 * WARPS) == 0 && BN % 16 == 0, "bad tile shape");
  static_assert(!WG || (MT == 1 && WARPS % 4 == 0), "wgmma: warpgroups of 64 rows");
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(Tile::align(smem_raw));
  T* sdO = sQ + BM * PITCH;
  T* sK = sdO + BM * PITCH;   // 2 slots of BN rows
  T* sV = sK + 2 * BN * PITCH;  // 2 slots
  static_assert(!SPLIT || (ElemTraits<T>::is_f32 && !WG), "split tiles are fp32 mma.sync tiles");
  constexpr int kRest = SPLIT ? 4 * BN * PB : 0;  // SPLIT: the rest of the K and V slots, after sV

  const int lane = threadIdx.x % 32, warp_row = (threadIdx.x / 32) * MT * 16;
  const int bh = blockIdx.x / num_m_blocks;
  const int b = bh / nheads, h = bh % nheads, hk = h / kv_group;
  // Heaviest first: the last query tiles (causal), or (SPARSE) those with the longest lists.
  int m_block = num_m_blocks - 1 - static_cast<int>(blockIdx.x % num_m_blocks);
  if (SPARSE) m_block = lists.heaviest_first(b, h, blockIdx.x % num_m_blocks, BM);
  __shared__ SeqRange seq;  // this batch element's sequences (varlen.cuh)
  __shared__ DropoutRng rng;
  if (threadIdx.x == 0) {
    seq = seq_range(cu_seqlens_q, cu_seqlens_k, b, max_seqlen_q, max_seqlen_k, total_q, total_k);
    if (DROPOUT) rng = DropoutRng::make(dropout, bh);
  }
  __syncthreads();
  const int seqlen_q = seq.seqlen_q, seqlen_k = seq.seqlen_k;
  const int m0 = m_block * BM, diag = seqlen_k - seqlen_q;
  if (m0 >= seqlen_q) return;  // a packed sequence shorter than the longest
  const Band<BAND> band{diag, window_left, window_right};
  int n_first = 0, n_blocks = (seqlen_k + BN - 1) / BN;  // key tiles from n_first (BAND: inside the band)
  if (BAND) band.key_tiles(m0, m0 + BM - 1, seqlen_k, BN, n_first, n_blocks);
  int subs = 1;
  __shared__ ListRow list;
  if constexpr (SPARSE) {
    read_list_row(lists, lists.row(b, h, m0 / lists.row_block), list);
    __syncthreads();
    subs = lists.col_block / BN;
    n_blocks = list.count * subs;
  }
  // Key tile `nb`: the next of the band, or (SPARSE) tile `sub` of listed block `e`, walked by a cursor
  // with no division; a listed tile's place, and the cursor of the next, go through shared memory (a
  // dense tile's is recomputed from `nb`).
  struct KeyTile {
    int n0, slot, offset;  // first key; SPARSE: bit slot (-1: full) and offset inside the block
    TileCursor next;       // SPARSE: where the tile after this one is
  };
  __shared__ KeyTile tile_at[2];  // SPARSE: written by thread 0 with the tile's copy, read after the barrier
  auto dense_tile = [&](int nb) { return KeyTile{(n_first + nb) * BN, -1, 0}; };
  const T* k_head = k + b * k_sb + hk * k_sh + seq.k_start * k_ss;
  const T* v_head = v + b * v_sb + hk * v_sh + seq.k_start * v_ss;
  auto load_kv = [&](int nb, TileCursor at) {
    KeyTile t = dense_tile(nb);
    if constexpr (SPARSE) {
      const SparseTile e = at.in(lists, list.entries, BN);
      t.n0 = e.block * lists.col_block + e.offset, t.slot = e.slot, t.offset = e.offset;
      t.next = at;
      t.next.advance(subs);
      if (threadIdx.x == 0) tile_at[nb % 2] = t;
    }
    const int slot = nb % 2;
    Tile::template load<BN, THREADS>(sK + slot * BN * PITCH, k_head + t.n0 * k_ss, k_ss, seqlen_k - t.n0, head_dim);
    Tile::template load<BN, THREADS>(sV + slot * BN * PITCH, v_head + t.n0 * v_ss, v_ss, seqlen_k - t.n0, head_dim);
  };
  const int q_row = seq.q_start + m0;
  Tile::template load<BM, THREADS>(sQ, q + b * q_sb + h * q_sh + q_row * q_ss, q_ss, seqlen_q - m0, head_dim);
  Tile::template load<BM, THREADS>(sdO, dout + b * do_sb + h * do_sh + q_row * do_ss, do_ss, seqlen_q - m0, head_dim);
  if (n_blocks > 0) load_kv(0, TileCursor{0, 0});
  cp_async_commit();

  // This thread's rows: lse and delta in registers.
  float row_lse[MT][2], row_delta[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = frag_row(m0 + warp_row + mt * 16, lane, half);
      const long long at = b * lse_sb + h * lse_sh + seq.q_start + i;
      row_lse[mt][half] = i < seqlen_q ? lse[at] : kNegInf;
      row_delta[mt][half] = i < seqlen_q ? delta[at] : 0.f;
    }

  const float alibi_slope = ALIBI ? alibi_slopes[b * alibi_sb + h] / softmax_scale : 0.f;
  float acc_dq[MT][D / 8][4];
  zero(acc_dq);
  float row_dpsum[kRowSums ? MT : 1][2] = {};
  for (int nb = 0; nb < n_blocks; ++nb) {
    cp_async_wait<0>();
    if constexpr (SPLIT) {  // this thread's chunks of key tile nb are in
      T* tile = sK + (nb % 2) * BN * PITCH;
      split_tile_tf32<BN, D, THREADS>(tile, tile + kRest / sizeof(T));
      tile = sV + (nb % 2) * BN * PITCH;
      split_tile_tf32<BN, D, THREADS>(tile, tile + kRest / sizeof(T));
    }
    Tile::publish();
    __syncthreads();
    if (nb + 1 < n_blocks) load_kv(nb + 1, tile_at[nb % 2].next);
    cp_async_commit();
    const int slot = nb % 2;
    const KeyTile t = SPARSE ? tile_at[slot] : dense_tile(nb);
    const int n0 = t.n0;
    const unsigned k_tile = smem_addr(sK) + slot * BN * PB, v_tile = smem_addr(sV) + slot * BN * PB;

    float p[MT][BN / 8][4], dp[MT][BN / 8][4];
    zero(p);
    zero(dp);
    Tile::template mma_abt<MT, BN, D, false, kRest>(p, smem_addr(sQ), warp_row, k_tile, lane);
    // wgmma runs asynchronously: dP = dO Vᵀ is issued now and computes during the softmax below.
    if constexpr (WG) Tile::template mma_abt<MT, BN, D>(dp, smem_addr(sdO), warp_row, v_tile, lane);
    Tile::template wait<WG ? 1 : 0>(p);
    if constexpr (kMod == 2)  // the scores the function sees, for captured arrays that multiply them
      if (mod.scores != nullptr) store_score_pairs(p, mod.scale, mod.scores, mod, b, h, m0 + warp_row, n0, seqlen_q, seqlen_k, lane);
    constexpr bool kDtanh = SOFTCAP || kModGrad<kMod != 0>;  // a derivative kept per score (kMod: 1, or 2 to store dS)
    float dtanh[kDtanh ? MT : 1][kDtanh ? BN / 8 : 1][4];
    bwd_score_mods<false, ElemTraits<T>::is_f32, SPARSE, ALIBI, SOFTCAP, kMod != 0>(
        p, dtanh, m0, n0, diag, warp_row, lane, softcap_mult, [&] { return alibi_slope; },
        [&](float (&s)[MT][BN / 8][4]) {  // a partial block: hidden scores become -inf, so p = 0 below
          if (t.slot >= 0)
            mask_partial_block(s, lists, t.slot, m0 % lists.row_block + warp_row, t.offset, seqlen_k - n0, lane);
        },
        [&] { return ModSite{mod, b, h, seqlen_q, seqlen_k}; });
    const bool needs_mask = n0 + BN > seqlen_k || (BAND && !band.covers(m0, m0 + BM - 1, n0, n0 + BN - 1));
    bwd_recompute_p<false, ElemTraits<T>::is_f32, false>(p, needs_mask, m0, n0, seqlen_q, seqlen_k, band, warp_row,
                                                         lane, softmax_scale, row_lse);
    if constexpr (DROPOUT) rng.drop_rows_queries<true>(p, m0 + warp_row, n0, lane);
    if constexpr (!WG) Tile::template mma_abt<MT, BN, D, false, kRest>(dp, smem_addr(sdO), warp_row, v_tile, lane);
    Tile::template wait<0>(dp);
    if constexpr (kRowSums)  // (a dropped probability holds -P: dO O sums the kept ones, scaled)
      for_each_element<MT, BN / 8>([&](int mt, int nt, int c) {
        row_dpsum[mt][c / 2] += (DROPOUT ? fmaxf(p[mt][nt][c], 0.f) * dropout.keep_scale : p[mt][nt][c]) * dp[mt][nt][c];
      });
    float (&ds)[MT][BN / 8][4] = dp;  // dS overwrites dP
    bwd_probs_to_ds<DROPOUT, SOFTCAP, true>(ds, p, dp, dtanh, row_delta, dropout.keep_scale, lane);
    if constexpr (kMod == 2) {  // dS with respect to the function's value (captured arrays' gradients), no dQ
      store_score_pairs(ds, 1.f, mod.dscore, mod, b, h, m0 + warp_row, n0, seqlen_q, seqlen_k, lane);
      continue;
    }
    if constexpr (kMod != 0)
      for_each_element<MT, BN / 8>([&](int mt, int nt, int c) { ds[mt][nt][c] *= kDtanh ? dtanh[mt][nt][c] : mod.scale; });
    Tile::template mma_pb<MT, BN, D, false, kRest>(acc_dq, ds, k_tile, 0, lane);
    Tile::template wait<0>(acc_dq);  // before the next tile overwrites this one's slot
  }
  if constexpr (kRowSums) {  // the four lanes of a row hold its columns' parts
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float sum = row_dpsum[mt][half];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const int i = frag_row(m0 + warp_row + mt * 16, lane, half);
        if (lane % 4 == 0 && i < seqlen_q) mod.dpsum[b * lse_sb + h * lse_sh + seq.q_start + i] = sum;
      }
  }
  if constexpr (kMod == 2) return;
  // dQ goes out through this warp's own rows of sQ. With no key tile, Q (copied by every thread) may
  // still be landing there: wait for all of it.
  cp_async_wait<0>();
  __syncthreads();
  const int out_row = seq.q_start + m0 + warp_row;
  store_rows_staged(acc_dq, sQ + warp_row * PITCH, PITCH, dq + b * dq_sb + h * dq_sh + out_row * dq_ss, dq_ss,
                    seq.seqlen_q - m0 - warp_row, head_dim, softmax_scale, lane);
}

// ---- dQ, warp-specialised (Hopper) -------------------------------------------------------------------
// As flash_fwd_ws.cu does for the forward: the block's first warpgroup only copies (each item's Q and dO,
// then its K/V tiles through a STAGES-slot ring whose slots have mbarriers: K landed, V landed, both
// consumers done), and two consumer warpgroups of 64 query rows only compute, taking turns at the tensor
// cores through two named barriers. A turn issues dQ += dS K of the previous key tile with S = Q Kᵀ and
// dP = dO Vᵀ of the next, so one warpgroup's softmax and dS run while the other's products do. Persistent:
// items come from tile_counter in the order of one block per item (BlockCoords: heaviest first), and the
// producer copies the next item's Q and dO once both consumers have issued their last S and dP.
// 13-14% faster than flash_bwd_dq_kernel on window and butterfly masks (docs/kernel-design.md).

template <typename T, int D, int BM, int BN, int WARPS, int STAGES, int BAND, bool SPARSE, bool ALIBI, bool SOFTCAP,
          bool DROPOUT>
__global__ void __launch_bounds__(WARPS * 32 + 128, 1)
flash_bwd_dq_ws_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                       const T* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                       T* __restrict__ dq, long long q_sb, long long q_ss, long long q_sh, long long k_sb,
                       long long k_ss, long long k_sh, long long v_sb, long long v_ss, long long v_sh, long long do_sb,
                       long long do_ss, long long do_sh, long long dq_sb, long long dq_ss, long long dq_sh,
                       int max_seqlen_q, int max_seqlen_k, int nheads, int kv_group, int head_dim, int num_m_blocks,
                       int window_left, int window_right, float softmax_scale, float softcap_mult,
                       const float* __restrict__ alibi_slopes, long long alibi_sb, const int* __restrict__ cu_seqlens_q,
                       const int* __restrict__ cu_seqlens_k,
                       int total_q, int total_k, long long lse_sb, long long lse_sh, const BlockLists lists,
                       const DropoutArgs dropout, unsigned* __restrict__ tile_counter, int num_items,
                       const ModArgs /* mod */) {
#ifdef CUFLASH_HAS_WGMMA
  static_assert(!(BAND && SPARSE), "a block mask is intersected with a causal mask or window on the host");
  static_assert(WARPS == 8 && BM == 16 * WARPS, "two consumer warpgroups of 64 rows");
  static_assert(BN % 16 == 0 && D % 64 == 0 && sizeof(T) == 2, "bad tile shape");
  // The producer copies Q, dO, K and V (at 40 registers it spilled 32 bytes of addresses).
  using Roles = WarpRoles<WARPS, 56, 224>;
  constexpr int kProducers = Roles::kProducers, kConsumers = Roles::kConsumers;
  using Smem = Tiles<T, D, true>;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sQ = reinterpret_cast<T*>(Smem::align(smem_raw));
  T* sdO = sQ + BM * D;
  T* sK = sdO + BM * D;          // STAGES slots of BN rows
  T* sV = sK + STAGES * BN * D;  // likewise
  constexpr unsigned kv_slot_bytes = BN * D * sizeof(T);

  __shared__ MBarrier q_full, q_empty, k_full[STAGES], v_full[STAGES], kv_empty[STAGES];
  __shared__ FwdItem items[2];
  if (threadIdx.x == 0) {
    mbar_init(&q_full, kProducers + 1);  // every producer thread's copies of Q and dO, and the item's fields
    mbar_init(&q_empty, WARPS);          // every consumer warp has issued its last S and dP
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(&k_full[s], kProducers);
      mbar_init(&v_full[s], kProducers);
      mbar_init(&kv_empty[s], WARPS);  // every consumer warp is done with the slot (its dQ product read K)
    }
  }
  __syncthreads();
  const FwdWork<BN, BM, BAND, SPARSE, DROPOUT> work{lists, dropout, cu_seqlens_q, cu_seqlens_k, total_q, total_k,
                                                   max_seqlen_q, max_seqlen_k, nheads, num_m_blocks, window_left,
                                                   window_right, num_items, tile_counter};

  if (threadIdx.x < kProducers) {  // ---- producer: per item, Q and dO, then K and V tile by tile ----
    Roles::become_producer();
    int ring = 0;  // K/V tiles issued so far, over all items: the ring's slot and phase
    for (int n = 0;; ++n) {
      FwdItem& w = items[n % 2];
      if (n > 0) mbar_wait(&q_empty, (n - 1) & 1);  // Q, dO and item n - 2's fields are free
      if (threadIdx.x == 0) work.take(n, w);
      named_bar_sync(3, kProducers);  // every producer thread sees the item
      if (w.n_blocks < 0) {
        if (threadIdx.x == 0) mbar_arrive(&q_full);
        mbar_arrive(&q_full);
        break;
      }
      const KeyTiles<BN, BAND, SPARSE> tiles = work.key_tiles(w);
      const int n_blocks = w.n_blocks, hk = w.h / kv_group, q_row = w.seq.q_start + w.m0;
      const T* k_head = k + w.b * k_sb + hk * k_sh + w.seq.k_start * k_ss;
      const T* v_head = v + w.b * v_sb + hk * v_sh + w.seq.k_start * v_ss;
      if (n_blocks > 0) {
        Smem::template load<BM, kProducers>(sQ, q + w.b * q_sb + w.h * q_sh + q_row * q_ss, q_ss,
                                            w.seq.seqlen_q - w.m0, head_dim);
        Smem::template load<BM, kProducers>(sdO, dout + w.b * do_sb + w.h * do_sh + q_row * do_ss, do_ss,
                                            w.seq.seqlen_q - w.m0, head_dim);
      }
      cp_async_mbar_arrive(&q_full);
      if (threadIdx.x == 0) mbar_arrive(&q_full);  // the item's fields are written
      produce_key_tiles<WgTile<D>, BN, D, STAGES, kProducers>(tiles, lists, w, n_blocks, ring, sK, sV, k_head, k_ss,
                                                              v_head, v_ss, head_dim, k_full, v_full, kv_empty);
    }
    cp_async_wait_all();
    return;
  }

  // ---- consumers: warpgroup wg owns query rows [64 wg, 64 wg + 64) of each item ----
  Roles::become_consumer();
  const int tid = threadIdx.x - kProducers, lane = tid % 32, wg = tid / 128;
  const int warp_row = warp_uniform((tid / 32) * 16);  // first row of this warp inside the item
  const float scale_u = exp_units<false>(softmax_scale);
  int ring = 0;  // as the producer's
  for (int n = 0;; ++n) {
    mbar_wait(&q_full, n & 1);
    const FwdItem& w = items[n % 2];
    const int n_blocks = w.n_blocks;
    if (n_blocks < 0) break;
    const int m0 = w.m0, seqlen_q = w.seq.seqlen_q, seqlen_k = w.seq.seqlen_k, diag = seqlen_k - seqlen_q;
    const Band<BAND> band{diag, window_left, window_right};
    const KeyTiles<BN, BAND, SPARSE> tiles = work.key_tiles(w);
    const float alibi_slope = ALIBI ? alibi_slopes[w.b * alibi_sb + w.h] / softmax_scale : 0.f;
    float row_lse[1][2], row_delta[1][2];  // this thread's two rows: lse in the exponent's units
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = frag_row(m0 + warp_row, lane, half);
      const long long at = w.b * lse_sb + w.h * lse_sh + w.seq.q_start + i;
      row_lse[0][half] = i < seqlen_q ? exp_units<false>(lse[at]) : kNegInf;
      row_delta[0][half] = i < seqlen_q ? delta[at] : 0.f;
    }
    float acc_dq[1][D / 8][4];
    zero(acc_dq);
    const ConsumerTurns turns{wg, kConsumers / 128};
    if (n_blocks > 0) {
      turns.start();
      float acc_s[1][BN / 8][4], acc_dp[1][BN / 8][4];
      unsigned ds[BN / 16][4];  // dS of the previous key tile, as the A operand of dQ += dS K
      SparseTile at = tiles.at(lists, w.list, 0);
      // Turn `it` issues dQ += dS K of key tile it - 1 (DQ), and S, dP of tile it (SDP); the first turn has
      // no dQ product, the last no S and dP. The kinds are separate instances, so that no product is
      // issued on a branch (ptxas serialises every product of a kernel that does).
      auto turn = [&](int it, bool DQ, bool SDP) {
        const int g = ring + it, slot = g % STAGES, prev = (g + STAGES - 1) % STAGES;
        const SparseTile at_next = tiles.at(lists, w.list, it + 1 < n_blocks ? it + 1 : 0);
        PartialBits<1, BN / 8> bits;
        if constexpr (SPARSE)
          if (SDP && at.slot >= 0) bits.load(lists, at.slot, m0 % lists.row_block + warp_row, at.offset, lane);
        if (SDP) {
          mbar_wait(&k_full[slot], (g / STAGES) & 1);
          mbar_wait(&v_full[slot], (g / STAGES) & 1);
        }
        fence_proxy_async();  // the producer's cp.async writes, now visible, to the tensor cores' reads
        turns.begin();
        if (DQ) wg_mma_frag_b_async<T, BN, D, D>(acc_dq, ds, smem_addr(sK) + prev * kv_slot_bytes);
        if (SDP) {
          Smem::template mma_abt<1, BN, D, true>(acc_s, smem_addr(sQ), warp_row, smem_addr(sK) + slot * kv_slot_bytes,
                                                 lane);
          Smem::template mma_abt<1, BN, D, true>(acc_dp, smem_addr(sdO), warp_row,
                                                 smem_addr(sV) + slot * kv_slot_bytes, lane);
        }
        turns.end(!SDP);
        if (DQ) {  // dQ's product is done: tile it - 1's slot is free once both warpgroups say so
          if (SDP)
            wg_wait<2>(acc_dq);
          else
            wg_wait<0>(acc_dq);
          if (lane == 0) mbar_arrive(&kv_empty[prev]);
        }
        if (SDP) {
          wg_wait<1>(acc_s);
          const int n0 = tiles.first_key(lists, it, at);
          float dtanh[SOFTCAP ? 1 : 1][SOFTCAP ? BN / 8 : 1][4];
          bwd_score_mods<false, false, SPARSE, ALIBI, SOFTCAP>(
              acc_s, dtanh, m0, n0, diag, warp_row, lane, softcap_mult, [&] { return alibi_slope; },
              [&](float (&s)[1][BN / 8][4]) {
                if (at.slot >= 0) bits.apply(s, at.offset, seqlen_k - n0, lane);
              });
          const bool needs_mask = n0 + BN > seqlen_k || (BAND && !band.covers(m0, m0 + BM - 1, n0, n0 + BN - 1));
          bwd_recompute_p<false, false, true>(acc_s, needs_mask, m0, n0, seqlen_q, seqlen_k, band, warp_row, lane,
                                              scale_u, row_lse);
          if constexpr (DROPOUT) w.rng.drop_rows_queries<true>(acc_s, m0 + warp_row, n0, lane);
          wg_wait<0>(acc_dp);
          if (it == n_blocks - 1 && lane == 0) mbar_arrive(&q_empty);  // the producer may load the next Q, dO
          bwd_probs_to_ds<DROPOUT, SOFTCAP, true>(acc_dp, acc_s, acc_dp, dtanh, row_delta, dropout.keep_scale, lane);
          wg_a_fragments<T, BN>(ds, acc_dp);
        }
        at = at_next;
      };
      turn(0, false, true);
      for (int it = 1; it < n_blocks; ++it) turn(it, true, true);
      turn(n_blocks, true, false);
      ring += n_blocks;
    } else if (lane == 0) {
      mbar_arrive(&q_empty);  // no product reads Q or dO
    }
    // dQ straight from registers: sQ may already hold the next item's Q. An item with no key tile writes
    // zeros; rows past the sequence's end nothing.
    store_rows_direct(acc_dq, dq + w.b * dq_sb + w.h * dq_sh + (w.seq.q_start + m0 + warp_row) * dq_ss, dq_ss,
                      seqlen_q - m0 - warp_row, head_dim, softmax_scale, lane);
  }
#else
  __trap();  // compiled for sm_90a only
#endif
}

}  // namespace cuflash
