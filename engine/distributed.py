"""Multi-GPU through `torchrun` (DDP). A plain `engine-train` is a world of one."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier()

    @classmethod
    def from_environment(cls) -> World:
        """This process's place as torchrun describes it (RANK, LOCAL_RANK, WORLD_SIZE), without
        joining the process group: what code that runs before the group exists needs."""
        return cls(rank=int(os.environ.get("RANK", "0")), local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                   size=int(os.environ.get("WORLD_SIZE", "1")))


def init_world(device_kind: str) -> World:
    """Join the process group torchrun describes in the environment (RANK, WORLD_SIZE, ...)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        # Before anything touches the GPU: Triton launches on the *current* device and stream, and
        # NCCL picks its GPU from it, so every rank must make its own GPU current.
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device_kind == "cuda" else "gloo")
    return World(rank=dist.get_rank(), local_rank=local_rank, size=size)


def resolve_device(requested: str, local_rank: int = 0, option: str = "--device") -> torch.device:
    """'auto' -> this process's GPU when there is one, else the CPU; 'cpu'; 'cuda' or 'cuda:N'.
    ValueError naming `option` for anything else, or for CUDA on a machine without a GPU."""
    if requested not in ("auto", "cpu", "cuda") and not requested.startswith("cuda:"):
        raise ValueError(f"{option} = {requested!r}: expected auto, cpu, cuda or cuda:N")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"{option} = {requested!r}: no CUDA device is available; use cpu or auto")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device(requested) if ":" in requested else torch.device("cuda", local_rank)


def shutdown_world(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.destroy_process_group()
