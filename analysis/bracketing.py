"""The report's note on bracketing (issue 27 item 2; harness/launch/bracket.py): every size the sweep added
to a budget because its loss minimum sat at an edge of its sizes, and why (the run's tags
ditscale.added_by = bracket, ditscale.added_why). The added trials are ordinary trials: the fits above use
them. Whether each budget is bracketed now is the isoFLOP budgets table's column; a budget still unbracketed
stays flagged there and out of N_opt(C), as for any grid — never silently fitted.

    added_rows(uri, experiment)          the table's rows, read in the analysis (analysis/report.py)
    blocks(rows, error, unbracketed)     in analysis/sections.py: the heading, table and sentence ([] when
                                         bracketing added nothing)
"""

from __future__ import annotations

import math

from analysis.blocks import Block, h3, para, table
from analysis.runs import newest_tagged_runs
from harness.tracking import STATUS_TAG

ADDED_BY_TAG = "ditscale.added_by"   # harness.launch.bracket.ADDED_BY_TAG (harness/launch imports torch)
ADDED_WHY_TAG = "ditscale.added_why"
ADDED_BY = "bracket"
HEAD = ["train.flops", "size added", "parameters", "why", "final val_loss", "status"]


def added_rows(uri: str, experiment: str) -> list[list[str]]:
    """One row per trial the bracketing added (its newest run), by budget then parameters."""
    rows = []
    for r in newest_tagged_runs(uri, experiment, ADDED_BY_TAG, ADDED_BY):
        tags, params, metrics = r.data.tags, r.data.params, r.data.metrics
        budget, n = _num(params.get("train.flops")), metrics.get("params", math.nan)
        loss = metrics.get("val_loss")
        rows.append((budget, n, [f"{budget:.3g}", tags.get("size") or params.get("model.size", ""),
                                 f"{n:,.0f}" if math.isfinite(n) else "–", tags.get(ADDED_WHY_TAG, ""),
                                 f"{loss:.4g}" if loss is not None else "–", tags.get(STATUS_TAG, "")]))
    return [row for *_, row in sorted(rows, key=lambda x: (x[0], x[1]))]


def _num(v) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def blocks(rows: list[list[str]], error: str | None, still: list[str]) -> list[Block]:
    """The bracketing note: the sizes added (`rows`, from added_rows; `error`: why they could not be read)
    and the budgets `still` unbracketed."""
    if error:  # the rest of the report beats none
        return [h3("Sizes added by bracketing"), para(f"the runs could not be read: {error}", True)]
    if not rows:
        return []
    text = (f"The sweep (bracket.max_extra_sizes) added {len(rows)} trial(s): each budget whose final val_loss was "
            "lowest at its smallest or largest size got the next size beyond that edge (one step of its log "
            "spacing, snapped to an untrained geometry), until the minimum sat inside or the limit was reached. "
            "They are ordinary trials, fitted above. ")
    text += (f"Still unbracketed, flagged in the isoFLOP budgets table and left out of N_opt(C): {', '.join(still)}."
             if still else "Every budget's minimum now sits inside its sizes.")
    return [h3("Sizes added by bracketing"), table(HEAD, rows), para(text, bool(still))]
