"""The node side of a Slurm job as pure functions: the head-loss watch's decisions (harness/launch/slurm/
watch.py), `ray start`'s command line, the Ray token file and the private temp folders (node.py), and the
study's paths read from the sweep's own options, the job's MLflow server's command line and its stop
(mlflow_server.py). Fast: no Slurm, no Ray, no MLflow server. The same code runs for real in
tests/slurm/test_netns_hostloss.py (a head host lost: the workers requeue the job) and tests/slurm/test_slurm.py."""

from __future__ import annotations

import configparser
import fnmatch
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from harness.errors import UserError
from harness.files import process_start_time
from harness.launch.slurm import allocation, mlflow_server, node
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
    old = os.umask(0o277)  # a umask that would leave the folder unusable: the folder is 0700 all the same
    try:
        folder = node.private_folder(str(tmp_path / "sub" / "ray-7-0-n1"))
    finally:
        os.umask(old)
    assert folder.parent == tmp_path / "sub" and fnmatch.fnmatchcase(folder.name, "ray-7-0-n1" + node.SUFFIX), folder
    assert node.ours(folder) and stat.S_IMODE(folder.stat().st_mode) == 0o700
    loose = tmp_path / "sub" / "ray-7-0-n1.abcd_efg"   # the same shape, but not private: not ours
    loose.mkdir(mode=0o755)
    loose.chmod(0o755)
    (tmp_path / "sub" / "ray-7-0-n1.link1234").symlink_to(folder)
    (tmp_path / "sub" / "ray-7-0-n1.other.abcd1234").mkdir(mode=0o700)   # node "n1.other"'s, not n1's
    assert not node.ours(loose) and not node.ours(tmp_path / "sub" / "ray-7-0-n1.link1234")
    assert node.node_folders(str(tmp_path / "sub" / "ray-7-0"), "n1") == [str(folder)]
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
    # At least the 5 s timeout; the upper bound only says it did not wait for the child's `sleep 300` (on a
    # loaded machine the kill and the session's end took over 15 s once).
    elapsed = time.monotonic() - t0
    assert 4 < elapsed < 120, f"the child that ignores SIGTERM was killed after the timeout ({elapsed:.1f}s)"
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


# --- the allocation as the batch script reads it (allocation.py) ------------------------------------

JOB = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "n[1-3]"}


def test_the_allocation_gives_the_batch_script_its_nodes_ports_folders_and_auth(tmp_path):
    """Every value sweep.sbatch reads, from Slurm's variables alone; bash's ${A:-${B:-default}} order."""
    env = JOB | {"SLURM_RESTART_COUNT": "2", "SLURM_CPUS_ON_NODE": "16", "SLURM_GPUS_PER_NODE": "a100:4"}
    got = allocation.settings(env, ["n1", "n2", "n3"], tmp_path)
    assert list(got) == list(allocation.KEYS)
    assert got == {
        "RESTART": "2", "NODES": "n1 n2 n3", "NODE_COUNT": "3", "HEAD": "n1", "WORKERS": "n2,n3",
        "CPUS": "16", "GPUS": "4", "PORT": str(10000 + 1000 * ((4242 + 2) % 22)), "JOIN_TIMEOUT": "300",
        "RAY_TMP_BASE": "/tmp/ray-4242-2", "RAY_STOP_MARK": f"{tmp_path}/.ray-stopping-4242-2",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_AUTH_MODE": "token",
        "TOKEN_FILE": f"{tmp_path}/.ray-token-4242"}
    # A restart moves the port (its previous start may still hold the old one); the user's choices win.
    assert allocation.settings(JOB | {"SLURM_RESTART_COUNT": "3"}, ["n1"], tmp_path)["PORT"] != got["PORT"]
    users = {"SLURM_CPUS_PER_TASK": "8", "SLURM_CPUS_ON_NODE": "16", "DITSCALE_RAY_PORT": "20000",
             "DITSCALE_GPUS_PER_NODE": "1", "SLURM_GPUS_ON_NODE": "2", "DITSCALE_RAY_TMPDIR": "/scratch",
             "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "5", "RAY_AUTH_TOKEN": "t"}
    mine = allocation.settings(JOB | users, ["n1"], tmp_path)
    assert (mine["CPUS"], mine["GPUS"], mine["PORT"], mine["RAY_TMP_BASE"], mine["WORKERS"]) == \
        ("8", "1", "20000", "/scratch/ray-4242-0", "")
    assert (mine["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"], mine["TOKEN_FILE"]) == ("5", "")  # the user's token
    off = allocation.settings(JOB | {"RAY_AUTH_MODE": "disabled"}, ["n1"], tmp_path)
    assert (off["RAY_AUTH_MODE"], off["TOKEN_FILE"], off["CPUS"], off["GPUS"]) == ("disabled", "", "1", "0")


@pytest.mark.parametrize("env, needle", [
    ({"DITSCALE_RAY_AUTH": "tokn"}, "DITSCALE_RAY_AUTH=tokn: must be token or disabled"),
    ({"RAY_AUTH_MODE": "maybe"}, "RAY_AUTH_MODE=maybe"),
    ({"DITSCALE_RAY_PORT": "65000"}, "DITSCALE_RAY_PORT=65000"),
    ({"DITSCALE_RAY_PORT": "12x"}, "DITSCALE_RAY_PORT=12x"),
    ({"DITSCALE_GPUS_PER_NODE": "two"}, "DITSCALE_GPUS_PER_NODE=two"),
    ({"SLURM_CPUS_PER_TASK": "0"}, "SLURM_CPUS_PER_TASK=0"),
    ({"DITSCALE_JOIN_TIMEOUT": "soon"}, "DITSCALE_JOIN_TIMEOUT=soon"),
    ({"SLURM_JOB_ID": ""}, "run slurm/sweep.sbatch with sbatch"),
])
def test_a_bad_setting_is_one_line_naming_its_variable_and_writes_no_token(tmp_path, env, needle):
    with pytest.raises(UserError) as err:
        allocation.settings(JOB | env, ["n1"], tmp_path)
    assert needle in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="names no node"):
        allocation.settings(JOB, [], tmp_path)
    with pytest.raises(UserError, match="line break"):
        allocation.as_lines(allocation.settings(JOB | {"DITSCALE_RAY_TMPDIR": "/a\nHEAD=x"}, ["n1"], tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_the_allocation_command_writes_the_token_it_names(tmp_path):
    """`ditscale slurm node allocation` as sweep.sbatch runs it (a stand-in scontrol expands the node list):
    KEY=value lines, and the token file they name, private; a bad setting is one line and no token."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "scontrol").write_text('#!/bin/sh\n[ "$1 $2 $3" = "show hostnames n[1-3]" ] && echo n1 n2 n3\n')
    (tmp_path / "bin" / "scontrol").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "DITSCALE_", "SLURM_"))}
    env |= JOB | {"PATH": f"{tmp_path / 'bin'}:{env['PATH']}"}
    slurm_dir = tmp_path / "slurm"
    slurm_dir.mkdir()
    cmd = [sys.executable, "-m", "harness.cli", "slurm", "node", "allocation", "--slurm-dir", str(slurm_dir)]
    proc = subprocess.run(cmd, env=env | {"DITSCALE_RAY_AUTH": "nope"}, capture_output=True, text=True, check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "DITSCALE_RAY_AUTH=nope" in proc.stderr
    assert list(slurm_dir.iterdir()) == []
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    got = dict(line.split("=", 1) for line in out.splitlines())
    assert (got["NODES"], got["HEAD"], got["WORKERS"]) == ("n1 n2 n3", "n1", "n2,n3")
    token = slurm_dir / ".ray-token-4242"
    assert got["TOKEN_FILE"] == str(token) and stat.S_IMODE(token.stat().st_mode) == 0o600


def test_the_head_address_is_the_users_or_never_loopback_on_several_nodes(monkeypatch):
    assert node.head_ip({"DITSCALE_RAY_HEAD_IP": "10.1.2.3", "SLURM_JOB_NUM_NODES": "4"}) == "10.1.2.3"
    monkeypatch.setattr(node, "node_ip", lambda toward=None: "127.0.1.1")
    assert node.head_ip({"SLURM_JOB_NUM_NODES": "1"}) == "127.0.1.1"   # one node: loopback is enough
    with pytest.raises(UserError, match=r"found no address but loopback \(127\.0\.1\.1\).*DITSCALE_RAY_IFACE"):
        node.head_ip({"SLURM_JOB_NUM_NODES": "2", "SLURMD_NODENAME": "n1"})
