// BlockMask.from_cuda's lists (masks.BlockMask, _block_lists.py), built where the block states are:
// a warp per line of blocks (ROWS: a query block's key blocks, else a key block's query blocks) walks it
// 32 blocks at a time, and a ballot gives each full or partial block its place in the line's list, so
// both lists come out in ascending order, padded with -1. A partial block's slot in the pool is its
// row's first slot (first_slot: an exclusive scan of the rows' partial counts) plus its rank in the
// row; the rows write every block's slot (-1: not partial) for the columns and the bits' pass to read.
//   MODE 0: the rows' counts only (for that scan); 1: the rows' lists and the slots; 2: the columns' lists.
#include "block_sparse.cuh"  // MaskListsParams

namespace cuflash {

template <int MODE>
__global__ void __launch_bounds__(128)
mask_lists_kernel(const signed char* __restrict__ states, int* __restrict__ slots, const int* __restrict__ first_slot,
                  int* __restrict__ full_count, int* __restrict__ full_index, int* __restrict__ partial_count,
                  int* __restrict__ partial_index, int* __restrict__ partial_slot, int lines, int nq, int nk) {
  constexpr bool ROWS = MODE < 2;
  const int line = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (line >= lines) return;
  const int n = ROWS ? nk : nq;  // blocks along the line
  // Block j of the line is block `at(j)` of the (batch x heads, nq, nk) states.
  const long long base = ROWS ? static_cast<long long>(line) * nk
                              : static_cast<long long>(line / nk) * nq * nk + line % nk;
  const long long step = ROWS ? 1 : nk;
  const long long out = static_cast<long long>(line) * n;  // the line's entries in the index lists
  const unsigned before = (1u << lane) - 1;  // the lanes below this one
  const int slot0 = MODE == 1 ? first_slot[line] : 0;
  int n_full = 0, n_partial = 0;
  for (int j0 = 0; j0 < n; j0 += 32) {
    const int j = j0 + lane;
    const long long at = base + j * step;
    const int state = j < n ? states[at] : 0;
    const unsigned full = __ballot_sync(0xffffffffu, state == 2), partial = __ballot_sync(0xffffffffu, state == 1);
    if constexpr (MODE > 0) {
      const int rank = n_partial + __popc(partial & before);
      if (state == 2) full_index[out + n_full + __popc(full & before)] = j;
      if (state == 1) {
        const int slot = MODE == 1 ? slot0 + rank : slots[at];
        partial_index[out + rank] = j;
        partial_slot[out + rank] = slot;
      }
      if (MODE == 1 && j < n) slots[at] = state == 1 ? slot0 + rank : -1;
    }
    n_full += __popc(full);
    n_partial += __popc(partial);
  }
  if constexpr (MODE > 0) {
    for (int k = n_full + lane; k < n; k += 32) full_index[out + k] = -1;
    for (int k = n_partial + lane; k < n; k += 32) partial_index[out + k] = partial_slot[out + k] = -1;
  }
  if (lane == 0 && MODE != 1) {  // (MODE 1: the counts are MODE 0's)
    full_count[line] = n_full;
    partial_count[line] = n_partial;
  }
}

}  // namespace cuflash
