"""Benchmark of cuflash block-sparse attention (``block_mask=``) against FlexAttention.

Invoked as ``python -m cuflash bench-sparse [options]`` (``__main__`` calls ``main(argv)``).

Both libraries run in one process, on the same random normal bf16 inputs and the same block mask
(128 x 128 blocks, FlexAttention's default BLOCK_SIZE, so both see the same blocks):

* ``cuflash`` -- ``cuflash.flash_attn_func(q, k, v, block_mask=m)`` on (batch, seqlen, heads, dim);
  always ``causal=False``: the causal pattern is given by the block mask as well.
* ``flex``    -- ``torch.compile(flex_attention)`` (compiled once, static shapes, warmed up before
  timing) on contiguous (batch, heads, seqlen, dim) copies of the same tensors.

Flex masks.  Element-level patterns (``causal``: q_idx >= kv_idx; ``sliding_window_1024``:
0 <= q_idx - kv_idx < 1024, i.e. cuflash's ``sliding_window(left=1023, right=0)``) go through
``create_block_mask`` with the same mask_mod, so flex applies it to its partial blocks as cuflash
applies its element bits.  Block-level patterns have no partial blocks: their flex mask is built
with ``BlockMask.from_kv_blocks`` from the cuflash mask's block states, every visited block listed
as *full* (``full_kv_num_blocks`` / ``full_kv_indices``; the leading ``kv_num_blocks`` / ``kv_indices``
pair is flex's *partial* list, where the mask_mod runs, and is left empty).  Every case checks that
flex's block lists decode to exactly cuflash's block states.

Suites (``suite`` in the JSON records):

* ``cases`` -- seqlen 16384, batch 1, heads = 2048 / headdim, headdim 64 and 128, masks causal,
  sliding_window_1024, random_0.1 (each block kept with probability 0.1, plus the diagonal so no
  row is empty), butterfly (r XOR c zero or a power of two) and local_global
  (``BlockMask.local_global_random`` with LOCAL_GLOBAL below); passes fwd and fwd_bwd.
* ``sweep`` -- headdim 128, seqlen 16384, random masks with exactly round(s * nk) blocks in every
  query block row (random columns, seeded) for s in 1, 0.5, 0.25, 0.1, 0.05.  The time should
  fall in proportion: time(s) <= 1.25 * s * time(1) + a fixed floor; the table shows t/t1 and
  t/(s t1).
* ``long``  -- local_global at 16K, 32K and 65,536 tokens, batch 1, 16 heads, headdim 128,
  fwd_bwd, cuflash only (``--long-flex`` adds flex): median time and peak memory, which should
  grow linearly with the length.

Each case checks cuflash against flex once: max |out difference| < 2e-2 and, when fwd_bwd runs,
max |dq|, |dk|, |dv| differences < 5e-2 (recorded as ``max_abs_diff`` and ``max_abs_diff_grads``).
Timings are medians of individually CUDA-event-timed calls after warm-up (``_bench.time_fn``).
FLOPs count only visited blocks: FlashAttention's dense count 4 * batch * seqlen_q * seqlen_k *
heads * headdim (x 3.5 for fwd_bwd) times the mask's block density (partial blocks count in full).
The JSON file has ``_bench``'s format, each record with a ``mask`` field
{"pattern", "density", "block"} and, for cuflash, ``speedup_vs_flex`` (flex ms / cuflash ms).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import math
import sys

import numpy as np

from . import _bench
from ._bench import first_line, free_memory, log, oom_error
from .masks import BlockMask

BLOCK = 128                 # FlexAttention's default BLOCK_SIZE
SEQLEN = 16384
HIDDEN = 2048               # heads = HIDDEN / headdim
DEFAULT_HEADDIMS = (64, 128)
WINDOW = 1024
MASKS = ("causal", "sliding_window_1024", "random_0.1", "butterfly", "local_global")
PASSES = ("fwd", "fwd_bwd")
IMPLS = ("cuflash", "flex")
LOCAL_GLOBAL = {"local_blocks": 1, "global_blocks": 1, "random_blocks": 1, "seed": 0}
RANDOM_SEED = 0
SWEEP_DENSITIES = (1.0, 0.5, 0.25, 0.1, 0.05)
SWEEP_HEADDIM = 128
SWEEP_BAR = 1.25
LONG_SEQLENS = (16384, 32768, 65536)
LONG_NHEADS = 16
LONG_HEADDIM = 128
OUT_TOL = 2e-2
GRAD_TOL = 5e-2


# ----------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------

def causal_mod(b, h, q_idx, kv_idx):
    """FlexAttention mask_mod of causal (seqlen_q == seqlen_k, so top-left = bottom-right)."""
    return q_idx >= kv_idx


def sliding_window_mod(b, h, q_idx, kv_idx):
    """FlexAttention mask_mod of the causal window of WINDOW keys (the query's own included)."""
    d = q_idx - kv_idx
    return (d >= 0) & (d < WINDOW)


def build_mask(pattern, seqlen, seed=RANDOM_SEED):
    """(cuflash BlockMask, flex mask_mod or None) of a pattern name on seqlen x seqlen.

    The mask_mod is given for element-level patterns (they have partial blocks); block-level
    patterns ("random_P", "density_S", "butterfly", "local_global") have only full blocks and None.
    "random_P": each block kept with probability P, plus the diagonal.  "density_S": exactly
    max(1, round(S * nk)) random blocks in every query block row.
    """
    nb = -(-seqlen // BLOCK)
    if pattern == "causal":
        return BlockMask.causal(seqlen, seqlen, BLOCK, BLOCK), causal_mod
    if pattern == f"sliding_window_{WINDOW}":
        return BlockMask.sliding_window(seqlen, seqlen, WINDOW - 1, 0, BLOCK, BLOCK), sliding_window_mod
    if pattern == "butterfly":
        return BlockMask.butterfly(seqlen, seqlen, BLOCK, BLOCK), None
    if pattern == "local_global":
        return BlockMask.local_global_random(seqlen, seqlen, **LOCAL_GLOBAL, block_m=BLOCK, block_n=BLOCK), None
    rng = np.random.default_rng(seed)
    if pattern.startswith("random_"):
        dense = rng.random((nb, nb)) < float(pattern[len("random_"):])
        np.fill_diagonal(dense, True)
        return BlockMask.from_dense(dense, seqlen, seqlen, BLOCK, BLOCK), None
    if pattern.startswith("density_"):
        count = max(1, round(float(pattern[len("density_"):]) * nb))
        columns = np.argsort(rng.random((nb, nb)), axis=1)[:, :count]
        dense = np.zeros((nb, nb), bool)
        np.put_along_axis(dense, columns, True, axis=1)
        return BlockMask.from_dense(dense, seqlen, seqlen, BLOCK, BLOCK), None
    raise ValueError(f"unknown mask pattern {pattern!r}")


def kv_block_lists(states):
    """FlexAttention's (kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices), numpy int32,
    from cuflash block states (B', H', nq, nk; 0 skip, 1 partial, 2 full).  The first pair lists
    the partial blocks (flex applies the mask_mod there), the second the full ones; each row's
    indices ascending first, as flex's own _dense_to_ordered writes them."""
    def lists(visit):
        count = visit.sum(axis=-1).astype(np.int32)
        index = np.argsort(~visit, axis=-1, kind="stable").astype(np.int32)
        return count, index
    return (*lists(states == 1), *lists(states == 2))


def states_from_kv_blocks(kv_num_blocks, kv_indices, full_kv_num_blocks, full_kv_indices, nk):
    """The inverse of kv_block_lists: int8 (B', H', nq, nk) block states (full lists may be None)."""
    states = np.zeros((*kv_indices.shape[:-1], nk), np.int8)
    for count, index, value in ((kv_num_blocks, kv_indices, 1), (full_kv_num_blocks, full_kv_indices, 2)):
        if count is None:
            continue
        valid = np.arange(index.shape[-1]) < count[..., None]
        b, h, q, slot = np.nonzero(valid)
        states[b, h, q, index[b, h, q, slot]] = value
    return states


def flex_block_mask(m, mask_mod, device="cuda"):
    """The FlexAttention BlockMask visiting the same blocks as cuflash mask m."""
    import torch
    from torch.nn.attention.flex_attention import BlockMask as FlexBlockMask
    from torch.nn.attention.flex_attention import create_block_mask
    if mask_mod is not None:
        return create_block_mask(mask_mod, None, None, m.seqlen_q, m.seqlen_k, device=device,
                                 BLOCK_SIZE=(m.block_m, m.block_n))
    states = m.to_dense()
    if (states == 1).any():
        raise ValueError("a mask with partial blocks needs its mask_mod")
    lists = [torch.as_tensor(a, device=device) for a in kv_block_lists(states)]
    return FlexBlockMask.from_kv_blocks(*lists, BLOCK_SIZE=(m.block_m, m.block_n),
                                        seq_lengths=(m.seqlen_q, m.seqlen_k))


def flex_states(fbm, nk):
    """Block states (0 skip, 1 partial, 2 full) that a FlexAttention BlockMask visits."""
    def host(t):
        return None if t is None else t.cpu().numpy()
    return states_from_kv_blocks(host(fbm.kv_num_blocks), host(fbm.kv_indices),
                                 host(fbm.full_kv_num_blocks), host(fbm.full_kv_indices), nk)


# ----------------------------------------------------------------------------
# Implementations: fn(q, k, v, causal) as _bench.make_pass_call expects; causal is ignored
# ----------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def compiled_flex():
    """torch.compile(flex_attention), built once; static shapes, a recompile limit above the cases."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention
    for key in ("recompile_limit", "cache_size_limit"):
        with contextlib.suppress(Exception):
            setattr(torch._dynamo.config, key, max(getattr(torch._dynamo.config, key), 64))
    return torch.compile(flex_attention, dynamic=False)


def cuflash_fn(m):
    import cuflash

    def run(q, k, v, causal=False):
        return cuflash.flash_attn_func(q, k, v, block_mask=m)
    return run


def flex_fn(fbm):
    flex = compiled_flex()

    def run(q, k, v, causal=False):
        return flex(q, k, v, block_mask=fbm)
    return run


def _max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


def compare(cu, fx, qkv, qkv_flex, grads):
    """Max abs differences cuflash - flex: {"out"} and, when grads, {"dq", "dk", "dv"}.
    Also the first flex calls, which compile it (without and with autograd)."""
    import torch
    with torch.no_grad():
        diffs = {"out": _max_diff(cu(*qkv), fx(*qkv_flex).transpose(1, 2))}
    if grads:
        dout = torch.randn_like(qkv[0])
        leaves = [x.detach().requires_grad_() for x in qkv]
        g = torch.autograd.grad(cu(*leaves), leaves, dout)
        leaves = [x.detach().requires_grad_() for x in qkv_flex]
        g_fx = torch.autograd.grad(fx(*leaves), leaves, dout.transpose(1, 2).contiguous())
        for name, a, b in zip(("dq", "dk", "dv"), g, g_fx):
            diffs[name] = _max_diff(a, b.transpose(1, 2))
    return diffs


def check_fields(diffs, pass_):
    """Record fields of a compare() result for one pass: the output difference, for fwd_bwd the
    gradients' too, and whether they are within tolerance."""
    fields = {"max_abs_diff": diffs["out"]}
    good = math.isfinite(diffs["out"]) and diffs["out"] < OUT_TOL
    grads = {k: v for k, v in diffs.items() if k != "out"}
    if pass_ == "fwd_bwd" and grads:
        fields["max_abs_diff_grads"] = grads
        good = good and all(math.isfinite(v) and v < GRAD_TOL for v in grads.values())
    fields["correct"] = good
    return fields


# ----------------------------------------------------------------------------
# One case: mask, inputs, check, timings
# ----------------------------------------------------------------------------

def visited_flops(batch, seqlen, nheads, headdim, density, pass_):
    """Dense FLOPs of the pass times the block density: only visited blocks count."""
    return _bench.flops(batch, seqlen, seqlen, nheads, headdim, False, pass_) * density


def make_record(suite, pattern, m, pass_, impl, batch, nheads, headdim, res):
    n_flops = visited_flops(batch, m.seqlen_q, nheads, headdim, m.density, pass_)
    return {
        "suite": suite, "pass": pass_, "impl": impl, "dtype": "bfloat16", "headdim": headdim,
        "causal": False, "batch": batch, "nheads": nheads, "seqlen_q": m.seqlen_q, "seqlen_k": m.seqlen_k,
        "mask": {"pattern": pattern, "density": m.density, "block": [m.block_m, m.block_n]},
        "ms": res["ms"], "tflops": _bench.tflops_per_s(n_flops, res["ms"]),
        "peak_mib": res["peak_mib"], "reps": res["reps"],
    }


def run_case(suite, pattern, seqlen, batch, nheads, headdim, passes, impls, timing, results):
    """Time every pass and impl on one mask and shape; append records to results.
    Returns False when cuflash failed to run or disagreed with flex."""
    import torch
    oom = oom_error()
    m, mask_mod = build_mask(pattern, seqlen)
    log(f"\n[{suite}: {pattern} density={m.density:.4f} seqlen={seqlen} batch={batch} "
         f"nheads={nheads} headdim={headdim}]")
    free_memory()
    ok = True
    try:
        input_sets = _bench.make_inputs(batch, seqlen, nheads, headdim, torch.bfloat16)
    except oom:
        free_memory()
        log("  out of memory allocating inputs -- skipping case")
        return ok
    fns, sets = {"cuflash": cuflash_fn(m)}, {"cuflash": input_sets}
    if "flex" in impls:
        try:
            fbm = flex_block_mask(m, mask_mod)
            if not np.array_equal(flex_states(fbm, m.shape[-1]), m.to_dense()):
                raise RuntimeError("flex's block mask visits other blocks than cuflash's")
            fns["flex"] = flex_fn(fbm)
            sets["flex"] = [tuple(x.transpose(1, 2).contiguous() for x in qkv) for qkv in input_sets]
        except Exception as exc:
            log(f"  flex skipped: {first_line(exc)}")

    diffs = {}
    if "flex" in fns:
        try:
            diffs = compare(fns["cuflash"], fns["flex"], input_sets[0], sets["flex"][0], "fwd_bwd" in passes)
            good = check_fields(diffs, "fwd_bwd")["correct"]
            log("  cuflash - flex: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
                 + ("" if good else f"  !!! OVER TOLERANCE (out {OUT_TOL}, grads {GRAD_TOL})"))
            ok = ok and good
        except Exception as exc:
            log(f"  check skipped: {first_line(exc)}")
        free_memory()

    for pass_ in passes:
        recs = {}
        for impl, fn in fns.items():
            try:
                res = _bench.run_impl(fn, contextlib.nullcontext, sets[impl], False, timing, pass_)
            except Exception as exc:
                why = "out of memory" if isinstance(exc, oom) else first_line(exc)
                log(f"  {pass_:<7} {impl:<7} skipped: {why}")
                ok = ok and impl != "cuflash"
                free_memory()
                continue
            rec = make_record(suite, pattern, m, pass_, impl, batch, nheads, headdim, res)
            if impl == "cuflash" and diffs:
                rec.update(check_fields(diffs, pass_))
            recs[impl] = rec
            results.append(rec)
            log(f"  {pass_:<7} {impl:<7} {rec['ms']:9.3f} ms {rec['tflops']:7.1f} TFLOP/s "
                 f"{rec['peak_mib']:9.1f} MiB  ({rec['reps']} reps)")
        if "cuflash" in recs and "flex" in recs:
            recs["cuflash"]["speedup_vs_flex"] = recs["flex"]["ms"] / recs["cuflash"]["ms"]
    del input_sets, sets
    return ok


# ----------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------

def _ms(rec):
    return f"{rec['ms']:9.3f}" if rec else f"{'-':>9}"


def format_cases(results):
    """Per (pattern, headdim, pass): cuflash and flex ms, speedup, TFLOP/s, max abs diff."""
    rows = {}
    for r in results:
        if r["suite"] == "cases":
            rows.setdefault((r["mask"]["pattern"], r["headdim"], r["pass"]), {})[r["impl"]] = r
    header = (f"{'mask':<20} {'hd':>4} {'pass':<7} {'density':>7} | {'cuflash':>9} {'flex':>9} ms | "
              f"{'speedup':>7} | {'TF/s cu':>7} {'TF/s fx':>7} | maxdiff")
    lines = ["cases (ms, lower is better; speedup = flex ms / cuflash ms)", header, "-" * len(header)]
    for (pattern, hd, pass_), row in rows.items():
        cu, fx = row.get("cuflash"), row.get("flex")
        density = (cu or fx)["mask"]["density"]
        speedup = f"{fx['ms'] / cu['ms']:.2f}x" if cu and fx else "-"
        diff = cu.get("max_abs_diff") if cu else None
        if diff is not None and pass_ == "fwd_bwd" and cu.get("max_abs_diff_grads"):
            diff = max(diff, *cu["max_abs_diff_grads"].values())
        flag = "" if not cu or cu.get("correct", True) else " FAIL"
        lines.append(
            f"{pattern:<20} {hd:>4} {pass_:<7} {density:7.4f} | {_ms(cu)} {_ms(fx)}    | {speedup:>7} | "
            + "".join(f"{r['tflops']:7.1f} " if r else f"{'-':>7} " for r in (cu, fx))
            + (f"| {diff:.1e}{flag}" if diff is not None else f"| -{flag}"))
    return "\n".join(lines)


def format_sweep(results):
    """Per pass and density s: ms, t/t1 and t/(s t1) of each impl (t1: the density-1 time)."""
    rows = {}
    for r in results:
        if r["suite"] == "sweep":
            rows.setdefault((r["pass"], r["mask"]["density"]), {})[r["impl"]] = r
    header = (f"{'pass':<7} {'density':>7} | {'cu ms':>9} {'t/t1':>6} {'t/(s t1)':>8} | "
              f"{'flex ms':>9} {'t/t1':>6} {'t/(s t1)':>8} | speedup")
    lines = [f"density sweep (bar: t(s) <= {SWEEP_BAR} * s * t(1) + a fixed floor; "
             f"t/(s t1) <= {SWEEP_BAR} meets it with no floor)", header, "-" * len(header)]
    for (pass_, s), row in sorted(rows.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        line = f"{pass_:<7} {s:7.4f} |"
        for impl in IMPLS:
            r, t1 = row.get(impl), rows.get((pass_, 1.0), {}).get(impl)
            if r and t1:
                ratio = r["ms"] / t1["ms"]
                line += f" {_ms(r)} {ratio:6.3f} {ratio / s:8.2f} |"
            else:
                line += f" {_ms(r)} {'-':>6} {'-':>8} |"
        cu, fx = row.get("cuflash"), row.get("flex")
        line += f" {fx['ms'] / cu['ms']:.2f}x" if cu and fx else " -"
        lines.append(line)
    return "\n".join(lines)


def format_long(results):
    """Per impl and length: ms, TFLOP/s, peak MiB, MiB per 1K tokens, growth vs the shortest."""
    recs = sorted((r for r in results if r["suite"] == "long"), key=lambda r: (r["impl"], r["seqlen_q"]))
    header = (f"{'impl':<8} {'seqlen':>6} {'density':>7} | {'ms':>9} {'TF/s':>6} | {'peak MiB':>9} "
              f"{'MiB/1K':>7} | x len  x ms  x mem")
    lines = ["long run (local_global, fwd_bwd; linear memory: MiB/1K tokens constant)", header, "-" * len(header)]
    base = {}
    for r in recs:
        b = base.setdefault(r["impl"], r)
        lines.append(
            f"{r['impl']:<8} {r['seqlen_q']:>6} {r['mask']['density']:7.4f} | {r['ms']:9.3f} {r['tflops']:6.1f} | "
            f"{r['peak_mib']:9.1f} {r['peak_mib'] / r['seqlen_q'] * 1024:7.2f} | "
            f"{r['seqlen_q'] / b['seqlen_q']:5.1f} {r['ms'] / b['ms']:5.2f} {r['peak_mib'] / b['peak_mib']:5.2f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------

def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m cuflash bench-sparse",
                                description="Time cuflash block-sparse attention against compiled "
                                            "FlexAttention with the same block masks (bf16).")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--quick", action="store_true", help="fewer repetitions")
    p.add_argument("--seqlen", type=int, default=SEQLEN, help="cases and sweep length (default %(default)s)")
    p.add_argument("--headdims", nargs="+", type=int, default=list(DEFAULT_HEADDIMS),
                   help="head dimensions of the cases (default %(default)s)")
    p.add_argument("--masks", nargs="+", choices=MASKS, default=list(MASKS), help="mask patterns of the cases")
    p.add_argument("--passes", nargs="+", choices=PASSES, default=list(PASSES),
                   help="passes of the cases and sweep (default %(default)s)")
    p.add_argument("--no-cases", action="store_true", help="skip the mask-pattern cases")
    p.add_argument("--no-sweep", action="store_true", help="skip the density sweep")
    p.add_argument("--no-long", action="store_true", help="skip the long-sequence run")
    p.add_argument("--long-seqlens", nargs="+", type=int, default=list(LONG_SEQLENS),
                   help="lengths of the long run (default %(default)s)")
    p.add_argument("--long-flex", action="store_true", help="time flex in the long run too")
    args = p.parse_args(argv)
    for hd in args.headdims:
        if hd <= 0 or HIDDEN % hd:
            p.error(f"headdim {hd} does not divide the hidden size {HIDDEN}")
    if min(args.seqlen, *args.long_seqlens) < BLOCK:
        p.error(f"sequence lengths must be at least {BLOCK}")
    return args


def main(argv):
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("error: `cuflash bench-sparse` needs PyTorch (pip install torch).", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: `cuflash bench-sparse` needs a CUDA GPU.", file=sys.stderr)
        return 2
    timing = _bench.QUICK_TIMING if args.quick else _bench.Timing()
    passes = list(dict.fromkeys(args.passes))
    log(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
         f"cuda {torch.version.cuda}  cupy {_bench.cupy_version()}")
    torch.manual_seed(0)
    results, ok = [], True
    try:
        for headdim in dict.fromkeys(args.headdims) if not args.no_cases else ():
            for pattern in dict.fromkeys(args.masks):
                ok &= run_case("cases", pattern, args.seqlen, 1, HIDDEN // headdim, headdim, passes,
                               IMPLS, timing, results)
        if not args.no_sweep:
            for s in SWEEP_DENSITIES:
                ok &= run_case("sweep", f"density_{s:g}", args.seqlen, 1, HIDDEN // SWEEP_HEADDIM,
                               SWEEP_HEADDIM, passes, IMPLS, timing, results)
        if not args.no_long:
            impls = IMPLS if args.long_flex else ("cuflash",)
            for seqlen in dict.fromkeys(args.long_seqlens):
                ok &= run_case("long", "local_global", seqlen, 1, LONG_NHEADS, LONG_HEADDIM, ["fwd_bwd"],
                               impls, timing, results)
    except KeyboardInterrupt:
        log("\ninterrupted -- reporting what was measured so far")

    for suite, table in (("cases", format_cases), ("sweep", format_sweep), ("long", format_long)):
        if any(r["suite"] == suite for r in results):
            log("\n" + table(results))
    if args.json:
        _bench.write_json(args.json, argv, results, program="python -m cuflash bench-sparse")
        log(f"wrote {args.json}")
    if not ok:
        log("!!! cuflash failed to run or disagreed with flex (see above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
