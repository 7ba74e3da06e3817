"""Head dims the kernels do not take as they are: the kernels read 16-byte chunks and one head dim for
q, k and v, so q, k, v (and, for the explicit backward, dout and out) are zero-padded on the last
dimension to the next multiple of 8 of the larger of q's and v's head dims (v's may differ: dqk != dv, as
in MLA's 192/128) and the results sliced back, as FlashAttention-2 does for the first. Zero columns of q
and k change no score and zero columns of v give output columns that are sliced off, so results are
exact; arrays already at that dim are never copied (the cost of dqk != dv: the wider dim's kernels)."""
from __future__ import annotations

from ._bridge import framework_of


def needs_padding(q, k, v, *like_v, ndim: int = 4) -> int:
    """The head dim every array is padded to, when every array has `ndim` dimensions, q and k one last
    dim dqk, v and like_v (dout, out) one last dim dv, both from 1 to 256, and some array is not at the
    next multiple of 8 of the larger; else 0 (and argument checking proceeds on the arrays as given)."""
    arrays = (q, k, v, *like_v)
    if any(len(getattr(x, "shape", ())) != ndim for x in arrays):
        return 0
    dqk, dv = {q.shape[-1], k.shape[-1]}, {x.shape[-1] for x in (v, *like_v)}
    if len(dqk) != 1 or len(dv) != 1:
        return 0
    dims = (dqk.pop(), dv.pop())
    to = -(-max(dims) // 8) * 8
    return to if all(0 < d <= 256 for d in dims) and any(d != to for d in dims) else 0


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
