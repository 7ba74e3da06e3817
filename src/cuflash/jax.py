"""JAX glue: the kernels launched from jax.experimental.buffer_callback, on XLA's stream, writing
straight into XLA's output buffers, so they work eagerly and inside jax.jit; jax.custom_vjp makes
the attention differentiable."""
from __future__ import annotations

import functools

from . import _dispatch, _sparse, api
from ._bridge import DeviceArray, contiguous_strides


def _meta(x, name: str) -> DeviceArray:
    """Metadata of a JAX array or tracer (JAX arrays are dense and row-major)."""
    import jax

    if not isinstance(x, jax.Array):
        raise TypeError(f"{name} must be a JAX array like q, got {type(x).__module__}.{type(x).__name__}")
    try:
        platforms = {d.platform for d in x.devices()}
    except Exception:  # a tracer under jit: it will live on the default backend
        platforms = {jax.default_backend()}
    on_gpu = platforms <= {"gpu", "cuda"}
    shape = tuple(x.shape)
    return DeviceArray(0, shape, contiguous_strides(shape), str(x.dtype), 0 if on_gpu else None, "jax", x)


def _buffer(buf, dtype: str) -> DeviceArray:
    """A buffer_callback Buffer (dense, row-major) as a DeviceArray; dtype comes from trace time, since
    the interface spells bfloat16 as an opaque 2-byte type."""
    import cupy

    ptr = buf.__cuda_array_interface__["data"][0]
    shape = tuple(buf.shape)
    device = cupy.cuda.runtime.pointerGetAttributes(ptr).device if ptr else cupy.cuda.runtime.getDevice()
    return DeviceArray(ptr, shape, contiguous_strides(shape), dtype, device, "jax", buf)


def _extras(problem, buffers, layout, alibi_sb, totals):
    """(lists, alibi, varlen, dropout) launch arguments from a callback's extra operands: cu_seqlens_q
    and cu_seqlens_k (int32, when totals = (total_q, total_k) is not None), the packed block-mask lists
    (int32, when layout is not None), the ALiBi slopes (float32, when alibi_sb is not None), then the
    dropout RNG state (uint32 (4,), see _dropout_state, when the problem has dropout)."""
    buffers = list(buffers)
    varlen = None
    if totals is not None:
        cu_q, cu_k = (_buffer(buffers.pop(0), "int32").ptr for _ in range(2))
        varlen = (cu_q, cu_k, totals[0])
    lists = None if layout is None else (_buffer(buffers.pop(0), "int32").ptr, layout)
    alibi = None if alibi_sb is None else (_buffer(buffers.pop(0), "float32").ptr, alibi_sb)
    state = _buffer(buffers.pop(0), "uint32").ptr if problem.dropout_p else 0
    return lists, alibi, varlen, api.dropout_launch_args(problem, None, state)


def _dropout_state(dropout_seed, extras) -> None:
    """Appends the dropout RNG state to the callback's extra operands: uint32 words (seed lo, seed hi,
    offset lo, offset hi) from an int seed, or from jax.random.bits of a PRNG key (offset 0), so
    the key can be traced under jit."""
    import jax
    import jax.numpy as jnp

    if dropout_seed is None:
        raise ValueError("dropout_seed: JAX has no global random generator; pass a PRNG key (jax.random.key(0)) "
                         "or an int")
    if isinstance(dropout_seed, int):
        seed = api.check_seed(dropout_seed)
        extras.append(jnp.array([seed & 0xFFFFFFFF, seed >> 32, 0, 0], dtype=jnp.uint32))
        return
    if not isinstance(dropout_seed, jax.Array):
        raise TypeError(f"dropout_seed must be an int or a JAX PRNG key, got {type(dropout_seed).__name__}")
    bits = jax.random.bits(dropout_seed, (2,), jnp.uint32)
    extras.append(jnp.concatenate([bits, jnp.zeros((2,), jnp.uint32)]))


def _arrays(problem, totals, buffers, dtype, kinds):
    """DeviceArrays of q-like ("q") or k-like ("k") buffers; packed (varlen) ones seen batched."""
    from .varlen import _batched

    arrays = [_buffer(b, dtype) for b in buffers]
    if totals is None:
        return arrays
    lengths = {"q": problem.seqlen_q, "k": problem.seqlen_k}
    return [_batched(a, problem.batch, lengths[kind]) for a, kind in zip(arrays, kinds)]


def _shapes(problem, totals):
    """Shapes of (q, k, lse): 4-D and (batch, nheads, seqlen_q), or packed and (nheads, total_q)."""
    p = problem
    if totals is None:
        return ((p.batch, p.seqlen_q, p.nheads, p.head_dim), (p.batch, p.seqlen_k, p.nheads_k, p.head_dim),
                (p.batch, p.nheads, p.seqlen_q))
    return (totals[0], p.nheads, p.head_dim), (totals[1], p.nheads_k, p.head_dim), (p.nheads, totals[0])


@functools.lru_cache(maxsize=256)
def _fwd_callable(problem: _dispatch.FwdProblem, dtype: str, causal: bool, layout, alibi_sb, totals=None):
    import jax

    try:
        from jax.experimental import buffer_callback
    except ImportError as e:
        raise RuntimeError(
            f"cuflash needs jax.experimental.buffer_callback (JAX >= 0.6.1) to run on JAX arrays; "
            f"this JAX is {jax.__version__}"
        ) from e

    def launch(ctx, outs, q, k, v, *extras):
        out, lse = outs
        qa, ka, va, oa = _arrays(problem, totals, (q, k, v, out), dtype, "qkkq")
        lists, alibi, varlen, dropout = _extras(problem, extras, layout, alibi_sb, totals)
        api.run_fwd(problem, qa, ka, va, oa, _buffer(lse, "float32"), ctx.stream, lists, alibi, varlen, dropout)

    q_shape, _, lse_shape = _shapes(problem, totals)
    return buffer_callback.buffer_callback(
        launch, (jax.ShapeDtypeStruct(q_shape, dtype), jax.ShapeDtypeStruct(lse_shape, "float32")))


@functools.lru_cache(maxsize=256)
def _bwd_callable(problem: _dispatch.FwdProblem, dtype: str, causal: bool, layout, alibi_sb, totals=None):
    import jax
    from jax.experimental import buffer_callback

    def launch(ctx, outs, dout, q, k, v, out, lse, *extras):
        dq, dk, dv, delta = outs  # delta: the backward's float32 workspace
        arrays = _arrays(problem, totals, (q, k, v, dout, out), dtype, "qkkqq")
        grads = _arrays(problem, totals, (dq, dk, dv), dtype, "qkk")
        lists, alibi, varlen, dropout = _extras(problem, extras, layout, alibi_sb, totals)
        api.run_bwd(problem, *arrays, _buffer(lse, "float32"), _buffer(delta, "float32"), *grads, ctx.stream, lists,
                    alibi, varlen, dropout)

    q_shape, k_shape, lse_shape = _shapes(problem, totals)
    results = [jax.ShapeDtypeStruct(s, dtype) for s in (q_shape, k_shape, k_shape)]
    results.append(jax.ShapeDtypeStruct(lse_shape, "float32"))
    return buffer_callback.buffer_callback(launch, tuple(results))


@functools.lru_cache(maxsize=256)
def _differentiable(problem: _dispatch.FwdProblem, dtype: str, causal: bool, layout, alibi_sb, totals=None):
    """(q, k, v, *extras) -> (out, lse) with a custom VJP running the backward kernels; extras are the
    packed block mask (int32), the ALiBi slopes and the dropout RNG state, which get zero cotangents. The log-sum-exp is an
    output for callers who want it; gradients do not flow through it."""
    import jax
    import numpy as np

    fwd = _fwd_callable(problem, dtype, causal, layout, alibi_sb, totals)
    bwd = _bwd_callable(problem, dtype, causal, layout, alibi_sb, totals)

    @jax.custom_vjp
    def attention(q, k, v, *extras):
        return fwd(q, k, v, *extras)

    def attention_fwd(q, k, v, *extras):
        out, lse = fwd(q, k, v, *extras)
        return (out, lse), (q, k, v, out, lse, extras)

    def attention_bwd(res, cotangents):
        q, k, v, out, lse, extras = res
        dout, _ = cotangents
        dq, dk, dv, _ = bwd(dout.astype(q.dtype), q, k, v, out, lse, *extras)
        zeros = [np.zeros(x.shape, jax.dtypes.float0) if np.issubdtype(x.dtype, np.integer) else jax.numpy.zeros_like(x)
                 for x in extras]
        return (dq, dk, dv, *zeros)

    attention.defvjp(attention_fwd, attention_bwd)
    return attention


def flash_attn_func(q, k, v, softmax_scale=None, causal=False, return_attn_probs=False, block_mask=None,
                    alibi_slopes=None, softcap=0.0, dropout_p=0.0, dropout_seed=None, window=(-1, -1)):
    """cuflash.flash_attn_func for JAX arrays: usable inside jax.jit and differentiable (jax.grad).
    Dropout needs dropout_seed: a PRNG key (traceable) or an int; window: the kernels' band."""
    qa, ka, va = _meta(q, "q"), _meta(k, "k"), _meta(v, "v")
    problem = api.check_fwd_args(qa, ka, va, softmax_scale, softcap, dropout_p, causal, window)
    extras, layout = [], None
    if block_mask is not None:
        _sparse.check_mask(block_mask, problem.batch, problem.nheads, problem.seqlen_q, problem.seqlen_k)
        buffer, layout = _sparse.device_lists(block_mask, bool(causal), problem.nheads // problem.nheads_k,
                                              _device_id(q), "jax")
        extras.append(buffer)
    alibi_sb = _alibi_stride(alibi_slopes, problem, extras)
    if problem.dropout_p:
        _dropout_state(dropout_seed, extras)
    out, lse = _differentiable(problem, qa.dtype, bool(causal), layout, alibi_sb)(q, k, v, *extras)
    return (out, lse, None) if return_attn_probs else out


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale=None,
                           causal=False, return_attn_probs=False, alibi_slopes=None, softcap=0.0, dropout_p=0.0,
                           dropout_seed=None, block_mask=None, window=(-1, -1)):
    """cuflash.flash_attn_varlen_func for JAX arrays (jit, grad); block_mask and window as
    cuflash.varlen's varlen_mask gives them."""
    from .varlen import _batched

    qa, ka, va = _meta(q, "q"), _meta(k, "k"), _meta(v, "v")
    cu_q, cu_k = _meta(cu_seqlens_q, "cu_seqlens_q"), _meta(cu_seqlens_k, "cu_seqlens_k")
    for a, name in ((qa, "q"), (ka, "k"), (va, "v")):
        if a.ndim != 3:
            raise ValueError(f"{name} must have 3 dimensions (total_tokens, nheads, headdim), got shape {a.shape}")
    for a, name in ((cu_q, "cu_seqlens_q"), (cu_k, "cu_seqlens_k")):
        if a.dtype != "int32" or a.ndim != 1 or a.shape[0] < 2 or a.shape != cu_q.shape:
            raise ValueError(f"{name} must be int32 of shape (batch + 1,) like cu_seqlens_q, got {a.dtype} {a.shape}")
    batch = cu_q.shape[0] - 1
    problem = api.check_fwd_args(_batched(qa, batch, int(max_seqlen_q)), _batched(ka, batch, int(max_seqlen_k)),
                                 _batched(va, batch, int(max_seqlen_k)), softmax_scale, softcap, dropout_p, causal,
                                 window)
    extras, layout = [cu_seqlens_q, cu_seqlens_k], None
    if block_mask is not None:
        _sparse.check_mask(block_mask, problem.batch, problem.nheads, problem.seqlen_q, problem.seqlen_k)
        buffer, layout = _sparse.device_lists(block_mask, bool(causal), problem.nheads // problem.nheads_k,
                                              _device_id(q), "jax")
        extras.append(buffer)
    alibi_sb = _alibi_stride(alibi_slopes, problem, extras)
    if problem.dropout_p:
        _dropout_state(dropout_seed, extras)
    totals = (qa.shape[0], ka.shape[0])
    out, lse = _differentiable(problem, qa.dtype, bool(causal), layout, alibi_sb, totals)(q, k, v, *extras)
    return (out, lse, None) if return_attn_probs else out


def _alibi_stride(alibi_slopes, problem, extras):
    """Checks JAX ALiBi slopes and appends them to the callback's extra operands; their batch stride."""
    if alibi_slopes is None:
        return None
    slopes = _meta(alibi_slopes, "alibi_slopes")
    if slopes.dtype != "float32" or slopes.shape not in ((problem.nheads,), (problem.batch, problem.nheads)):
        raise ValueError(f"alibi_slopes must be float32 of shape (nheads,) or (batch, nheads), got "
                         f"{slopes.dtype} {slopes.shape}")
    extras.append(alibi_slopes)
    return problem.nheads if len(slopes.shape) == 2 and problem.batch > 1 else 0


def _device_id(x) -> int:
    try:
        return next(iter(x.devices())).id
    except Exception:  # a tracer under jit: the default device
        import jax

        return jax.devices()[0].id
