"""Code-health limits for leanlm's three packages, measured and enforced (CI runs this script).

    python scripts/code_health.py            # this checkout; exit 1 when a limit is crossed
    python scripts/code_health.py --root DIR # another checkout (e.g. a git worktree)

What is measured, and the limit:
- function length (``end_lineno - lineno + 1`` of every ``def``, nested ones on their own): none
  over 100 lines;
- file length: no package file over 600 lines;
- import circles: strongly connected components of more than one ``leanlm.*`` module, counting
  imports inside functions and a submodule's import of its own package (``from leanlm.kernels
  import x`` in ``leanlm.kernels.y`` is an edge to the package ``__init__``): none. Only the
  implicit "importing a.b runs a's ``__init__``" is not an edge;
- positional arguments in calls of leanlm's own functions and classes: none over four in
  engine/, at most a dozen in optim/ (math ops in the style of ``torch.nn.functional``); kernels/
  is reported, not limited (Triton launch grids are positional by design);
- ``# fmt: skip`` in package code: none;
- loading the config imports no torch (a subprocess imports ``leanlm.engine.config`` and loads
  every preset).
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

PACKAGES = {"engine": "leanlm.engine", "optim": "leanlm.optim", "kernels": "leanlm.kernels"}
MAX_FUNCTION_LINES = 100
MAX_FILE_LINES = 600
MAX_POSITIONAL = 4
# Calls of our own functions with more than MAX_POSITIONAL positional arguments, allowed per package.
POSITIONAL_BUDGET = {"engine": 0, "optim": 12, "kernels": None}

TORCH_FREE_CONFIG = """
import sys
from leanlm.engine.config import load_config
from leanlm.engine.config.load import presets
for name in presets():
    load_config(name)
print(sorted(m for m in sys.modules if m == "torch" or m.startswith("torch.")))
"""


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


def _absolute(name: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    base = node.module or ""
    if not node.level:
        return base
    pkg = name if is_pkg else name.rpartition(".")[0]
    for _ in range(node.level - 1):
        pkg = pkg.rpartition(".")[0]
    return f"{pkg}.{base}" if base else pkg


def imports(name: str, path: Path, tree: ast.AST, known: set[str]) -> set[str]:
    """The leanlm modules ``name`` imports (anywhere in the file), package ``__init__``s included."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, is_pkg, node)
            targets = [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
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


def defined_names(trees: dict[str, ast.AST]) -> set[str]:
    """Every function, method and class name defined in the packages."""
    return {
        node.name
        for tree in trees.values()
        for node in ast.walk(tree)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
    }


def long_calls(name: str, path: Path, tree: ast.AST, ours: set[str]) -> list[str]:
    """Calls of leanlm's own functions and classes with more than MAX_POSITIONAL positional
    arguments, as ``file:line callee (n)``.

    A callee is ours when it is a name defined in this module or imported from ``leanlm``, an
    attribute of a ``leanlm`` module alias (``dist.wrap_ddp``), or a method call on a local object
    whose name a leanlm package defines (``recorder.record``), unless the object is an imported
    outside module (``torch.addmm``)."""
    is_pkg = path.name == "__init__.py"
    leanlm_names: set[str] = set()
    external: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                (leanlm_names if a.name.startswith("leanlm") else external).add((a.asname or a.name).split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(name, is_pkg, node)
            for a in node.names:
                (leanlm_names if base.startswith("leanlm") else external).add(a.asname or a.name)
    local = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or len(node.args) <= MAX_POSITIONAL:
            continue
        func, callee = node.func, None
        if isinstance(func, ast.Name) and (func.id in local or func.id in leanlm_names):
            callee = func.id
        elif isinstance(func, ast.Attribute):
            root = func.value
            while isinstance(root, (ast.Attribute, ast.Call, ast.Subscript)):
                root = root.func if isinstance(root, ast.Call) else root.value
            root_name = root.id if isinstance(root, ast.Name) else ""
            if root_name in leanlm_names or (root_name not in external and func.attr in ours):
                callee = f"{root_name}.{func.attr}" if root_name else func.attr
        if callee:
            found.append(f"{path.name}:{node.lineno} {callee} ({len(node.args)})")
    return found


def config_imports_torch(root: Path) -> list[str]:
    """The torch modules loaded by importing the config and loading every preset."""
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_FREE_CONFIG], capture_output=True, text=True, cwd=root.parent, check=False
    )
    if proc.returncode:
        return [f"(the check failed: {proc.stderr.strip().splitlines()[-1:]})"]
    return ast.literal_eval(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", default=str(Path(__file__).resolve().parents[1]))
    p.add_argument("--top", type=int, default=5)
    args = p.parse_args(argv)
    root = Path(args.root)
    mods = modules(root)
    known = set(mods)
    trees = {name: ast.parse(path.read_text()) for name, path in mods.items()}
    ours = defined_names(trees)
    lengths: list[tuple[int, str]] = []
    graph: dict[str, set[str]] = {}
    skips, long_files = 0, []
    calls: dict[str, list[str]] = {folder: [] for folder in PACKAGES}
    for name, path in mods.items():
        text, tree = path.read_text(), trees[name]
        lengths += [(n, f"{name}.{fn}") for n, fn in functions(tree)]
        graph[name] = imports(name, path, tree, known)
        skips += text.count("# fmt: skip")
        if text.count("\n") > MAX_FILE_LINES:
            long_files.append(f"{path.relative_to(root)} ({text.count(chr(10))})")
        calls[path.relative_to(root).parts[0]] += long_calls(name, path, tree, ours)
    lengths.sort(reverse=True)
    found = circles(graph)
    torch_mods = config_imports_torch(root)

    print(f"modules: {len(mods)}, functions: {len(lengths)}")
    print("longest functions: " + ", ".join(f"{fn} {n}" for n, fn in lengths[: args.top]))
    over = [(n, fn) for n, fn in lengths if n > MAX_FUNCTION_LINES]
    print(f"functions over {MAX_FUNCTION_LINES} lines: {len(over)}" + "".join(f"\n  {fn} {n}" for n, fn in over))
    print(f"package files over {MAX_FILE_LINES} lines: {len(long_files)}" + "".join(f"\n  {f}" for f in long_files))
    print(
        f"import circles (package __init__ edges counted): {len(found)}"
        + "".join(f"\n  {' <-> '.join(c)}" for c in found)
    )
    crossed = [bool(over), bool(long_files), bool(found)]
    for folder, budget in POSITIONAL_BUDGET.items():
        limit = "reported only" if budget is None else f"limit {budget}"
        n = len(calls[folder])
        print(f"{folder}/ calls of our own code with > {MAX_POSITIONAL} positional arguments: {n} ({limit})")
        for c in calls[folder]:
            print(f"  {c}")
        crossed.append(budget is not None and len(calls[folder]) > budget)
    print(f"'# fmt: skip' in package code: {skips}")
    print(
        f"torch modules after loading every preset's config: {len(torch_mods)}"
        + (f" {torch_mods[:3]}" if torch_mods else "")
    )
    crossed += [skips > 0, bool(torch_mods)]
    if any(crossed):
        print("code health: a limit is crossed (see above)")
        return 1
    print("code health: every limit holds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
