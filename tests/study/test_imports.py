"""The project's import graph has no circle: every import of a project module (at module level or inside a
function) read with ``ast`` from the sources of reid_core, study and benchmarks."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from helpers import REPO

PACKAGES = ("reid_core", "study", "benchmarks")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> source file, packages by their ``__init__.py``."""
    out = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imported(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``name`` imports. ``from pkg import x`` is an import of the submodule ``pkg.x``
    when there is one, else of ``pkg`` itself (its ``__init__``)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in modules else base)
    return {m for m in found if m in modules and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_reports_a_circle_and_accepts_a_tree():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_among_project_modules():
    modules = project_modules()
    assert {"reid_core.evaluation.rank", "study.run", "study.trial.worker"} <= set(modules)
    graph = {name: imported(name, path, modules) for name, path in modules.items()}
    assert "reid_core.evaluation.tensors" in graph["reid_core.evaluation.rerank"]  # the graph sees real edges
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph))}"


def test_evaluation_helpers_are_a_leaf_below_ranking_reranking_and_query_expansion():
    modules = project_modules()
    graph = {name: imported(name, path, modules) for name, path in modules.items()}
    assert graph["reid_core.evaluation.tensors"] == set()
    for module in ("rank", "rerank", "query_expansion"):
        assert "reid_core.evaluation.evaluate" not in graph[f"reid_core.evaluation.{module}"]
    assert {"reid_core.evaluation.rank", "reid_core.evaluation.rerank",
            "reid_core.evaluation.query_expansion"} <= graph["reid_core.evaluation.evaluate"]


def test_record_and_search_never_import_trial_code_but_its_error_protocol():
    modules = project_modules()
    for name, path in modules.items():
        if name.startswith(("study.record", "study.search", "study.space", "study.results")):
            trial = {m for m in imported(name, path, modules) if m.startswith("study.trial")}
            assert trial <= {"study.trial.errors"}, f"{name} imports {sorted(trial)}"


def test_trial_modules_import_in_a_fresh_process():
    """Ray workers unpickle the trainable by module path: its modules must import on their own."""
    code = "import study.trial.trainable, study.trial.worker, study.record.optuna, study.driver.study"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
