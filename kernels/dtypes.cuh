// Element types the kernels are instantiated for, and the conversions between them and fp32.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace cuflash {

// -infinity (NVRTC has no <math.h> INFINITY); a bit pattern, so it folds to a constant.
#define kNegInf __int_as_float(0xff800000)

template <typename T> struct ElemTraits;

template <> struct ElemTraits<__half> {
  // Pack two fp32 values into one 32-bit register holding two fp16 (low half = first).
  static __device__ __forceinline__ unsigned pack2(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
  }
  static __device__ __forceinline__ float2 unpack2(unsigned x) {
    return __half22float2(*reinterpret_cast<__half2*>(&x));
  }
  static constexpr bool is_bf16 = false;
};

template <> struct ElemTraits<__nv_bfloat16> {
  static __device__ __forceinline__ unsigned pack2(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned*>(&h);
  }
  static __device__ __forceinline__ float2 unpack2(unsigned x) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&x));
  }
  static constexpr bool is_bf16 = true;
};

}  // namespace cuflash
