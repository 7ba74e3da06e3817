"""The array bridge: CuPy arrays, PyTorch tensors and DLPack objects in, the same type out, no autograd.

It describes the arguments (_bridge), builds the Problem (_problem), puts a block mask's lists on the
device, allocates the outputs with the caller's framework and runs the engine on the caller's stream.
PyTorch's custom ops (torch.py) run through it too; JAX launches from its own callbacks (jax.py).
Dense and packed (varlen) calls take one path: packed ones pass cu_seqlens and max_seqlen.
"""
from __future__ import annotations

import dataclasses

from . import _bridge, _dispatch, _engine, _options, _problem, _score_fn, _sparse
from ._bridge import DeviceArray


def _describe_all(arrays) -> list[DeviceArray]:
    return [_bridge.describe(x, name) for x, name in arrays]


def _describe_alibi(alibi_slopes) -> DeviceArray | None:
    if alibi_slopes is None:
        return None
    if _bridge.framework_of(alibi_slopes) == "jax":
        raise TypeError("alibi_slopes: JAX slopes go with JAX q, k, v")
    return _bridge.describe(alibi_slopes, "alibi_slopes")


def _inputs(q, k, v, softmax_scale, causal, window, softcap, dropout_p, alibi_slopes, block_mask, lists,
            cu_seqlens, max_seqlen, score_mod=None, mask_mod=None):
    """(problem, q, k, v, launch inputs) of a call: the engine's keyword arguments but dropout."""
    qa, ka, va = _describe_all(((q, "q"), (k, "k"), (v, "v")))
    alibi = _describe_alibi(alibi_slopes)
    fn = _score_fn.score_fn(score_mod, mask_mod)
    cu = None if cu_seqlens is None else tuple(_describe_all(zip(cu_seqlens, ("cu_seqlens_q", "cu_seqlens_k"))))
    p = _problem.build(qa, ka, va, softmax_scale=softmax_scale, softcap=softcap, dropout_p=dropout_p,
                       causal=causal, window=window, alibi=alibi, block_mask=block_mask,
                       mask_blocks=None if lists is None else (lists[1].block_m, lists[1].block_n),
                       cu_seqlens=cu, max_seqlen=max_seqlen, score_fn=fn)
    if block_mask is not None:
        buffer, layout = _sparse.device_lists(block_mask, p.causal, p.nheads // p.nheads_k, qa.device,
                                              "torch" if qa.framework == "torch" else "cupy")
        lists = _bridge.describe(buffer, "block_mask").ptr, layout
    launch = dict(lists=lists, cu_seqlens=None if cu is None else (cu[0].ptr, cu[1].ptr),
                  alibi=None if alibi is None else (alibi.ptr, p.alibi_sb), score_fn=fn)
    return p, qa, ka, va, launch


def dropout_fields(p: _problem.Problem, rng) -> tuple:
    """DropoutArgs' fields for problem p from rng = the (seed, offset) of the dropout."""
    if not p.dropout_p:
        return _dispatch.NO_DROPOUT
    if rng is None:
        raise ValueError("rng_state: dropout_p > 0 needs the (seed, offset) the forward used "
                         "(flash_attn_func(..., return_attn_probs=True) returns it)")
    if not (isinstance(rng, (tuple, list)) and len(rng) == 2):
        raise TypeError(f"rng_state must be a (seed, offset) pair of ints, got {rng!r}")
    return _dispatch.dropout_args(p.dropout_p, _problem.check_seed(rng[0], "rng_state[0]"),
                                  _problem.check_seed(rng[1], "rng_state[1]"))


def forward(q, k, v, *, softmax_scale=None, causal=False, window=(-1, -1), softcap=0.0, dropout_p=0.0, rng=None,
            alibi_slopes=None, block_mask=None, lists=None, cu_seqlens=None, max_seqlen=None, score_mod=None,
            mask_mod=None, sinks=None):
    """(out, lse) of the attention. A block mask comes as block_mask, or already on the device as lists =
    (pointer, _sparse.PackedLayout); rng = the dropout's (seed, offset); window: the kernels' band.
    Packed sequences: cu_seqlens = (cu_seqlens_q, cu_seqlens_k), max_seqlen = (max_seqlen_q, max_seqlen_k).
    score_mod, mask_mod: cuflash.ScoreMod, cuflash.MaskMod; sinks: float32 (nheads,) logits joining every
    softmax row (the lse returned includes them)."""
    p, qa, ka, va, launch = _inputs(q, k, v, softmax_scale, causal, window, softcap, dropout_p, alibi_slopes,
                                    block_mask, lists, cu_seqlens, max_seqlen, score_mod, mask_mod)
    dropout = dropout_fields(p, rng)
    sink_ptr = 0
    if sinks is not None:
        sinks_a = _bridge.describe(sinks, "sinks")
        _problem.check_sinks(sinks_a, qa, p.nheads)
        sink_ptr = sinks_a.ptr
    options = _options.current()
    out, out_a = _bridge.empty(qa, qa.shape, qa.dtype, options.poison_outputs)
    lse, lse_a = _bridge.empty(qa, p.lse_shape, "float32", options.poison_outputs)
    _engine.forward(p, qa, ka, va, out_a, lse_a, _bridge.current_stream(qa), options, dropout=dropout, sinks=sink_ptr,
                    **launch)
    if qa.framework == "dlpack":  # hand back what the caller can consume
        return out_a.obj, lse_a.obj
    return out, lse


def backward(dout, q, k, v, out, softmax_lse, *, softmax_scale=None, causal=False, window=(-1, -1), softcap=0.0,
             dropout_p=0.0, rng=None, alibi_slopes=None, block_mask=None, lists=None, cu_seqlens=None,
             max_seqlen=None, deterministic=False, score_mod=None, mask_mod=None, score_grads=False,
             scores=False, row_sums=False):
    """(dq, dk, dv) from the forward's output and log-sum-exp; the other arguments as for forward.
    deterministic: bitwise reproducible gradients (dQ from its own kernel, never accumulated by atomics).
    score_grads: also return dS with respect to the score function's value, float32 (batch, nheads,
    seqlen_q, seqlen_k) (per sequence for packed batches), for its captured arrays' gradients.
    scores (with score_grads): then also the scores the score function saw (q·k * softmax_scale, where
    the kernels visited them; zeros elsewhere), float32 shaped as dS, for captured arrays that multiply them.
    row_sums: also return rowsum(P * dP) over the keys, float32 shaped as softmax_lse (the sinks' gradient,
    -sum of P_sink times it, exact where rowsum(dO * O) reads the rounded output)."""
    if _bridge.framework_of(q) == "jax":
        raise TypeError("q: for JAX arrays use jax.grad of cuflash.flash_attn_func")
    doa = _bridge.describe(dout, "dout")  # the first argument is checked first
    p, qa, ka, va, launch = _inputs(q, k, v, softmax_scale, causal, window, softcap, dropout_p, alibi_slopes,
                                    block_mask, lists, cu_seqlens, max_seqlen, score_mod, mask_mod)
    oa, la = _describe_all(((out, "out"), (softmax_lse, "softmax_lse")))
    _problem.check_backward(p, qa, doa, oa, la)
    dropout = dropout_fields(p, rng)
    options = _options.current()
    if deterministic:
        options = dataclasses.replace(options, fused_dq=False)
    grads = [_bridge.empty(qa, a.shape, qa.dtype, options.poison_outputs) for a in (qa, ka, va)]
    _, workspace = _bridge.empty(qa, (_engine.bwd_workspace_floats(p, qa.device, options),), "float32")
    if score_grads:
        if not p.mod:
            raise ValueError("score_grads: needs a score_mod")
        grads.append(_bridge.empty(qa, p.dscore_shape, "float32"))
        if scores:
            grads.append(_bridge.empty(qa, p.dscore_shape, "float32"))
    elif scores:
        raise ValueError("scores: needs score_grads")
    if row_sums:
        grads.append(_bridge.empty(qa, p.lse_shape, "float32"))
    _engine.backward(p, qa, ka, va, doa, oa, la, workspace, *(g for _, g in grads[:3]), _bridge.current_stream(qa),
                     options, dropout=dropout, dscore=grads[3][1] if score_grads else None,
                     scores=grads[4][1] if scores else None, dpsum=grads[-1][1] if row_sums else None, **launch)
    if qa.framework == "dlpack":
        return tuple(g.obj for _, g in grads)
    return tuple(g for g, _ in grads)


def framework_rng(dropout_p: float, dropout_seed, like) -> tuple[int, int] | None:
    """(seed, offset) of the dropout RNG (None without dropout): dropout_seed with offset 0, or PyTorch's
    CUDA generator for tensors (seed and a running offset, so torch.manual_seed makes runs reproducible),
    or for CuPy a 63-bit draw from NumPy's global generator (np.random.seed)."""
    if not dropout_p:
        return None
    if dropout_seed is not None:
        return _problem.check_seed(dropout_seed), 0
    if _bridge.framework_of(like) == "torch":
        return torch_generator_rng(like.device.index)
    import numpy as np

    return int(np.random.randint(0, 2**63, dtype=np.int64)), 0


def torch_generator_rng(device: int) -> tuple[int, int]:
    """(seed, offset) for one dropout call from PyTorch's CUDA generator of `device`, which it then
    advances, as FlashAttention-2 does."""
    import torch

    gen = torch.cuda.default_generators[device]
    offset = gen.get_offset()
    gen.set_offset(offset + 4)  # Philox offsets advance in steps of 4
    return gen.initial_seed(), offset
