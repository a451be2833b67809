"""CI runs the README's test block verbatim (.ci/run), and that block calls scripts/test: a README prose
edit must not change, or silently empty, what CI runs. Fast: .ci/run --show only extracts the block."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.support.paths import ROOT


def _ci_block(readme_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(readme_dir / ".ci" / "run"), "--show"], check=False, capture_output=True,
                          text=True, timeout=30)


def test_ci_runs_the_readme_test_block_which_calls_scripts_test():
    shown = _ci_block(ROOT)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [
        "python3 -m venv .venv && . .venv/bin/activate",
        "pip install -e '.[dev]'",
        "scripts/test",
    ]
    # The user reads the same block under Quick start.
    readme = (ROOT / "README.md").read_text()
    assert "```bash\n" + shown.stdout + "```" in readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]


def test_ci_refuses_a_readme_without_its_marked_block(tmp_path):
    (tmp_path / ".ci").mkdir()
    shutil.copy(ROOT / ".ci" / "run", tmp_path / ".ci" / "run")
    readme = (ROOT / "README.md").read_text()
    (tmp_path / "README.md").write_text(readme.replace("<!-- ci: test block -->\n", ""))
    shown = _ci_block(tmp_path)
    assert shown.returncode == 1 and shown.stdout == ""
    assert "<!-- ci: test block -->" in shown.stderr
    (tmp_path / "README.md").write_text(readme.replace("<!-- ci: test block -->\n", "<!-- ci: test block -->\nprose\n"))
    shown = _ci_block(tmp_path)
    assert shown.returncode == 1 and "no code block right after" in shown.stderr


def test_scripts_test_is_pytest_with_the_callers_arguments():
    script = ROOT / "scripts" / "test"
    assert os.access(script, os.X_OK)
    # From another folder, with this interpreter first on PATH (as in the activated venv of the README).
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run([str(script), "--version"], check=False, cwd="/", env=env, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert "pytest" in done.stdout + done.stderr


def test_scripts_test_keeps_the_files_order_unless_asked_to_shuffle(tmp_path):
    """DITSCALE_TEST_ORDER: files (default) turns pytest-randomly off, random leaves it on, an integer is the
    seed; anything else is one line before pytest starts. A stand-in `python` first on PATH prints what
    pytest would have been given."""
    (tmp_path / "python").write_text('#!/bin/sh\necho "$@"\n')
    (tmp_path / "python").chmod(0o755)
    script = ROOT / "scripts" / "test"

    def given(order: str | None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "DITSCALE_TEST_ORDER"}
        env["PATH"] = f"{tmp_path}{os.pathsep}{env['PATH']}"
        if order is not None:
            env["DITSCALE_TEST_ORDER"] = order
        return subprocess.run([str(script), "-k", "x"], check=False, env=env, capture_output=True, text=True,
                              timeout=60)

    assert given(None).stdout.split() == "-m pytest -q -n 2 --dist loadgroup -p no:randomly -k x".split()
    assert given("files").stdout == given(None).stdout
    shuffled = given("random").stdout.splitlines()
    seed = shuffled[0].split("seed ")[1].split()[0]
    assert shuffled[1].split() == f"-m pytest -q -n 2 --dist loadgroup --randomly-seed={seed} -k x".split()
    assert f"DITSCALE_TEST_ORDER={seed} repeats" in shuffled[0] and seed.isdigit()
    assert "--randomly-seed=42 -k x" in given("42").stdout
    for bad in ("shuffle", "4x", "-1"):
        wrong = given(bad)
        assert wrong.returncode == 2 and "DITSCALE_TEST_ORDER must be files, random or a seed" in wrong.stderr
        assert wrong.stdout == ""
