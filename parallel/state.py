"""This process's tensor-parallel group on torch.distributed.

Rank layout (ready for pipeline stages): world = tp x pp, global rank = stage * tp + tp_rank, so each TP group
is `tp` consecutive ranks inside one stage. Only pp = 1 exists today, so the TP group is the whole world."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TPGroup:
    rank: int  # rank inside the TP group
    size: int
    group: object | None = None  # torch.distributed ProcessGroup; None when size == 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., n * size], rank order."""
        if self.size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int) -> int:
        """The smallest of every rank's value (ranks must agree on e.g. the KV cache's block count)."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.group)
        return int(t.item())


_TP = TPGroup(0, 1)


def get_tp_group() -> TPGroup:
    return _TP


def init_distributed(
    rank: int, world_size: int, tensor_parallel_size: int, init_method: str, device: torch.device,
    timeout_s: float = 600.0,
) -> TPGroup:
    """Join the world (gloo on CPU, NCCL on CUDA) and form this rank's TP group."""
    global _TP
    if world_size != tensor_parallel_size:
        raise ValueError(f"world size {world_size} != tensor_parallel_size {tensor_parallel_size}: only pp = 1 is built")
    if world_size == 1:
        _TP = TPGroup(0, 1)
        return _TP
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    _TP = TPGroup(rank % tensor_parallel_size, tensor_parallel_size, dist.group.WORLD)
    return _TP


def init_from_torchrun_env(tensor_parallel_size: int, device: torch.device) -> TPGroup:
    """external_launcher: torchrun set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT for every rank."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"distributed_executor_backend='external_launcher' needs the torchrun environment; {missing} not set. "
            "Start the script with `torchrun --nproc-per-node N script.py`, or use distributed_executor_backend='mp'"
        )
    world = int(os.environ["WORLD_SIZE"])
    if world != tensor_parallel_size:
        raise ValueError(
            f"torchrun started WORLD_SIZE={world} ranks but tensor_parallel_size={tensor_parallel_size}; make them equal"
        )
    return init_distributed(int(os.environ["RANK"]), world, tensor_parallel_size, "env://", device)


def destroy_distributed() -> None:
    global _TP
    _TP = TPGroup(0, 1)
    if dist.is_initialized():
        dist.destroy_process_group()
