"""The process group of a multi-process run (``accelerate launch``, ``torchrun``): start it from the launcher's
environment, and move Python objects between the processes."""

from __future__ import annotations

import os
from typing import Any

import torch

__all__ = [
    "all_gather", "broadcast_from_main", "gather_to_main", "init_from_environment", "process_index", "setup_device",
]


def process_index() -> tuple[int, int]:
    """``(rank, world_size)`` of the running process group, ``(0, 1)`` without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def setup_device(device: str | None) -> torch.device:
    """The device of this process: ``device`` if given (``cuda`` becomes ``cuda:LOCAL_RANK`` in a multi-process run),
    else ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", local_rank)
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    return resolved


def init_from_environment(device: torch.device) -> tuple[int, int]:
    """Joins the process group a launcher describes (``WORLD_SIZE`` > 1, ``RANK``, ``MASTER_ADDR``/``MASTER_PORT``:
    what ``torchrun`` and ``accelerate launch`` set), with NCCL on CUDA and gloo on the CPU. Returns
    ``(rank, world_size)``; ``(0, 1)`` for a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        torch.distributed.init_process_group(backend=backend, **kwargs)
    return process_index()


def all_gather(value: Any) -> list[Any]:
    """Every process's ``value`` (picklable), in rank order, on every process; ``[value]`` without a process group."""
    rank, world_size = process_index()
    if world_size == 1:
        return [value]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def broadcast_from_main(value: Any) -> Any:
    """Rank 0's ``value`` on every process (the others' ``value`` is ignored)."""
    rank, world_size = process_index()
    if world_size == 1:
        return value
    box = [value if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_main(value: Any) -> list[Any] | None:
    """Every process's ``value`` (picklable), in rank order, on rank 0; ``None`` on the other ranks."""
    rank, world_size = process_index()
    if world_size == 1:
        return [value]
    gathered: list[Any] | None = [None] * world_size if rank == 0 else None
    torch.distributed.gather_object(value, gathered, dst=0)
    return gathered
