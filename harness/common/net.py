"""Network helpers shared by the launcher, the node side of a Slurm job and the process groups."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` now (the kernel's choice: bind to port 0 and read back the port).

    The socket is bound to `host` only, never to all interfaces, so the port is free where the server
    will listen (rank 0's store, the job's MLflow server); an IPv6 literal (it contains ':') gets an
    IPv6 socket. The port is released when this returns: a process that binds it later can still
    lose a race with another process, which the callers' start-up retries cover."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
