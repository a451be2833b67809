"""Issue 18, the Slurm rows: nothing injected into the rendered batch script, and a per-job Ray token
file that cannot be planted.

- `ditscale slurm submit` refuses a control character in every value it renders (a newline in
  `--account` used to end the `#SBATCH` line and run the rest as a shell command, and sbatch then
  ignored every `#SBATCH` line after it), in one line naming the option, before sbatch runs; values
  are quoted the way sbatch reads `#SBATCH` lines, so a submit directory with spaces and quotes is
  submitted and runs on the real local Slurm cluster (a probe job here; a whole study from a folder
  named "my study's dir" in tests/slurm/test_slurm.py), and one that cannot work fails in one line.
- slurm/sweep.sbatch creates its Ray token file exclusively, never through a symlink, mode 600 and
  owned by the user, or stops with one line: run for real (bash, the real script) with stand-ins
  for srun/ray/scontrol/ditscale and a planted symlink, a planted 0644 file and another user's file.

The cluster tests use tests/slurm/test_slurm.py's fixtures (skipped without Slurm unless
DITSCALE_REQUIRE_SLURM=1).
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ditscale, tiny_study, write_study
from tests.support.slurm import SBATCH, stub_batch_env  # submit(study, *options) -> Job: a fixture in conftest

PROBE = """#!/bin/bash
#SBATCH --nodes=1
#SBATCH --time=10
# @ditscale-submit-settings@
echo "PWD=$(pwd)"
echo "NAME=$SLURM_JOB_NAME"
"""


@pytest.fixture(scope="module")
def hard_study(digits_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("slurm-hardening")
    return write_study(folder / "study.yaml", tiny_study(digits_dir, "slurm-hardening", train={"steps": 10}))


def _fake_sbatch(folder: Path) -> tuple[dict, Path]:
    """A PATH whose sbatch only records that it ran."""
    bin_dir = folder / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    called = folder / "sbatch-called"
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ntouch {shlex.quote(str(called))}\necho 4242\n")
    (bin_dir / "sbatch").chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}"}, called


def _one_error_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# --- row: control characters and quoting in the rendered script ------------------------------------


@pytest.mark.parametrize("option", ["--account", "--partition", "--job-name", "--time"])
def test_a_control_character_in_any_option_is_refused_in_one_line_before_sbatch(option, hard_study, tmp_path):
    env, called = _fake_sbatch(tmp_path)
    values = ["proj\necho INJECTED"]
    if option == "--account":
        values += ["proj\r#SBATCH --nodes=9", "a\tb", "x\x1b[2Jy", "z\x7f", "\x85"]
    for bad in values:
        proc = ditscale("slurm", "submit", str(hard_study), "--cpus-per-task", "2", option, bad,
                        cwd=hard_study.parent, env=env, check=False)
        _one_error_line(proc, option, "control character")
        assert "INJECTED" not in proc.stdout and not called.exists()
    assert not list(hard_study.parent.glob("runs/*/slurm/sweep-*.sbatch"))  # nothing saved either


def test_render_refuses_control_characters_in_settings_and_names_them():
    from harness.errors import UserError
    from harness.launch.slurm import SETTINGS_MARKER, render_script

    template = f"#!/bin/bash\n#SBATCH --nodes=1\n{SETTINGS_MARKER}\necho hi\n"
    with pytest.raises(UserError, match=r"^DITSCALE_BIN: .*control character") as err:
        render_script(template, {"nodes": "1"}, {"DITSCALE_BIN": "/opt/venv\ntouch /tmp/pwned"})
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match=r"^--comment: .*control character"):
        render_script(template, {"comment": "a\x00b"}, {})


def test_a_submit_directory_with_a_control_character_fails_in_one_line(hard_study, tmp_path):
    env, called = _fake_sbatch(tmp_path)
    odd = tmp_path / "sub\necho INJECTED"
    odd.mkdir()
    proc = ditscale("slurm", "submit", str(hard_study), "--cpus-per-task", "2", cwd=odd, env=env, check=False)
    _one_error_line(proc, "--chdir")
    assert not called.exists()


def test_values_are_quoted_the_way_sbatch_reads_them(hard_study, tmp_path):
    """sbatch splits an #SBATCH line at whitespace (a backslash does not keep a space), strips ' and "
    quotes, drops backslashes and stops at an unquoted #; --output is also a file name pattern."""
    folder = tmp_path / "sub dir \"q\" #1 50%"
    folder.mkdir()
    out = ditscale("slurm", "submit", str(hard_study), "--cpus-per-task", "2", "--job-name", "my 'job'",
                   "--dry-run", cwd=folder).stdout.splitlines()
    esc = str(folder).replace('"', '\\"')
    assert f'#SBATCH --chdir="{esc}"' in out
    assert f'#SBATCH --output="{esc.replace("%", "%%")}/runs/slurm-hardening/slurm/slurm-%j.out"' in out
    assert "#SBATCH --job-name=\"my 'job'\"" in out
    assert "#SBATCH --nodes=1" in out and "#SBATCH --requeue" in out  # plain values stay plain
    # A backslash cannot be written into sbatch's --output pattern: one clear line instead.
    folder = tmp_path / "back\\slash"
    folder.mkdir()
    proc = ditscale("slurm", "submit", str(hard_study), "--cpus-per-task", "2", "--dry-run", cwd=folder, check=False)
    _one_error_line(proc, "--output", "backslash")


def test_a_submit_directory_mlflow_cannot_start_in_fails_in_one_line_before_sbatch(hard_study, tmp_path):
    """Both kinds of quote: MLflow's SQL store writes its Default experiment with the repr of
    <dir>/mlruns as SQL text, which then has a \\' in it (the job used to die in a traceback)."""
    env, called = _fake_sbatch(tmp_path)
    folder = tmp_path / "it's a \"dir\""
    folder.mkdir()
    proc = ditscale("slurm", "submit", str(hard_study), "--cpus-per-task", "2", cwd=folder, env=env, check=False)
    _one_error_line(proc, "--chdir", "tracking.uri")
    assert not called.exists()


def test_a_submit_directory_with_spaces_quotes_and_hash_runs_on_slurm(submit, hard_study, tmp_path):
    """The real sbatch reads the quoted lines: the job runs in that directory, logs where `submit`
    says, under the job name given, and the #SBATCH lines after the quoted ones still count."""
    folder = tmp_path / "sub dir \"q\" #1 50%"
    folder.mkdir()
    study = folder / "study.yaml"
    study.write_text(hard_study.read_text())
    probe = tmp_path / "probe.sbatch"
    probe.write_text(PROBE)
    job = submit(study, "--script", str(probe), "--cpus-per-task", "1", "--job-name", "probe 'job' #2",
                 "--time", "5")
    info = job.wait_done(timeout=180)
    log = job.text()
    assert info["JobState"] == "COMPLETED", (info, log)
    assert job.log.parent == folder.resolve() / "runs" / "slurm-hardening" / "slurm", job.log
    assert f"PWD={folder.resolve()}" in log.splitlines(), log
    assert "NAME=probe 'job' #2" in log.splitlines(), log
    assert (info["Requeue"], info["TimeLimit"]) == ("1", "00:05:00"), info  # rendered after the quoted lines


# --- row: the per-job Ray token file -----------------------------------------------------------------


def _stubs(folder: Path, slurm_dir: Path, record: Path) -> dict:
    """Stand-ins for what sweep.sbatch calls before its Ray step: `ditscale slurm paths`, ray,
    scontrol (`ditscale slurm node allocation`, which writes the token file, is the real one); srun records
    the token file's mode, owner and content, then fails (the script stops there, as when the head
    node's IP cannot be found)."""
    paths = "".join(f"{k}={v}\n" for k, v in (
        ("STUDY_NAME", "tok"), ("STUDY_DIR", slurm_dir.parent), ("STOP_FILE", slurm_dir.parent / "STOP"),
        ("SLURM_DIR", slurm_dir), ("TRACKING_URI", f"sqlite:///{folder}/mlflow.db"),
        ("TRACKING_URI_SHOWN", f"sqlite:///{folder}/mlflow.db"), ("REPORT", folder / "r.html")))
    scripts = {
        "ditscale": (f'#!/bin/sh\n[ "$1 $2" = "slurm node" ] && exec {shlex.quote(sys.executable)} -m harness.cli "$@"\n'
                     f'[ "$1 $2" = "slurm paths" ] || exit 1\ncat <<\'EOF\'\n{paths}EOF\n'),
        "srun": (f'#!/bin/sh\n{{ stat -c "%a %u %F" "$RAY_AUTH_TOKEN_PATH"; cat "$RAY_AUTH_TOKEN_PATH"; }} '
                 f'> {shlex.quote(str(record))} 2>&1\nexit 1\n'),
    }
    return stub_batch_env(folder, scripts, "77", drop=("RAY_", "DITSCALE_", "SLURM_", "MLFLOW_TRACKING_URI"))


def _run_token_step(tmp_path: Path, plant) -> tuple[subprocess.CompletedProcess, Path, Path]:
    slurm_dir = tmp_path / "runs" / "tok" / "slurm"
    slurm_dir.mkdir(parents=True)
    token = slurm_dir / ".ray-token-77"
    plant(token)
    record = tmp_path / "record"
    env = _stubs(tmp_path, slurm_dir, record)
    proc = subprocess.run(["bash", str(SBATCH), str(tmp_path / "study.yaml")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60, check=False)
    return proc, token, record


def _assert_fails_in_one_line(proc: subprocess.CompletedProcess, record: Path, *needles: str) -> None:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "Ray token" in lines[0], lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not record.exists()  # Ray was never started with it


def test_a_planted_symlink_is_not_followed_and_the_job_stops_in_one_line(tmp_path):
    target = tmp_path / "victim"
    target.write_text("precious\n")
    target.chmod(0o644)
    proc, token, record = _run_token_step(tmp_path, lambda p: p.symlink_to(target))
    _assert_fails_in_one_line(proc, record, str(token), "symbolic link")
    assert target.read_text() == "precious\n" and stat.S_IMODE(target.stat().st_mode) == 0o644
    assert token.is_symlink()  # left for the user to look at, not removed by the script's cleanup


def test_a_dangling_symlink_is_not_followed_either(tmp_path):
    target = tmp_path / "not-yet"
    proc, _token, record = _run_token_step(tmp_path, lambda p: p.symlink_to(target))
    _assert_fails_in_one_line(proc, record, "symbolic link")
    assert not target.exists() and not target.is_symlink()


def test_a_planted_0644_file_does_not_keep_its_mode_or_content(tmp_path):
    def plant(p: Path):
        p.write_text("planted-token\n")
        p.chmod(0o644)

    proc, token, record = _run_token_step(tmp_path, plant)
    assert "cannot find the IP address of the head node" in proc.stderr, (proc.stdout, proc.stderr)
    first, *content = record.read_text().splitlines()
    mode, uid, kind = first.split(" ", 2)
    assert (mode, int(uid), kind) == ("600", os.geteuid(), "regular file"), record.read_text()
    assert content and content != ["planted-token"] and re.fullmatch(r"[0-9a-f]{64}", content[0]), content
    assert not token.exists()  # removed at the end of the job


@pytest.mark.skipif(os.geteuid() != 0, reason="planting another user's file needs root")
def test_another_users_file_is_left_alone_and_the_job_stops_in_one_line(tmp_path):
    def plant(p: Path):
        p.write_text("theirs\n")
        p.chmod(0o644)
        os.chown(p, 65534, 65534)

    proc, token, record = _run_token_step(tmp_path, plant)
    _assert_fails_in_one_line(proc, record, str(token), "uid 65534")
    assert token.read_text() == "theirs\n" and token.stat().st_uid == 65534
