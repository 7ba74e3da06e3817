"""The engine: runs a validated Problem on device arrays, on the caller's stream.

It chooses the variants (_dispatch), fills their parameter structs, compiles or loads the kernels
(_compile) and launches them (_launch): the forward's one kernel, the backward's three (the dQ kernel
on a side stream beside the dK/dV kernel). Every bridge (CuPy and PyTorch arrays, PyTorch custom ops,
JAX callbacks) calls down into `forward` and `backward`; nothing here knows a framework.

Device inputs beside the arrays: `lists` = (pointer, _sparse.PackedLayout) of a block mask's packed
lists; `alibi` = (pointer, batch stride) of the slopes; `cu_seqlens` = (pointer, pointer) of packed
sequences' offsets; `dropout` = DropoutArgs' fields (_dispatch.dropout_args).
"""
from __future__ import annotations

import dataclasses
import math

from . import _arch, _compile, _dispatch
from ._params import param_struct
from ._bridge import DeviceArray
from ._launch import Launcher, SideStream, TileCounters
from ._options import Options
from ._problem import Problem


def _arrays(*arrays: DeviceArray):
    return tuple((a.ptr, a.strides) for a in arrays)


def _seq(p: Problem, cu_seqlens):
    return None if cu_seqlens is None else (*cu_seqlens, *p.packed)


def forward(p: Problem, q: DeviceArray, k: DeviceArray, v: DeviceArray, out: DeviceArray, lse: DeviceArray,
            stream: int, options: Options, *, lists=None, alibi=None, cu_seqlens=None,
            dropout: tuple = _dispatch.NO_DROPOUT, score_fn=None, sinks: int = 0) -> None:
    """Write out and lse (a contiguous float32 buffer of p.lse_shape) for problem p (score_fn: the
    _score_fn.ScoreFn whose digest p.mod names; sinks: a pointer to float32 (nheads,) sink logits, or 0)."""
    if p.empty:
        return
    arch = _arch.kernel_arch(q.device, options.wgmma)
    variant = _dispatch.choose_fwd(p.dtype, p.head_dim, p.flags(options), arch, options)
    persistent = _persistent(variant, q.device, options)
    q, k, v, out = p.batched(q), p.batched(k, "k"), p.batched(v, "k"), p.batched(out)
    blocks, threads, values = _dispatch.fwd_launch(
        variant, p, *_arrays(q, k, v, out), lse.ptr,
        _dispatch.NO_LISTS if lists is None else lists[1].lists_args(lists[0], key_major=False),
        alibi or _dispatch.NO_ALIBI, _seq(p, cu_seqlens), dropout, persistent, _mod_args(p, score_fn), options.tma)
    launches = [(variant, blocks, threads, values, persistent[0])]
    if sinks:
        sink_variant = _dispatch.FwdSinksVariant(p.dtype)
        launches.append((sink_variant, *_dispatch.sinks_launch(sink_variant, p, *_arrays(out), lse.ptr, sinks), 0))
    _launch_on(q.device, launches, stream)


def _mod_args(p: Problem, score_fn, dpsum: DeviceArray | None = None) -> tuple:
    """ModArgs' fields: the score function's captured values and the softmax scale it applies, and the
    buffer of rowsum(P * dP) where the sinks' gradient asks for it."""
    dpsum_ptr = dpsum.ptr if dpsum is not None else 0
    if not p.mod:
        return _dispatch.NO_MOD[:-1] + (dpsum_ptr,)
    if score_fn is None or score_fn.digest != p.mod:
        raise ValueError("score_fn: the problem names a score function that was not passed")
    return score_fn.args(p.softmax_scale, dpsum=dpsum_ptr)


def _lse_numel(p: Problem) -> int:
    return math.prod(p.lse_shape)


def bwd_workspace_floats(p: Problem, device: int, options: Options) -> int:
    """float32 elements of the backward's workspace on `device`: delta (like lse), then, where the dK/dV
    kernel accumulates dQ, its accumulator."""
    variants = _dispatch.choose_bwd(p.dtype, p.head_dim, p.flags(options), _arch.kernel_arch(device, options.wgmma),
                                    options)
    offset, floats = _dispatch.dq_accum_floats(variants, p, _lse_numel(p))
    return max(_lse_numel(p), offset + floats)


def backward(p: Problem, q: DeviceArray, k: DeviceArray, v: DeviceArray, dout: DeviceArray, out: DeviceArray,
             lse: DeviceArray, workspace: DeviceArray, dq: DeviceArray, dk: DeviceArray, dv: DeviceArray, stream: int,
             options: Options, *, lists=None, alibi=None, cu_seqlens=None,
             dropout: tuple = _dispatch.NO_DROPOUT, score_fn=None, dscore: DeviceArray | None = None,
             dpsum: DeviceArray | None = None, scores: DeviceArray | None = None) -> None:
    """Write dq, dk, dv for problem p; workspace is a float32 buffer of bwd_workspace_floats (one of only
    lse's size gets the dQ kernel instead of an accumulator). dscore: a float32 p.dscore_shape buffer that a
    fourth kernel fills with dS with respect to the score function's value (zeros where skipped), for the
    gradients of its captured arrays; scores (with dscore): one in its layout that the same kernel fills
    with the scores the function saw, for captured arrays that multiply them. dpsum: a float32 buffer shaped
    as lse that the dQ kernel fills with rowsum(P * dP) in fp32, for the sinks' gradient."""
    arch = _arch.kernel_arch(q.device, options.wgmma)
    flags = lambda options: dataclasses.replace(p.flags(options), sink_grad=dpsum is not None)  # noqa: E731
    variants = _dispatch.choose_bwd(p.dtype, p.head_dim, flags(options), arch, options)
    accum_at, accum_floats = _dispatch.dq_accum_floats(variants, p, _lse_numel(p))
    if accum_floats and math.prod(workspace.shape) < accum_at + accum_floats:
        options = dataclasses.replace(options, fused_dq=False)
        variants = _dispatch.choose_bwd(p.dtype, p.head_dim, flags(options), arch, options)
        accum_at, accum_floats = 0, 0
    delta = workspace
    if lists is None:
        query_lists = key_lists = _dispatch.NO_LISTS
    else:
        ptr, layout = lists
        query_lists, key_lists = layout.lists_args(ptr, key_major=False), layout.lists_args(ptr, key_major=True)
    q, dout, out, dq = (p.batched(a) for a in (q, dout, out, dq))
    k, v, dk, dv = (p.batched(a, "k") for a in (k, v, dk, dv))
    pre_variant, dkdv_variant, dq_variant = variants
    persistent = {x: _persistent(x, q.device, options) for x in (dkdv_variant, dq_variant)}
    dscore_launch = None
    if dscore is not None:
        dscore_variant = _dispatch.choose_dscore(p.dtype, p.head_dim, p.flags(options), arch, options)
        if scores is not None and tuple(scores.strides) != tuple(dscore.strides):
            raise ValueError("scores: must have dscore's layout")
        at = (dscore.ptr, *dscore.strides[:3], scores.ptr if scores is not None else 0)
        dscore_launch = (dscore_variant, score_fn.args(p.softmax_scale, at))
        for buffer in (dscore, scores):
            if buffer is not None:
                _zero_async(q.device, buffer.ptr, 4 * math.prod(buffer.shape), stream)
    launches = _dispatch.bwd_launches(
        variants, p, *_arrays(q, k, v, dout, out), lse.ptr, delta.ptr, *_arrays(dq, dk, dv), query_lists, key_lists,
        alibi or _dispatch.NO_ALIBI, _seq(p, cu_seqlens), dropout, persistent[dkdv_variant], persistent[dq_variant],
        workspace.ptr + 4 * accum_at if accum_floats else 0, _mod_args(p, score_fn, dpsum), dscore_launch,
        options.tma)
    launches = [(*x, persistent.get(x[0], (0, 1))[0]) for x in launches]
    for variant, (counter, _) in persistent.items():  # a kernel with nothing to do gives its counter back
        if counter and not any(x[0] is variant for x in launches):
            TileCounters.of_device(q.device).release_after(counter, stream)
    pre = [x for x in launches if x[0] is pre_variant]
    dkdv = [x for x in launches if x[0] is dkdv_variant]
    dq_launch = [x for x in launches if x[0] is dq_variant]
    dkdv += [x for x in launches if dscore_launch and x[0] is dscore_launch[0]]  # after the preprocess's delta
    if accum_floats:  # the accumulator starts at zero; dQ's conversion follows the dK/dV kernel
        _zero_async(q.device, workspace.ptr + 4 * accum_at, 4 * accum_floats, stream)
    if accum_floats or not options.bwd_side_stream:
        dkdv, dq_launch = dkdv + dq_launch, []
    _launch_on(q.device, pre, stream)
    # The dQ kernel needs only the preprocess's delta: it runs beside the dK/dV kernel, on a side stream.
    _launch_on(q.device, dkdv, stream, beside=dq_launch)


def _zero_async(device: int, ptr: int, nbytes: int, stream: int) -> None:
    import cupy

    with cupy.cuda.Device(device):
        cupy.cuda.runtime.memsetAsync(ptr, 0, nbytes, stream)


_launchers: dict = {}


def _launcher(variant, device: int) -> Launcher:
    launcher = _launchers.get((variant, device))
    if launcher is None:
        kernel = _compile.get_kernel(variant.source, variant.name, variant.smem_bytes, device,
                                     getattr(variant, "user_header", None))
        launcher = _launchers[(variant, device)] = Launcher(kernel, param_struct(variant.params))
    return launcher


def _persistent(variant, device: int, options: Options) -> tuple[int, int]:
    """(tile counter, blocks the GPU holds at once) for a persistent kernel, (0, 1) for others; the counter
    is this launch's alone until _launch_on gives it back. With persistence off, one block per tile, as a
    plain grid would (for A/B timing)."""
    if not variant.persistent:
        return 0, 1
    counters = TileCounters.of_device(device)
    if not options.persistent:
        return counters.acquire(), 2**31 - 1
    per_sm = _launcher(variant, device).blocks_per_sm(variant.threads, variant.smem_bytes, device)
    return counters.acquire(), counters.sms * per_sm


def _launch_on(device: int, launches, stream: int, beside=()) -> None:
    """Launch `launches` ((variant, blocks, threads, values, tile counter or 0) in order) on the stream, and
    `beside` (independent of `launches`, dependent on what the stream holds before them) on the device's
    side stream, joined back before returning. Each tile counter goes back once its launch is done."""
    import cupy

    def launch(chain, stream):
        for variant, blocks, threads, values, counter in chain:
            _launcher(variant, device)(blocks, threads, variant.smem_bytes, stream, values)
            if counter:
                TileCounters.of_device(device).release_after(counter, stream)

    def run():
        if not beside:
            return launch(launches, stream)
        side = SideStream.of_device(device)
        side.fork(stream)
        launch(launches, stream)
        launch(beside, side.ptr)
        side.join(stream)

    if cupy.cuda.runtime.getDevice() == device:
        run()
    else:
        with cupy.cuda.Device(device):
            run()


def ring_merge(out: DeviceArray, lse: DeviceArray, part: DeviceArray, part_lse: DeviceArray, stream: int) -> None:
    """Fold a partial attention result into a running one, in place (kernels/ring_merge.cu): out float32
    (batch, seqlen, nheads, head_dim) and lse float32 (batch, nheads, seqlen) on the same device; part of out's
    shape in a kernel dtype, part_lse of lse's shape in float32; head dims with stride 1."""
    variant = _dispatch.RingMergeVariant(part.dtype)
    if math.prod(out.shape):
        blocks, threads, values = _dispatch.ring_merge_launch(
            variant, (out.ptr, out.strides, out.shape), (lse.ptr, lse.strides), (part.ptr, part.strides),
            (part_lse.ptr, part_lse.strides))
        _launch_on(out.device, [(variant, blocks, threads, values, 0)], stream)
