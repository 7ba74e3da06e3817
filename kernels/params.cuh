// Kernel parameters: one struct per kernel family, the one declaration of what a kernel takes.
//
// The kernels take these fields as their parameters, in this order and with these types (a CPU test,
// tests/test_params.py, compiles a check of every kernel's signature against its struct and of every
// offset against what cuflash/_params.py packs). They take them one by one rather than as one struct by
// value: by value, the pointer fields lose what a pointer parameter tells the compiler (global memory,
// __restrict__), and the code changed in 615 of 621 sampled variants, 11 of them spilling more
// (docs/kernel-design.md). _params.py reads these declarations: keep one field per line, `type name;`,
// at the struct's top level. Strides are in elements, per dimension: batch (sb), sequence (ss), head
// (sh). Packed variable-length batches have batch strides 0 and cu_seqlens (varlen.cuh); fixed lengths
// have null cu_seqlens.
#pragma once
#include "block_sparse.cuh"  // BlockLists
#include "dropout.cuh"       // DropoutArgs
#include "score_fn.cuh"      // ModArgs
#include "tma.cuh"           // TmaMap

namespace cuflash {

// flash_fwd_kernel (flash_fwd.cu) and flash_fwd_ws_kernel (flash_fwd_ws.cu).
template <typename T>
struct FwdParams {
  const T* __restrict__ q;
  const T* __restrict__ k;
  const T* __restrict__ v;
  T* __restrict__ o;
  float* __restrict__ lse;
  long long q_sb;
  long long q_ss;
  long long q_sh;
  long long k_sb;
  long long k_ss;
  long long k_sh;
  long long v_sb;
  long long v_ss;
  long long v_sh;
  long long o_sb;
  long long o_ss;
  long long o_sh;
  int max_seqlen_q;
  int max_seqlen_k;
  int nheads;
  int kv_group;           // query heads per K/V head
  int head_dim;
  int num_m_blocks;       // query tiles per (batch, head)
  int window_left;        // the band (band.cuh)
  int window_right;
  float softmax_scale;    // with a softcap: the cap (score_mods.cuh)
  float softcap_mult;     // scale / cap, or 0 without a softcap
  const float* __restrict__ alibi_slopes;
  long long alibi_sb;
  const int* __restrict__ cu_seqlens_q;
  const int* __restrict__ cu_seqlens_k;
  int total_q;            // packed sequences: the rows of q, and of k and v (varlen.cuh clamps to them)
  int total_k;
  long long lse_sb;
  long long lse_sh;
  BlockLists lists;       // zeros for dense variants
  DropoutArgs dropout;
  unsigned* __restrict__ tile_counter;  // persistent (warp-specialised) kernel: (next tile, blocks exited)
  int num_tiles;
  ModArgs mod;            // the user's score function's captured values (score_fn.cuh); zeros without one
  // flash_fwd_ws_kernel with tma != 0: Q, K and V come by TMA (tma.cuh) through these tensor maps of
  // (batch, sequence, head, dim) arrays; otherwise (and in flash_fwd_kernel) they are zeros and unread.
  int tma;
  TmaMap q_map;
  TmaMap k_map;
  TmaMap v_map;
};

// flash_fwd_sinks_kernel (flash_fwd.cu): a sink logit per head joins the softmax after the forward.
template <typename T>
struct FwdSinksParams {
  T* __restrict__ o;
  float* __restrict__ lse;
  const float* __restrict__ sinks;
  long long o_sb;
  long long o_ss;
  long long o_sh;
  long long lse_sb;
  long long lse_sh;
  int seqlen;             // rows per (batch, head): seqlen_q, or total_q for packed sequences
  int nheads;
  int head_dim;
  long long rows;         // batch x nheads x seqlen
};

// ring_merge_kernel (ring_merge.cu): a partial attention result folded into a running one, in place.
template <typename T>
struct RingMergeParams {
  float* __restrict__ o;  // running output, fp32
  float* __restrict__ lse;
  const T* __restrict__ part;
  const float* __restrict__ part_lse;
  long long o_sb;
  long long o_ss;
  long long o_sh;
  long long part_sb;
  long long part_ss;
  long long part_sh;
  long long lse_sb;
  long long lse_sh;
  long long lse_ss;
  long long part_lse_sb;
  long long part_lse_sh;
  long long part_lse_ss;
  int seqlen;
  int nheads;
  int head_dim;
  long long rows;  // batch x nheads x seqlen
};

// flash_bwd_preprocess_kernel: delta = rowsum(dO * O).
template <typename T>
struct BwdPreprocessParams {
  const T* __restrict__ dout;
  const T* __restrict__ out;
  float* __restrict__ delta;
  long long do_sb;
  long long do_ss;
  long long do_sh;
  long long o_sb;
  long long o_ss;
  long long o_sh;
  int seqlen_q;
  int nheads;
  int head_dim;
  int blocks_per_bh;      // thread blocks per (batch, head)
  int row_lanes;          // lanes per row
  const float* __restrict__ lse;
  float* __restrict__ tile_stats;  // if not null: lse (as neg_lse_units) and delta again, in the layout of tile_stats_row
};

// flash_bwd_dkdv_kernel and flash_bwd_dkdv_ws_kernel (persistent: tile_counter and num_items).
template <typename T>
struct BwdDkdvParams {
  const T* __restrict__ q;
  const T* __restrict__ k;
  const T* __restrict__ v;
  const T* __restrict__ dout;
  const float* __restrict__ lse;
  const float* __restrict__ delta;
  T* __restrict__ dk;
  T* __restrict__ dv;
  float* __restrict__ dq_accum;  // dQ in fp32 (dq_accum.cuh), for kernels that accumulate it; else null
  long long q_sb;
  long long q_ss;
  long long q_sh;
  long long k_sb;
  long long k_ss;
  long long k_sh;
  long long v_sb;
  long long v_ss;
  long long v_sh;
  long long do_sb;
  long long do_ss;
  long long do_sh;
  long long dk_sb;
  long long dk_ss;
  long long dk_sh;
  long long dv_sb;
  long long dv_ss;
  long long dv_sh;
  int max_seqlen_q;
  int max_seqlen_k;
  int nheads;
  int kv_group;
  int head_dim;
  int num_n_blocks;       // key tiles per (batch, K/V head)
  int window_left;
  int window_right;
  float softmax_scale;
  float softcap_mult;
  const float* __restrict__ alibi_slopes;
  long long alibi_sb;
  const int* __restrict__ cu_seqlens_q;
  const int* __restrict__ cu_seqlens_k;
  int total_q;            // packed sequences: the rows of q, and of k and v (varlen.cuh clamps to them)
  int total_k;
  long long lse_sb;
  long long lse_sh;
  BlockLists lists;       // key-major lists
  DropoutArgs dropout;
  unsigned* __restrict__ tile_counter;
  int num_items;
  ModArgs mod;            // the user's score function's captured values (score_fn.cuh); zeros without one
  // flash_bwd_dkdv_ws_kernel with tma != 0: Q and dO (boxes of a query tile's rows) and K and V (boxes of 8
  // rows) come by TMA (tma.cuh) through these maps, and where it accumulates dQ also each query tile's lse and
  // delta (stats_map: the preprocess's copy, dq_accum.cuh tile_stats_row, in boxes of the tile's two rows);
  // otherwise (and in flash_bwd_dkdv_kernel) zeros, unread.
  int tma;
  TmaMap q_map;
  TmaMap k_map;
  TmaMap v_map;
  TmaMap do_map;
  TmaMap stats_map;
};

// flash_bwd_dq_convert_kernel: dq = dq_accum * softmax_scale.
template <typename T>
struct BwdDqConvertParams {
  const float* __restrict__ dq_accum;
  T* __restrict__ dq;
  long long dq_sb;
  long long dq_ss;
  long long dq_sh;
  const int* __restrict__ cu_seqlens_q;  // packed sequences (varlen), else null
  int max_seqlen_q;
  int total_q;
  int nheads;
  int head_dim;
  int m_tiles;            // accumulator tiles (blocks) per (batch, head): max_seqlen_q / 64, rounded up
  float softmax_scale;
};

// flash_bwd_dq_kernel and flash_bwd_dq_ws_kernel (persistent: tile_counter and num_items).
template <typename T>
struct BwdDqParams {
  const T* __restrict__ q;
  const T* __restrict__ k;
  const T* __restrict__ v;
  const T* __restrict__ dout;
  const float* __restrict__ lse;
  const float* __restrict__ delta;
  T* __restrict__ dq;
  long long q_sb;
  long long q_ss;
  long long q_sh;
  long long k_sb;
  long long k_ss;
  long long k_sh;
  long long v_sb;
  long long v_ss;
  long long v_sh;
  long long do_sb;
  long long do_ss;
  long long do_sh;
  long long dq_sb;
  long long dq_ss;
  long long dq_sh;
  int max_seqlen_q;
  int max_seqlen_k;
  int nheads;
  int kv_group;
  int head_dim;
  int num_m_blocks;
  int window_left;
  int window_right;
  float softmax_scale;
  float softcap_mult;
  const float* __restrict__ alibi_slopes;
  long long alibi_sb;
  const int* __restrict__ cu_seqlens_q;
  const int* __restrict__ cu_seqlens_k;
  int total_q;            // packed sequences: the rows of q, and of k and v (varlen.cuh clamps to them)
  int total_k;
  long long lse_sb;
  long long lse_sh;
  BlockLists lists;       // query-major lists
  DropoutArgs dropout;
  unsigned* __restrict__ tile_counter;
  int num_items;
  ModArgs mod;            // the user's score function's captured values (score_fn.cuh); zeros without one
};

}  // namespace cuflash
