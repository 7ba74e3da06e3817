"""The package's layers: imports go one way (no cycles), and no module uses another's private names."""
import ast
from pathlib import Path

import cuflash

PACKAGE = Path(cuflash.__file__).parent


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text()) for p in sorted(PACKAGE.glob("*.py"))}


def _imports(tree: ast.Module) -> dict[str, set[str]]:
    """Sibling modules a module imports (at any depth, lazily too) -> names it takes from each."""
    out: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:  # from .x import a, b
                out.setdefault(node.module, set()).update(a.name for a in node.names)
            else:  # from . import x, y
                for a in node.names:
                    out.setdefault(a.name, set())
    return out


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {m for m in _imports(tree) if m in modules} for name, tree in modules.items()}
    graph["__init__"] = set()  # the package's front door imports everything; nothing imports it back
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name, path):
        state[name] = 1
        for dep in sorted(graph[name]):
            assert state.get(dep) != 1, f"import cycle: {' -> '.join(path + [name, dep])}"
            if dep not in state:
                visit(dep, path + [name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])


def test_no_private_names_across_modules():
    modules = _modules()
    uses = []
    for name, tree in modules.items():
        imported = _imports(tree)
        for module, names in imported.items():
            uses += [f"{name}: from .{module} import {n}" for n in names if n.startswith("_") and n != "__version__"]
        aliases = {a.asname or a.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                   and node.level == 1 and not node.module for a in node.names}
        aliases |= {"cf_torch", "cf_jax"}
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                uses.append(f"{name}:{node.lineno}: {node.value.id}.{node.attr}")
    assert not uses, "private names used across modules:\n" + "\n".join(uses)
