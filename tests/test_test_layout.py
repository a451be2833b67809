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

TESTS = Path(__file__).resolve().parent


def _is_test_module(name: str) -> bool:
    """tests.test_x, tests.conftest, tests.test_x.y (a test module, or a name inside one)."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[0] == "tests" and (parts[1] == "conftest" or parts[1].startswith("test_"))


def cross_imports(source: str) -> list[str]:
    """The test modules (tests.test_*, tests.conftest) that `source` imports anywhere (inside functions
    too): `from tests.test_x import y`, `import tests.test_x`, `from tests import test_x`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names if _is_test_module(alias.name)]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            if _is_test_module(node.module):
                found.append(node.module)
            elif node.module == "tests":
                found += [f"tests.{alias.name}" for alias in node.names if _is_test_module(f"tests.{alias.name}")]
        elif isinstance(node, ast.ImportFrom) and node.level:  # `from . import test_x`, `from .conftest import y`
            names = [node.module] if node.module else [alias.name for alias in node.names]
            found += [f"tests.{n}" for n in names if _is_test_module(f"tests.{n}")]
    return found


def _python_files() -> list[Path]:
    return sorted(p for p in TESTS.rglob("*.py") if "data" not in p.relative_to(TESTS).parts)


def test_the_check_finds_every_form_of_a_test_module_import():
    planted = ("from tests.test_slurm import Job\n"
               "def f():\n    import tests.test_train\n    from tests import test_phema, support\n"
               "from tests.conftest import ROOT\nfrom .test_analysis import check_report\n"
               "from tests.support import ditscale\nimport tests.support.slurm\n")
    assert sorted(cross_imports(planted)) == ["tests.conftest", "tests.test_analysis", "tests.test_phema",
                                              "tests.test_slurm", "tests.test_train"]


def test_no_test_module_imports_another_test_module():
    offenders = {str(p.relative_to(TESTS.parent)): found for p in _python_files()
                 if (found := cross_imports(p.read_text()))}
    assert not offenders, ("move what these share to tests/support/ (helpers) or tests/conftest.py "
                           f"(fixtures): {offenders}")


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
