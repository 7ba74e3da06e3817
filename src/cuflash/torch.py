"""PyTorch autograd for cuflash: the forward and backward as torch.library custom ops with a
registered autograd formula and fake (meta) implementations, so they work under torch.compile and
with torch.autograd.gradcheck-style checks. Imported lazily by cuflash.flash_attn_func."""
from __future__ import annotations

import torch

from . import api


@torch.library.custom_op("cuflash::flash_attn_fwd", mutates_args=())
def flash_attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale: float,
                   causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse, _ = api.forward_arrays(q, k, v, softmax_scale, causal)
    return out, lse


@flash_attn_fwd.register_fake
def _(q, k, v, softmax_scale, causal):
    batch, seqlen_q, nheads, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((batch, nheads, seqlen_q), dtype=torch.float32)


@torch.library.custom_op("cuflash::flash_attn_bwd", mutates_args=())
def flash_attn_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, softmax_scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return api.flash_attn_backward(dout, q, k, v, out, lse, softmax_scale=softmax_scale, causal=causal)


@flash_attn_bwd.register_fake
def _(dout, q, k, v, out, lse, softmax_scale, causal):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, softmax_scale, causal = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.softmax_scale, ctx.causal = softmax_scale, causal
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, _dlse):
    q, k, v, out, lse = ctx.saved_tensors
    if dout.stride(-1) != 1 or any(s % 8 for s in dout.stride()[:-1]):
        dout = dout.contiguous()
    dq, dk, dv = flash_attn_bwd(dout, q, k, v, out, lse, ctx.softmax_scale, ctx.causal)
    return dq, dk, dv, None, None


flash_attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def flash_attn_func(q, k, v, softmax_scale: float, causal: bool):
    """(out, lse), differentiable in q, k and v."""
    return flash_attn_fwd(q, k, v, float(softmax_scale), bool(causal))
