"""The project's layering, checked from the source: no import cycles among its modules (imports inside
functions count: they hide a dependency, they do not remove it), and harness/ reads in one direction."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("models", "harness", "analysis")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _lazy_exports(tree: ast.Module) -> dict[str, str]:
    """A package __init__'s lazy name -> module table (`_LAZY = {...}` / `_EXPORTS = {...}`)."""
    for node in tree.body:
        if (isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict)
                and any(isinstance(t, ast.Name) and t.id in ("_LAZY", "_EXPORTS") for t in node.targets)):
            return {k.value: v.value for k, v in zip(node.value.keys, node.value.values)
                    if isinstance(k, ast.Constant) and isinstance(v, ast.Constant)}
    return {}


def _runtime_nodes(tree: ast.Module):
    """Every node of the file but those under `if TYPE_CHECKING:` (imports for annotations only,
    which never run)."""
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(child) for stmt in node.body for child in ast.walk(stmt)}
    return [node for node in ast.walk(tree) if id(node) not in skip]


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file."""
    modules = _modules()
    trees = {name: ast.parse(path.read_text()) for name, path in modules.items()}
    lazy = {name: _lazy_exports(tree) for name, tree in trees.items() if modules[name].name == "__init__.py"}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in trees.items():
        package = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_nodes(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for alias in node.names:
                    full = f"{base}.{alias.name}"
                    if full in modules:
                        targets.append(full)
                    elif alias.name in lazy.get(base, {}):
                        targets.append(lazy[base][alias.name])
                    else:
                        targets.append(base)
            for target in targets:
                # `import a.b.c` runs a.b.c; keep the deepest project module named.
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name:
                    graph[name].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # harness.launch.tune_trial imports the training loop inside its Ray worker function only.
    assert "harness.trial.loop" in graph["harness.launch.tune_trial"]
    # relative imports inside models/ resolve
    assert "models.layers" in graph["models.dit"]


def test_imports_for_annotations_only_are_not_edges():
    # harness.checks names the schema's types for annotations; the schema imports the checks
    assert "harness.config" not in import_graph()["harness.checks"]
    assert "harness.checks" in import_graph()["harness.config"]


def test_a_planted_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    cycles = _cycles(import_graph())
    assert not cycles, "import cycles: " + "; ".join(" <-> ".join(c) for c in cycles)


@pytest.mark.parametrize("lower, upper", [
    ("models", "harness"), ("models", "analysis"),   # models/ is pure PyTorch
    ("harness", "analysis"),                          # harness/ runs analysis only from a command, lazily
])
def test_layers_point_one_way(lower, upper):
    graph = import_graph()
    allowed = {"harness.cli", "harness.launch.sweep"} if (lower, upper) == ("harness", "analysis") else set()
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.split(".")[0] == lower and m not in allowed
                   for t in targets if t.split(".")[0] == upper)
    assert not wrong, wrong
