"""The test suite's own layout (issue 28 item 6): no test module imports another test module or
conftest.py; what tests share lives in tests/support/ (plain helpers) and tests/conftest.py (fixtures,
which pytest finds there without an import). A fixture imported into a module is a separate instance per
module (two one-node Slurm clusters on the same fixed ports), and a helper imported from a test module
runs that module's import-time code and ties the two files together."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import chromium
from tests.support.behaviours import Behaviours
from tests.support.paths import ROOT

TESTS = ROOT / "tests"


def _is_test_module(name: str) -> bool:
    """tests.conftest, tests.<room>.test_x, tests.test_x.y (a test module, or a name inside one)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[0] == "tests" and any(p == "conftest" or p.startswith("test_")
                                                           for p in parts[1:])


def cross_imports(source: str, package: str = "tests") -> list[str]:
    """The test modules (tests.**.test_*, tests.conftest) that `source`, a module of `package`, imports
    anywhere (inside functions too): `from tests.trial.test_x import y`, `import tests.test_x`,
    `from tests.launch import test_x`, `from .test_x import y`, `from ..conftest import y`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_test_module(alias.name)]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package, one level up per extra dot
                parent = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parent + ([node.module] if node.module else []))
            if _is_test_module(base):
                found.append(base)
            else:  # `from tests.launch import test_x`: the names are modules
                found += [f"{base}.{a.name}" for a in node.names if _is_test_module(f"{base}.{a.name}")]
    return found


def _python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "fixtures" not in p.relative_to(TESTS).parts)


def test_the_check_finds_every_form_of_a_test_module_import():
    planted = ("from tests.slurm.test_slurm import Job\n"
               "def f():\n    import tests.trial.test_train\n    from tests.trial import test_phema, support\n"
               "from tests.conftest import ROOT\nfrom .test_analysis import check_report\n"
               "from ..conftest import digits_dir\nfrom ..launch.test_sweep import x\n"
               "from tests.support import ditscale\nimport tests.support.slurm\nfrom . import paths\n")
    assert sorted(cross_imports(planted, package="tests.analysis")) == [
        "tests.analysis.test_analysis", "tests.conftest", "tests.conftest", "tests.launch.test_sweep", "tests.slurm.test_slurm",
        "tests.trial.test_phema", "tests.trial.test_train"]
    assert cross_imports("from . import test_x\n", package="tests.models") == ["tests.models.test_x"]


def test_no_test_module_imports_another_test_module():
    offenders = {str(p.relative_to(ROOT)): found for p in _python_files()
                 if (found := cross_imports(p.read_text(), ".".join(p.relative_to(ROOT).parent.parts)))}
    assert not offenders, ("move what these share to tests/support/ (helpers) or tests/conftest.py "
                           f"(fixtures): {offenders}")


ROOMS = {"models", "data", "study", "evaluation", "trial", "analysis", "launch", "slurm", "repo"}


def test_tests_are_grouped_by_room():
    """Every test module sits in the folder of the room it specifies (issue 28 item 6): tests/<room>/test_*.py,
    the rooms of the package (launch's Slurm side has its own, repo/ checks the layout and CI); none at the top."""
    misplaced = [str(p.relative_to(TESTS)) for p in TESTS.rglob("test_*.py")
                 if p.parent == TESTS or p.relative_to(TESTS).parts[0] not in ROOMS]
    assert not misplaced, f"move these into tests/<room>/ (one of {sorted(ROOMS)}): {misplaced}"
    for room in ROOMS:
        assert (TESTS / room / "__init__.py").is_file(), f"tests/{room}/__init__.py (module names stay unique)"


def test_support_holds_no_tests_and_no_fixtures():
    """tests/support/ is imported, never collected: a test or a fixture there would run or exist once per
    importing module."""
    for path in sorted((TESTS / "support").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                assert not node.name.startswith("test_"), f"{path.name}: {node.name}"
                assert not any("fixture" in ast.unparse(d) for d in node.decorator_list), f"{path.name}: {node.name}"


# --- DITSCALE_REQUIRE_CHROMIUM: a missing browser fails the browser tests in CI --------------------------


def test_a_missing_chromium_skips_unless_required(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no browser on this PATH
    monkeypatch.delenv(chromium.REQUIRE_ENV, raising=False)
    with pytest.raises(pytest.skip.Exception, match="chromium is not installed"):
        chromium.chromium_or_skip()
    monkeypatch.setenv(chromium.REQUIRE_ENV, "1")
    with pytest.raises(pytest.fail.Exception, match="DITSCALE_REQUIRE_CHROMIUM=1 but chromium is not installed"):
        chromium.chromium_or_skip()
    fake = tmp_path / "chromium"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert chromium.chromium_or_skip() == str(fake)


# --- Behaviours: one expensive run, each behaviour checked and reported by name ----------------------------


def test_behaviours_name_every_failed_check_and_run_the_rest():
    checks, ran = Behaviours(), []
    with checks("the first behaviour"):
        assert 1 + 1 == 3, "arithmetic"
    with checks("the second behaviour"):
        ran.append(2)
    with checks("the third behaviour"):
        {}["missing"]
    assert ran == [2]
    with pytest.raises(pytest.fail.Exception) as failed:
        checks.done()
    text = str(failed.value)
    assert text.startswith("2 of 3 behaviours failed:")
    assert "- the first behaviour\n" in text and "arithmetic" in text and "test_test_layout.py:" in text
    assert "- the third behaviour\n" in text and "KeyError: 'missing'" in text
    assert "passed: the second behaviour" in text
    Behaviours().done()  # nothing failed: passes
