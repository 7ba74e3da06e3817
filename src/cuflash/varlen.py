"""Padded batches and packed sequences: FlashAttention-2's bert_padding helpers.

`unpad_input` turns a padded (batch, seqlen, ...) batch with a key-padding mask into the packed form
that cuflash.flash_attn_varlen_func takes (rows of all sequences concatenated, int32 prefix sums of
their lengths); `pad_input` turns the packed result back.
"""
from __future__ import annotations

from . import _bridge


def _check_device_array(x, name: str) -> str:
    framework = _bridge.framework_of(x)
    if framework not in ("torch", "cupy") or (framework == "torch" and x.device.type != "cuda"):
        raise TypeError(f"{name} must be a PyTorch CUDA tensor or a CuPy array, got {type(x).__module__}."
                        f"{type(x).__name__} (move the data to the GPU first, e.g. cupy.asarray(x))")
    return framework


def unpad_input(hidden_states, attention_mask):
    """(packed, indices, cu_seqlens, max_seqlen) from a padded (batch, seqlen, ...) array and a
    boolean (batch, seqlen) mask of the real tokens (FlashAttention-2's bert_padding.unpad_input).
    PyTorch tensors or CuPy arrays; the lengths are read on the host once (for max_seqlen)."""
    framework = _check_device_array(hidden_states, "hidden_states")
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    if framework == "torch":
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
    if _check_device_array(packed, "packed") == "torch":
        import torch

        out = torch.zeros(shape, dtype=packed.dtype, device=packed.device).index_put((indices,), packed)
    else:
        import cupy

        out = cupy.zeros(shape, dtype=packed.dtype)
        out[indices] = packed
    return out.reshape(batch, seqlen, *packed.shape[1:])
