"""No import cycle inside facedist/: every import statement counts, also those inside functions
(a lazy import only hides a cycle until the day someone moves it to the top)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "facedist"


def _modules() -> dict[str, Path]:
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_the_checker_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_inside_facedist():
    graph = import_graph()
    assert "facedist.training.tasks" in graph and "facedist.serving.app" in graph
    assert cycles(graph) == []


# Data flows one way: storage -> dataset -> extractor -> coefficients table -> trainer -> bundle
# -> server. A stage imports what comes before it, never what comes after.
LATER = {
    "facedist.extractors": ("facedist.extraction", "facedist.training", "facedist.reports", "facedist.recognition",
                            "facedist.prediction", "facedist.serving", "facedist.workflow", "facedist.cli"),
    "facedist.extraction": ("facedist.training", "facedist.reports", "facedist.recognition", "facedist.prediction",
                            "facedist.serving", "facedist.workflow", "facedist.cli"),
    "facedist.features": ("facedist.training", "facedist.recognition", "facedist.serving"),
    "facedist.training": ("facedist.extraction", "facedist.reports", "facedist.recognition", "facedist.prediction",
                          "facedist.serving", "facedist.workflow", "facedist.cli"),
    "facedist.recognition": ("facedist.reports", "facedist.prediction", "facedist.serving", "facedist.workflow",
                             "facedist.cli"),
    "facedist.serving": ("facedist.reports", "facedist.prediction", "facedist.workflow", "facedist.cli"),
}


def test_no_stage_imports_a_later_one():
    graph = import_graph()
    backwards = [(module, target) for module, targets in graph.items() for stage, later in LATER.items()
                 if module == stage or module.startswith(stage + ".")
                 for target in targets if any(target == t or target.startswith(t + ".") for t in later)]
    assert backwards == []
