"""python -m cuflash {compile-check, warmup, bench, bench-sparse, info}"""
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
    commands = {"compile-check": _compile_check, "warmup": _warmup, "info": _info}
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
