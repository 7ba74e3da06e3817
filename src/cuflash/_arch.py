"""Architecture facts: the -arch a device compiles for, and what each arch offers."""
from __future__ import annotations

import functools

ARCHS = ("sm_80", "sm_90a")  # the archs with their own tile tables (compile-check builds both)
# sm_90a unlocks Hopper-only instructions (wgmma, setmaxnreg); everything else compiles for its own sm_XY.
_ARCH_SUFFIX = {"90": "a"}
_SHARED_MEMORY_LIMIT = {"sm_80": 163 * 1024, "sm_86": 99 * 1024, "sm_89": 99 * 1024, "sm_90a": 227 * 1024}


def gpu_count() -> tuple[int, str]:
    """(number of CUDA GPUs, why there are none): for test skips and `python -m cuflash info`."""
    try:
        import cupy
    except ImportError:
        return 0, ("CuPy is not installed: pip install 'cuflash[cuda13]' (or 'cuflash[cuda12]' for a CUDA 12 "
                   "driver; nvidia-smi shows which)")
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, or one older than CuPy's CUDA
        text = f"{type(e).__name__}: {e}"
        if "InsufficientDriver" in text or "NoDevice" in text or "libcuda" in text:
            return 0, f"no NVIDIA driver / GPU found ({text})"
        return 0, f"no usable CUDA GPU ({text})"
    return n, "" if n else "no NVIDIA GPU found (cupy.cuda.runtime.getDeviceCount() == 0)"


def shared_memory_limit(arch: str) -> int:
    """Dynamic shared memory one block may opt in to on `arch`."""
    return _SHARED_MEMORY_LIMIT.get(arch, 99 * 1024)


@functools.lru_cache(maxsize=None)
def device_arch(device_id: int | None = None) -> str:
    """The -arch value for a CUDA device: sm_<major><minor>, with 'a' on Hopper."""
    import cupy

    device = cupy.cuda.Device(device_id)
    cc = str(device.compute_capability)
    if int(cc) < 80:
        raise RuntimeError(f"cuflash needs compute capability 8.0 or newer; device {device.id} has {cc}")
    return f"sm_{cc}{_ARCH_SUFFIX.get(cc, '')}"


def kernel_arch(device_id: int, wgmma: bool = True) -> str:
    """The arch whose kernels a call on this device takes (policy_arch of the device's)."""
    return policy_arch(device_arch(device_id), wgmma)


def policy_arch(arch: str, wgmma: bool = True) -> str:
    """The arch whose kernels run on `arch`: itself, or with wgmma off (Options.wgmma) on Hopper the sm_80
    (mma.sync) kernels, so that both paths can be compared on one GPU."""
    return "sm_80" if arch == "sm_90a" and not wgmma else arch
