// Thin wrappers over the PTX instructions the kernels are built from (sm_80+):
// cp.async (global -> shared, 16 bytes, zero-fill), ldmatrix, and mma.sync m16n8k16.
#pragma once
#include "dtypes.cuh"

namespace cuflash {

__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// Copy 16 bytes global -> shared; when `valid` is false nothing is read and zeros are written.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem),
               "r"(src_bytes));
}
// One 4-byte word (zeros where !valid).
__device__ __forceinline__ void cp_async_4(void* smem, const void* gmem, bool valid) {
  int src_bytes = valid ? 4 : 0;
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_addr(smem)), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Four 8x8 matrices of 16-bit elements; lane i supplies the row address of matrix i/8, row i%8.
// Addresses are 32-bit shared-window addresses: a per-lane base plus a compile-time offset, which
// ptxas folds into the instruction instead of keeping one register per address.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem));
}

__device__ __forceinline__ unsigned lds32(unsigned smem) {
  unsigned v;
  asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(v) : "r"(smem));
  return v;
}
__device__ __forceinline__ void sts32(unsigned smem, unsigned x) {
  asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(smem), "r"(x) : "memory");
}

// Calls f(mt, nt, c) for every element of an [MT][NT][4] accumulator fragment, unrolled.
template <int MT, int NT, typename F>
__device__ __forceinline__ void for_each_element(F&& f) {
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int c = 0; c < 4; ++c) f(mt, nt, c);
}

// D = A(16x16, row) * B(16x8, col) + D, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (ElemTraits<T>::is_bf16) {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// D = A(16x8, row) * B(8x8, col) + D in TF32 with fp32 accumulators.
__device__ __forceinline__ void mma_1688_tf32(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// x's TF32 part rounded to nearest (ties away from zero, as cvt.rna) with two integer operations.
// The tensor cores read a TF32 operand from the top 19 bits of an fp32 register and ignore the rest,
// so the small part, x - big (exact, at most 12 significant bits), goes in as it is.
__device__ __forceinline__ unsigned tf32_round(unsigned x) { return (x + 0x1000u) & 0xffffe000u; }
__device__ __forceinline__ void tf32_split(unsigned x, unsigned& big, unsigned& small) {
  big = tf32_round(x);
  small = __float_as_uint(__uint_as_float(x) - __uint_as_float(big));
}

// A fragment of fp32 values as two TF32 fragments, x = big + small: about 22 of fp32's 24 bits.
// Products take three terms (big·big, big·small, small·big; "3xTF32").
template <int N>
struct Tf32Split {
  unsigned big[N], small[N];
  __device__ __forceinline__ Tf32Split() {}
  __device__ __forceinline__ Tf32Split(const unsigned (&b)[N], const unsigned (&s)[N]) {  // split already
#pragma unroll
    for (int i = 0; i < N; ++i) big[i] = b[i], small[i] = s[i];
  }
  __device__ __forceinline__ explicit Tf32Split(const unsigned (&x)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      tf32_split(x[i], big[i], small[i]);
    }
  }
};

// d[g] += A B[g] for G column tiles from split operands, small terms first so that they are added
// before the large one. One product of each tile in turn: a chain into one accumulator waits for each
// product, so G independent chains keep the tensor cores busy (the forward ran 1 chain at a time).
template <int G>
__device__ __forceinline__ void mma_1688_split(float (&d)[G][4], const Tf32Split<4>& a, const Tf32Split<2> (&b)[G]) {
#pragma unroll
  for (int g = 0; g < G; ++g) mma_1688_tf32(d[g], a.small, b[g].big[0], b[g].big[1]);
#pragma unroll
  for (int g = 0; g < G; ++g) mma_1688_tf32(d[g], a.big, b[g].small[0], b[g].small[1]);
#pragma unroll
  for (int g = 0; g < G; ++g) mma_1688_tf32(d[g], a.big, b[g].big[0], b[g].big[1]);
}

// The row of an mma accumulator element: lane holds elements c = 2 half and 2 half + 1 of rows lane / 4 and
// lane / 4 + 8 of each 16-row fragment; `base` is the fragment's first row. Summed as (base + lane / 4) +
// half * 8: callers pass their own sums as base, as a regrouped sum changes ptxas's code. (The loops over
// each element c -- mask_scores, bwd_recompute_p, the dK/dV warp-specialised kernel -- spell it out: a call
// there changes ptxas's code too.)
__device__ __forceinline__ int frag_row(int base, int lane, int half) { return base + lane / 4 + half * 8; }

__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

}  // namespace cuflash
