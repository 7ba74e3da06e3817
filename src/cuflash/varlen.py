"""Variable-length (packed) batches, FlashAttention-2's varlen interface.

Sequences of different lengths are concatenated along the first dimension: q is (total_q, nheads,
headdim), k and v (total_k, nheads_k, headdim), and sequence b occupies rows cu_seqlens[b] to
cu_seqlens[b + 1] - 1 (int32 prefix sums on the device). The kernels read each sequence where it
lies (kernels/varlen.cuh): no padding is stored or computed; thread blocks past a short sequence's
end return at once. The log-sum-exp is (nheads, total_q), as in FlashAttention-2.

`unpad_input` and `pad_input` convert between a padded (batch, seqlen, ...) batch with a key-padding
mask and the packed form.
"""
from __future__ import annotations

import numpy as np

from . import _bridge, _headdim, _sparse, api
from ._bridge import DeviceArray


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, *, block_mask=None, dropout_seed=None):
    """Attention over each packed sequence separately (see the module docstring); the other arguments
    as for flash_attn_func (causal is aligned to each sequence's bottom-right corner). max_seqlen_q
    and max_seqlen_k must be at least the longest sequence (they size the grid; they are not checked
    against cu_seqlens, which would need a device-to-host copy). CuPy arrays, PyTorch tensors and JAX
    arrays (differentiable in both). Returns out (total_q, nheads, headdim), or (out, softmax_lse,
    rng_state). Dropout numbers each sequence's scores from its own first row and key, with the
    sequence's index as its batch index. window_size is aligned to each sequence's own bottom-right
    corner; together with a block mask it (and causal) reads cu_seqlens on the host once per call
    (under jax.jit they must be concrete, not traced). A block_mask is built for seqlens (max_seqlen_q,
    max_seqlen_k) with batch 1 or one entry per sequence; its indices count from each sequence's
    first query and key."""
    dropout_p = api.check_dropout(dropout_p)
    block_mask, causal, window = _sparse.varlen_mask(block_mask, window_size, bool(causal),
                                                     lambda: _host_lengths(cu_seqlens_q, cu_seqlens_k),
                                                     max_seqlen_q, max_seqlen_k)
    padded = _headdim.needs_padding(q, k, v, ndim=3)
    if padded:
        d = q.shape[-1]
        res = flash_attn_varlen_func(*(_headdim.pad(x, padded) for x in (q, k, v)), cu_seqlens_q, cu_seqlens_k,
                                     max_seqlen_q, max_seqlen_k, softmax_scale=api.resolve_scale(softmax_scale, d),
                                     causal=causal, window_size=window, softcap=softcap, alibi_slopes=alibi_slopes,
                                     return_attn_probs=return_attn_probs, dropout_p=dropout_p,
                                     dropout_seed=dropout_seed, block_mask=block_mask)
        return (_headdim.unpad(res[0], d), *res[1:]) if return_attn_probs else _headdim.unpad(res, d)
    if _bridge.framework_of(q) == "jax":
        from . import jax as cf_jax

        return cf_jax.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             softmax_scale, causal, return_attn_probs, alibi_slopes, softcap,
                                             dropout_p, dropout_seed, block_mask, window)
    if api._needs_torch_autograd(q, k, v):
        from . import torch as cf_torch

        out, lse, rng = cf_torch.flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                                        int(max_seqlen_k), api.resolve_scale(softmax_scale, q.shape[-1]),
                                                        bool(causal), alibi_slopes, api.resolve_softcap(softcap),
                                                        dropout_p, dropout_seed, block_mask, window)
        if return_attn_probs:
            rng = tuple(x % 2**64 for x in rng.tolist()) if dropout_p else None
    else:
        rng = api.resolve_rng(dropout_p, dropout_seed, q)
        out, lse = forward_arrays(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                  causal, alibi_slopes, softcap, dropout_p, rng, block_mask, window=window)
    return (out, lse, rng) if return_attn_probs else out


def flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, *, dropout_p=0.0, softmax_scale=None, causal=False,
                               window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                               block_mask=None, rng_state=None):
    """(dq, dk, dv) of flash_attn_varlen_func, from its output and log-sum-exp (CuPy users); with
    dropout, rng_state is the (seed, offset) the forward returned."""
    dropout_p = api.check_dropout(dropout_p)
    block_mask, causal, window = _sparse.varlen_mask(block_mask, window_size, bool(causal),
                                                     lambda: _host_lengths(cu_seqlens_q, cu_seqlens_k),
                                                     max_seqlen_q, max_seqlen_k)
    padded = _headdim.needs_padding(q, k, v, dout, out, ndim=3)
    if padded:
        d = q.shape[-1]
        grads = flash_attn_varlen_backward(*(_headdim.pad(x, padded) for x in (dout, q, k, v, out)), softmax_lse,
                                           cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           softmax_scale=api.resolve_scale(softmax_scale, d), causal=causal,
                                           window_size=window, softcap=softcap, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                                           rng_state=rng_state, block_mask=block_mask)
        return tuple(_headdim.unpad(g, d) for g in grads)
    return backward_arrays(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale, causal, alibi_slopes, softcap, dropout_p, rng_state, block_mask,
                           window=window)


def forward_arrays(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                   alibi_slopes=None, softcap=0.0, dropout_p=0.0, rng=None, block_mask=None, lists=None,
                   window=(-1, -1)):
    """The packed forward on CuPy/PyTorch arrays: (out, lse), no autograd; rng = (seed, offset); a block
    mask as block_mask, or on the device as lists (see api.forward_arrays); window as varlen_mask gives it."""
    problem, (q4, k4, v4), varlen, qa = _problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                softmax_scale, softcap, dropout_p, causal, window)
    if block_mask is not None:
        lists = api.mask_lists(block_mask, causal, problem, qa)
    dropout = api.dropout_launch_args(problem, rng)
    alibi = api.check_alibi(alibi_slopes, problem, qa)
    out, out_a = _bridge.empty(qa, qa.shape, qa.dtype)
    lse, lse_a = _bridge.empty(qa, (problem.nheads, qa.shape[0]), "float32")
    api.run_fwd(problem, q4, k4, v4, _batched(out_a, problem.batch, problem.seqlen_q), lse_a,
                _bridge.current_stream(qa), lists, alibi, varlen, dropout)
    return out, lse


def backward_arrays(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    softmax_scale, causal, alibi_slopes=None, softcap=0.0, dropout_p=0.0, rng=None, block_mask=None,
                    lists=None, window=(-1, -1)):
    problem, (q4, k4, v4), varlen, qa = _problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                                softmax_scale, softcap, dropout_p, causal, window)
    if block_mask is not None:
        lists = api.mask_lists(block_mask, causal, problem, qa)
    dropout = api.dropout_launch_args(problem, rng)
    doa, oa, la = (_bridge.describe(x, n) for x, n in ((dout, "dout"), (out, "out"), (softmax_lse, "softmax_lse")))
    for a, name in ((doa, "dout"), (oa, "out")):
        if a.shape != qa.shape or a.dtype != qa.dtype or a.device != qa.device:
            raise ValueError(f"{name} must be like q: {qa.dtype} {qa.shape} on cuda:{qa.device}, got {a.dtype} "
                             f"{a.shape}")
        if a.strides[-1] != 1 or any(s % 8 for s in a.strides[:-1]) or a.ptr % 16:
            raise ValueError(f"{name} must have a contiguous last dimension and 16-byte aligned rows")
    if la.dtype != "float32" or la.shape != (problem.nheads, qa.shape[0]) or la.device != qa.device:
        raise ValueError(f"softmax_lse must be float32 of shape (nheads, total_q) = {(problem.nheads, qa.shape[0])} "
                         f"on cuda:{qa.device}, got {la.dtype} {la.shape}")
    if la.strides != _bridge.contiguous_strides(la.shape) and 1 not in la.shape:
        raise ValueError(f"softmax_lse must be contiguous, got strides {la.strides}")
    alibi = api.check_alibi(alibi_slopes, problem, qa)
    grads = [_bridge.empty(qa, x.shape, qa.dtype) for x in (q, k, v)]
    delta, delta_a = _bridge.empty(qa, la.shape, "float32")
    batched = [_batched(a, problem.batch, n) for a, n in
               ((doa, problem.seqlen_q), (oa, problem.seqlen_q), (grads[0][1], problem.seqlen_q),
                (grads[1][1], problem.seqlen_k), (grads[2][1], problem.seqlen_k))]
    api.run_bwd(problem, q4, k4, v4, batched[0], batched[1], la, delta_a, *batched[2:], _bridge.current_stream(qa),
                lists, alibi, varlen, dropout)
    return tuple(g for g, _ in grads)


def _problem(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, softcap, dropout_p=0.0,
             causal=False, window=(-1, -1)):
    """Checks; the problem as batched views (batch stride 0, seqlen = the maximum) and the varlen
    launch fields."""
    qa, ka, va = (_bridge.describe(x, n) for x, n in ((q, "q"), (k, "k"), (v, "v")))
    for a, name in ((qa, "q"), (ka, "k"), (va, "v")):
        if a.ndim != 3:
            raise ValueError(f"{name} must have 3 dimensions (total_tokens, nheads, headdim), got shape {a.shape}")
    cu_q, cu_k = _bridge.describe(cu_seqlens_q, "cu_seqlens_q"), _bridge.describe(cu_seqlens_k, "cu_seqlens_k")
    for a, name in ((cu_q, "cu_seqlens_q"), (cu_k, "cu_seqlens_k")):
        if a.dtype != "int32" or a.ndim != 1 or a.shape[0] < 2 or a.strides[0] != 1:
            raise ValueError(f"{name} must be a contiguous int32 array of batch + 1 >= 2 offsets, got {a.dtype} "
                             f"{a.shape}")
        if a.device != qa.device:
            raise ValueError(f"{name} must be on cuda:{qa.device} like q")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have one length (batch + 1), got {cu_q.shape[0]} "
                         f"and {cu_k.shape[0]}")
    for value, name in ((max_seqlen_q, "max_seqlen_q"), (max_seqlen_k, "max_seqlen_k")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    batch = cu_q.shape[0] - 1
    q4, k4, v4 = _batched(qa, batch, max_seqlen_q), _batched(ka, batch, max_seqlen_k), _batched(va, batch, max_seqlen_k)
    problem = api.check_fwd_args(q4, k4, v4, softmax_scale, softcap, dropout_p, causal, window)
    return problem, (q4, k4, v4), (cu_q.ptr, cu_k.ptr, qa.shape[0]), qa


def _batched(a: DeviceArray, batch: int, seqlen: int) -> DeviceArray:
    """A packed (total, heads, dim) array seen as (batch, seqlen, heads, dim) with batch stride 0: the
    kernels add each sequence's start row (cu_seqlens) themselves."""
    return DeviceArray(a.ptr, (batch, seqlen, *a.shape[1:]), (0, *a.strides), a.dtype, a.device, a.framework, a.obj)


def _host_lengths(cu_seqlens_q, cu_seqlens_k) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Each sequence's length, read on the host (a device-to-host copy)."""
    def read(cu, name):
        framework = _bridge.framework_of(cu)
        try:
            host = cu.cpu().numpy() if framework == "torch" else cu.get() if framework == "cupy" else np.asarray(cu)
        except Exception as e:  # a JAX tracer
            raise ValueError(f"{name}: a block mask with window_size or causal on packed sequences needs the "
                             f"sequence lengths on the host, and they could not be read ({type(e).__name__}); "
                             f"under jax.jit pass concrete cu_seqlens (closed over), not traced arguments") from None
        return tuple(int(n) for n in np.diff(host.astype(np.int64)))

    return read(cu_seqlens_q, "cu_seqlens_q"), read(cu_seqlens_k, "cu_seqlens_k")


# ---- padded <-> packed -------------------------------------------------------------------------

def unpad_input(hidden_states, attention_mask):
    """(packed, indices, cu_seqlens, max_seqlen) from a padded (batch, seqlen, ...) array and a
    boolean (batch, seqlen) mask of the real tokens (FlashAttention-2's bert_padding.unpad_input).
    PyTorch tensors or CuPy arrays; the lengths are read on the host once (for max_seqlen)."""
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    if _bridge.framework_of(hidden_states) == "torch":
        import torch

        mask = attention_mask.bool()
        lengths = mask.sum(-1, dtype=torch.int32)
        indices = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
        cu_seqlens = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    else:
        import cupy

        mask = cupy.asarray(attention_mask, dtype=bool)
        lengths = mask.sum(-1, dtype=cupy.int32)
        indices = cupy.nonzero(mask.reshape(-1))[0]
        cu_seqlens = cupy.concatenate([cupy.zeros(1, cupy.int32), cupy.cumsum(lengths, dtype=cupy.int32)])
    return flat[indices], indices, cu_seqlens, int(lengths.max()) if lengths.shape[0] else 0


def pad_input(packed, indices, batch: int, seqlen: int):
    """The padded (batch, seqlen, ...) array (zeros where there was no token) from unpad_input's."""
    shape = (batch * seqlen, *packed.shape[1:])
    if _bridge.framework_of(packed) == "torch":
        import torch

        out = torch.zeros(shape, dtype=packed.dtype, device=packed.device).index_put((indices,), packed)
    else:
        import cupy

        out = cupy.zeros(shape, dtype=packed.dtype)
        out[indices] = packed
    return out.reshape(batch, seqlen, *packed.shape[1:])
