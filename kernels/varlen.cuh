// Where one batch element's query and key sequences lie. A fixed-length batch (cu_seqlens_q ==
// nullptr) starts at row 0 with the launch's lengths (its batch strides place it); a packed
// variable-length batch (FlashAttention-2's varlen layout, batch strides 0) starts at
// cu_seqlens[b] with length cu_seqlens[b + 1] - cu_seqlens[b]. Offsets are not checked on the host
// (that would cost a synchronisation), so they are clamped here to the packed tensors' rows, total_q
// and total_k: whatever they hold, no access leaves the tensors (offsets past the end or decreasing give
// short or empty sequences; check_inputs=True reports them instead).
#pragma once

namespace cuflash {

struct SeqRange {
  int q_start, k_start, seqlen_q, seqlen_k;
};

__device__ __forceinline__ SeqRange seq_range(const int* cu_seqlens_q, const int* cu_seqlens_k, int b,
                                              int seqlen_q, int seqlen_k, int total_q, int total_k) {
  if (cu_seqlens_q == nullptr) return {0, 0, seqlen_q, seqlen_k};
  const int q0 = min(max(cu_seqlens_q[b], 0), total_q), k0 = min(max(cu_seqlens_k[b], 0), total_k);
  const int q1 = min(max(cu_seqlens_q[b + 1], q0), total_q), k1 = min(max(cu_seqlens_k[b + 1], k0), total_k);
  return {q0, k0, q1 - q0, k1 - k0};
}

}  // namespace cuflash
