"""A worker's watch over its Ray head: requeue the job when the head's host was lost.

A worker node's Ray ends by itself when the head's is gone (its GCS unreachable for 60 s,
RAY_gcs_rpc_server_reconnect_timeout_s). When that is not the end of the job (the batch shell leaves
the stop mark, RAY_STOP_MARK on the shared filesystem, before it stops Ray), the head's GCS port does not
answer, and the head host is found down within DITSCALE_HEAD_LOSS_WAIT s (default 600), the head's host is
lost: the batch shell, the driver and Ray's head are gone, but with --no-kill Slurm keeps the job and its
other nodes until the time limit. The worker then requeues the job (cancels it when the job cannot be
requeued); the sweep resumes when it runs again.

"Down": Slurm finds the node not responding (sinfo's state ends in '*') or has declared it DOWN, or the
head's slurmd, at the address slurmctld uses for it (NodeAddr), misses three probes in a row while this
worker still reaches slurmctld (so it is not this worker that is cut off). The worker must act before
Slurm declares the head node DOWN (SlurmdTimeout): Slurm then also kills the workers' step (their srun ran
on the head), this watch with it; hence the probe, instead of waiting for slurmctld's verdict alone. A
head node that is up but whose Ray died is left to the batch shell, whose sweep then fails; a head slurmd
that does not answer when the workers start (another port, a firewall) turns the probe off. The watch's
line goes to the job's log (StdOut), which the batch shell, gone, no longer writes. The stop marks stay
(one small file per start of the job): a worker whose Ray outlives the end of the job must still find it.

The decisions are pure functions of what was seen (`first_look`, `HeadWatch.see`, `cancel_after_requeue`);
`after_ray_exit` does the looking, once a second.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

SILENT_PROBES = 3        # the head's slurmd missed this many probes in a row: its host is down
STATE_EVERY = 5          # ask slurmctld (sinfo) every 5 s; the head's slurmd every second
DEFAULT_WAIT_S = 600     # DITSCALE_HEAD_LOSS_WAIT

ENDING = "ending"        # the job is ending (the stop mark): not a lost head
HEAD_UP = "head-up"      # the head's Ray answers: this worker's Ray ended for another reason
LOST = "lost"            # the head's host is lost: requeue the job
WATCH = "watch"          # not known yet: look again


def first_look(stop_mark: bool, head_ray_answers: bool) -> str:
    """Right after this worker's Ray ended: whether to watch the head at all."""
    if stop_mark:
        return ENDING
    return HEAD_UP if head_ray_answers else WATCH


def state_says_down(state: str) -> bool:
    """sinfo's %T for a node: 'mixed*' (any state with '*': not responding) or 'down...' (declared DOWN)."""
    return "*" in state or state.lower().startswith("down")


@dataclass
class Look:
    """One look at the head, a second after the previous one."""
    stop_mark: bool                    # the batch shell's stop mark exists: the job is ending
    node_state: str | None = None      # sinfo's state of the head node; None: not asked this time
    slurmd_answers: bool | None = None  # the head's slurmd took a TCP connection; None: the probe is off
    ctld_answers: bool | None = None   # `scontrol ping` succeeded; None: not asked


@dataclass
class HeadWatch:
    """The watch's state: the head's slurmd it probes (HOST:PORT; "": none), and how many probes in a row
    it missed."""
    slurmd: str = ""
    silent: int = 0

    @property
    def probe_slurmd(self) -> bool:
        return bool(self.slurmd)

    def see(self, look: Look) -> str:
        """ENDING, LOST or WATCH after `look`."""
        if look.stop_mark:
            return ENDING
        if look.node_state is not None and state_says_down(look.node_state):
            return LOST
        if self.probe_slurmd and look.slurmd_answers is False:
            self.silent += 1
            if self.silent >= SILENT_PROBES and look.ctld_answers:
                return LOST
        else:
            self.silent = 0
        return WATCH

    def asks_ctld(self, slurmd_answers: bool | None) -> bool:
        """Whether this look needs slurmctld's answer (only when the slurmd's silence would count)."""
        return self.probe_slurmd and slurmd_answers is False and self.silent + 1 >= SILENT_PROBES


def cancel_after_requeue(job_state: str, requeue_flag: str) -> bool:
    """After trying `scontrol requeue`: a job still RUNNING that cannot be requeued (Requeue=0) is cancelled,
    so that its allocation does not idle until the time limit."""
    return job_state == "RUNNING" and requeue_flag == "0"


# --- the looking -------------------------------------------------------------------------------------


def answers(address: str, timeout: float = 5.0) -> bool:
    """Whether HOST:PORT takes a TCP connection within `timeout` seconds."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def _run(*cmd: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return subprocess.CompletedProcess(list(cmd), 1, "", "")


def _say(text: str) -> str:
    line = f"[ditscale {time.strftime('%F %T')}] {socket.gethostname()}: {text}"
    print(line, file=sys.stderr, flush=True)
    return line


def head_slurmd() -> str:
    """The head's slurmd as HOST:PORT: at the address slurmctld uses for the head node (its NodeAddr, else
    the head's Ray address) and Slurm's SlurmdPort; DITSCALE_HEAD_SLURMD when set; "" when unknown."""
    if "DITSCALE_HEAD_SLURMD" in os.environ:
        return os.environ["DITSCALE_HEAD_SLURMD"]
    port = next((line.split("=", 1)[1].strip() for line in _run("scontrol", "show", "config").stdout.splitlines()
                 if line.split("=", 1)[0].strip() == "SlurmdPort"), "")
    node = _run("scontrol", "-o", "show", "node", os.environ.get("DITSCALE_HEAD_NODE", "")).stdout
    addr = next((w.split("=", 1)[1] for w in node.split() if w.startswith("NodeAddr=")), "")
    addr = addr or os.environ.get("RAY_ADDRESS", "").rpartition(":")[0]
    return f"{addr}:{port}" if port and addr else ""


def prepare_watch() -> HeadWatch:
    """At the worker's start: probe the head's slurmd only when it answers now (not another port, a firewall)."""
    slurmd = head_slurmd()
    if slurmd and not answers(slurmd):
        _say(f"the head node's slurmd does not answer at {slurmd}; a lost head is found by Slurm only")
        slurmd = ""
    return HeadWatch(slurmd)


def _head_lost(watch: HeadWatch, mark: Path) -> bool:
    env = os.environ
    head = env.get("DITSCALE_HEAD_NODE", "")
    deadline = time.monotonic() + float(env.get("DITSCALE_HEAD_LOSS_WAIT") or DEFAULT_WAIT_S)
    tick = 0
    while time.monotonic() < deadline:
        state = None
        if tick % STATE_EVERY == 0:
            state = _run("sinfo", "-h", "-N", "-n", head, "-o", "%T").stdout.strip()
        probe = answers(watch.slurmd) if watch.probe_slurmd else None
        ctld = _run("scontrol", "ping").returncode == 0 if watch.asks_ctld(probe) else None
        verdict = watch.see(Look(mark.exists(), state, probe, ctld))
        if verdict != WATCH:
            return verdict == LOST
        tick += 1
        time.sleep(1)
    return False


def after_ray_exit(watch: HeadWatch) -> bool:
    """This worker's Ray has ended by itself: requeue the job if its head's host was lost. Returns
    whether it did."""
    env = os.environ
    job, address, mark = env["SLURM_JOB_ID"], env.get("RAY_ADDRESS", ""), Path(env.get("RAY_STOP_MARK", "/nonexistent"))
    if first_look(mark.exists(), answers(address)) != WATCH or not _head_lost(watch, mark):
        return False
    line = _say(f"the Ray head at {address} is gone (its node was lost); requeueing job {job}")
    info = _run("scontrol", "show", "job", job).stdout
    out = next((s.split("=", 1)[1] for s in map(str.strip, info.splitlines()) if s.startswith("StdOut=")), "")
    if out:
        try:
            with open(out, "a") as f:
                f.write(line + "\n")
        except OSError:
            pass

    def job_state() -> str:
        return _run("squeue", "-h", "-j", job, "-o", "%T").stdout.strip()

    for _ in range(3):  # another worker may have requeued it already; slurmctld may be busy: retry
        if _run("scontrol", "requeue", job).returncode == 0 or job_state() != "RUNNING":
            break
        time.sleep(5)
    flag = next((w.split("=", 1)[1] for w in _run("scontrol", "show", "job", job).stdout.split()
                 if w.startswith("Requeue=")), "")
    if cancel_after_requeue(job_state(), flag):
        _run("scancel", job)  # not requeueable: end it, and the allocation with it
    return True
