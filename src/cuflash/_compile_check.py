"""The no-GPU compile check: every kernel variant the dispatcher can choose, compiled by NVRTC for sm_80
and sm_90a, with ptxas's resource report. A variant fails on a compile error, a spill to local memory
beyond its allowance (_tiles.spill_allowance), or more shared memory than its arch offers."""
from __future__ import annotations

import os
import random
import re
import sys
import time
from dataclasses import dataclass

from . import _dispatch
from ._arch import shared_memory_limit
from ._compile import CompileError, compile_kernels, nvrtc_version

_PTXAS_FUNC = re.compile(r"Compiling entry function '(\S+)' for '(\S+)'")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes smem)?")


@dataclass
class ResourceReport:
    name: str
    arch: str
    registers: int
    stack_bytes: int
    spill_store_bytes: int
    spill_load_bytes: int
    smem_bytes: int  # dynamic
    static_smem_bytes: int = 0

    @property
    def spills(self) -> bool:
        return self.stack_bytes > 0 or self.spill_store_bytes > 0 or self.spill_load_bytes > 0


def parse_ptxas_log(log: str) -> dict[str, dict[str, int]]:
    """Per mangled kernel name: registers, static shared memory, stack frame and spill bytes from `-Xptxas -v`
    output."""
    out: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        if m := _PTXAS_FUNC.search(line):
            current = out.setdefault(m.group(1), {})
        elif current is not None and (m := _PTXAS_SPILL.search(line)):
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif current is not None and (m := _PTXAS_REGS.search(line)):
            current["registers"] = int(m.group(1))
            current["static_smem"] = int(m.group(2) or 0)
    return out


def resource_report(source: str, name: str, arch: str, smem_bytes: int, user_header: str | None = None) -> ResourceReport:
    report = resource_reports(source, [(name, smem_bytes)], arch, user_header)[0]
    if isinstance(report, CompileError):
        raise report
    return report


def resource_reports(source: str, variants: list[tuple[str, int]], arch: str,
                     user_header: str | None = None) -> list[ResourceReport | CompileError]:
    """resource_report for several (name, dynamic shared memory) of one source, compiled as one NVRTC
    program; where that fails, each alone, so that an error names its own variant."""
    try:
        compiled = compile_kernels(source, [name for name, _ in variants], arch, verbose=True, user_header=user_header)
    except CompileError as e:
        if len(variants) == 1:
            return [e]
        return [r for v in variants for r in resource_reports(source, [v], arch, user_header)]
    reports = []
    for (name, smem_bytes), c in zip(variants, compiled):
        info = parse_ptxas_log(c.log).get(c.lowered_name)
        if info is None or "registers" not in info:
            reports.append(CompileError(f"no ptxas resource report for {name} ({arch}):\n{c.log}"))
            continue
        reports.append(ResourceReport(name, arch, info["registers"], info.get("stack", 0), info.get("spill_stores", 0),
                                      info.get("spill_loads", 0), smem_bytes, info.get("static_smem", 0)))
    return reports


def _reports_job(job):
    return resource_reports(*job)


def _batches(pairs, size: int) -> list[list]:
    """(variant, arch) pairs in groups of up to `size` that share a source, an arch and a user header (one
    NVRTC program each: the headers are parsed once, 10-20% of a sweep's time)."""
    groups: dict = {}
    for v, arch in pairs:
        groups.setdefault((v.source, arch, getattr(v, "user_header", None)), []).append((v, arch))
    return [g[i:i + size] for g in groups.values() for i in range(0, len(g), size)]


def variant_kind(variant) -> str:
    return type(variant).__name__ + ("-ws" if getattr(variant, "warp_specialised", False) else "")


def representative_variants(arch: str, per_kind: int = 6, seed: int = 0) -> list:
    """A sample of all_variants(arch) that a quick test compiles: per kernel kind and dtype, the variant
    with the most flags at the largest head dim, and `per_kind` more drawn at random (fixed seed)."""
    strata: dict = {}
    for v in _dispatch.all_variants(arch):
        strata.setdefault((variant_kind(v), v.dtype), []).append(v)
    rng, out = random.Random(seed), []
    for _, variants in sorted(strata.items()):
        heaviest = max(variants, key=lambda v: (getattr(v, "head_dim", 0), sum(
            bool(getattr(v, f, False)) for f in ("sparse", "alibi", "softcap", "dropout")), getattr(v, "band", 0)))
        rest = [v for v in variants if v is not heaviest]
        out += [heaviest] + rng.sample(rest, min(per_kind, len(rest)))
    return out


def compile_check(archs=("sm_80", "sm_90a"), jobs: int | None = None, out=sys.stdout, variants=None,
                  batch: int = 6) -> int:
    """Compile every kernel variant for each arch (or the given (variant, arch) pairs), `batch` instances of
    a source to an NVRTC program, printing a resource line per variant as it finishes; returns the number
    of failures."""
    from concurrent.futures import ProcessPoolExecutor, as_completed
    import multiprocessing

    pairs = variants if variants is not None else [(v, arch) for arch in archs for v in _dispatch.all_variants(arch)]
    batches = _batches(pairs, batch)
    jobs = jobs or max(1, min(len(batches), os.cpu_count() or 1))
    failures, done, t0 = 0, 0, time.perf_counter()
    print(f"compiling {len(pairs)} kernel variants with NVRTC {nvrtc_version()} ({jobs} processes)", file=out,
          flush=True)
    print(f"{'done':>11} {'arch':7} {'regs':>4} {'stack':>5} {'spill':>5} {'smem KiB':>8}  kernel", file=out)
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_reports_job, (g[0][0].source, [(v.name, v.smem_bytes) for v, _ in g], g[0][1],
                                              getattr(g[0][0], "user_header", None))): g for g in batches}
        for fut in as_completed(futures):
            for (variant, arch), r in zip(futures[fut], fut.result()):
                done += 1
                failures += _print_report(variant, arch, r, f"[{done}/{len(pairs)}]", out)
    print(f"{len(pairs) - failures} ok, {failures} failed in {time.perf_counter() - t0:.0f} s", file=out)
    return failures


def _print_report(variant, arch: str, r, progress: str, out) -> bool:
    """One variant's line of compile_check; whether it failed."""
    if isinstance(r, CompileError):
        print(f"{progress:>11} FAILED {variant.name} ({arch}): {r}", file=out, flush=True)
        return True
    problems = []
    if r.spills and r.stack_bytes > _dispatch.spill_allowance(variant):
        problems.append("SPILLS to local memory")
    if r.smem_bytes + r.static_smem_bytes > shared_memory_limit(r.arch):  # what a block may have in all
        problems.append(f"needs {r.smem_bytes} + {r.static_smem_bytes} (static) B shared memory > "
                        f"{shared_memory_limit(r.arch)}")
    print(f"{progress:>11} {r.arch:7} {r.registers:4d} {r.stack_bytes:5d} {r.spill_store_bytes:5d} "
          f"{r.smem_bytes / 1024:8.1f}  {r.name}{'  <-- ' + '; '.join(problems) if problems else ''}",
          file=out, flush=True)
    return bool(problems)
