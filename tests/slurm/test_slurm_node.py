"""The node side of a Slurm job as pure functions: the head-loss watch's decisions (harness/launch/slurm/
watch.py), `ray start`'s command line, the Ray token file and the private temp folders (node.py), and the
study's paths read from the sweep's own options, the job's MLflow server's command line and its stop
(mlflow_server.py). Fast: no Slurm, no Ray, no MLflow server. The same code runs for real in
tests/slurm/test_netns_hostloss.py (a head host lost: the workers requeue the job) and tests/slurm/test_slurm.py."""

from __future__ import annotations

import configparser
import json
import os
import signal
import stat
import subprocess
import time

import pytest

from harness.errors import UserError
from harness.files import process_start_time
from harness.launch.slurm import mlflow_server, node
from harness.launch.slurm.watch import (
    ENDING,
    HEAD_UP,
    LOST,
    SILENT_PROBES,
    WATCH,
    HeadWatch,
    Look,
    cancel_after_requeue,
    first_look,
    state_says_down,
)
from tests.support import ditscale, tiny_study, write_study


def _run(watch: HeadWatch, looks: list[Look]) -> list[str]:
    return [watch.see(look) for look in looks]


def test_a_worker_whose_ray_ended_watches_only_when_the_head_is_silent_and_the_job_is_not_ending():
    assert first_look(stop_mark=True, head_ray_answers=False) == ENDING    # the batch shell is stopping Ray
    assert first_look(stop_mark=False, head_ray_answers=True) == HEAD_UP   # this worker's Ray alone ended
    assert first_look(stop_mark=False, head_ray_answers=False) == WATCH


def test_a_healthy_head_whose_ray_died_is_never_requeued():
    """The head host is up (its slurmd answers, Slurm finds it responding): left to the batch shell."""
    watch = HeadWatch(slurmd="10.0.0.1:6818")
    looks = [Look(stop_mark=False, node_state="mixed" if i % 5 == 0 else None, slurmd_answers=True)
             for i in range(30)]
    assert set(_run(watch, looks)) == {WATCH}


def test_a_silent_slurmd_while_slurmctld_answers_requeues_after_three_probes():
    watch = HeadWatch(slurmd="10.0.0.1:6818")
    silent = Look(stop_mark=False, slurmd_answers=False, ctld_answers=True)
    assert _run(watch, [silent] * (SILENT_PROBES - 1)) == [WATCH] * (SILENT_PROBES - 1)
    assert watch.asks_ctld(False)  # the next silence counts: slurmctld is asked
    assert watch.see(silent) == LOST


def test_silence_counts_only_in_a_row_and_only_while_this_worker_reaches_slurmctld():
    watch = HeadWatch(slurmd="10.0.0.1:6818")
    cut_off = Look(stop_mark=False, slurmd_answers=False, ctld_answers=False)  # this worker is the one cut off
    assert set(_run(watch, [cut_off] * 10)) == {WATCH}
    watch = HeadWatch(slurmd="10.0.0.1:6818")
    gap = [Look(False, slurmd_answers=False, ctld_answers=True)] * (SILENT_PROBES - 1) + [Look(False, slurmd_answers=True)]
    assert set(_run(watch, gap * 3)) == {WATCH} and watch.silent == 0
    assert not watch.asks_ctld(True)


def test_slurm_finding_the_head_not_responding_or_down_requeues_even_without_the_probe():
    for state in ("mixed*", "idle*", "down*", "down", "DOWN+DRAIN"):
        assert state_says_down(state), state
        assert HeadWatch(slurmd="").see(Look(stop_mark=False, node_state=state)) == LOST
    for state in ("mixed", "allocated", "idle", "completing", ""):
        assert not state_says_down(state), state
    # The probe off (the head's slurmd did not answer when the worker started): its silence is not counted.
    watch = HeadWatch(slurmd="")
    assert set(_run(watch, [Look(False, slurmd_answers=None)] * 10)) == {WATCH} and not watch.asks_ctld(None)


def test_the_stop_mark_ends_the_watch_whatever_else_is_seen():
    watch = HeadWatch(slurmd="10.0.0.1:6818", silent=SILENT_PROBES)
    assert watch.see(Look(stop_mark=True, node_state="down*", slurmd_answers=False, ctld_answers=True)) == ENDING


def test_a_job_that_cannot_be_requeued_is_cancelled():
    assert cancel_after_requeue("RUNNING", "0")
    assert not cancel_after_requeue("RUNNING", "1")      # requeue failed but it may be retried by another worker
    assert not cancel_after_requeue("PENDING", "0")      # requeued already
    assert not cancel_after_requeue("", "0")


def test_ray_start_args_give_every_port_explicitly():
    head = node.ray_start_args("head", "10.0.0.1", 12000, 8, 2, "/t/r", dashboard="auto")
    assert head[:2] == ["ray", "start"] and "--block" in head and "--head" in head
    for arg in ("--node-ip-address=10.0.0.1", "--temp-dir=/t/r", "--num-cpus=8", "--num-gpus=2", "--port=12000",
                "--node-manager-port=12001", "--object-manager-port=12002", "--min-worker-port=12100",
                "--max-worker-port=12999", "--dashboard-port=12008", "--dashboard-host=10.0.0.1"):
        assert arg in head, arg
    assert "--include-dashboard=false" in node.ray_start_args("head", "h", 12000, 1, 0, "/t", dashboard="0")
    worker = node.ray_start_args("worker", "10.0.0.2", 12000, 8, 0, "/t/r", address="10.0.0.1:12000")
    assert "--address=10.0.0.1:12000" in worker and "--head" not in worker
    assert not any(a.startswith(("--port=", "--dashboard")) for a in worker if not a.startswith("--dashboard-agent"))


def test_the_token_file_is_fresh_private_and_never_through_a_symlink(tmp_path):
    token = tmp_path / ".ray-token-1"
    token.write_text("planted\n")
    token.chmod(0o644)
    node.write_token(token)  # this user's stale file: replaced
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text().strip()) == 64
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    link = tmp_path / ".ray-token-2"
    link.symlink_to(victim)
    with pytest.raises(UserError, match=r"Ray token file: .* is a symbolic link") as err:
        node.write_token(link)
    assert "\n" not in str(err.value) and victim.read_text() == "precious\n" and link.is_symlink()
    (tmp_path / "dir").mkdir()
    with pytest.raises(UserError, match="not a file of this user's"):
        node.write_token(tmp_path / "dir")


def test_private_folders_are_ours_and_others_are_not(tmp_path):
    folder = node.private_folder(str(tmp_path / "ray-7-0-n1"))
    assert folder.name.startswith("ray-7-0-n1.") and len(folder.name) == len("ray-7-0-n1.") + 6
    assert node.ours(folder) and stat.S_IMODE(folder.stat().st_mode) == 0o700
    loose = tmp_path / "ray-7-0-n1.AbCdEf"
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    (tmp_path / "ray-7-0-n1.link12").symlink_to(folder)
    assert not node.ours(loose) and not node.ours(tmp_path / "ray-7-0-n1.link12")
    assert node.node_folders(str(tmp_path / "ray-7-0"), "n1") == [str(folder)]
    assert process_start_time(os.getpid()) and process_start_time(2**22 + 1) is None


def test_paths_reads_the_sweeps_own_options(digits_dir, tmp_path):
    """`ditscale slurm paths STUDY [sweep options]`: --set is read by the sweep's parser (either spelling),
    one KEY=value a line, as the batch script reads them."""
    study = write_study(tmp_path / "study.yaml", tiny_study(digits_dir, "paths-study"))
    out = ditscale("slurm", "paths", str(study), "--max-concurrent", "2", "--set", "name=other",
                   "--set=resources.storage=my runs", "--no-report", cwd=tmp_path).stdout
    found = dict(line.split("=", 1) for line in out.splitlines())
    assert found["STUDY_NAME"] == "other"
    assert found["STOP_FILE"] == str(tmp_path.resolve() / "my runs" / "other" / "STOP")
    assert found["SLURM_DIR"] == str(tmp_path.resolve() / "my runs" / "other" / "slurm")
    proc = ditscale("slurm", "paths", str(study), "--bogus", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "--bogus" in proc.stderr


def test_the_mlflow_servers_credentials_go_to_its_environment_never_its_command_line(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-never-in-argv")
    args = mlflow_server.server_args(tmp_path, "10.1.2.3", 5999, 1, auth=True)
    assert args[:4] == ["mlflow", "server", "--app-name", "basic-auth"] and "pw-never-in-argv" not in " ".join(args)
    assert f"sqlite:///{tmp_path}/mlflow.db" in args and "10.1.2.3:5999,localhost:*,127.0.0.1:*" in args
    env = mlflow_server.server_env(tmp_path, auth=True)
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "pw-never-in-argv" and env["MLFLOW_AUTH_ADMIN_USERNAME"] == "alice"
    assert env["MLFLOW_AUTH_CONFIG_PATH"] == str(tmp_path / "basic_auth.ini")
    assert "MLFLOW_AUTH_ADMIN_PASSWORD" not in mlflow_server.server_env(tmp_path, auth=False)
    assert "--uvicorn-opts" in mlflow_server.server_args(tmp_path, "10.1.2.3", 5999, 4, auth=False)


def _state(folder, pid, started):
    (folder / "server-91.state").write_text(json.dumps({"pid": pid, "started": started}))


def test_stopping_the_server_ends_its_whole_session_and_never_signals_a_reused_pid(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SLURM_JOB_ID", "91")
    monkeypatch.setenv("DITSCALE_MLFLOW_STOP_TIMEOUT", "5")
    # The server and a process it started, both in its session; the child ignores SIGTERM (killed after 5 s).
    ready = tmp_path / "ready"
    server = subprocess.Popen(["bash", "-c", f"bash -c 'trap \"\" TERM; touch {ready}; sleep 300' & wait"],
                              start_new_session=True)
    for _ in range(600):  # until the child has set its trap (a loaded machine takes a while)
        if ready.exists():
            break
        time.sleep(0.1)
    _state(tmp_path, server.pid, process_start_time(server.pid))
    t0 = time.monotonic()
    mlflow_server.stop(tmp_path)
    assert server.wait(timeout=10) is not None and not mlflow_server._session_alive(server.pid)
    assert 4 < time.monotonic() - t0 < 15, "the child that ignores SIGTERM was killed after the timeout"
    assert "did not stop within 5s" in capsys.readouterr().out
    assert not (tmp_path / "server-91.state").exists()
    # A pid whose start time is not the recorded one (the server gone, the pid reused): left alone.
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        _state(tmp_path, other.pid, "1")
        mlflow_server.stop(tmp_path)
        assert other.poll() is None
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
    mlflow_server.stop(tmp_path)  # no state: nothing to do, nothing said
    assert capsys.readouterr().out.count("MLflow server stopped") == 1


def test_the_auth_config_is_private_holds_no_secret_and_reads_back_a_folder_with_a_percent(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw-not-in-the-file")
    folder = tmp_path / "srv 50%"
    mlflow_server._prepare(folder, auth=True)
    ini = folder / "basic_auth.ini"
    parsed = configparser.ConfigParser()  # MLflow reads it so, interpolation on
    parsed.read(ini)
    assert parsed["mlflow"]["database_uri"] == f"sqlite:///{folder}/auth.db"
    assert "pw-not-in-the-file" not in ini.read_text()
    assert stat.S_IMODE(ini.stat().st_mode) == 0o600 and stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert (folder / "artifacts").is_dir()
