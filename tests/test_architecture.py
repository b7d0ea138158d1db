"""The project's import graph is a clean stack: no cycles, nothing imports a layer above it.

Every import counts, also those inside functions and relative ones: a lazy import upward is still
a dependency upward (docs/architecture.md, "Import layers")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Higher number = higher layer; a module may import its own package or any lower layer.
LAYERS = {
    "config": 0,
    "choices": 1,
    "settings": 2,
    "dataset_manager": 3,
    "evaluation": 4,
    "anomaly_model": 5,
    "classification_model": 6,
    "pipeline": 7,
}
SCRIPT_LAYER = 8  # train.py, test.py, eval.py, export.py, serve.py, bench/, tools/
SKIPPED_FOLDERS = {"tests", ".venv", ".git", "dataset", "model", "results", "docs"}


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project but the tests."""
    modules = {}
    for path in ROOT.rglob("*.py"):
        relative = path.relative_to(ROOT)
        if set(relative.parts[:-1]) & SKIPPED_FOLDERS or relative.parts[0].startswith("."):
            continue
        parts = list(relative.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file (function bodies and relative imports too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `from pkg import name`: name may be a module or not
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(name, path, modules) for name, path in modules.items()}


def layer(module: str) -> int:
    return LAYERS.get(module.split(".")[0], SCRIPT_LAYER)


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a list of modules (first repeated at the end), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return []

    for start in sorted(graph):
        if start not in state:
            cycle = visit(start)
            if cycle:
                return cycle
    return []


def test_the_graph_sees_function_level_and_relative_imports(tmp_path):
    (tmp_path / "pkg").mkdir()
    source = tmp_path / "pkg" / "a.py"
    source.write_text("def f():\n    from . import b\n    import config\n")
    modules = {"pkg.a": source, "pkg.b": tmp_path / "pkg" / "b.py", "config": tmp_path / "config.py"}
    assert imported_modules("pkg.a", source, modules) == {"pkg.b", "config"}


def test_find_cycle_reports_a_loop_and_accepts_a_stack():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_the_project_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_no_module_imports_a_higher_layer():
    upward = sorted(
        f"{module} (layer {layer(module)}) imports {target} (layer {layer(target)})"
        for module, targets in import_graph().items()
        for target in targets
        if layer(target) > layer(module)
    )
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


@pytest.mark.parametrize(
    "owner, table, names",
    [
        ("anomaly_model.store", "MODEL_TYPES", "ANOMALY_MODELS"),
        ("anomaly_model.backbone", "PRECISIONS", "BACKBONE_PRECISIONS"),
        ("anomaly_model.backbone", "DEFAULT_FEATURE_DIM", "BACKBONES"),
        ("anomaly_model.chebyshev", "SCORES", "PADIM_SCORES"),
        ("anomaly_model.padim", "Padim.TILE_STATISTICS_KINDS", "TILE_STATISTICS"),
    ],
)
def test_each_owner_acts_on_exactly_the_choices_settings_allow(owner, table, names):
    import importlib

    import choices

    value = importlib.import_module(owner)
    for attribute in table.split("."):
        value = getattr(value, attribute)
    assert sorted(value) == sorted(getattr(choices, names))
