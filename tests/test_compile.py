"""NVRTC compilation without a GPU: every variant for sm_80 and sm_90a, the resource report, errors
that carry the compiler's log, and cache keys that follow header edits."""
import io

import pytest

from cuflash import _compile


def test_every_variant_compiles_without_spills_for_sm80_and_sm90a():
    report = io.StringIO()
    failures = _compile.compile_check(("sm_80", "sm_90a"), out=report)
    assert failures == 0, report.getvalue()
    assert "sm_90a" in report.getvalue() and "sm_80" in report.getvalue()


def test_ptxas_log_parsing():
    log = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'
ptxas info    : Function properties for _Z3fooPf
ptxas         .     16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size"""
    assert _compile.parse_ptxas_log(log) == {
        "_Z3fooPf": {"stack": 16, "spill_stores": 8, "spill_loads": 4, "registers": 255}
    }


def test_compile_error_carries_the_nvrtc_log(tmp_path, monkeypatch):
    (tmp_path / "flash_fwd.cu").write_text("__global__ void broken() { this is not C++; }\n")
    monkeypatch.setattr(_compile, "kernels_dir", lambda: tmp_path)
    _compile._sources_digest.cache_clear()
    with pytest.raises(_compile.CompileError, match=r"flash_fwd\.cu\(1\): error"):
        _compile.compile_kernel("flash_fwd.cu", "broken", "sm_80")
    _compile._sources_digest.cache_clear()


def test_cache_key_follows_header_contents(tmp_path, monkeypatch):
    src = _compile.kernels_dir()
    for f in src.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(_compile, "kernels_dir", lambda: tmp_path)
    _compile._sources_digest.cache_clear()
    key1 = _compile.cache_key("flash_fwd.cu", "x", "sm_90a")
    with open(tmp_path / "softmax.cuh", "a") as f:
        f.write("\n// edited\n")
    _compile._sources_digest.cache_clear()
    key2 = _compile.cache_key("flash_fwd.cu", "x", "sm_90a")
    _compile._sources_digest.cache_clear()
    assert key1 != key2


def test_cubin_holds_its_whole_elf(tmp_path, monkeypatch):
    """The cached cubin ends where its ELF headers say (CuPy's getCUBIN returns one byte short)."""
    import struct

    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(tmp_path))
    from cuflash._dispatch import choose_fwd

    v = choose_fwd("float16", 64, False)
    data = _compile.cached_cubin(v.source, v.name, "sm_80")[0].read_bytes()
    ph_off, sh_off = struct.unpack_from("<QQ", data, 0x20)
    ph_size, ph_num, sh_size, sh_num = struct.unpack_from("<HHHH", data, 0x36)
    assert data[:4] == b"\x7fELF" and len(data) >= max(ph_off + ph_size * ph_num, sh_off + sh_size * sh_num)


def test_disk_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("CUFLASH_CACHE_DIR", str(tmp_path))
    from cuflash._dispatch import choose_fwd

    v = choose_fwd("float16", 64, False)
    path, lowered = _compile.cached_cubin(v.source, v.name, "sm_80")
    assert path.parent == tmp_path and path.stat().st_size > 1000 and lowered.startswith("_Z")
    mtime = path.stat().st_mtime_ns
    assert _compile.cached_cubin(v.source, v.name, "sm_80") == (path, lowered)
    assert path.stat().st_mtime_ns == mtime  # served from the cache, not rebuilt
