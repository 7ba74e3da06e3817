"""python -m cuflash {compile-check, warmup, explain, bench, bench-sparse, info}"""
from __future__ import annotations

import argparse
import sys


def _compile_check(argv) -> int:
    from . import _compile_check

    ap = argparse.ArgumentParser(prog="python -m cuflash compile-check",
                                 description="Compile every kernel variant with NVRTC (no GPU needed); "
                                             "fail on compile errors, spills or too much shared memory.")
    ap.add_argument("--arch", nargs="+", default=["sm_80", "sm_90a"])
    ap.add_argument("--jobs", type=int, default=None)
    args = ap.parse_args(argv)
    return 1 if _compile_check.compile_check(tuple(args.arch), args.jobs) else 0


def _warmup(argv) -> int:
    """Compile, in parallel, every variant the present GPU can use into the on-disk cache."""
    import time

    from . import _arch, _compile, _dispatch

    ap = argparse.ArgumentParser(prog="python -m cuflash warmup", description=_warmup.__doc__)
    ap.add_argument("--arch", help="compile for this arch instead of the present GPU's (e.g. sm_90a)")
    ap.add_argument("--jobs", type=int, default=None)
    args = ap.parse_args(argv)
    arch = args.arch or _arch.device_arch()
    variants = _dispatch.all_variants(arch)
    t0 = time.perf_counter()
    for name in _compile.precompile(variants, arch, args.jobs):
        print(f"  {name}")
    print(f"{len(variants)} variants for {arch} ready in {_compile.cache_dir()} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _explain(argv) -> int:
    """Which kernels, tiles and shared memory a call runs, forward and backward (no GPU needed)."""
    import dataclasses
    import math

    from . import _arch, _dispatch, _options
    from ._problem import Problem

    ap = argparse.ArgumentParser(prog="python -m cuflash explain", description=_explain.__doc__)
    ap.add_argument("--dtype", default="bfloat16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seqlen-q", type=int, default=4096)
    ap.add_argument("--seqlen-k", type=int, default=None, help="default: seqlen-q")
    ap.add_argument("--heads", type=int, nargs=2, default=(1, 1), metavar=("Q", "KV"), help="query and K/V heads")
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--window", type=int, nargs=2, default=(-1, -1), metavar=("LEFT", "RIGHT"))
    ap.add_argument("--block-mask", default=None, metavar="MxN", help="a block mask of M x N blocks, e.g. 128x128")
    ap.add_argument("--alibi", action="store_true")
    ap.add_argument("--softcap", type=float, default=0.0)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--arch", default=None, help="sm_80, sm_90a, ... (default: the present GPU's, else sm_90a)")
    args = ap.parse_args(argv)
    arch = args.arch or (_arch.device_arch() if _arch.gpu_count()[0] else "sm_90a")
    blocks = tuple(int(x) for x in args.block_mask.lower().split("x")) if args.block_mask else None
    p = Problem(1, args.seqlen_q, args.seqlen_k or args.seqlen_q, *args.heads, args.head_dim, args.dtype,
                1 / math.sqrt(args.head_dim), args.softcap, args.dropout, args.causal, tuple(args.window),
                0 if args.alibi else None, blocks)
    options = _options.current()
    changed = {f.name: getattr(options, f.name) for f in dataclasses.fields(options)
               if getattr(options, f.name) != getattr(_options.Options(), f.name)}
    kernels = _arch.policy_arch(arch, options.wgmma)
    print(f"{arch}{f' ({kernels} kernels)' if kernels != arch else ''}; options changed from the defaults: "
          f"{changed or 'none'}")
    print("\n".join(_dispatch.explain(p, kernels, options)))
    return 0


def _info(argv) -> int:
    from . import __version__, _arch, _compile

    print(f"cuflash {__version__}")
    print(f"kernels: {_compile.kernels_dir()}")
    print(f"cache:   {_compile.cache_dir()}")
    n, why = _arch.gpu_count()
    try:
        import cupy

        print(f"cupy {cupy.__version__}, NVRTC {_compile.nvrtc_version()}, headers {_compile.cuda_include_dir()}")
    except Exception as e:  # CuPy or the CUDA wheels missing: the line below says what to install
        print(f"CUDA toolchain: {e}")
    for i in range(n):
        props = cupy.cuda.runtime.getDeviceProperties(i)
        print(f"cuda:{i} {props['name'].decode()} -> {_arch.device_arch(i)}")
    if not n:
        print(why)
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    commands = {"compile-check": _compile_check, "warmup": _warmup, "explain": _explain, "info": _info}
    if not argv or argv[0] not in commands and argv[0] not in ("bench", "bench-sparse"):
        print(f"usage: python -m cuflash {{{', '.join([*commands, 'bench', 'bench-sparse'])}}} [options]",
              file=sys.stderr)
        return 2
    if argv[0] == "bench":
        from . import _bench

        return _bench.main(argv[1:])
    if argv[0] == "bench-sparse":
        from . import _bench_sparse

        return _bench_sparse.main(argv[1:])
    try:
        return commands[argv[0]](argv[1:])
    except Exception as e:  # one line, as bench gives: no GPU, no CuPy, a compile error
        print(f"python -m cuflash {argv[0]}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
