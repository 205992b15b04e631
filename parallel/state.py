"""This process's place in the torch.distributed world: its tensor-parallel group and its pipeline stage.

Rank layout: world = tp x pp, global rank = stage * tp + tp_rank. Each TP group is the `tp` consecutive ranks of
one stage (its own `new_group`); stage s's tp-rank r hands its hidden states to rank (s + 1) * tp + r, the same
tp-rank of the next stage (every TP rank holds the whole hidden state after its all-reduce). The last stage's
tp-rank 0, global rank (pp - 1) * tp, is the one that returns logits to the driver."""
from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
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
            _blocking(lambda: dist.all_reduce(tensor, group=self.group), tensor)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., n * size], rank order."""
        if self.size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        _blocking(lambda: dist.all_gather(parts, tensor, group=self.group), tensor, *parts)
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int) -> int:
        """The smallest of every rank's value in this group."""
        return _min_int(value, self.size, self.group)


@dataclass(frozen=True)
class PPGroup:
    """This rank's pipeline stage and its point-to-point neighbours (global ranks)."""

    stage: int
    size: int  # number of stages
    tp_size: int = 1
    tp_rank: int = 0
    logits_to_every_rank: bool = False  # external_launcher: every rank samples, so every rank needs the logits

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.size - 1

    @property
    def rank(self) -> int:
        return self.stage * self.tp_size + self.tp_rank

    @property
    def output_rank(self) -> int:
        """The last stage's tp-rank 0: it returns the logits (or pooled outputs) to the driver."""
        return (self.size - 1) * self.tp_size

    def send_next(self, tensor: torch.Tensor) -> None:
        tensor = tensor.contiguous()
        _blocking(lambda: dist.send(tensor, dst=self.rank + self.tp_size), tensor)

    def recv_prev(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        out = torch.empty(shape, dtype=dtype, device=device)
        _blocking(lambda: dist.recv(out, src=self.rank - self.tp_size), out)
        return out

    def broadcast_from_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """The last stage's tensor on every rank of the world (same shape and dtype everywhere)."""
        tensor = tensor.contiguous()
        _blocking(lambda: dist.broadcast(tensor, src=self.output_rank), tensor)
        return tensor


def _blocking(call: Callable[[], object], *tensors: torch.Tensor) -> None:
    """Run a blocking torch.distributed call on `tensors`; on CPU, return only once gloo let go of them.

    Gloo runs a collective on a worker thread, which wakes the caller first and drops its own references to the
    tensors after. When that is the last reference (the caller has already dropped its temporaries), dropping it
    takes the GIL to free the tensor's Python object; if the interpreter is finalizing by then (a rank exiting
    right after its last step, the worker thread held back by load), the thread is killed inside a destructor:
    std::terminate, SIGABRT, and the peer rank waits on a dead one. So wait, the GIL released, until each
    tensor's C++ reference count is back where it was (microseconds; bounded, in case another owner appears)."""
    # not for CUDA: NCCL holds its tensors until the stream is done, never wait for that
    if tensors[0].device.type != "cpu" or not hasattr(torch.Tensor, "_use_count"):  # (a private torch method)
        call()
        return
    counts = [t._use_count() for t in tensors]
    call()
    deadline = time.monotonic() + _RELEASE_WAIT_S
    while any(t._use_count() > n for t, n in zip(tensors, counts)) and time.monotonic() < deadline:
        time.sleep(0)  # releases the GIL: the worker thread may need it to drop its references


_RELEASE_WAIT_S = 1.0
_TP = TPGroup(0, 1)
_PP = PPGroup(0, 1)


def get_tp_group() -> TPGroup:
    return _TP


def get_pp_group() -> PPGroup:
    return _PP


def world_min_int(value: int) -> int:
    """The smallest of every rank's value in the world (all stages must agree on the KV cache's block count)."""
    size = dist.get_world_size() if dist.is_initialized() else 1
    return _min_int(value, size, None)


def _min_int(value: int, size: int, group) -> int:
    if size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    _blocking(lambda: dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group), t)
    return int(t.item())


def init_distributed(
    rank: int, world_size: int, tensor_parallel_size: int, init_method: str, device: torch.device,
    timeout_s: float = 600.0, logits_to_every_rank: bool = False,
) -> TPGroup:
    """Join the world (gloo on CPU, NCCL on CUDA), form the TP group of every stage and take this rank's."""
    global _TP, _PP
    tp = tensor_parallel_size
    if tp < 1 or world_size % tp:
        raise ValueError(f"world size {world_size} is not a multiple of tensor_parallel_size {tp} (world = tp x pp)")
    pp = world_size // tp
    if world_size == 1:
        _TP, _PP = TPGroup(0, 1), PPGroup(0, 1)
        return _TP
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend, init_method=init_method, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    stage, tp_rank = divmod(rank, tp)
    group = dist.group.WORLD if pp == 1 else None
    if pp > 1 and tp > 1:  # every rank creates every stage's group, in the same order (new_group is collective)
        for s in range(pp):
            created = dist.new_group(list(range(s * tp, (s + 1) * tp)))
            group = created if s == stage else group
    _TP = TPGroup(tp_rank, tp, group if tp > 1 else None)
    _PP = PPGroup(stage, pp, tp, tp_rank, logits_to_every_rank)
    return _TP


def init_from_torchrun_env(tensor_parallel_size: int, device: torch.device, pipeline_parallel_size: int = 1) -> TPGroup:
    """external_launcher: torchrun set RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT for every rank."""
    missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RuntimeError(
            f"distributed_executor_backend='external_launcher' needs the torchrun environment; {missing} not set. "
            "Start the script with `torchrun --nproc-per-node N script.py`, or use distributed_executor_backend='mp'"
        )
    world = int(os.environ["WORLD_SIZE"])
    expected = tensor_parallel_size * pipeline_parallel_size
    if world != expected:
        raise ValueError(
            f"torchrun started WORLD_SIZE={world} ranks but tensor_parallel_size={tensor_parallel_size} x "
            f"pipeline_parallel_size={pipeline_parallel_size} = {expected}; make them equal"
        )
    return init_distributed(int(os.environ["RANK"]), world, tensor_parallel_size, "env://", device,
                            logits_to_every_rank=True)


def destroy_distributed() -> None:
    global _TP, _PP
    _TP, _PP = TPGroup(0, 1), PPGroup(0, 1)
    if dist.is_initialized():
        dist.destroy_process_group()
