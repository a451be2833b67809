"""Several behaviours checked on one expensive run (a real sweep is minutes of CPU: one run, many checks),
each under its own name, so that a failure says which behaviour broke and the others are still checked.

    checks = Behaviours()
    with checks("a branch is its own trial run"):
        assert ...
    checks.done()   # fails, naming every behaviour whose block failed, with its message

A block ends at its first failed assert or error; the blocks after it still run. Values a later block needs are
computed outside the blocks."""

from __future__ import annotations

import traceback
from contextlib import contextmanager

import pytest


class Behaviours:
    def __init__(self):
        self.passed: list[str] = []
        self.failed: list[tuple[str, str]] = []

    @contextmanager
    def __call__(self, name: str):
        try:
            yield
        except Exception as err:  # an assert (or an error) in the block: note it, go on with the next behaviour
            where = traceback.extract_tb(err.__traceback__)[-1]
            what = str(err) if isinstance(err, AssertionError) else f"{type(err).__name__}: {err}"
            self.failed.append((name, f"{where.filename.rsplit('/', 1)[-1]}:{where.lineno}: {what}"))
        else:
            self.passed.append(name)

    def done(self) -> None:
        if self.failed:
            lines = [f"{len(self.failed)} of {len(self.failed) + len(self.passed)} behaviours failed:"]
            lines += [f"- {name}\n    {why}" for name, why in self.failed]
            lines += [f"passed: {', '.join(self.passed)}"] if self.passed else []
            pytest.fail("\n".join(lines), pytrace=False)
