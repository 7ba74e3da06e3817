"""Kernel compilation: sources from kernels/, NVRTC, and the in-process and on-disk caches.

A kernel is named by a source file in kernels/ and a template instance ("name expression"), e.g.
("flash_fwd.cu", "cuflash::flash_fwd_kernel<__half, 128, 128, 32, 4, false>"). It is compiled by NVRTC
for one explicit architecture (sm_90a on Hopper) to a cubin, cached on disk under a key that hashes
every file in kernels/ (so an edited header never runs an old binary), and loaded as a
cupy.RawModule. Compilation itself needs no GPU, which is how CI checks every variant.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# sm_90a unlocks Hopper-only instructions; everything else compiles for its own sm_XY.
_ARCH_SUFFIX = {"90": "a"}
_SHARED_MEMORY_LIMIT = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90a": 227 * 1024}


class CompileError(RuntimeError):
    """NVRTC rejected a kernel; the message carries NVRTC's log."""


def kernels_dir() -> Path:
    """kernels/ inside an installed wheel (cuflash/kernels) or at the top of a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "kernels", here.parent.parent / "kernels"):
        if (candidate / "flash_fwd.cu").is_file():
            return candidate
    raise FileNotFoundError(f"cuflash kernel sources not found next to {here}")


@functools.lru_cache(maxsize=None)
def cuda_include_dir() -> str:
    """A folder holding cuda_fp16.h: the NVIDIA header wheels, CUDA_PATH, or /usr/local/cuda."""
    candidates = [os.environ.get("CUFLASH_CUDA_INCLUDE", "")]
    try:
        import nvidia  # namespace package of the nvidia-* wheels (cupy-cudaXXx[ctk])

        for root in nvidia.__path__:
            candidates += [os.path.join(root, "cuda_runtime", "include"), os.path.join(root, "cu13", "include")]
    except ImportError:
        pass
    for var in ("CUDA_PATH", "CUDA_HOME"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    candidates.append("/usr/local/cuda/include")
    for c in candidates:
        if c and os.path.isfile(os.path.join(c, "cuda_fp16.h")):
            return c
    raise CompileError(
        "CUDA headers (cuda_fp16.h) not found; install the CUDA toolkit wheels "
        "(pip install 'cupy-cuda12x[ctk]' or 'cupy-cuda13x[ctk]') or set CUFLASH_CUDA_INCLUDE"
    )


@functools.lru_cache(maxsize=None)
def device_arch(device_id: int | None = None) -> str:
    """The -arch value for a CUDA device: sm_<major><minor>, with 'a' on Hopper."""
    import cupy

    device = cupy.cuda.Device(device_id)
    cc = str(device.compute_capability)
    if int(cc) < 80:
        raise RuntimeError(f"cuflash needs compute capability 8.0 or newer; device {device.id} has {cc}")
    return f"sm_{cc}{_ARCH_SUFFIX.get(cc, '')}"


def shared_memory_limit(arch: str) -> int:
    return _SHARED_MEMORY_LIMIT.get(arch, 99 * 1024)


def nvrtc_options(arch: str, verbose: bool = False) -> list[str]:
    opts = ["-std=c++17", f"-arch={arch}", "--use_fast_math", f"-I{kernels_dir()}", f"-I{cuda_include_dir()}"]
    if verbose:
        opts.append("-Xptxas=-v")
    return opts


@functools.lru_cache(maxsize=None)
def _sources_digest() -> str:
    """Hash of every kernel source and header: part of each cache key."""
    h = hashlib.sha256()
    for path in sorted(kernels_dir().iterdir()):
        if path.suffix in (".cu", ".cuh"):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _nvrtc_version() -> str:
    from cupy.cuda import nvrtc

    return ".".join(map(str, nvrtc.getVersion()))


@dataclass
class CompiledKernel:
    cubin: bytes
    lowered_name: str
    log: str


def compile_kernel(source: str, name: str, arch: str, verbose: bool = False) -> CompiledKernel:
    """Compile one template instance of kernels/<source> to a cubin with NVRTC (no GPU needed)."""
    from cupy.cuda import nvrtc

    code = (kernels_dir() / source).read_text()
    prog = nvrtc.createProgram(code, source, [], [])
    try:
        nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, nvrtc_options(arch, verbose))
        except nvrtc.NVRTCError as e:
            log = nvrtc.getProgramLog(prog)
            raise CompileError(f"NVRTC failed to compile {name} from {source} for {arch}: {e}\n{log}") from None
        return CompiledKernel(whole_elf(nvrtc.getCUBIN(prog)), nvrtc.getLoweredName(prog, name),
                              nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)


def whole_elf(cubin: bytes) -> bytes:
    """The cubin padded with zeros to the end of its program and section headers. CuPy 14's
    nvrtc.getCUBIN returns one byte short (the last program header's last byte, a zero): the driver
    read past the end into the NUL that follows every Python bytes object, and cuobjdump and nvdisasm
    rejected the file."""
    if cubin[:4] != b"\x7fELF" or len(cubin) < 64:
        return cubin
    ph_off, sh_off = struct.unpack_from("<QQ", cubin, 0x20)
    ph_size, ph_num, sh_size, sh_num = struct.unpack_from("<HHHH", cubin, 0x36)
    end = max(ph_off + ph_size * ph_num, sh_off + sh_size * sh_num)
    return cubin + b"\0" * (end - len(cubin)) if end > len(cubin) else cubin


def cache_dir() -> Path:
    root = os.environ.get("CUFLASH_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "cuflash"
    )
    return Path(root)


def cache_key(source: str, name: str, arch: str) -> str:
    parts = [_sources_digest(), source, name, arch, " ".join(nvrtc_options(arch)), _nvrtc_version()]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


def cached_cubin(source: str, name: str, arch: str) -> tuple[Path, str]:
    """Path of the cubin for (source, name, arch) and its lowered name, compiling on a cache miss."""
    key = cache_key(source, name, arch)
    folder = cache_dir()
    cubin_path, meta_path = folder / f"{key}.cubin", folder / f"{key}.json"
    if cubin_path.is_file() and meta_path.is_file():
        return cubin_path, json.loads(meta_path.read_text())["lowered_name"]
    compiled = compile_kernel(source, name, arch)
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(cubin_path, compiled.cubin)
    _write_atomic(meta_path, json.dumps({"name": name, "arch": arch, "lowered_name": compiled.lowered_name}).encode())
    return cubin_path, compiled.lowered_name


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


_loaded: dict[tuple[str, str, int], object] = {}


def get_kernel(source: str, name: str, smem_bytes: int, device_id: int):
    """A launchable cupy.RawKernel for the current device, compiled or loaded once per process."""
    key = (source, name, device_id)
    kernel = _loaded.get(key)
    if kernel is None:
        import cupy

        cubin_path, lowered = cached_cubin(source, name, device_arch(device_id))
        with cupy.cuda.Device(device_id):
            kernel = cupy.RawModule(path=str(cubin_path)).get_function(lowered)
            if smem_bytes:  # static + dynamic shared memory past 48 KiB needs the opt-in, even for 48 KiB dynamic
                kernel.max_dynamic_shared_size_bytes = smem_bytes
        _loaded[key] = kernel
    return kernel


def _cache_job(job) -> str:
    cached_cubin(*job)
    return job[1]


def precompile(variants, arch: str, processes: int | None = None):
    """Fill the disk cache for (variant, arch) pairs in parallel processes; yields each name when done."""
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    jobs = [(v.source, v.name, arch) for v in variants]
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield from pool.map(_cache_job, jobs)


# ---- the no-GPU compile check -------------------------------------------------------------------

_PTXAS_FUNC = re.compile(r"Compiling entry function '(\S+)' for '(\S+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


@dataclass
class ResourceReport:
    name: str
    arch: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    smem_bytes: int

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.spill_store_bytes > 0 or self.spill_load_bytes > 0


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """Per mangled kernel name: registers, stack frame and spill bytes from `-Xptxas -v` output."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := _PTXAS_FUNC.search(line):
            current = out.setdefault(m.group(1), {})
        elif current is not None and (m := _PTXAS_SPILL.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _PTXAS_REGS.search(line)):
            current["registers"] = int(m.group(1))
    return out


def resource_report(source: str, name: str, arch: str, smem_bytes: int) -> ResourceReport:
    compiled = compile_kernel(source, name, arch, verbose=True)
    info = parse_ptxas_log(compiled.log).get(compiled.lowered_name)
    if info is None or "registers" not in info:
        raise CompileError(f"no ptxas resource report for {name} ({arch}):\n{compiled.log}")
    return ResourceReport(
        name, arch, info["registers"], info.get("stack", 0), info.get("spill_stores", 0),
        info.get("spill_loads", 0), smem_bytes,
    )


def _report_job(job):
    return resource_report(*job)


def compile_check(archs=("sm_80", "sm_90a"), jobs: int | None = None, out=sys.stdout) -> int:
    """Compile every kernel variant the dispatcher can choose, for each arch; print a resource table.

    Returns the number of failures: a compile error, a spill to local memory (beyond
    _dispatch.spill_allowance), or more shared memory than the arch offers.
    """
    from concurrent.futures import ProcessPoolExecutor
    import multiprocessing

    from . import _dispatch

    variants = [(v, arch) for arch in archs for v in _dispatch.all_variants(arch)]
    work = [(v.source, v.name, arch, v.smem_bytes) for v, arch in variants]
    jobs = jobs or max(1, min(len(work), os.cpu_count() or 1))
    failures = 0
    print(f"compiling {len(work)} kernel variants with NVRTC {_nvrtc_version()} ({jobs} processes)", file=out)
    print(f"{'arch':7} {'regs':>4} {'stack':>5} {'spill':>5} {'smem KiB':>8}  kernel", file=out)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_report_job, job) for job in work]
        for (variant, _), job, fut in zip(variants, work, futures):
            try:
                r = fut.result()
            except CompileError as e:
                failures += 1
                print(f"FAILED {job[1]} ({job[2]}): {e}", file=out)
                continue
            problems = []
            if r.spills and r.stack_bytes > _dispatch.spill_allowance(variant):
                problems.append("SPILLS to local memory")
            if r.smem_bytes > shared_memory_limit(r.arch):
                problems.append(f"needs {r.smem_bytes} B shared memory > {shared_memory_limit(r.arch)}")
            failures += bool(problems)
            print(
                f"{r.arch:7} {r.registers:4d} {r.stack_bytes:5d} {r.spill_store_bytes:5d} {r.smem_bytes / 1024:8.1f}  "
                f"{r.name}{'  <-- ' + '; '.join(problems) if problems else ''}",
                file=out,
            )
    print(f"{len(work) - failures} ok, {failures} failed", file=out)
    return failures
