"""One rank as a Ray actor (made by RayExecutor): the same start_rank / run_command as an mp worker,
served as actor methods instead of over a pipe. Ray places the actor; torch.distributed (gloo / NCCL) moves tensors.

Plain class here; RayExecutor wraps it with ray.remote, so this module imports without Ray."""
from __future__ import annotations

import os
import socket
import threading
from typing import Any

import cloudpickle
import torch

from hfbridge.parallel.state import destroy_distributed
from hfbridge.worker.mp_worker import run_command, start_rank


class RankWorker:
    # The "watch" group's one thread serves watch() beside the default thread that runs steps.
    CONCURRENCY_GROUPS = {"watch": 1}

    def __init__(self, threads: int):
        torch.set_num_threads(threads)
        self.rank = -1
        self.executor = None
        self._stopped = threading.Event()

    def address(self) -> tuple[str, int]:
        """This node's IP and a free port on it (asked of rank 0: the world's rendezvous point)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            return ray.util.get_node_ip_address(), s.getsockname()[1]

    def node_ip(self) -> str:
        import ray

        return ray.util.get_node_ip_address()

    def pid(self) -> int:
        return os.getpid()

    def start(self, rank: int, world_size: int, init_method: str, config_bytes: bytes) -> int:
        """Join the world, load this rank's shard -> the KV cache's block count (agreed by every rank)."""
        self.rank = rank
        self.executor = start_rank(rank, world_size, init_method, cloudpickle.loads(config_bytes))
        return self.executor.num_blocks

    def run(self, kind: str, payload: Any) -> tuple[bool, Any]:
        """One driver command -> (does this rank reply?, value); run_command decides which ranks reply."""
        reply, value = run_command(self.rank, self.executor, kind, payload)
        return reply, value if reply else None

    def watch(self) -> None:
        """Returns only at stop(): while the actor lives its result stays pending, so the driver learns of the
        actor's death by waiting on it (the process sentinel of the mp executor)."""
        self._stopped.wait()

    def stop(self) -> None:
        if self.executor is not None:
            self.executor.shutdown()
            destroy_distributed()
        self._stopped.set()
