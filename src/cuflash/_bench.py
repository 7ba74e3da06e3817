"""Benchmark of the cuflash forward pass against PyTorch attention implementations.

Invoked as ``python -m cuflash bench [options]`` (``__main__`` calls ``main(argv)``).

All implementations are timed in one process on the same random inputs:

* ``cuflash``         -- ``cuflash.flash_attn_func``
* ``sdpa_flash``      -- ``torch.nn.functional.scaled_dot_product_attention`` forced
  ``sdpa_cudnn``         to one backend with ``torch.nn.attention.sdpa_kernel``
  ``sdpa_efficient``
  ``sdpa_math``
* ``standard``        -- plain torch: softmax(q @ k^T * scale) @ v
* ``fa4``             -- FlashAttention-4 (``flash_attn.cute.flash_attn_func``, CuTe-DSL kernels with
                         an sm90 path), where it is importable; skipped with the reason otherwise

Shapes follow FlashAttention-2's benchmark: batch * seqlen = 16384 tokens, hidden
size 2048 (nheads = 2048 / headdim).  Each timing is the median of many
individually event-timed calls.  FLOPs use FlashAttention's count
(4 * batch * seqlen_q * seqlen_k * nheads * headdim, halved when causal).

Passes: "fwd" (forward, no autograd), "bwd" (the backward of a forward done outside the timed
region) and "fwd_bwd" (both); FLOPs of the backward are 2.5x the forward's.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time
import warnings

IMPLS = ("cuflash", "fa4", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "sdpa_math", "standard")
SHORT_NAMES = {
    "cuflash": "cuflash",
    "fa4": "fa4",
    "sdpa_flash": "flash",
    "sdpa_cudnn": "cudnn",
    "sdpa_efficient": "effic",
    "sdpa_math": "math",
    "standard": "std",
}
# Implementations that materialise the (seqlen_q x seqlen_k) score matrix.
QUADRATIC_IMPLS = ("sdpa_math", "standard")

# FLOPs of each pass relative to the forward pass (FlashAttention's convention).
PASS_FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}
IMPLEMENTED_PASSES = ("fwd", "bwd", "fwd_bwd")

DTYPE_ALIASES = {
    "float16": "float16", "fp16": "float16", "half": "float16", "f16": "float16",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
}
SHORT_DTYPE = {"float16": "fp16", "bfloat16": "bf16"}

TOTAL_TOKENS = 16384
HIDDEN = 2048
DEFAULT_HEADDIMS = [64, 128, 256]
DEFAULT_SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
QUICK_SEQLENS = [1024, 4096]

ROTATE_BELOW_BYTES = 100e6      # rotate among several input sets when q+k+v is smaller
N_ROTATING_SETS = 3
QUADRATIC_MEM_FRACTION = 0.4    # max share of free GPU memory for the score matrices
MAX_ABS_DIFF_TOL = 2e-2         # loose check for random normal inputs


@dataclasses.dataclass
class Timing:
    warmup_calls: int = 5       # at least this many warm-up calls ...
    warmup_ms: float = 100.0    # ... and until this much wall time is spent
    min_reps: int = 30          # at least this many timed samples ...
    target_ms: float = 200.0    # ... and about this much GPU time per impl
    max_reps: int = 10000
    fixed_reps: int | None = None  # --reps N: exactly N samples


QUICK_TIMING = Timing(warmup_calls=3, warmup_ms=30.0, min_reps=10, target_ms=50.0)


# ----------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------

def flops(batch, seqlen_q, seqlen_k, nheads, headdim, causal, pass_="fwd"):
    """FlashAttention's FLOP count for one attention call of the given pass."""
    f = 4.0 * batch * seqlen_q * seqlen_k * nheads * headdim
    if causal:
        f /= 2
    return f * PASS_FLOP_FACTOR[pass_]


def tflops_per_s(n_flops, ms):
    return n_flops / (ms * 1e-3) / 1e12


def log(msg=""):
    print(msg, flush=True)


def first_line(exc):
    text = str(exc).strip().splitlines()
    line = text[0] if text else ""
    return f"{type(exc).__name__}: {line}"[:200]


def _torch_dtype(name):
    import torch
    return {"float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def oom_error():
    import torch
    return getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def free_memory():
    import torch
    torch.cuda.synchronize()
    torch.cuda.empty_cache()


def make_inputs(batch, seqlen, nheads, headdim, dtype, device="cuda"):
    """Random (q, k, v) sets of shape (batch, seqlen, nheads, headdim).

    Returns several distinct sets when they are small, so that the timed loop
    can rotate among them and not only measure L2-resident data.
    """
    import torch
    shape = (batch, seqlen, nheads, headdim)
    set_bytes = 3 * math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    n_sets = N_ROTATING_SETS if set_bytes < ROTATE_BELOW_BYTES else 1
    return [
        tuple(torch.randn(shape, dtype=dtype, device=device) for _ in range(3))
        for _ in range(n_sets)
    ]


# ----------------------------------------------------------------------------
# Implementations: each is fn(q, k, v, causal) -> out (batch, seqlen, nheads, headdim)
# plus a factory of the context manager it must run in.
# ----------------------------------------------------------------------------

def standard_attention(q, k, v, causal):
    """Plain attention in torch: scores in the input dtype, softmax in fp32."""
    import torch
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = torch.matmul(qt, kt.transpose(-2, -1)) * scale
    if causal:
        sq, sk = scores.shape[-2], scores.shape[-1]
        mask = torch.ones(sq, sk, dtype=torch.bool, device=q.device).triu_(1)
        scores = scores.masked_fill(mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return torch.matmul(probs, vt).transpose(1, 2)


def _sdpa(q, k, v, causal):
    import torch
    out = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal)
    return out.transpose(1, 2)


def _sdpa_backend(name):
    from torch.nn.attention import SDPBackend
    return {
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa_math": SDPBackend.MATH,
    }[name]


def get_impl(name):
    """Return (fn, context_factory) for an implementation name."""
    if name == "cuflash":
        import cuflash

        def run_cuflash(q, k, v, causal):
            return cuflash.flash_attn_func(q, k, v, causal=causal)

        return run_cuflash, contextlib.nullcontext
    if name == "standard":
        return standard_attention, contextlib.nullcontext
    if name == "fa4":
        from flash_attn.cute import flash_attn_func as fa4_attention  # raises where FA4 is not installed

        def run_fa4(q, k, v, causal):
            out = fa4_attention(q, k, v, causal=causal)
            return out[0] if isinstance(out, tuple) else out  # (out, lse) in some versions

        return run_fa4, contextlib.nullcontext
    from torch.nn.attention import sdpa_kernel
    backend = _sdpa_backend(name)
    return _sdpa, (lambda: sdpa_kernel(backend))


# ----------------------------------------------------------------------------
# Timing and memory
# ----------------------------------------------------------------------------

def _timed_calls(call, n_sets, n, offset=0):
    """Run call(set_index) n times back to back, each between its own event pair; return ms list."""
    import torch
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        starts[i].record()
        call((offset + i) % n_sets)
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_fn(call, n_sets, timing):
    """Warm up, then time many individual calls; return (median ms, number of samples)."""
    warm = []
    t0 = time.perf_counter()
    while (len(warm) < timing.warmup_calls
           or (time.perf_counter() - t0) * 1e3 < timing.warmup_ms):
        warm += _timed_calls(call, n_sets, 1, offset=len(warm))
    if timing.fixed_reps:
        reps = timing.fixed_reps
    else:
        est_ms = max(statistics.median(warm[1:] or warm), 1e-3)
        reps = math.ceil(timing.target_ms / est_ms)
        reps = min(max(reps, timing.min_reps), timing.max_reps)
    samples = _timed_calls(call, n_sets, reps)
    return statistics.median(samples), reps


def measure_peak_mib(call):
    """Peak memory allocated by torch during one call (outputs included), in MiB."""
    import torch
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = call(0)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2**20


def make_pass_call(fn, input_sets, causal, pass_):
    """call(set_index) running one pass: the forward (no autograd), the backward of a forward done
    beforehand (outside the timed region), or forward and backward together."""
    import torch
    if pass_ == "fwd":
        def call(i):
            with torch.no_grad():
                return fn(*input_sets[i], causal)
        return call
    leaves = [tuple(x.detach().requires_grad_() for x in qkv) for qkv in input_sets]
    douts = [torch.randn_like(qkv[0]) for qkv in input_sets]
    if pass_ == "bwd":
        outs = [fn(*qkv, causal) for qkv in leaves]

        def call(i):
            return torch.autograd.grad(outs[i], leaves[i], douts[i], retain_graph=True)
        return call

    def call(i):
        return torch.autograd.grad(fn(*leaves[i], causal), leaves[i], douts[i])
    return call


def run_impl(fn, context_factory, input_sets, causal, timing, pass_="fwd"):
    """Time one implementation on one shape and pass; return dict(ms, peak_mib, reps)."""
    with context_factory():
        call = make_pass_call(fn, input_sets, causal, pass_)
        peak_mib = measure_peak_mib(call)  # also the very first call
        ms, reps = time_fn(call, len(input_sets), timing)
    return {"ms": ms, "peak_mib": peak_mib, "reps": reps}


def quadratic_allowed(batch, nheads, seqlen_q, seqlen_k, max_seqlen):
    """Whether math/standard may run: (ok, reason when not)."""
    import torch
    if max(seqlen_q, seqlen_k) > max_seqlen:
        return False, f"seqlen > {max_seqlen} (see --quadratic-max-seqlen)"
    est = batch * nheads * seqlen_q * seqlen_k * 4 * 3
    free = torch.cuda.mem_get_info()[0]
    if est > QUADRATIC_MEM_FRACTION * free:
        return False, (f"score matrices ~{est / 2**30:.1f} GiB > "
                       f"{QUADRATIC_MEM_FRACTION:.0%} of free {free / 2**30:.1f} GiB")
    return True, ""


# ----------------------------------------------------------------------------
# Correctness check of cuflash
# ----------------------------------------------------------------------------

def reference_output(q, k, v, causal, allow_math):
    """SDPA reference output: fp32 efficient, else fp32 math, else flash. (out, name)."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    options = [("sdpa_efficient_fp32", SDPBackend.EFFICIENT_ATTENTION, True)]
    if allow_math:
        options.append(("sdpa_math_fp32", SDPBackend.MATH, True))
    options.append(("sdpa_flash", SDPBackend.FLASH_ATTENTION, False))
    for name, backend, upcast in options:
        try:
            args = [x.float() for x in (q, k, v)] if upcast else [q, k, v]
            with sdpa_kernel(backend), torch.no_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out = _sdpa(*args, causal)
            torch.cuda.synchronize()
            return out, name
        except oom_error():
            free_memory()
        except Exception:
            pass
    return None, None


def check_correctness(fn, q, k, v, causal, allow_math):
    """Compare cuflash with an SDPA reference: (max_abs_diff or None, reference name, ok)."""
    import torch
    with torch.no_grad():
        out = fn(q, k, v, causal)
    ref, ref_name = reference_output(q, k, v, causal, allow_math)
    if ref is None:
        return None, None, False
    if tuple(out.shape) != tuple(ref.shape):
        log(f"!!! cuflash output shape {tuple(out.shape)} != expected {tuple(ref.shape)}")
        return None, ref_name, False
    diff = (out.float() - ref.float()).abs().max().item()
    ok = math.isfinite(diff) and diff < MAX_ABS_DIFF_TOL
    del out, ref
    return diff, ref_name, ok


# ----------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------

def _fmt_ratio(a, b):
    return f"{a / b:.2f}x" if a and b else "-"


def format_table(results):
    """One row per (dtype, headdim, causal, seqlen): TFLOP/s per impl, cuflash/peer ratios."""
    impls = [i for i in IMPLS if any(r["impl"] == i for r in results)]
    peers = [i for i in impls if i != "cuflash"] if "cuflash" in impls else []
    rows = {}
    for r in results:
        key = (r["pass"], r["dtype"], r["headdim"], r["causal"], r["seqlen_q"])
        rows.setdefault(key, {})[r["impl"]] = r
    header = f"{'pass':<7} {'dtype':<5} {'hd':>4} {'causal':<6} {'seqlen':>6} |"
    header += "".join(f"{SHORT_NAMES[i]:>8}" for i in impls) + " |"
    header += "".join(f"{'vs ' + SHORT_NAMES[p]:>9}" for p in peers)
    if "cuflash" in impls:
        header += " | maxdiff"
    lines = ["TFLOP/s (higher is better); vs X = cuflash / X", header, "-" * len(header)]
    for key in sorted(rows):
        pass_, dtype, hd, causal, seqlen = key
        row = rows[key]
        line = f"{pass_:<7} {SHORT_DTYPE.get(dtype, dtype):<5} {hd:>4} {str(causal):<6} {seqlen:>6} |"
        line += "".join(
            f"{row[i]['tflops']:>8.1f}" if i in row else f"{'-':>8}" for i in impls) + " |"
        ours = row.get("cuflash", {}).get("tflops")
        line += "".join(
            f"{_fmt_ratio(ours, row.get(p, {}).get('tflops')):>9}" for p in peers)
        if "cuflash" in impls:
            diff = row.get("cuflash", {}).get("max_abs_diff")
            flag = "" if row.get("cuflash", {}).get("correct", True) else " FAIL"
            line += f" | {diff:.1e}{flag}" if diff is not None else f" | -{flag}"
        lines.append(line)
    # Geometric mean of the ratios over the shapes where both ran.
    summary = []
    for p in peers:
        ratios = [row["cuflash"]["tflops"] / row[p]["tflops"]
                  for row in rows.values() if "cuflash" in row and p in row]
        if ratios:
            gm = math.exp(sum(math.log(x) for x in ratios) / len(ratios))
            summary.append(f"vs {SHORT_NAMES[p]} {gm:.2f}x (n={len(ratios)})")
    if summary:
        lines.append("geomean cuflash/peer: " + ", ".join(summary))
    return "\n".join(lines)


def _git_commit():
    """HEAD of the checkout, or $CUFLASH_COMMIT where the tree has no .git (a copied tree)."""
    if os.environ.get("CUFLASH_COMMIT"):
        return os.environ["CUFLASH_COMMIT"]
    here = os.path.dirname(os.path.abspath(__file__))
    for cwd in (here, os.getcwd()):
        try:
            proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd,
                                  capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            continue
        if proc.returncode == 0 and proc.stdout.strip():
            return proc.stdout.strip()
    return None


def cupy_version():
    try:
        import cupy
        return cupy.__version__
    except Exception:
        return None


def write_json(path, argv, results, program="python -m cuflash bench"):
    """The results as JSON with the device, date, the command (`program` and argv), commit and versions."""
    import torch
    doc = {
        "device": torch.cuda.get_device_name(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([program, *(shlex.quote(a) for a in argv)]),
        "commit": _git_commit(),
        "torch": torch.__version__,
        "cupy": cupy_version(),
        "cuda": torch.version.cuda,
        "results": results,
    }
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


# ----------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------

def _parse_bool(text):
    t = text.strip().lower()
    if t in ("1", "true", "yes", "y", "causal", "on"):
        return True
    if t in ("0", "false", "no", "n", "none", "off"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _parse_dtype(text):
    try:
        return DTYPE_ALIASES[text.strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"unknown dtype {text!r} (use float16/fp16 or bfloat16/bf16)") from None


def parse_args(argv):
    p = argparse.ArgumentParser(
        prog="python -m cuflash bench",
        description="Time the cuflash forward against PyTorch SDPA backends and "
                    "plain torch attention (FlashAttention-2 benchmark shapes).")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON to PATH")
    p.add_argument("--quick", action="store_true",
                   help=f"seqlens {QUICK_SEQLENS} (unless --seqlens) and fewer repetitions")
    p.add_argument("--dtypes", nargs="+", type=_parse_dtype, default=None,
                   help="float16 and/or bfloat16 (default both)")
    p.add_argument("--headdims", nargs="+", type=int, default=None,
                   help=f"head dimensions (default {DEFAULT_HEADDIMS})")
    p.add_argument("--seqlens", nargs="+", type=int, default=None,
                   help=f"sequence lengths (default {DEFAULT_SEQLENS})")
    p.add_argument("--causal", nargs="+", type=_parse_bool, default=None,
                   help="false and/or true (default both)")
    p.add_argument("--passes", nargs="+", choices=IMPLEMENTED_PASSES, default=None,
                   help="fwd, bwd (backward alone, its forward untimed) and/or fwd_bwd (default all)")
    p.add_argument("--impls", nargs="+", choices=IMPLS, default=None,
                   help="implementations to time (default all)")
    p.add_argument("--reps", type=int, default=None,
                   help="exact number of timed repetitions (default: >= 30 and ~200 ms)")
    p.add_argument("--total-tokens", type=int, default=TOTAL_TOKENS,
                   help="batch * seqlen (default %(default)s)")
    p.add_argument("--hidden", type=int, default=HIDDEN,
                   help="nheads * headdim (default %(default)s)")
    p.add_argument("--quadratic-max-seqlen", type=int, default=8192,
                   help="skip sdpa_math and standard above this seqlen (default %(default)s)")
    args = p.parse_args(argv)
    if args.reps is not None and args.reps < 1:
        p.error("--reps must be >= 1")
    for hd in args.headdims or []:
        if hd <= 0 or args.hidden % hd:
            p.error(f"headdim {hd} does not divide hidden size {args.hidden}")
    return args


def _describe_run(name, res):
    return (f"  {name:<15} {res['ms']:9.3f} ms {res['tflops']:7.1f} TFLOP/s "
            f"{res['peak_mib']:9.1f} MiB  ({res['reps']} reps)")


def main(argv):
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("error: `cuflash bench` needs PyTorch (pip install torch); it is not installed.",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: `cuflash bench` needs a CUDA GPU; torch.cuda.is_available() is False.",
              file=sys.stderr)
        return 2

    dtypes = list(dict.fromkeys(args.dtypes or ["float16", "bfloat16"]))
    headdims = list(dict.fromkeys(args.headdims or DEFAULT_HEADDIMS))
    seqlens = list(dict.fromkeys(args.seqlens or (QUICK_SEQLENS if args.quick else DEFAULT_SEQLENS)))
    causals = list(dict.fromkeys(args.causal if args.causal is not None else [False, True]))
    timing = dataclasses.replace(QUICK_TIMING if args.quick else Timing(), fixed_reps=args.reps)
    passes = list(dict.fromkeys(args.passes or IMPLEMENTED_PASSES))

    impls = {}
    failed = False
    for name in (args.impls or IMPLS):
        try:
            impls[name] = get_impl(name)
        except ImportError as exc:  # an optional peer (FlashAttention-4) that is not installed
            log(f"{name}: not installed ({first_line(exc)}) -- skipping it")
            failed = failed or name == "cuflash"
        except Exception as exc:
            log(f"!!! cannot set up {name}: {first_line(exc)} -- skipping it")
            failed = failed or name == "cuflash"

    log(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}  "
         f"cuda {torch.version.cuda}  cupy {cupy_version()}")
    log(f"impls: {', '.join(impls)}")
    torch.manual_seed(0)
    results = []
    oom = oom_error()
    try:
        for dtype_name in dtypes:
            dtype = _torch_dtype(dtype_name)
            for headdim in headdims:
                nheads = args.hidden // headdim
                for causal in causals:
                    for seqlen in seqlens:
                        batch = max(1, args.total_tokens // seqlen)
                        free_memory()
                        log(f"\n[{'/'.join(passes)} {dtype_name} headdim={headdim} causal={causal} "
                             f"seqlen={seqlen} batch={batch} nheads={nheads}]")
                        try:
                            input_sets = make_inputs(batch, seqlen, nheads, headdim, dtype)
                        except oom:
                            free_memory()
                            log("  out of memory allocating inputs -- skipping shape")
                            continue
                        quad_ok, quad_why = quadratic_allowed(
                            batch, nheads, seqlen, seqlen, args.quadratic_max_seqlen)
                        for pass_ in passes:
                            n_flops = flops(batch, seqlen, seqlen, nheads, headdim, causal, pass_)
                            for name, (fn, ctx) in impls.items():
                                if name in QUADRATIC_IMPLS and not quad_ok:
                                    log(f"  {name:<15} skipped: {quad_why}")
                                    continue
                                extra = {}
                                if name == "cuflash" and pass_ == "fwd":
                                    try:
                                        diff, ref_name, ok = check_correctness(
                                            fn, *input_sets[0], causal, quad_ok)
                                    except Exception as exc:
                                        diff, ref_name, ok = None, None, False
                                        log(f"!!! cuflash raised during the check: {first_line(exc)}")
                                    extra = {"max_abs_diff": diff, "reference": ref_name, "correct": ok}
                                    if not ok:
                                        failed = True
                                        log("!" * 78)
                                        log(f"!!! CUFLASH CORRECTNESS CHECK FAILED: max_abs_diff={diff} "
                                             f"(tol {MAX_ABS_DIFF_TOL}) vs {ref_name}")
                                        log("!" * 78)
                                    free_memory()
                                try:
                                    with warnings.catch_warnings(record=True) as caught:
                                        warnings.simplefilter("always")
                                        res = run_impl(fn, ctx, input_sets, causal, timing, pass_)
                                except oom:
                                    free_memory()
                                    log(f"  {name:<15} skipped: out of memory")
                                    continue
                                except Exception as exc:
                                    why = first_line(exc)
                                    if caught:
                                        why += f" ({str(caught[0].message).strip()[:160]})"
                                    log(f"  {name:<15} skipped: {why}")
                                    if name == "cuflash":
                                        failed = True
                                        log("!!! cuflash FAILED to run on this shape")
                                    free_memory()
                                    continue
                                res["tflops"] = tflops_per_s(n_flops, res["ms"])
                                results.append({
                                    "pass": pass_, "impl": name, "dtype": dtype_name,
                                    "headdim": headdim, "causal": causal, "batch": batch,
                                    "nheads": nheads, "seqlen_q": seqlen, "seqlen_k": seqlen,
                                    "mask": "causal" if causal else "none",
                                    "ms": res["ms"], "tflops": res["tflops"],
                                    "peak_mib": res["peak_mib"], "reps": res["reps"], **extra,
                                })
                                line = _describe_run(name, res)
                                if name == "cuflash" and extra.get("max_abs_diff") is not None:
                                    line += f"  max_abs_diff {extra['max_abs_diff']:.2e}"
                                log(line)
                        del input_sets
    except KeyboardInterrupt:
        log("\ninterrupted -- reporting what was measured so far")

    log("\n" + format_table(results))
    if args.json:
        write_json(args.json, argv, results)
        log(f"wrote {args.json}")
    if failed:
        log("!!! cuflash failed a correctness check or failed to run (see above)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
