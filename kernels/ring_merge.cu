// Ring attention's exact merge (cuflash.distributed): a rank's running result for some queries over the
// keys seen so far (o in fp32, lse) and a part over new keys (part in T, part_lse) become the result over
// both key sets, in place:
//   lse' = log(e^lse + e^part_lse),   o' = o e^(lse - lse') + part e^(part_lse - lse').
// A row that saw no key on either side (both -inf) stays 0 and -inf. One pass over both outputs instead of
// the half-dozen element-wise passes the same arithmetic takes in a framework. A warp per row (b, h, i);
// its lanes stride over the head dimension (stride 1). Rows are numbered (batch, head, seqlen).
#include "dtypes.cuh"  // kNegInf
#include "params.cuh"

namespace cuflash {

template <typename T>
__global__ void __launch_bounds__(128)
ring_merge_kernel(float* __restrict__ o, float* __restrict__ lse, const T* __restrict__ part,
                  const float* __restrict__ part_lse, long long o_sb, long long o_ss, long long o_sh, long long part_sb,
                  long long part_ss, long long part_sh, long long lse_sb, long long lse_sh, long long lse_ss,
                  long long part_lse_sb, long long part_lse_sh, long long part_lse_ss, int seqlen, int nheads,
                  int head_dim, long long rows) {
  const long long row = blockIdx.x * 4ll + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32, i = static_cast<int>(row % seqlen);
  const long long bh = row / seqlen;
  const long long h = bh % nheads, b = bh / nheads;
  float* at = lse + b * lse_sb + h * lse_sh + i * lse_ss;
  const float old = *at, add = part_lse[b * part_lse_sb + h * part_lse_sh + i * part_lse_ss];
  const float top = fmaxf(old, add);
  const bool empty = top == kNegInf;  // neither side saw a key: exp(-inf - -inf) would be NaN
  const float now = empty ? kNegInf : top + logf(expf(old - top) + expf(add - top));
  const float keep = empty ? 0.f : expf(old - now), take = empty ? 0.f : expf(add - now);
  __syncwarp();  // every lane has read *at
  if (lane == 0) *at = now;
  float* orow = o + b * o_sb + h * o_sh + i * o_ss;
  const T* prow = part + b * part_sb + h * part_sh + i * part_ss;
  for (int c = lane; c < head_dim; c += 32) orow[c] = orow[c] * keep + static_cast<float>(prow[c]) * take;
}

}  // namespace cuflash
