"""Requests to stop a trial cleanly (checkpoint, then end as `killed`, resumable): SIGTERM/SIGUSR1 from
Slurm or a preempting scheduler, the study's stop file, or the caller (Ray Tune stopping a trial)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as tdist

from harness.common.process_group import DistInfo


class StopRequests:
    def __init__(self, stop_file: Path, dist: DistInfo, should_stop: Callable[[], bool] | None = None):
        self.stop_file, self.dist, self.should_stop = stop_file, dist, should_stop
        self.signalled = False
        self._previous = {}

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():  # Ray's worker threads cannot handle signals
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        self.signalled = True

    def agreed(self) -> bool:
        """Collective: every rank must agree, or one would wait forever in the next collective. The
        ranks' views (a signal may reach one rank first; rank 0 looks at the file) are all-reduced."""
        local = self.signalled or (self.should_stop is not None and self.should_stop())
        seen = float(local or (self.dist.is_main and self.stop_file.exists()))
        if self.dist.world_size == 1:
            return bool(seen)
        flag = torch.tensor([seen], device=self.dist.device)
        tdist.all_reduce(flag)
        return bool(flag.item())
