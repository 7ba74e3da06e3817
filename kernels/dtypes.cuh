// Element types the kernels are instantiated for (fp16, bf16 and fp32), and the conversions between
// them and the fp32 the kernels compute in.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cuflash {

// -infinity (NVRTC has no <math.h> INFINITY); a bit pattern, so it folds to a constant.
#define kNegInf __int_as_float(0xff800000)
constexpr float kLog2e = 1.4426950408889634f;  // exp(x) = exp2(x * log2(e)): softmax runs on exp2

template <typename T> struct ElemTraits;

// fp16 and bf16: two values travel packed in one 32-bit register (low half = first), as the tensor cores
// take them. Pair is __half2 or __nv_bfloat162; to_pair and to_float2 are its conversions.
__device__ __forceinline__ void to_pair(float lo, float hi, __half2& h) { h = __floats2half2_rn(lo, hi); }
__device__ __forceinline__ void to_pair(float lo, float hi, __nv_bfloat162& h) { h = __floats2bfloat162_rn(lo, hi); }
__device__ __forceinline__ float2 to_float2(__half2 h) { return __half22float2(h); }
__device__ __forceinline__ float2 to_float2(__nv_bfloat162 h) { return __bfloat1622float2(h); }

template <typename Pair, bool BF16>
struct PackedTraits {
  static __device__ __forceinline__ unsigned pack2(float lo, float hi) {
    Pair h;
    to_pair(lo, hi, h);
    return *reinterpret_cast<unsigned*>(&h);
  }
  static __device__ __forceinline__ float2 unpack2(unsigned x) { return to_float2(*reinterpret_cast<Pair*>(&x)); }
  static constexpr bool is_bf16 = BF16, is_f32 = false;
};

template <> struct ElemTraits<__half> : PackedTraits<__half2, false> {};
template <> struct ElemTraits<__nv_bfloat16> : PackedTraits<__nv_bfloat162, true> {};

// fp32 inputs: tiles hold fp32, and the tensor-core products split each value into TF32 parts
// (mma.cuh, warp_mma.cuh).
template <> struct ElemTraits<float> {
  static constexpr bool is_bf16 = false, is_f32 = true;
};

// Elements per 16-byte chunk: the unit of every global <-> shared copy.
template <typename T>
constexpr int kChunk = 16 / static_cast<int>(sizeof(T));

// Store two fp32 values as two consecutive elements of T (one 4- or 8-byte store).
template <typename T>
__device__ __forceinline__ void store2(T* p, float lo, float hi) {
  if constexpr (ElemTraits<T>::is_f32)
    *reinterpret_cast<float2*>(p) = make_float2(lo, hi);
  else
    *reinterpret_cast<unsigned*>(p) = ElemTraits<T>::pack2(lo, hi);
}

// sum_c x[c] * y[c] over one 16-byte chunk, in fp32.
template <typename T>
__device__ __forceinline__ float dot_chunk(const T* x, const T* y) {
  const uint4 a = *reinterpret_cast<const uint4*>(x), b = *reinterpret_cast<const uint4*>(y);
  const unsigned as[4] = {a.x, a.y, a.z, a.w}, bs[4] = {b.x, b.y, b.z, b.w};
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    if constexpr (ElemTraits<T>::is_f32) {
      acc = fmaf(__uint_as_float(as[j]), __uint_as_float(bs[j]), acc);
    } else {
      const float2 u = ElemTraits<T>::unpack2(as[j]), w = ElemTraits<T>::unpack2(bs[j]);
      acc = fmaf(u.x, w.x, fmaf(u.y, w.y, acc));
    }
  }
  return acc;
}

}  // namespace cuflash
