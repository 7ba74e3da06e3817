"""Switches that tests and benchmarks toggle, in one frozen object.

They are read from the environment once, at first use; code below the public API takes them as an
explicit argument. Tests and benchmarks that compare two paths on one GPU use `override`, which
changes them for every call while a `with` block runs (process-wide: PyTorch runs a backward on its own
threads), instead of editing environment variables or module tables.

| variable | default | effect |
| --- | --- | --- |
| CUFLASH_WGMMA=0 | on | Hopper runs the sm_80 (mma.sync) kernels instead of the wgmma ones |
| CUFLASH_FWD_WS=0 / =all | on | warp-specialised Hopper forward off / taken at every sequence length |
| CUFLASH_TMA=0 | on | the warp-specialised Hopper forward and dK/dV kernels copy with cp.async, not TMA |
| CUFLASH_DQ_WS=0 | on | warp-specialised dQ kernel for block masks off |
| CUFLASH_DKDV_WS=0 | on | warp-specialised dK/dV kernel for block masks off |
| CUFLASH_PERSISTENT=0 | on | persistent kernels launch one block per tile instead |
| CUFLASH_BWD_STREAMS=1 | off | the backward's dQ kernel queues on the caller's stream, not beside dK/dV |
| CUFLASH_FUSED_DQ=0 / =all | on | Hopper dense backward: dQ from its own kernel instead of accumulated by the dK/dV kernel / accumulated on calls of any length too |
| CUFLASH_CHECK_INPUTS=1 | off | packed sequences' cu_seqlens checked on the host (flash_attn_varlen_func's check_inputs) |
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Options:
    wgmma: bool = True  # Hopper takes its own (wgmma) kernels
    fwd_warp_specialised: bool = True  # Hopper forward: the warp-specialised kernel where the tile policy says
    fwd_warp_specialised_short: bool = False  # ... also on short sequences (tests of its edge tiles)
    tma: bool = True  # Hopper warp-specialised forward and dK/dV: copies by TMA where the arrays allow (tma.cuh)
    dq_warp_specialised: bool = True  # block masks on Hopper: the warp-specialised dQ kernel
    dkdv_warp_specialised: bool = True  # block masks on Hopper: the warp-specialised dK/dV kernel
    persistent: bool = True  # persistent kernels: a grid of resident blocks taking tiles from a counter
    bwd_side_stream: bool = True  # the dQ kernel runs on a side stream beside the dK/dV kernel
    fused_dq: bool = True  # Hopper dense backward: the dK/dV kernel accumulates dQ (kernels/dq_accum.cuh)
    fused_dq_short: bool = False  # ... also on calls shorter than it pays for (tests of the short cases)
    check_inputs: bool = False  # packed sequences: check cu_seqlens on the host (a synchronising copy)
    poison_outputs: bool = False  # tests: new outputs start as NaN, so that an element never written shows

    @classmethod
    def from_env(cls, env=None) -> "Options":
        env = os.environ if env is None else env
        fwd_ws = env.get("CUFLASH_FWD_WS", "1")
        return cls(
            wgmma=env.get("CUFLASH_WGMMA") != "0",
            fwd_warp_specialised=fwd_ws != "0",
            fwd_warp_specialised_short=fwd_ws == "all",
            tma=env.get("CUFLASH_TMA") != "0",
            dq_warp_specialised=env.get("CUFLASH_DQ_WS") != "0",
            dkdv_warp_specialised=env.get("CUFLASH_DKDV_WS") != "0",
            persistent=env.get("CUFLASH_PERSISTENT") != "0",
            bwd_side_stream=env.get("CUFLASH_BWD_STREAMS") != "1",
            fused_dq=env.get("CUFLASH_FUSED_DQ") != "0",
            fused_dq_short=env.get("CUFLASH_FUSED_DQ") == "all",
            check_inputs=env.get("CUFLASH_CHECK_INPUTS") == "1",
        )


_from_env: Options | None = None
_overrides: list[Options] = []


def current() -> Options:
    """The options in force: the innermost `override`, else the environment's (read once)."""
    global _from_env
    if _overrides:
        return _overrides[-1]
    if _from_env is None:
        _from_env = Options.from_env()
    return _from_env


@contextlib.contextmanager
def override(**changes):
    """`with override(wgmma=False): ...` runs the calls inside with those options changed."""
    _overrides.append(dataclasses.replace(current(), **changes))
    try:
        yield
    finally:
        _overrides.pop()
