"""The import graph: which of hyrun's parts may load which, checked from the source (an AST walk over every
`hyrun.*` import, module-level and inside functions) and, for torch, by importing in a fresh interpreter.

`python tests/test_imports.py` prints the edge count and any forbidden edges or cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Top-level folders and the `hyrun.*` package each one installs as (pyproject's package-dir).
PACKAGES = ("runtime", "agent", "planner", "common", "proto")

# (importer prefix, imported prefix): an edge from a module under the first to one under the second is
# forbidden. The planner is a pure library; the agent runs on every node without the coordinator's code;
# common is the leaf both sides share; the coordinator decides, it never loads the model or torch.
FORBIDDEN = (
    ("hyrun.planner", "hyrun.runtime"),
    ("hyrun.planner", "hyrun.agent"),
    ("hyrun.agent", "hyrun.runtime"),
    ("hyrun.common", "hyrun.runtime"),
    ("hyrun.common", "hyrun.agent"),
    ("hyrun.common", "hyrun.planner"),
    ("hyrun.runtime.coordinator", "hyrun.runtime.trainer"),
    ("hyrun.runtime.coordinator", "hyrun.runtime.model"),
    ("hyrun.runtime.coordinator", "hyrun.runtime.parallel"),
    ("hyrun.runtime.coordinator", "hyrun.runtime.checkpoint"),
    ("hyrun.runtime.coordinator", "hyrun.runtime.rendezvous"),  # torch's TCPStore: passed in, never imported
    ("hyrun.runtime.jobfile", "hyrun.runtime.coordinator"),  # the schema is read by the coordinator, not the reverse
    ("hyrun.runtime.coordinator", "hyrun.runtime.export"),
    ("hyrun.runtime.export", "hyrun.runtime.trainer"),  # the trainer starts from an export, not the reverse
    ("hyrun.runtime.export", "hyrun.runtime.coordinator"),
    # Data preparation, shards and sample order are read by workers, eval and the CLI alike: no runtime parts.
    ("hyrun.runtime.data", "hyrun.runtime.trainer"),
    ("hyrun.runtime.data", "hyrun.runtime.coordinator"),
    ("hyrun.runtime.data", "hyrun.runtime.parallel"),
)
# Torch-free modules of the packages above that the coordinator may use.
ALLOWED = {
    ("hyrun.runtime.coordinator", "hyrun.runtime.parallel.layout"),
    ("hyrun.runtime.coordinator", "hyrun.runtime.parallel.degrees"),
    # The composition root: the one CLI registers the agent's command.
    ("hyrun.runtime.cli", "hyrun.agent.cli"),
}


def module_files() -> dict[str, Path]:
    """Every hyrun module name -> its file."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(("hyrun",) + parts)] = path
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of `name` that is a hyrun module (`from pkg import function` is an edge to pkg)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def import_edges(modules: dict[str, Path] | None = None) -> set[tuple[str, str]]:
    """(importer, imported) for every `hyrun.*` import statement anywhere in a module, functions included."""
    modules = module_files() if modules is None else modules
    edges = set()
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    base = f"{anchor}.{base}" if base else anchor
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if not target.startswith("hyrun."):
                    continue
                resolved = _resolve(target, modules)
                if resolved and resolved != name:
                    edges.add((name, resolved))
    return edges


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def forbidden_edges(edges: set[tuple[str, str]]) -> list[tuple[str, str]]:
    bad = []
    for importer, imported in sorted(edges):
        if any(_under(importer, a) and _under(imported, b) for a, b in ALLOWED):
            continue
        if any(_under(importer, a) and _under(imported, b) for a, b in FORBIDDEN):
            bad.append((importer, imported))
    return bad


def import_cycles(edges: set[tuple[str, str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each given as one cycle through it."""
    graph: dict[str, list[str]] = {}
    for a, b in sorted(edges):
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(set(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in graph:
        if v not in index:
            visit(v)
    return [_cycle_in(graph, component) for component in components]


def _cycle_in(graph: dict[str, list[str]], component: set[str]) -> list[str]:
    """One concrete cycle a -> ... -> a inside a strongly connected component (breadth-first, shortest)."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in graph[v]:
                if w not in component:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, v, start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def test_no_forbidden_import_edges():
    bad = forbidden_edges(import_edges())
    assert not bad, "forbidden imports:\n" + "\n".join(f"  {a} -> {b}" for a, b in bad)


def test_no_import_cycles():
    cycles = import_cycles(import_edges())
    assert not cycles, "import cycles:\n" + "\n".join("  " + " -> ".join(c) for c in cycles)


def test_the_walk_sees_function_level_and_relative_imports(tmp_path):
    # The walk itself: an import inside a function is an edge, and a relative import resolves.
    pkg = tmp_path / "runtime"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from .a import f\n")
    (pkg / "sub" / "a.py").write_text("def f():\n    from hyrun.runtime.sub import b\n")
    (pkg / "sub" / "b.py").write_text("from ..sub.a import f\n")
    modules = {"hyrun.runtime": pkg / "__init__.py", "hyrun.runtime.sub": pkg / "sub" / "__init__.py",
               "hyrun.runtime.sub.a": pkg / "sub" / "a.py", "hyrun.runtime.sub.b": pkg / "sub" / "b.py"}
    edges = import_edges(modules)
    assert edges == {("hyrun.runtime.sub", "hyrun.runtime.sub.a"), ("hyrun.runtime.sub.a", "hyrun.runtime.sub.b"),
                     ("hyrun.runtime.sub.b", "hyrun.runtime.sub.a")}
    assert import_cycles(edges) == [["hyrun.runtime.sub.a", "hyrun.runtime.sub.b", "hyrun.runtime.sub.a"]]


def test_coordinator_cli_and_agent_load_no_torch():
    # The coordinator host and every CLI call (`hyrun --help`, `hyrun plan`) must not need torch; the agent
    # loads it only in the worker it starts.
    code = ("import sys\n"
            "import hyrun.runtime.coordinator.server, hyrun.runtime.cli, hyrun.agent\n"
            # launch checks an init_from directory before any process starts: without torch
            "import hyrun.runtime.export.index, hyrun.runtime.export.hf_layout\n"
            "loaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
            "print('torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.strip() != "False":
        # Name the first hyrun module on the chain that pulled torch in (importtime nests by indentation).
        chain = _torch_chain(out.stderr)
        raise AssertionError(f"torch was imported; chain: {' -> '.join(chain)}")


def _torch_chain(importtime: str) -> list[str]:
    """The import stack at the moment `torch` itself was imported, from `-X importtime` output."""
    rows = []
    for line in importtime.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        field = line.split("|")[-1]
        name = field.strip()
        depth = (len(field) - len(field.lstrip())) // 2
        rows.append((depth, name))
    # importtime prints a module after its children: walk backwards from `torch` to collect its parents.
    for i, (depth, name) in enumerate(rows):
        if name == "torch":
            chain = [name]
            want = depth - 1
            for d, n in rows[i + 1:]:
                if d == want:
                    chain.append(n)
                    want -= 1
            return chain[::-1]
    return ["?"]


if __name__ == "__main__":
    all_edges = import_edges()
    print(f"{len(module_files())} modules, {len(all_edges)} import edges between hyrun modules")
    for a, b in forbidden_edges(all_edges):
        print(f"forbidden: {a} -> {b}")
    for cycle in import_cycles(all_edges):
        print("cycle: " + " -> ".join(cycle))
