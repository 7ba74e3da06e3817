"""Kernel compilation: sources from kernels/, NVRTC, and the in-process and on-disk caches.

A kernel is named by a source file in kernels/ and a template instance ("name expression"), e.g.
("flash_fwd.cu", "cuflash::flash_fwd_kernel<__half, 128, 128, 32, 4, false>"). It is compiled by NVRTC
for one explicit architecture (sm_90a on Hopper) to a cubin, cached on disk under a key that hashes
every file in kernels/ (so an edited header never runs an old binary), and loaded as a
cupy.RawModule. Compilation itself needs no GPU, which is how CI checks every variant.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import struct
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from ._arch import device_arch


USER_HEADER = "cuflash_user_mod.cuh"  # the user's score functions, in memory (kernels/score_fn.cuh, _score_fn.py)


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


def nvrtc_options(arch: str, verbose: bool = False, kernels: Path | None = None) -> list[str]:
    opts = ["-std=c++17", f"-arch={arch}", "--use_fast_math", f"-I{kernels or kernels_dir()}",
            f"-I{cuda_include_dir()}"]
    if verbose:
        opts.append("-Xptxas=-v")
    return opts


@functools.lru_cache(maxsize=None)
def _sources_digest(folder: Path) -> str:
    """Hash of every kernel source and header in `folder`: part of each cache key."""
    h = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        if path.suffix in (".cu", ".cuh"):
            h.update(path.name.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def nvrtc_version() -> str:
    from cupy.cuda import nvrtc

    return ".".join(map(str, nvrtc.getVersion()))


@dataclass
class CompiledKernel:
    cubin: bytes
    lowered_name: str
    log: str


def compile_kernel(source: str, name: str, arch: str, verbose: bool = False,
                   kernels: Path | None = None, user_header: str | None = None) -> CompiledKernel:
    """Compile one template instance of kernels/<source> (or of another folder's) to a cubin with NVRTC
    (no GPU needed); user_header: the user's score functions (_score_fn.py), compiled in from memory."""
    return compile_kernels(source, [name], arch, verbose, kernels, user_header)[0]


def compile_kernels(source: str, names: list[str], arch: str, verbose: bool = False,
                    kernels: Path | None = None, user_header: str | None = None) -> list[CompiledKernel]:
    """compile_kernel for several instances of one source at once: one NVRTC program (its headers parsed
    once), one cubin holding them all; each CompiledKernel has that cubin, its lowered name and the log."""
    from cupy.cuda import nvrtc

    kernels = kernels or kernels_dir()
    code = (kernels / source).read_text()
    headers = ([user_header.encode()], [USER_HEADER.encode()]) if user_header else ([], [])
    prog = nvrtc.createProgram(code, source, *headers)
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        options = nvrtc_options(arch, verbose, kernels) + (["-DCUFLASH_USER_MOD"] if user_header else [])
        try:
            nvrtc.compileProgram(prog, options)
        except nvrtc.NVRTCError as e:
            log = nvrtc.getProgramLog(prog)
            raise CompileError(f"NVRTC failed to compile {', '.join(names)} from {source} for {arch}: {e}\n{log}") from None
        cubin, log = whole_elf(nvrtc.getCUBIN(prog)), nvrtc.getProgramLog(prog)
        return [CompiledKernel(cubin, nvrtc.getLoweredName(prog, name), log) for name in names]
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


def cache_key(source: str, name: str, arch: str, kernels: Path | None = None, user_header: str | None = None) -> str:
    kernels = kernels or kernels_dir()
    parts = [_sources_digest(kernels), source, name, arch, " ".join(nvrtc_options(arch, kernels=kernels)),
             nvrtc_version(), user_header or ""]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:32]


_cache_warned = False


def _warn_cache_unusable(folder: Path, error: OSError) -> None:
    global _cache_warned
    if not _cache_warned:
        _cache_warned = True
        warnings.warn(f"cuflash: the kernel cache {folder} cannot be written ({error}); kernels are compiled in "
                      f"memory for this process (set CUFLASH_CACHE_DIR to a writable folder)", RuntimeWarning,
                      stacklevel=3)


def _read_entry(cubin_path: Path, meta_path: Path) -> tuple[bytes, str] | None:
    """A cache entry's (cubin, lowered name) if both files are there and the cubin has the size and
    checksum its metadata records; None for a miss or a damaged entry (cut short, overwritten, copied)."""
    try:
        meta = json.loads(meta_path.read_text())
        cubin = cubin_path.read_bytes()
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("size") != len(cubin) or \
            meta.get("sha256") != hashlib.sha256(cubin).hexdigest() or "lowered_name" not in meta:
        return None
    return cubin, meta["lowered_name"]


def cached_cubin(source: str, name: str, arch: str, rebuild: bool = False,
                 user_header: str | None = None) -> tuple[bytes, str]:
    """(cubin, lowered name) for (source, name, arch): from the disk cache when its entry is whole, else
    compiled and written back (rebuild=True: compiled whatever the cache holds). An unwritable cache
    folder costs a warning, once, and the kernels are compiled in memory."""
    key = cache_key(source, name, arch, user_header=user_header)
    folder = cache_dir()
    cubin_path, meta_path = folder / f"{key}.cubin", folder / f"{key}.json"
    entry = None if rebuild else _read_entry(cubin_path, meta_path)
    if entry is not None:
        return entry
    compiled = compile_kernel(source, name, arch, user_header=user_header)
    meta = {"name": name, "arch": arch, "lowered_name": compiled.lowered_name, "size": len(compiled.cubin),
            "sha256": hashlib.sha256(compiled.cubin).hexdigest()}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(cubin_path, compiled.cubin)  # the cubin first: metadata never vouches for a missing one
        _write_atomic(meta_path, json.dumps(meta).encode())
    except OSError as e:
        _warn_cache_unusable(folder, e)
    return compiled.cubin, compiled.lowered_name


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass
class Kernel:
    """A loaded kernel: its CUfunction, and the module that holds it (kept loaded with it)."""

    ptr: int
    module: object


_loaded: dict[tuple[str, str, int, str | None], Kernel] = {}


def _load(cubin: bytes, lowered: str, smem_bytes: int) -> Kernel:
    from cupy.cuda import function
    from cupy_backends.cuda.api import driver

    module = function.Module()
    module.load(cubin)
    func = module.get_function(lowered)
    if smem_bytes:  # static + dynamic shared memory past 48 KiB needs the opt-in, even for 48 KiB dynamic
        driver.funcSetAttribute(func.ptr, driver.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, smem_bytes)
    return Kernel(func.ptr, module)


def get_kernel(source: str, name: str, smem_bytes: int, device_id: int, user_header: str | None = None) -> Kernel:
    """The kernel loaded on a device, compiled or read from the cache once per process. A cached cubin the
    driver rejects is compiled again and its entry replaced. user_header: as compile_kernel's."""
    key = (source, name, device_id, user_header)
    kernel = _loaded.get(key)
    if kernel is None:
        import cupy
        from cupy_backends.cuda.api.driver import CUDADriverError

        arch = device_arch(device_id)
        with cupy.cuda.Device(device_id):
            cubin, lowered = cached_cubin(source, name, arch, user_header=user_header)
            try:
                kernel = _load(cubin, lowered, smem_bytes)
            except CUDADriverError:
                cubin, lowered = cached_cubin(source, name, arch, rebuild=True, user_header=user_header)
                kernel = _load(cubin, lowered, smem_bytes)
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
