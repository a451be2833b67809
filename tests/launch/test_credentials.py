"""Issue 26, item 5: MLflow credentials never leak, on the error path either.

- redact() is the one filter for what ditscale stores or prints about a failure: user-info in any URL,
  and the values of MLFLOW_TRACKING_PASSWORD / _TOKEN and of passwords taken out of tracking URIs;
- a tracking URI's credentials are taken out of it into MLflow's own variables, so MLflow's error
  messages ("API request to http://…") never hold them: a trial's status tag, the sweep's parent run
  and `ditscale report`'s files (trials.csv, report.md, index.html, trials.parquet) stay clean, and a
  traceback the CLI prints is redacted;
- `ditscale slurm submit --set tracking.uri=http://user:pw@…` keeps the password out of sbatch's
  command line (`scontrol show job`), the dry-run output and the job log: it goes through sbatch's
  environment;
- `--mlflow-server` without `--mlflow-auth` is refused unless `--mlflow-insecure` says so.

`sweep --address` forwarding the credentials to a cluster started elsewhere runs against a real
basic-auth MLflow server in tests/launch/test_run_hardening.py (test_tracking_credentials_connect_but_are_...).
"""

from __future__ import annotations

import hashlib
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ROOT, tiny_study, write_study

_CLEAN = ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN",
          "SLURM_JOB_ID")


def _env(**extra: str) -> dict:
    return {**{k: v for k, v in os.environ.items() if k not in _CLEAN}, "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1", **extra}


def _run(*args: str, cwd: Path, env: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "harness.cli", *args], cwd=cwd, env=env, text=True,
                          capture_output=True, timeout=timeout, check=False)


def _closed_port() -> int:
    """A port nobody listens on (the kernel's choice, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _files_containing(folder: Path, secret: str) -> list[str]:
    needle = secret.encode()
    return [str(p) for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and needle in p.read_bytes()]


@pytest.fixture
def credentials_restored(monkeypatch):
    """MLflow's credential variables put back as they were after the test: the code under test sets them
    (a tracking URI's user-info goes there)."""
    for key in _CLEAN[:-1]:
        monkeypatch.setenv(key, "placeholder")  # records the original value (or its absence) ...
        monkeypatch.delenv(key)                 # ... which monkeypatch restores at the end
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # a refused connection fails at once
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")


# --- redact and take_credentials: pure functions -----------------------------------------------------


def test_redact_hides_user_info_and_every_known_secret(credentials_restored, monkeypatch):
    from harness.tracking import redact, resolve_tracking_uri, split_credentials

    message = ("MlflowException: API request to http://alice:S3cret-pw@tracker:5000/api/2.0/mlflow/runs/get "
               "failed with exception HTTPConnectionPool(host='tracker', port=5000)")
    shown = redact(message)
    assert "S3cret-pw" not in shown and "http://***@tracker:5000/api/2.0/mlflow/runs/get" in shown, shown
    assert redact("see https://u:p@h/x?token=abc&run=1.") == "see https://***@h/x?token=***&run=1.", \
        redact("see https://u:p@h/x?token=abc&run=1.")

    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "tok-" + "f" * 12)
    assert "tok-ffff" not in redact(f"Authorization: Bearer tok-{'f' * 12}")

    # User-info is percent-encoded: the password is known decoded and encoded.
    bare, found = split_credentials("http://bob:p%40ss%2Fw0rd@tracker:5000/x")
    assert bare == "http://tracker:5000/x"
    assert found == {"MLFLOW_TRACKING_USERNAME": "bob", "MLFLOW_TRACKING_PASSWORD": "p@ss/w0rd"}
    assert "w0rd" not in redact("a p@ss/w0rd b p%40ss%2Fw0rd c")
    assert split_credentials("http://tracker/a@b") == ("http://tracker/a@b", {})  # `@` in the path only
    # The URL pattern stops at whitespace and quotes: a message keeps its other words.
    shown = redact("failed: 'http://u:secretpw@h:1/x' and \"https://v:other-pw@k\" then more")
    assert "secretpw" not in shown and "other-pw" not in shown and shown.endswith("then more"), shown
    assert "'http://***@h:1/x'" in shown, shown

    # resolve_tracking_uri: the URI used everywhere has no credentials; MLflow's variables have them.
    assert resolve_tracking_uri("http://carol:an0ther-pw@tracker:5000") == "http://tracker:5000"
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("carol", "an0ther-pw")


# --- status tags and the report ----------------------------------------------------------------------


def test_a_failure_through_a_credentialed_uri_leaves_no_password_in_tags_or_the_report(
        tmp_path, digits_dir, credentials_restored):
    """MLflow's own error for an unreachable server (the reviewer's case: "API request to
    http://alice:PASSWORD@… failed") recorded as a trial's failure, a trial loop's `failed: …` status and a
    sweep's error: no tag holds the password, and neither does any file `ditscale report` writes."""
    import mlflow

    from analysis.report import build_report
    from harness.config import expand_grid, load_study
    from harness.tracking import RunLogger, client, close_parent_run, mark_failed, open_parent_run, open_trial_run

    password = "pw-" + secrets.token_hex(10)
    dead = f"http://alice:{password}@127.0.0.1:{_closed_port()}"
    with pytest.raises(Exception) as refused:  # whatever MLflow raises for a refused connection
        client(dead).get_experiment_by_name("anything")
    reason = f"{type(refused.value).__name__}: {refused.value}"
    assert "127.0.0.1" in reason  # MLflow's message names the server ...
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    study_file = write_study(tmp_path / "s.yaml", tiny_study(digits_dir, "leaky", grid={"model.patch": [4, 8]},
                                                             tracking={"uri": uri}))
    study = load_study(str(study_file))
    trials = expand_grid(study)
    parent = open_parent_run(uri, study, trials)
    first = open_trial_run(trials[0], uri, parent_run_id=parent)
    mark_failed(uri, first, reason)                                              # tune_trial.py's path
    second = open_trial_run(trials[1], uri, parent_run_id=parent)
    RunLogger(uri, second).close(f"failed: RuntimeError: no answer from http://alice:{password}@tracker/")  # loop.py's
    close_parent_run(uri, parent, trials, {}, error=f"MlflowException: {reason} ({dead})")  # the sweep's

    runs = mlflow.MlflowClient(uri).search_runs([mlflow.MlflowClient(uri).get_experiment_by_name("leaky").experiment_id])
    statuses = {r.info.run_id: r.data.tags["ditscale.status"] for r in runs}
    assert len(statuses) == 3 and all(s.startswith("failed: ") for s in statuses.values()), statuses
    assert not [s for s in statuses.values() if password in s], statuses
    assert "http://***@tracker/" in statuses[second], statuses  # ... still readable, without the password

    out = tmp_path / "report"
    build_report(uri, "leaky", out_dir=str(out), holdout="none")
    written = {p.name for p in out.rglob("*") if p.is_file()}
    assert {"trials.csv", "report.md", "index.html"} <= written, written
    assert not _files_containing(out, password)
    assert password.encode() not in (tmp_path / "mlflow.db").read_bytes()


def test_a_traceback_the_cli_prints_holds_no_password(tmp_path):
    """An unexpected error (here MLflow's, for a server that is not there) is printed as a traceback
    without the tracking URI's password."""
    password = "pw-" + secrets.token_hex(10)
    proc = _run("report", "--experiment", "x", "--tracking-uri",
                f"http://alice:{password}@127.0.0.1:{_closed_port()}", "--out", str(tmp_path / "r"), cwd=tmp_path,
                env=_env(MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="5"))
    assert proc.returncode == 1 and "Traceback" in proc.stderr, (proc.returncode, proc.stderr[-3000:])
    assert "127.0.0.1" in proc.stderr  # the error is still there ...
    assert password not in proc.stdout + proc.stderr  # ... without the password


# --- slurm submit --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cred_study(digits_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("credentials")
    return write_study(folder / "study.yaml", tiny_study(digits_dir, "creds", train={"steps": 4}))


def _recording_sbatch(folder: Path) -> tuple[dict, Path, Path]:
    """A PATH whose sbatch records its arguments (one a line) and its environment, and says job 4545."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    args, env = folder / "sbatch-args", folder / "sbatch-env"
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {args}\nenv > {env}\necho 4545\n")
    (bin_dir / "sbatch").chmod(0o755)
    return _env(PATH=f"{bin_dir}:{os.environ['PATH']}"), args, env


def test_submit_keeps_tracking_credentials_out_of_sbatchs_command_line(cred_study, tmp_path):
    """`--set tracking.uri=http://alice:PW@…`: sbatch's argv (what `scontrol show job` and `ps` show) and
    the dry-run output hold the URI without its user-info; the job gets the credentials from sbatch's
    environment; the saved script holds none."""
    env, args, sbatch_env = _recording_sbatch(tmp_path)
    password = "pw-" + secrets.token_hex(10)
    override = f"tracking.uri=http://alice:{password}@tracker:5000"
    dry = _run("slurm", "submit", str(cred_study), "--cpus-per-task", "1", "--set", override, "--dry-run",
               cwd=cred_study.parent, env=env)
    assert dry.returncode == 0, dry.stderr[-3000:]
    assert password not in dry.stdout + dry.stderr
    assert "tracking.uri=http://tracker:5000" in dry.stdout and "MLFLOW_TRACKING_PASSWORD" in dry.stdout

    proc = _run("slurm", "submit", str(cred_study), "--cpus-per-task", "1", "--set", override,
                cwd=cred_study.parent, env=env)
    assert proc.returncode == 0 and "Submitted job 4545" in proc.stdout, proc.stderr[-3000:]
    assert password not in proc.stdout + proc.stderr
    argv = args.read_text().splitlines()
    assert password not in "\n".join(argv) and argv[-2:] == ["--set", "tracking.uri=http://tracker:5000"], argv
    job_env = sbatch_env.read_text().splitlines()
    assert f"MLFLOW_TRACKING_PASSWORD={password}" in job_env and "MLFLOW_TRACKING_USERNAME=alice" in job_env
    assert not _files_containing(cred_study.parent / "runs", password)

    # An --export that leaves the credentials out would start a job refused at every request: one line.
    refused = _run("slurm", "submit", str(cred_study), "--cpus-per-task", "1", "--set", override,
                   "--sbatch-arg=--export=NONE", cwd=cred_study.parent, env=env)
    assert refused.returncode == 2 and "--export" in refused.stderr and "MLFLOW_TRACKING_PASSWORD" in refused.stderr
    assert password not in refused.stdout + refused.stderr and len(refused.stderr.strip().splitlines()) == 1


def test_the_jobs_mlflow_server_is_never_open_unless_asked(cred_study, tmp_path):
    """`--mlflow-server` alone is refused in one line naming both ways on; `--mlflow-insecure` runs it open,
    passes the choice to the batch script and says so when it submits."""
    env, args, _ = _recording_sbatch(tmp_path)
    sub = ("slurm", "submit", str(cred_study), "--cpus-per-task", "1")
    for extra in (["--mlflow-server"], ["--mlflow-insecure"], ["--mlflow-server", "--mlflow-auth", "--mlflow-insecure"]):
        proc = _run(*sub, *extra, "--dry-run", cwd=cred_study.parent, env=env)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and "--mlflow-insecure" in lines[0], (extra, proc.stderr)
    assert "--mlflow-auth" in _run(*sub, "--mlflow-server", "--dry-run", cwd=cred_study.parent, env=env).stderr

    proc = _run(*sub, "--mlflow-server", "--mlflow-insecure", cwd=cred_study.parent, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no authentication" in proc.stdout.lower(), proc.stdout
    argv = args.read_text().splitlines()
    assert argv[2:6] == ["--mlflow-server", str(cred_study.parent.resolve() / "mlflow-server"), "--mlflow-insecure",
                         str(cred_study.resolve())], argv


# --- the job itself, on the local Slurm cluster --------------------------------------------------------

PROBE = """#!/bin/bash
#SBATCH --job-name=credprobe
#SBATCH --output=slurm-%j.out
#SBATCH --time=5
# @ditscale-submit-settings@
echo "ARGS=$*"
echo "PASSWORD_SHA=$(printf %s "${MLFLOW_TRACKING_PASSWORD:-}" | sha256sum | cut -c1-16)"
"""


@pytest.mark.slow
def test_the_job_gets_the_password_from_its_environment_not_its_command_line(submit, cred_study, tmp_path):
    """The real sbatch and slurmctld: neither `scontrol show job` nor the job's log shows the password,
    and the job's environment holds it."""
    from tests.support.slurm import job_info, slurm

    probe = tmp_path / "probe.sbatch"
    probe.write_text(PROBE)
    password = "pw-" + secrets.token_hex(10)
    job = submit(cred_study, "--script", str(probe), "--cpus-per-task", "1",
                 "--set", f"tracking.uri=http://alice:{password}@tracker:5000")
    shown = slurm(job.conf, "scontrol", "show", "job", job.id).stdout
    info = job.wait_done(timeout=180)
    log = job.text()
    assert info["JobState"] == "COMPLETED", (info, log)
    assert password not in shown and password not in log, (shown, log)
    assert "tracking.uri=http://tracker:5000" in log, log
    assert f"PASSWORD_SHA={hashlib.sha256(password.encode()).hexdigest()[:16]}" in log.splitlines(), log
    assert password not in str(job_info(job.conf, job.id))

