"""Facts of the import graph (grimp, the library under import-linter): modules per package, import
cycles, imports against the layers, the largest file and function. Writes bench/results/import-graph.md.

    .venv/bin/python bench/import_graph.py
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

import grimp

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["kernels", "model_store", "scoring", "service", "jobs", "training", "cli", "client"]
# Top to bottom; siblings in one tuple may not import each other (pyproject.toml [tool.importlinter]).
LAYERS = [("cli",), ("service", "jobs", "training"), ("scoring",), ("model_store",), ("kernels",)]


def cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), over every import, lazy ones too."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
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

    sys.setrecursionlimit(10_000)
    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return out


def upward_imports(graph: grimp.ImportGraph) -> list[str]:
    rank = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}
    bad = []
    for m in sorted(graph.modules):
        src = m.split(".")[0]
        for t in graph.find_modules_directly_imported_by(m):
            dst = t.split(".")[0]
            if src in rank and dst in rank and src != dst and rank[dst] <= rank[src]:
                bad.append(f"{m} -> {t}")
    return bad


def largest(packages: list[str]) -> tuple[tuple[int, str], list[tuple[int, str]]]:
    """The largest file, and every function longest first."""
    files, funcs = [], []
    for pkg in packages:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            text = path.read_text()
            rel = str(path.relative_to(ROOT))
            files.append((len(text.splitlines()), rel))
            for node in ast.walk(ast.parse(text)):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    funcs.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.lineno} {node.name}"))
    return max(files), sorted(funcs, reverse=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "import-graph.md")
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    per_pkg = {p: sum(1 for m in graph.modules if m == p or m.startswith(p + ".")) for p in PACKAGES}
    found = cycles(graph)
    up = upward_imports(graph)
    (file_lines, file_name), funcs = largest(PACKAGES)
    fn_lines, fn_name = funcs[0]
    others = [f"{name} ({n})" for n, name in funcs if not name.startswith("kernels/")][:6]
    lines = [
        "# Import graph",
        "",
        "Regenerate: `.venv/bin/python bench/import_graph.py` (grimp over the installed packages; every",
        "import counts, lazy ones inside functions too). The contract itself: `.venv/bin/lint-imports`.",
        "",
        "| package | modules |",
        "| --- | ---: |",
        *[f"| {p} | {n} |" for p, n in per_pkg.items()],
        f"| **all** | {sum(per_pkg.values())} |",
        "",
        f"- imports between modules: {graph.count_imports()}",
        f"- import cycles (strongly connected groups of modules): {len(found)}"
        + (": " + "; ".join(" <-> ".join(c) for c in found) if found else ""),
        f"- imports that point up or sideways between layers {' > '.join('|'.join(x) for x in LAYERS)}: "
        f"{len(up)}" + (": " + ", ".join(up) if up else ""),
        f"- largest file: {file_name} ({file_lines} lines)",
        f"- largest function: {fn_name} ({fn_lines} lines)",
        f"- longest functions outside kernels/ (lines, signature and docstring included): {', '.join(others)}",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
