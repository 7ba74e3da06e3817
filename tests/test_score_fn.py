"""User score and mask functions (cuflash._score_fn): snippets, derivatives, headers, NVRTC compile. No GPU."""
import math
import re

import pytest

from cuflash import _compile_check, _dispatch, _params, _score_fn
from cuflash._bridge import DeviceArray
from cuflash._score_fn import MaskMod, ScoreMod, derive_grad
from cuflash._tiles import CAUSAL, Flags


def array(shape, dtype="bfloat16"):
    strides, acc = [], 1
    for n in reversed(shape):
        strides.insert(0, acc)
        acc *= n
    return DeviceArray(0, tuple(shape), tuple(strides), dtype, 0, "test")


@pytest.mark.parametrize("code, grad", [("score", "1.f"), ("score + bias[b][h][q][kv]", "1.f"),
                                        ("score - 0.5f * fabsf(q - kv)", "1.f"), ("rel[h][q - kv + 512] + score", "1.f"),
                                        ("score * alpha", "(alpha)"), ("t[h] * score", "(t[h])"),
                                        ("score / (1.f + s)", "1.f / ((1.f + s))"), ("score * a + b", "(a)"),
                                        ("x - score", "-1.f"), ("a + b * score", "(b)"),
                                        ("score * w[h] + bias[h][q][kv]", "(w[h])"), ("score * a / b", "(a / b)"),
                                        ("2.f * score - score / s + 1e-3f * x", "(2.f) - 1.f / (s)")])
def test_linear_forms_get_their_derivative(code, grad):
    assert derive_grad(code) == grad


@pytest.mark.parametrize("code", ["tanhf(score)", "score + a ? 1.f : 2.f", "score * score", "score / x * y",
                                  "a * score * b", "score * (score + 1.f)"])
def test_other_forms_ask_for_grad(code):
    with pytest.raises(ValueError, match="grad="):
        _score_fn.score_fn(ScoreMod(code), None)


def test_bad_captures_and_objects_raise_naming_them():
    with pytest.raises(ValueError, match="'q'"):
        _score_fn.score_fn(ScoreMod("score", q=1.0), None)
    with pytest.raises(ValueError, match="2\\^24"):
        _score_fn.score_fn(ScoreMod("score + n", n=2**30), None)
    with pytest.raises(TypeError, match="score_mod"):
        _score_fn.score_fn("score + 1", None)
    with pytest.raises(ValueError, match="at most 4 arrays"):
        _score_fn.score_fn(ScoreMod("score", **{f"a{i}": array((4,)) for i in range(5)}), None)


def test_header_binds_captures_and_launch_args_carry_values():
    fn = _score_fn.score_fn(ScoreMod("score * alpha + bias[b][h][q][kv]", grad="alpha", bias=array((2, 4, 8, 8)),
                                     alpha=0.5), MaskMod("doc[q] == doc[kv]", doc=array((8,), "int32")))
    assert "const View<__nv_bfloat16, 4, int, true> bias" in fn.header and "const View<int, 1, int, true> doc" in fn.header
    assert "kScore = true, kMask = true" in fn.header
    args = fn.args(0.125)
    named = dict(zip((f for f, _ in _params.fields("ModArgs", "score_fn.cuh")), args))
    assert len(args) == len(_dispatch.NO_MOD) and named["scale"] == 0.125 and named["scalar0"] == 0.5
    same = _score_fn.score_fn(ScoreMod("score * alpha + bias[b][h][q][kv]", grad="alpha", bias=array((2, 4, 8, 8)),
                                       alpha=2.0), MaskMod("doc[q] == doc[kv]", doc=array((8,), "int32")))
    assert same.digest == fn.digest  # a new value is a launch argument, not a new kernel


def test_variants_with_a_score_function_compile_without_spills():
    fn = _score_fn.score_fn(ScoreMod("score + bias[b][h][q][kv]", bias=array((2, 4, 100, 100))),
                            MaskMod("doc[q] == doc[kv]", doc=array((100,), "int32")))
    pairs = []
    for arch in ("sm_80", "sm_90a"):
        for flags in (Flags(mod=fn.digest), Flags(mod=fn.digest, band=CAUSAL, alibi=True, dropout=True)):
            pairs.append((_dispatch.choose_fwd("float16", 128, flags, arch), arch))
            pairs += [(v, arch) for v in _dispatch.choose_bwd("bfloat16", 64, flags, arch)[1:]]
    sparse = Flags(mod=fn.digest, mask_blocks=(64, 128), dropout=True)
    pairs += [(v, "sm_90a") for v in _dispatch.choose_bwd("bfloat16", 256, sparse, "sm_90a")[1:]]
    pairs.append((_dispatch.choose_fwd("float32", 64, sparse, "sm_80"), "sm_80"))
    pairs.append((_dispatch.choose_dscore("bfloat16", 128, Flags(mod=fn.digest, band=CAUSAL), "sm_90a"), "sm_90a"))
    # A relative-position table: reads along diagonals, the most registers in the Hopper forward.
    rel = _score_fn.score_fn(ScoreMod("score + rel[h][q - kv + last]", rel=array((16, 16383), "float32"), last=8191),
                             None)
    pairs += [(_dispatch.choose_fwd("bfloat16", d, Flags(mod=rel.digest, band=band), "sm_90a"), "sm_90a")
              for d in (64, 128) for band in (0, CAUSAL)]
    assert all(v.name.endswith((", true>", ", 1>", ", 2>")) and v.user_header in (fn.header, rel.header)
               for v, _ in pairs)
    assert not any(v.warp_specialised for v, _ in pairs if "bwd" in v.name)
    assert _compile_check.compile_check(variants=pairs, jobs=2) == 0


def test_a_snippet_that_does_not_compile_raises_on_its_line():
    with pytest.raises(_score_fn.ScoreFnError, match=r"MaskMod line 2: .*undefined_thing"):
        _score_fn.score_fn(None, MaskMod("const int d = q - kv;\nreturn d > undefined_thing;"))


def test_a_call_with_a_score_function_takes_its_kernels_with_scale_one():
    from cuflash import _problem
    from cuflash._options import Options

    fn = _score_fn.score_fn(ScoreMod("score + bias[b][h][q][kv]", bias=array((2, 4, 100, 120))), None)
    qa, ka, va = array((2, 100, 4, 128)), array((2, 120, 2, 128)), array((2, 120, 2, 128))
    p = _problem.build(qa, ka, va, causal=True, score_fn=fn)
    assert p.mod == fn.digest and p.kernel_scales() == (1.0, 0.0)
    for arch in ("sm_80", "sm_90a"):
        fwd = _dispatch.choose_fwd(p.dtype, p.head_dim, p.flags(Options()), arch)
        bwd = _dispatch.choose_bwd(p.dtype, p.head_dim, p.flags(Options()), arch)
        assert all(v.mod == fn.digest and not v.warp_specialised for v in bwd[1:]) and fwd.mod == fn.digest
        assert fwd.warp_specialised == (arch == "sm_90a")  # the Hopper forward takes it at d <= 128
    mod = fn.args(p.softmax_scale)
    _, _, values = _dispatch.fwd_launch(fwd, p, *((0, a.strides) for a in (qa, ka, va, qa)), 0, mod=mod)
    named = dict(zip((f for f, _ in _params.fields("ModArgs", "score_fn.cuh")), mod))
    fields = _params.fields("FwdParams")
    at = sum(len(_params.no_fields(code)) if code in _params._NESTED_HEADERS else 1  # mod's first flat value
             for _, code in fields[:[f for f, _ in fields].index("mod")])
    assert tuple(values[at:at + len(mod)]) == mod and named["scale"] == p.softmax_scale == 1 / math.sqrt(128)
    with pytest.raises(ValueError, match="softcap"):
        _problem.build(qa, ka, va, softcap=5.0, score_fn=fn)


def test_a_name_both_functions_capture_must_be_one_value():
    bias = array((4, 4))
    w = float("0.5")  # (a float object of its own)
    same = _score_fn.all_captures(ScoreMod("score + w * bias[q][kv]", bias=bias, w=0.5), MaskMod("kv < q + w", w=w))
    assert same == {"bias": bias, "w": 0.5}
    with pytest.raises(ValueError, match="'w' is bound to different values"):
        _score_fn.all_captures(ScoreMod("score * w", w=0.5), MaskMod("kv < q + w", w=2.0))
    with pytest.raises(ValueError, match="'bias' is bound to different values"):
        _score_fn.all_captures(ScoreMod("score + bias[q][kv]", bias=bias), MaskMod("bias[q][kv] > 0", bias=array((4, 4))))


def test_snippets_travel_through_ops_as_key_tensors_and_scalars():
    bias, doc = array((4, 4)), array((4,), "int32")
    key, arrays, scalars = _score_fn.flatten(ScoreMod("score * t + bias[q][kv]", grad="t", bias=bias, t=0.5),
                                             MaskMod("doc[q] == doc[kv] || kv < n", doc=doc, n=3))
    assert arrays == [bias, doc] and scalars == [0.5, 3.0]
    score_mod, mask_mod = _score_fn.unflatten(key, [bias, doc], [2.0, 5.0])
    assert score_mod.captures == {"bias": bias, "t": 2.0} and mask_mod.captures == {"doc": doc, "n": 5}
    assert isinstance(mask_mod.captures["n"], int)


@pytest.mark.parametrize("code, shape", [
    ("score + bias[b][h][q][kv]", (2, 3, 5, 7)), ("score + bias[h][q][kv]", (3, 5, 7)),
    ("bias[kv][q] + score", (7, 5)), ("score - 0.5f * x + bias[b][kv]", (2, 7)),
    ("score + rel[h][q - kv + c]", (3, 11)), ("score - rel[kv - q + 6]", (13,)), ("score + rel[q - kv + 9][h]", (20, 3)),
    ("score * t + bias[h][q][kv]", (3, 5, 7)), ("score * bias[h]", (3,)), ("bias[b][h][q][kv] * score", (2, 3, 5, 7)),
    ("score * rel[h][q - kv + c] - x", (3, 11))])
def test_captured_array_gradients_from_ds(code, shape):
    """d(loss)/d(array) from dS (and the scores, for score's factor) against autograd of sum(u * dS), u the
    snippet's value on random scores."""
    torch = pytest.importorskip("torch")
    from cuflash import _capture_grads

    name = re.search(r"(bias|rel)\[", code).group(1)
    captures = {"c": 6}
    sign, indices, by_score = _capture_grads.plan(code, name, captures)
    assert by_score == (f"score * {name}" in code or code.endswith("* score"))
    ds, scores = torch.randn(2, 3, 5, 7, dtype=torch.float64), torch.randn(2, 3, 5, 7, dtype=torch.float64)
    array = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    b, h, q, kv = (torch.arange(n).view(*[n if d == i else 1 for d in range(4)]) for i, n in enumerate(ds.shape))
    env = {"b": b, "h": h, "q": q, "kv": kv}
    index = []
    for i in indices:
        if isinstance(i, tuple):
            index.append(i[1] * (q - kv) + i[2])
        else:
            index.append(env[i])
    value = array[tuple(index)].expand(ds.shape)
    (want,) = torch.autograd.grad((sign * value * (scores if by_score else 1) * ds).sum(), array)
    got = _capture_grads.capture_grad(ds, array.detach(), sign, indices, by_score, scores)
    assert torch.allclose(got, want)


@pytest.mark.parametrize("code", ["score * bias[q][kv] * 2.f", "score + bias[q][kv] * 2.f", "score + bias[q + 1][kv]",
                                  "score + bias[q][kv] + bias[kv][q]", "tanhf(score) + bias[q][kv]",
                                  "score * bias[q][kv] + bias[kv][q]", "score / bias[q][kv]", "bias[q][kv] - score",
                                  "score * (bias[q][kv] + 1.f)"])
def test_captured_array_gradients_refuse_other_forms(code):
    from cuflash import _capture_grads

    with pytest.raises(NotImplementedError, match="'bias'"):
        _capture_grads.plan(code, "bias", {})


def test_block_mask_kernels_compile_with_a_mask_function():
    from cuflash import _mask_blocks

    fn = _score_fn.score_fn(None, MaskMod("doc[q] == doc[kv] && kv <= q", doc=array((4096,), "int32")))
    pairs = [(_mask_blocks.MaskBlocksVariant(bm, bn, bits, fn.digest), arch)
             for arch in ("sm_80", "sm_90a") for bm, bn in ((128, 128), (64, 64)) for bits in (False, True)]
    assert _compile_check.compile_check(variants=pairs, jobs=2) == 0
