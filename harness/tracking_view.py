"""The link that opens a study in MLflow 3's UI on what a scaling study needs: its training runs, one row
per trial, best val_loss first, with the quality metrics and the parameters the grid varies as columns.

Two things in MLflow 3.17's UI stand in the way of a plain experiment link (both read in its bundle,
mlflow/server/js/build/static/js, and seen in headless Chromium; tests/launch/test_mlflow_ui.py):

- It opens every experiment as the sidebar's GenAI / Model training switch says, and that switch starts
  on GenAI in a fresh browser (remembered per browser, in localStorage): an experiment of trials opens on
  a GenAI overview of traces and tokens. The experiment's `mlflow.experimentKind` tag (set by
  harness.tracking.experiment_id) is not consulted by this version (mlflow/mlflow#24498, "toggle out of
  sync with the opened experiment's kind"). The query parameter `workflowType=machine_learning` sets the
  switch, so the link carries it.
- Its runs table shows only Dataset, Source and Models by default, folds child runs under their parent
  (one collapsed sweep run), and remembers column choices per browser. The UI's own "Share" button
  saves a view (sort, columns) as the experiment tag `mlflow.sharedViewState.<key>`, plain or deflated
  JSON, opened by `?viewStateShareKey=<key>`; ditscale writes such a view. Sorting by a metric lists
  every run flat (the UI nests children only when sorted by start time).

Both are UI conventions rather than a documented API: if a later UI reads the view differently it says
so in a notice and shows the experiment's runs unsorted; the experiment kind tag and the runs are intact.
"""

from __future__ import annotations

import json
import re
from urllib.parse import urlsplit

VIEW_KEY = "ditscale-study"
VIEW_TAG_PREFIX = "mlflow.sharedViewState."  # the UI's SHARE_VIEW_STATE tag prefix
# Columns: metrics worth comparing trials by (the names analysis/runs.py reads as losses and Fréchet
# distances); the rest of a run's metrics are one click away in the UI's Columns menu.
_METRIC_COLUMNS = re.compile(r"^(loss|val_loss|fid.*|fd_.*)$")
MAX_COLUMNS = 40


def _column(group: str, key: str) -> str:
    return f"{group}.`{key}`"  # the UI's canonical column key (makeCanonicalSortKey)


def study_view(metric_keys, trials) -> dict:
    """The saved view: sorted by val_loss (flat), Dataset and Source, the study's quality metrics, and
    the parameters that differ between its trials (the grid's axes, as flattened params)."""
    metrics = sorted(k for k in set(metric_keys) if _METRIC_COLUMNS.match(k))
    flat = [t.flat_params() for t in trials]
    varying = [k for k in flat[0] if len({f.get(k) for f in flat}) > 1] if flat else []
    columns = [_column("attributes", "Dataset"), _column("attributes", "Source")]
    columns += [_column("metrics", k) for k in metrics] + [_column("params", k) for k in varying]
    # An experiment tag holds at most 5,000 characters: a grid of many axes shows its first ones.
    return {"orderByKey": _column("metrics", "val_loss"), "orderByAsc": True, "selectedColumns": columns[:MAX_COLUMNS]}


def save_study_view(client, exp_id: str, trials) -> str:
    """Write (or refresh) the study's saved view from the metrics its runs logged; returns its key."""
    from harness.tracking import TRIAL_ID_TAG

    runs = client.search_runs([exp_id], filter_string=f"tags.{TRIAL_ID_TAG} != ''", max_results=1000)
    keys = {k for r in runs for k in r.data.metrics}
    client.set_experiment_tag(exp_id, VIEW_TAG_PREFIX + VIEW_KEY, json.dumps(study_view(keys, trials)))
    return VIEW_KEY


def ui_base(uri: str) -> str:
    """Where the UI is: the tracking server itself (credentials left out), else the `mlflow ui` the
    sweep prints the command of (127.0.0.1:5000)."""
    if not uri.startswith(("http://", "https://")):
        return "http://127.0.0.1:5000"
    parts = urlsplit(uri)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path.rstrip('/')}"


def ui_url(uri: str, exp_id: str, view: str | None = VIEW_KEY) -> str:
    """The study's runs in the UI, as model-training runs, in the saved view `view` (None: sorted by
    val_loss only; the UI ignores a saved view when the link also sets a sort)."""
    query = "workflowType=machine_learning&" + (f"viewStateShareKey={view}" if view
                                                else "orderByKey=metrics.%60val_loss%60&orderByAsc=true")
    return f"{ui_base(uri)}/#/experiments/{exp_id}/runs?{query}"


def study_link(uri: str, name: str, trials) -> str | None:
    """Save the study's view and return the link to it; None when the store cannot be reached or the
    study has no experiment. Never fails the command that prints it."""
    from harness.tracking import EXPERIMENT_KIND_TAG, TRAINING_KIND, client, redact

    try:
        c = client(uri)
        exp = c.get_experiment_by_name(name)
        if exp is None:
            return None
        if EXPERIMENT_KIND_TAG not in exp.tags:  # a study trained before ditscale tagged its kind
            c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
        try:
            return ui_url(uri, exp.experiment_id, save_study_view(c, exp.experiment_id, trials))
        except Exception:  # e.g. a read-only store: the plain link still opens the runs
            return ui_url(uri, exp.experiment_id, view=None)
    except Exception as err:
        print(redact(f"warning: no MLflow UI link ({type(err).__name__}: {err})"))
        return None
