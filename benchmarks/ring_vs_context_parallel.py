"""Ring attention over several GPUs (cuflash.distributed.ring_flash_attn_func) against PyTorch's
context_parallel over SDPA FLASH, and against one GPU at the same per-GPU chunk, in one run.

    torchrun --nproc-per-node 4 benchmarks/ring_vs_context_parallel.py [--json PATH] [--seqlens 131072 ...]

bf16, d = 128, 16 heads, batch 1; the whole sequence (128K-1M tokens by default, those whose chunk of
seqlen / world_size tokens is at most --max-chunk) split over the ranks, causal and not, forward and
forward+backward. Each timing is the median over repetitions of the slowest rank's CUDA-event time, the
ranks lined up by a barrier first; inputs alternate between two random sets. Per-GPU TFLOP/s count the
whole attention's FLOPs (FlashAttention's count, halved when causal, x3.5 for forward+backward) divided by
the ranks; "one GPU" runs flash_attn_func on each rank's own chunk alone (chunk x chunk, no transfers),
the rate the ring would reach with its transfers fully hidden. The outputs of the two rings are compared
(gathered whole) in the same run.
"""
import argparse
import os
import statistics
import sys

HEADS, D = 16, 128
PASS_FLOP_FACTOR = {"fwd": 1.0, "fwd_bwd": 3.5}


def main(argv):
    for var, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                       ("NVSHMEM_DISABLE_NVLS", "1")):  # no NVLink multicast (the GPU machines' rule)
        os.environ.setdefault(var, value)
    import torch
    import torch.distributed as dist

    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    ap.add_argument("--seqlens", type=int, nargs="+", default=[2 ** 17, 2 ** 18, 2 ** 19, 2 ** 20])
    ap.add_argument("--max-chunk", type=int, default=2 ** 17, help="skip sequences whose per-GPU chunk is longer")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    results = []
    try:
        for n in args.seqlens:
            if n % (2 * world) or n // world > args.max_chunk:
                continue
            for causal in (False, True):
                results += _case(n, causal, rank, world, args.reps)
    finally:
        dist.destroy_process_group()
    if args.json and rank == 0:
        from cuflash import _bench

        _bench.write_json(args.json, argv, results, program=f"torchrun --nproc-per-node {world} "
                                                            "benchmarks/ring_vs_context_parallel.py")


def _timed(fn, reps):
    """Median over reps of the slowest rank's time of fn(i) (i alternates the input set), in ms."""
    import torch
    import torch.distributed as dist

    fn(0)  # warm-up (compiles the kernels)
    fn(1)
    times = []
    for i in range(reps):
        dist.barrier()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % 2)
        end.record()
        torch.cuda.synchronize()
        ms = torch.tensor([start.elapsed_time(end)], device="cuda")
        dist.all_reduce(ms, op=dist.ReduceOp.MAX)
        times.append(ms.item())
    return statistics.median(times)


def _case(n, causal, rank, world, reps):
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.experimental import context_parallel
    try:  # (not exported, and its module differs between PyTorch versions)
        from torch.distributed.tensor.experimental._context_parallel._attention import context_parallel_unshard
    except ImportError:
        from torch.distributed.tensor.experimental._attention import context_parallel_unshard
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import cuflash
    from cuflash.distributed import ring_flash_attn_func, shard, unshard

    chunk = n // world
    gen = torch.Generator(device="cuda").manual_seed(0)  # the same whole sequences on every rank

    def whole():  # in SDPA's (batch, heads, seq, d) layout, which context_parallel shards in place
        return torch.randn(1, HEADS, n, D, device="cuda", dtype=torch.bfloat16, generator=gen)

    cp_sets = [[whole() for _ in range(4)] for _ in range(2)]  # q, k, v, dout twice
    mine = [[shard(x.transpose(1, 2), world, rank).contiguous() for x in s] for s in cp_sets]

    def ring(i, backward):
        q, k, v, dout = mine[i]
        if not backward:
            return ring_flash_attn_func(q, k, v, causal=causal)
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        ring_flash_attn_func(q, k, v, causal=causal).backward(dout)

    def one_gpu(i, backward):
        q, k, v, dout = mine[i]
        if not backward:
            return cuflash.flash_attn_func(q, k, v, causal=causal)
        q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
        cuflash.flash_attn_func(q, k, v, causal=causal).backward(dout)

    mesh = init_device_mesh("cuda", (world,))
    flat = [x for s in cp_sets for x in s]
    rows, flops_whole = [], 4.0 * n * n * HEADS * D * (0.5 if causal else 1.0)
    _load_balance(causal)
    with context_parallel(mesh, buffers=flat, buffer_seq_dims=[2] * len(flat), no_restore_buffers=set(flat)):

        def cp(i, backward):
            q, k, v, dout = cp_sets[i]
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                if not backward:
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
                q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
                F.scaled_dot_product_attention(q, k, v, is_causal=causal).backward(dout)

        with torch.no_grad():
            cp_out = cp(0, False)
        for pass_ in ("fwd", "fwd_bwd"):
            backward = pass_ == "fwd_bwd"
            ms = {"cuflash_ring": _timed(lambda i: ring(i, backward), reps),
                  "torch_context_parallel_sdpa_flash": _timed(lambda i: cp(i, backward), reps),
                  "cuflash_one_gpu_chunk": _timed(lambda i: one_gpu(i, backward), reps)}
            one_gpu_flops = 4.0 * chunk * chunk * HEADS * D * (0.5 if causal else 1.0)
            one_gpu_rate = one_gpu_flops * PASS_FLOP_FACTOR[pass_] / ms["cuflash_one_gpu_chunk"] / 1e9
            for impl, t in ms.items():
                per_gpu = (one_gpu_flops if impl == "cuflash_one_gpu_chunk" else flops_whole / world)
                rate = per_gpu * PASS_FLOP_FACTOR[pass_] / t / 1e9
                rows.append({"suite": "ring", "impl": impl, "pass": pass_, "world_size": world, "seqlen": n,
                             "chunk": chunk, "causal": causal, "dtype": "bfloat16", "nheads": HEADS, "headdim": D,
                             "ms": t, "tflops_per_gpu": rate, "of_one_gpu": rate / one_gpu_rate})
            if rank == 0:
                print(f"seqlen {n:8} world {world} causal={causal!s:5} {pass_:7} "
                      + "  ".join(f"{impl} {t:8.2f} ms" for impl, t in ms.items())
                      + f"  ring per GPU {rows[-3]['of_one_gpu']:.2f}x one GPU", flush=True)
        (cp_whole,) = context_parallel_unshard(mesh, [cp_out], [2])
    with torch.no_grad():
        ours = ring_flash_attn_func(*mine[0][:3], causal=causal)
    gathered = [torch.empty_like(ours) for _ in range(world)]
    dist.all_gather(gathered, ours)
    diff = (unshard(gathered) - cp_whole.transpose(1, 2)).abs().max().item()
    for row in rows:
        row["max_abs_diff_vs_context_parallel"] = diff
    if rank == 0:
        print(f"seqlen {n:8} causal={causal!s:5} max |ring - context_parallel| = {diff:.2e}", flush=True)
    return rows


def _load_balance(on: bool) -> None:
    """context_parallel balances causal work with a layout of its own, and refuses to without is_causal."""
    try:
        from torch.distributed.tensor.experimental._attention import _cp_options
    except ImportError:
        from torch.distributed.tensor.experimental._context_parallel._attention import _cp_options
    _cp_options.enable_load_balance = on


if __name__ == "__main__":
    main(sys.argv[1:])
