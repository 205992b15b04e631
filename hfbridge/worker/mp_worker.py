"""The body of one worker process, one rank of tp x pp (started by MultiprocExecutor).

It joins the torch.distributed world, loads its shard through the ordinary InProcessExecutor (which sees the TP
group and the pipeline stage: its layers, its KV cache), then serves the driver's requests over its pipe:
("execute", SchedulerOutput) runs the forward on every rank at once, stages handing hidden states on (the output
rank, the last stage's tp-rank 0, returns the gathered logits, or the pooled outputs), ("apply", cloudpickled fn) returns fn(model) from
every rank, ("add_lora", LoRARequest) / ("remove_lora", id) load or drop a LoRA adapter on every rank (a bad adapter
is a reply, not a dead worker), ("shutdown", None) leaves. Importable by module path, so starting a worker never needs
the user's __main__."""
from __future__ import annotations

import dataclasses
import os
import select
import signal
import threading
import time
import traceback
from typing import Any

import cloudpickle
import torch

from hfbridge.parallel.state import destroy_distributed, get_pp_group, init_distributed
from hfbridge.worker.executor import InProcessExecutor
from hfbridge.worker.step_plan import StepPlan, reply_for


def _die_with_parent(parent_pid: int) -> None:
    """No orphans: a watchdog thread exits this worker once the driver process is gone (even a SIGKILLed one).
    The driver is not this process's OS parent (the fork server is), so it is watched by pid: through a pidfd where
    the OS has them (readable once that process exits), else by polling. Not PR_SET_PDEATHSIG: that fires when the
    parent *thread* ends, and engines are built in loader threads."""
    try:
        pidfd = os.pidfd_open(parent_pid)
    except ProcessLookupError:
        os._exit(1)
    except (AttributeError, OSError):  # not Linux >= 5.3
        pidfd = None

    def alive() -> bool:
        try:
            os.kill(parent_pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def watch() -> None:
        if pidfd is not None:
            select.select([pidfd], [], [])
        else:
            while alive():
                time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="hfbridge-parent-watch").start()


def _error(exc: BaseException) -> tuple[str, Any]:
    try:
        cloudpickle.dumps(exc)
        return "error", (exc, traceback.format_exc())
    except Exception:
        return "error", (RuntimeError(f"{type(exc).__name__}: {exc}"), traceback.format_exc())


def start_rank(rank: int, world_size: int, init_method: str, config) -> InProcessExecutor:
    """Join the world and load this rank's shard (shared by the mp and ray executors)."""
    if config.device.type == "cuda":  # one device per rank
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        config = dataclasses.replace(config, device=device)
    init_distributed(rank, world_size, config.parallel_config.tensor_parallel_size, init_method, config.device)
    return InProcessExecutor(config)


def run_command(rank: int, executor: InProcessExecutor, kind: str, payload: Any) -> tuple[bool, Any]:
    """One driver command on this rank -> (reply?, value). Only the output rank (the last pipeline stage's
    tp-rank 0, ParallelConfig.output_rank; rank 0 when pp = 1) replies to "execute"; every rank replies to
    "apply". A generation step comes as a StepPlan (step_plan.py), applied to this rank's copies of the requests."""
    runner = executor.runner
    if kind == "execute":
        for compiling in executor.compiling:  # a background compile waits while requests run
            compiling.hold_for_step()
        is_output = rank == get_pp_group().output_rank
        if isinstance(payload, StepPlan):
            scheduled = executor.rank_requests.apply(payload)
            logits, step = runner.compute_logits(scheduled)  # [N, V], gathered: identical across the TP group
            return is_output, reply_for(logits, len(step.sample_requests), payload.argmax_rows) if is_output else None
        return is_output, runner.execute(payload)
    if kind == "apply":
        return True, cloudpickle.loads(payload)(runner.model)
    if kind in ("add_lora", "remove_lora"):  # an adapter that cannot be served is an answer, not a dead worker
        try:
            return True, getattr(executor, kind)(payload)
        except ValueError as exc:
            return True, exc
    raise ValueError(f"unknown worker command {kind!r}")


def worker_main(rank: int, world_size: int, init_method: str, config_bytes: bytes, conn, threads: int,
                parent_pid: int, environ: dict[str, str]) -> None:
    _die_with_parent(parent_pid)
    os.environ.clear()  # the driver's environment now, as a spawned worker would see it (not the fork server's)
    os.environ.update(environ)
    # Ctrl-C reaches the whole process group: the driver decides (it stops us), workers do not die mid-collective.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(threads)
    try:
        executor = start_rank(rank, world_size, init_method, cloudpickle.loads(config_bytes))
        conn.send(("ok", executor.num_blocks))
    except BaseException as exc:  # noqa: BLE001 - every failure goes to the driver, which raises it
        conn.send(_error(exc))
        return
    _serve(rank, executor, conn)
    executor.shutdown()
    destroy_distributed()


def _serve(rank: int, executor: InProcessExecutor, conn) -> None:
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):  # the driver is gone
            return
        if kind == "shutdown":
            return
        try:
            reply, value = run_command(rank, executor, kind, payload)
            if reply:
                conn.send(("ok", value))
        except BaseException as exc:  # noqa: BLE001
            conn.send(_error(exc))
            return
