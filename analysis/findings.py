"""What the analysis of one study found: a plain record that analysis/analyse.py (and budget_laws,
loss_metric, bracketing, extrapolation) fill in, analysis/sections.py puts into words, and
analysis/report.py writes out (fits.json, the tables, the rendered report). It holds numbers and fit
results, never markup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from analysis.blocks import Figure


@dataclass
class Report:
    study: str
    uri: str
    parent_run_id: str | None
    trials: pd.DataFrame
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fits: list[dict] = field(default_factory=list)  # rows of the fit table
    frontier_notes: list[str] = field(default_factory=list)
    conventions: list[str] = field(default_factory=list)
    fd_rows: list[dict] = field(default_factory=list)
    findings: list[dict] = field(default_factory=list)  # DiT's qualitative findings: held or not
    budget: list[dict] = field(default_factory=list)  # per group: surface, isoFLOP, agreement, held-out, allocation
    not_claimed: list[str] = field(default_factory=list)  # one line per fit the report does not claim
    excluded: list[dict] = field(default_factory=list)  # trials left out of every fit, with their reason
    headline: list[str] = field(default_factory=list)  # what must be read first (methods that disagree)
    loss_metric: object | None = None  # analysis.loss_metric.LossMetric: loss -> image metrics, when logged
    # read from the runs' tags, a list of table rows each, or why they could not be read
    ladder_rows: list[list[str]] = field(default_factory=list)  # analysis/extrapolation.py
    ladder_error: str | None = None
    bracket_rows: list[list[str]] = field(default_factory=list)  # analysis/bracketing.py
    bracket_error: str | None = None

    def add_figure(self, path: Path | None, title: str, caption: str) -> None:
        """Keep a figure the analysis drew (a plotter returns None when it had nothing to draw)."""
        if path is not None:
            self.figures.append(Figure(path.name, title, caption))
