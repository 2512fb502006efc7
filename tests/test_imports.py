"""The package's modules import each other in one direction: no import cycle inside ``vspec`` (function-level
imports included), so a module can be read and changed without the ones that depend on it; and no module uses
another module's private names (``x._name`` where ``_name`` is defined only elsewhere in ``vspec``)."""

import ast
from pathlib import Path

import vspec

ROOT = Path(vspec.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, name: str) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("vspec")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("vspec"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}  # `from . import ops` names a module
    return out


def test_no_import_cycle_inside_vspec():
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    # `from . import x` inside a package names the package too; that is not an import of its __init__'s work, so
    # edges from a module to its own ancestor packages are left out
    graph = {m: {d for d in _imports(p, m) if d in modules and d != m and not m.startswith(d + ".")}
             for m, p in modules.items()}
    state, stack = {}, []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)



def _private_names(tree: ast.AST) -> tuple[set[str], list[tuple[str, int]]]:
    """Names a module defines (functions, classes, assigned names and attributes, parameters) and its attribute
    reads ``x._name`` of single-underscore names, with their lines."""
    defined, used = set(), []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.arg):
            defined.add(node.arg)
        elif isinstance(node, ast.Attribute):
            if isinstance(node.ctx, ast.Store):
                defined.add(node.attr)
            elif node.attr.startswith("_") and not node.attr.startswith("__"):
                used.append((node.attr, node.lineno))
    return defined, used


def test_no_private_use_across_modules_inside_vspec():
    """A module reads ``x._name`` only when ``_name`` is its own (or not vspec's at all, e.g. transformers'):
    the steps one module needs from another are public, so each can change its private parts alone."""
    parsed = {p: _private_names(ast.parse(p.read_text())) for p in ROOT.rglob("*.py")}
    bad = []
    for path, (defined, used) in parsed.items():
        for name, line in used:
            if name in defined:
                continue
            owners = sorted(str(q.relative_to(ROOT)) for q, (d, _) in parsed.items() if q != path and name in d)
            if owners:
                bad.append(f"{path.relative_to(ROOT)}:{line} uses {name} of {', '.join(owners)}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)
