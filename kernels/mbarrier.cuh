// Hopper (sm_90) synchronisation between the warpgroups of one thread block, without stopping the
// whole block: mbarriers in shared memory (a count of arrivals completes a phase; waiters test the
// phase's parity), cp.async completion reported to an mbarrier, named barriers between some warps,
// and register reallocation between warpgroups (setmaxnreg, sm_90a).
#pragma once
#include "mma.cuh"  // smem_addr

namespace cuflash {

typedef unsigned long long MBarrier;  // lives in shared memory

__device__ __forceinline__ void mbar_init(MBarrier* bar, unsigned arrivals) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
}

// Block until the phase of parity `parity` has completed. A fresh barrier is in phase 0, so waiting
// for parity 1 (the phase "before" it) returns at once.
__device__ __forceinline__ void mbar_wait(MBarrier* bar, unsigned parity) {
  unsigned done;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(smem_addr(bar)), "r"(parity)
        : "memory");
  } while (!done);
}

__device__ __forceinline__ void mbar_arrive(MBarrier* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

// One arrival for the whole warp, after every lane's earlier shared-memory reads: __syncwarp orders the
// other lanes' reads before lane 0's arrival, so a producer that waits on `bar` and refills what they read
// cannot overwrite it early (the memory model asks for it; lanes in step never showed a difference). Slots
// that only the tensor cores read are freed after wgmma's wait and need no __syncwarp.
__device__ __forceinline__ void mbar_arrive_warp(MBarrier* bar, int lane) {
  __syncwarp();
  if (lane == 0) mbar_arrive(bar);
}

// Arrive on `bar` once every cp.async this thread issued so far has landed (counts as one arrival).
__device__ __forceinline__ void cp_async_mbar_arrive(MBarrier* bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(bar)) : "memory");
}

__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;\n" ::: "memory"); }

// Named barrier `id` (1-15; 0 is __syncthreads) of `threads` threads: sync waits for them all,
// arrive counts this warp without waiting.
__device__ __forceinline__ void named_bar_sync(int id, int threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}
__device__ __forceinline__ void named_bar_arrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// Consumer warpgroups taking turns at the tensor cores, in order 0, 1, ..., n - 1, 0, ...: warpgroup w's
// turn opens named barrier 1 + w, which its predecessor's arrival grants (each barrier has the 128 threads
// that wait and the 128 that grant). Warpgroup 0 issues first in each item (start), each turn is
// begin() ... end(); the item's last turn of the last warpgroup leaves the grant for the next item's start.
struct ConsumerTurns {
  int wg, n;  // this warpgroup, and how many take turns
  __device__ __forceinline__ void start() const {
    if (wg == n - 1) named_bar_arrive(1, 256);
  }
  __device__ __forceinline__ void begin() const { named_bar_sync(1 + wg, 256); }
  __device__ __forceinline__ void end(bool last) const {
    // (1 + (wg + 1) % n, spelled so that two warpgroups get the plain 2 - wg: the modulo's code shifted
    // the dK/dV kernel's registers into a spill)
    if (!(last && wg == n - 1)) named_bar_arrive(n == 2 ? 2 - wg : 1 + (wg + 1) % n, 256);
  }
};

// Give registers back to the block's pool (a producer warpgroup) or take them (consumers): all threads
// of a warpgroup execute it together.
// Whether warpgroups of P and C threads can take P_REGS and C_REGS registers each: setmaxnreg.inc waits
// until the block's pool holds what it asks for, and the pool holds only what the launch allocated (a
// block of P + C threads and min-blocks 1 gets 65536 / (P + C) registers a thread, rounded down to 8).
template <int P, int P_REGS, int C, int C_REGS>
constexpr bool launch_registers_cover = P * P_REGS + C * C_REGS <= (65536 / (P + C)) / 8 * 8 * (P + C);

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
template <int N>
__device__ __forceinline__ void warpgroup_release_registers() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}
template <int N>
__device__ __forceinline__ void warpgroup_claim_registers() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}
#else
template <int N>
__device__ __forceinline__ void warpgroup_release_registers() {}
template <int N>
__device__ __forceinline__ void warpgroup_claim_registers() {}
#endif

// The roles of a warp-specialised kernel's block (flash_fwd_ws.cu; flash_bwd.cu's dK/dV and dQ versions):
// its first warpgroup produces (copies) with PRODUCER_REGS registers a thread, and WARPS consumer warps
// (two warpgroups taking turns, ConsumerTurns) compute with CONSUMER_REGS. A kernel branches on
// threadIdx.x < kProducers; each side then calls its become_*() first.
template <int WARPS, int PRODUCER_REGS, int CONSUMER_REGS>
struct WarpRoles {
  static constexpr int kProducers = 128, kConsumers = WARPS * 32;
  static_assert(launch_registers_cover<kProducers, PRODUCER_REGS, kConsumers, CONSUMER_REGS>,
                "registers the launch did not allocate");
  static __device__ __forceinline__ void become_producer() { warpgroup_release_registers<PRODUCER_REGS>(); }
  static __device__ __forceinline__ void become_consumer() { warpgroup_claim_registers<CONSUMER_REGS>(); }
};

}  // namespace cuflash
