"""The import graph of budget_lab/ and model/ (issue 17): no cycles, counting imports inside
functions too (a cycle hidden in a function is still a cycle to follow), type-checking-only
imports left out; model/ (pure math) imports nothing from budget_lab/; the launch backends stand
apart; and the `clusters` command and `--help` load neither submitit nor torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _modules() -> dict[str, Path]:
    out = {}
    for package in ("budget_lab", "model"):
        for path in (REPO / package).rglob("*.py"):
            name = ".".join(path.relative_to(REPO).with_suffix("").parts)
            out[name.removesuffix(".__init__")] = path
    return out


def _imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports at run time (a from-import of a name counts the module
    it names, or the package it comes from)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")
                if path.name != "__init__.py":
                    parts = parts[:-1]
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return {m for m in found if m in known and m != name}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return out


def test_no_import_cycles_and_model_stands_alone():
    known = _modules()
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    assert len(graph) > 50 and graph["budget_lab.launch.status"]  # the scan sees the code
    assert _cycles(graph) == []
    leaks = {m: sorted(d for d in deps if d.startswith("budget_lab")) for m, deps in graph.items()}
    assert {m: d for m, d in leaks.items() if m.startswith("model") and d} == {}


def test_the_scan_sees_imports_in_functions_and_skips_type_checking_ones(tmp_path):
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    probe = tmp_path / "probe.py"
    probe.write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from budget_lab import units\n"
        "def f():\n    from budget_lab import io\n"
    )
    known = {"budget_lab": probe, "budget_lab.io": probe, "budget_lab.units": probe}
    assert _imports("budget_lab.probe", probe, known) == {"budget_lab", "budget_lab.io"}


def test_launch_backends_stand_apart():
    """Each backend knows only itself: local.py and slurm.py import neither each other nor the
    interface module (backend.py imports them), and no launch module imports the launch package
    itself, whose names are loaded on first use (a hidden import the scan cannot see)."""
    known = _modules()
    graph = {name: _imports(name, path, known) for name, path in known.items()}
    backends = {"budget_lab.launch.local", "budget_lab.launch.slurm"}
    for name in backends:
        assert graph[name] & (backends | {"budget_lab.launch.backend"}) == set(), name
    assert backends <= graph["budget_lab.launch.backend"]
    inside = [m for m in graph if m.startswith("budget_lab.launch.")]
    assert [m for m in inside if "budget_lab.launch" in graph[m]] == []


def test_clusters_command_and_help_load_no_submitit_or_torch():
    """`budget-lab clusters list|show` and `--help` start fast (issue 17: under 0.5 s): the
    launch package does not load its job, submit and status modules (submitit) for cluster.py."""
    code = (
        "import sys, contextlib, io\n"
        "from budget_lab.cli import main\n"
        "for argv in (['clusters', 'list'], ['clusters', 'show', 'local'], ['--help']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "print(sorted(m for m in ('submitit', 'torch') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_lazy_packages_export_every_name_they_list():
    """budget_lab.launch and budget_lab.ledger load their names on first use: each name of
    `__all__` resolves (from the module the table names), and nothing else is listed."""
    import importlib

    for package in ("budget_lab.launch", "budget_lab.ledger"):
        module = importlib.import_module(package)
        assert set(module._EXPORTS) == set(module.__all__), package
        for name in module.__all__:
            getattr(module, name)  # resolves: no AttributeError, no ImportError
            assert name in dir(module)
        try:
            module.no_such_name  # noqa: B018
        except AttributeError as err:
            assert "no_such_name" in str(err)
        else:
            raise AssertionError(f"{package}.no_such_name resolved")
