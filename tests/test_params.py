"""The kernels' parameter structs: the Python mirror (_params.py, read from kernels/params.cuh) has every
field at the offset and with the size the compiler gives it, and the structs' sizes agree. Needs NVRTC,
no GPU."""
import struct

import pytest

from cuflash import _compile, _params

STRUCTS = ("FwdParams", "FwdSinksParams", "BwdPreprocessParams", "BwdDkdvParams", "BwdDqParams", "BwdDqConvertParams", "BlockLists",
           "DropoutArgs", "ModArgs", "MaskBlocksParams", "MaskListsParams", "RingMergeParams")


def kernel_param_layout(cubin: bytes, kernel: str) -> list[tuple[int, int]]:
    """(offset, size) of each parameter of `kernel` (its lowered name) as the compiler laid them out: the
    EIATTR_KPARAM_INFO records of the cubin's .nv.info.<kernel> section, in parameter order."""
    sh_off, = struct.unpack_from("<Q", cubin, 0x28)
    sh_size, sh_num, names_at = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", cubin, sh_off + i * sh_size) for i in range(sh_num)]
    names = sections[names_at][4]
    for name_off, _, _, _, offset, size in sections:
        if cubin[names + name_off:cubin.index(b"\0", names + name_off)] == f".nv.info.{kernel}".encode():
            info = cubin[offset:offset + size]
            break
    else:
        raise LookupError(f"no .nv.info section for {kernel}")
    params, i = {}, 0
    while i < len(info):  # records: format, attribute, then a 16-bit length and a payload (format 4)
        fmt, attr = info[i], info[i + 1]
        length = struct.unpack_from("<H", info, i + 2)[0] if fmt == 4 else 0
        if attr == 0x17:  # EIATTR_KPARAM_INFO: index, ordinal, offset, flags (size in bits 18-31)
            _, ordinal, param_offset, flags = struct.unpack_from("<IHHI", info, i + 4)
            params[ordinal] = (param_offset, (flags >> 18) & 0x3FFF)
        i += 4 + length if fmt == 4 else 4 if fmt == 3 else 2
    return [params[k] for k in sorted(params)]


@pytest.mark.parametrize("arch", ["sm_80", "sm_90a"])
def test_struct_layout_matches_the_compilers(arch):
    """A kernel that takes a struct's fields as its parameters gets them where C places the struct's fields
    (natural alignment), so each offset and size _params packs must equal the compiler's; and sizeof."""
    from cupy.cuda import nvrtc

    source = '#include <cuda_fp16.h>\n#include "params.cuh"\nnamespace cuflash {\n'
    for name in STRUCTS:
        s = _params.param_struct(name)
        types = ", ".join(t.replace("T*", "__half*") for t in _params.c_types(name, s.header))
        source += f'extern "C" __global__ void layout_{name}({types}) {{}}\n'
        full = name + ("<__half>" if s.header == "params.cuh" else "")
        source += f'static_assert(sizeof({full}) == {s.size}, "sizeof {name}");\n'
    source += "}\n"
    prog = nvrtc.createProgram(source, "layout_check.cu", [], [])
    try:
        nvrtc.compileProgram(prog, _compile.nvrtc_options(arch))
        cubin = _compile.whole_elf(nvrtc.getCUBIN(prog))
    except nvrtc.NVRTCError:
        pytest.fail(nvrtc.getProgramLog(prog))
    finally:
        nvrtc.destroyProgram(prog)
    for name in STRUCTS:
        s = _params.param_struct(name)
        expected = [(s.offsets()[f], s.sizes()[f]) for f in s.names]
        got = kernel_param_layout(cubin, f"layout_{name}")
        # An opaque field (a tensor map) goes where its alignment puts it counted from the parameter bank's
        # start: only its size is ours to match (the driver copies each parameter from its own pointer).
        opaque = [i for i, (_, code) in enumerate(s.fields) if code in _params._OPAQUE]
        for i in opaque:
            expected[i], got[i] = expected[i][1], got[i][1]
        assert got == expected, name


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
    from cuflash import _dispatch, _mask_blocks
    from cuflash._tiles import Flags

    kernels = [*_dispatch.choose_bwd("bfloat16", 128, Flags(mask_blocks=(128, 128)), "sm_90a"),
               *_dispatch.choose_bwd("float16", 64, Flags(band=1), "sm_80"),
               *_dispatch.choose_bwd("bfloat16", 128, Flags(), "sm_90a")[1:],  # dQ accumulated, then converted
               _dispatch.choose_fwd("bfloat16", 128, Flags(), "sm_90a"), _dispatch.choose_fwd("float16", 96),
               _dispatch.FwdSinksVariant("bfloat16"), _mask_blocks.MaskBlocksVariant(128, 128, True, ""),
               _dispatch.RingMergeVariant("float16"), _dispatch.MaskListsVariant(1)]
    assert {v.name.split("<")[0] for v in kernels} == {
        "cuflash::flash_bwd_preprocess_kernel", "cuflash::flash_bwd_dkdv_ws_kernel", "cuflash::flash_bwd_dq_ws_kernel",
        "cuflash::flash_bwd_dkdv_kernel", "cuflash::flash_bwd_dq_kernel", "cuflash::flash_fwd_ws_kernel",
        "cuflash::flash_fwd_kernel", "cuflash::flash_bwd_dq_convert_kernel", "cuflash::flash_fwd_sinks_kernel",
        "cuflash::mask_blocks_kernel", "cuflash::ring_merge_kernel", "cuflash::mask_lists_kernel"}
    sources, checks = set(), []
    for v in kernels:
        element = v.name.split("<")[1].split(",")[0].rstrip(">")
        header = _params.param_struct(v.params).header
        types = ", ".join(t.replace("T*", f"{element}*") for t in _params.c_types(v.params, header))
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
