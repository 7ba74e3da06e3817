"""Public functions, with FlashAttention-2's names and conventions. Arguments are checked here, in one
place, before anything is launched; then the dispatcher picks a kernel and the bridge returns the
caller's own array type."""
from __future__ import annotations

import math
import os

from . import _bridge, _compile, _dispatch, _headdim, _sparse
from ._bridge import DeviceArray
from ._launch import Launcher, SideStream, TileCounters

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, block_mask=None,
                    dropout_seed=None):
    """Exact attention softmax(q k^T * scale) v, computed without materialising the score matrix.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim), nheads_k
    dividing nheads (GQA/MQA). float16, bfloat16 or float32 (3xTF32 products); any headdim from 1 to 256 (one that is not a
    multiple of 8 is zero-padded, a copy, as FlashAttention-2 does); the last dimension contiguous. CuPy arrays, PyTorch CUDA tensors, JAX arrays, or anything with __dlpack__.
    causal=True masks key j for query i when j > i + seqlen_k - seqlen_q (bottom-right aligned).
    window_size=(left, right): query i sees key j iff i + d - left <= j <= i + d + right,
    d = seqlen_k - seqlen_q (-1: unbounded on that side); key tiles outside the window are skipped.
    alibi_slopes: float32 (nheads,) or (batch, nheads); adds -slope * |i + d - j| to the scaled scores.
    softcap > 0: each scaled score s becomes softcap * tanh(s / softcap) (before ALiBi), as in Gemma 2.
    block_mask: a cuflash.BlockMask (block sizes multiples of 64) built for (seqlen_q, seqlen_k):
    only its listed blocks are computed, partial blocks through their exact element bits; with
    causal=True the two masks intersect.
    dropout_p in [0, 1): each attention probability is dropped with this probability (rounded to a
    multiple of 2^-16) and the kept ones scaled by 1 / (1 - dropout_p), with an in-kernel Philox RNG
    that the backward regenerates. The RNG's seed: dropout_seed (an int; with JAX also a PRNG key),
    or when None PyTorch's CUDA generator (seed and a running offset, so torch.manual_seed makes runs
    reproducible), or for CuPy a 63-bit draw from NumPy's global generator (np.random.seed).
    Returns out like q, in the caller's array type; with return_attn_probs=True returns
    (out, softmax_lse, rng_state), softmax_lse float32 of shape (batch, nheads, seqlen_q) and
    rng_state the (seed, offset) the dropout used (None without dropout), which flash_attn_backward
    takes. A query row that can see no key gives zeros and a log-sum-exp of -inf.
    """
    dropout_p = check_dropout(dropout_p)
    padded = _headdim.needs_padding(q, k, v)
    if padded:
        d = q.shape[-1]
        res = flash_attn_func(*(_headdim.pad(x, padded) for x in (q, k, v)), dropout_p, resolve_scale(softmax_scale, d),
                              causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                              block_mask=block_mask, dropout_seed=dropout_seed)
        return (_headdim.unpad(res[0], d), *res[1:]) if return_attn_probs else _headdim.unpad(res, d)
    block_mask, window = _sparse.window_mask(block_mask, window_size, q, k)
    if _bridge.framework_of(q) == "jax":
        from . import jax as cf_jax

        return cf_jax.flash_attn_func(q, k, v, softmax_scale=softmax_scale, causal=causal, window=window,
                                      return_attn_probs=return_attn_probs, block_mask=block_mask,
                                      alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p,
                                      dropout_seed=dropout_seed)
    if _needs_torch_autograd(q, k, v):
        from . import torch as cf_torch

        # Arguments are checked inside the custom op (no data pointers here: torch.compile traces this).
        out, lse, rng = cf_torch.flash_attn_func(q, k, v, resolve_scale(softmax_scale, q.shape[-1]), causal,
                                                 block_mask, alibi_slopes, resolve_softcap(softcap), dropout_p,
                                                 dropout_seed, window)
        if not return_attn_probs:
            return out
        return out, lse, (tuple(x % 2**64 for x in rng.tolist()) if dropout_p else None)
    rng = resolve_rng(dropout_p, dropout_seed, q)
    out, lse, _ = forward_arrays(q, k, v, softmax_scale, causal, block_mask, alibi_slopes=alibi_slopes,
                                 softcap=softcap, dropout_p=dropout_p, rng=rng, window=window)
    return (out, lse, rng) if return_attn_probs else out


def forward_arrays(q, k, v, softmax_scale, causal, block_mask=None, lists=None, alibi_slopes=None, softcap=0.0,
                   dropout_p=0.0, rng=None, window=(-1, -1)):
    """The forward pass on CuPy/PyTorch/DLPack arrays: (out, lse, problem), no autograd. A block mask
    comes as block_mask, or already on the device as lists = (pointer, _sparse.PackedLayout);
    rng = (seed, offset) of the dropout; window = (left, right) the kernels' band (with no block mask)."""
    qa, ka, va = (_bridge.describe(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    problem = check_fwd_args(qa, ka, va, softmax_scale, softcap, dropout_p, causal, window)
    alibi = check_alibi(alibi_slopes, problem, qa)
    if block_mask is not None:
        lists = mask_lists(block_mask, causal, problem, qa)
    out, out_a = _bridge.empty(qa, qa.shape, qa.dtype)
    lse, lse_a = _bridge.empty(qa, (problem.batch, problem.nheads, problem.seqlen_q), "float32")
    run_fwd(problem, qa, ka, va, out_a, lse_a, _bridge.current_stream(qa), lists, alibi,
            dropout=dropout_launch_args(problem, rng))
    if qa.framework == "dlpack":  # hand back what the caller can consume
        out, lse = out_a.obj, lse_a.obj
    return out, lse, problem


def check_dropout(dropout_p) -> float:
    """dropout_p as a float in [0, 1); TypeError/ValueError for anything else."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def check_seed(seed, name: str = "dropout_seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise TypeError(f"{name} must be an int in [0, 2^64), got {seed!r}")
    return seed


def resolve_rng(dropout_p: float, dropout_seed, like) -> tuple[int, int] | None:
    """(seed, offset) of the dropout RNG (None without dropout): dropout_seed with offset 0, or drawn
    from the framework's generator (see flash_attn_func)."""
    if not dropout_p:
        return None
    if dropout_seed is not None:
        return check_seed(dropout_seed), 0
    if _bridge.framework_of(like) == "torch":
        from . import torch as cf_torch

        return cf_torch.generator_rng(like.device.index)
    import numpy as np

    return int(np.random.randint(0, 2**63, dtype=np.int64)), 0


def dropout_launch_args(p: _dispatch.FwdProblem, rng, state_ptr: int = 0) -> tuple:
    """The kernels' dropout fields for problem p: rng = (seed, offset), or state_ptr to them on the device."""
    if not p.dropout_p:
        return _dispatch.NO_DROPOUT
    if state_ptr:
        return _dispatch.dropout_args(p.dropout_p, state_ptr=state_ptr)
    if rng is None:
        raise ValueError("rng_state: dropout_p > 0 needs the (seed, offset) the forward used "
                         "(flash_attn_func(..., return_attn_probs=True) returns it)")
    if not (isinstance(rng, (tuple, list)) and len(rng) == 2):
        raise TypeError(f"rng_state must be a (seed, offset) pair of ints, got {rng!r}")
    return _dispatch.dropout_args(p.dropout_p, check_seed(rng[0], "rng_state[0]"), check_seed(rng[1], "rng_state[1]"))


def _needs_torch_autograd(q, k, v) -> bool:
    if _bridge.framework_of(q) != "torch":
        return False
    import torch

    return torch.is_grad_enabled() and any(getattr(x, "requires_grad", False) for x in (q, k, v))


def check_alibi(alibi_slopes, p: _dispatch.FwdProblem, q: DeviceArray):
    """(pointer, batch stride) of float32 ALiBi slopes of shape (nheads,) or (batch, nheads), or None."""
    if alibi_slopes is None:
        return None
    if _bridge.framework_of(alibi_slopes) == "jax":
        raise TypeError("alibi_slopes: JAX slopes go with JAX q, k, v")
    a = _bridge.describe(alibi_slopes, "alibi_slopes")
    if a.device is None:
        raise TypeError(f"alibi_slopes must be on a CUDA device, got a {a.framework} array in host memory")
    if a.framework != q.framework or a.device != q.device:
        raise ValueError(f"alibi_slopes must be a {q.framework} array on cuda:{q.device} like q")
    if a.dtype != "float32":
        raise TypeError(f"alibi_slopes.dtype must be float32, got {a.dtype}")
    if a.shape not in ((p.nheads,), (p.batch, p.nheads)):
        raise ValueError(f"alibi_slopes must have shape (nheads,) = ({p.nheads},) or (batch, nheads) = "
                         f"({p.batch}, {p.nheads}), got {a.shape}")
    if a.strides[-1] != 1 and p.nheads > 1:
        raise ValueError(f"alibi_slopes' last dimension must be contiguous, got strides {a.strides}")
    return a.ptr, (a.strides[0] if a.ndim == 2 and p.batch > 1 else 0)


def mask_lists(block_mask, causal: bool, p: _dispatch.FwdProblem, like: DeviceArray):
    """(pointer, layout) of block_mask's kernel lists (intersected with causal) on like's device."""
    _sparse.check_mask(block_mask, p.batch, p.nheads, p.seqlen_q, p.seqlen_k)
    buffer, layout = _sparse.device_lists(block_mask, bool(causal), p.nheads // p.nheads_k, like.device,
                                          "torch" if like.framework == "torch" else "cupy")
    return _bridge.describe(buffer, "block_mask").ptr, layout


def check_fwd_args(q: DeviceArray, k: DeviceArray, v: DeviceArray, softmax_scale, softcap=0.0,
                   dropout_p=0.0, causal=False, window=(-1, -1)) -> _dispatch.FwdProblem:
    """Validate q, k, v and the scale; ValueError/TypeError naming the argument. Needs no GPU."""
    for a, name in ((q, "q"), (k, "k"), (v, "v")):
        if a.device is None:
            raise TypeError(f"{name} must be on a CUDA device, got a {a.framework} array in host memory")
        if a.dtype not in _dispatch.DTYPES:
            raise TypeError(f"{name}.dtype must be float16, bfloat16 or float32, got {a.dtype}")
        if a.ndim != 4:
            raise ValueError(f"{name} must have 4 dimensions (batch, seqlen, nheads, headdim), got shape {a.shape}")
    if not (q.framework == k.framework == v.framework):
        raise TypeError(f"q, k, v must come from one framework, got {q.framework}, {k.framework}, {v.framework}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got cuda:{q.device}, cuda:{k.device}, cuda:{v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, seqlen_q, nheads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must have shape (batch={batch}, seqlen_k, nheads_k, headdim={head_dim}), got {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {k.shape}, got {v.shape}")
    seqlen_k, nheads_k = k.shape[1], k.shape[2]
    if nheads_k < 1 or nheads % nheads_k:
        raise ValueError(f"k's nheads ({nheads_k}) must divide q's nheads ({nheads})")
    if head_dim % 8 or not 8 <= head_dim <= _dispatch.MAX_HEAD_DIM:  # flash_attn_func pads other dims first
        raise ValueError(f"headdim must be from 1 to {_dispatch.MAX_HEAD_DIM} (the kernels take multiples of 8), "
                         f"got {head_dim}")
    for a, name in ((q, "q"), (k, "k"), (v, "v")):
        if a.strides[3] != 1:
            raise ValueError(f"{name}'s last dimension must be contiguous (stride 1), got strides {a.strides}")
        if any(s % 8 for s in a.strides[:3]) or a.ptr % 16:
            raise ValueError(
                f"{name} must be 16-byte aligned: its address and its batch, seqlen and head strides must be "
                f"multiples of 8 elements, got strides {a.strides}"
            )
    return _dispatch.FwdProblem(batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim,
                                resolve_scale(softmax_scale, head_dim), resolve_softcap(softcap),
                                check_dropout(dropout_p), bool(causal), _sparse.check_window(window))


def resolve_scale(softmax_scale, head_dim: int) -> float:
    """softmax_scale, or 1/sqrt(head_dim) when None; TypeError/ValueError for anything unusable."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a finite positive number, got {softmax_scale}")
    return float(softmax_scale)


def resolve_softcap(softcap) -> float:
    """softcap as a float >= 0 (0: off); TypeError/ValueError for anything unusable."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite number >= 0 (0: off), got {softcap}")
    return float(softcap)


def run_fwd(p: _dispatch.FwdProblem, q: DeviceArray, k: DeviceArray, v: DeviceArray, out: DeviceArray,
            lse: DeviceArray, stream_ptr: int, lists=None, alibi=None, varlen=None,
            dropout: tuple = _dispatch.NO_DROPOUT) -> None:
    """Launch the forward kernel on the CUDA stream `stream_ptr`, writing out and lse (a contiguous
    float32 buffer). Causal and a window come with p (as the kernels' band), unless there are lists:
    (pointer, layout) of a block mask's lists, which already hold them;
    alibi: (pointer, batch stride) of the slopes; varlen: as for _dispatch.seq_args; dropout: the
    kernels' dropout fields (dropout_launch_args)."""
    if p.batch * p.nheads * p.seqlen_q == 0:
        return  # nothing to write
    mask_blocks = None if lists is None else (lists[1].block_m, lists[1].block_n)
    variant = _dispatch.choose_fwd(q.dtype, p.head_dim, p.band, arch=_kernel_arch(q.device),
                                   mask_blocks=mask_blocks, alibi=alibi is not None, softcap=p.softcap > 0,
                                   dropout=p.dropout_p > 0,
                                   short_keys=_dispatch.short_keys_for(q.dtype, p.head_dim, p.seqlen_k))
    persistent = _persistent(variant, q.device, stream_ptr) if variant.warp_specialised else (0, 1)
    blocks, threads, args = _dispatch.fwd_launch(
        variant, p, (q.ptr, q.strides), (k.ptr, k.strides), (v.ptr, v.strides), (out.ptr, out.strides), lse.ptr,
        _sparse.NO_LISTS if lists is None else lists[1].lists_args(lists[0], key_major=False),
        alibi or _dispatch.NO_ALIBI, varlen, dropout, persistent,
    )
    _launch_on(q.device, [(variant, blocks, threads, args)], stream_ptr)


_launchers: dict = {}


def _launcher(variant, device: int) -> Launcher:
    launcher = _launchers.get((variant, device))
    if launcher is None:
        kernel = _compile.get_kernel(variant.source, variant.name, variant.smem_bytes, device)
        launcher = _launchers[(variant, device)] = Launcher(kernel, _dispatch.param_format(variant))
    return launcher


def _persistent(variant, device: int, stream_ptr: int, kernel: str = "") -> tuple[int, int]:
    """(tile counter, blocks the GPU holds at once) for a persistent kernel launched from stream_ptr
    (TileCounters.for_stream). CUFLASH_PERSISTENT=0 launches one block per tile instead, as a plain grid
    would (for A/B timing)."""
    counters = TileCounters.of_device(device)
    if os.environ.get("CUFLASH_PERSISTENT") == "0":
        return counters.for_stream(stream_ptr, kernel), 2**31 - 1
    per_sm = _launcher(variant, device).blocks_per_sm(variant.threads, variant.smem_bytes, device)
    return counters.for_stream(stream_ptr, kernel), counters.sms * per_sm


def _launch_on(device: int, launches, stream_ptr: int, beside=()) -> None:
    """Launch `launches` in order on the stream, and `beside` (independent of `launches`, dependent on
    what the stream holds before them) on the device's side stream, joined back before returning."""
    import cupy

    def launch(chain, stream):
        for variant, blocks, threads, args in chain:
            _launcher(variant, device)(blocks, threads, variant.smem_bytes, stream, args)

    def run():
        if not beside:
            return launch(launches, stream_ptr)
        side = SideStream.of_device(device)
        side.fork(stream_ptr)
        launch(launches, stream_ptr)
        launch(beside, side.ptr)
        side.join(stream_ptr)

    if cupy.cuda.runtime.getDevice() == device:
        run()
    else:
        with cupy.cuda.Device(device):
            run()


def flash_attn_backward(dout, q, k, v, out, softmax_lse, *, dropout_p=0.0, softmax_scale=None, causal=False,
                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, block_mask=None,
                        rng_state=None):
    """Gradients (dq, dk, dv) of flash_attn_func's output, from the saved output and log-sum-exp.

    dout, out: like q; softmax_lse: float32 (batch, nheads, seqlen_q), contiguous, as returned by
    flash_attn_func(..., return_attn_probs=True); the other arguments as given to the forward.
    dk and dv have k's shape (summed over the query heads of each K/V head for GQA). No buffer grows
    with seqlen_q x seqlen_k, and the result is bitwise reproducible (no atomics), so
    `deterministic` costs nothing. With dropout_p > 0, rng_state is the (seed, offset) that the
    forward returned: the kernels regenerate its dropout mask.
    """
    dropout_p = check_dropout(dropout_p)
    padded = _headdim.needs_padding(q, k, v, dout, out)
    if padded:
        d = q.shape[-1]
        grads = flash_attn_backward(*(_headdim.pad(x, padded) for x in (dout, q, k, v, out)), softmax_lse,
                                    dropout_p=dropout_p, softmax_scale=resolve_scale(softmax_scale, d), causal=causal,
                                    window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                                    block_mask=block_mask, rng_state=rng_state)
        return tuple(_headdim.unpad(g, d) for g in grads)
    block_mask, window = _sparse.window_mask(block_mask, window_size, q, k)
    return backward_arrays(dout, q, k, v, out, softmax_lse, softmax_scale, causal, block_mask,
                           alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, rng=rng_state,
                           window=window)


def backward_arrays(dout, q, k, v, out, softmax_lse, softmax_scale, causal, block_mask=None, lists=None,
                    alibi_slopes=None, softcap=0.0, dropout_p=0.0, rng=None, window=(-1, -1)):
    """flash_attn_backward's work (a block mask as block_mask, or as lists like forward_arrays)."""
    if _bridge.framework_of(q) == "jax":
        raise TypeError("q: for JAX arrays use jax.grad of cuflash.flash_attn_func")
    qa, ka, va = (_bridge.describe(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    doa, oa, la = _bridge.describe(dout, "dout"), _bridge.describe(out, "out"), _bridge.describe(softmax_lse, "softmax_lse")
    problem = check_fwd_args(qa, ka, va, softmax_scale, softcap, dropout_p, causal, window)
    check_bwd_args(problem, qa, doa, oa, la)
    dropout = dropout_launch_args(problem, rng)
    alibi = check_alibi(alibi_slopes, problem, qa)
    if block_mask is not None:
        lists = mask_lists(block_mask, causal, problem, qa)
    dq, dqa = _bridge.empty(qa, qa.shape, qa.dtype)
    dk, dka = _bridge.empty(qa, ka.shape, qa.dtype)
    dv, dva = _bridge.empty(qa, va.shape, qa.dtype)
    delta, delta_a = _bridge.empty(qa, la.shape, "float32")
    run_bwd(problem, qa, ka, va, doa, oa, la, delta_a, dqa, dka, dva, _bridge.current_stream(qa), lists, alibi,
            dropout=dropout)
    if qa.framework == "dlpack":
        dq, dk, dv = dqa.obj, dka.obj, dva.obj
    return dq, dk, dv


def check_bwd_args(p: _dispatch.FwdProblem, q: DeviceArray, dout: DeviceArray, out: DeviceArray,
                   lse: DeviceArray) -> None:
    """Validate the backward's extra arguments against the problem; errors name the argument."""
    for a, name in ((dout, "dout"), (out, "out")):
        if a.framework != q.framework or a.device != q.device:
            raise ValueError(f"{name} must be a {q.framework} array on cuda:{q.device} like q")
        if a.dtype != q.dtype:
            raise TypeError(f"{name}.dtype must be {q.dtype} like q, got {a.dtype}")
        if a.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {q.shape}, got {a.shape}")
        if a.strides[3] != 1 and a.shape[3] != 1 or any(s % 8 for s in a.strides[:3]) or a.ptr % 16:
            raise ValueError(f"{name} must have a contiguous last dimension and 16-byte aligned rows, got strides "
                             f"{a.strides}")
    expected = (p.batch, p.nheads, p.seqlen_q)
    if lse.framework != q.framework or lse.device != q.device:
        raise ValueError(f"softmax_lse must be a {q.framework} array on cuda:{q.device} like q")
    if lse.dtype != "float32":
        raise TypeError(f"softmax_lse.dtype must be float32, got {lse.dtype}")
    if lse.shape != expected:
        raise ValueError(f"softmax_lse must have shape (batch, nheads, seqlen_q) = {expected}, got {lse.shape}")
    if lse.strides != _bridge.contiguous_strides(lse.shape) and 1 not in lse.shape:
        raise ValueError(f"softmax_lse must be contiguous, got strides {lse.strides}")


def _kernel_arch(device: int) -> str:
    """The arch whose kernels a call takes: the device's, or with CUFLASH_WGMMA=0 on Hopper the sm_80
    (mma.sync) kernels, which tests and benchmarks use to compare the two paths on one GPU."""
    arch = _compile.device_arch(device)
    return "sm_80" if arch == "sm_90a" and os.environ.get("CUFLASH_WGMMA") == "0" else arch


def run_bwd(p, q, k, v, dout, out, lse, delta, dq, dk, dv, stream_ptr: int, lists=None,
            alibi=None, varlen=None, dropout: tuple = _dispatch.NO_DROPOUT) -> None:
    """Launch the three backward kernels on `stream_ptr`; delta is a float32 workspace like lse;
    lists, alibi, varlen and dropout as for run_fwd."""
    flags = dict(alibi=alibi is not None, softcap=p.softcap > 0, dropout=p.dropout_p > 0,
                 arch=_kernel_arch(q.device))
    if lists is None:
        variants = _dispatch.choose_bwd(q.dtype, p.head_dim, p.band, **flags)
        sparse_args = (_sparse.NO_LISTS, _sparse.NO_LISTS)
    else:
        ptr, layout = lists
        variants = _dispatch.choose_bwd(q.dtype, p.head_dim, False, (layout.block_m, layout.block_n), **flags)
        sparse_args = (layout.lists_args(ptr, key_major=False), layout.lists_args(ptr, key_major=True))
    launches = _dispatch.bwd_launches(
        variants, p, *((a.ptr, a.strides) for a in (q, k, v, dout, out)), lse.ptr, delta.ptr,
        *((a.ptr, a.strides) for a in (dq, dk, dv)), *sparse_args, alibi or _dispatch.NO_ALIBI, varlen, dropout,
        _persistent(variants[1], q.device, stream_ptr), _persistent(variants[2], q.device, stream_ptr, "dq"),
    )
    # The dQ kernel needs only the preprocess's delta: it runs beside the dK/dV kernel, on a side stream
    # (CUFLASH_BWD_STREAMS=1 queues all three kernels on the caller's stream).
    pre = [x for x in launches if isinstance(x[0], _dispatch.BwdPreprocessVariant)]
    dkdv = [x for x in launches if isinstance(x[0], _dispatch.BwdDkdvVariant)]
    dq_launch = [x for x in launches if isinstance(x[0], _dispatch.BwdDqVariant)]
    if os.environ.get("CUFLASH_BWD_STREAMS") == "1":
        dkdv, dq_launch = dkdv + dq_launch, []
    _launch_on(q.device, pre, stream_ptr)
    _launch_on(q.device, dkdv, stream_ptr, beside=dq_launch)
