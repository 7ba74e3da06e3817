"""The kernels' parameter structs: the Python mirror (_params.py, read from kernels/params.cuh) has every
field at the offset NVRTC compiles it to, and the structs' sizes agree. Needs NVRTC, no GPU."""
import pytest

from cuflash import _compile, _params

STRUCTS = ("FwdParams", "BwdPreprocessParams", "BwdDkdvParams", "BwdDqParams")


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_struct_layout_matches_nvrtc(arch, tmp_path):
    checks = []
    for name in STRUCTS:
        s = _params.param_struct(name)
        for t in ("__half", "float"):
            full = f"cuflash::{name}<{t}>"
            checks += [f'static_assert(offsetof({full}, {f}) == {off}, "{name}.{f}");' for f, off in s.offsets().items()]
            checks.append(f'static_assert(sizeof({full}) == {s.size}, "sizeof {name}");')
    source = "#include <cuda_fp16.h>\n#include \"params.cuh\"\n#define offsetof(T, f) __builtin_offsetof(T, f)\n"
    source += "\n".join(checks) + "\n__global__ void layout_check() {}\n"
    (tmp_path / "layout_check.cu").write_text(source)
    from cupy.cuda import nvrtc

    prog = nvrtc.createProgram(source, "layout_check.cu", [], [])
    try:
        nvrtc.compileProgram(prog, _compile.nvrtc_options(arch))
    except nvrtc.NVRTCError:
        pytest.fail(nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)


def test_every_field_is_read_with_its_type():
    fwd = dict(_params.fields("FwdParams"))
    assert (fwd["q"], fwd["q_sb"], fwd["nheads"], fwd["softmax_scale"]) == ("Q", "q", "i", "f")
    assert (fwd["lists"], fwd["dropout"]) == ("BlockLists", "DropoutArgs")
    assert len(_params.no_fields("BlockLists")) == 11 and len(_params.no_fields("DropoutArgs")) == 5
    s = _params.param_struct("FwdParams")
    with pytest.raises(TypeError, match="missing fields"):
        s.pack({"q": 0})


def test_every_kernel_takes_its_struct_field_for_field():
    """Each kernel's parameter list is its family's struct, field for field (types and order), so the values
    _params packs by field name land where the kernel reads them."""
    from cuflash import _dispatch
    from cuflash._tiles import Flags

    kernels = [*_dispatch.choose_bwd("bfloat16", 128, Flags(mask_blocks=(128, 128)), "sm_90a"),
               *_dispatch.choose_bwd("float16", 64, Flags(band=1), "sm_80"),
               _dispatch.choose_fwd("bfloat16", 128, Flags(), "sm_90a"), _dispatch.choose_fwd("float16", 96)]
    assert {v.name.split("<")[0] for v in kernels} == {
        "cuflash::flash_bwd_preprocess_kernel", "cuflash::flash_bwd_dkdv_ws_kernel", "cuflash::flash_bwd_dq_ws_kernel",
        "cuflash::flash_bwd_dkdv_kernel", "cuflash::flash_bwd_dq_kernel", "cuflash::flash_fwd_ws_kernel",
        "cuflash::flash_fwd_kernel"}
    sources, checks = set(), []
    for v in kernels:
        element = v.name.split("<")[1].split(",")[0].rstrip(">")
        types = ", ".join(t.replace("T*", f"{element}*") for t in _params.c_types(v.params))
        checks.append(f"static_assert(same<decltype({v.name}), void({types})>::value, \"{v.name}\");")
        sources.add(v.source)
    source = "".join(f'#include "{s}"\n' for s in sorted(sources))
    source += "template <class A, class B> struct same { static constexpr bool value = false; };\n"
    source += "template <class A> struct same<A, A> { static constexpr bool value = true; };\n"
    source += "namespace cuflash {\n" + "\n".join(checks) + "\n}\n"
    from cupy.cuda import nvrtc

    prog = nvrtc.createProgram(source, "signature_check.cu", [], [])
    try:
        nvrtc.compileProgram(prog, _compile.nvrtc_options("sm_90a"))
    except nvrtc.NVRTCError:
        pytest.fail(nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)
