"""MLflow conventions.

- Store: `tracking.uri`, else $MLFLOW_TRACKING_URI, else `sqlite:///<cwd>/mlflow.db` (an absolute
  path, because Ray workers run in other folders). An HTTP tracking server works the same way.
- One experiment per study `name`; one run per trial, found again by its `trial_id` tag (a hash of
  the trial's config), so a re-run resumes the same run instead of creating a second one.
- Params: the trial's flattened config (the same keys for every trial, so the UI can compare them).
  Tags: family, size, patch, objective, attention, model, trial_id, the git commit.
- Only rank 0 talks to MLflow.
- The experiment is tagged as a model-training one (`mlflow.experimentKind`), each trial's run gets its
  shards as dataset inputs (harness/tracking_inputs.py) and the study file as its source;
  harness/tracking_view.py makes the link that opens the study in MLflow 3's UI on its training runs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml

from harness.credentials import (  # noqa: F401
    CREDENTIAL_VARS,
    SECRET_VARS,
    URL_RE,
    public_config,
    redact,
    redact_uri,
    split_credentials,
    take_credentials,
)
from harness.errors import UserError

TRIAL_ID_TAG = "trial_id"
PARENT_TAG = "mlflow.parentRunId"
STATUS_TAG = "ditscale.status"  # running | finished | diverged: <why> | failed: <reason> | killed
# JSON [[step, time_ms], ...]: one pair per resume that went back behind what the run had logged
# (harness/trial/checkpoint.py record_rewind writes it; analysis/runs.py reads the latest pass through it).
REWINDS_TAG = "ditscale.rewinds"
# The FD's feature network and its weights (features.Extractor.identity, e.g. "shapesdet@<sha256>"; metric
# networks as DETECTOR_TAG.<metric>): the report refuses to rank FDs of different detectors (analysis/runs.py).
DETECTOR_TAG = "ditscale.detector"


ROLE_TAG = "ditscale.role"       # "trunk": a WSD trunk the branches start from, not a result itself
BRANCH_OF_TAG = "branch_of"      # on a branch: the trial id of its trunk

# MLflow 3 sorts experiments into GenAI ones (traces, prompts) and model-training ones (runs, metrics).
# The experiment's kind is its `mlflow.experimentKind` tag; "custom_model_development" is the
# model-training kind (the values are the UI's ExperimentKind enum; MLflow's own demo sets
# "genai_development" the same way, mlflow/demo/generators/traces.py).
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"
# The runs table's Source column: the base name of mlflow.source.name (here the study file).
SOURCE_NAME_TAG, SOURCE_TYPE_TAG = "mlflow.source.name", "mlflow.source.type"


def concluded(status: str) -> bool:
    """A trial that is done for good: finished, or diverged (resuming would diverge again; the
    report lists it as excluded). Anything else is resumed by the next sweep."""
    return status == "finished" or status.startswith("diverged")


def _as_yaml(config) -> str:
    """A trial's or study's config as the YAML logged beside its run (config.yaml, study.yaml); a
    tracking URI in it has its credentials redacted (redact_uri)."""
    return yaml.safe_dump(public_config(config.model_dump(mode="json")), sort_keys=False)


def resolve_tracking_uri(configured: str | None = None) -> str:
    """The store to log to, as the URI to use everywhere: an HTTP URI's credentials are taken out into
    MLflow's variables (take_credentials), so that no config, tag or message built from it holds them."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # Relative SQLite paths would point somewhere else inside each Ray worker: anchor them here.
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return take_credentials(uri)


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail early, in one line, when an HTTP tracking server cannot be reached."""
    if not uri.startswith(("http://", "https://")):
        return
    bare = take_credentials(uri)
    request = urllib.request.Request(bare.rstrip("/") + "/health")
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:  # as MLflow sends them (rest_utils.http_request)
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            if resp.status == 200:
                return
            problem = f"HTTP {resp.status}"
    except urllib.error.HTTPError as err:
        problem = f"HTTP {err.code}"
    except (urllib.error.URLError, OSError) as err:
        problem = str(getattr(err, "reason", err))
    raise UserError(f"tracking.uri: cannot reach the MLflow server at {redact_uri(bare)} ({redact(problem)}); "
                    "start it or fix the URI")


def client(uri: str):
    uri = take_credentials(uri)
    if redact_uri(uri) != uri:
        # MLflow prints "View run ... at: <tracking URI>/#/..." when a run ends: not with credentials in it.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def safe_folder_name(name: str) -> str:
    """A study (MLflow experiment) name as one safe folder name, e.g. for reports/<name>/.

    ASCII letters, digits, `_`, `-` and `.` are kept, so an ordinary name is its own folder name; anything
    else (`/`, `\\`, spaces, control characters) becomes `_`, leading dots are dropped (no `..`, no
    hidden folder), and a name that had to change gets a short hash of the original, so two names
    never share a folder. Long names are cut to 120 characters (plus the hash)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", name).lstrip(".")
    if safe == name and 0 < len(safe) <= 120:
        return safe
    return f"{safe[:120] or '_'}-{hashlib.sha256(name.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def experiment_id(uri: str, name: str) -> str:
    """The study's experiment, created as a model-training experiment. An existing one without a kind
    (made before ditscale tagged them) gets it; a kind someone chose in the UI is left alone."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is None:
        try:
            return c.create_experiment(name, tags={EXPERIMENT_KIND_TAG: TRAINING_KIND})
        except Exception:  # created concurrently by another trial: read it back
            exp = c.get_experiment_by_name(name)
            if exp is None:
                raise
    if EXPERIMENT_KIND_TAG not in exp.tags:
        c.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    return exp.experiment_id


def find_trial_run(uri: str, exp_id: str, trial_id: str):
    """The newest run of this trial in the experiment, or None."""
    runs = client(uri).search_runs(
        [exp_id], filter_string=f"tags.{TRIAL_ID_TAG} = '{trial_id}'", order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0] if runs else None


def git_commit() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def trial_tags(trial) -> dict[str, str]:
    tags = {
        "family": trial.model.family,
        "size": trial.model.size,
        "patch": str(trial.model.patch),
        "objective": trial.objective.kind,
        "attention": trial.model.attention if trial.model.family == "mmdit" else "",
        "model": trial.model_name,
        TRIAL_ID_TAG: trial.trial_id,
    }
    commit = git_commit()
    if commit:
        tags["mlflow.source.git.commit"] = commit
    return tags


def open_trial_run(trial, uri: str, run_id: str | None = None, parent_run_id: str | None = None,
                   tags: dict[str, str] | None = None) -> str:
    """Return the MLflow run id of this trial: `run_id` when resuming from a checkpoint, else the
    existing run with the same trial_id, else a new run with params and tags (plus `tags`) logged."""
    c = client(uri)
    exp_id = experiment_id(uri, trial.name)
    if run_id is None:
        existing = find_trial_run(uri, exp_id, trial.trial_id)
        run_id = existing.info.run_id if existing else None
    if run_id is not None:
        c.set_tag(run_id, STATUS_TAG, "running")
        if parent_run_id:  # resumed by a later sweep invocation: listed under that sweep now
            c.set_tag(run_id, PARENT_TAG, parent_run_id)
        return run_id
    tags = trial_tags(trial) | (tags or {}) | {STATUS_TAG: "running", "mlflow.runName": _run_name(trial)}
    if parent_run_id:
        tags[PARENT_TAG] = parent_run_id
    tags |= _run_source(c, parent_run_id)
    run = c.create_run(exp_id, tags=tags)
    from mlflow.entities import Param

    params = [Param(k, v[:6000]) for k, v in trial.flat_params().items()]
    for i in range(0, len(params), 100):  # MLflow's batch limit
        c.log_batch(run.info.run_id, params=params[i:i + 100])
    c.log_text(run.info.run_id, _as_yaml(trial), "config.yaml")
    from harness.tracking_inputs import log_dataset_inputs  # MLflow's dataset classes: only here

    log_dataset_inputs(c, run.info.run_id, trial)
    return run.info.run_id


_study_file: str | None = None


def set_study_file(path: str) -> None:
    """The study file this process trains (`ditscale train`): the source of the runs it opens."""
    global _study_file
    _study_file = str(Path(path).resolve())


def _source_tags(path: str | None) -> dict[str, str]:
    return {SOURCE_NAME_TAG: path, SOURCE_TYPE_TAG: "LOCAL"} if path else {}


def _run_source(c, parent_run_id: str | None) -> dict[str, str]:
    """A trial run's source tags: its sweep's (trials open their runs in other processes, on other
    nodes, which know the trial's config but not the study file), else this process's study file."""
    if parent_run_id:
        try:
            return _source_tags(c.get_run(parent_run_id).data.tags.get(SOURCE_NAME_TAG))
        except Exception:  # the source is a label: never a reason to fail a trial
            return {}
    return _source_tags(_study_file)


def mark_failed(uri: str, run_id: str, reason: str) -> None:
    """FAILED with `reason`, unless the trial's own loop already recorded how it ended."""
    c = client(uri)
    if c.get_run(run_id).data.tags.get(STATUS_TAG, "running") == "running":
        c.set_tag(run_id, STATUS_TAG, redact(f"failed: {reason}")[:5000])
        c.set_terminated(run_id, "FAILED")


def _run_name(trial) -> str:
    extra = f"-{trial.model.attention}" if trial.model.family == "mmdit" else ""
    return f"{trial.model_name}{extra}-{trial.objective.kind}-{trial.trial_id[:6]}"


class RunLogger:
    """Rank-0 metric logging into one MLflow run."""

    def __init__(self, uri: str, run_id: str, system_metrics: bool = False):
        self.uri, self.run_id = uri, run_id
        self.client = client(uri)
        self._system = None
        if system_metrics:
            self._system = _start_system_metrics(uri, run_id)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None]
        if batch:
            self.client.log_batch(self.run_id, metrics=batch)

    def set_tag(self, key: str, value: str) -> None:
        self.client.set_tag(self.run_id, key, redact(value) if key == STATUS_TAG else value)

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, path, artifact_path)

    def close(self, status: str) -> None:
        """status: finished | failed: reason | killed (preempted; the run resumes later)."""
        if self._system is not None:
            self._system.finish()
            self._system = None
        self.set_tag(STATUS_TAG, status)
        terminal = "FINISHED" if status == "finished" else ("KILLED" if status == "killed" else "FAILED")
        self.client.set_terminated(self.run_id, terminal)

    def log_image(self, image, artifact_file: str) -> None:
        """A PIL image or uint8 array (e.g. a sample grid) as a PNG artifact of the run."""
        self.client.log_image(self.run_id, image, artifact_file=artifact_file)

    def log_evaluation_artifacts(self, artifacts: dict) -> None:
        """An evaluation's artifacts: images as PNGs, tables ({column: list}) as JSON files. Not MLflow's
        log_table: it appends to an existing file (a second evaluation at the same step, after a resume
        or `ditscale eval`, would double every row) and lists each table in a run tag that overflows
        MLflow's tag length after ~130 evaluations."""
        for name, item in artifacts.items():
            if isinstance(item, dict):
                self.client.log_dict(self.run_id, item, name)
            else:
                self.log_image(item, name)


def _start_system_metrics(uri: str, run_id: str):
    """CPU/GPU/memory sampling into the run, through MLflow's own monitor (needs psutil)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
    except ImportError:
        return None
    monitor = SystemMetricsMonitor(run_id, sampling_interval=10, samples_before_logging=1, resume_logging=True,
                                   tracking_uri=take_credentials(uri))
    monitor.start()
    return monitor


# --- sweeps --------------------------------------------------------------------------------------

SWEEP_TAG = "ditscale.sweep"
SLURM_JOB_TAG = "ditscale.slurm_job_id"


def sweep_state(uri: str, experiment: str, trials) -> dict[str, str]:
    """trial_id -> status of its newest run (running | finished | failed: ... | killed), or "new"."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    state = {trial.trial_id: "new" for trial in trials}
    if exp is None:
        return state
    runs = c.search_runs([exp.experiment_id], filter_string=f"tags.{TRIAL_ID_TAG} != ''",
                         order_by=["attributes.start_time ASC"], max_results=50000)
    for run in runs:  # oldest first, so the newest run of a trial wins
        tid = run.data.tags.get(TRIAL_ID_TAG)
        if tid in state:
            state[tid] = run.data.tags.get(STATUS_TAG, "running")
    return state


def open_parent_run(uri: str, study, trials, source: str | None = None) -> str:
    """One parent run per sweep invocation: the grid as params, the study file as an artifact and
    (`source`, its path) as the run's source, which its trials' runs copy."""
    c = client(uri)
    exp_id = experiment_id(uri, study.name)
    job = os.environ.get("SLURM_JOB_ID")
    reused = None
    if job:
        # A requeued Slurm job is the same sweep invocation continuing: reuse its parent run.
        found = c.search_runs([exp_id], filter_string=f"tags.`{SLURM_JOB_TAG}` = '{job}'", max_results=1)
        if found:
            from mlflow.entities import RunStatus

            reused = found[0].info.run_id
            c.update_run(reused, status=RunStatus.to_string(RunStatus.RUNNING))
    _end_orphaned_parents(c, exp_id, keep=reused)
    if reused:
        return reused
    run = c.create_run(exp_id, tags={SWEEP_TAG: "true", "mlflow.runName": f"sweep-{time.strftime('%Y%m%d-%H%M%S')}",
                                     **({SLURM_JOB_TAG: job} if job else {}),
                                     **_source_tags(str(Path(source).resolve()) if source else None),
                                     **({"mlflow.source.git.commit": git_commit()} if git_commit() else {})})
    from mlflow.entities import Param

    params = [Param("grid", json.dumps(_redacted_grid(study.grid))[:6000]), Param("n_trials", str(len(trials)))]
    c.log_batch(run.info.run_id, params=params)
    c.log_text(run.info.run_id, _as_yaml(study), "study.yaml")
    return run.info.run_id


ORPHANED = ("killed: its sweep ended without closing it (the driver's host was lost, or the driver was killed); "
            "a later sweep resumed the study")


def _end_orphaned_parents(c, exp_id: str, keep: str | None) -> None:
    """Sweep parent runs still RUNNING whose driver died without closing them (a lost host, SIGKILL):
    the caller holds the study's lock, so no other sweep of the study is alive; they are ended as
    KILLED, with the reason in their status tag, so that no run stays RUNNING forever."""
    running = c.search_runs([exp_id], filter_string=f"tags.`{SWEEP_TAG}` = 'true' and attributes.status = 'RUNNING'",
                            max_results=1000)
    for run in running:
        if run.info.run_id != keep:
            c.set_tag(run.info.run_id, STATUS_TAG, ORPHANED)
            c.set_terminated(run.info.run_id, "KILLED")


def _redacted_grid(grid: dict) -> dict:
    """The grid as logged: tracking URIs on an axis (`tracking.uri` or a `tracking` section) redacted."""
    out = dict(grid)
    if isinstance(out.get("tracking.uri"), list):
        out["tracking.uri"] = [redact_uri(v) if isinstance(v, str) else v for v in out["tracking.uri"]]
    if isinstance(out.get("tracking"), list):
        out["tracking"] = [{**v, "uri": redact_uri(v["uri"])} if isinstance(v, dict) and isinstance(v.get("uri"), str)
                           else v for v in out["tracking"]]
    return out


def close_parent_run(uri: str, run_id: str, trials, state: dict[str, str], error: str | None = None) -> None:
    """Per-trial status table on the parent run; FINISHED when every trial finished. `error` (the sweep
    itself failed): FAILED, with the reason in its ditscale.status tag, whatever the trials say."""
    if error is not None:
        c = client(uri)
        c.set_tag(run_id, STATUS_TAG, redact(f"failed: {error}")[:5000])
        try:
            _log_trial_table(c, run_id, trials, state)
        finally:
            c.set_terminated(run_id, "FAILED")
        return

    rows = _status_rows(trials, state)
    c = client(uri)
    _log_trial_table(c, run_id, trials, state)
    c.log_metric(run_id, "trials_finished", sum(r["status"] == "finished" for r in rows))
    done = sum(concluded(r["status"]) for r in rows)
    failed = any(r["status"].startswith("failed") for r in rows)
    # Unfinished but not failed: stopped (stop file, Slurm's signal) or interrupted; resumable.
    c.set_terminated(run_id, "FINISHED" if done == len(rows) else ("FAILED" if failed else "KILLED"))


def _status_rows(trials, state: dict[str, str]) -> list[dict]:
    return [{"trial_id": trial.trial_id, "model": trial.model_name, "attention": trial.model.attention,
             "objective": trial.objective.kind, "status": state.get(trial.trial_id, "new")} for trial in trials]


def _log_trial_table(c, run_id: str, trials, state: dict[str, str]) -> None:
    """trial_status.json and trial_status.md on the parent run."""
    rows = _status_rows(trials, state)
    c.log_text(run_id, json.dumps(rows, indent=1), "trial_status.json")
    lines = ["| trial_id | model | attention | objective | status |", "|---|---|---|---|---|"]
    lines += [f"| {r['trial_id']} | {r['model']} | {r['attention']} | {r['objective']} | {r['status']} |" for r in rows]
    c.log_text(run_id, "\n".join(lines) + "\n", "trial_status.md")
