"""Issue 26, item 4: the test clusters' scripts (slurm/testing/) and the Slurm job's Ray temp folders
trust nothing that someone else could have put in /tmp.

The scripts run as root. A state folder such as /tmp/ditscale-netns could be made first by any local
user, and the stop script then deleted the interfaces (eth0, docker0) listed in a planted netns.record,
killed any pid from a planted *.pid, and netns-host.sh sourced a planted netns.env as root. Now:

- the state folder is made by the start script (mktemp -d: mode 0700, owned by the caller, a marker
  inside), and every script refuses, in one line and touching nothing, a folder owned by another user,
  of mode 0777, without the marker or reached through a symlink;
- even in their own folder (stale state, reused pids), the stop script deletes only links and
  namespaces named after the cluster (NAME-br, NAME-ctl, NAME-hI) that still have the interface index
  or namespace inode recorded when they were made, and signals only processes whose start time is the
  one recorded (/proc/PID/stat field 22);
- netns.env is parsed (NAME, HOSTS, strict patterns), never sourced: a command in it does not run;
- slurm/sweep.sbatch gives Ray a temp folder inside a private folder of its own on each node
  (tempfile.mkdtemp: NAME.XXXXXXXX, mode 0700), and
  signals or removes only folders of that pattern that are the user's and mode 0700: a folder or pid
  file planted under the old predictable name (ray-JOBID-RESTART-NODE) is neither used nor touched.

The planted-state tests are fast and need root and `ip` (they create a bridge interface, the kind of
link the netns cluster makes); the running clusters are tests/slurm/test_slurm.py's and
tests/slurm/test_netns_cluster.py's.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.support import ROOT

TESTING = ROOT / "slurm" / "testing"
SBATCH = ROOT / "slurm" / "sweep.sbatch"
SBIN = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
NOBODY = 65534

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the scripts run as root; planting another user's folder needs root")


def _ip_ok() -> bool:
    return shutil.which("ip", path=SBIN) is not None


def _run(script: str, *args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(TESTING / script), *args], capture_output=True, text=True, timeout=timeout,
                          check=False, env={**os.environ, "PATH": SBIN, **(env or {})})


def _start_time(pid: int) -> str:
    """Field 22 of /proc/PID/stat (what an attacker can read too, to make a planted record look right)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "\nState:\tZ" not in status


@pytest.fixture
def victim():
    """An unrelated live process (`sleep 300`), killed at the end."""
    proc = subprocess.Popen(["sleep", "300"])
    yield proc.pid
    proc.kill()
    proc.wait()


@pytest.fixture
def links():
    """make(name) -> ifindex: a link of this machine (a bridge; no dummy driver everywhere) that the
    scripts did not create; every one made is deleted at the end."""
    if not _ip_ok():
        pytest.skip("ip (iproute2) not found")
    made = []

    def make(name: str) -> str:
        proc = subprocess.run(["ip", "link", "add", name, "type", "bridge"], check=False, capture_output=True, text=True,
                              env={"PATH": SBIN})
        if proc.returncode != 0:
            pytest.skip(f"cannot create a test interface: {proc.stderr.strip()}")
        made.append(name)
        return Path(f"/sys/class/net/{name}/ifindex").read_text().strip()

    yield make
    for name in made:
        subprocess.run(["ip", "link", "delete", name], check=False, capture_output=True, env={"PATH": SBIN})


def _link_exists(name: str) -> bool:
    return Path(f"/sys/class/net/{name}").exists()


def _plant(folder: Path, name: str, link: str, index: str, pid: int) -> None:
    """What an attacker (or a stale run) leaves in a state folder, in both the old and the new formats:
    pid files and a pid record naming `pid` with its true start time, a netns.record naming `link`,
    a netns.env naming the cluster NAME."""
    (folder / "munge").mkdir(parents=True, exist_ok=True)
    for f in ("slurmd-h1.pid", "slurmctld.pid", "slurmd.pid", "munge/munged.pid"):
        (folder / f).write_text(f"{pid}\n")
    (folder / "pids").write_text(f"slurmd-h1 {pid} {_start_time(pid)}\nslurmd {pid} {_start_time(pid)}\n")
    (folder / "netns.record").write_text(f"link {link} {index}\n")
    (folder / "netns.env").write_text(f"NAME={name}\nHOSTS=1\n")


def _snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None, p.stat().st_mode, p.stat().st_uid)
            for p in sorted(folder.rglob("*"))}


def _one_line(proc: subprocess.CompletedProcess, *needles: str) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and len(lines) == 1, (proc.returncode, proc.stdout, proc.stderr)
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _own_state(kind: str, parent: Path) -> Path:
    """A state folder as the start scripts make theirs (common.sh: state_new): mktemp's mode 0700 and the
    marker naming the kind, the user and the folder. Made here rather than through common.sh, so that the
    same test runs the scripts of before this change too (which then delete and kill what it plants)."""
    folder = Path(tempfile.mkdtemp(prefix=f"ditscale-{kind}.", dir=parent)).resolve()
    (folder / ".ditscale-state").write_text(f"ditscale-{kind} uid={os.geteuid()} dir={folder}\n")
    return folder


def test_own_state_is_what_the_scripts_make(tmp_path):
    """The helper above and common.sh's state_new agree (mode, owner, marker)."""
    out = subprocess.run(["bash", "-c", f'. {shlex.quote(str(TESTING / "common.sh"))} && state_new "$0"', "netns"],
                         capture_output=True, text=True, check=True, env={**os.environ, "TMPDIR": str(tmp_path)})
    made = Path(out.stdout.strip())
    ours = _own_state("netns", tmp_path)
    assert made.parent == tmp_path.resolve() and made.name.startswith("ditscale-netns.")
    assert (made.stat().st_mode & 0o7777, made.stat().st_uid) == (ours.stat().st_mode & 0o7777, ours.stat().st_uid)
    assert (made / ".ditscale-state").read_text() == (ours / ".ditscale-state").read_text().replace(str(ours), str(made))
    for folder in (made, ours):  # both accepted by the scripts' check
        check = subprocess.run(["bash", "-c", f'. {shlex.quote(str(TESTING / "common.sh"))} && state_open netns "$0"',
                                str(folder)], check=False, capture_output=True, text=True)
        assert check.returncode == 0 and check.stdout.strip() == str(folder), check.stdout


# --- a state folder the scripts did not make is refused, and nothing is touched ---------------------

FOREIGN = {
    "another user's": lambda d: os.chown(d, NOBODY, NOBODY),
    "mode 0777": lambda d: d.chmod(0o777),
    "no marker (made by mkdir, as /tmp/ditscale-netns was)": lambda d: None,
}


@needs_root
@pytest.mark.parametrize("script", ["stop-netns-cluster.sh", "stop-local-cluster.sh"])
@pytest.mark.parametrize("how", list(FOREIGN))
def test_stop_refuses_a_state_folder_it_did_not_create_and_touches_nothing(script, how, tmp_path, victim, links):
    name = f"dsf{os.getpid() % 100000}"
    index = links(f"{name}-h1")  # named like the cluster's own link: only the folder check saves it
    state = tmp_path / "ditscale-netns"
    state.mkdir(mode=0o700)
    _plant(state, name, f"{name}-h1", index, victim)
    FOREIGN[how](state)
    before = _snapshot(state)
    proc = _run(script, str(state))
    assert _alive(victim), f"{script} killed an unrelated process"
    if script == "stop-netns-cluster.sh":
        assert _link_exists(f"{name}-h1"), f"{script} deleted an interface it did not create"
    assert _snapshot(state) == before
    _one_line(proc, "refusing", str(state))


@needs_root
def test_a_symlink_to_a_state_folder_is_refused(tmp_path, victim):
    real = _own_state("netns", tmp_path)
    _plant(real, "dsl", "dsl-h1", "1", victim)
    (real / "pids").write_text(f"slurmd-h1 {victim} {_start_time(victim)}\n")  # would be signalled through it
    link = tmp_path / "ditscale-netns"
    link.symlink_to(real)
    _one_line(_run("stop-netns-cluster.sh", str(link)), "symbolic link")
    assert _alive(victim)


@needs_root
def test_the_start_script_refuses_a_planted_state_folder_in_one_line(tmp_path):
    if shutil.which("slurmctld", path=SBIN) is None or shutil.which("munged", path=SBIN) is None:
        pytest.skip("slurm-wlm/munge not installed (the start script checks for them first)")
    state = tmp_path / "ditscale-slurm"
    state.mkdir(mode=0o777)
    os.chown(state, NOBODY, NOBODY)
    proc = _run("start-local-cluster.sh", str(state), env={"DITSCALE_SLURM_START_TIMEOUT": "5"})
    _one_line(proc, "refusing", "uid 65534")
    assert list(state.iterdir()) == [] and not proc.stdout


# --- in their own folder: only what they recorded, while it is still what they recorded ------------

@needs_root
def test_stale_state_deletes_no_link_it_did_not_make_and_kills_no_reused_pid(tmp_path, victim, links):
    name = f"dss{os.getpid() % 100000}"
    state = _own_state("netns", tmp_path)
    foreign = "dsdummy0"
    links(foreign)                                    # not the cluster's name (like eth0, docker0)
    renamed_index = links(f"{name}-h1")               # the cluster's name, made by someone since
    ours_index = links(f"{name}-br")                  # the cluster's own, as recorded: it goes
    ours = subprocess.Popen(["sleep", "300"])         # a daemon of the cluster's, as recorded: it goes
    try:
        _plant(state, name, foreign, "1", victim)
        (state / "netns.record").write_text(
            f"link {foreign} {Path(f'/sys/class/net/{foreign}/ifindex').read_text().strip()}\n"
            f"link {name}-h1 {int(renamed_index) + 1000}\n"
            f"link {name}-br {ours_index}\n"
            f"netns {name}-h1 12345\n")
        (state / "pids").write_text(f"slurmd-h1 {victim} {int(_start_time(victim)) - 1}\n"   # a reused pid
                                    f"slurmctld {ours.pid} {_start_time(ours.pid)}\n")
        proc = _run("stop-netns-cluster.sh", str(state))
        assert proc.returncode == 0, proc.stderr
        assert _alive(victim), "a pid whose start time is not the recorded one was signalled"
        assert _link_exists(foreign), "an interface outside the cluster's names was deleted"
        assert _link_exists(f"{name}-h1"), "a link whose interface index is not the recorded one was deleted"
        assert not _link_exists(f"{name}-br"), "the recorded link (name and index) was not deleted"
        assert ours.wait(timeout=15) == -signal.SIGTERM, "the recorded process was not stopped"
        assert f"skipping 'link {foreign}" in proc.stderr
    finally:
        ours.kill()
        ours.wait()


# --- netns.env is data, never sourced ----------------------------------------------------------------

PLANTED_ENV = {
    "command substitution": "NAME=dsx$(touch {pwned})\nHOSTS=3\n",
    "a second command": "NAME=dsx\nHOSTS=3; touch {pwned}\n",
    "backquotes": "NAME=dsx`touch {pwned}`\nHOSTS=3\n",
}


@needs_root
@pytest.mark.parametrize("folder", ["own", "another user's"])
@pytest.mark.parametrize("how", list(PLANTED_ENV))
def test_netns_host_never_runs_a_command_planted_in_netns_env(folder, how, tmp_path):
    pwned = tmp_path / "pwned-xyz"
    state = _own_state("netns", tmp_path) if folder == "own" else tmp_path / "ditscale-netns"
    if folder != "own":
        state.mkdir(mode=0o700)
    (state / "netns.env").write_text(PLANTED_ENV[how].format(pwned=pwned))
    if folder != "own":
        os.chown(state, NOBODY, NOBODY)
    proc = subprocess.run([str(TESTING / "netns-host.sh"), "lose", str(state), "1"], check=False, capture_output=True,
                          text=True, timeout=30, env={**os.environ, "PATH": SBIN})
    assert not pwned.exists(), "netns-host.sh ran a command from netns.env"
    _one_line(proc, "netns-host:")


# --- the Slurm job's Ray temp folders ---------------------------------------------------------------

def _stub_job(folder: Path, ray_tmp: Path, record: Path) -> dict:
    """Stand-ins for what sweep.sbatch calls (srun runs the step's command here, on `node1`): `ray start`
    records its temp folder and the mode and owner of the folder around it, then blocks as `ray start
    --block` does until it is signalled; waiting for Ray waits for that record (as the real wait waits for
    the head to answer); the sweep does nothing."""
    bin_dir = folder / "bin"
    bin_dir.mkdir()
    slurm_dir = folder / "runs" / "stub" / "slurm"
    paths = "".join(f"{k}={shlex.quote(str(v))}\n" for k, v in (
        ("STUDY_NAME", "stub"), ("STUDY_DIR", slurm_dir.parent), ("STOP_FILE", slurm_dir.parent / "STOP"),
        ("SLURM_DIR", slurm_dir), ("TRACKING_URI", f"sqlite:///{folder}/mlflow.db"),
        ("TRACKING_URI_SHOWN", f"sqlite:///{folder}/mlflow.db"), ("REPORT", folder / "r.html")))
    rec = shlex.quote(str(record))
    scripts = {
        "ditscale": ("#!/bin/bash\n"
                     'case "$1 $2" in\n'
                     f"  'slurm paths') cat <<'EOF'\n{paths}EOF\n;;\n"
                     "  'slurm node-ip') echo 10.9.8.7 ;;\n"
                     "  'slurm node') exec python -m harness.cli \"$@\" ;;\n"
                     f"  'slurm wait-ray') for _ in $(seq 600); do grep -q '^temp ' {rec} 2>/dev/null && exit 0; "
                     "sleep 0.1; done; exit 1 ;;\n"
                     "  'sweep '*) ;;\n"
                     "  *) exit 1 ;;\n"
                     "esac\n"),
        "ray": ("#!/bin/bash\n"
                'for a; do case $a in --temp-dir=*) t=${a#*=} ;; esac; done\n'
                f'echo "temp $t $(stat -c "%u %a" "$(dirname "$t")")" >> {rec}\n'
                f"trap 'kill $!; echo \"ray stopped\" >> {rec}; exit 0' TERM\n"
                "sleep 60 & wait\n"),
        "scontrol": '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && echo node1\nexit 0\n',
        "srun": '#!/bin/sh\nwhile [ $# -gt 0 ]; do case $1 in --*) shift ;; *) break ;; esac; done\nexec "$@"\n',
    }
    for name, text in scripts.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "DITSCALE_", "SLURM_", "MLFLOW_"))}
    return env | {"PATH": f"{bin_dir}:{Path(sys.executable).parent}:/usr/bin:/bin", "SLURM_JOB_ID": "78",
                  "SLURM_JOB_NODELIST": "node1", "SLURMD_NODENAME": "node1", "SLURM_RESTART_COUNT": "1",
                  "DITSCALE_RAY_AUTH": "disabled", "DITSCALE_RAY_TMPDIR": str(ray_tmp),
                  "DITSCALE_STOP_TIMEOUT": "20"}


@needs_root
def test_the_job_gives_ray_a_private_temp_folder_and_touches_no_planted_one(tmp_path, victim):
    ray_tmp = tmp_path / "shared-tmp"
    ray_tmp.mkdir()
    ray_tmp.chmod(0o1777)
    # The old predictable names, this start's (restart 1) and the previous one's, made first by another
    # user: a world-writable folder for Ray, a pid file naming an unrelated process, a folder with content.
    planted = {ray_tmp / "ray-78-1-node1": None, ray_tmp / "ray-78-0-node1": "theirs\n",
               # the new pattern, but another user's: never signalled through, never removed
               ray_tmp / "ray-78-1-node1.abcd_efg": None, ray_tmp / "ray-78-0-node1.abcd_efg": None}
    for path, content in planted.items():
        path.mkdir(mode=0o777)
        if content:
            (path / "file").write_text(content)
    (ray_tmp / "ray-78-1-node1.pid").write_text(f"{victim}\n")
    (ray_tmp / "ray-78-1-node1.abcd_efg" / "ray.pid").write_text(f"{victim} {_start_time(victim)}\n")
    for path in [*planted, ray_tmp / "ray-78-1-node1.pid"]:
        for p in [path, *path.rglob("*")]:
            os.chown(p, NOBODY, NOBODY)
    # A process naming the planted previous-start folder on its command line, as Ray's daemons do.
    lookalike = subprocess.Popen(["bash", "-c", 'exec -a "$0/r/raylet" sleep 300', str(ray_tmp / "ray-78-0-node1.abcd_efg")])
    record = tmp_path / "record"
    env = _stub_job(tmp_path, ray_tmp, record)
    try:
        t0 = time.monotonic()
        proc = subprocess.run(["bash", str(SBATCH), str(tmp_path / "study.yaml")], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120, check=False)
        elapsed = time.monotonic() - t0
        assert proc.returncode == 0, (proc.stdout, proc.stderr)
        lines = record.read_text().splitlines()
        temp = [line.split() for line in lines if line.startswith("temp ")]
        assert len(temp) == 1, lines
        _, folder, uid, mode = temp[0]
        assert re.fullmatch(re.escape(str(ray_tmp / "ray-78-1-node1.")) + r"[a-z0-9_]{8}/r", folder), folder
        assert Path(folder).parent not in planted and (uid, mode) == (str(os.geteuid()), "700"), temp[0]
        assert "ray stopped" in lines, f"`ray start` was not stopped through its pid file: {lines}"
        assert elapsed < 20, f"the job waited {elapsed:.0f}s for Ray to stop"
        assert not Path(folder).parent.exists(), "the job's own Ray temp folder was left behind"
        assert _alive(victim), "a pid from a planted pid file was signalled"
        assert lookalike.poll() is None, "a process under another user's folder was killed"
        for path, content in planted.items():
            assert path.is_dir() and path.stat().st_uid == NOBODY, f"{path} was removed or replaced"
            if content:
                assert (path / "file").read_text() == content
    finally:
        lookalike.kill()
        lookalike.wait()
