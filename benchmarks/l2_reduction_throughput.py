"""How fast the GPU adds fp32 into global memory (the L2's reduction units), against plain stores: each of
8 blocks per SM adds a 16 KiB tile, step after step, into rotating places of a 128 MiB buffer, with
red.global.add.v2.f32 per thread, or bulk reductions (cp.reduce.async.bulk .add.f32, the TMA unit) of
256 B, 4 KiB or the whole 16 KiB. This bounds any backward that accumulates dQ with atomics: 32 KiB of
fp32 per (64-query, 128-key) tile pair (docs/kernel-design.md; output in
benchmarks/results/h200-l2-reduction.txt).

    python benchmarks/l2_reduction_throughput.py
"""
import cupy as cp
import numpy as np

SOURCE = r"""
extern "C" __global__ void __launch_bounds__(256) add_tiles(float* dst, long long regions, int steps, int mode) {
  __shared__ __align__(128) float tile[64 * 64];
  for (int i = threadIdx.x; i < 64 * 64; i += 256) tile[i] = 1.0f;
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
  __syncthreads();
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(tile));
  for (int it = 0; it < steps; ++it) {
    float* g = dst + ((static_cast<long long>(blockIdx.x) * 977 + it * 131) % regions) * 4096;
    if (mode == 0) {  // plain stores, 8 bytes per thread
      for (int j = 0; j < 8; ++j) *reinterpret_cast<float2*>(g + (j * 256 + threadIdx.x) * 2) = make_float2(1.f, 1.f);
    } else if (mode == 1) {  // red.v2 per thread
      for (int j = 0; j < 8; ++j)
        asm volatile("red.relaxed.gpu.global.add.v2.f32 [%0], {%1, %2};" ::"l"(g + (j * 256 + threadIdx.x) * 2),
                     "f"(1.f), "f"(1.f) : "memory");
    } else {  // bulk reductions of `bytes` each
      const int bytes = mode == 2 ? 256 : mode == 3 ? 4096 : 16384;
      if (threadIdx.x < 16384 / bytes) {
        asm volatile("cp.reduce.async.bulk.global.shared::cta.bulk_group.add.f32 [%0], [%1], %2;"
                     ::"l"(reinterpret_cast<char*>(g) + threadIdx.x * bytes), "r"(s + threadIdx.x * bytes), "r"(bytes)
                     : "memory");
        asm volatile("cp.async.bulk.commit_group;" ::: "memory");
        asm volatile("cp.async.bulk.wait_group.read 0;" ::: "memory");
      }
      __syncthreads();
    }
  }
  asm volatile("cp.async.bulk.wait_group 0;" ::: "memory");
}
"""

kernel = cp.RawModule(code=SOURCE, options=("-std=c++17",)).get_function("add_tiles")
regions = 128 * 2**20 // 4 // 4096
dst = cp.zeros(regions * 4096, cp.float32)
sms = cp.cuda.runtime.getDeviceProperties(cp.cuda.runtime.getDevice())["multiProcessorCount"]
blocks, steps = 8 * sms, 100
print(cp.cuda.runtime.getDeviceProperties(0)["name"].decode(), f"| {blocks} blocks x {steps} steps of 16 KiB")
for mode, name in enumerate(("store", "red.v2", "bulk 256B", "bulk 4KiB", "bulk 16KiB")):
    args = (dst, np.int64(regions), np.int32(steps), np.int32(mode))
    for _ in range(2):
        kernel((blocks,), (256,), args)
    start, end = cp.cuda.Event(), cp.cuda.Event()
    start.record()
    kernel((blocks,), (256,), args)
    end.record()
    end.synchronize()
    ms = cp.cuda.get_elapsed_time(start, end)
    print(f"{name:12} {blocks * steps * 16384 / ms / 1e9:7.2f} TB/s ({ms:.3f} ms)")
