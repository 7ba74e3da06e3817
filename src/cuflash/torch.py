"""PyTorch autograd for cuflash: the forward and backward as torch.library custom ops with a
registered autograd formula and fake (meta) implementations, so they work under torch.compile and
with torch.autograd.gradcheck-style checks. Imported lazily by cuflash.flash_attn_func.

A block mask travels as its packed kernel lists (an int32 tensor, see cuflash._sparse) plus their
layout as a list of ints, both plain custom-op arguments. The dropout RNG's (seed, offset) comes out of
the forward op as a CPU int64 tensor (drawn inside the op, so torch.compile replays the draw on every
call) and goes into the backward op."""
from __future__ import annotations

from typing import Optional

import torch
from torch.utils import _python_dispatch

from . import _sparse, api


def _lists(lists: Optional[torch.Tensor], layout: Optional[list[int]]):
    return None if lists is None else (lists.data_ptr(), _sparse.PackedLayout.from_ints(layout))


def generator_rng(device: int) -> tuple[int, int]:
    """(seed, offset) for one dropout call from PyTorch's CUDA generator of `device`, which it then
    advances, as FlashAttention-2 does: torch.manual_seed makes runs reproducible."""
    gen = torch.cuda.default_generators[device]
    offset = gen.get_offset()
    gen.set_offset(offset + 4)  # Philox offsets advance in steps of 4
    return gen.initial_seed(), offset


def _rng_out(q: torch.Tensor, dropout_p: float, dropout_seed: Optional[int]):
    """(rng for the kernels, the CPU int64 tensor the op returns)."""
    if not dropout_p:
        return None, torch.zeros(2, dtype=torch.int64)
    rng = (dropout_seed % 2**64, 0) if dropout_seed is not None else generator_rng(q.device.index)
    return rng, torch.tensor([x - 2**64 if x >= 2**63 else x for x in rng], dtype=torch.int64)


def _rng_in(rng: torch.Tensor):
    return tuple(x % 2**64 for x in rng.tolist())


def _fwd_impl(q, k, v, softmax_scale, causal, lists, layout, alibi_slopes, softcap, dropout_p, dropout_seed,
              window_left, window_right):
    rng, rng_tensor = _rng_out(q, dropout_p, dropout_seed)
    out, lse, _ = api.forward_arrays(q, k, v, softmax_scale, causal, lists=_lists(lists, layout),
                                     alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p, rng=rng,
                                     window=(window_left, window_right))
    return out, lse, rng_tensor


def _bwd_impl(dout, q, k, v, out, lse, softmax_scale, causal, lists, layout, alibi_slopes, softcap, dropout_p, rng,
              window_left, window_right):
    return api.backward_arrays(dout, q, k, v, out, lse, softmax_scale, causal, lists=_lists(lists, layout),
                               alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p,
                               rng=_rng_in(rng) if dropout_p else None, window=(window_left, window_right))


@torch.library.custom_op("cuflash::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float, causal: bool,
                   lists: Optional[torch.Tensor], layout: Optional[list[int]],
                   alibi_slopes: Optional[torch.Tensor], softcap: float, dropout_p: float,
                   dropout_seed: Optional[int], window_left: int,
                   window_right: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _fwd_impl(q, k, v, softmax_scale, causal, lists, layout, alibi_slopes, softcap, dropout_p, dropout_seed,
                     window_left, window_right)


@flash_attn_fwd.register_fake
def _(q, k, v, softmax_scale, causal, lists, layout, alibi_slopes, softcap, dropout_p, dropout_seed, window_left,
      window_right):
    batch, seqlen_q, nheads, _ = q.shape
    return (q.new_empty(q.shape), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32),
            torch.empty(2, dtype=torch.int64))


@torch.library.custom_op("cuflash::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, softmax_scale: float, causal: bool, lists: Optional[torch.Tensor],
                   layout: Optional[list[int]],
                   alibi_slopes: Optional[torch.Tensor], softcap: float, dropout_p: float,
                   rng: torch.Tensor, window_left: int,
                   window_right: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(dout, q, k, v, out, lse, softmax_scale, causal, lists, layout, alibi_slopes, softcap, dropout_p,
                     rng, window_left, window_right)


@flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, causal, lists, layout, alibi_slopes, softcap, dropout_p, rng,
      window_left, window_right):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, causal, lists, layout, alibi_slopes, softcap, dropout_p, _seed, *window = inputs
    out, lse, rng = output
    ctx.save_for_backward(q, k, v, out, lse, lists, alibi_slopes, rng)
    ctx.softmax_scale, ctx.causal, ctx.layout, ctx.softcap, ctx.dropout_p = (softmax_scale, causal, layout, softcap,
                                                                             dropout_p)
    ctx.window = window
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
            return (None,) * 13
        q, k, v, out, lse, lists, alibi_slopes, rng = ctx.saved_tensors
        dq, dk, dv = bwd(_kernel_layout(dout), q, k, v, out, lse, ctx.softmax_scale, ctx.causal, lists, ctx.layout,
                         alibi_slopes, ctx.softcap, ctx.dropout_p, rng, *ctx.window)
        return dq, dk, dv, *([None] * 10)
    return backward


flash_attn_fwd.register_autograd(_backward_with(flash_attn_bwd), setup_context=_setup_context)


def _eager_function(name: str, fwd, setup_context, backward):
    """A torch.autograd.Function running fwd and backward directly (see the module docstring). Its
    forward takes ctx itself: a separate setup_context would make every apply() bind the arguments
    through inspect.signature, tens of microseconds."""
    def forward(ctx, *args):
        output = fwd(*args)
        setup_context(ctx, args, output)
        return output
    return type(name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(backward)})


_EagerFlashAttn = _eager_function("_EagerFlashAttn", _fwd_impl, _setup_context, _backward_with(_bwd_impl))


def _eager(*tensors) -> bool:
    """True when plain CUDA tensors are called outside torch.compile, tracing and dispatch modes."""
    return (not torch.compiler.is_compiling() and all(type(t) is torch.Tensor for t in tensors)
            and _python_dispatch._get_current_dispatch_mode() is None)


def flash_attn_func(q, k, v, softmax_scale: float, causal: bool, block_mask=None, alibi_slopes=None,
                    softcap: float = 0.0, dropout_p: float = 0.0, dropout_seed: Optional[int] = None,
                    window: tuple[int, int] = (-1, -1)):
    """(out, lse, rng), differentiable in q, k and v; rng: the dropout's (seed, offset) as a CPU
    int64 tensor; window: the kernels' band (with no block mask)."""
    lists = layout = None
    if block_mask is not None:
        batch, seqlen_q, nheads, _ = q.shape
        seqlen_k, nheads_k = k.shape[1], k.shape[2]
        if nheads_k < 1 or nheads % nheads_k:
            raise ValueError(f"k's nheads ({nheads_k}) must divide q's nheads ({nheads})")
        _sparse.check_mask(block_mask, batch, nheads, seqlen_q, seqlen_k)
        lists, packed = _sparse.device_lists(block_mask, bool(causal), nheads // nheads_k, q.device.index, "torch")
        layout = packed.to_ints()
    op = _EagerFlashAttn.apply if _eager(q, k, v) else flash_attn_fwd
    return op(q, k, v, float(softmax_scale), bool(causal), lists, layout, alibi_slopes, float(softcap),
              float(dropout_p), _int64_seed(dropout_seed), *(int(w) for w in window))


def _int64_seed(seed):
    """A seed in [0, 2^64) as the custom ops' int64 argument (None stays None)."""
    if seed is None:
        return None
    seed = api.check_seed(seed)
    return seed - 2**64 if seed >= 2**63 else seed


# ---- packed variable-length batches (cuflash.varlen) -------------------------------------------

def _varlen_fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, lists,
                     layout, alibi_slopes, softcap, dropout_p, dropout_seed, window_left, window_right):
    from . import varlen

    rng, rng_tensor = _rng_out(q, dropout_p, dropout_seed)
    out, lse = varlen.forward_arrays(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                                     causal, alibi_slopes, softcap, dropout_p, rng, lists=_lists(lists, layout),
                                     window=(window_left, window_right))
    return out, lse, rng_tensor


def _varlen_bwd_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                     causal, lists, layout, alibi_slopes, softcap, dropout_p, rng, window_left, window_right):
    from . import varlen

    return varlen.backward_arrays(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  softmax_scale, causal, alibi_slopes, softcap, dropout_p,
                                  _rng_in(rng) if dropout_p else None, lists=_lists(lists, layout),
                                  window=(window_left, window_right))


@torch.library.custom_op("cuflash::flash_attn_varlen_fwd", mutates_args=())
def flash_attn_varlen_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          cu_seqlens_k: torch.Tensor, max_seqlen_q: int, max_seqlen_k: int, softmax_scale: float,
                          causal: bool, lists: Optional[torch.Tensor], layout: Optional[list[int]],
                          alibi_slopes: Optional[torch.Tensor], softcap: float, dropout_p: float,
                          dropout_seed: Optional[int], window_left: int,
                          window_right: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _varlen_fwd_impl(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
                            lists, layout, alibi_slopes, softcap, dropout_p, dropout_seed, window_left, window_right)


@flash_attn_varlen_fwd.register_fake
def _(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, lists, layout,
      alibi_slopes, softcap, dropout_p, dropout_seed, window_left, window_right):
    return (q.new_empty(q.shape), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32),
            torch.empty(2, dtype=torch.int64))


@torch.library.custom_op("cuflash::flash_attn_varlen_bwd", mutates_args=())
def flash_attn_varlen_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                          lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor, max_seqlen_q: int,
                          max_seqlen_k: int, softmax_scale: float, causal: bool, lists: Optional[torch.Tensor],
                          layout: Optional[list[int]], alibi_slopes: Optional[torch.Tensor], softcap: float,
                          dropout_p: float, rng: torch.Tensor, window_left: int,
                          window_right: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _varlen_bwd_impl(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                            softmax_scale, causal, lists, layout, alibi_slopes, softcap, dropout_p, rng, window_left,
                            window_right)


@flash_attn_varlen_bwd.register_fake
def _(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal,
      lists, layout, alibi_slopes, softcap, dropout_p, rng, window_left, window_right):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _varlen_setup_context(ctx, inputs, output):
    (q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale, causal, lists, layout, alibi_slopes, softcap, dropout_p, _seed,
     *window) = inputs
    out, lse, rng = output
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, lists, alibi_slopes, rng)
    ctx.args = (max_q, max_k, softmax_scale, causal)
    ctx.window = window
    ctx.layout = layout
    ctx.softcap, ctx.dropout_p = softcap, dropout_p
    ctx.mark_non_differentiable(lse, rng)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse and rng


def _varlen_backward_with(bwd):
    def backward(ctx, dout, _dlse, _drng):
        if dout is None:
            return (None,) * 17
        q, k, v, out, lse, cu_q, cu_k, lists, alibi_slopes, rng = ctx.saved_tensors
        dq, dk, dv = bwd(_kernel_layout(dout), q, k, v, out, lse, cu_q, cu_k, *ctx.args, lists, ctx.layout,
                         alibi_slopes, ctx.softcap, ctx.dropout_p, rng, *ctx.window)
        return dq, dk, dv, *([None] * 14)
    return backward


flash_attn_varlen_fwd.register_autograd(_varlen_backward_with(flash_attn_varlen_bwd),
                                        setup_context=_varlen_setup_context)


_EagerFlashAttnVarlen = _eager_function("_EagerFlashAttnVarlen", _varlen_fwd_impl, _varlen_setup_context,
                                        _varlen_backward_with(_varlen_bwd_impl))


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                           softmax_scale: float, causal: bool, alibi_slopes=None, softcap: float = 0.0,
                           dropout_p: float = 0.0, dropout_seed: Optional[int] = None, block_mask=None,
                           window: tuple[int, int] = (-1, -1)):
    """(out, lse, rng) of packed sequences, differentiable in q, k and v; block_mask and window as
    cuflash.varlen's varlen_mask gives them."""
    lists = layout = None
    if block_mask is not None:
        nheads, nheads_k = q.shape[1], k.shape[1]
        if nheads_k < 1 or nheads % nheads_k:
            raise ValueError(f"k's nheads ({nheads_k}) must divide q's nheads ({nheads})")
        _sparse.check_mask(block_mask, cu_seqlens_q.shape[0] - 1, nheads, max_seqlen_q, max_seqlen_k)
        lists, packed = _sparse.device_lists(block_mask, bool(causal), nheads // nheads_k, q.device.index, "torch")
        layout = packed.to_ints()
    op = _EagerFlashAttnVarlen.apply if _eager(q, k, v, cu_seqlens_q, cu_seqlens_k) else flash_attn_varlen_fwd
    return op(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, float(softmax_scale), bool(causal),
              lists, layout, alibi_slopes, float(softcap), float(dropout_p), _int64_seed(dropout_seed),
              *(int(w) for w in window))
