"""The public functions, with FlashAttention-2's names and conventions.

Each resolves what is particular to the public surface (head dims that are not a multiple of 8, a
window or causal mask intersected with a block mask, the dropout seed), then hands the call to the
bridge of the caller's framework: JAX arrays to cuflash.jax, PyTorch tensors that need gradients to
cuflash.torch's custom ops, everything else to the array bridge. The bridges build and validate the
Problem (_problem.py); the engine below them runs it.
"""
from __future__ import annotations

from . import _arrays, _bridge, _headdim, _options, _problem, _sparse


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False, *, block_mask=None,
                    dropout_seed=None, score_mod=None, mask_mod=None, sinks=None):
    """Exact attention softmax(q k^T * scale) v, computed without materialising the score matrix.

    q: (batch, seqlen_q, nheads, headdim); k, v: (batch, seqlen_k, nheads_k, headdim), nheads_k
    dividing nheads (GQA/MQA). float16, bfloat16 or float32 (3xTF32 products); any headdim from 1 to 256
    (one that is not a multiple of 8 is zero-padded, a copy, as FlashAttention-2 does); v's head dim may
    differ from q's and k's (the narrower is zero-padded to the wider; out has v's); the last dimension
    contiguous. CuPy arrays, PyTorch CUDA tensors, JAX arrays, or anything with __dlpack__.
    causal=True masks key j for query i when j > i + seqlen_k - seqlen_q (bottom-right aligned).
    window_size=(left, right): query i sees key j iff i + d - left <= j <= i + d + right,
    d = seqlen_k - seqlen_q (-1: unbounded on that side); key tiles outside the window are skipped.
    alibi_slopes: float32 (nheads,) or (batch, nheads); adds -slope * |i + d - j| to the scaled scores.
    softcap > 0: each scaled score s becomes softcap * tanh(s / softcap) (before ALiBi), as in Gemma 2.
    block_mask: a cuflash.BlockMask (block sizes multiples of 64) built for (seqlen_q, seqlen_k):
    only its listed blocks are computed, partial blocks through their exact element bits; with
    causal=True or a window the masks intersect.
    dropout_p in [0, 1): each attention probability is dropped with this probability (rounded to a
    multiple of 2^-16) and the kept ones scaled by 1 / (1 - dropout_p), with an in-kernel Philox RNG
    that the backward regenerates. The RNG's seed: dropout_seed (an int; with JAX also a PRNG key),
    or when None PyTorch's CUDA generator (seed and a running offset, so torch.manual_seed makes runs
    reproducible), or for CuPy a 63-bit draw from NumPy's global generator (np.random.seed).
    Returns out like q, in the caller's array type; with return_attn_probs=True returns
    (out, softmax_lse, rng_state), softmax_lse float32 of shape (batch, nheads, seqlen_q) and
    rng_state the (seed, offset) the dropout used (None without dropout), which flash_attn_backward
    takes. A query row that can see no key gives zeros and a log-sum-exp of -inf.
    score_mod: a cuflash.ScoreMod, a CUDA snippet that changes each scaled score (before ALiBi; the
    log-sum-exp is that of the changed scores); mask_mod: a cuflash.MaskMod, a CUDA snippet that says
    which (query, key) pairs attend. Both are compiled into the kernels; their captured values are launch
    arguments (with JAX, Python scalars are static: a new value traces again, and still compiles no kernel).
    sinks: float32 (nheads,) learnable attention sinks (gpt-oss): each head's logit joins every softmax row
    without a value; the log-sum-exp returned includes it, and PyTorch and JAX give its gradient.
    """
    return _attention(q, k, v, None, None, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                      deterministic, return_attn_probs, block_mask, dropout_seed, score_mod, mask_mod, sinks)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, *, block_mask=None, dropout_seed=None,
                           check_inputs=False, score_mod=None, mask_mod=None, sinks=None):
    """Attention over each of a batch of packed sequences of different lengths.

    Sequences are concatenated along the first dimension: q is (total_q, nheads, headdim), k and v
    (total_k, nheads_k, headdim), and sequence b occupies rows cu_seqlens[b] to cu_seqlens[b + 1] - 1
    (int32 prefix sums on the device). No padding is stored or computed. max_seqlen_q and max_seqlen_k
    must be at least the longest sequence (they size the grid). They are checked against cu_seqlens only
    with check_inputs=True (or CUFLASH_CHECK_INPUTS=1): the check reads cu_seqlens on the host, a
    synchronising copy; offsets must not decrease and must stay within q's and k's rows. The other
    arguments as for flash_attn_func; causal and window_size are aligned to each sequence's own
    bottom-right corner. Together with a block mask, a window or causal reads cu_seqlens on the host once
    per call (under jax.jit they must be concrete). A block_mask is built for (max_seqlen_q, max_seqlen_k)
    with batch 1 or one entry per sequence; its indices count from each sequence's first query and key.
    Dropout numbers each sequence's scores from its own first row and key, with the sequence's index as
    its batch index. Returns out (total_q, nheads, headdim), or (out, softmax_lse, rng_state) with
    softmax_lse (nheads, total_q). score_mod and mask_mod see b as the sequence's index and q, kv as
    positions inside it.
    """
    _check_offsets(q, k, (cu_seqlens_q, cu_seqlens_k), (max_seqlen_q, max_seqlen_k), check_inputs)
    return _attention(q, k, v, (cu_seqlens_q, cu_seqlens_k), (max_seqlen_q, max_seqlen_k), dropout_p, softmax_scale,
                      causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs, block_mask,
                      dropout_seed, score_mod, mask_mod, sinks)


def flash_attn_backward(dout, q, k, v, out, softmax_lse, *, dropout_p=0.0, softmax_scale=None, causal=False,
                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False, block_mask=None,
                        rng_state=None, score_mod=None, mask_mod=None):
    """Gradients (dq, dk, dv) of flash_attn_func's output, from the saved output and log-sum-exp.

    dout, out: like q; softmax_lse: float32 (batch, nheads, seqlen_q), contiguous, as returned by
    flash_attn_func(..., return_attn_probs=True); the other arguments as given to the forward.
    dk and dv have k's shape (summed over the query heads of each K/V head for GQA). No buffer grows
    with seqlen_q x seqlen_k. deterministic=True gives bitwise reproducible gradients (no atomics);
    the default lets the Hopper backward at d = 128 accumulate dQ in the dK/dV kernel, whose fp32
    additions come in any order (README: Training). With dropout_p > 0, rng_state is the (seed, offset) that the
    forward returned: the kernels regenerate its dropout mask. For CuPy and DLPack arrays (PyTorch
    and JAX users differentiate flash_attn_func instead).
    """
    return _backward(dout, q, k, v, out, softmax_lse, None, None, dropout_p, softmax_scale, causal, window_size,
                     softcap, alibi_slopes, deterministic, block_mask, rng_state, score_mod, mask_mod)


def flash_attn_varlen_backward(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                               max_seqlen_k, *, dropout_p=0.0, softmax_scale=None, causal=False,
                               window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                               block_mask=None, rng_state=None, check_inputs=False, score_mod=None, mask_mod=None):
    """(dq, dk, dv) of flash_attn_varlen_func, from its output and log-sum-exp (nheads, total_q); the
    arguments as for flash_attn_backward and flash_attn_varlen_func."""
    _check_offsets(q, k, (cu_seqlens_q, cu_seqlens_k), (max_seqlen_q, max_seqlen_k), check_inputs)
    return _backward(dout, q, k, v, out, softmax_lse, (cu_seqlens_q, cu_seqlens_k), (max_seqlen_q, max_seqlen_k),
                     dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, block_mask,
                     rng_state, score_mod, mask_mod)


def _resolve_masks(q, k, cu_seqlens, max_seqlen, causal, window_size, block_mask):
    """(block_mask, causal, window) as the kernels run them: a window or causal mask together with a block
    mask is intersected into it; without one, they are the kernels' band."""
    causal = _problem.check_causal(causal)
    if cu_seqlens is None:
        block_mask, window = _sparse.window_mask(block_mask, window_size, q, k)
        return block_mask, causal, window
    max_q, max_k = (_problem.check_max_seqlen(m, n) for m, n in zip(max_seqlen, ("max_seqlen_q", "max_seqlen_k")))
    def lengths():
        return tuple(tuple(b - a for a, b in zip(offsets, offsets[1:])) for offsets in _host_offsets(cu_seqlens))

    return _sparse.varlen_mask(block_mask, window_size, causal, lengths, max_q, max_k)


def _host_offsets(cu_seqlens):
    return tuple(_bridge.host_offsets(cu, name) for cu, name in zip(cu_seqlens, ("cu_seqlens_q", "cu_seqlens_k")))


def _check_offsets(q, k, cu_seqlens, max_seqlen, check_inputs: bool) -> None:
    """With check_inputs (or CUFLASH_CHECK_INPUTS=1), cu_seqlens and max_seqlen are read on the host (one
    synchronising copy) and checked against the packed arrays."""
    if check_inputs or _options.current().check_inputs:
        _problem.check_offsets(*_host_offsets(cu_seqlens), q.shape[0], k.shape[0], *max_seqlen)


def _attention(q, k, v, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size, softcap,
               alibi_slopes, deterministic, return_attn_probs, block_mask, dropout_seed, score_mod, mask_mod, sinks=None):
    dropout_p = _problem.check_dropout(dropout_p)
    block_mask, causal, window = _resolve_masks(q, k, cu_seqlens, max_seqlen, causal, window_size, block_mask)
    call = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, causal=causal, window=window, softcap=softcap,
                alibi_slopes=alibi_slopes, dropout_p=dropout_p, block_mask=block_mask,
                deterministic=_problem.check_flag(deterministic, "deterministic"))
    if score_mod is not None or mask_mod is not None:
        call.update(score_mod=score_mod, mask_mod=mask_mod)
    if sinks is not None:
        call.update(sinks=sinks)
    padded = _headdim.needs_padding(q, k, v, ndim=4 if cu_seqlens is None else 3)
    if not padded:
        return _forward(q, k, v, softmax_scale, dropout_seed, return_attn_probs, call)
    d, dv = q.shape[-1], v.shape[-1]
    res = _forward(*(_headdim.pad(x, padded) for x in (q, k, v)), _problem.resolve_scale(softmax_scale, d),
                   dropout_seed, return_attn_probs, call)
    return (_headdim.unpad(res[0], dv), *res[1:]) if return_attn_probs else _headdim.unpad(res, dv)


def _forward(q, k, v, softmax_scale, dropout_seed, return_attn_probs, call):
    """The forward through the caller's framework's bridge."""
    framework = _bridge.framework_of(q)
    if framework == "jax":
        from . import jax as cf_jax

        out, lse = cf_jax.attention(q, k, v, softmax_scale=softmax_scale, dropout_seed=dropout_seed, **call)
        return (out, lse, None) if return_attn_probs else out
    if framework == "torch" and _bridge.torch_takes_op(q, k, v, call.get("sinks")):
        from . import torch as cf_torch

        # Arguments are checked inside the custom op (torch.compile traces this: no data pointers here).
        out, lse, rng = cf_torch.attention(q, k, v, softmax_scale=softmax_scale, dropout_seed=dropout_seed, **call)
        rng = cf_torch.rng_state(rng) if call["dropout_p"] else None
        return (out, lse, rng) if return_attn_probs else out
    rng = _arrays.framework_rng(call["dropout_p"], dropout_seed, q)
    call.pop("deterministic")  # the forward is deterministic whatever it says
    out, lse = _arrays.forward(q, k, v, softmax_scale=softmax_scale, rng=rng, **call)
    return (out, lse, rng) if return_attn_probs else out


def _backward(dout, q, k, v, out, softmax_lse, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal,
              window_size, softcap, alibi_slopes, deterministic, block_mask, rng_state, score_mod, mask_mod):
    dropout_p = _problem.check_dropout(dropout_p)
    block_mask, causal, window = _resolve_masks(q, k, cu_seqlens, max_seqlen, causal, window_size, block_mask)
    call = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, causal=causal, window=window, softcap=softcap,
                alibi_slopes=alibi_slopes, dropout_p=dropout_p, block_mask=block_mask, rng=rng_state,
                deterministic=_problem.check_flag(deterministic, "deterministic"), score_mod=score_mod,
                mask_mod=mask_mod)
    padded = _headdim.needs_padding(q, k, v, dout, out, ndim=4 if cu_seqlens is None else 3)
    if not padded:
        return _arrays.backward(dout, q, k, v, out, softmax_lse, softmax_scale=softmax_scale, **call)
    d, dv = q.shape[-1], v.shape[-1]
    grads = _arrays.backward(*(_headdim.pad(x, padded) for x in (dout, q, k, v, out)), softmax_lse,
                             softmax_scale=_problem.resolve_scale(softmax_scale, d), **call)
    return tuple(_headdim.unpad(g, width) for g, width in zip(grads, (d, d, dv)))
