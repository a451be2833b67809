"""The allocation as slurm/sweep.sbatch uses it, worked out once per (re)start of the job:
`ditscale slurm node allocation --slurm-dir DIR` reads Slurm's and the user's variables and prints one
`KEY=value` a line, which the batch shell assigns by name (never evaluated); it also writes the job's Ray
token when the job needs one.

- RESTART: SLURM_RESTART_COUNT (0 on the first start); NODES / NODE_COUNT / HEAD / WORKERS: the nodes
  (`scontrol show hostnames SLURM_JOB_NODELIST`), the head on the first, the workers as a Slurm node list.
- CPUS: SLURM_CPUS_PER_TASK, else SLURM_CPUS_ON_NODE, else 1. GPUS: DITSCALE_GPUS_PER_NODE, else
  SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE, else 0, without a type ("a100:4" -> 4).
- PORT: DITSCALE_RAY_PORT, else 10000 + 1000 * ((job id + restart) % 22): + restart, so that a restarted
  job never meets a port still held by what its previous start left behind; the node's other ports are
  PORT+1..PORT+8 and its worker processes' PORT+100..PORT+999 (node.ray_start_args), all below 65536.
  JOIN_TIMEOUT: DITSCALE_JOIN_TIMEOUT (default 300), seconds for every node to join the Ray cluster.
- RAY_TMP_BASE: DITSCALE_RAY_TMPDIR (default /tmp)/ray-JOB-RESTART; each node's private Ray temp folder
  is RAY_TMP_BASE-NODE.XXXXXXXX (node.py). RAY_STOP_MARK: DIR/.ray-stopping-JOB-RESTART, "the job is
  ending", which the batch shell leaves before it stops Ray, for the workers (watch.py).
- RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S: 0 unless set: when the sweep has ended there is nothing left to
  drain, so Ray stops at once (it waits 30 s by default).
- RAY_AUTH_MODE / TOKEN_FILE: the same Ray auth mode on every node: DITSCALE_RAY_AUTH, else RAY_AUTH_MODE,
  else token. With token and neither RAY_AUTH_TOKEN nor RAY_AUTH_TOKEN_PATH, a fresh token is written to
  DIR/.ray-token-JOB (node.write_token: exclusive, never through a symlink, mode 600), which the batch
  shell exports as RAY_AUTH_TOKEN_PATH and removes at the end; with disabled it unsets both.

`settings` is a pure function of the environment and the node names; every value is checked before the
token is written, and a bad one is a one-line UserError naming its variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

from harness.errors import UserError
from harness.launch.slurm.node import hostnames, write_token

KEYS = ("RESTART", "NODES", "NODE_COUNT", "HEAD", "WORKERS", "CPUS", "GPUS", "PORT", "JOIN_TIMEOUT", "RAY_TMP_BASE",
        "RAY_STOP_MARK", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "RAY_AUTH_MODE", "TOKEN_FILE")
PORTS_ABOVE = 999   # the highest port a node uses is PORT + 999 (its worker processes')


def _first(env: Mapping[str, str], *names: str, default: str) -> tuple[str, str]:
    """The first of `names` set and not empty in `env` (as bash's ${A:-${B:-default}}), with its name."""
    return next(((n, env[n]) for n in names if env.get(n)), (names[-1], default))


def _count(env: Mapping[str, str], *names: str, default: str, least: int = 0) -> int:
    name, value = _first(env, *names, default=default)
    value = value.rsplit(":", 1)[-1]   # a GPU count may come with its type: "a100:4" -> 4
    if not value.isdigit() or int(value) < least:
        raise UserError(f"{name}={env.get(name)}: not a whole number of at least {least}")
    return int(value)


def port(env: Mapping[str, str], job: int, restart: int) -> int:
    """Ray's GCS port (see the module docstring)."""
    if not env.get("DITSCALE_RAY_PORT"):
        return 10000 + 1000 * ((job + restart) % 22)
    value = env["DITSCALE_RAY_PORT"]
    if not value.isdigit() or not 1024 <= int(value) <= 65535 - PORTS_ABOVE:
        raise UserError(f"DITSCALE_RAY_PORT={value}: not a port from 1024 to {65535 - PORTS_ABOVE} (the node's "
                        f"ports go up to PORT+{PORTS_ABOVE})")
    return int(value)


def auth_mode(env: Mapping[str, str]) -> str:
    name, mode = _first(env, "DITSCALE_RAY_AUTH", "RAY_AUTH_MODE", default="token")
    if mode not in ("token", "disabled"):
        raise UserError(f"{name}={mode}: must be token or disabled")
    return mode


def settings(env: Mapping[str, str], nodes: list[str], slurm_dir: str | Path) -> dict[str, str]:
    """The values the batch shell reads (KEYS), from `env` (the batch shell's environment) and the
    allocation's node names, in order."""
    job = env.get("SLURM_JOB_ID", "")
    if not job.isdigit():
        raise UserError(f"SLURM_JOB_ID={job}: not a job id; run slurm/sweep.sbatch with sbatch")
    if not nodes:
        raise UserError(f"SLURM_JOB_NODELIST={env.get('SLURM_JOB_NODELIST', '')}: `scontrol show hostnames` "
                        "names no node")
    restart = _count(env, "SLURM_RESTART_COUNT", default="0")
    mode = auth_mode(env)
    needs_token = mode == "token" and not env.get("RAY_AUTH_TOKEN") and not env.get("RAY_AUTH_TOKEN_PATH")
    values = {
        "RESTART": restart, "NODES": " ".join(nodes), "NODE_COUNT": len(nodes), "HEAD": nodes[0],
        "WORKERS": ",".join(nodes[1:]),
        "CPUS": _count(env, "SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE", default="1", least=1),
        "GPUS": _count(env, "DITSCALE_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", default="0"),
        "PORT": port(env, int(job), restart),
        "JOIN_TIMEOUT": _count(env, "DITSCALE_JOIN_TIMEOUT", default="300", least=1),
        "RAY_TMP_BASE": f"{env.get('DITSCALE_RAY_TMPDIR') or '/tmp'}/ray-{job}-{restart}",
        "RAY_STOP_MARK": f"{slurm_dir}/.ray-stopping-{job}-{restart}",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": env.get("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S") or "0",
        "RAY_AUTH_MODE": mode,
        "TOKEN_FILE": f"{slurm_dir}/.ray-token-{job}" if needs_token else "",
    }
    return {k: str(v) for k, v in values.items()}


def as_lines(values: Mapping[str, object], fix: str = "") -> str:
    """One `KEY=value` a line, as the batch script reads them (`slurm paths` and `slurm node allocation`);
    a value with a line break (which `read` would split) is refused, with `fix` (what to change) appended."""
    for key, value in values.items():
        if "\n" in str(value) or "\r" in str(value):
            raise UserError(f"{key}: {str(value)!r} holds a line break, which the batch script cannot read"
                            + (f"; {fix}" if fix else ""))
    return "".join(f"{k}={v}\n" for k, v in values.items())


def prepare(slurm_dir: str | Path, env: Mapping[str, str] | None = None) -> str:
    """`ditscale slurm node allocation`: the settings as lines, after writing the token they name."""
    env = os.environ if env is None else env
    values = settings(env, hostnames(env.get("SLURM_JOB_NODELIST", "")), slurm_dir)
    text = as_lines(values)
    if values["TOKEN_FILE"]:
        write_token(values["TOKEN_FILE"])
    return text
