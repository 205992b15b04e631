"""`mp`: one worker process per rank (tp x pp) on this machine; the engine's process is the driver.

Workers start from a fork server (spawn where there is none): a clean process, started once per driver, that has
imported torch, Transformers and the worker's modules, so each engine's workers start in a fork instead of
re-importing them (seconds each on a small CPU). Like spawned ones, they import the user's __main__ again.

Each step the driver sends every worker the same message, pickled once: the per-request deltas of step_plan.py.
The workers run the sharded forward together over torch.distributed (stage after stage, hidden states handed on
point-to-point), the output rank (the last stage's tp-rank 0) sends back what the sampler needs (argmax tokens
for greedy rows, logits rows for the rest), and the driver samples (so seeded generators live in one place, as with one process). Waits watch every worker's process: a
dead worker raises WorkerDiedError at once instead of hanging, and the rest are stopped."""
from __future__ import annotations

import logging
import multiprocessing
import os
import socket
import sys
import weakref
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.reduction import ForkingPickler
from typing import Any

import cloudpickle
import torch

from hfbridge.config import EngineConfig
from hfbridge.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from hfbridge.model.model_loader import check_pp_plan, check_tp_plan
from hfbridge.worker.driver_sampling import DriverSampler

logger = logging.getLogger(__name__)


class WorkerDiedError(RuntimeError):
    """A tensor-parallel worker exited or failed; the engine cannot continue."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_threads(world_size: int) -> int:
    """Torch threads per worker: HFBRIDGE_WORKER_THREADS, else OMP_NUM_THREADS, else the cores split evenly."""
    for name in ("HFBRIDGE_WORKER_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(name, "").isdigit() and int(os.environ[name]) > 0:
            return int(os.environ[name])
    return max(1, (os.cpu_count() or 1) // world_size)


def _pickle_remote_code_by_value() -> None:
    """Remote-code classes (transformers_modules.*) are not importable in a fresh process: ship them by value."""
    for name, module in list(sys.modules.items()):
        if name.startswith("transformers_modules.") and module is not None and hasattr(module, "__file__"):
            try:
                cloudpickle.register_pickle_by_value(module)
            except ValueError:
                pass


def _stop(processes: list, conns: list) -> None:
    for conn in conns:
        try:
            conn.send(("shutdown", None))
        except (OSError, ValueError):
            pass
    for process in processes:
        process.join(timeout=5)
    for process in processes:
        if process.is_alive():
            process.kill()
            process.join(timeout=5)
    for conn in conns:
        conn.close()


def _worker_context() -> multiprocessing.context.BaseContext:
    """Never a plain fork of the driver: CUDA and the driver's threads do not survive it. The fork server is a fresh
    interpreter; its preload list only takes effect before it first starts (later calls leave it as it is)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["hfbridge.worker.mp_worker"])
    return context


class MultiprocExecutor:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.world_size = config.parallel_config.world_size
        self.timeout_s = float(os.environ.get("HFBRIDGE_WORKER_TIMEOUT", "600"))
        parallel = config.parallel_config
        check_tp_plan(config.model_config, parallel.tensor_parallel_size)  # refuse before spawning
        check_pp_plan(config.model_config, parallel.pipeline_parallel_size)
        self.output_rank = parallel.output_rank
        _pickle_remote_code_by_value()
        config_bytes = cloudpickle.dumps(config)
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        context = _worker_context()
        threads = worker_threads(self.world_size)
        self.processes, self.conns = [], []
        for rank in range(self.world_size):
            parent_conn, child_conn = context.Pipe()
            process = context.Process(
                target=_worker_entry, name=f"hfbridge-tp-worker-{rank}", daemon=True,
                args=(rank, self.world_size, init_method, config_bytes, child_conn, threads, os.getpid(),
                      dict(os.environ)),
            )
            process.start()
            child_conn.close()
            self.processes.append(process)
            self.conns.append(parent_conn)
        self._finalizer = weakref.finalize(self, _stop, self.processes, self.conns)
        self.started = False  # every worker reported in
        try:
            self.num_blocks = [self._recv(rank) for rank in range(self.world_size)][0]
            self.started = True
        except BaseException:
            self.shutdown()
            raise
        logger.info("Started %d workers (mp, tp=%d x pp=%d, %d torch threads each)", self.world_size,
                    parallel.tensor_parallel_size, parallel.pipeline_parallel_size, threads)
        self.driver = DriverSampler(config)

    def _recv(self, rank: int, errors_from_all: bool = False) -> Any:
        """Rank `rank`'s reply. errors_from_all ("execute": only the output rank replies): a message from any
        other rank is its error (a failing first stage leaves the last blocked on its hand-off), raised at once."""
        sentinels = {p.sentinel: r for r, p in enumerate(self.processes)}
        watched = list(range(self.world_size)) if errors_from_all else [rank]
        ready = wait([*(self.conns[r] for r in watched), *sentinels], timeout=self.timeout_s)
        replied = sorted((r for r in watched if self.conns[r] in ready), key=lambda r: r != rank)
        if replied:
            sender = replied[0]
            try:
                status, payload = self.conns[sender].recv()
            except (EOFError, OSError):  # its process is gone (killed): its pipe closed with it
                self.processes[sender].join(timeout=5)
                self._raise_died(sender)
            if status == "ok" and sender == rank:
                return payload
            exc, trace = payload if status != "ok" else (WorkerDiedError(f"worker {sender} replied out of turn"), "")
            self.shutdown()
            raise exc from WorkerDiedError(f"tensor-parallel worker {sender} failed:\n{trace}")
        self.shutdown()
        if not ready:
            raise WorkerDiedError(
                f"tensor-parallel worker {rank} did not answer within {self.timeout_s:.0f}s "
                "(HFBRIDGE_WORKER_TIMEOUT); the workers were stopped"
            )
        self._raise_died(sentinels[ready[0]])

    def _raise_died(self, rank: int) -> None:
        self.shutdown()
        hint = ""
        script = getattr(sys.modules.get("__main__"), "__file__", None)
        if not self.started and script is not None:  # the usual cause of a worker that dies while starting
            hint = (f". Workers are new processes that import {os.path.basename(script)} again: a script must "
                    "create the LLM under `if __name__ == \"__main__\":`, or every worker starts an engine of its own "
                    "and multiprocessing stops it while it is still bootstrapping")
        raise WorkerDiedError(
            f"tensor-parallel worker {rank} exited (code {self.processes[rank].exitcode}); the engine stopped{hint}"
        )

    def _send_all(self, message: tuple) -> None:
        """The same message to every rank, pickled once."""
        if not self._finalizer.alive:
            raise WorkerDiedError("the tensor-parallel workers were shut down")
        data = ForkingPickler.dumps(message)
        for rank, conn in enumerate(self.conns):
            try:
                conn.send_bytes(data)
            except (OSError, ValueError) as exc:
                self.shutdown()
                raise WorkerDiedError(f"tensor-parallel worker {rank} is gone: {exc}") from exc

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        message = self.driver.message(scheduler_output)
        self._send_all(("execute", message))
        return self.driver.finish(scheduler_output, message, self._recv(self.output_rank, errors_from_all=True))

    def apply_model(self, func: Callable[[torch.nn.Module], Any]) -> list[Any]:
        self._send_all(("apply", cloudpickle.dumps(func)))
        return [self._recv(rank) for rank in range(self.world_size)]

    def add_lora(self, lora_request) -> bool:
        """The adapter loaded and checked on every rank; the ranks' error (a ValueError) raised when it cannot be."""
        return self._on_every_rank(("add_lora", lora_request))

    def remove_lora(self, lora_int_id: int) -> bool:
        return self._on_every_rank(("remove_lora", lora_int_id))

    def _on_every_rank(self, message: tuple) -> Any:
        self._send_all(message)
        replies = [self._recv(rank) for rank in range(self.world_size)]
        for reply in replies:
            if isinstance(reply, BaseException):
                raise reply
        return replies[0]

    def check_health(self) -> None:
        for rank, process in enumerate(self.processes):
            if not process.is_alive():
                raise WorkerDiedError(f"tensor-parallel worker {rank} exited (code {process.exitcode})")

    def shutdown(self) -> None:
        self._finalizer()


def _worker_entry(*args) -> None:
    from hfbridge.worker.mp_worker import worker_main

    worker_main(*args)
