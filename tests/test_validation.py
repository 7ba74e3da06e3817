"""Every argument check fires before any launch, with a message naming the argument. No GPU needed:
checks run on DeviceArray metadata."""
import numpy as np
import pytest

import cuflash
from cuflash import _arrays, _problem
from cuflash._bridge import DeviceArray


def check_fwd_args(q, k, v, softmax_scale, softcap=0.0, dropout_p=0.0, **kw):
    return _problem.build(q, k, v, softmax_scale=softmax_scale, softcap=softcap, dropout_p=dropout_p, **kw)


def arr(shape, dtype="float16", strides=None, device=0, framework="cupy", ptr=4096):
    if strides is None:
        strides = tuple(int(s) for s in np.cumprod((1,) + tuple(shape[::-1]))[:-1][::-1])
    return DeviceArray(ptr, tuple(shape), tuple(strides), dtype, device, framework)


def qkv(b=2, sq=17, sk=33, h=4, hk=4, d=64, **kw):
    return arr((b, sq, h, d), **kw), arr((b, sk, hk, d), **kw), arr((b, sk, hk, d), **kw)


def test_valid_problem():
    p = check_fwd_args(*qkv(), None)
    assert (p.batch, p.seqlen_q, p.seqlen_k, p.nheads, p.nheads_k, p.head_dim) == (2, 17, 33, 4, 4, 64)
    assert p.softmax_scale == pytest.approx(1 / 8)


def test_gqa_shapes_accepted():
    assert check_fwd_args(*qkv(h=8, hk=2), 0.5).nheads_k == 2


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        (dict(dtype="float64"), TypeError, r"q\.dtype must be float16, bfloat16 or float32"),
        (dict(dtype="int8"), TypeError, "float16, bfloat16 or float32"),
        (dict(device=None), TypeError, "q must be on a CUDA device"),
    ],
)
def test_bad_dtype_or_device(kw, exc, match):
    with pytest.raises(exc, match=match):
        check_fwd_args(*qkv(**kw), None)


@pytest.mark.parametrize("which, field, value, exc, match", [
    ("v", "dtype", "bfloat16", TypeError, "one dtype"),
    ("k", "device", 1, ValueError, "one device"),
    ("v", "framework", "torch", TypeError, "one framework"),
])
def test_mixed_dtypes_devices_and_frameworks(which, field, value, exc, match):
    arrays = dict(zip("qkv", qkv()))
    setattr(arrays[which], field, value)
    with pytest.raises(exc, match=match):
        check_fwd_args(*arrays.values(), None)


def test_rank():
    q, k, v = qkv()
    q = arr((2, 17, 64))
    with pytest.raises(ValueError, match=r"q must have 4 dimensions"):
        check_fwd_args(q, k, v, None)


@pytest.mark.parametrize(
    "shapes, match",
    [
        (((2, 17, 4, 64), (3, 33, 4, 64), (3, 33, 4, 64)), r"k must have shape \(batch=2"),
        (((2, 17, 4, 64), (2, 33, 4, 32), (2, 33, 4, 32)), r"headdim=64"),
        (((2, 17, 4, 64), (2, 33, 4, 64), (2, 34, 4, 64)), r"v must have the shape of k"),
        (((2, 17, 4, 64), (2, 33, 3, 64), (2, 33, 3, 64)), r"k's nheads \(3\) must divide q's nheads \(4\)"),
        (((2, 17, 4, 12), (2, 33, 4, 12), (2, 33, 4, 12)), r"the kernels take multiples of 8"),
        (((2, 17, 4, 264), (2, 33, 4, 264), (2, 33, 4, 264)), r"from 1 to 256 .*got 264"),
    ],
)
def test_shape_mismatch(shapes, match):
    with pytest.raises(ValueError, match=match):
        check_fwd_args(*(arr(s) for s in shapes), None)


def test_last_dim_must_be_contiguous():
    q, k, v = qkv()
    v.strides = (v.strides[0], v.strides[1], 1, 4)
    with pytest.raises(ValueError, match=r"v's last dimension must be contiguous"):
        check_fwd_args(q, k, v, None)


def test_alignment():
    q, k, v = qkv()
    k.strides = (k.strides[0], 260, 65, 1)
    with pytest.raises(ValueError, match=r"k must be 16-byte aligned"):
        check_fwd_args(q, k, v, None)
    q, k, v = qkv()
    q.ptr += 2
    with pytest.raises(ValueError, match=r"q must be 16-byte aligned"):
        check_fwd_args(q, k, v, None)


@pytest.mark.parametrize("scale, exc", [(0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError),
                                        (float("inf"), ValueError), ("0.1", TypeError), (True, TypeError)])
def test_bad_scale(scale, exc):
    with pytest.raises(exc, match="softmax_scale"):
        check_fwd_args(*qkv(), scale)


def test_host_arrays_rejected_by_public_api():
    x = np.zeros((1, 4, 1, 8), np.float16)
    with pytest.raises(TypeError, match=r"q must be a CUDA array .* got numpy\.ndarray"):
        cuflash.flash_attn_func(x, x, x)


@pytest.mark.parametrize("p, exc", [(1.0, ValueError), (-0.1, ValueError), (float("nan"), ValueError),
                                    ("0.1", TypeError), (True, TypeError)])
def test_bad_dropout_p_is_named(p, exc):
    x = np.zeros((1, 4, 1, 8), np.float16)
    with pytest.raises(exc, match="dropout_p"):
        cuflash.flash_attn_func(x, x, x, dropout_p=p)


def test_dropout_rng_checks():
    p = check_fwd_args(*qkv(), None, 0.0, 0.1)
    assert p.dropout_p == 0.1
    with pytest.raises(ValueError, match="rng_state"):
        _arrays.dropout_fields(p, None)
    with pytest.raises(TypeError, match="rng_state"):
        _arrays.dropout_fields(p, (1, 2, 3))
    with pytest.raises(TypeError, match="dropout_seed"):
        _arrays.framework_rng(0.1, -5, None)
    with pytest.raises(TypeError, match="dropout_seed"):
        _arrays.framework_rng(0.1, 1.5, None)
    assert _arrays.framework_rng(0.0, None, None) is None
    assert _arrays.framework_rng(0.1, 2**64 - 1, None) == (2**64 - 1, 0)
    np.random.seed(3)
    a = _arrays.framework_rng(0.1, None, np.zeros(1))
    np.random.seed(3)
    assert _arrays.framework_rng(0.1, None, np.zeros(1)) == a  # NumPy's global generator: reproducible


@pytest.mark.parametrize("window", [(1,), (-2, 0), (1.5, 0), "ab", None])
def test_bad_window_size_is_named(window):
    x = np.zeros((1, 4, 1, 8), np.float16)
    with pytest.raises(ValueError, match="window_size"):
        cuflash.flash_attn_func(x, x, x, window_size=window)


def test_head_dim_padding_rule():
    from cuflash import _headdim

    def a(d, shape=(1, 5, 2)):
        return np.zeros((*shape, d))

    assert _headdim.needs_padding(a(12), a(12), a(12)) == 16
    assert _headdim.needs_padding(a(1), a(1), a(1)) == 8
    assert _headdim.needs_padding(a(250), a(250), a(250)) == 256
    assert _headdim.needs_padding(a(64), a(64), a(64)) == 0  # supported: never copied
    assert _headdim.needs_padding(a(12), a(20), a(12)) == 0  # mismatch: left to the shape checks
    assert _headdim.needs_padding(a(264), a(264), a(264)) == 0
    assert _headdim.needs_padding(np.zeros((5, 12)), a(12), a(12)) == 0
    # dqk != dv: both padded to the larger's next multiple of 8
    assert _headdim.needs_padding(a(192), a(192), a(128)) == 192
    assert _headdim.needs_padding(a(64), a(64), a(128), a(128), a(128)) == 128
    assert _headdim.needs_padding(a(72), a(72), a(36)) == 72
    assert _headdim.needs_padding(a(20), a(20), a(12)) == 24
    assert _headdim.needs_padding(a(128), a(128), a(64), a(128)) == 0  # dout unlike v: left to the checks
    assert _headdim.needs_padding(a(128), a(128), a(320)) == 0


@pytest.mark.parametrize("softcap, exc", [(-1.0, ValueError), (float("inf"), ValueError), ("30", TypeError),
                                          (True, TypeError)])
def test_bad_softcap_is_named(softcap, exc):
    with pytest.raises(exc, match="softcap"):
        check_fwd_args(*qkv(), None, softcap)


def test_float32_inputs_are_accepted_and_bucketed():
    from cuflash import _dispatch
    from cuflash._tiles import CAUSAL, Flags

    p = check_fwd_args(*qkv(d=40, dtype="float32"), None)
    assert p.head_dim == 40
    v = _dispatch.choose_fwd("float32", 40)
    assert v.head_dim == 64 and v.name.startswith("cuflash::flash_fwd_kernel<float, 64,")
    assert _dispatch.choose_fwd("float32", 160, Flags(band=CAUSAL)).head_dim == 256
    with pytest.raises(TypeError, match="one dtype"):
        q, k, v = qkv(dtype="float32")
        k.dtype = "bfloat16"
        check_fwd_args(q, k, v, None)


@pytest.mark.parametrize("causal", ["no", 1, None])
def test_causal_must_be_a_bool(causal):
    with pytest.raises(TypeError, match="causal must be a bool"):
        check_fwd_args(*qkv(), None, causal=causal)
    x = np.zeros((1, 4, 1, 8), np.float16)
    with pytest.raises(TypeError, match="causal must be a bool"):
        cuflash.flash_attn_func(x, x, x, causal=causal)


def test_packed_problem_is_the_dense_one_with_offsets():
    """Packed q, k, v ((total, heads, dim)) are checked as (batch, max_seqlen, heads, dim) views with batch
    stride 0; the log-sum-exp is (nheads, total_q); max_seqlen must be an int whatever the framework."""
    q, k, v = arr((50, 4, 64)), arr((70, 2, 64)), arr((70, 2, 64))
    cu = (arr((4,), "int32"), arr((4,), "int32"))
    p = _problem.build(q, k, v, cu_seqlens=cu, max_seqlen=(20, 30))
    assert (p.batch, p.seqlen_q, p.seqlen_k, p.nheads, p.nheads_k, p.packed) == (3, 20, 30, 4, 2, (50, 70))
    assert p.lse_shape == (4, 50) and p.q_shape == (50, 4, 64) and p.k_shape == (70, 2, 64)
    assert p.batched(q).shape == (3, 20, 4, 64) and p.batched(q).strides[0] == 0
    with pytest.raises(ValueError, match="max_seqlen_q must be an int"):
        _problem.build(q, k, v, cu_seqlens=cu, max_seqlen=(20.0, 30))
    with pytest.raises(ValueError, match="q must have 3 dimensions"):
        _problem.build(arr((1, 50, 4, 64)), k, v, cu_seqlens=cu, max_seqlen=(20, 30))
    with pytest.raises(ValueError, match="cu_seqlens_k must be a contiguous int32"):
        _problem.build(q, k, v, cu_seqlens=(cu[0], arr((4,), "int64")), max_seqlen=(20, 30))


def test_unpad_input_rejects_host_arrays():
    x = np.zeros((2, 5, 3), np.float16)
    with pytest.raises(TypeError, match="hidden_states must be a PyTorch CUDA tensor or a CuPy array"):
        cuflash.unpad_input(x, np.ones((2, 5), bool))


def test_backward_names_its_first_bad_argument():
    x = np.zeros((1, 4, 1, 8), np.float16)
    with pytest.raises(TypeError, match=r"dout must be a CUDA array .* host memory: move it to the GPU"):
        cuflash.flash_attn_backward(x, x, x, x, x, np.zeros((1, 1, 4), np.float32))


@pytest.mark.parametrize("scale", [-0.5, 0.0])
def test_a_scale_the_kernels_cannot_take_says_what_to_do(scale):
    with pytest.raises(ValueError, match="negate q"):
        check_fwd_args(*qkv(), scale)


def test_head_dim_zero_is_a_value_error():
    with pytest.raises(ValueError, match="headdim must be from 1 to 256"):
        check_fwd_args(*qkv(d=0), None)


@pytest.mark.parametrize("cu_q, cu_k, match", [
    ((0, 5, 3), (0, 4, 8), r"cu_seqlens_q must not decrease: entry 2 \(3\) is below entry 1 \(5\)"),
    ((0, 5, 10), (0, 30, 60, 71), r"cu_seqlens_k ends at row 71, past the 70 rows of k and v"),
    ((0, 25, 30), (0, 4, 8), r"sequence of 25 tokens \(sequence 0\), longer than max_seqlen_q = 20"),
    ((-1, 5, 10), (0, 4, 8), r"cu_seqlens_q must start at an offset >= 0"),
])
def test_packed_offsets_checked_on_request(cu_q, cu_k, match):
    """check_inputs=True reads cu_seqlens on the host and rejects offsets that would read or write outside q,
    k and v, or sequences longer than max_seqlen; good offsets pass."""
    with pytest.raises(ValueError, match=match):
        _problem.check_offsets(cu_q, cu_k, 50, 70, 20, 30)
    _problem.check_offsets((0, 5, 10), (0, 4, 8), 50, 70, 20, 30)
