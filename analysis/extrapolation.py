"""The report's Extrapolation section: how a study's pre-registered ladder runs came out.

A ladder run (harness/launch/ladder.py; MLflow tag ditscale.role=ladder) was predicted from the fitted
isoFLOP grid and its prediction registered — metrics prediction_loss, prediction_loss_lo,
prediction_loss_hi and the artifact ladder_prediction.json, logged before the run's first training
metric — then trained. This section reads the registration back as it was logged (it never predicts
again, so re-running the report cannot change a prediction) and sets the run's measured final
validation loss beside it: the check Liang et al. 2024 (arXiv 2410.08184) made of their DiT law beyond
the budgets they fitted.

Error % = 100 · (measured − predicted) / measured: positive when the law predicted too low a loss.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

from analysis.blocks import Block, h2, para, table
from analysis.runs import client, newest_tagged_runs
from harness.tracking import ROLE_TAG, STATUS_TAG

ROLE = "ladder"
ARTIFACT = "ladder_prediction.json"
MEASURED = "val_loss"


def ladder_runs(uri: str, experiment: str) -> list:
    """The newest run of each ladder trial of the experiment, oldest first."""
    return newest_tagged_runs(uri, experiment, ROLE_TAG, ROLE)


def registration(uri: str, run) -> dict:
    """The registration logged with the run (ladder_prediction.json), else what its metrics say."""
    c = client(uri)
    try:
        if any(a.path == ARTIFACT for a in c.list_artifacts(run.info.run_id)):
            with tempfile.TemporaryDirectory() as tmp:
                return json.loads(Path(c.download_artifacts(run.info.run_id, ARTIFACT, tmp)).read_text())
    except Exception:  # an unreadable artifact store: the metrics still carry the prediction
        pass
    m = run.data.metrics
    return {"prediction": {"loss": m.get("prediction_loss"), "lo": m.get("prediction_loss_lo"),
                           "hi": m.get("prediction_loss_hi"), "method": "as logged (metrics)"},
            "ratio": m.get("prediction_budget_ratio"), "snap": {"params": m.get("prediction_params")},
            "approach2": {}, "approach3": {}}


def outcome(run, reg: dict) -> dict:
    """Predicted vs measured for one ladder run: the registered prediction_loss metric (the number that
    was fixed before training) against the run's final val_loss, when it finished."""
    m = run.data.metrics
    predicted = m.get("prediction_loss", (reg.get("prediction") or {}).get("loss"))
    lo, hi = m.get("prediction_loss_lo"), m.get("prediction_loss_hi")
    status = run.data.tags.get(STATUS_TAG, "")
    measured = m.get(MEASURED) if status == "finished" else None
    out = {"predicted": predicted, "lo": lo, "hi": hi, "measured": measured, "status": status,
           "error_pct": None, "inside": None, "iso_predicted": (reg.get("approach2") or {}).get("loss"),
           "iso_error_pct": None, "better": None}
    if measured is not None and predicted is not None and measured > 0:
        out["error_pct"] = 100.0 * (measured - predicted) / measured
        if lo is not None and hi is not None:
            out["inside"] = bool(lo <= measured <= hi)
        iso = out["iso_predicted"]
        if iso is not None:
            out["iso_error_pct"] = 100.0 * (measured - iso) / measured
            a3 = (reg.get("approach3") or {}).get("loss") is not None
            main = "approach 3 (loss surface)" if a3 else "approach 2 (isoFLOP L_opt)"
            if a3:
                out["better"] = main if abs(out["error_pct"]) < abs(out["iso_error_pct"]) else \
                    "approach 2 (isoFLOP L_opt)" if abs(out["error_pct"]) > abs(out["iso_error_pct"]) else "tie"
            else:
                out["better"] = "only approach 2 predicted a loss"
        else:
            out["better"] = "only approach 3 predicted a loss"
    return out


def _f(v, fmt: str = ".4g") -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, fmt)


def _iv(v, ci) -> str:
    if v is None:
        return "–"
    return f"{_f(v)} [{_f(ci[0])}, {_f(ci[1])}]" if ci and None not in ci else f"{_f(v)} [n/a]"


def rows(uri: str, experiment: str) -> list[list[str]]:
    """The Extrapolation table's rows, one per ladder run."""
    out = []
    for run in ladder_runs(uri, experiment):
        reg = registration(uri, run)
        o = outcome(run, reg)
        a2, a3, s = reg.get("approach2") or {}, reg.get("approach3") or {}, reg.get("snap") or {}
        budget = reg.get("budget")
        size = f"{s.get('size', run.data.tags.get('size', '?'))} ({_f(s.get('params'), ',.0f')} params)"
        if s.get("effect") is not None:
            size += f"; snap changes the surface's loss by {s['effect']:+.3g}"
        fd = reg.get("fd") or {}
        fd_txt = (f"{fd['key']}: {_iv(fd.get('fd'), (fd.get('lo'), fd.get('hi')))}" if fd.get("key")
                  else fd.get("note", "none"))
        measured = _f(o["measured"]) if o["measured"] is not None else f"not measured ({o['status'] or 'unknown'})"
        out.append([_f(budget, ".3g"), _f(reg.get("ratio"), ".3g") + "×", size,
                    _iv(a3.get("n_opt"), a3.get("n_opt_ci")), _iv(a2.get("n_opt"), a2.get("n_opt_ci")),
                    _iv(o["predicted"], (o["lo"], o["hi"])) + _unidentified(reg),
                    _iv(a2.get("loss"), a2.get("loss_ci")), measured,
                    _f(o["error_pct"], "+.2f") + (" %" if o["error_pct"] is not None else ""),
                    {True: "yes", False: "⚠ no", None: "–"}[o["inside"]],
                    o["better"] or "–", fd_txt])
    return out


def _unidentified(reg: dict) -> str:
    """A registered surface prediction from a law the data do not identify says so (it is still the
    number registered: it is what the study would have claimed)."""
    a3 = reg.get("approach3") or {}
    if not str((reg.get("prediction") or {}).get("method", "")).startswith("approach 3"):
        return ""
    return f" (surface not identified: {a3['why_not']})" if a3.get("identified") is False and a3.get("why_not") else ""


HEAD = ["ladder budget (train.flops)", "÷ largest fitted budget", "trained size", "N_opt, approach 3 [95 %]",
        "N_opt, approach 2 [95 %]", "predicted val loss (registered) [95 %]", "approach 2 L_opt(C) [95 %]",
        "measured final val loss", "error (measured − predicted) / measured", "inside interval",
        "better prediction", "FD"]

EXPLAIN = ("Each ladder run was predicted from the fitted isoFLOP grid and its prediction registered (MLflow metrics "
           "prediction_loss, prediction_loss_lo, prediction_loss_hi, and the study's runs/STUDY/ladder/ file) "
           "before it trained a step; it is not in any fit. The registered prediction is the loss surface's "
           "(approach 3) at the trained, snapped size when the surface was fitted, else approach 2's L_opt(C); "
           "approach 2's L_opt(C) is at its N_opt, not at the snapped size. The report reads the registration; it "
           "never predicts again.")


def blocks(table_rows: list[list[str]], error: str | None) -> list[Block]:
    """The Extrapolation section: the ladder runs' `table_rows` (from rows(); `error`: why they could not be
    read), [] when no ladder ran."""
    if error:  # the rest of the report beats none
        return [h2("Extrapolation"), para(f"the ladder runs could not be read: {error}", True)]
    return [h2("Extrapolation"), para(EXPLAIN), table(HEAD, table_rows, 9)] if table_rows else []
