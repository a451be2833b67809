"""The node side of a Slurm job as pure functions: the head-loss watch's decisions (harness/launch/slurm/
watch.py), `ray start`'s command line, the Ray token file and the private temp folders (node.py), and the
study's paths read from the sweep's own options. Fast: no Slurm, no Ray. The same code runs for real in
tests/test_netns_hostloss.py (a head host lost: the workers requeue the job) and tests/test_slurm.py."""

from __future__ import annotations

import os
import stat

import pytest

from harness.errors import UserError
from harness.launch.slurm import node
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
    assert node.start_time(os.getpid()) and node.start_time(2**22 + 1) is None


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
