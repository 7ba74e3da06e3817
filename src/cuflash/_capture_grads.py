"""Gradients of a score function's captured arrays (PyTorch and JAX), from dS with respect to the function's value,
float32 (batch, nheads, seqlen_q, seqlen_k), which the dQ kernel's MOD == 2 instance stores (with the scores
the function saw beside it, where an array multiplies them).

They are computed where the snippet is a sum of terms, one of them score or score times a factor
(`score * f` or `f * score`), the others without score, and the array is read once, as `name[i0][i1]...`:
- as a term of the sum (`score + name[...]`, `score * f - name[...]`): d(loss)/d(name[idx]) is the sum
  of dS over the (b, h, q, kv) that read idx;
- as the factor (`score * name[...]`): the sum of dS * score.
An index is b, h, q or kv (each at most once; arrays broadcast over the ones they leave out), or one
relative index `q - kv` or `kv - q`, plus or minus an int literal or int scalar (a table of relative
positions). The sums are the framework's reductions and one scatter of distinct positions: the same order
every run, no atomics.
"""
from __future__ import annotations

import re

_VARS = ("b", "h", "q", "kv")  # dS's dimensions
_TERM = re.compile(r"(\w+)((?:\[[^\[\]]+\])+)")
_EXPONENT = re.compile(r"(?<![\w.])(\d+\.?\d*|\.\d+)[eE]$")  # a float literal's exponent sign follows
_RELATIVE = re.compile(r"(q|kv)\s*-\s*(q|kv)\s*(?:([+-])\s*(\w+))?")


def top_level_terms(code: str) -> list[tuple[int, str]]:
    """The top-level terms of an expression, with their signs (binary + and -)."""
    terms, depth, start, sign, prev = [], 0, 0, 1, ""
    for i, ch in enumerate(code):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and ch in "+-" and (prev.isalnum() or prev in "_)].") and not _EXPONENT.search(code[:i]):
            terms.append((sign, code[start:i].strip()))
            sign, start = (1 if ch == "+" else -1), i + 1
        if not ch.isspace():
            prev = ch
    terms.append((sign, code[start:].strip()))
    return terms


def score_factor(term: str) -> str | None:
    """f where a term is `score * f` or `f * score` (f without score), "" where it is score; else None."""
    if term == "score":
        return ""
    m = re.fullmatch(r"score\s*\*\s*(.+)", term, re.S) or re.fullmatch(r"(.+?)\s*\*\s*score", term, re.S)
    return m.group(1).strip() if m and not re.search(r"\bscore\b", m.group(1)) else None


def plan(code: str, name: str, captures: dict) -> tuple[int, list, bool]:
    """(sign, indices, by_score) of name's use in a ScoreMod's code (module docstring): each index a variable
    of _VARS or ("rel", +1 for q - kv / -1 for kv - q, offset); by_score: name is score's factor (its
    gradient sums dS * score, else dS). NotImplementedError for any other use of name."""
    def refuse(why):
        return NotImplementedError(f"score_mod: the gradient of captured {name!r} is computed for a term "
                                   f"({name}[b][h][q][kv], a table {name}[h][q - kv + c], ...) beside score, or for "
                                   f"score's factor (score * {name}[h]); {why}")
    if re.search(r"\breturn\b", code):
        raise refuse("this snippet is a function body")
    terms = top_level_terms(code)
    with_score = [(s, t) for s, t in terms if re.search(r"\bscore\b", t)]
    if len(with_score) != 1 or with_score[0][0] != 1 or score_factor(with_score[0][1]) is None:
        raise refuse("the snippet is not score, or score times a factor, plus terms without score")
    factor = score_factor(with_score[0][1])
    mine = [(s, t) for s, t in terms if re.search(rf"\b{name}\b", t)]
    if len(mine) != 1:
        raise refuse(f"{name} appears in {len(mine)} terms")
    sign, term = mine[0]
    by_score = term == with_score[0][1]
    if by_score:
        term = factor
    m = _TERM.fullmatch(term)
    if not m or m.group(1) != name:
        raise refuse(f"its term {term!r} is not {name}[...][...]")
    indices, seen = [], set()
    for text in re.findall(r"\[([^\[\]]+)\]", m.group(2)):
        text = text.strip()
        if text in _VARS and text not in seen:
            seen.add(text)
            indices.append(text)
            continue
        rel = _RELATIVE.fullmatch(text)
        if rel and rel.group(1) != rel.group(2) and not {"q", "kv"} & seen:
            offset = 0
            if rel.group(4):
                word = rel.group(4)
                value = int(word) if word.isdigit() else captures.get(word)
                if not isinstance(value, int) or isinstance(value, bool):
                    raise refuse(f"its offset {word!r} is not an int literal or int scalar")
                offset = value if rel.group(3) == "+" else -value
            seen |= {"q", "kv"}
            indices.append(("rel", 1 if rel.group(1) == "q" else -1, offset))
            continue
        raise refuse(f"index {text!r} is not one of b, h, q, kv or a relative position")
    return sign, indices, by_score


def capture_grad(dscore, array, sign: int, indices: list, by_score: bool = False, scores=None):
    """d(loss)/d(array) from dS (torch float32, (batch, nheads, seqlen_q, seqlen_k)) for plan()'s use, and
    where by_score, the scores the function saw (dscore's shape)."""
    import torch

    if by_score:
        dscore = dscore * scores
    rel = [i for i in indices if isinstance(i, tuple)]
    kept = [v for v in _VARS if v in indices or (rel and v in ("q", "kv"))]
    g = dscore.sum(dim=[d for d, v in enumerate(_VARS) if v not in kept]) if len(kept) < 4 else dscore
    order = [v for v in _VARS if v in kept]  # g's dimensions
    if rel:  # (..., q, kv) -> (..., r): sums along diagonals, row i shifted to start at column sq - 1 - i
        _, direction, offset = rel[0]
        sq, sk = g.shape[-2:]
        wide = g.new_zeros((*g.shape[:-2], sq, sq + sk - 1))
        lead = wide.stride()[:-2]
        wide.as_strided((*g.shape[:-2], sq, sk), (*lead, wide.stride(-2) - 1, 1), wide.storage_offset() + sq - 1).copy_(g)
        diagonals = wide.sum(-2)  # column c: q - kv = sq - 1 - c
        n = array.shape[[k for k, i in enumerate(indices) if isinstance(i, tuple)][0]]
        cols = torch.arange(sq + sk - 1, device=g.device)
        r = direction * (sq - 1 - cols) + offset
        ok = (r >= 0) & (r < n)
        table = diagonals.new_zeros((*diagonals.shape[:-1], n))
        table[..., r[ok]] = diagonals[..., cols[ok]]
        g, order = table, [v for v in order if v not in ("q", "kv")] + ["rel"]
    names = ["rel" if isinstance(i, tuple) else i for i in indices]
    g = g.permute([order.index(v) for v in names])
    if any(a < n for a, n in zip(array.shape, g.shape)):
        raise ValueError(f"a captured array of shape {tuple(array.shape)} is read past its end by the call "
                         f"(its indices reach {tuple(g.shape)})")
    out = torch.zeros(array.shape, dtype=torch.float32, device=g.device)
    out[tuple(slice(0, n) for n in g.shape)] = g
    return (out * sign).to(array.dtype)


def capture_grad_jax(dscore, array, sign: int, indices: tuple, by_score: bool = False, scores=None):
    """capture_grad for JAX arrays (inside jit: shapes are static). A relative table's diagonal sums come
    from skewing dS (flip kv, pad, reshape: row q shifted by q) and summing over q."""
    import jax.numpy as jnp
    import numpy as np

    if by_score:
        dscore = dscore * scores
    rel = [i for i in indices if isinstance(i, tuple)]
    kept = [v for v in _VARS if v in indices or (rel and v in ("q", "kv"))]
    g = dscore.sum(axis=tuple(d for d, v in enumerate(_VARS) if v not in kept)) if len(kept) < 4 else dscore
    order = [v for v in _VARS if v in kept]
    if rel:
        _, direction, offset = rel[0]
        *lead, sq, sk = g.shape
        padded = jnp.pad(g[..., ::-1], [(0, 0)] * (g.ndim - 1) + [(0, sq)])  # (..., sq, sk + sq)
        skew = padded.reshape(*lead, sq * (sk + sq))[..., :sq * (sk + sq - 1)].reshape(*lead, sq, sk + sq - 1)
        diagonals = skew.sum(-2)  # column j: q - kv = j - (sk - 1)
        n = array.shape[[k for k, i in enumerate(indices) if isinstance(i, tuple)][0]]
        r = direction * (np.arange(sq + sk - 1) - (sk - 1)) + offset
        ok = (r >= 0) & (r < n)
        g = jnp.zeros((*lead, n), diagonals.dtype).at[..., r[ok]].set(diagonals[..., np.nonzero(ok)[0]])
        order = [v for v in order if v not in ("q", "kv")] + ["rel"]
    names = ["rel" if isinstance(i, tuple) else i for i in indices]
    g = g.transpose([order.index(v) for v in names])
    if any(a < n for a, n in zip(array.shape, g.shape)):
        raise ValueError(f"a captured array of shape {tuple(array.shape)} is read past its end by the call "
                         f"(its indices reach {tuple(g.shape)})")
    g = jnp.pad(g, [(0, a - n) for a, n in zip(array.shape, g.shape)])
    return (g * sign).astype(array.dtype)
