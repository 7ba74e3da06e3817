"""Kernel launches straight through the CUDA driver (cuLaunchKernel) with the parameters packed by
`struct` in C layout. CuPy's RawKernel call converts every argument to a NumPy scalar first, which
costs more host time than a small attention problem takes on the GPU."""
from __future__ import annotations

import struct
import threading

import numpy as np


class Launcher:
    """Launches one compiled kernel whose parameters are the fields of a parameter struct
    (kernels/params.cuh, _params.ParamStruct): the values are packed in the struct's C layout, and
    cuLaunchKernel gets one pointer per field into them."""

    def __init__(self, kernel, params):
        from cupy_backends.cuda.api import driver

        self._launch = driver.launchKernel
        self._func = kernel.ptr  # the CUfunction
        self._kernel = kernel  # keeps its module loaded
        self._struct = struct.Struct("@" + params.format)
        self._size = params.size
        self._offsets = list(params.offsets().values())
        self._local = threading.local()

    def _buffers(self):
        """This thread's parameter block: the table of pointers cuLaunchKernel reads, then the packed values
        they point into. Reused call after call: the driver copies it at launch."""
        local = self._local
        if not hasattr(local, "block"):
            table = 8 * len(self._offsets)
            block = np.zeros(table + self._size, np.uint8)
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


_CUDA_ERROR_NOT_READY = 600


class TileCounters:
    """Counters of the persistent kernels (a grid of resident blocks taking tiles from a counter): one
    (next tile, blocks exited) pair of zeros for each launch in flight, which that launch's last block
    resets to zero. A pair is lent to one launch and returns to the pool once an event recorded after the
    launch, on its stream, has completed, so launches that may overlap never share a pair, whatever the
    number of streams a program makes. A launch captured into a CUDA graph keeps its pair for good: every
    replay of the graph uses it."""

    CHUNK = 1024  # pairs allocated at a time
    _devices: dict = {}
    _lock = threading.Lock()

    def __init__(self, device: int):
        from cupy_backends.cuda.api import runtime

        self._rt = runtime
        self._device = device
        self.sms = runtime.getDeviceProperties(device)["multiProcessorCount"]
        self._memory: list = []  # keeps the allocations alive
        self._free: list[int] = []
        self._lent: list[tuple[int, int]] = []  # (pair address, event recorded after its launch)
        self._events: list[int] = []  # completed events, for reuse
        self._grow()

    @classmethod
    def of_device(cls, device: int) -> "TileCounters":
        counters = cls._devices.get(device)
        if counters is None:
            with cls._lock:
                counters = cls._devices.get(device) or cls._devices.setdefault(device, cls(device))
        return counters

    def _grow(self) -> None:
        import cupy

        with cupy.cuda.Device(self._device):
            memory = cupy.cuda.alloc(8 * self.CHUNK)
            self._rt.memset(memory.ptr, 0, 8 * self.CHUNK)
            self._rt.deviceSynchronize()  # zeros before any stream uses them
        self._memory.append(memory)
        self._free += [memory.ptr + 8 * i for i in range(self.CHUNK)]

    def acquire(self) -> int:
        """The device address of a pair no launch in flight holds."""
        with self._lock:
            if not self._free:
                lent, self._lent = self._lent, []
                for address, event in lent:
                    if self._done(event):
                        self._free.append(address)
                        self._events.append(event)
                    else:
                        self._lent.append((address, event))
            if not self._free:
                self._grow()
            return self._free.pop()

    def _done(self, event: int) -> bool:
        """Whether the work before the event's record has completed (cudaErrorNotReady: not yet)."""
        try:
            return self._rt.eventQuery(event) == 0
        except self._rt.CUDARuntimeError as e:
            if e.status == _CUDA_ERROR_NOT_READY:
                return False
            raise

    def release_after(self, address: int, stream: int) -> None:
        """Return the pair at `address` once what `stream` holds so far (the launch that took it) is done."""
        if self._rt.streamIsCapturing(stream) != self._rt.streamCaptureStatusNone:
            return  # a node of a graph being captured: the pair stays with the graph
        with self._lock:
            event = self._events.pop() if self._events else self._rt.eventCreateWithFlags(
                self._rt.eventDisableTiming)
            self._rt.eventRecord(event, stream)
            self._lent.append((address, event))
