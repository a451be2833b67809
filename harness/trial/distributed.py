"""Process-group set-up that works alike for one process, `torchrun`, and Ray Train workers."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(use_gpu: bool) -> DistInfo:
    """Join (or create) the process group DeepSpeed will use.

    Ray Train workers (harness.launch.ray_backend) and torchrun have set RANK/WORLD_SIZE/MASTER_*;
    a lone process gets a one-rank group on a free local port. gloo on CPU, nccl on GPUs.
    """
    cuda = use_gpu and torch.cuda.is_available()
    if not cuda:
        # DeepSpeed picks its accelerator at import; without this it may probe for CUDA.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if not dist.is_initialized() and "RANK" not in os.environ:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0", WORLD_SIZE="1",
                          LOCAL_RANK="0", LOCAL_WORLD_SIZE="1")
    import deepspeed

    if not cuda:
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (about a minute the first
        # time, a second or two to load after): CPU runs are tests and smoke studies, gloo is enough.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        # Under Ray each worker sees only its own GPU(s); under torchrun all of them.
        index = local_rank if torch.cuda.device_count() > local_rank else 0
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return DistInfo(rank, world, local_rank, device)


def broadcast_object(obj, src: int = 0):
    """rank `src`'s object on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
