"""MLflow -> pandas: one row per trial, and the metric histories as a long table.

What is read (the layout harness/tracking.py and harness/trial/loop.py write):
- one experiment per study; one child run per trial with the tag `trial_id`, the tags family, size,
  patch, objective, attention, model, `ditscale.status`, `mlflow.parentRunId` (the sweep's parent
  run), and the trial's flattened config as params with dotted keys (`model.size`, `train.batch_size`);
- metrics per log interval with step = training step: loss, lr, grad_norm, img_per_s, tflops, mfu,
  data_wait_frac, corrupt_samples, samples_seen, train_gflops (cumulative training compute in
  multiply-adds, 3 × forward × images seen), startup_s; evaluation adds val_loss, se_val_loss (the
  standard error of val_loss over validation draws: a noise level, not a loss), fid / fd_<extractor>
  (optionally per CFG scale: fid_cfg1.5, fd_lenet_cfg1.5) and kid; and per evaluation the artifact
  val_losses/step-<step>.json, the per-sample validation losses ({"sample": [...], "t": [...], "loss": [...]}).

A trial that ran several times (re-runs, several sweeps) is one row: the newest run of its trial_id.
No torch here: from harness/ and models/ only the torch-free contract modules are imported — the
MLflow conventions (harness.tracking), the preset sizes (models.registry), the compute rule
(models.flops) and the evaluator's noise estimator (harness.evaluation.noise) — so that each rule has
one home.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from harness.evaluation.noise import VAL_LOSSES_DIR
from harness.tracking import (
    DETECTOR_TAG,
    PARENT_TAG,
    REWINDS_TAG,
    ROLE_TAG,
    STATUS_TAG,
    SWEEP_TAG,
    TRIAL_ID_TAG,
    redact,
    resolve_tracking_uri,
)
from models.flops import training_gflops
from models.registry import size_order

log = logging.getLogger("analysis")

TAG_COLUMNS = ("family", "size", "patch", "objective", "attention", "model")

# Metrics where lower is better: their best value over the run is kept beside the final one. Both
# patterns are anchored, so se_val_loss (val_loss's standard error) is in neither: it is a noise level,
# never a loss to minimise or plot (it reaches the trials as final_se_val_loss only).
LOWER_IS_BETTER = re.compile(r"^(loss|val_loss.*|fid.*|fd_.*|kid.*)$")
# Metrics the report needs histories of (quality over training, and compute to put them on an axis).
HISTORY_KEYS = re.compile(r"^(loss|val_loss.*|fid.*|fd_.*|kid.*|kd_.*|train_gflops|samples_seen)$")
_FD = re.compile(r"^(?:fid|fd_(?P<ext>.+?))(?:_cfg(?P<cfg>\d+(?:\.\d+)?))?$")
# Where a parameter count or forward GFLOPs may be found: the trainer logs the metrics `params` and
# `forward_gflops`; the other names are read for runs logged by other tools.
_PARAM_COUNT_KEYS = ("params", "n_params", "num_params", "model.params", "model.n_params", "param_count")
_FORWARD_KEYS = ("forward_gflops", "model.forward_gflops", "gflops")


def default_tracking_uri(uri: str | None = None) -> str:
    """The harness's rule (harness.tracking.resolve_tracking_uri): the given URI, else
    $MLFLOW_TRACKING_URI, else sqlite:///<cwd>/mlflow.db; relative SQLite paths are anchored here."""
    return resolve_tracking_uri(uri)


def client(tracking_uri: str | None = None):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=default_tracking_uri(tracking_uri))


class ExperimentNotFound(LookupError):
    pass


def experiment_id(tracking_uri: str | None, experiment: str) -> str:
    exp = client(tracking_uri).get_experiment_by_name(experiment)
    if exp is None:
        raise ExperimentNotFound(f"no MLflow experiment named {experiment!r} at {default_tracking_uri(tracking_uri)}")
    return exp.experiment_id


def _all_runs(c, exp_id: str, filter_string: str = "") -> list:
    # Paged by hand on a client bound to `c`'s store: mlflow.search_runs (which pages by itself)
    # searches only the process-wide tracking URI, and setting that would change it for the caller.
    runs, token = [], None
    while True:
        page = c.search_runs([exp_id], filter_string=filter_string, max_results=1000, page_token=token,
                             order_by=["attributes.start_time ASC"])
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def find_parent_run(tracking_uri: str | None, experiment: str) -> str | None:
    """The newest sweep parent run of the experiment (tag ditscale.sweep), else the parent most of
    the trials point at, else None."""
    c = client(tracking_uri)
    try:
        exp_id = experiment_id(tracking_uri, experiment)
    except ExperimentNotFound:
        return None
    runs = _all_runs(c, exp_id)
    sweeps = [r for r in runs if r.data.tags.get(SWEEP_TAG) == "true"]
    if sweeps:
        return max(sweeps, key=lambda r: r.info.start_time or 0).info.run_id
    parents = pd.Series([r.data.tags.get(PARENT_TAG) for r in runs if r.data.tags.get(TRIAL_ID_TAG)]).dropna()
    return str(parents.value_counts().index[0]) if len(parents) else None


def _sweep_trial_ids(c, parent_run_id: str) -> set[str]:
    """The trial ids a sweep ran: its trial_status.json (written by the sweep; it also lists trials
    that kept an older parent because a re-run resumed them), when present."""
    quiet = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(quiet)
    os.environ[quiet] = "false"  # no progress bar for one small file
    try:
        if not any(a.path == "trial_status.json" for a in c.list_artifacts(parent_run_id)):
            return set()
        with tempfile.TemporaryDirectory() as tmp:
            path = c.download_artifacts(parent_run_id, "trial_status.json", tmp)
            rows = json.loads(Path(path).read_text())
        return {str(r["trial_id"]) for r in rows if r.get("trial_id")}
    except Exception:  # unreadable (an older sweep, a hand-made parent): children by tag only
        return set()
    finally:
        if before is None:
            os.environ.pop(quiet, None)
        else:
            os.environ[quiet] = before


def trial_runs(tracking_uri: str | None, experiment: str, parent_run_id: str | None = None) -> list:
    """The newest MLflow run of each trial (runs tagged trial_id), optionally of one sweep."""
    c = client(tracking_uri)
    exp_id = experiment_id(tracking_uri, experiment)
    # WSD trunks (harness/launch/branches.py) are means, not results: their branches are the trials. Ladder
    # runs (harness/launch/ladder.py) test the fitted law: never fitted, reported by analysis/extrapolation.py.
    runs = [r for r in _all_runs(c, exp_id)
            if r.data.tags.get(TRIAL_ID_TAG) and r.data.tags.get(ROLE_TAG) not in ("trunk", "ladder")]
    if parent_run_id:
        wanted = {r.data.tags[TRIAL_ID_TAG] for r in runs if r.data.tags.get(PARENT_TAG) == parent_run_id}
        wanted |= _sweep_trial_ids(c, parent_run_id)
        runs = [r for r in runs if r.data.tags[TRIAL_ID_TAG] in wanted]
    newest: dict[str, object] = {}
    for r in runs:  # oldest first: the newest run of a trial wins
        tid = r.data.tags[TRIAL_ID_TAG]
        if tid not in newest or (r.info.start_time or 0) >= (newest[tid].info.start_time or 0):
            newest[tid] = r
    return sorted(newest.values(), key=lambda r: r.info.start_time or 0)


def newest_tagged_runs(tracking_uri: str | None, experiment: str, tag: str, value: str) -> list:
    """The newest run of each trial_id among the experiment's runs tagged `tag` = `value`, oldest first
    (every page of them): the sizes bracketing added (analysis/bracketing.py), the ladder runs
    (analysis/extrapolation.py). [] when the experiment does not exist."""
    c = client(tracking_uri)
    exp = c.get_experiment_by_name(experiment)
    if exp is None:
        return []
    newest = {}
    for r in _all_runs(c, exp.experiment_id, filter_string=f"tags.`{tag}` = '{value}'"):
        newest[r.data.tags.get(TRIAL_ID_TAG)] = r  # oldest first: the newest run of a trial wins
    return list(newest.values())


def _numeric_column(s: pd.Series) -> pd.Series:
    """A column of param strings as numbers when every non-empty value is one, else unchanged."""
    non_empty = s[s.notna() & (s.astype(str) != "")]
    if non_empty.empty:
        return s
    as_num = pd.to_numeric(non_empty, errors="coerce")
    if as_num.isna().any() or non_empty.astype(str).str.lower().isin(["true", "false", "nan"]).any():
        return s
    out = pd.to_numeric(s.where(s.astype(str) != ""), errors="coerce")
    if (out.dropna() == out.dropna().round()).all() and out.notna().all():
        return out.astype("int64")
    return out


def _first_number(*sources, keys) -> float:
    for src in sources:
        for k in keys:
            v = src.get(k)
            if v is None or v == "":
                continue
            try:
                f = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(f):
                return f
    return math.nan


def load_histories(tracking_uri: str | None, experiment: str, parent_run_id: str | None = None,
                   keys=None, runs: list | None = None) -> pd.DataFrame:
    """Long table of metric histories: run_id, trial_id, key, step, value, timestamp (ms).

    keys: a list of metric names, a regex (str), or None for every metric of every run. `runs`
    (from trial_runs) avoids searching MLflow again. A run that was rewound and trained again (tag
    REWINDS_TAG) gives its latest pass only: one point per step, none left over from the pass it replaced."""
    c = client(tracking_uri)
    if runs is None:
        runs = trial_runs(tracking_uri, experiment, parent_run_id)
    pattern = re.compile(keys) if isinstance(keys, str) else None
    rows: list[tuple] = []
    for r in runs:
        tid = r.data.tags.get(TRIAL_ID_TAG)
        run_rewinds = _rewinds(r)
        for key in sorted(r.data.metrics):
            if pattern is not None and not pattern.search(key):
                continue
            if pattern is None and keys is not None and key not in keys:
                continue
            history = c.get_metric_history(r.info.run_id, key)
            rewinds = [] if key.startswith("system/") else run_rewinds  # system metrics count their own steps
            for m in history:
                if not any(m.step > step and m.timestamp < at for step, at in rewinds):
                    rows.append((r.info.run_id, tid, key, int(m.step), float(m.value), int(m.timestamp)))
    df = pd.DataFrame(rows, columns=["run_id", "trial_id", "key", "step", "value", "timestamp"])
    return df.sort_values(["run_id", "key", "step", "timestamp"], kind="stable").reset_index(drop=True)


def _rewinds(run) -> list[tuple[int, int]]:
    """The run's rewinds (harness/trial/checkpoint.py record_rewind): (step, time_ms) pairs; a point at a
    later step logged before that time belongs to a pass that was rewound and trained again, so only the
    latest pass is read. A malformed tag is ignored with a warning naming the run."""
    raw = run.data.tags.get(REWINDS_TAG)
    if not raw:
        return []
    try:
        return [(int(step), int(at)) for step, at in json.loads(raw)]
    except (ValueError, TypeError) as err:
        log.warning("run %s: tag %s not read (%s); its metric histories may hold rewound steps twice",
                    run.info.run_id, REWINDS_TAG, err)
        return []


def load_val_samples(tracking_uri: str | None, trials: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """trial_id -> its final evaluation's per-sample validation losses (columns sample: int, t and loss:
    float; sample 0 .. n-1 once each), for the trials whose run has them (runs logged before they
    existed, or without val shards, do not). A file that cannot be read or is malformed (e.g. a string or
    a nested list in `t` or `loss`) is skipped with a warning naming the run and the file: the findings
    then judge that trial's gaps by its se_val_loss, and the rest of the analysis goes on."""
    c = client(tracking_uri)
    out = {}
    with tempfile.TemporaryDirectory(prefix="ditscale-val-") as tmp:
        for run_id, trial_id in zip(trials["run_id"], trials["trial_id"]):
            name = VAL_LOSSES_DIR
            try:
                files = [f.path for f in c.list_artifacts(run_id, VAL_LOSSES_DIR) if f.path.endswith(".json")]
                if not files:
                    continue
                name = max(files)  # step-%08d: the newest sorts last
                with open(c.download_artifacts(run_id, name, tmp)) as f:
                    df = val_samples_table(json.load(f))
            except Exception as err:  # an unreachable artifact store, a malformed file: fall back to se
                log.warning("per-sample validation losses of run %s (trial %s), file %s, not used (%s: %s): its "
                            "gaps are judged by its se_val_loss instead", run_id, trial_id, name,
                            type(err).__name__, str(err)[:200])
                continue
            out[str(trial_id)] = df
    return out


def val_samples_table(data) -> pd.DataFrame:
    """The evaluator's per-sample table ({"sample": [...], "t": [...], "loss": [...]}, equal lengths) ->
    a DataFrame of int sample, float t and loss, sorted by sample; ValueError unless every entry is a
    plain finite number (bools, strings and nested lists are refused: pandas would keep them as objects,
    and the paired-gap arithmetic would stop the analysis on them) and the samples are 0 .. n-1 once."""
    if not isinstance(data, dict) or not all(isinstance(data.get(k), list) for k in ("sample", "t", "loss")):
        raise ValueError("not a mapping of the lists sample, t and loss")
    columns = {}
    for key in ("sample", "t", "loss"):
        values = data[key]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            bad = next(v for v in values if not isinstance(v, (int, float)) or isinstance(v, bool))
            raise ValueError(f"{key} holds {type(bad).__name__} {str(bad)[:40]!r}, not a number")
        columns[key] = np.asarray(values, dtype=float)
        if not np.isfinite(columns[key]).all():
            raise ValueError(f"{key} holds a value that is not finite")
    if not len(columns["sample"]) == len(columns["t"]) == len(columns["loss"]):
        raise ValueError("sample, t and loss differ in length")
    df = pd.DataFrame(columns).sort_values("sample", kind="stable").reset_index(drop=True)
    if not np.array_equal(df["sample"].to_numpy(), np.arange(len(df))):
        raise ValueError("its samples are not 0 .. n-1, once each")
    return df.astype({"sample": int})


def _arch(family: str, attention: str) -> str:
    return f"mmdit-{attention or 'joint'}" if family == "mmdit" else (family or "")


def size_rank(size: str, family: str = "") -> float:
    """Order of a size name within its family: by depth x width^2 (DiT's XXS < d3w96 < XS < S < B < L < XL,
    MM-DiT's dN by depth); a name that does not parse sorts last."""
    size = str(size)
    if not family:
        family = "mmdit" if re.fullmatch(r"d\d+", size) else "dit"
    rank = size_order(family, size)
    return rank if math.isfinite(rank) else math.inf


def _trial_row(r, metrics: dict | None = None) -> dict:
    """A trial's columns from its run: ids, status, times, the model tags, compute, every final metric
    (`metrics`: the final values when not MLflow's latest, as for a rewound run: _latest_pass_finals)."""
    tags, params = r.data.tags, r.data.params
    metrics = r.data.metrics if metrics is None else metrics
    family = tags.get("family") or params.get("model.family", "")
    attention = tags.get("attention") if tags.get("attention") is not None else params.get("model.attention", "")
    if family != "mmdit":
        attention = ""
    row = {
        "run_id": r.info.run_id, "trial_id": tags.get(TRIAL_ID_TAG), "run_name": tags.get("mlflow.runName", ""),
        # redact: a tag written before ditscale redacted them may hold a tracking URI's password
        "status": redact(tags.get(STATUS_TAG) or (r.info.status or "").lower()), "mlflow_status": r.info.status,
        "start_time": pd.to_datetime(r.info.start_time, unit="ms", utc=True) if r.info.start_time else pd.NaT,
        "end_time": pd.to_datetime(r.info.end_time, unit="ms", utc=True) if r.info.end_time else pd.NaT,
        "parent_run_id": tags.get(PARENT_TAG),
        "family": family, "size": tags.get("size") or params.get("model.size", ""),
        "patch": tags.get("patch") or params.get("model.patch", ""),
        "attention": attention, "objective": tags.get("objective") or params.get("objective.kind", ""),
        "model": tags.get("model", ""),
        "detector": tags.get(DETECTOR_TAG, ""),  # the FD's feature network and weights; "" before it was logged
    }
    row["arch"] = _arch(family, attention)
    samples, train_gflops = metrics.get("samples_seen", math.nan), metrics.get("train_gflops", math.nan)
    fwd = _first_number(metrics, params, tags, keys=_FORWARD_KEYS)
    if not math.isfinite(fwd) and samples and math.isfinite(samples) and math.isfinite(train_gflops):
        fwd = train_gflops / training_gflops(1.0, samples)  # training compute per unit forward
    row["forward_gflops"] = fwd
    row["params"] = _first_number(metrics, params, tags, keys=_PARAM_COUNT_KEYS)
    row["train_gflops"] = train_gflops
    row["samples_seen"] = samples
    for k, v in sorted(metrics.items()):
        row[f"final_{k}"] = v
    return row


def _add_history_columns(df: pd.DataFrame, histories: pd.DataFrame) -> None:
    """steps (the last logged step), best_<metric> (the minimum over the run) and loss_tail (the mean
    training loss over the last 10 % of its logs) from the histories."""
    if histories.empty:
        return
    h = histories[histories["run_id"].isin(df["run_id"])]
    steps = h.groupby("run_id")["step"].max()
    df["steps"] = df["run_id"].map(steps)
    best = h[h["key"].str.match(LOWER_IS_BETTER)].groupby(["run_id", "key"])["value"].min().unstack()
    for k in best.columns:
        df[f"best_{k}"] = df["run_id"].map(best[k])
    loss = h[h["key"] == "loss"]
    if not loss.empty:
        tail = loss.groupby("run_id")["value"].apply(lambda v: v.iloc[-max(1, int(math.ceil(len(v) * 0.1))):].mean())
        df["loss_tail"] = df["run_id"].map(tail)


def load_trials(tracking_uri: str | None, experiment: str, parent_run_id: str | None = None,
                histories: pd.DataFrame | None = None, runs: list | None = None) -> pd.DataFrame:
    """One row per trial (the newest run of each trial_id; of one sweep when parent_run_id is given).

    Columns: run_id, trial_id, run_name, status (the ditscale.status tag, else MLflow's status),
    mlflow_status, start_time, end_time, parent_run_id, family, size, patch, attention, objective,
    model, arch (dit | mmdit-joint | mmdit-split), label (a legend name); forward_gflops (forward
    GFLOPs of one image, multiply-adds: logged value, else train_gflops / samples_seen / 3, else
    NaN), params (parameter count when logged, else NaN), train_gflops (training compute at the end,
    multiply-adds), samples_seen, steps (last logged step); final_<metric> for every metric (a rewound
    run's: its latest pass's, _latest_pass_finals) and
    best_<metric> (minimum over the run) for loss, val_loss*, fid*, fd_*, kid* (not se_val_loss); loss_tail (mean
    training loss over the last 10 % of its logs, a less noisy final loss); then every config param
    under its dotted key (numbers as numbers).
    histories: the output of load_histories, when already loaded (for best_* and loss_tail).
    """
    if runs is None:
        runs = trial_runs(tracking_uri, experiment, parent_run_id)
    if histories is None:
        histories = load_histories(tracking_uri, experiment, keys=LOWER_IS_BETTER.pattern, runs=runs)
    rows, param_keys = [], []
    for r in runs:
        row = _trial_row(r, _latest_pass_finals(tracking_uri, experiment, r, histories) if _rewinds(r) else None)
        row.update({f"param:{k}": v for k, v in r.data.params.items()})
        param_keys.extend(k for k in r.data.params if k not in param_keys)
        rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["run_id", "trial_id", "status", "family", "size", "patch", "attention",
                                     "objective", "model", "arch", "forward_gflops", "params", "train_gflops"])
    df["patch"] = pd.to_numeric(df["patch"], errors="coerce").astype("Int64")
    # final = the value at the last step (MLflow's latest; a rewound run's latest pass); best and loss_tail
    # from the histories
    _add_history_columns(df, histories)
    if "steps" not in df or df["steps"].isna().all():
        df["steps"] = df.get("final_step", pd.Series(np.nan, index=df.index))
    # the config, under its dotted keys (after the derived columns, numbers as numbers)
    params = df[[f"param:{k}" for k in param_keys]].rename(columns=lambda c: c[len("param:"):])
    params = params.apply(_numeric_column)
    df = df.drop(columns=[f"param:{k}" for k in param_keys])
    df = pd.concat([df, params[[c for c in params.columns if c not in df.columns]]], axis=1)
    df["label"] = df.apply(_label, axis=1)
    df["size_rank"] = [size_rank(s, f) for s, f in zip(df["size"], df.get("family", pd.Series("", index=df.index)).fillna(""))]
    lead = ["trial_id", "run_id", "label", "status", "arch", "family", "size", "patch", "attention", "objective",
            "model", "forward_gflops", "params", "train_gflops", "samples_seen", "steps"]
    lead = [c for c in lead if c in df]
    df = df[lead + [c for c in df.columns if c not in lead]].reset_index(drop=True)
    df.attrs["config_keys"] = list(param_keys)  # which columns are the trial config (see analysis.study)
    return df


def _latest_pass_finals(tracking_uri: str | None, experiment: str, run,
                        histories: pd.DataFrame | None = None) -> dict[str, float]:
    """The final value of each metric of a rewound run (REWINDS_TAG) as its latest pass left it: the last
    point by step, then time, of its read history (load_histories). MLflow's latest values are the
    replaced pass's until the new pass reaches the old highest step (a trunk retrained and stopped
    earlier, a trial killed again); a metric that only the replaced pass logged has no final value.
    system/ metrics count their own steps and keep MLflow's latest. `histories`: what load_histories
    already read (the run's keys found there are not read from MLflow again)."""
    keys = [k for k in run.data.metrics if not k.startswith("system/")]
    finals = {k: v for k, v in run.data.metrics.items() if k.startswith("system/")}
    have = pd.DataFrame(columns=["key", "step", "timestamp", "value"])
    if histories is not None and not histories.empty:
        have = histories[(histories["run_id"] == run.info.run_id) & histories["key"].isin(keys)]
    missing = [k for k in keys if k not in set(have["key"])]
    if keys:
        hist = have
        if missing:
            hist = pd.concat([have, load_histories(tracking_uri, experiment, keys=missing, runs=[run])])
        last = hist.sort_values(["key", "step", "timestamp"], kind="stable").groupby("key")["value"].last()
        finals.update({k: float(v) for k, v in last.items()})
    return finals


def _label(row) -> str:
    name = row.get("model") or f"{row.get('family')}-{row.get('size')}/{row.get('patch')}"
    if row.get("family") == "mmdit":
        name += f" {row.get('attention') or 'joint'}"
    return name


def describe_fd_metric(key: str) -> dict | None:
    """fid, fid_cfg1.5 -> FID (Inception-v3); fd_lenet_cfg1.5 -> Fréchet distance in lenet features,
    a stand-in that is not FID. None for other metric names."""
    m = _FD.match(key)
    if not m:
        return None
    ext = m.group("ext")
    cfg = float(m.group("cfg")) if m.group("cfg") else None
    return {"key": key, "extractor": ext or "inception", "is_fid": ext is None, "cfg": cfg,
            "name": ("FID" if ext is None else f"FD ({ext} features, stand-in, not FID)")
            + (f", CFG {m.group('cfg')}" if cfg is not None else "")}


def fd_metrics(keys) -> list[dict]:
    """The Fréchet-distance metrics among `keys`, FID first, then stand-ins; by CFG scale."""
    out = [d for d in (describe_fd_metric(k) for k in set(keys)) if d]
    return sorted(out, key=lambda d: (not d["is_fid"], d["extractor"], d["cfg"] if d["cfg"] is not None else -1))


def primary_fd_metric(keys) -> dict | None:
    """The Fréchet distance the figures use: FID when logged, else the stand-in; without a CFG
    suffix when logged, else the highest CFG scale (the DiT paper's headline FID uses CFG 1.5)."""
    found = fd_metrics(keys)
    if not found:
        return None
    kind = [d for d in found if d["is_fid"] == found[0]["is_fid"] and d["extractor"] == found[0]["extractor"]]
    plain = [d for d in kind if d["cfg"] is None]
    return plain[0] if plain else max(kind, key=lambda d: d["cfg"])


def metric_curves(histories: pd.DataFrame, trials: pd.DataFrame, key: str) -> pd.DataFrame:
    """One metric over training with its training compute: trial_id, run_id, step, value, compute
    (train_gflops at that step, interpolated over the logged steps; else 3 × forward GFLOPs ×
    batch size × step) and samples_seen; plus the trial's descriptive columns."""
    h = histories[histories["key"] == key]
    if h.empty:
        return pd.DataFrame(columns=["trial_id", "run_id", "step", "value", "compute"])
    h = h.drop_duplicates(["run_id", "step"], keep="last")
    out = []
    for run_id, g in h.groupby("run_id", sort=False):
        g = g.sort_values("step")
        steps = g["step"].to_numpy(dtype=float)
        comp = np.full(steps.shape, np.nan)
        tg = histories[(histories["run_id"] == run_id) & (histories["key"] == "train_gflops")].sort_values("step")
        if len(tg):
            comp = np.interp(steps, tg["step"].to_numpy(dtype=float), tg["value"].to_numpy(dtype=float),
                             left=np.nan, right=np.nan)
            # before the first log, compute grows linearly from 0
            first_step, first = float(tg["step"].iloc[0]), float(tg["value"].iloc[0])
            early = steps < first_step
            comp[early] = first * steps[early] / first_step if first_step > 0 else np.nan
        trow = trials[trials["run_id"] == run_id]
        if np.isnan(comp).any() and len(trow):
            fwd = float(trow["forward_gflops"].iloc[0])
            batch = float(trow["train.batch_size"].iloc[0]) if "train.batch_size" in trow else math.nan
            comp = np.where(np.isnan(comp), training_gflops(fwd, batch * steps), comp)
        out.append(pd.DataFrame({"run_id": run_id, "trial_id": g["trial_id"].to_numpy(), "step": g["step"].to_numpy(),
                                 "value": g["value"].to_numpy(), "compute": comp}))
    df = pd.concat(out, ignore_index=True)
    cols = [c for c in ("run_id", "label", "arch", "family", "size", "patch", "attention", "objective",
                        "forward_gflops", "params", "size_rank") if c in trials]
    return df.merge(trials[cols], on="run_id", how="left")
