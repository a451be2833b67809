"""Where a trial's start-up time goes (trial start -> first step), by phase; logged as
`startup_s` and `startup_<phase>_s`, and read by `ditscale bench --startup`."""

from __future__ import annotations

import time


class StartupPhases:
    """Wall-clock seconds from `started_at` to each mark, in the order they were taken."""

    def __init__(self, started_at: float, early: dict[str, float] | None = None):
        self.started_at, self.marks = started_at, dict(early or {})  # early: marks taken by the caller

    def mark(self, name: str) -> None:
        self.marks[name] = time.time() - self.started_at

    def total(self) -> float:
        return max(self.marks.values())

    def metrics(self) -> dict[str, float]:
        out, previous = {"startup_s": self.total()}, 0.0
        for name, at in self.marks.items():
            out[f"startup_{name}_s"] = at - previous  # duration of the phase that ended at this mark
            previous = at
        return out

    def summary(self) -> str:
        parts = [f"{k[len('startup_'):-2]} {v:.1f}" for k, v in self.metrics().items() if k != "startup_s"]
        return f"{self.total():.1f} s (" + ", ".join(parts) + ")"
