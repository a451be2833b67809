"""The project's layering, checked from the source: no import cycles among its modules (imports inside
functions count: they hide a dependency, they do not remove it), and the rooms point one way (ROOMS).

Imports are read with `ast` (not grepped): `import x`, `from x import y`, relative imports, imports
inside functions, and imports under `if TYPE_CHECKING:` (for annotations only: they never run, but
they still say which room a module reads, so the room order counts them)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

from tests.support.paths import ROOT

PACKAGES = ("models", "harness", "analysis")


def _module_name(path: Path, root: Path = ROOT) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


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


def import_graph(type_only: bool = False, root: Path = ROOT) -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (with `type_only`, also those
    imported under `if TYPE_CHECKING:`)."""
    modules = {_module_name(p, root): p for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}
    trees = {name: ast.parse(path.read_text()) for name, path in modules.items()}
    lazy = {name: _lazy_exports(tree) for name, tree in trees.items() if modules[name].name == "__init__.py"}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, tree in trees.items():
        package = name if modules[name].name == "__init__.py" else name.rpartition(".")[0]
        for node in (ast.walk(tree) if type_only else _runtime_nodes(tree)):
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


def test_imports_for_annotations_only_are_edges_only_with_type_only(tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                              "    from models.b import B\n")
    (tmp_path / "models" / "b.py").write_text("B = 1\n")
    assert "models.b" not in import_graph(root=tmp_path)["models.a"]
    assert "models.b" in import_graph(type_only=True, root=tmp_path)["models.a"]


def test_a_planted_cycle_is_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    """Type-only imports count: a circle of annotations is still two modules that need each other."""
    cycles = _cycles(import_graph(type_only=True))
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


# --- rooms --------------------------------------------------------------------------------------------
# Lowest first: a module may import its own room and the rooms before it, never one after it.
# A package is a room (harness/data/ ...); harness/'s top-level modules are named one by one, because
# they sit on both sides of data/: the small helpers below it, the study schema and tracking (which
# resolve shard patterns with harness.data.shards) above it.
ROOMS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("models", ("models",)),                                     # pure PyTorch
    ("common", ("harness.common", "harness.errors", "harness.files", "harness.credentials", "harness.assets",
                "harness.hardware", "harness.options")),         # helpers every room shares
    ("data", ("harness.data",)),
    ("study", ("harness.schema", "harness.config", "harness.checks", "harness.study", "harness.one_law",
               "harness.paths", "harness.tracking", "harness.tracking_inputs", "harness.tracking_view")),
    # the schema, its rules, loading (trials and budgets), MLflow's conventions
    ("evaluation", ("harness.evaluation",)),                     # metrics; the loop runs the Evaluator
    ("trial", ("harness.trial",)),                               # one trial; it evaluates with evaluation/
    ("ema", ("harness.ema",)),                                   # post-hoc EMA of a trained trial
    ("analysis", ("analysis",)),                                 # reads MLflow; see ANALYSIS_READS
    ("launch", ("harness.launch",)),                             # sweeps, Ray, Slurm
    ("bench", ("harness.bench",)),                               # measures launches
    ("cli", ("harness.cli", "harness")),                         # the command line and the package itself
)

# Back-imports waiting for their file to be free (none now); test_pending_back_imports_still_exist makes this
# list shrink when they move.
PENDING_BACK_IMPORTS: set[tuple[str, str]] = set()

# What analysis/ may read of the other packages (tests/analysis/test_analysis.py checks the same at run time:
# no torch): MLflow's conventions, the error type, the preset sizes and compute rule, the noise estimator.
ANALYSIS_READS = {"harness", "harness.errors", "harness.tracking", "harness.credentials", "harness.evaluation",
                  "harness.evaluation.noise", "models", "models.registry", "models.flops"}


def room_of(module: str) -> int:
    """The index in ROOMS of the room that holds `module` (the longest matching prefix)."""
    best, rank = -1, None
    for index, (_, prefixes) in enumerate(ROOMS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), index
    if rank is None:
        raise LookupError(f"{module}: in no room of tests/repo/test_layout.py ROOMS; give it one")
    return rank


def back_imports(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(importer, imported) pairs where the imported module's room comes after the importer's."""
    return {(m, t) for m, targets in graph.items() for t in targets if room_of(t) > room_of(m)}


def test_every_module_has_a_room():
    missing = []
    for module in import_graph():
        try:
            room_of(module)
        except LookupError as err:
            missing.append(str(err))
    assert not missing, missing


def test_rooms_point_one_way():
    """Type-only imports count: they name a room's types, so the room depends on it."""
    wrong = back_imports(import_graph(type_only=True)) - PENDING_BACK_IMPORTS
    names = [name for name, _ in ROOMS]
    assert not wrong, "imports against the room order " + " < ".join(names) + ":\n" + "\n".join(
        f"{m} ({names[room_of(m)]}) -> {t} ({names[room_of(t)]})" for m, t in sorted(wrong))


def test_pending_back_imports_still_exist():
    """A pending back-import that was fixed leaves PENDING_BACK_IMPORTS with it."""
    fixed = PENDING_BACK_IMPORTS - back_imports(import_graph(type_only=True))
    assert not fixed, f"fixed, remove from PENDING_BACK_IMPORTS: {sorted(fixed)}"


def test_a_planted_back_import_is_caught(tmp_path):
    """A copy of the source with one import against the order, inside a function and type-only."""
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            target = tmp_path / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text())
    data = tmp_path / "harness" / "data" / "manifest.py"
    data.write_text(data.read_text() + "\n\ndef _planted():\n    from harness.trial.loop import Trainer\n")
    models = tmp_path / "models" / "flops.py"
    models.write_text(models.read_text() + "\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                           "    from harness.config import TrialConfig\n")
    found = back_imports(import_graph(type_only=True, root=tmp_path)) - PENDING_BACK_IMPORTS
    assert found == {("harness.data.manifest", "harness.trial.loop"), ("models.flops", "harness.config")}
    assert ("models.flops", "harness.config") not in back_imports(import_graph(root=tmp_path))  # type-only


def test_analysis_reads_only_its_contract():
    graph = import_graph(type_only=True)
    wrong = sorted(f"{m} -> {t}" for m, targets in graph.items() if m.split(".")[0] == "analysis"
                   for t in targets if t.split(".")[0] != "analysis" and t not in ANALYSIS_READS)
    assert not wrong, wrong


# --- imports inside functions ----------------------------------------------------------------------
# An import inside a function hides a dependency from the top of the module. It is right for a heavy
# library (torch, Ray, MLflow, DeepSpeed, ...) that `ditscale --help` must not load, wrong for the standard
# library, which costs nothing. The ceiling only goes down.
# Source: 37 on 1527a5f, 27 on c1e91a9, 0 since (#28). Tests: 44 on 1253eb2, 0 since.
MAX_STDLIB_IMPORTS_IN_FUNCTIONS = 0


def function_level_imports(root: Path = ROOT, packages=PACKAGES) -> list[tuple[str, int, str]]:
    """(file, line, top-level module) of every import inside a function of `packages` (the source)."""
    found = []
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            for func in ast.walk(ast.parse(path.read_text())):
                if not isinstance(func, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                for node in ast.walk(func):
                    if isinstance(node, ast.Import):
                        found += [(str(path.relative_to(root)), node.lineno, a.name.split(".")[0]) for a in node.names]
                    elif isinstance(node, ast.ImportFrom) and not node.level:
                        found.append((str(path.relative_to(root)), node.lineno, (node.module or "").split(".")[0]))
    return sorted(set(found))


@pytest.mark.parametrize("packages", [PACKAGES, ("tests",)], ids=["source", "tests"])
def test_standard_library_imports_sit_at_the_top(packages):
    stdlib = [f"{f}:{line} {mod}" for f, line, mod in function_level_imports(packages=packages)
              if mod in sys.stdlib_module_names and mod != "__future__"]
    assert len(stdlib) <= MAX_STDLIB_IMPORTS_IN_FUNCTIONS, (
        f"{len(stdlib)} standard-library imports inside functions (at most {MAX_STDLIB_IMPORTS_IN_FUNCTIONS}); "
        "move them to the top of the module:\n" + "\n".join(stdlib))
