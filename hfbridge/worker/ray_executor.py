"""`ray`: one actor per rank (tp x pp), placed by Ray on an existing cluster; torch.distributed between them.

vLLM's layout: ray.init() joins the cluster named by RAY_ADDRESS, else the one running on this machine, else starts
a local one; a placement group reserves one bundle per rank (PACK: as few nodes as fit); the ranks are numbered by
node (the driver's node first) so a node's ranks are consecutive; rank 0's node IP and a free port there are the
tcp:// rendezvous. Each step's deltas (step_plan.py) go to every actor as one object in Ray's store; the output
rank (the one run_command names) returns what the sampler needs and the driver samples (DriverSampler, as for
mp). A dead actor raises WorkerDiedError at once, and check_health reports it (the server's /ready turns 503).

Every node needs hfbridge (and the model's files at the same path, or a hub name) installed."""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import cloudpickle
import torch

from hfbridge.config import EngineConfig
from hfbridge.core.scheduler_output import ModelRunnerOutput, SchedulerOutput
from hfbridge.model.model_loader import check_pp_plan, check_tp_plan
from hfbridge.worker.driver_sampling import DriverSampler
from hfbridge.worker.mp_executor import WorkerDiedError, _pickle_remote_code_by_value
from hfbridge.worker.ray_worker import RankWorker

logger = logging.getLogger(__name__)

# Forwarded to the actors (on other nodes they would not inherit the driver's environment).
FORWARDED_ENV_PREFIXES = ("HFBRIDGE_", "HF_", "TRANSFORMERS_")


def import_ray():
    # Ray's failure signal handler (installed at import) would turn the server's SIGTERM, a graceful stop, into
    # an abort; off unless the user chose otherwise (or imported Ray first).
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    try:
        import ray
    except ImportError:
        raise ImportError(
            "distributed_executor_backend='ray' needs Ray: pip install 'hfbridge[ray]'; or use 'mp' (one machine) "
            "or 'external_launcher' (torchrun)"
        ) from None
    return ray


def init_ray(ray) -> None:
    """ray.init(): RAY_ADDRESS, else this machine's running cluster, else a new local one. A local cluster's
    processes die with the *thread* that started them (Ray sets PR_SET_PDEATHSIG), and engines are often built in
    a loader thread that ends: outside the main thread, start it from a thread that lives as long as the process."""
    if threading.current_thread() is threading.main_thread():
        ray.init()
        return
    done: queue.Queue = queue.Queue()

    def keep() -> None:
        try:
            ray.init()
            done.put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            done.put(exc)
            return
        threading.Event().wait()  # never returns: the cluster's processes live while this thread does

    threading.Thread(target=keep, name="hfbridge-ray-cluster", daemon=True).start()
    error = done.get()
    if error is not None:
        raise error


def per_worker_cpus() -> float:
    """CPUs Ray reserves per rank: HFBRIDGE_RAY_PER_WORKER_CPUS (default 1; vLLM's VLLM_RAY_PER_WORKER_GPUS twin)."""
    value = os.environ.get("HFBRIDGE_RAY_PER_WORKER_CPUS", "1")
    try:
        cpus = float(value)
    except ValueError:
        cpus = -1.0
    if cpus <= 0:
        raise ValueError(f"HFBRIDGE_RAY_PER_WORKER_CPUS={value!r} must be a positive number of CPUs")
    return cpus


def _stop(ray, actors: list, placement_group) -> None:
    if not ray.is_initialized():  # Ray's own atexit shutdown ran first: the actors went with it
        return
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 - already dead
            pass
    try:
        ray.util.remove_placement_group(placement_group)
    except Exception:  # noqa: BLE001
        pass


class RayExecutor:
    def __init__(self, config: EngineConfig):
        ray = self.ray = import_ray()
        self.config = config
        self.world_size = config.parallel_config.world_size
        self.timeout_s = float(os.environ.get("HFBRIDGE_WORKER_TIMEOUT", "600"))
        check_tp_plan(config.model_config, config.parallel_config.tensor_parallel_size)  # refuse before placing
        check_pp_plan(config.model_config, config.parallel_config.pipeline_parallel_size)
        _pickle_remote_code_by_value()  # remote-code classes travel by value inside the config bytes
        config_bytes = cloudpickle.dumps(config)  # our cloudpickle, not Ray's vendored copy: it knows the above
        if not ray.is_initialized():
            init_ray(ray)
        cpus = per_worker_cpus()
        bundle = {"CPU": cpus, **({"GPU": 1.0} if config.device.type == "cuda" else {})}
        self.placement_group = self._reserve(bundle)
        self.actors: list = []
        self._finalizer = weakref.finalize(self, _stop, ray, self.actors, self.placement_group)
        try:
            self._start_actors(bundle, config_bytes)
        except BaseException:
            self.shutdown()
            raise
        self.driver = DriverSampler(config)

    def _reserve(self, bundle: dict[str, float]):
        ray = self.ray
        total = ray.cluster_resources()
        short = {k: v * self.world_size for k, v in bundle.items() if total.get(k, 0) < v * self.world_size}
        if short:
            raise ValueError(
                f"{self.world_size} ranks (tp x pp) need {short} on the Ray cluster, which has "
                f"{ {k: total.get(k, 0) for k in short} }; add nodes, or lower HFBRIDGE_RAY_PER_WORKER_CPUS"
            )
        group = ray.util.placement_group([dict(bundle) for _ in range(self.world_size)], strategy="PACK")
        try:
            ray.get(group.ready(), timeout=self.timeout_s)
        except ray.exceptions.GetTimeoutError:
            ray.util.remove_placement_group(group)
            raise WorkerDiedError(
                f"Ray could not reserve {self.world_size} x {bundle} within {self.timeout_s:.0f}s "
                f"(HFBRIDGE_WORKER_TIMEOUT); free now: {ray.available_resources()}"
            ) from None
        return group

    def _start_actors(self, bundle: dict[str, float], config_bytes: bytes) -> None:
        ray = self.ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        actor_class = ray.remote(concurrency_groups=RankWorker.CONCURRENCY_GROUPS)(RankWorker)
        env = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        threads = int(os.environ.get("HFBRIDGE_WORKER_THREADS", "0")) or max(1, int(bundle["CPU"]))
        actors = [
            actor_class.options(
                num_cpus=bundle["CPU"], num_gpus=bundle.get("GPU", 0), runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self.placement_group, placement_group_bundle_index=i, placement_group_capture_child_tasks=True),
            ).remote(threads)
            for i in range(self.world_size)
        ]
        self.actors.extend(actors)  # the finalizer's list: killed even if the start fails below
        driver_ip = ray.util.get_node_ip_address()
        ips = self._get([a.node_ip.remote() for a in actors], "report its node")
        order = sorted(range(self.world_size), key=lambda i: (ips[i] != driver_ip, ips[i]))
        self.actors[:] = [actors[i] for i in order]  # rank r is self.actors[r]
        self.sentinels = [a.watch.options(concurrency_group="watch").remote() for a in self.actors]
        ip, port = self._get([self.actors[0].address.remote()], "report its address")[0]
        init_method = f"tcp://{ip}:{port}"
        self.num_blocks = self._get(
            [a.start.remote(rank, self.world_size, init_method, config_bytes) for rank, a in enumerate(self.actors)],
            "load its shard",
        )[0]
        logger.info("Started %d tensor-parallel Ray actors (rendezvous %s, nodes %s)",
                    self.world_size, init_method, sorted(set(ips)))

    def _get(self, refs: list, doing: str) -> list[Any]:
        """Every ref's value, in order; stops at the first failure or actor death instead of hanging."""
        ray, pending = self.ray, list(refs)
        sentinels = getattr(self, "sentinels", [])
        deadline = time.monotonic() + self.timeout_s
        while pending:
            ready, _ = ray.wait(pending + sentinels, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                self.shutdown()
                raise WorkerDiedError(
                    f"a tensor-parallel Ray actor did not {doing} within {self.timeout_s:.0f}s "
                    "(HFBRIDGE_WORKER_TIMEOUT); the actors were stopped"
                )
            if ready[0] in sentinels:
                rank = sentinels.index(ready[0])
                self.shutdown()
                raise WorkerDiedError(f"tensor-parallel worker {rank} (Ray actor) died; the engine stopped")
            self._raise_if_failed(ready[0], refs.index(ready[0]))
            pending.remove(ready[0])
        return ray.get(list(refs))

    def _raise_if_failed(self, ref, index: int) -> None:
        ray = self.ray
        try:
            ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # the rank raised: re-raise its own exception, as mp does
            self.shutdown()
            cause = getattr(exc, "cause", None)
            if isinstance(cause, BaseException):
                raise cause from WorkerDiedError(f"tensor-parallel worker {index} failed:\n{exc}")
            raise WorkerDiedError(f"tensor-parallel worker {index} failed:\n{exc}") from exc
        except ray.exceptions.RayActorError as exc:
            self.shutdown()
            raise WorkerDiedError(f"tensor-parallel worker {index} (Ray actor) died: {exc}") from exc

    def execute(self, scheduler_output: SchedulerOutput) -> ModelRunnerOutput:
        message = self.driver.message(scheduler_output)
        return self.driver.finish(scheduler_output, message, self._call_all("execute", message)[0])

    def apply_model(self, func: Callable[[torch.nn.Module], Any]) -> list[Any]:
        return self._call_all("apply", cloudpickle.dumps(func))

    def _call_all(self, kind: str, payload: Any) -> list[Any]:
        if not self._finalizer.alive:
            raise WorkerDiedError("the tensor-parallel Ray actors were shut down")
        ref = self.ray.put(payload)  # one copy in the object store, read by every actor
        replies = self._get([a.run.remote(kind, ref) for a in self.actors], kind)
        return [value for reply, value in replies if reply]  # "execute": the one replying rank; "apply": all

    def worker_pids(self) -> list[int]:
        return self._get([a.pid.remote() for a in self.actors], "report its pid")

    def check_health(self) -> None:
        if not self._finalizer.alive:
            raise WorkerDiedError("the tensor-parallel Ray actors were shut down")
        done, _ = self.ray.wait(self.sentinels, num_returns=len(self.sentinels), timeout=0)
        if done:
            rank = self.sentinels.index(done[0])
            raise WorkerDiedError(f"tensor-parallel worker {rank} (Ray actor) died")

    def shutdown(self) -> None:
        self._finalizer()
