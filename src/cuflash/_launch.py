"""Kernel launches straight through the CUDA driver (cuLaunchKernel) with the parameters packed by
`struct` in C layout. CuPy's RawKernel call converts every argument to a NumPy scalar first, which
costs more host time than a small attention problem takes on the GPU."""
from __future__ import annotations

import struct
import threading

import numpy as np


def flat(param_format: str) -> str:
    """A parameter format as one struct-module format: a parenthesised group (a struct parameter)
    starts and ends on an 8-byte boundary, as our structs do (their widest field is 8 bytes)."""
    return param_format.replace("(", "0Q").replace(")", "0Q")


def param_offsets(param_format: str) -> list[int]:
    """Byte offset of each kernel parameter in the packed values: one per code, or per parenthesised
    group (a struct passed by value)."""
    offsets, depth = [], 0
    for i, ch in enumerate(param_format):
        if depth == 0 and ch != ")":
            align = "0Q" if ch == "(" else "0" + ch
            offsets.append(struct.calcsize("@" + flat(param_format[:i]) + align))
        depth += {"(": 1, ")": -1}.get(ch, 0)
    return offsets


class Launcher:
    """Launches one compiled kernel whose parameters follow `param_format` (struct codes with native
    alignment: Q = pointer, q = int64, i = int32, I = uint32, f = float32; a struct parameter's fields
    in parentheses). cuLaunchKernel takes one pointer per kernel parameter, so a struct's fields
    share one."""

    def __init__(self, kernel, param_format: str):
        from cupy_backends.cuda.api import driver

        self._launch = driver.launchKernel
        self._func = kernel.kernel.ptr  # the CUfunction inside the cupy.RawKernel
        self._kernel = kernel  # keeps its module loaded
        self._struct = struct.Struct("@" + flat(param_format))
        self._offsets = param_offsets(param_format)
        self._local = threading.local()

    def _buffers(self):
        """This thread's parameter block: a table of pointers (what cuLaunchKernel reads), then the
        packed values it points into. Reused call after call: the driver copies it at launch."""
        local = self._local
        if not hasattr(local, "block"):
            table = 8 * len(self._offsets)
            block = np.zeros(table + self._struct.size, np.uint8)
            base = block.ctypes.data
            block[:table].view(np.uint64)[:] = [base + table + off for off in self._offsets]
            local.block, local.table_ptr, local.values_at = block, base, table
        return local.block, local.table_ptr, local.values_at

    def blocks_per_sm(self, block: int, shared_mem: int, device: int) -> int:
        """How many blocks of this kernel one SM of `device` holds at once (for a persistent grid)."""
        if not hasattr(self, "_per_sm"):
            import cupy
            from cupy_backends.cuda.api import driver

            with cupy.cuda.Device(device):
                per_sm = driver.occupancyMaxActiveBlocksPerMultiprocessor(self._func, block, shared_mem)
            self._per_sm = max(1, per_sm)
        return self._per_sm

    def __call__(self, grid: int, block: int, shared_mem: int, stream_ptr: int, args) -> None:
        buf, table_ptr, values_at = self._buffers()
        self._struct.pack_into(buf, values_at, *args)
        self._launch(self._func, grid, 1, 1, block, 1, 1, shared_mem, stream_ptr, table_ptr, 0)


class SideStream:
    """A second stream of the current device for kernels independent of those on the caller's stream
    (the backward's dQ kernel beside its dK/dV kernel, so that neither waits for the other's last
    blocks): fork() makes it wait for everything queued on the caller's stream so far, join() makes the
    caller's stream wait for it. Under CUDA graph capture this is the usual fork/join. Streams and
    events are per thread and device: a wait takes an event's latest record, so they are reused."""

    _local = threading.local()

    def __init__(self):
        from cupy_backends.cuda.api import runtime

        self._rt = runtime
        self.ptr = runtime.streamCreateWithFlags(runtime.streamNonBlocking)
        self._forked = runtime.eventCreateWithFlags(runtime.eventDisableTiming)
        self._done = runtime.eventCreateWithFlags(runtime.eventDisableTiming)

    @classmethod
    def of_device(cls, device: int) -> "SideStream":
        streams = cls._local.__dict__.setdefault("streams", {})
        if device not in streams:
            streams[device] = cls()
        return streams[device]

    def fork(self, stream_ptr: int) -> None:
        self._rt.eventRecord(self._forked, stream_ptr)
        self._rt.streamWaitEvent(self.ptr, self._forked, 0)

    def join(self, stream_ptr: int) -> None:
        self._rt.eventRecord(self._done, self.ptr)
        self._rt.streamWaitEvent(stream_ptr, self._done, 0)


class TileCounters:
    """Counters for the persistent forward kernel (kernels/flash_fwd_ws.cu): a (next tile, blocks
    exited) pair of zeros per stream, which the launch's last block resets, so that launches queued
    on one stream reuse it while launches on different streams, which may overlap, never share one.
    A device has SLOTS pairs, made once and zeroed before its first use; more streams than that share
    pairs round robin."""

    SLOTS = 1024
    _devices: dict = {}
    _lock = threading.Lock()

    def __init__(self, device: int):
        import cupy
        from cupy_backends.cuda.api import runtime

        with cupy.cuda.Device(device):
            self._memory = cupy.cuda.alloc(8 * self.SLOTS)
            runtime.memset(self._memory.ptr, 0, 8 * self.SLOTS)
            runtime.deviceSynchronize()  # zeros before any stream uses them
            self.sms = runtime.getDeviceProperties(device)["multiProcessorCount"]
        self._slots: dict = {}

    @classmethod
    def of_device(cls, device: int) -> "TileCounters":
        counters = cls._devices.get(device)
        if counters is None:
            with cls._lock:
                counters = cls._devices.get(device) or cls._devices.setdefault(device, cls(device))
        return counters

    def for_stream(self, stream_ptr: int, kernel: str = "") -> int:
        """The device address of `stream_ptr`'s counter pair for `kernel` (a kernel launched from this
        stream onto another, the backward's dQ kernel, takes its own pair: keyed by the caller's stream, as
        a CUDA graph captured there keeps it)."""
        key = (stream_ptr, kernel)
        slot = self._slots.get(key)
        if slot is None:
            with self._lock:
                slot = self._slots.setdefault(key, len(self._slots) % self.SLOTS)
        return self._memory.ptr + 8 * slot
