#!/usr/bin/env python3
"""Fail on import cycles among llmship's modules and on imports that cross the package's layers.

Every import statement counts, including those inside functions (a function-local import only hides a cycle
until the function runs). `from a.b import c` is an edge to `a.b.c` when that is a module, else to `a.b`.
Importing a submodule does not count as importing its parent package's __init__ (Python runs it, but it
cannot import back into the submodule's caller in a way that matters here).

Layer rules (the data flows one way: load -> transform -> compress -> export -> validate -> gate):
  llmship.exporters  imports nothing from llmship.validation
  llmship.models     imports nothing from llmship.exporters, llmship.validation, llmship.cli
  llmship.compress   imports nothing from llmship.exporters, llmship.validation, llmship.cli

Usage: python scripts/check_imports.py [PACKAGE_DIR]   (exit 1 and one line per problem when any is found)
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

FORBIDDEN = {
    "llmship.exporters": ("llmship.validation",),
    "llmship.models": ("llmship.exporters", "llmship.validation", "llmship.cli"),
    "llmship.compress": ("llmship.exporters", "llmship.validation", "llmship.cli"),
}


def module_names(root: Path) -> dict[str, Path]:
    """Module name -> file, for every .py under the package directory `root` (named by its folder)."""
    mods = {}
    for f in sorted(root.rglob("*.py")):
        parts = [root.name, *f.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in modules:  # `import a.b.c` of a non-module attribute path: the deepest module
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each as a sorted list."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def problems(root: Path) -> list[str]:
    modules = module_names(root)
    graph = {name: imports_of(name, path, modules) for name, path in modules.items()}
    found = [f"import cycle: {' <-> '.join(c)}" for c in cycles(graph)]
    for name, deps in sorted(graph.items()):
        for layer, banned in FORBIDDEN.items():
            if within(name, layer):
                found += [f"layer rule: {name} imports {d} ({layer} must not import {b})"
                          for d in sorted(deps) for b in banned if within(d, b)]
    return found


def main(argv: list[str]) -> int:
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parents[1] / "llmship"
    found = problems(root)
    for line in found:
        print(line)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
