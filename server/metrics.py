"""Prometheus metrics through `prometheus_client`, under vLLM's `vllm:` names and labels so existing dashboards work.

Latencies a client feels (time to first token, between tokens, end to end) are measured where it feels them: from
the moment the route received the request to the moment an output reached the route. The request's own phases
(queue, prefill, decode) come from the engine's timestamps on each RequestOutput. Engine gauges and counters are
read from the engine when scraped (a collector), so they are never stale. One registry per app: no global state.
"""
from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# vLLM's buckets
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
FINISH_REASONS = ("stop", "length", "abort", "error")


class ServerMetrics:
    def __init__(self) -> None:
        self.model_name = ""
        self.engine: Any = None  # the LLMEngine once loaded: the collector reads it when scraped
        self.registry = CollectorRegistry()

        def histogram(name: str, help_text: str, buckets: tuple) -> Histogram:
            return Histogram(name, help_text, ["model_name"], buckets=buckets, registry=self.registry)

        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between outputs of a request.", _ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to finish.", _E2E_BUCKETS)
        self.queue = histogram("vllm:request_queue_time_seconds", "Time a request waited for its first step.",
                               _E2E_BUCKETS)
        self.prefill = histogram("vllm:request_prefill_time_seconds", "First step to first token.", _E2E_BUCKETS)
        self.decode = histogram("vllm:request_decode_time_seconds", "First token to last token.", _E2E_BUCKETS)
        self.prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens of a finished request.",
                                       _TOKEN_BUCKETS)
        self.generation_tokens = histogram("vllm:request_generation_tokens", "Tokens a finished request generated.",
                                           _TOKEN_BUCKETS)
        self.success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                               ["model_name", "finished_reason"], registry=self.registry)
        self.registry.register(_EngineCollector(self))

    def set_model(self, model_name: str, engine: Any) -> None:
        self.model_name, self.engine = model_name, engine
        for reason in FINISH_REASONS:  # every reason present from the start, at 0
            self.success.labels(model_name, reason)

    def finished(self, reason: str) -> float:
        """Requests finished with `reason` so far."""
        return self.success.labels(self.model_name, reason)._value.get()

    def timer(self) -> RequestTimer:
        return RequestTimer(self)


class RequestTimer:
    """Times one engine request (all n samples of a prompt): first token, gaps between outputs, the end."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.arrival = time.perf_counter()
        self.last: float | None = None
        self.num_tokens = 0
        self.done = False  # counted once in request_success_total, whichever path ends it first

    def on_output(self, num_new_tokens: int, finish_reason: str | None, output: Any = None) -> None:
        """`output`: the RequestOutput, whose engine timestamps give the phases once it finished."""
        now, model = time.perf_counter(), self.metrics.model_name
        if num_new_tokens:
            self.num_tokens += num_new_tokens
            if self.last is None:
                self.metrics.ttft.labels(model).observe(now - self.arrival)
            else:
                self.metrics.itl.labels(model).observe(now - self.last)
            self.last = now
        if finish_reason is None or self.done:
            return
        self.done = True
        self.metrics.e2e.labels(model).observe(now - self.arrival)
        self.metrics.success.labels(model, finish_reason).inc()
        if output is not None:
            self.metrics.prompt_tokens.labels(model).observe(len(output.prompt_token_ids))
            self.metrics.generation_tokens.labels(model).observe(self.num_tokens)
            self._phases(output.metrics, model)

    def _phases(self, stamps: Any, model: str) -> None:
        if stamps is None or stamps.first_scheduled_time is None:
            return
        self.metrics.queue.labels(model).observe(stamps.first_scheduled_time - stamps.arrival_time)
        if stamps.first_token_time is not None:
            self.metrics.prefill.labels(model).observe(stamps.first_token_time - stamps.first_scheduled_time)
            self.metrics.decode.labels(model).observe(stamps.last_token_time - stamps.first_token_time)


class _EngineCollector:
    """Gauges and counters the engine keeps, read at scrape time (absent while the model loads)."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics

    def collect(self):
        engine = self.metrics.engine
        if engine is None:
            return
        labels, value = ["model_name"], [self.metrics.model_name]
        kv, stats, scheduler = engine.kv_cache_manager, engine.stats, engine.scheduler

        def metric(family, name: str, help_text: str, number: float):
            found = family(name, help_text, labels=labels)
            found.add_metric(value, number)
            return found

        gauge, counter = GaugeMetricFamily, CounterMetricFamily
        yield metric(gauge, "vllm:num_requests_running", "Requests in the running batch.", scheduler.num_running)
        yield metric(gauge, "vllm:num_requests_waiting", "Requests waiting to be scheduled.", scheduler.num_waiting)
        yield metric(gauge, "vllm:kv_cache_usage_perc", "Fraction of KV-cache blocks in use (1 = full).", kv.usage())
        yield metric(gauge, "hfbridge:kv_cache_used_blocks", "KV-cache blocks held by requests.",
                     kv.pool.num_blocks - kv.num_free_blocks)
        yield metric(gauge, "hfbridge:kv_cache_total_blocks", "KV-cache blocks in all.", kv.pool.num_blocks)
        yield metric(gauge, "hfbridge:compiling", "1 while torch.compile warms up in the background (steps run "
                     "eagerly).", int(engine.is_compiling()))
        yield metric(counter, "vllm:prompt_tokens", "Prompt tokens received.", stats.num_prompt_tokens)
        yield metric(counter, "vllm:generation_tokens", "Tokens generated.", stats.num_generation_tokens)
        yield metric(counter, "vllm:num_preemptions", "Requests preempted for lack of KV blocks.",
                     scheduler.num_preemptions)
        yield metric(counter, "vllm:prefix_cache_queries", "Tokens looked up in the prefix cache.",
                     kv.stats.queried_tokens)
        yield metric(counter, "vllm:prefix_cache_hits", "Tokens found in the prefix cache.", kv.stats.hit_tokens)
        parallel = engine.config.parallel_config
        world = GaugeMetricFamily("hfbridge:parallel_world_size", "Ranks serving the model (tp x pp).",
                                  labels=["model_name", "tensor_parallel_size"])
        world.add_metric([self.metrics.model_name, str(parallel.tensor_parallel_size)], parallel.world_size)
        yield world
        yield _iteration_tokens(engine, labels, value)
        if engine.config.lora_config is not None:
            yield _lora_info(engine)


def _iteration_tokens(engine: Any, labels: list[str], value: list[str]) -> HistogramMetricFamily:
    from hfbridge.engine.llm_engine import ITERATION_TOKEN_BUCKETS

    stats, cumulative, buckets = engine.stats, 0, []
    for bound, count in zip((*ITERATION_TOKEN_BUCKETS, float("inf")), stats.iteration_tokens):
        cumulative += count
        buckets.append(("+Inf" if bound == float("inf") else str(float(bound)), cumulative))
    family = HistogramMetricFamily("vllm:iteration_tokens_total", "Tokens scheduled in one engine step.",
                                   labels=labels)
    family.add_metric(value, buckets, float(stats.iteration_tokens_sum))
    return family


def _lora_info(engine: Any) -> GaugeMetricFamily:
    """vLLM's vllm:lora_requests_info: the adapters of running and waiting requests in labels (comma-separated
    names), the scrape time as value."""
    scheduler = engine.scheduler

    def names(requests) -> str:
        try:  # read from the event loop while the engine thread steps: a changed queue reads as empty this time
            found = {r.lora_request.lora_name for r in list(requests) if r.lora_request is not None}
        except RuntimeError:
            found = set()
        return ",".join(sorted(found))

    family = GaugeMetricFamily("vllm:lora_requests_info", "Running stats on LoRA requests.",
                               labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
    family.add_metric([str(engine.config.lora_config.max_loras), names(scheduler.running), names(scheduler.waiting)],
                      time.time())
    return family


def render(metrics: ServerMetrics, engine: Any | None) -> str:
    """The /metrics page; `engine` is the LLMEngine (None while loading: its gauges are then absent)."""
    metrics.engine = engine
    return generate_latest(metrics.registry).decode()
