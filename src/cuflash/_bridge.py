"""Arrays in and out: CuPy, PyTorch and anything with __dlpack__, without copies, on the caller's stream.

Inputs are described by a DeviceArray (pointer, shape, strides in elements, dtype name, device), so
the dispatcher never depends on a framework, and bfloat16 works even though CuPy has no such dtype.
Outputs are allocated by the caller's framework (torch.empty for tensors, cupy.empty for CuPy arrays).
JAX arrays go through cuflash.jax, which launches inside jax.experimental.buffer_callback.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class DeviceArray:
    ptr: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]  # in elements
    dtype: str  # "float16", "bfloat16", "float32", ...
    device: int | None  # CUDA device ordinal; None when the array is not on a CUDA device
    framework: str  # "cupy", "torch", "jax", "dlpack"
    obj: Any = None

    @property
    def ndim(self) -> int:
        return len(self.shape)


def framework_of(x) -> str | None:
    module = type(x).__module__.split(".")[0]
    if module == "cupy":
        return "cupy"
    if module == "torch":
        return "torch"
    if module in ("jax", "jaxlib"):
        return "jax"
    if hasattr(x, "__dlpack__"):
        return "dlpack"
    return None


_KDLCUDA = 2  # DLPack's device type for CUDA memory


def _dlpack_device_type(x) -> int | None:
    try:
        return int(x.__dlpack_device__()[0])
    except Exception:
        return None


def describe(x, argname: str) -> DeviceArray:
    """Metadata of a CUDA array; TypeError naming `argname` for anything else."""
    d = _describe(x, argname)
    if 1 in d.shape[:-1]:
        # The stride of a dimension of size 1 never addresses anything; frameworks leave arbitrary
        # values there (after expand or transpose), so make it 0.
        d.strides = tuple(0 if n == 1 and i < d.ndim - 1 else s for i, (n, s) in enumerate(zip(d.shape, d.strides)))
    return d


_torch_dtype_names: dict = {}


def _torch_dtype_name(dtype) -> str:
    name = _torch_dtype_names.get(dtype)
    if name is None:
        name = _torch_dtype_names[dtype] = str(dtype).removeprefix("torch.")
    return name


def contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for n in reversed(shape):
        strides.append(acc)
        acc *= n
    return tuple(reversed(strides))


def _describe(x, argname: str) -> DeviceArray:
    fw = framework_of(x)
    if fw == "torch":
        dev = x.device.index if x.device.type == "cuda" else None
        return DeviceArray(x.data_ptr(), tuple(x.shape), x.stride(), _torch_dtype_name(x.dtype), dev, fw, x)
    if fw == "cupy":
        return DeviceArray(x.data.ptr, x.shape, tuple(s // x.itemsize for s in x.strides), x.dtype.name,
                           x.device.id, fw, x)
    if fw == "dlpack" and _dlpack_device_type(x) != _KDLCUDA:
        fw = None  # host memory (NumPy, ...): rejected below
    if fw == "dlpack":
        import cupy

        try:
            y = cupy.from_dlpack(x)
        except Exception as e:  # not CUDA memory, or a dtype CuPy cannot hold
            raise TypeError(f"{argname}: cannot import {type(x).__name__} through DLPack as a CUDA array: {e}")
        d = _describe(y, argname)
        d.framework, d.obj = "dlpack", y
        return d
    if fw == "jax":
        raise TypeError(f"{argname}: JAX arrays are handled by cuflash.jax; call cuflash.flash_attn_func")
    where = " in host memory" if hasattr(x, "__dlpack__") or hasattr(x, "__array__") else ""
    raise TypeError(
        f"{argname} must be a CUDA array (CuPy array, PyTorch CUDA tensor, JAX array, or a DLPack object in GPU "
        f"memory), got {type(x).__module__}.{type(x).__name__}{where}: move it to the GPU first, e.g. "
        f"cupy.asarray(x) or torch.as_tensor(x, device='cuda')"
    )


def torch_takes_op(*tensors) -> bool:
    """Whether a PyTorch call goes through cuflash's custom ops (cuflash.torch): when it would record
    gradients through any of these tensors, or when torch.compile traces it (the direct launch reads data
    pointers, which Dynamo cannot trace)."""
    import torch

    if torch.compiler.is_compiling():
        return True
    return torch.is_grad_enabled() and any(getattr(x, "requires_grad", False) for x in tensors)


def host_offsets(cu_seqlens, name: str) -> tuple[int, ...]:
    """A cu_seqlens array's offsets, read on the host (a device-to-host copy)."""
    import numpy as np

    framework = framework_of(cu_seqlens)
    try:
        if framework == "torch":
            host = cu_seqlens.cpu().numpy()
        elif framework == "cupy":
            host = cu_seqlens.get()
        else:
            host = np.asarray(cu_seqlens)
    except Exception as e:  # a JAX tracer
        raise ValueError(f"{name}: the sequence offsets are needed on the host (a block mask with window_size or "
                         f"causal, or check_inputs), and they could not be read ({type(e).__name__}); under "
                         f"jax.jit pass concrete cu_seqlens (closed over), not traced arguments") from None
    return tuple(int(n) for n in host.astype(np.int64))


def current_stream(a: DeviceArray) -> int:
    """The CUDA stream (cudaStream_t as an int) the caller's framework is using now."""
    if a.framework == "torch":
        import torch

        raw = getattr(torch._C, "_cuda_getCurrentRawStream", None)  # skips building a Stream object
        return raw(a.device) if raw else torch.cuda.current_stream(a.device).cuda_stream
    import cupy

    return cupy.cuda.get_current_stream(a.device).ptr


def empty(like: DeviceArray, shape: tuple[int, ...], dtype: str, poison_outputs: bool = False):
    """(native array, DeviceArray) of a new contiguous array from `like`'s framework and device; filled
    with NaN when poison_outputs (tests: an element a kernel fails to write shows)."""
    if like.framework == "torch":
        import torch

        t = torch.empty(shape, dtype=getattr(torch, dtype), device=like.obj.device)
        if poison_outputs:
            t.fill_(float("nan"))
        return t, DeviceArray(t.data_ptr(), shape, contiguous_strides(shape), dtype, like.device, "torch", t)
    import cupy

    with cupy.cuda.Device(like.device):
        x = cupy.empty(shape, dtype=dtype)
        if poison_outputs:
            x.fill(float("nan"))
    return x, DeviceArray(x.data.ptr, shape, contiguous_strides(shape), dtype, like.device, "cupy", x)
