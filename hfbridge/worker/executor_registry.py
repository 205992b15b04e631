"""distributed_executor_backend name -> the executor class the engine builds (vLLM's names)."""
from __future__ import annotations

from hfbridge.config import EngineConfig
from hfbridge.worker.executor import Executor, InProcessExecutor


def _multiproc(config: EngineConfig) -> Executor:
    from hfbridge.worker.mp_executor import MultiprocExecutor

    return MultiprocExecutor(config)


def _ray(config: EngineConfig) -> Executor:
    from hfbridge.worker.ray_executor import RayExecutor

    return RayExecutor(config)


EXECUTORS = {
    "uni": InProcessExecutor,  # one process, one device
    "external_launcher": InProcessExecutor,  # one rank of a torchrun world: the whole engine runs on every rank
    "mp": _multiproc,  # one spawned worker per rank on this machine
    "ray": _ray,  # one Ray actor per rank, anywhere on a Ray cluster (pip install 'hfbridge[ray]')
}


def build_executor(config: EngineConfig) -> Executor:
    backend = config.parallel_config.distributed_executor_backend
    if backend not in EXECUTORS:
        raise ValueError(f"distributed_executor_backend={backend!r} has no executor; use one of {sorted(EXECUTORS)}")
    return EXECUTORS[backend](config)
