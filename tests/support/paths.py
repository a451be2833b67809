"""Where the tests find the repository and their fixture files, wherever in tests/ a test module sits."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository: tests/support/paths.py -> ../..
FIXTURES = ROOT / "tests" / "fixtures"  # files the tests read (loss traces, a base study)
EXPERIMENTS = ROOT / "experiments"
