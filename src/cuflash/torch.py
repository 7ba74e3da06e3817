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

from . import _arrays, _problem, _sparse


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


def _fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, lists, layout,
              alibi_slopes, softcap, dropout_p, dropout_seed, window_left, window_right, deterministic=False):
    rng, rng_tensor = _rng_out(q, dropout_p, dropout_seed)
    out, lse = _arrays.forward(q, k, v, softmax_scale=softmax_scale, causal=causal, window=(window_left, window_right),
                               softcap=softcap, dropout_p=dropout_p, rng=rng, alibi_slopes=alibi_slopes,
                               lists=_lists(lists, layout),
                               **_packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))
    return out, lse, rng_tensor


def _bwd_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
              lists, layout, alibi_slopes, softcap, dropout_p, rng, window_left, window_right, deterministic):
    return _arrays.backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal,
                            window=(window_left, window_right), softcap=softcap, dropout_p=dropout_p,
                            rng=rng_state(rng) if dropout_p else None, alibi_slopes=alibi_slopes,
                            lists=_lists(lists, layout), deterministic=deterministic,
                            **_packed(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k))


@torch.library.custom_op("cuflash::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: Optional[torch.Tensor],
                   cu_seqlens_k: Optional[torch.Tensor], max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                   causal: bool, lists: Optional[torch.Tensor], layout: Optional[list[int]],
                   alibi_slopes: Optional[torch.Tensor], softcap: float, dropout_p: float,
                   dropout_seed: Optional[int], window_left: int, window_right: int,
                   deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, lists,
                     layout, alibi_slopes, softcap, dropout_p, dropout_seed, window_left, window_right)


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
                   deterministic: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                     causal, lists, layout, alibi_slopes, softcap, dropout_p, rng, window_left, window_right,
                     deterministic)


@flash_attn_bwd.register_fake
def _(dout, q, k, v, *_):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _no_double_backward(ctx, *grads):
    raise RuntimeError("cuflash: gradients of gradients (torch.autograd.grad(..., create_graph=True) followed by a "
                       "second differentiation) are not supported by flash_attn_func; FlashAttention's backward "
                       "is first order only")


def _bwd_setup_context(ctx, inputs, output):
    pass


flash_attn_bwd.register_autograd(_no_double_backward, setup_context=_bwd_setup_context)

def _setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, lists, layout, alibi_slopes, softcap, dropout_p, _seed,
     window_left, window_right, deterministic) = inputs
    out, lse, rng = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, lists, alibi_slopes, rng)
    ctx.args = dict(max_seqlen_q=max_q, max_seqlen_k=max_k, softmax_scale=softmax_scale, causal=causal,
                    layout=layout, softcap=softcap, dropout_p=dropout_p, window_left=window_left,
                    window_right=window_right, deterministic=deterministic)
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(lse, rng)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse and rng


def _kernel_layout(dout: torch.Tensor) -> torch.Tensor:
    """dout as the kernels read it: contiguous last dimension, 16-byte aligned rows."""
    if dout.stride(-1) != 1 or any(s % 8 for s in dout.stride()[:-1]):
        dout = dout.contiguous()
    return dout


def _backward_with(bwd):
    def backward(ctx, dout, _dlse, _drng):
        if dout is None:  # out took no part in what is differentiated
            return (None,) * ctx.n_inputs
        q, k, v, out, lse, cu_q, cu_k, lists, alibi_slopes, rng = ctx.saved_tensors
        a = ctx.args
        dq, dk, dv = bwd(_kernel_layout(dout), q, k, v, out, lse, cu_q, cu_k, a["max_seqlen_q"], a["max_seqlen_k"],
                         a["softmax_scale"], a["causal"], lists, a["layout"], alibi_slopes, a["softcap"],
                         a["dropout_p"], rng, a["window_left"], a["window_right"], a["deterministic"])
        return (dq, dk, dv) + (None,) * (ctx.n_inputs - 3)
    return backward


flash_attn_fwd.register_autograd(_backward_with(flash_attn_bwd), setup_context=_setup_context)


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


_EagerFlashAttn = _eager_function("_EagerFlashAttn", _fwd_impl, _setup_context, _backward_with(_eager_bwd))


def _eager(*tensors) -> bool:
    """True when plain CUDA tensors are called outside torch.compile, tracing and dispatch modes."""
    return (not torch.compiler.is_compiling() and all(type(t) is torch.Tensor for t in tensors)
            and _python_dispatch._get_current_dispatch_mode() is None)


def attention(q, k, v, *, softmax_scale=None, causal: bool = False, window=(-1, -1), softcap=0.0, dropout_p=0.0,
              dropout_seed=None, alibi_slopes=None, block_mask=None, cu_seqlens=None, max_seqlen=None,
              deterministic: bool = False):
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
    op = _EagerFlashAttn.apply if _eager(q, k, v) else flash_attn_fwd
    return op(q, k, v, cu_q, cu_k, max_q, max_k, _problem.resolve_scale(softmax_scale, q.shape[-1]), causal, lists,
              layout, alibi_slopes, _problem.resolve_softcap(softcap), float(dropout_p), _int64_seed(dropout_seed),
              *(int(w) for w in window), bool(deterministic))


def _int64_seed(seed):
    """A seed in [0, 2^64) as the custom ops' int64 argument (None stays None)."""
    if seed is None:
        return None
    seed = _problem.check_seed(seed)
    return seed - 2**64 if seed >= 2**63 else seed
