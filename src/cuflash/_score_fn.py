"""User score and mask functions as CUDA snippets: cuflash.ScoreMod and cuflash.MaskMod.

A snippet is the body of a device function of `score` (the scaled score q·k * softmax_scale, float), `b`
(the batch element, or the sequence of a packed batch), `h` (the query head), `q` and `kv` (positions in
the query and key sequences) and of the names it captures: arrays, indexed as `bias[b][h][q][kv]` and
read as float (integer arrays: as int), and scalars (float, or int). An expression, or statements that
end in `return`:

    cuflash.ScoreMod("score + bias[b][h][q][kv]", bias=bias)
    cuflash.ScoreMod("cap * tanhf(score / cap)", grad="1.f - tanhf(score / cap) * tanhf(score / cap)", cap=30.0)
    cuflash.MaskMod("doc[q] == doc[kv]", doc=doc_ids)
    cuflash.MaskMod("kv <= q || kv < prefix", prefix=128)

A ScoreMod's derivative with respect to the score (`grad`, the same kind of snippet) is derived for sums
of terms without score and `score`, `score * x`, `x * score` or `score / x` (`score * w[h] + bias[h][q][kv]`:
`(w[h])`); other forms must give it.

The snippets become `struct UserMod` (kernels/score_fn.cuh) in a header that NVRTC compiles with the kernel;
the header (the snippets and the captured arrays' types and ranks) is hashed into the kernel cache's key,
the captured values (pointers, strides, scalars) are launch arguments: a new value compiles nothing.
"""
from __future__ import annotations

import hashlib
import keyword
import re
from dataclasses import dataclass

from ._bridge import DeviceArray, describe
from ._compile import USER_HEADER as HEADER_NAME
from ._compile import nvrtc_options

MAX_ARRAYS, MAX_DIMS, MAX_SCALARS = 4, 4, 8  # kernels/score_fn.cuh ModArgs
NO_DSCORE = (0, 0, 0, 0, 0)  # ModArgs' dscore, its strides and scores: no dS kernel
_RESERVED = {"score", "b", "h", "q", "kv", "args_"}
_C_KEYWORDS = {"auto", "bool", "break", "case", "char", "const", "continue", "default", "do", "double", "else",
               "enum", "extern", "float", "for", "goto", "if", "int", "long", "return", "short", "signed",
               "sizeof", "static", "struct", "switch", "typedef", "union", "unsigned", "void", "volatile", "while"}
_C_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "float32": "float", "float64": "double",
            "int8": "signed char", "uint8": "unsigned char", "int16": "short", "int32": "int", "int64": "long long",
            "bool": "bool"}
_INT_SCALAR_LIMIT = 2**24  # int scalars travel as float: exact up to here
HEADERS: dict[str, str] = {}  # digest -> header, for the variants that name a digest (_dispatch.py)
UNIT_GRAD: set[str] = set()  # the digests of headers whose score function's derivative is 1 (unit_grad)


class ScoreFnError(ValueError):
    """A score or mask snippet that does not compile: NVRTC's message, placed on the snippet's own line."""


class ScoreMod:
    """score -> f(score, b, h, q, kv, captures), before the softmax, forward and backward."""

    def __init__(self, code: str, grad: str | None = None, **captures):
        # (Plain attribute work only: torch.compile traces this when the mod is built inside a compiled
        # function; the derivative is derived where the header is written, grad_code.)
        self.code = _check_code(code, "ScoreMod")
        self.grad = _check_code(grad, "ScoreMod grad") if grad is not None else None
        self.captures = captures

    def grad_code(self) -> str:
        """The derivative's snippet: grad as given, or derived for the linear forms (ValueError otherwise)."""
        return self.grad if self.grad is not None else derive_grad(self.code)

    def __repr__(self) -> str:
        return f"ScoreMod({self.code!r}, grad={self.grad!r}, captures={sorted(self.captures)})"


class MaskMod:
    """Which (q, kv) pairs attend: a bool snippet of b, h, q, kv and captures; hidden pairs get -inf."""

    def __init__(self, code: str, **captures):
        self.code = _check_code(code, "MaskMod")
        self.captures = captures

    def __repr__(self) -> str:
        return f"MaskMod({self.code!r}, captures={sorted(self.captures)})"


def _check_code(code, what: str) -> str:
    if not isinstance(code, str) or not code.strip():
        raise TypeError(f"{what}: the snippet must be a non-empty string of CUDA C++, got {code!r}")
    return code.strip()


_BRACKETS = {"(": ")", "[": "]", "{": "}"}


def _top_level(expr: str) -> str:
    """The characters of expr outside any brackets (string and character literals are not expected)."""
    out, depth = [], 0
    for ch in expr:
        if ch in _BRACKETS:
            depth += 1
        elif ch in _BRACKETS.values():
            depth -= 1
        elif depth == 0:
            out.append(ch)
    return "".join(out)


def _uses_score(expr: str) -> bool:
    return re.search(r"\bscore\b", expr) is not None


def derive_grad(code: str) -> str:
    """d(code) / d(score) where code is a sum of terms (binary + and -, nothing that binds more loosely at its
    top level), each without score, or score, `score * f`, `f * score` or `score / f` (f without score; after
    /, without a top-level * or /); ValueError for any other form."""
    from ._capture_grads import top_level_terms, score_factor

    def refuse():
        return ValueError(f"ScoreMod({code!r}): give its derivative with respect to score as grad=...; it is "
                          f"derived only for sums of terms without score and score, score * x, x * score or "
                          f"score / x")
    if set("?:,=<>|&;!{}") & set(_top_level(code)):  # (looser than + and -, or statements)
        raise refuse()
    parts = []
    for sign, term in top_level_terms(code):
        if not _uses_score(term):
            continue
        factor = score_factor(term)
        if factor is None:
            m = re.fullmatch(r"score\s*/\s*(.+)", term, re.S)
            if not m or _uses_score(m.group(1)) or set("*/") & set(_top_level(m.group(1))):
                raise refuse()
            parts.append((sign, f"1.f / ({m.group(1)})"))
        else:
            parts.append((sign, f"({factor})" if factor else "1.f"))
    if not parts:
        return "0.f"
    text = ("-" if parts[0][0] < 0 else "") + parts[0][1]
    return text + "".join(f" {'+' if sign > 0 else '-'} {part}" for sign, part in parts[1:])


@dataclass
class _Capture:
    name: str
    declaration: str  # the C++ line that binds the name inside UserMod's functions
    array: object = None  # the DeviceArray of a captured array
    scalar: float | None = None


def _capture(name: str, value, arrays: list, scalars: list) -> _Capture:
    if not name.isidentifier() or name in _RESERVED or name in _C_KEYWORDS or keyword.iskeyword(name) \
            or name.startswith("__"):
        raise ValueError(f"captured name {name!r} is not usable in a snippet (reserved: {sorted(_RESERVED)})")
    if isinstance(value, bool) or isinstance(value, int) and not isinstance(value, float):
        value = int(value)
        if abs(value) >= _INT_SCALAR_LIMIT:
            raise ValueError(f"{name}: int scalars up to 2^24 in magnitude (they travel as float), got {value}")
        scalars.append(float(value))
        return _Capture(name, f"const int {name} = static_cast<int>(args_.scalar{len(scalars) - 1});", scalar=value)
    if isinstance(value, float) or type(value).__module__ == "numpy" and getattr(value, "ndim", 1) == 0:
        scalars.append(float(value))
        return _Capture(name, f"const float {name} = args_.scalar{len(scalars) - 1};", scalar=float(value))
    a = value if isinstance(value, DeviceArray) else describe(value, name)
    if a.dtype not in _C_TYPES:
        raise TypeError(f"{name}: captured arrays of {sorted(_C_TYPES)}, got {a.dtype}")
    if not 1 <= a.ndim <= MAX_DIMS:
        raise ValueError(f"{name}: captured arrays have 1 to {MAX_DIMS} dimensions, got shape {a.shape}")
    arrays.append(a)
    i, ctype = len(arrays) - 1, _C_TYPES[a.dtype]
    # The index type and a unit last stride are the header's (hence the cache key's): int indices where the
    # array spans fewer than 2^31 elements, the common case, keep the kernels' address arithmetic 32-bit.
    span = 1 + sum((n - 1) * abs(st) for n, st in zip(a.shape, a.strides))
    index = "int" if span < 2**31 else "long long"
    unit = "true" if a.strides[-1] == 1 else "false"
    strides = ", ".join(f"static_cast<{index}>(args_.stride{i}_{d})" for d in range(a.ndim))
    return _Capture(name, f"const View<{ctype}, {a.ndim}, {index}, {unit}> {name}{{static_cast<const {ctype}*>("
                          f"args_.array{i}), {{{strides}}}}};", array=a)


def _body(code: str) -> str:
    return code if re.search(r"\breturn\b", code) else f"return ({code});"


@dataclass
class ScoreFn:
    """A call's score and mask functions: the header NVRTC compiles them from, its digest (the kernel cache
    key's part), and the launch arguments (ModArgs' fields) for a softmax scale."""

    header: str
    digest: str
    arrays: list
    scalars: list
    lines: dict  # header line -> (snippet label, line inside the snippet)

    def args(self, softmax_scale: float, dscore: tuple = NO_DSCORE, dpsum: int = 0) -> tuple:
        """dscore: (pointer, batch, head, query strides) of the buffer the dS kernel fills and the pointer of
        one in its layout for the scores (or 0), or zeros; dpsum: the buffer of rowsum(P * dP) (the sinks'
        gradient), or 0."""
        return mod_args([a.ptr for a in self.arrays], [a.strides for a in self.arrays], self.scalars, softmax_scale,
                        dscore, dpsum)

    def launch_key(self) -> tuple:
        """What the launch arguments need besides the arrays' pointers: (digest, strides, scalars), hashable
        (JAX's callbacks, built at trace time, get the pointers at launch)."""
        return self.digest, tuple(tuple(a.strides) for a in self.arrays), tuple(self.scalars)

    def device(self) -> int | None:
        """The CUDA device of the captured arrays (None without any); they must share one."""
        devices = {a.device for a in self.arrays}
        if len(devices) > 1:
            raise ValueError(f"captured arrays on several devices: {sorted(devices)}")
        return devices.pop() if devices else None


def mod_args(ptrs, strides, scalars, softmax_scale: float, dscore: tuple = NO_DSCORE, dpsum: int = 0) -> tuple:
    """ModArgs' fields (kernels/score_fn.cuh), padded with zeros."""
    flat = []
    for i in range(MAX_ARRAYS):
        s = tuple(strides[i]) if i < len(strides) else ()
        flat += list(s) + [0] * (MAX_DIMS - len(s))
    return (*ptrs, *[0] * (MAX_ARRAYS - len(ptrs)), *flat, *scalars, *[0.0] * (MAX_SCALARS - len(scalars)),
            float(softmax_scale), *dscore, dpsum)


def all_captures(score_mod: ScoreMod | None, mask_mod: MaskMod | None) -> dict:
    """The captures of both functions by name, in order; TypeError for a wrong object, ValueError for a name
    bound to two values. (Type tests and attribute reads only: torch.compile traces it.)"""
    if score_mod is not None and not isinstance(score_mod, ScoreMod):
        raise TypeError(f"score_mod must be a cuflash.ScoreMod, got {type(score_mod).__name__}")
    if mask_mod is not None and not isinstance(mask_mod, MaskMod):
        raise TypeError(f"mask_mod must be a cuflash.MaskMod, got {type(mask_mod).__name__}")
    seen: dict = {}
    for mod in (score_mod, mask_mod):
        for name, value in (mod.captures if mod else {}).items():
            if name in seen and seen[name] is not value and not (_is_scalar(value) and seen[name] == value):
                raise ValueError(f"captured name {name!r} is bound to different values in score_mod and mask_mod")
            seen[name] = value
    return seen


def _is_scalar(value) -> bool:
    return isinstance(value, (int, float))


def score_fn(score_mod: ScoreMod | None, mask_mod: MaskMod | None) -> ScoreFn | None:
    """The ScoreFn of a call's score_mod and mask_mod (None for neither); TypeError/ValueError naming the
    argument for a wrong object, capture or snippet."""
    if score_mod is None and mask_mod is None:
        return None
    arrays, scalars = [], []
    captures = [_capture(name, value, arrays, scalars) for name, value in all_captures(score_mod, mask_mod).items()]
    if len(arrays) > MAX_ARRAYS or len(scalars) > MAX_SCALARS:
        raise ValueError(f"a call captures at most {MAX_ARRAYS} arrays and {MAX_SCALARS} scalars, got "
                         f"{len(arrays)} and {len(scalars)}")
    key = (score_mod and score_mod.code, score_mod and score_mod.grad, mask_mod and mask_mod.code,
           tuple(c.declaration for c in captures))
    built = _BUILT.get(key)
    if built is None:  # (each call would otherwise write and hash the header again: tens of microseconds)
        built = _BUILT[key] = _header(score_mod, mask_mod, key[3])
    header, digest, where = built
    return ScoreFn(header, digest, arrays, scalars, where)


def unit_grad(score_mod: ScoreMod | None) -> bool:
    """Whether the score function's derivative with respect to the score is 1 everywhere (additive terms,
    or no score function): the backward kernels then keep no derivative per score."""
    return score_mod is None or score_mod.grad_code().strip() in ("1.f", "1.0f", "1")


_BUILT: dict[tuple, tuple] = {}  # (snippets, capture declarations) -> (header, digest, snippet lines)


def _header(score_mod: ScoreMod | None, mask_mod: MaskMod | None, declarations: tuple) -> tuple[str, str, dict]:
    """The header of struct UserMod, its digest and its snippet lines; compiled alone the first time."""
    lines = ["// cuflash.ScoreMod / MaskMod (_score_fn.py)", "#pragma once", "namespace cuflash {", "struct UserMod {",
             f"  static constexpr bool kScore = {'true' if score_mod else 'false'}, "
             f"kMask = {'true' if mask_mod else 'false'}, kUnitGrad = {'true' if unit_grad(score_mod) else 'false'};"]
    where = {}
    functions = [("score", "float", "float score, int b, int h, int q, int kv", score_mod and score_mod.code, "return score;"),
                 ("grad", "float", "float score, int b, int h, int q, int kv", score_mod and score_mod.grad_code(),
                  "return 1.f;"),
                 ("mask", "bool", "int b, int h, int q, int kv", mask_mod and mask_mod.code, "return true;")]
    for fname, ret, params, code, default in functions:
        lines.append(f"  __device__ __forceinline__ static {ret} {fname}({params}, const ModArgs& args_) {{")
        lines += [f"    {d}" for d in declarations]
        if code is None:
            lines.append(f"    {default}")
        else:
            label = {"score": "ScoreMod", "grad": "ScoreMod grad", "mask": "MaskMod"}[fname]
            for i, text in enumerate(_body(code).splitlines(), 1):
                where[len(lines) + 1] = (label, i, text)
                lines.append(f"    {text}")
        lines.append("  }")
    lines += ["};", "}  // namespace cuflash", ""]
    header = "\n".join(lines)
    digest = hashlib.sha256(header.encode()).hexdigest()[:16]
    if digest not in HEADERS:
        _check_compiles(header, where)
        HEADERS[digest] = header
        if unit_grad(score_mod):
            UNIT_GRAD.add(digest)
    return header, digest, where


_CHECK_SOURCE = """#include "score_fn.cuh"
namespace cuflash {
__global__ void check_user_mod(const ModArgs a, float* out) {
  out[0] = UserMod::score(1.f, 0, 0, 0, 0, a) + UserMod::grad(1.f, 0, 0, 0, 0, a) + UserMod::mask(0, 0, 0, 0, a);
}
}  // namespace cuflash
"""


def _check_compiles(header: str, where: dict) -> None:
    """Compile the snippets alone (a small kernel, no GPU needed), so that a mistake raises here, on its
    snippet's line, rather than inside a kernel's compilation at the first call."""
    from cupy.cuda import nvrtc

    prog = nvrtc.createProgram(_CHECK_SOURCE, "check_user_mod.cu", [header.encode()],
                               [HEADER_NAME.encode()])
    try:
        nvrtc.compileProgram(prog, nvrtc_options("sm_80") + ["-DCUFLASH_USER_MOD"])
    except nvrtc.NVRTCError:
        raise ScoreFnError("the score or mask snippet does not compile:\n" +
                           explain_log(where, nvrtc.getProgramLog(prog))) from None
    finally:
        nvrtc.destroyProgram(prog)


_LOG_LINE = re.compile(re.escape(HEADER_NAME) + r"\((\d+)\): (.*)")


def explain_log(where: dict, log: str) -> str:
    """NVRTC's messages about the snippets, each on its snippet's line; the rest of the log as it is."""
    out = []
    for line in log.splitlines():
        m = _LOG_LINE.search(line)
        if m and int(m.group(1)) in where:
            label, i, text = where[int(m.group(1))]
            out.append(f"{label} line {i}: {m.group(2)}\n    {text}")
        else:
            out.append(line)
    return "\n".join(out)


# ---- through framework ops (torch.library custom ops take tensors, strings and numbers) --------------

# key -> template: (score code, score grad or None, mask code, score_mod's capture names, mask_mod's, all
# names in order, which are arrays, which are int scalars). Plain strings and tuples, so that an op's key
# stands for its snippets without any Python object (torch.compile runs `register` once, at trace time).
_TEMPLATES: dict[str, tuple] = {}


def register(template: tuple) -> str:
    """The key of a template (flatten's), registered for unflatten."""
    key = hashlib.sha256(repr(template).encode()).hexdigest()[:16]
    _TEMPLATES[key] = template
    return key


def flatten(score_mod: ScoreMod | None, mask_mod: MaskMod | None, register=register) -> tuple[str, list, list]:
    """(key, arrays, scalars): the snippets as a string key (register's) and their captured values in order,
    for an op whose arguments must be tensors, strings and numbers; unflatten inverts it. Only attribute
    reads and type tests happen here (torch.compile traces it, and passes a register it runs as a constant)."""
    if score_mod is None and mask_mod is None:
        return "", [], []
    seen = all_captures(score_mod, mask_mod)
    values = list(seen.values())
    is_array = tuple(not isinstance(v, (int, float)) and getattr(v, "ndim", 1) != 0 for v in values)
    is_int = tuple(isinstance(v, int) for v in values)
    template = (score_mod.code if score_mod else None, score_mod.grad if score_mod else None,
                mask_mod.code if mask_mod else None, tuple(score_mod.captures) if score_mod else (),
                tuple(mask_mod.captures) if mask_mod else (), tuple(seen), is_array, is_int)
    return (register(template), [v for v, a in zip(values, is_array) if a],
            [float(v) for v, a in zip(values, is_array) if not a])


def unflatten(key: str, arrays, scalars) -> tuple[ScoreMod | None, MaskMod | None]:
    if not key:
        return None, None
    score_code, score_grad, mask_code, score_names, mask_names, names, is_array, is_int = _TEMPLATES[key]
    arrays, scalars = iter(arrays), iter(scalars)
    values = {}
    for name, array, integer in zip(names, is_array, is_int):
        values[name] = next(arrays) if array else int(next(scalars)) if integer else next(scalars)
    score_mod = score_code and ScoreMod(score_code, score_grad, **{n: values[n] for n in score_names})
    mask_mod = mask_code and MaskMod(mask_code, **{n: values[n] for n in mask_names})
    return score_mod or None, mask_mod or None


def capture_grads_plan(key: str, needs: tuple, scalars: tuple) -> list:
    """For the captured arrays (flatten's order) that need gradients, _capture_grads.plan's (sign, indices,
    by_score); NotImplementedError for a use of one it cannot differentiate, or a capture only a MaskMod reads."""
    from . import _capture_grads

    names, is_array = _TEMPLATES[key][5], _TEMPLATES[key][6]
    score_mod, _ = unflatten(key, [None] * sum(is_array), scalars)
    array_names = [n for n, a in zip(names, is_array) if a]
    plans = []
    for name, need in zip(array_names, needs):
        if not need:
            plans.append(None)
        elif score_mod is None or name not in score_mod.captures:
            raise NotImplementedError(f"mask_mod: captured {name!r} needs a gradient, but a mask has none")
        else:
            ints = {n: v for n, v in score_mod.captures.items() if isinstance(v, int)}
            plans.append(_capture_grads.plan(score_mod.code, name, ints))
    return plans


def needs_scores(plans: list) -> bool:
    """Whether some captured array's gradient (capture_grads_plan's) sums dS times the scores."""
    return any(plan is not None and plan[2] for plan in plans)


def capture_grads(key: str, dscore, arrays: list, scalars, needs, scores=None) -> list:
    """The gradients of the captured arrays (None where not needed) from dS (capture_grads_plan's uses) and,
    where one multiplies the score, the scores."""
    from . import _capture_grads

    plans = capture_grads_plan(key, tuple(needs), tuple(scalars))
    return [None if plan is None else _capture_grads.capture_grad(dscore, a, *plan, scores=scores)
            for a, plan in zip(arrays, plans)]
