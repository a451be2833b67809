"""The backend config a sweep hands to Ray Train's TorchTrainer: torchrun's rendezvous, DeepSpeed's group.

Ray's own TorchConfig creates the torch process group in every worker, and DeepSpeed then adopts it.
Two costs come with it, both paid again for every trial because Ray Train starts fresh processes
per fit: its controller actor imports torch just to unpickle the TorchConfig (about 2.5 s of CPU
before the workers are even asked for), and the workers import torch before the training function
can start. This backend only publishes what torchrun would (MASTER_ADDR/PORT, RANK, WORLD_SIZE,
LOCAL_RANK, ...) and leaves `deepspeed.init_distributed` to build the group from them — the way
DeepSpeed is launched everywhere else. This module must not import torch: the controller loads it.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import ray
from ray.train.backend import Backend, BackendConfig

from harness.common.net import free_port


@dataclass
class DeepSpeedRendezvous(BackendConfig):
    """`backend` (gloo on CPU, nccl on GPU) is what TorchTrainer reads; DeepSpeed gets the same choice
    from `harness.common.process_group.setup_distributed`."""

    backend: str = "gloo"

    @property
    def backend_cls(self):
        return _RendezvousBackend

    @property
    def framework(self):
        from ray.train.v2._internal.util import TrainingFramework

        return TrainingFramework.TORCH  # for Ray's run-state export, when that is turned on


def _node_address() -> str:
    return ray.util.get_node_ip_address()


def _publish(master_addr: str, master_port: int) -> None:
    """torchrun's variables, from this worker's Ray Train context."""
    ctx = ray.train.get_context()
    os.environ.update(
        MASTER_ADDR=master_addr, MASTER_PORT=str(master_port),
        RANK=str(ctx.get_world_rank()), WORLD_SIZE=str(ctx.get_world_size()),
        LOCAL_RANK=str(ctx.get_local_rank()), LOCAL_WORLD_SIZE=str(ctx.get_local_world_size()),
        NODE_RANK=str(ctx.get_node_rank()),
    )


def _leave_group() -> None:
    """Destroy the group a training function left behind (a failed one), so a retry can rejoin."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


class _RendezvousBackend(Backend):
    share_cuda_visible_devices: bool = True  # as Ray's torch backend: local GPUs visible to all ranks

    def on_start(self, worker_group, backend_config: DeepSpeedRendezvous) -> None:
        # The store listens on rank 0's node address, or on loopback when every worker is on that node
        # (harness.common.process_group binds it to MASTER_ADDR only: nothing else on the network sees it).
        addresses = worker_group.execute(_node_address)
        address = "127.0.0.1" if len(set(addresses)) == 1 else addresses[0]
        port = worker_group.execute_single(0, free_port, address)
        worker_group.execute(_publish, address, port)

    def on_shutdown(self, worker_group, backend_config: DeepSpeedRendezvous) -> None:
        try:
            ray.get(worker_group.execute_async(_leave_group), timeout=30)
        except Exception:  # workers already gone: nothing to leave
            pass
