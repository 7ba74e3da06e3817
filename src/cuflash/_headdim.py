"""Head dims that are not a multiple of 8: the kernels read 16-byte chunks, so q, k, v (and, for
the explicit backward, dout and out) are zero-padded on the last dimension to the next multiple of 8
and the results sliced back, as FlashAttention-2 does. Zero columns change no score, so results are
exact; dims that are already a multiple of 8 are never copied."""
from __future__ import annotations

from ._bridge import framework_of


def needs_padding(*arrays, ndim: int = 4) -> int:
    """The padded head dim when every array has `ndim` dimensions and one last dim d, 0 < d < 256,
    d % 8 != 0; else 0 (and argument checking proceeds on the arrays as given)."""
    dims = {tuple(getattr(x, "shape", ()))[-1:] for x in arrays}
    if any(len(getattr(x, "shape", ())) != ndim for x in arrays) or len(dims) != 1:
        return 0
    (d,) = dims.pop()
    return -(-d // 8) * 8 if 0 < d < 256 and d % 8 else 0


def pad(x, to: int):
    """x zero-padded on its last dimension to `to`, in x's own framework (differentiable in torch and
    JAX, so autograd slices the gradients back)."""
    extra = to - x.shape[-1]
    fw = framework_of(x)
    if fw == "torch":
        import torch.nn.functional as F

        return F.pad(x, (0, extra))
    if fw == "jax":
        import jax.numpy as jnp

        return jnp.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, extra),))
    import cupy

    x = cupy.from_dlpack(x) if fw == "dlpack" else x
    if fw not in ("cupy", "dlpack"):
        return x  # not a CUDA array: the argument checks will say so
    return cupy.pad(x, ((0, 0),) * (x.ndim - 1) + ((0, extra),))


def unpad(x, d: int):
    return x[..., :d]
