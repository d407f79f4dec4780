"""Code-health numbers for leanlm's three packages: the longest functions, import circles and
``# fmt: skip`` count (issue 13 reports them before and after).

    python scripts/code_health.py            # this checkout
    python scripts/code_health.py --root DIR # another checkout (e.g. a git worktree)

Function length is ``end_lineno - lineno + 1`` of every ``def`` (nested ones counted on their
own). Import edges come from every ``import`` / ``from ... import`` in a module, including those
inside functions; a circle is a strongly connected component of more than one module of
``leanlm.*`` (cycles through a package's ``__init__`` re-export are not counted as edges: importing
``leanlm.engine`` for ``leanlm.engine.x`` is an edge to ``x``).
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGES = {"engine": "leanlm.engine", "optim": "leanlm.optim", "kernels": "leanlm.kernels"}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the three packages."""
    out = {}
    for folder, dotted in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            rel = path.relative_to(root / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([dotted, *parts])] = path
    return out


def functions(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            found.append((node.end_lineno - node.lineno + 1, node.name))
    return found


def imports(name: str, path: Path, tree: ast.AST, known: set[str]) -> set[str]:
    """The leanlm modules ``name`` imports (anywhere in the file)."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name if is_pkg else name.rpartition(".")[0]
                for _ in range(node.level - 1):
                    pkg = pkg.rpartition(".")[0]
                base = f"{pkg}.{base}" if base else pkg
            targets = [f"{base}.{a.name}" for a in node.names] + [base]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            # a package's own __init__ is not an edge from its submodules (importing a.b.c runs a.b)
            if t and t != name and not name.startswith(t + "."):
                out.add(t)
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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
                found.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--top", type=int, default=5)
    args = p.parse_args(argv)
    root = Path(args.root)
    mods = modules(root)
    known = set(mods)
    lengths: list[tuple[int, str]] = []
    graph: dict[str, set[str]] = {}
    skips = 0
    for name, path in mods.items():
        text = path.read_text()
        tree = ast.parse(text)
        lengths += [(n, f"{name}.{fn}") for n, fn in functions(tree)]
        graph[name] = imports(name, path, tree, known)
        skips += text.count("# fmt: skip")
    lengths.sort(reverse=True)
    print(f"modules: {len(mods)}, functions: {len(lengths)}")
    print("longest functions: " + ", ".join(f"{fn} {n}" for n, fn in lengths[: args.top]))
    print(f"functions over 100 lines: {sum(n > 100 for n, _ in lengths)}")
    found = circles(graph)
    print(f"import circles: {len(found)}" + "".join(f"\n  {' <-> '.join(c)}" for c in found))
    print(f"'# fmt: skip' in package code: {skips}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
