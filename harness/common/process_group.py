"""Process-group set-up that works alike for one process, `torchrun`, and Ray Train workers.

What listens, and where (the store is unauthenticated, so it listens only where the group needs it):
- one process (world size 1): no store socket at all (an in-memory HashStore); gloo's own transport
  (and NCCL's bootstrap) bound to the loopback interface;
- several processes on one node (MASTER_ADDR a loopback address, as harness.launch.ray_backend
  publishes for a single-node worker group and torchrun's default): rank 0's TCPStore on that
  loopback address only, gloo/NCCL on loopback;
- several nodes: rank 0's TCPStore on MASTER_ADDR only (the node's address), never on all interfaces;
- torchrun with its agent's store (TORCHELASTIC_USE_AGENT_STORE): torchrun's own store, joined as a client.
GLOO_SOCKET_IFNAME / NCCL_SOCKET_IFNAME set by the user are left alone.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from harness.common.net import free_port


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _loopback_interface() -> str:
    """The name of the loopback network interface (`lo` on Linux)."""
    try:
        for _, name in socket.if_nameindex():
            if name.startswith("lo"):
                return name
    except OSError:
        pass
    return "lo"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@contextlib.contextmanager
def _transport_on_loopback(single_node: bool):
    """gloo binds its transport when the group is created, NCCL when it first communicates: on one node
    both go to the loopback interface (unless the user chose an interface)."""
    if not single_node or "GLOO_SOCKET_IFNAME" in os.environ:
        yield
        return
    os.environ.setdefault("NCCL_SOCKET_IFNAME", _loopback_interface())
    os.environ["GLOO_SOCKET_IFNAME"] = _loopback_interface()
    try:
        yield
    finally:
        os.environ.pop("GLOO_SOCKET_IFNAME", None)


def _tcp_store(host: str, port: int, rank: int, world: int, timeout):
    """The group's store: rank 0 serves it on `host` only (a socket bound to that address, handed to the
    TCPStore), the others connect to it."""
    if rank != 0:
        return dist.TCPStore(host, port, world, False, timeout)
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    listener = socket.socket(family, kind, proto)
    try:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(address)
        listener.listen(max(128, world))
    except OSError:
        listener.close()
        raise
    return dist.TCPStore(host, port, world, True, timeout, wait_for_workers=False, master_listen_fd=listener.detach())


def _init_group(backend: str, device: torch.device | None) -> None:
    """The default process group, built here rather than by torch's env:// rendezvous (whose TCPStore
    listens on every interface); DeepSpeed then adopts it."""
    from deepspeed.constants import default_pg_timeout

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    single_node = world == 1 or _is_loopback(host)
    kwargs = {"timeout": default_pg_timeout}
    if device is not None and world > 1:
        kwargs["device_id"] = device  # as DeepSpeed does for nccl (eager communicator, bound device)
    with _transport_on_loopback(single_node):
        if world == 1:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
        elif os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
            dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world, **kwargs)
        else:
            store = _tcp_store(host, int(os.environ["MASTER_PORT"]), rank, world, default_pg_timeout)
            dist.init_process_group(backend, store=store, rank=rank, world_size=world, **kwargs)


def setup_distributed(use_gpu: bool) -> DistInfo:
    """Join (or create) the process group DeepSpeed will use.

    Ray Train workers (harness.launch.ray_backend) and torchrun have set RANK/WORLD_SIZE/MASTER_*;
    a lone process gets a one-rank group. gloo on CPU, nccl on GPUs. The group is created here with a
    store that listens only where the group needs it (see the module docstring); DeepSpeed adopts it.
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
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if cuda:
        # Under Ray each worker sees only its own GPU(s); under torchrun all of them.
        index = local_rank if torch.cuda.device_count() > local_rank else 0
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        _init_group("nccl" if cuda else "gloo", device if cuda else None)
    deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    return DistInfo(rank, world, local_rank, device)


def broadcast_object(obj, src: int = 0):
    """rank `src`'s object on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
