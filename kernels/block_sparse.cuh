// Block-sparse schedules: the lists of a cuflash.BlockMask as the kernels read them.
//
// A row (one query block for the forward and dQ kernels, one key block of one K/V head for the
// dK/dV kernel) lists the blocks it visits: `count` entries of (block index, bit slot), partial
// blocks first. A slot >= 0 points at the partial block's element bits, laid out along the row's own
// direction (row_block rows of col_block / 32 words; bit c % 32 of word c / 32 set when column c is
// visible from that row: keys for the query-major lists, queries for the key-major ones); -1 marks a
// full block, which needs no element test. Kernel tiles divide the mask's blocks, so a block is
// visited as col_block / tile consecutive kernel tiles.
#pragma once
#include "dtypes.cuh"
#include "mma.cuh"  // frag_row

namespace cuflash {

struct BlockLists {
  const int* count;       // (rows)
  const int* index;       // (rows, cap): key block (query-major lists) or g << group_shift | query block
  const int* slot;        // (rows, cap)
  const unsigned* bits;   // (slots, row_block, col_block / 32)
  const int* order;       // query-major: each (batch, head)'s rows by descending count (the launch order)
  long long b_stride;     // rows between batches (0: the mask broadcasts over batch)
  long long h_stride;     // rows between heads (0: broadcasts over heads)
  int cap;                // entries per row
  int row_block;          // the rows' block size: block_m for query-major lists, block_n for key-major
  int col_block;          // the listed blocks' size
  int group_shift;        // key-major lists: the query head g of a GQA group sits above this bit

  __device__ __forceinline__ long long row(int b, int h, int block) const {
    return b * b_stride + h * h_stride + block;
  }
  // The kernel tile (of `tile` rows) that the idx-th thread block of (b, h) runs: rows with the longest
  // lists first, so that the grid does not end waiting on a few long rows (a causal mask's last
  // query blocks, a global block). The grid covers every tile of every row block.
  __device__ __forceinline__ int heaviest_first(int b, int h, int idx, int tile) const {
    const int sub = row_block / tile, r = idx / sub;
    return __ldg(order + row(b, h, r)) * sub + idx - r * sub;
  }
};

// mask_lists_kernel's parameters (mask_lists.cu: BlockMask.from_cuda's lists from its block states).
struct MaskListsParams {
  const signed char* __restrict__ states;  // (batch x heads, nq, nk): 0 empty, 1 partial, 2 full
  int* __restrict__ slots;                 // the same shape: each partial block's slot in the pool, else -1
  const int* __restrict__ first_slot;      // (lines): each row's first slot, for MODE 1
  int* __restrict__ full_count;            // (lines)
  int* __restrict__ full_index;            // (lines, blocks along a line)
  int* __restrict__ partial_count;
  int* __restrict__ partial_index;
  int* __restrict__ partial_slot;
  int lines;                               // rows (batch x heads x nq) or columns (batch x heads x nk)
  int nq;
  int nk;
};

// One row's list as a thread block reads it: where its entries start and how many there are. Thread
// 0 fills it in shared memory (the caller then synchronises), so no register holds it through the
// main loop.
struct ListRow {
  long long entries;
  int count;
};

__device__ __forceinline__ void read_list_row(const BlockLists& lists, long long row, ListRow& shared_row) {
  if (threadIdx.x == 0) {
    shared_row.entries = row * lists.cap;
    shared_row.count = __ldg(lists.count + row);
  }
}

// Where a kernel tile lies in the mask: the listed block's index and bit slot (-1: a full block),
// and the tile's offset inside the block, for tile `it` of the row whose entries start at `entries`
// (sub = kernel tiles per block, each `tile` wide).
struct SparseTile {
  int block, slot, offset;
};

__device__ __forceinline__ SparseTile sparse_tile(const BlockLists& lists, long long entries, int it, int sub,
                                                  int tile) {
  const int e = it / sub;
  return {__ldg(lists.index + entries + e), __ldg(lists.slot + entries + e), (it - e * sub) * tile};
}

// The same walk, one tile after another with no division: tile `sub` (of `subs`) of entry `e`.
struct TileCursor {
  int e, sub;  // TileCursor{0, 0}: the first tile
  __device__ __forceinline__ void advance(int subs) {
    if (++sub == subs) sub = 0, ++e;
  }
  __device__ __forceinline__ SparseTile in(const BlockLists& lists, long long entries, int tile) const {
    return {__ldg(lists.index + entries + e), __ldg(lists.slot + entries + e), sub * tile};
  }
};

// A partial block's element bits for a warp's 16 MT rows (from r0 inside the block) and the NT*8
// columns of a kernel tile (from c0 inside the block, c0 a multiple of the tile's width), in the mma
// accumulator layout of the lists' rows and columns. load() reads them, ahead of the scores where a
// kernel can, so that their latency hides behind the tile's waits and products; apply() sets the
// scores they hide to -inf (and those of columns from cols_left on, past the sequence's end). Tiles of
// 32 keys or more span whole 32-bit words; a 16-key tile (fp32) is half of one.
template <int MT, int NT>
struct PartialBits {
  static constexpr int W = NT % 4 == 0 ? NT / 4 : 1;
  unsigned word[MT][2][W];

  __device__ __forceinline__ void load(const BlockLists& lists, int slot, int r0, int c0, int lane) {
    static_assert(NT % 4 == 0 || NT == 2, "tiles span whole 32-key words, or half of one");
    const int words = lists.col_block / 32;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = frag_row(r0 + mt * 16, lane, half);
        const unsigned* row_bits = lists.bits + (static_cast<long long>(slot) * lists.row_block + r) * words + c0 / 32;
#pragma unroll
        for (int w = 0; w < W; ++w) word[mt][half][w] = __ldg(row_bits + w);
      }
  }

  __device__ __forceinline__ void apply(float (&acc)[MT][NT][4], int c0, int cols_left, int lane) const {
    const int shift = c0 % 32;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int half = 0; half < 2; ++half)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int cc = 0; cc < 2; ++cc) {
            const int col = nt * 8 + (lane % 4) * 2 + cc;
            // Word and bit at compile-time indices (a runtime index would put `word` in local memory).
            const unsigned w = NT % 4 == 0 ? word[mt][half][nt / 4] >> (col % 32) : word[mt][half][0] >> (shift + col);
            if (col >= cols_left || !(w & 1u)) acc[mt][nt][2 * half + cc] = kNegInf;
          }
  }
};

// Both steps at once, for kernels that read the bits where they use them.
template <int MT, int NT>
__device__ __forceinline__ void mask_partial_block(float (&acc)[MT][NT][4], const BlockLists& lists, int slot,
                                                   int r0, int c0, int cols_left, int lane) {
  PartialBits<MT, NT> bits;
  bits.load(lists, slot, r0, c0, lane);
  bits.apply(acc, c0, cols_left, lane);
}

}  // namespace cuflash
