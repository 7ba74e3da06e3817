"""JAX glue: the kernels launched from jax.experimental.buffer_callback, on XLA's stream, writing
straight into XLA's output buffers, so they work eagerly and inside jax.jit; jax.custom_vjp makes
the attention differentiable. Dense and packed (varlen) calls share one path: the Problem knows which.
"""
from __future__ import annotations

import dataclasses
import functools

from . import _capture_grads, _dispatch, _engine, _options, _problem, _score_fn, _sparse
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


def _launch_inputs(p: _problem.Problem, extras, layout, mod=None, sinks=False) -> dict:
    """The engine's keyword arguments from a callback's extra operands, in this order: cu_seqlens_q and
    cu_seqlens_k (int32, packed problems), the block mask's lists (int32, when layout is not None), the
    ALiBi slopes (float32), the dropout RNG state (uint32 (4,), see _dropout_state), the score functions'
    captured arrays (mod = ScoreFn.launch_key() and their dtypes), then the sinks (float32, forward only)."""
    extras = list(extras)
    cu_seqlens = None
    if p.packed:
        cu_seqlens = tuple(_buffer(extras.pop(0), "int32").ptr for _ in range(2))
    lists = None if layout is None else (_buffer(extras.pop(0), "int32").ptr, layout)
    alibi = None if not p.alibi else (_buffer(extras.pop(0), "float32").ptr, p.alibi_sb)
    dropout = _dispatch.NO_DROPOUT
    if p.dropout_p:
        dropout = _dispatch.dropout_args(p.dropout_p, state_ptr=_buffer(extras.pop(0), "uint32").ptr)
    inputs = dict(lists=lists, alibi=alibi, cu_seqlens=cu_seqlens, dropout=dropout)
    if mod is not None:
        (digest, strides, scalars), dtypes = mod
        ptrs = [_buffer(extras.pop(0), dt).ptr for dt in dtypes]
        inputs["score_fn"] = _LaunchedScoreFn(digest, ptrs, strides, scalars)
    if sinks:
        inputs["sinks"] = _buffer(extras.pop(0), "float32").ptr
    return inputs


@dataclasses.dataclass
class _LaunchedScoreFn:
    """A score function as the engine takes it (digest, args), with the pointers of a callback's buffers."""
    digest: str
    ptrs: list
    strides: tuple
    scalars: tuple

    def args(self, softmax_scale: float, dscore: tuple = _score_fn.NO_DSCORE, dpsum: int = 0) -> tuple:
        return _score_fn.mod_args(self.ptrs, self.strides, self.scalars, softmax_scale, dscore, dpsum)


def _dropout_state(dropout_seed):
    """The dropout RNG state operand: uint32 words (seed lo, seed hi, offset lo, offset hi) from an int seed,
    or from jax.random.bits of a PRNG key (offset 0), so the key can be traced under jit."""
    import jax
    import jax.numpy as jnp

    if dropout_seed is None:
        raise ValueError("dropout_seed: JAX has no global random generator; pass a PRNG key (jax.random.key(0)) "
                         "or an int")
    if isinstance(dropout_seed, int):
        seed = _problem.check_seed(dropout_seed)
        return jnp.array([seed & 0xFFFFFFFF, seed >> 32, 0, 0], dtype=jnp.uint32)
    if not isinstance(dropout_seed, jax.Array):
        raise TypeError(f"dropout_seed must be an int or a JAX PRNG key, got {type(dropout_seed).__name__}")
    bits = jax.random.bits(dropout_seed, (2,), jnp.uint32)
    return jnp.concatenate([bits, jnp.zeros((2,), jnp.uint32)])


@functools.lru_cache(maxsize=256)
def _fwd_callable(p: _problem.Problem, layout, options: _options.Options, mod=None, sinks: bool = False):
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
        qa, ka, va, oa = (_buffer(b, p.dtype) for b in (q, k, v, out))
        _engine.forward(p, qa, ka, va, oa, _buffer(lse, "float32"), ctx.stream, options,
                        **_launch_inputs(p, extras, layout, mod, sinks))

    return buffer_callback.buffer_callback(
        launch, (jax.ShapeDtypeStruct(p.q_shape, p.dtype), jax.ShapeDtypeStruct(p.lse_shape, "float32")))


@functools.lru_cache(maxsize=256)
def _bwd_callable(p: _problem.Problem, layout, options: _options.Options, workspace_floats: int, mod=None,
                  score_grads: bool = False, row_sums: bool = False, scores: bool = False):
    """The backward's callback: (dq, dk, dv, workspace), then with score_grads dS with respect to the score
    function's value (float32 p.dscore_shape), for its captured arrays' gradients (and with scores, the
    scores the function saw, for arrays that multiply them), and with row_sums rowsum(P * dP) shaped as lse
    (the sinks' gradient)."""
    import jax
    from jax.experimental import buffer_callback

    def launch(ctx, outs, dout, q, k, v, out, lse, *extras):
        dq, dk, dv, workspace = outs[:4]  # the backward's float32 workspace (_engine.bwd_workspace_floats)
        arrays = [_buffer(b, p.dtype) for b in (q, k, v, dout, out)]
        grads = [_buffer(b, p.dtype) for b in (dq, dk, dv)]
        rest = list(outs[4:])
        dscore = _buffer(rest.pop(0), "float32") if score_grads else None
        seen = _buffer(rest.pop(0), "float32") if scores else None
        dpsum = _buffer(rest.pop(0), "float32") if row_sums else None
        _engine.backward(p, *arrays, _buffer(lse, "float32"), _buffer(workspace, "float32"), *grads, ctx.stream,
                         options, dscore=dscore, dpsum=dpsum, scores=seen, **_launch_inputs(p, extras, layout, mod))

    results = [jax.ShapeDtypeStruct(s, p.dtype) for s in (p.q_shape, p.k_shape, p.k_shape)]
    results.append(jax.ShapeDtypeStruct((workspace_floats,), "float32"))
    if score_grads:
        results.append(jax.ShapeDtypeStruct(p.dscore_shape, "float32"))
    if scores:
        results.append(jax.ShapeDtypeStruct(p.dscore_shape, "float32"))
    if row_sums:
        results.append(jax.ShapeDtypeStruct(p.lse_shape, "float32"))
    return buffer_callback.buffer_callback(launch, tuple(results))


@functools.lru_cache(maxsize=256)
def _differentiable(p: _problem.Problem, layout, options: _options.Options, workspace_floats: int, mod=None,
                    sinks: bool = False, captured: tuple = ()):
    """(q, k, v, *extras) -> (out, lse) with a custom VJP running the backward kernels; extras (the
    _launch_inputs operands) get zero cotangents, but the sinks (the last operand when sinks) their
    gradient, and the score function's captured arrays theirs where jax.grad differentiates them: captured
    is (first operand, plans), a plan per captured array (_capture_grads.plan's, or the reason its
    gradient is not computed). The log-sum-exp is an output for callers who want it; gradients do not
    flow through it."""
    import jax
    import numpy as np

    fwd = _fwd_callable(p, layout, options, mod, sinks)
    first, plans = captured or (0, ())

    @jax.custom_vjp
    def attention(q, k, v, *extras):
        return fwd(q, k, v, *extras)

    def attention_fwd(q, k, v, *extras):  # (symbolic zeros: each operand's .value and whether it is .perturbed)
        needs = [x.perturbed for x in extras[first:first + len(plans)]]
        for need, plan in zip(needs, plans):
            if need and isinstance(plan, str):
                raise NotImplementedError(plan)
        q, k, v, *extras = (x.value for x in (q, k, v, *extras))
        out, lse = fwd(q, k, v, *extras)
        # which arrays need gradients is static; it travels as the residuals' structure (None: not needed)
        marks = tuple(jax.numpy.zeros((), "int8") if need else None for need in needs)
        return (out, lse), (q, k, v, out, lse, extras, marks)

    def attention_bwd(res, cotangents):
        q, k, v, out, lse, extras, marks = res
        dout = cotangents[0]
        if isinstance(dout, jax.custom_derivatives.SymbolicZero):  # only lse was used
            dout = jax.numpy.zeros(out.shape, out.dtype)
        needs = [m is not None for m in marks]
        scores = any(need and plan[2] for need, plan in zip(needs, plans))
        bwd = _bwd_callable(p, layout, options, workspace_floats, mod, any(needs), sinks, scores)
        dq, dk, dv, _, *rest = bwd(dout.astype(q.dtype), q, k, v, out, lse, *(extras[:-1] if sinks else extras))
        dscore = rest.pop(0) if any(needs) else None
        seen = rest.pop(0) if scores else None
        zeros = [np.zeros(x.shape, jax.dtypes.float0) if np.issubdtype(x.dtype, np.integer) else jax.numpy.zeros_like(x)
                 for x in extras]
        for i, (need, plan) in enumerate(zip(needs, plans)):
            if need:
                zeros[first + i] = _capture_grads.capture_grad_jax(dscore, extras[first + i], *plan, scores=seen)
        if sinks:
            zeros[-1] = _sinks_grad(lse, extras[-1], rest.pop(0), p.packed is not None)
        return (dq, dk, dv, *zeros)

    attention.defvjp(attention_fwd, attention_bwd, symbolic_zeros=True)
    return attention


def _sinks_grad(lse, sinks, dpsum, packed: bool):
    """d(loss)/d(sink_h) = -sum over rows of e^(sink - LSE') * rowsum(P * dP), the row sums from the dQ
    kernel in float32, shaped as lse (torch.py's twin)."""
    import jax.numpy as jnp

    p_sink = jnp.exp(sinks.reshape(-1, 1) - lse) if packed else jnp.exp(sinks.reshape(1, -1, 1) - lse)
    grad = -(p_sink * dpsum)
    return grad.sum(1) if packed else grad.sum((0, 2))


def _traced_captures(score_mod, mask_mod):
    """The ScoreMod and MaskMod with their JAX arrays described (the header needs their types and ranks; a
    name both capture is one description), and those arrays by name in the order the ScoreFn lists them."""
    import jax

    metas, arrays = {}, {}
    for mod in (score_mod, mask_mod):
        for name, x in (mod.captures if mod else {}).items():
            if name not in metas and isinstance(x, jax.Array) and x.ndim > 0:
                metas[name] = _meta(x, name)
                arrays[name] = x
    def described(mod):
        return {n: metas.get(n, x) for n, x in mod.captures.items()}
    score = score_mod and _score_fn.ScoreMod(score_mod.code, score_mod.grad, **described(score_mod))
    mask = mask_mod and _score_fn.MaskMod(mask_mod.code, **described(mask_mod))
    return score, mask, arrays


def attention(q, k, v, *, softmax_scale=None, causal=False, window=(-1, -1), softcap=0.0, dropout_p=0.0,
              dropout_seed=None, alibi_slopes=None, block_mask=None, cu_seqlens=None, max_seqlen=None,
              deterministic=False, score_mod=None, mask_mod=None, sinks=None):
    """(out, lse) for JAX arrays: usable inside jax.jit and differentiable (jax.grad). Dropout needs
    dropout_seed: a PRNG key (traceable) or an int; window: the kernels' band; packed sequences with
    cu_seqlens and max_seqlen as for cuflash.flash_attn_varlen_func. score_mod and mask_mod capture JAX
    arrays (operands, constants for jax.grad) and Python scalars (static: a new value traces again, compiles no
    kernel); sinks: a float32 (nheads,) JAX array, differentiable."""
    import jax

    qa, ka, va = _meta(q, "q"), _meta(k, "k"), _meta(v, "v")
    cu = None if cu_seqlens is None else (_meta(cu_seqlens[0], "cu_seqlens_q"), _meta(cu_seqlens[1], "cu_seqlens_k"))
    alibi = None if alibi_slopes is None else _meta(alibi_slopes, "alibi_slopes")
    score_mod, mask_mod, captured = _traced_captures(score_mod, mask_mod)
    fn = _score_fn.score_fn(score_mod, mask_mod)
    p = _problem.build(qa, ka, va, softmax_scale=softmax_scale, softcap=softcap, dropout_p=dropout_p, causal=causal,
                       window=window, alibi=alibi, block_mask=block_mask, cu_seqlens=cu, max_seqlen=max_seqlen,
                       score_fn=fn)
    extras, layout = _chunk_extras(p, q, cu_seqlens, block_mask)
    if alibi_slopes is not None:
        extras.append(alibi_slopes)
    if p.dropout_p:
        extras.append(_dropout_state(dropout_seed))
    mod, plans = None, ()
    if fn is not None:
        plans = (len(extras), tuple(_grad_plan(score_mod, name) for name in captured))
        extras += list(captured.values())
        mod = (fn.launch_key(), tuple(a.dtype for a in fn.arrays))
    if sinks is not None:
        _problem.check_sinks(_meta(sinks, "sinks"), qa, p.nheads)
        extras.append(sinks)
    options = _options.current()
    if deterministic:  # dQ from its own kernel: bitwise reproducible gradients
        options = dataclasses.replace(options, fused_dq=False)
    workspace = _engine.bwd_workspace_floats(p, _device_id(q), options)
    return _differentiable(p, layout, options, workspace, mod, sinks is not None, plans)(q, k, v, *extras)


def _grad_plan(score_mod, name: str):
    """How a captured array's gradient is computed (_capture_grads.plan, as a hashable tuple), or why not."""
    if score_mod is None or name not in score_mod.captures:
        return f"mask_mod: captured {name!r} is differentiated, but a mask has no gradient"
    ints = {n: x for n, x in score_mod.captures.items() if isinstance(x, int) and not isinstance(x, bool)}
    try:
        sign, indices, by_score = _capture_grads.plan(score_mod.code, name, ints)
    except NotImplementedError as e:
        return str(e)
    return sign, tuple(indices), by_score


def _device_id(x) -> int:
    try:
        return next(iter(x.devices())).id
    except Exception:  # a tracer under jit: the default device
        import jax

        return jax.devices()[0].id


def _chunk_problem(q, k, v, softmax_scale, causal, cu_seqlens, max_seqlen, block_mask):
    cu = None if cu_seqlens is None else (_meta(cu_seqlens[0], "cu_seqlens_q"), _meta(cu_seqlens[1], "cu_seqlens_k"))
    return _problem.build(_meta(q, "q"), _meta(k, "k"), _meta(v, "v"), softmax_scale=softmax_scale, causal=causal,
                          cu_seqlens=cu, max_seqlen=max_seqlen, block_mask=block_mask)


def _chunk_extras(p, q, cu_seqlens, block_mask):
    """The kernels' array arguments after q, k, v (as attention passes them) and the block lists' layout."""
    extras, layout = list(cu_seqlens or ()), None
    if block_mask is not None:
        buffer, layout = _sparse.device_lists(block_mask, p.causal, p.nheads // p.nheads_k, _device_id(q), "jax")
        extras.append(buffer)
    return extras, layout


def attention_parts(q, k, v, *, softmax_scale=None, causal=False, cu_seqlens=None, max_seqlen=None,
                    block_mask=None):
    """(out, lse) of the forward kernels, not differentiable, for callers that assemble their own backward
    from attention_backward (ring attention: jax_distributed.py). q, k, v, packed sequences and block_mask
    as for attention."""
    p = _chunk_problem(q, k, v, softmax_scale, causal, cu_seqlens, max_seqlen, block_mask)
    extras, layout = _chunk_extras(p, q, cu_seqlens, block_mask)
    return _fwd_callable(p, layout, _options.current())(q, k, v, *extras)


def attention_backward(dout, q, k, v, out, lse, *, softmax_scale=None, causal=False, cu_seqlens=None,
                       max_seqlen=None, deterministic=False, block_mask=None):
    """(dq, dk, dv) of the backward kernels from out and lse (float32, as attention_parts returns it): the
    rows' whole log-sum-exp may cover more keys than k holds, which makes these the gradients of k's part."""
    p = _chunk_problem(q, k, v, softmax_scale, causal, cu_seqlens, max_seqlen, block_mask)
    extras, layout = _chunk_extras(p, q, cu_seqlens, block_mask)
    options = _options.current()
    if deterministic:
        options = dataclasses.replace(options, fused_dq=False)
    workspace = _engine.bwd_workspace_floats(p, _device_id(q), options)
    dq, dk, dv, _ = _bwd_callable(p, layout, options, workspace)(dout.astype(q.dtype), q, k, v, out, lse, *extras)
    return dq, dk, dv
