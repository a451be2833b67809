"""The report's note on bracketing (issue 27 item 2; harness/launch/bracket.py): every size the sweep added
to a budget because its loss minimum sat at an edge of its sizes, and why (the run's tags
ditscale.added_by = bracket, ditscale.added_why). The added trials are ordinary trials: the fits above use
them. Whether each budget is bracketed now is the isoFLOP budgets table's column; a budget still unbracketed
stays flagged there and out of N_opt(C), as for any grid — never silently fitted.

    blocks(rep)   in report._sections: the heading, table and sentence ([] when bracketing added nothing)
"""

from __future__ import annotations

import math

from harness.tracking import STATUS_TAG, TRIAL_ID_TAG

ADDED_BY_TAG = "ditscale.added_by"   # harness.launch.bracket.ADDED_BY_TAG (harness/launch imports torch)
ADDED_WHY_TAG = "ditscale.added_why"
ADDED_BY = "bracket"
HEAD = ["train.flops", "size added", "parameters", "why", "final val_loss", "status"]


def added_rows(uri: str, experiment: str) -> list[list[str]]:
    """One row per trial the bracketing added (its newest run), by budget then parameters."""
    from analysis.runs import client

    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.`{ADDED_BY_TAG}` = '{ADDED_BY}'",
                         order_by=["attributes.start_time ASC"], max_results=50000)
    newest = {r.data.tags.get(TRIAL_ID_TAG): r for r in runs}  # oldest first: the newest run of a trial wins
    rows = []
    for r in newest.values():
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


def _unbracketed(rep) -> list[str]:
    out = []
    for r in rep.budget:
        iso = r.get("isoflop")
        if iso is not None and not iso.budgets.empty:
            out += [f"{x['budget']} ({r['group']})" for _, x in iso.budgets.iterrows() if not x["bracketed"]]
    return out


def blocks(rep) -> list[tuple]:
    """The report blocks (analysis/report.py's _sections format) of the bracketing note."""
    try:
        rows = added_rows(rep.uri, rep.study)
    except Exception as err:  # the rest of the report beats none
        return [("h3", "Sizes added by bracketing"), ("p", f"the runs could not be read: {type(err).__name__}: {err}",
                                                      True)]
    if not rows:
        return []
    still = _unbracketed(rep)
    text = (f"The sweep (bracket.max_extra_sizes) added {len(rows)} trial(s): each budget whose final val_loss was "
            "lowest at its smallest or largest size got the next size beyond that edge (one step of its log "
            "spacing, snapped to an untrained geometry), until the minimum sat inside or the limit was reached. "
            "They are ordinary trials, fitted above. ")
    text += (f"Still unbracketed, flagged in the isoFLOP budgets table and left out of N_opt(C): {', '.join(still)}."
             if still else "Every budget's minimum now sits inside its sizes.")
    return [("h3", "Sizes added by bracketing"), ("table", HEAD, rows, None), ("p", text, bool(still))]
