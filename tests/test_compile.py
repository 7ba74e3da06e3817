"""NVRTC compilation without a GPU: a representative sample of the kernel variants for sm_80 and sm_90a
(every kind and dtype; `python -m cuflash compile-check` builds all of them, as CI does in its own step),
the resource report, errors that carry the compiler's log, and cache keys that follow header edits."""
import io

import pytest

from cuflash import _compile, _compile_check
from cuflash._dispatch import choose_fwd


def test_representative_variants_compile_without_spills_for_sm80_and_sm90a():
    pairs = [(v, arch) for arch in ("sm_80", "sm_90a") for v in _compile_check.representative_variants(arch)]
    kinds = {(_compile_check.variant_kind(v), v.dtype, arch) for v, arch in pairs}
    assert len(kinds) >= 20 and any("ws" in k[0] for k in kinds)  # every family, the warp-specialised ones too
    report = io.StringIO()
    failures = _compile_check.compile_check(variants=pairs, out=report)
    assert failures == 0, report.getvalue()
    assert f"[{len(pairs)}/{len(pairs)}]" in report.getvalue()


def test_a_batch_reports_each_variant_and_a_failure_as_its_own():
    """compile_check compiles instances of one source together; one that does not compile is reported alone,
    and the others of its batch as they are compiled one by one."""
    import dataclasses

    good = [(choose_fwd("bfloat16", d, arch="sm_80"), "sm_80") for d in (64, 128)]
    broken = dataclasses.replace(good[0][0], head_dim=100)  # not a multiple of 16: the kernel's static_assert
    report = io.StringIO()
    assert _compile_check.compile_check(variants=[good[0], (broken, "sm_80"), good[1]], jobs=1, out=report) == 1
    lines = [line for line in report.getvalue().splitlines() if line.strip().startswith("[")]
    assert len(lines) == 3 and sum("FAILED" in line for line in lines) == 1
    assert [v.name in report.getvalue() for v, _ in good] == [True, True]
    alone = _compile_check.resource_reports(good[0][0].source, [(v.name, v.smem_bytes) for v, _ in good], "sm_80")
    assert [r.registers for r in alone] == [_compile_check.resource_report(v.source, v.name, "sm_80", v.smem_bytes).registers
                                            for v, _ in good]


def test_ptxas_log_parsing():
    log = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'
ptxas info    : Function properties for _Z3fooPf
ptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size
ptxas info    : Compiling entry function '_Z3barPf' for 'sm_90a'
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 16 barriers, 2320 bytes smem"""
    assert _compile_check.parse_ptxas_log(log) == {
        "_Z3fooPf": {"stack": 16, "spill_stores": 8, "spill_loads": 4, "registers": 255, "static_smem": 0},
        "_Z3barPf": {"stack": 0, "spill_stores": 0, "spill_loads": 0, "registers": 168, "static_smem": 2320},
    }


def test_compile_error_carries_the_nvrtc_log(tmp_path):
    (tmp_path / "flash_fwd.cu").write_text("__global__ void broken() { this is not C++; }\n")
    with pytest.raises(_compile.CompileError, match=r"flash_fwd\.cu\(1\): error"):
        _compile.compile_kernel("flash_fwd.cu", "broken", "sm_80", kernels=tmp_path)


def test_cache_key_follows_header_contents(tmp_path):
    before, after = tmp_path / "before", tmp_path / "after"
    for folder in (before, after):
        folder.mkdir()
        for f in _compile.kernels_dir().iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
    with open(after / "softmax.cuh", "a") as f:
        f.write("\n// edited\n")
    key = _compile.cache_key("flash_fwd.cu", "x", "sm_90a", kernels=before)
    assert _compile.cache_key("flash_fwd.cu", "x", "sm_90a", kernels=after) != key
    assert _compile.cache_key("flash_fwd.cu", "x", "sm_90a", kernels=before) == key


def test_cubin_holds_its_whole_elf(tmp_path, monkeypatch):
    """The cached cubin ends where its ELF headers say (CuPy's getCUBIN returns one byte short)."""
    import struct

    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(tmp_path))
    v = choose_fwd("float16", 64)
    data = _compile.cached_cubin(v.source, v.name, "sm_80")[0]
    ph_off, sh_off = struct.unpack_from("<QQ", data, 0x20)
    ph_size, ph_num, sh_size, sh_num = struct.unpack_from("<HHHH", data, 0x36)
    assert data[:4] == b"\x7fELF" and len(data) >= max(ph_off + ph_size * ph_num, sh_off + sh_size * sh_num)


def _entry(tmp_path):
    v = choose_fwd("float16", 64)
    key = _compile.cache_key(v.source, v.name, "sm_80")
    return v, tmp_path / f"{key}.cubin", tmp_path / f"{key}.json"


def test_disk_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(tmp_path))
    v, cubin_path, _ = _entry(tmp_path)
    cubin, lowered = _compile.cached_cubin(v.source, v.name, "sm_80")
    assert cubin_path.read_bytes() == cubin and len(cubin) > 1000 and lowered.startswith("_Z")
    mtime = cubin_path.stat().st_mtime_ns
    assert _compile.cached_cubin(v.source, v.name, "sm_80") == (cubin, lowered)
    assert cubin_path.stat().st_mtime_ns == mtime  # served from the cache, not rebuilt


@pytest.mark.parametrize("damage", ["truncated", "overwritten", "metadata", "no metadata"])
def test_a_damaged_cache_entry_is_compiled_again(tmp_path, monkeypatch, damage):
    """A cubin cut short (a full disk, a killed process), overwritten or copied without its metadata is
    never handed to the driver: its size and checksum do not match, so it is compiled again and replaced."""
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(tmp_path))
    v, cubin_path, meta_path = _entry(tmp_path)
    good, lowered = _compile.cached_cubin(v.source, v.name, "sm_80")
    if damage == "truncated":
        cubin_path.write_bytes(good[: len(good) // 2])
    elif damage == "overwritten":
        cubin_path.write_bytes(bytes(len(good)))
    elif damage == "metadata":
        meta_path.write_text("{not json")
    else:
        meta_path.unlink()
    healed = _compile.cached_cubin(v.source, v.name, "sm_80")  # NVRTC's cubins differ in a few note bytes
    assert healed[1] == lowered and len(healed[0]) == len(good) and healed[0][:4] == b"\x7fELF"
    assert _compile._read_entry(cubin_path, meta_path) == healed


def test_an_unusable_cache_folder_compiles_in_memory_with_one_warning(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a plain file where the cache folder would be")
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(_compile, "_cache_warned", False)
    v = choose_fwd("float16", 64)
    with pytest.warns(RuntimeWarning, match="cannot be written"):
        cubin, lowered = _compile.cached_cubin(v.source, v.name, "sm_80")
    assert cubin[:4] == b"\x7fELF" and lowered.startswith("_Z")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _compile.cached_cubin(v.source, v.name, "sm_80")[1] == lowered  # warned once only
