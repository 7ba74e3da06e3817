"""One attention call, described and validated once.

`Problem` is a frozen description of a call (shapes, dtype, scale, band, score modifications,
dropout, block mask, packed sequences) built from the arguments' metadata (DeviceArray: CuPy,
PyTorch, DLPack, or JAX arrays and tracers), so every framework goes through the same checks and
every layer below takes the same object. A dense batch is a packed one without offsets: packed
arrays are seen as (batch, max_seqlen, heads, dim) with batch stride 0 (`batched`), one path to the
kernels. Errors are ValueError or TypeError naming the argument, raised before anything is launched.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import _score_fn, _sparse
from ._bridge import DeviceArray, contiguous_strides
from ._options import Options
from ._tiles import CAUSAL, DTYPES, MAX_HEAD_DIM, NO_BAND, WINDOW, Flags, dq_accumulation_pays, short_keys


@dataclass(frozen=True)
class Problem:
    batch: int
    seqlen_q: int  # the longest sequence for packed batches
    seqlen_k: int
    nheads: int
    nheads_k: int
    head_dim: int
    dtype: str
    softmax_scale: float
    softcap: float = 0.0  # 0: off
    dropout_p: float = 0.0  # 0: off
    causal: bool = False
    window: tuple[int, int] = (-1, -1)  # FlashAttention-2's window_size; -1: unbounded on that side
    alibi_sb: int | None = None  # ALiBi slopes' batch stride (0: shared by the batch); None: no ALiBi
    mask_blocks: tuple[int, int] | None = None  # (block_m, block_n) of a block mask
    packed: tuple[int, int] | None = None  # (total_q, total_k) rows of packed sequences; None: dense
    mod: str = ""  # the digest of the user's score and mask functions (_score_fn.py); "": none

    @property
    def alibi(self) -> bool:
        return self.alibi_sb is not None

    @property
    def band(self) -> int:
        """The kernels' band (kernels/band.cuh): NO_BAND, CAUSAL (left unbounded, right 0) or WINDOW."""
        if self.window[0] == -1 and (self.causal or self.window[1] == -1):
            return CAUSAL if self.causal else NO_BAND
        return WINDOW

    def band_args(self) -> tuple[int, int]:
        """The kernels' (window_left, window_right): query i sees key j iff i + d - left <= j <= i + d +
        right, d = seqlen_k - seqlen_q. Causal caps right at 0; an unbounded side is seqlen_q + seqlen_k."""
        unbounded = self.seqlen_q + self.seqlen_k
        left, right = (unbounded if w < 0 else min(w, unbounded) for w in self.window)
        return left, min(right, 0) if self.causal else right

    def kernel_scales(self) -> tuple[float, float]:
        """(softmax scale, softcap multiplier) as the kernels take them: with a softcap the kernels
        compute tanh(Q Kᵀ * scale / cap) and run the softmax with scale cap; with a score function, which
        takes the scale itself (kernels/score_fn.cuh ModArgs), on the function's values with scale 1."""
        if self.mod:
            return 1.0, 0.0
        if self.softcap:
            return self.softcap, self.softmax_scale / self.softcap
        return self.softmax_scale, 0.0

    def flags(self, options: Options) -> Flags:
        """What the tile policy needs to know of this call (a block mask holds causal and any window)."""
        return Flags(NO_BAND if self.mask_blocks else self.band, self.mask_blocks, self.alibi, self.softcap > 0,
                     self.dropout_p > 0, short_keys(self.dtype, self.head_dim, self.seqlen_k, options),
                     options.fused_dq_short or dq_accumulation_pays(self.band, self.seqlen_q, self.nheads // self.nheads_k),
                     mod=self.mod, mod_grad=bool(self.mod) and self.mod not in _score_fn.UNIT_GRAD)

    @property
    def empty(self) -> bool:
        return self.batch * self.nheads * self.seqlen_q == 0

    # shapes of the arrays the call takes and returns
    @property
    def q_shape(self) -> tuple[int, ...]:
        if self.packed:
            return self.packed[0], self.nheads, self.head_dim
        return self.batch, self.seqlen_q, self.nheads, self.head_dim

    @property
    def k_shape(self) -> tuple[int, ...]:
        if self.packed:
            return self.packed[1], self.nheads_k, self.head_dim
        return self.batch, self.seqlen_k, self.nheads_k, self.head_dim

    @property
    def dscore_shape(self) -> tuple[int, ...]:
        """dS with respect to a score function's value: (batch, nheads, seqlen_q, seqlen_k), per sequence of a
        packed batch (its longest lengths)."""
        return self.batch, self.nheads, self.seqlen_q, self.seqlen_k

    @property
    def lse_shape(self) -> tuple[int, ...]:
        """The log-sum-exp: (batch, nheads, seqlen_q), or (nheads, total_q) for packed sequences, as in
        FlashAttention-2."""
        return (self.nheads, self.packed[0]) if self.packed else (self.batch, self.nheads, self.seqlen_q)

    def batched(self, a: DeviceArray, kind: str = "q") -> DeviceArray:
        """A q-like ("q") or k-like ("k") array as the kernels see it: packed arrays as (batch, max_seqlen,
        heads, dim) with batch stride 0 (the kernels add each sequence's start row themselves)."""
        if not self.packed:
            return a
        seqlen = self.seqlen_q if kind == "q" else self.seqlen_k
        return DeviceArray(a.ptr, (self.batch, seqlen, *a.shape[1:]), (0, *a.strides), a.dtype, a.device,
                           a.framework, a.obj)


# ---- scalar arguments ----------------------------------------------------------------------------

def check_dropout(dropout_p) -> float:
    """dropout_p as a float in [0, 1)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0 <= dropout_p < 1:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def check_seed(seed, name: str = "dropout_seed") -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise TypeError(f"{name} must be an int in [0, 2^64), got {seed!r}")
    return seed


def resolve_scale(softmax_scale, head_dim: int) -> float:
    """softmax_scale, or 1/sqrt(head_dim) when None."""
    if softmax_scale is None:
        return 1.0 / math.sqrt(head_dim) if head_dim else 1.0
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {type(softmax_scale).__name__}")
    if not (math.isfinite(softmax_scale) and softmax_scale > 0):
        raise ValueError(f"softmax_scale must be a finite positive number (the kernels take row maxima of unscaled "
                         f"scores; for a negative scale, negate q), got {softmax_scale}")
    return float(softmax_scale)


def resolve_softcap(softcap) -> float:
    """softcap as a float >= 0 (0: off)."""
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be a float, got {type(softcap).__name__}")
    if not (math.isfinite(softcap) and softcap >= 0):
        raise ValueError(f"softcap must be a finite number >= 0 (0: off), got {softcap}")
    return float(softcap)


def check_offsets(cu_q, cu_k, total_q: int, total_k: int, max_seqlen_q, max_seqlen_k) -> None:
    """Packed sequences' offsets (read on the host) against the arrays' rows and the max_seqlen values."""
    for cu, total, most, name, rows in ((cu_q, total_q, max_seqlen_q, "q", "q"),
                                        (cu_k, total_k, max_seqlen_k, "k", "k and v")):
        if not cu or cu[0] < 0:
            raise ValueError(f"cu_seqlens_{name} must start at an offset >= 0, got {cu[:1]}")
        for b, (start, end) in enumerate(zip(cu, cu[1:])):
            if end < start:
                raise ValueError(f"cu_seqlens_{name} must not decrease: entry {b + 1} ({end}) is below entry {b} "
                                 f"({start})")
            if end - start > most:
                raise ValueError(f"cu_seqlens_{name} holds a sequence of {end - start} tokens (sequence {b}), "
                                 f"longer than max_seqlen_{name} = {most}")
        if cu[-1] > total:
            raise ValueError(f"cu_seqlens_{name} ends at row {cu[-1]}, past the {total} rows of {rows}")


def check_flag(value, name: str) -> bool:
    """A flag as a bool (a NumPy bool too): a string or a number is a mistake, not a truth value."""
    if not isinstance(value, bool) and type(value).__name__ != "bool_":
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return bool(value)


def check_causal(causal) -> bool:
    return check_flag(causal, "causal")


def check_max_seqlen(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return value


# ---- arrays --------------------------------------------------------------------------------------

def _check_qkv(q: DeviceArray, k: DeviceArray, v: DeviceArray) -> None:
    """q, k, v as the kernels read them: (batch, seqlen, heads, dim) views (packed arrays batched)."""
    for a, name in ((q, "q"), (k, "k"), (v, "v")):
        if a.device is None:
            raise TypeError(f"{name} must be on a CUDA device, got a {a.framework} array in host memory")
        if a.dtype not in DTYPES:
            raise TypeError(f"{name}.dtype must be float16, bfloat16 or float32, got {a.dtype}")
    if not (q.framework == k.framework == v.framework):
        raise TypeError(f"q, k, v must come from one framework, got {q.framework}, {k.framework}, {v.framework}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got cuda:{q.device}, cuda:{k.device}, cuda:{v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    batch, _, nheads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"k must have shape (batch={batch}, seqlen_k, nheads_k, headdim={head_dim}), got {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {k.shape} (a head dim of its own up to {MAX_HEAD_DIM}), got "
                         f"{v.shape}")
    nheads_k = k.shape[2]
    if nheads_k < 1 or nheads % nheads_k:
        raise ValueError(f"k's nheads ({nheads_k}) must divide q's nheads ({nheads})")
    if head_dim % 8 or not 8 <= head_dim <= MAX_HEAD_DIM:  # the public functions pad other dims first
        raise ValueError(f"headdim must be from 1 to {MAX_HEAD_DIM} (the kernels take multiples of 8), got {head_dim}")
    for a, name in ((q, "q"), (k, "k"), (v, "v")):
        _check_rows(a, name)


def _check_rows(a: DeviceArray, name: str) -> None:
    if a.strides[3] != 1 and a.shape[3] != 1:
        raise ValueError(f"{name}'s last dimension must be contiguous (stride 1), got strides {a.strides}")
    if any(s % 8 for s in a.strides[:3]) or a.ptr % 16:
        raise ValueError(f"{name} must be 16-byte aligned: its address and its batch, seqlen and head strides must "
                         f"be multiples of 8 elements, got strides {a.strides}")


def _check_ndim(arrays, ndim: int) -> None:
    layout = "(batch, seqlen, nheads, headdim)" if ndim == 4 else "(total_tokens, nheads, headdim)"
    for a, name in arrays:
        if a.ndim != ndim:
            raise ValueError(f"{name} must have {ndim} dimensions {layout}, got shape {a.shape}")


def _check_cu_seqlens(cu_q: DeviceArray, cu_k: DeviceArray, q: DeviceArray) -> None:
    for a, name in ((cu_q, "cu_seqlens_q"), (cu_k, "cu_seqlens_k")):
        if a.dtype != "int32" or a.ndim != 1 or a.shape[0] < 2 or a.strides[0] != 1:
            raise ValueError(f"{name} must be a contiguous int32 array of batch + 1 >= 2 offsets, got {a.dtype} "
                             f"{a.shape}")
        if a.framework != q.framework or a.device != q.device:
            raise ValueError(f"{name} must be a {q.framework} array on cuda:{q.device} like q")
    if cu_q.shape != cu_k.shape:
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must have one length (batch + 1), got {cu_q.shape[0]} "
                         f"and {cu_k.shape[0]}")


def _check_float32_beside_q(a: DeviceArray, q: DeviceArray, name: str) -> None:
    """A float32 array on q's device and framework (ALiBi slopes, sinks)."""
    if a.device is None:
        raise TypeError(f"{name} must be on a CUDA device, got a {a.framework} array in host memory")
    if a.framework != q.framework or a.device != q.device:
        raise ValueError(f"{name} must be a {q.framework} array on cuda:{q.device} like q")
    if a.dtype != "float32":
        raise TypeError(f"{name}.dtype must be float32, got {a.dtype}")


def check_alibi(alibi: DeviceArray, q: DeviceArray, batch: int, nheads: int) -> int:
    """Validate float32 ALiBi slopes of shape (nheads,) or (batch, nheads); their batch stride."""
    _check_float32_beside_q(alibi, q, "alibi_slopes")
    if alibi.shape not in ((nheads,), (batch, nheads)):
        raise ValueError(f"alibi_slopes must have shape (nheads,) = ({nheads},) or (batch, nheads) = "
                         f"({batch}, {nheads}), got {alibi.shape}")
    if alibi.strides[-1] != 1 and nheads > 1:
        raise ValueError(f"alibi_slopes' last dimension must be contiguous, got strides {alibi.strides}")
    return alibi.strides[0] if alibi.ndim == 2 and batch > 1 else 0


def check_sinks(sinks: DeviceArray, q: DeviceArray, nheads: int) -> None:
    """Validate float32 sink logits of shape (nheads,), contiguous, on q's device."""
    _check_float32_beside_q(sinks, q, "sinks")
    if sinks.shape != (nheads,) or (nheads > 1 and sinks.strides != (1,)):
        raise ValueError(f"sinks must be a contiguous (nheads,) = ({nheads},) array, got shape {sinks.shape} "
                         f"strides {sinks.strides}")


def build(q: DeviceArray, k: DeviceArray, v: DeviceArray, *, softmax_scale=None, softcap=0.0, dropout_p=0.0,
          causal=False, window=(-1, -1), alibi: DeviceArray | None = None, block_mask=None,
          mask_blocks: tuple[int, int] | None = None, cu_seqlens: tuple[DeviceArray, DeviceArray] | None = None,
          max_seqlen: tuple[int, int] | None = None, score_fn=None) -> Problem:
    """The Problem of a call, validated. Dense: q (batch, seqlen_q, nheads, d), k and v (batch, seqlen_k,
    nheads_k, d). Packed: q (total_q, nheads, d), k and v (total_k, nheads_k, d), with cu_seqlens =
    (cu_seqlens_q, cu_seqlens_k) and max_seqlen = (max_seqlen_q, max_seqlen_k). window is the kernels' band
    (a block mask's window is inside the mask); block_mask a cuflash.BlockMask, or mask_blocks its (block_m,
    block_n) where it was checked and put on the device already; score_fn a _score_fn.ScoreFn."""
    if cu_seqlens is None:
        _check_ndim(((q, "q"), (k, "k"), (v, "v")), 4)
        packed, qb, kb, vb = None, q, k, v
    else:
        _check_ndim(((q, "q"), (k, "k"), (v, "v")), 3)
        _check_cu_seqlens(*cu_seqlens, q)
        max_q, max_k = (check_max_seqlen(m, n) for m, n in zip(max_seqlen, ("max_seqlen_q", "max_seqlen_k")))
        batch = cu_seqlens[0].shape[0] - 1
        packed = (q.shape[0], k.shape[0])
        shell = Problem(batch, max_q, max_k, 0, 0, 0, "", 0.0, packed=packed)
        qb, kb, vb = shell.batched(q, "q"), shell.batched(k, "k"), shell.batched(v, "k")
    _check_qkv(qb, kb, vb)
    causal = check_causal(causal)
    batch, seqlen_q, nheads, head_dim = qb.shape
    seqlen_k, nheads_k = kb.shape[1], kb.shape[2]
    alibi_sb = None if alibi is None else check_alibi(alibi, q, batch, nheads)
    if block_mask is not None:
        _sparse.check_mask(block_mask, batch, nheads, seqlen_q, seqlen_k)
        mask_blocks = (block_mask.block_m, block_mask.block_n)
    softcap = resolve_softcap(softcap)
    if score_fn is not None:
        if softcap:
            raise ValueError("softcap: with a score_mod, write the cap into the snippet (e.g. "
                             "cuflash.ScoreMod('cap * tanhf(score / cap)', grad=..., cap=30.0))")
        if score_fn.device() not in (None, q.device):
            raise ValueError(f"score_mod/mask_mod: captured arrays must be on cuda:{q.device} like q, got "
                             f"cuda:{score_fn.device()}")
    return Problem(batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, q.dtype,
                   resolve_scale(softmax_scale, head_dim), softcap, check_dropout(dropout_p),
                   bool(causal), _sparse.check_window(window), alibi_sb, mask_blocks, packed,
                   score_fn.digest if score_fn is not None else "")


def check_backward(p: Problem, q: DeviceArray, dout: DeviceArray, out: DeviceArray, lse: DeviceArray) -> None:
    """The backward's extra arguments against the problem."""
    for a, name in ((dout, "dout"), (out, "out")):
        if a.framework != q.framework or a.device != q.device:
            raise ValueError(f"{name} must be a {q.framework} array on cuda:{q.device} like q")
        if a.dtype != q.dtype:
            raise TypeError(f"{name}.dtype must be {q.dtype} like q, got {a.dtype}")
        if a.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {q.shape}, got {a.shape}")
        if a.strides[-1] != 1 and a.shape[-1] != 1 or any(s % 8 for s in a.strides[:-1]) or a.ptr % 16:
            raise ValueError(f"{name} must have a contiguous last dimension and 16-byte aligned rows, got strides "
                             f"{a.strides}")
    if lse.framework != q.framework or lse.device != q.device:
        raise ValueError(f"softmax_lse must be a {q.framework} array on cuda:{q.device} like q")
    if lse.dtype != "float32":
        raise TypeError(f"softmax_lse.dtype must be float32, got {lse.dtype}")
    if lse.shape != p.lse_shape:
        names = "(nheads, total_q)" if p.packed else "(batch, nheads, seqlen_q)"
        raise ValueError(f"softmax_lse must have shape {names} = {p.lse_shape}, got {lse.shape}")
    if lse.strides != contiguous_strides(lse.shape) and 1 not in lse.shape:
        raise ValueError(f"softmax_lse must be contiguous, got strides {lse.strides}")
