"""PyTorch autograd for cuflash: the forward and backward as torch.library custom ops with a registered
autograd formula and fake (meta) implementations, so they work under torch.compile. Dense and packed
(varlen) calls share the ops: packed ones pass cu_seqlens. Imported lazily by the public functions.

A block mask travels as its packed kernel lists (an int32 tensor, see cuflash._sparse) plus their
layout as a list of ints, both plain custom-op arguments. The dropout RNG's (seed, offset) comes out of
the forward op as a CPU int64 tensor (drawn inside the op, so torch.compile replays the draw on every
call) and goes into the backward op. Gradients of gradients are not supported: a second
differentiation raises (as FlashAttention's does) instead of returning a first-order-only result.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils import _python_dispatch

from . import _arrays, _problem, _score_fn, _sparse


def _lists(lists: Optional[torch.Tensor], layout: Optional[list[int]]):
    return None if lists is None else (lists.data_ptr(), _sparse.PackedLayout.from_ints(layout))


def _packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> dict:
    if cu_seqlens_q is None:
        return dict(cu_seqlens=None, max_seqlen=None)
    return dict(cu_seqlens=(cu_seqlens_q, cu_seqlens_k), max_seqlen=(max_seqlen_q, max_seqlen_k))


def _rng_out(q: torch.Tensor, dropout_p: float, dropout_seed: Optional[int]):
    """(rng for the kernels, the CPU int64 tensor the op returns)."""
    if not dropout_p:
        return None, torch.zeros(2, dtype=torch.int64)
    rng = (dropout_seed % 2**64, 0) if dropout_seed is not None else _arrays.torch_generator_rng(q.device.index)
    return rng, torch.tensor([x - 2**64 if x >= 2**63 else x for x in rng], dtype=torch.int64)


def rng_state(rng: torch.Tensor) -> tuple[int, int]:
    """The (seed, offset) pair of the forward op's rng tensor."""
    return tuple(x % 2**64 for x in rng.tolist())


def _mods(mod_key, mod_arrays, mod_scalars) -> dict:
    """The score and mask functions an op's (key, tensors, scalars: a CPU float64 tensor) stand for
    (_score_fn.flatten)."""
    score_mod, mask_mod = _score_fn.unflatten(mod_key, mod_arrays, _scalar_list(mod_scalars))
    return dict(score_mod=score_mod, mask_mod=mask_mod)


def _scalar_list(mod_scalars) -> list:
    return [] if mod_scalars is None else mod_scalars.tolist()


def _fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, lists, layout,
              alibi_slopes, softcap, dropout_p, dropout_seed, window_left, window_right, deterministic=False,
              mod_key="", mod_arrays=(), mod_scalars=None, sinks=None):
    rng, rng_tensor = _rng_out(q, dropout_p, dropout_seed)
    out, lse = _arrays.forward(q, k, v, softmax_scale=softmax_scale, causal=causal, window=(window_left, window_right),
                               softcap=softcap, dropout_p=dropout_p, rng=rng, alibi_slopes=alibi_slopes,
                               lists=_lists(lists, layout), **_mods(mod_key, mod_arrays, mod_scalars), sinks=sinks,
                               **_packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    return out, lse, rng_tensor


def _bwd_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
              lists, layout, alibi_slopes, softcap, dropout_p, rng, window_left, window_right, deterministic,
              mod_key="", mod_arrays=(), mod_scalars=None, mod_needs=(), sinks_grad=False):
    score_grads = any(mod_needs)
    scores = score_grads and _score_fn.needs_scores(
        _score_fn.capture_grads_plan(mod_key, tuple(mod_needs), tuple(_scalar_list(mod_scalars))))
    grads = _arrays.backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal,
                             window=(window_left, window_right), softcap=softcap, dropout_p=dropout_p,
                             rng=rng_state(rng) if dropout_p else None, alibi_slopes=alibi_slopes,
                             lists=_lists(lists, layout), deterministic=deterministic,
                             **_mods(mod_key, mod_arrays, mod_scalars), score_grads=score_grads, scores=scores,
                             row_sums=sinks_grad, **_packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    dq, dk, dv, *rest = grads
    dmods = []
    if score_grads:
        dscore = rest.pop(0)
        dmods = _score_fn.capture_grads(mod_key, dscore, mod_arrays, _scalar_list(mod_scalars), mod_needs,
                                        rest.pop(0) if scores else None)
    return [dq, dk, dv, *(g for g in dmods if g is not None), *rest]  # (rest: rowsum(P dP) with sinks_grad)


@torch.library.custom_op("cuflash::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                   cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                   causal: bool, lists: Optional[torch.Tensor], layout: Optional[list[int]],
                   alibi_slopes: Optional[torch.Tensor], softcap: float, dropout_p: float,
                   dropout_seed: Optional[int], window_left: int, window_right: int,
                   deterministic: bool, mod_key: str, mod_arrays: list[torch.Tensor],
                   mod_scalars: Optional[torch.Tensor], sinks: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, lists,
                     layout, alibi_slopes, softcap, dropout_p, dropout_seed, window_left, window_right, deterministic,
                     mod_key, mod_arrays, mod_scalars, sinks)


@flash_attn_fwd.register_fake
def _(q, k, v, cu_seqlens_q, *_):
    if cu_seqlens_q is None:
        lse_shape = (q.shape[0], q.shape[2], q.shape[1])  # (batch, nheads, seqlen_q)
    else:
        lse_shape = (q.shape[1], q.shape[0])  # (nheads, total_q)
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32), torch.empty(2, dtype=torch.int64)


@torch.library.custom_op("cuflash::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor], cu_seqlens_k: Optional[torch.Tensor],
                   max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float, causal: bool,
                   lists: Optional[torch.Tensor], layout: Optional[list[int]], alibi_slopes: Optional[torch.Tensor],
                   softcap: float, dropout_p: float, rng: torch.Tensor, window_left: int, window_right: int,
                   deterministic: bool, mod_key: str, mod_arrays: list[torch.Tensor],
                   mod_scalars: Optional[torch.Tensor], mod_needs: list[bool], sinks_grad: bool) -> list[torch.Tensor]:
    """[dq, dk, dv, then the gradients of the captured arrays that mod_needs marks, in order, then with
    sinks_grad rowsum(P * dP) shaped as lse]."""
    return _bwd_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                     causal, lists, layout, alibi_slopes, softcap, dropout_p, rng, window_left, window_right,
                     deterministic, mod_key, mod_arrays, mod_scalars, mod_needs, sinks_grad)


@flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, *rest):
    mod_arrays, mod_needs, sinks_grad = rest[-4], rest[-2], rest[-1]
    return [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape),
            *(a.new_empty(a.shape) for a, need in zip(mod_arrays, mod_needs) if need),
            *([lse.new_empty(lse.shape)] if sinks_grad else [])]


def _no_double_backward(ctx, *grads):
    raise RuntimeError("cuflash: gradients of gradients (torch.autograd.grad(..., create_graph=True) followed by a "
                       "second differentiation) are not supported by flash_attn_func; FlashAttention's backward "
                       "is first order only")


def _bwd_setup_context(ctx, inputs, output):
    pass


flash_attn_bwd.register_autograd(_no_double_backward, setup_context=_bwd_setup_context)

def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, lists, layout, alibi_slopes, softcap, dropout_p, _seed,
     window_left, window_right, deterministic, mod_key, mod_arrays, mod_scalars, sinks) = inputs
    out, lse, rng = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, lists, alibi_slopes, rng, sinks, mod_scalars, *mod_arrays)
    ctx.mod_needs = [t.requires_grad for t in mod_arrays]
    ctx.args = dict(max_seqlen_q=max_q, max_seqlen_k=max_k, softmax_scale=softmax_scale, causal=causal,
                    layout=layout, softcap=softcap, dropout_p=dropout_p, window_left=window_left,
                    window_right=window_right, deterministic=deterministic, mod_key=mod_key)
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(lse, rng)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse and rng


def _kernel_layout(dout: torch.Tensor) -> torch.Tensor:
    """dout as the kernels read it: contiguous last dimension, 16-byte aligned rows."""
    if dout.stride(-1) != 1 or any(s % 8 for s in dout.stride()[:-1]):
        dout = dout.contiguous()
    return dout


def _backward_with(bwd, list_grads: bool):
    """The backward through `bwd`; list_grads: the captured arrays' input (a list) gets a list of gradients
    (the op's autograd, whose structure torch.compile checks), else None (an autograd.Function's
    non-tensor input, whose captures never need gradients)."""
    def backward(ctx, dout, _dlse, _drng):
        if dout is None:  # out took no part in what is differentiated
            return (None,) * ctx.n_inputs
        q, k, v, out, lse, cu_q, cu_k, lists, alibi_slopes, rng, sinks, mod_scalars, *mod_arrays = ctx.saved_tensors
        a = ctx.args
        dq, dk, dv, *grads = bwd(_kernel_layout(dout), q, k, v, out, lse, cu_q, cu_k, a["max_seqlen_q"],
                                 a["max_seqlen_k"], a["softmax_scale"], a["causal"], lists, a["layout"], alibi_slopes,
                                 a["softcap"], a["dropout_p"], rng, a["window_left"], a["window_right"],
                                 a["deterministic"], a["mod_key"], mod_arrays, mod_scalars, ctx.mod_needs,
                                 ctx.needs_input_grad[-1])
        dsinks = _sinks_grad(lse, sinks, grads.pop(), cu_q is not None) if ctx.needs_input_grad[-1] else None
        grads = iter(grads)
        dmods = [next(grads) if need else None for need in ctx.mod_needs] if list_grads else None
        return (dq, dk, dv) + (None,) * (ctx.n_inputs - 6) + (dmods, None, dsinks)
    return backward


def _sinks_grad(lse, sinks, dpsum, packed: bool):
    """d(loss)/d(sink_h) = -sum over rows of P_sink * delta, P_sink = e^(sink - LSE') the sink's probability and
    delta = rowsum(P * dP) over the keys (the sink has no value), from the dQ kernel in fp32 (rowsum(dO * O)
    would read the rounded output), shaped as lse; summed by torch (fixed order)."""
    p_sink = torch.exp(sinks.view(-1, 1) - lse) if packed else torch.exp(sinks.view(1, -1, 1) - lse)
    grad = -(p_sink * dpsum)
    return (grad.sum(1) if packed else grad.sum((0, 2))).to(sinks.dtype)


flash_attn_fwd.register_autograd(_backward_with(flash_attn_bwd, True), setup_context=_setup_context)


def _eager_bwd(*args):
    """The backward outside torch.compile: the kernels directly, or through the op (whose own backward
    raises) when the caller asked for a graph of the gradients."""
    return flash_attn_bwd(*args) if torch.is_grad_enabled() else _bwd_impl(*args)


def _eager_function(name: str, fwd, setup_context, backward):
    """A torch.autograd.Function running fwd and backward directly. Its forward takes ctx itself: a separate
    setup_context would make every apply() bind the arguments through inspect.signature, tens of
    microseconds."""
    def forward(ctx, *args):
        output = fwd(*args)
        setup_context(ctx, args, output)
        return output
    methods = {"forward": staticmethod(forward), "backward": staticmethod(backward)}
    return type(name, (torch.autograd.Function,), methods)


_EagerFlashAttn = _eager_function("_EagerFlashAttn", _fwd_impl, _setup_context, _backward_with(_eager_bwd, False))


def _eager(*tensors) -> bool:
    """True when plain CUDA tensors are called outside torch.compile, tracing and dispatch modes."""
    return (not torch.compiler.is_compiling() and all(type(t) is torch.Tensor for t in tensors)
            and _python_dispatch._get_current_dispatch_mode() is None)


def attention(q, k, v, *, softmax_scale=None, causal: bool = False, window=(-1, -1), softcap=0.0, dropout_p=0.0,
              dropout_seed=None, alibi_slopes=None, block_mask=None, cu_seqlens=None, max_seqlen=None,
              deterministic: bool = False, score_mod=None, mask_mod=None, sinks=None):
    """(out, lse, rng), differentiable in q, k and v; rng: the dropout's (seed, offset) as a CPU int64 tensor;
    window: the kernels' band (a block mask holds any window itself); packed sequences with cu_seqlens =
    (cu_seqlens_q, cu_seqlens_k) and max_seqlen = (max_seqlen_q, max_seqlen_k)."""
    packed = cu_seqlens is not None
    others = [(k, "k"), (v, "v"), (alibi_slopes, "alibi_slopes")]
    others += list(zip(cu_seqlens, ("cu_seqlens_q", "cu_seqlens_k"))) if packed else []
    for x, name in others:
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a PyTorch tensor like q, got {type(x).__module__}.{type(x).__name__}")
    lists = layout = None
    if block_mask is not None:
        batch = cu_seqlens[0].shape[0] - 1 if packed else q.shape[0]
        seqlen_q, seqlen_k = max_seqlen if packed else (q.shape[1], k.shape[1])
        nheads, nheads_k = q.shape[-2], k.shape[-2]
        if nheads_k < 1 or nheads % nheads_k:
            raise ValueError(f"k's nheads ({nheads_k}) must divide q's nheads ({nheads})")
        lists, buffer_layout = _sparse.device_mask(block_mask, causal, batch, nheads, nheads_k, seqlen_q, seqlen_k,
                                                   q.device.index, "torch")
        layout = buffer_layout.to_ints()
    cu_q, cu_k = cu_seqlens if packed else (None, None)
    max_q, max_k = max_seqlen if packed else (0, 0)
    mod_key, mod_arrays, mod_scalars = _score_fn.flatten(score_mod, mask_mod, _register_mods)
    for x in mod_arrays:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"score_mod/mask_mod: captured arrays must be PyTorch tensors like q, got {type(x).__name__}")
    if torch.is_grad_enabled() and any(x.requires_grad for x in mod_arrays):  # refuses what it cannot differentiate
        _plan_capture_grads(mod_key, tuple(x.requires_grad for x in mod_arrays), tuple(mod_scalars))
    if sinks is not None and not isinstance(sinks, torch.Tensor):
        raise TypeError(f"sinks must be a PyTorch tensor like q, got {type(sinks).__module__}.{type(sinks).__name__}")
    # (The eager autograd.Function sees no tensor inside a list: captured tensors that need gradients take the op.)
    eager = _eager(q, k, v, *([sinks] if sinks is not None else [])) and not any(x.requires_grad for x in mod_arrays)
    op = _EagerFlashAttn.apply if eager else flash_attn_fwd
    return op(q, k, v, cu_q, cu_k, max_q, max_k, _problem.resolve_scale(softmax_scale, q.shape[-1]), causal, lists,
              layout, alibi_slopes, _problem.resolve_softcap(softcap), float(dropout_p), _int64_seed(dropout_seed),
              *(int(w) for w in window), bool(deterministic), mod_key, mod_arrays,
              torch.tensor(mod_scalars, dtype=torch.float64) if mod_key else None, sinks)


# Pure functions of strings and numbers, which torch.compile runs once while tracing (hashing and regular
# expressions inside them are not traceable) and keeps their results.
_register_mods = torch.compiler.assume_constant_result(_score_fn.register)
_plan_capture_grads = torch.compiler.assume_constant_result(_score_fn.capture_grads_plan)



def _int64_seed(seed):
    """A seed in [0, 2^64) as the custom ops' int64 argument (None stays None)."""
    if seed is None:
        return None
    seed = _problem.check_seed(seed)
    return seed - 2**64 if seed >= 2**63 else seed
