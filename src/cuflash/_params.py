"""The kernels' parameter structs (kernels/params.cuh) as Python sees them.

The header is the one declaration: this module reads each struct's fields from it (nested structs
such as BlockLists and DropoutArgs from their own headers) and packs launch values in that order,
with C's alignment. tests/test_params.py checks every offset and size against the compiler's.
"""
from __future__ import annotations

import functools
import operator
import re
import struct

from ._compile import kernels_dir

# C field types -> struct-module codes (native alignment, as the kernels' ABI on x86-64 and aarch64).
_SCALARS = {"long long": "q", "unsigned long long": "Q", "int": "i", "unsigned": "I", "float": "f"}
_FIELD = re.compile(r"^\s*(?:const\s+)?([A-Za-z_][\w\s]*?)\s*(\*)?\s*(?:const\s+)?(?:__restrict__\s+)?(\w+)\s*;")
_NESTED_HEADERS = {"BlockLists": "block_sparse.cuh", "DropoutArgs": "dropout.cuh", "ModArgs": "score_fn.cuh",
                   "MaskBlocksParams": "score_fn.cuh", "MaskListsParams": "block_sparse.cuh"}
# Opaque C types packed as bytes: (size, alignment). TmaMap: a CUtensorMap (tma.cuh, _tma.py).
_OPAQUE = {"TmaMap": (128, 64)}


def _struct_body(text: str, name: str) -> list[str]:
    """The lines at the top level of `struct name { ... };` in a header."""
    start = re.search(rf"\bstruct\s+{name}\s*\{{", text)
    if not start:
        raise ValueError(f"struct {name} not found")
    lines, depth, line = [], 1, ""
    for ch in text[start.end():]:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                break
        elif ch == "\n":
            if depth == 1:
                lines.append(line)
            line = ""
            continue
        if depth == 1 and ch not in "{}":
            line += ch
    return lines


@functools.lru_cache(maxsize=None)
def fields(name: str, header: str = "params.cuh") -> tuple[tuple[str, str], ...]:
    """((field name, struct code or nested struct name), ...) of a struct, in declaration order."""
    return tuple((field, code) for field, code, _ in _declarations(name, header))


def c_types(name: str, header: str = "params.cuh") -> tuple[str, ...]:
    """The C type of each field as a kernel parameter's type (no __restrict__; T for the element type)."""
    return tuple(" ".join(ctype.replace("__restrict__", "").split()) for _, _, ctype in _declarations(name, header))


@functools.lru_cache(maxsize=None)
def _declarations(name: str, header: str) -> tuple[tuple[str, str, str], ...]:
    out = []
    for line in _struct_body((kernels_dir() / header).read_text(), name):
        code = line.split("//")[0]
        if "(" in code or not code.strip():
            continue  # a member function's declaration line, or a comment
        m = _FIELD.match(code)
        if not m:
            raise ValueError(f"cannot read field of struct {name}: {line.strip()!r}")
        ctype, pointer, field = m.group(1).strip(), m.group(2), m.group(3)
        declared = code.strip()[:-1].rsplit(field, 1)[0]
        if pointer:
            out.append((field, "Q", declared))
        elif ctype in _SCALARS:
            out.append((field, _SCALARS[ctype], declared))
        elif ctype in _NESTED_HEADERS or ctype in _OPAQUE:
            out.append((field, ctype, declared))
        else:
            raise ValueError(f"struct {name}: unknown field type {ctype!r}")
    return tuple(out)


def _pieces(name: str, header: str = "params.cuh") -> tuple[tuple[str, str, str], ...]:
    """(field, padding, codes) of each field in order: the struct-module codes that align the field, then
    its own. A nested struct starts and ends 8-byte aligned (each of ours holds a pointer); an opaque field
    is padded to its alignment."""
    out, fmt = [], ""
    for field, code in fields(name, header):
        if code in _NESTED_HEADERS:
            pad, codes = "0Q", f"{_format(code, _NESTED_HEADERS[code])}0Q"
        elif code in _OPAQUE:
            size, align = _OPAQUE[code]
            pad, codes = f"{-struct.calcsize('@' + fmt) % align}x", f"{size}s"
        else:
            pad, codes = "0" + code, code
        out.append((field, pad, codes))
        fmt += pad + codes
    return tuple(out)


def _format(name: str, header: str = "params.cuh") -> str:
    """A struct's fields as struct-module codes."""
    return "".join(pad + codes for _, pad, codes in _pieces(name, header))


class ParamStruct:
    """One kernel family's parameter struct: `pack(values)` gives the flat values in launch order
    (nested structs as tuples of their fields), `format` their struct-module codes."""

    def __init__(self, name: str, header: str = "params.cuh"):
        self.name, self.header = name, header
        self.fields = fields(name, header)
        self.names = tuple(f for f, _ in self.fields)
        self.format = _format(name, header)
        self._get = operator.itemgetter(*self.names)
        self._nested_at = [i for i, (_, code) in enumerate(self.fields) if code in _NESTED_HEADERS][::-1]
        align = max([8] + [_OPAQUE[code][1] for _, code in self.fields if code in _OPAQUE])
        self.size = -(-struct.calcsize("@" + self.format) // align) * align  # C rounds up to the alignment

    def offsets(self) -> dict[str, int]:
        """Byte offset of each top-level field."""
        out, prefix = {}, ""
        for field, pad, codes in _pieces(self.name, self.header):
            out[field] = struct.calcsize("@" + prefix + pad)
            prefix += pad + codes
        return out

    def sizes(self) -> dict[str, int]:
        """Byte size of each top-level field (a nested struct's whole size)."""
        return {field: param_struct(code).size if code in _NESTED_HEADERS
                else _OPAQUE[code][0] if code in _OPAQUE else struct.calcsize(code) for field, code in self.fields}

    def pack(self, values: dict) -> tuple:
        """The flat values of every field, given by name (nested structs as tuples of their fields)."""
        try:
            if len(values) != len(self.names):
                raise KeyError
            flat = list(self._get(values))
        except KeyError:
            missing, extra = set(self.names) - values.keys(), values.keys() - set(self.names)
            raise TypeError(f"{self.name}: missing fields {sorted(missing)}, unknown fields {sorted(extra)}") from None
        for i in self._nested_at:  # last first, so earlier positions stay put
            flat[i:i + 1] = flat[i]
        return tuple(flat)


@functools.lru_cache(maxsize=None)
def param_struct(name: str) -> ParamStruct:
    """A kernel family's struct (params.cuh) or a nested one (BlockLists, DropoutArgs)."""
    return ParamStruct(name, _NESTED_HEADERS.get(name, "params.cuh"))


def no_fields(nested: str) -> tuple:
    """Zeros for every field of a nested struct (what a kernel gets where it has none: dense lists)."""
    return (0,) * len(fields(nested, _NESTED_HEADERS[nested]))
