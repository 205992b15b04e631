"""Prometheus metrics in the text exposition format, under vLLM's `vllm:` names so existing dashboards work.

Latencies are measured where the client feels them: from the moment the route received the request to the
moment an output reached the route (the engine thread's queueing and the hand-off to the event loop
included). Engine gauges and token counters are read from the engine when scraped.
"""
from __future__ import annotations

import bisect
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)


@dataclass
class Histogram:
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)  # per bucket, not cumulative
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.count += 1


class ServerMetrics:
    def __init__(self) -> None:
        self.model_name = ""
        self.ttft = Histogram(_TTFT_BUCKETS)
        self.itl = Histogram(_ITL_BUCKETS)
        self.e2e = Histogram(_E2E_BUCKETS)
        self.finished: Counter[str] = Counter()  # finish_reason -> requests

    def timer(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """Times one engine request (all n samples of a prompt): first token, gaps between outputs, the end."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.arrival = time.perf_counter()
        self.last: float | None = None
        self.done = False  # counted once in request_success_total, whichever path ends it first

    def on_output(self, num_new_tokens: int, finish_reason: str | None) -> None:
        now = time.perf_counter()
        if num_new_tokens:
            if self.last is None:
                self.metrics.ttft.observe(now - self.arrival)
            else:
                self.metrics.itl.observe(now - self.last)
            self.last = now
        if finish_reason is not None and not self.done:
            self.done = True
            self.metrics.e2e.observe(now - self.arrival)
            self.metrics.finished[finish_reason] += 1


def render(metrics: ServerMetrics, engine: Any | None) -> str:
    """The /metrics page; `engine` is the LLMEngine (None while loading: gauges are then absent)."""
    labels = {"model_name": metrics.model_name}
    out: list[str] = []
    if engine is not None:
        kv = engine.kv_cache_manager
        _sample(out, "vllm:num_requests_running", "gauge", "Requests in the running batch.", labels,
                engine.scheduler.num_running)
        _sample(out, "vllm:num_requests_waiting", "gauge", "Requests waiting to be scheduled.", labels,
                engine.scheduler.num_waiting)
        _sample(out, "vllm:kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 = full).", labels,
                kv.usage())
        _sample(out, "hfbridge:kv_cache_used_blocks", "gauge", "KV-cache blocks held by requests.", labels,
                kv.pool.num_blocks - kv.num_free_blocks)
        _sample(out, "hfbridge:kv_cache_total_blocks", "gauge", "KV-cache blocks in all.", labels, kv.pool.num_blocks)
        _sample(out, "hfbridge:compiling", "gauge", "1 while torch.compile warms up in the background (steps run eagerly).",
                labels, int(engine.is_compiling()))
        _sample(out, "vllm:prompt_tokens_total", "counter", "Prompt tokens received.", labels,
                engine.stats.num_prompt_tokens)
        _sample(out, "vllm:generation_tokens_total", "counter", "Tokens generated.", labels,
                engine.stats.num_generation_tokens)
        _sample(out, "vllm:num_preemptions_total", "counter", "Requests preempted for lack of KV blocks.", labels,
                engine.scheduler.num_preemptions)
        _sample(out, "vllm:prefix_cache_queries_total", "counter", "Tokens looked up in the prefix cache.", labels,
                kv.stats.queried_tokens)
        _sample(out, "vllm:prefix_cache_hits_total", "counter", "Tokens found in the prefix cache.", labels,
                kv.stats.hit_tokens)
        parallel = engine.config.parallel_config
        _sample(out, "hfbridge:parallel_world_size", "gauge", "Ranks serving the model (tp x pp).",
                {**labels, "tensor_parallel_size": str(parallel.tensor_parallel_size)}, parallel.world_size)
    out.append("# HELP vllm:request_success_total Finished requests, by finish reason.")
    out.append("# TYPE vllm:request_success_total counter")
    for reason in sorted(set(metrics.finished) | {"stop", "length", "abort", "error"}):
        out.append(f"vllm:request_success_total{_labels({**labels, 'finished_reason': reason})} "
                   f"{metrics.finished[reason]}")
    _histogram(out, "vllm:time_to_first_token_seconds", "Time to first token.", labels, metrics.ttft)
    _histogram(out, "vllm:inter_token_latency_seconds", "Time between outputs of a request.", labels, metrics.itl)
    _histogram(out, "vllm:e2e_request_latency_seconds", "Request latency, arrival to finish.", labels, metrics.e2e)
    return "\n".join(out) + "\n"


def _labels(labels: dict[str, str]) -> str:
    def escape(value: str) -> str:
        return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    return "{" + ",".join(f'{k}="{escape(str(v))}"' for k, v in labels.items()) + "}"


def _sample(out: list[str], name: str, kind: str, help_text: str, labels: dict[str, str], value: float) -> None:
    out += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name}{_labels(labels)} {float(value)!r}"]


def _histogram(out: list[str], name: str, help_text: str, labels: dict[str, str], hist: Histogram) -> None:
    out += [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
    cumulative = 0
    for bound, count in zip((*hist.buckets, float("inf")), hist.counts):
        cumulative += count
        le = "+Inf" if bound == float("inf") else repr(bound)
        out.append(f"{name}_bucket{_labels({**labels, 'le': le})} {cumulative}")
    out.append(f"{name}_sum{_labels(labels)} {hist.total!r}")
    out.append(f"{name}_count{_labels(labels)} {hist.count}")
