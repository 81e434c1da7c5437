"""Prometheus metrics in vLLM's style (`llaisys:` prefix, `model_name` label).

Gauges and counters are read from the engine's stats at scrape time; latency histograms are
observed by the server as requests stream and finish.
"""
from __future__ import annotations

import time
from typing import Callable, Iterable, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..engine import EngineStats, RequestOutput

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)


class EngineCollector(Collector):
    """Engine state at scrape time; nothing while the model loads."""

    def __init__(self, model_name: str, stats: Callable[[], Optional[EngineStats]]):
        self.model_name = model_name
        self.stats = stats

    def collect(self) -> Iterable:
        s = self.stats()
        if s is None:
            return
        label = [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"llaisys:{name}", doc, labels=["model_name"])
            family.add_metric(label, value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(f"llaisys:{name}", doc, labels=["model_name"])
            family.add_metric(label, value)
            return family

        yield gauge("num_requests_running", "Requests with a completion in the running batch.", s.num_running)
        yield gauge("num_requests_waiting", "Requests waiting to be scheduled.", s.num_waiting)
        yield gauge("kv_cache_usage_perc", "Fraction of KV cells in use (1 = full).", s.kv_usage)
        yield gauge("kv_cache_used_cells", "KV cells in use.", s.kv_used_cells)
        yield gauge("kv_cache_cached_cells", "KV cells held by the prefix cache that nothing running uses "
                    "(free for the taking).", s.kv_cached_cells)
        yield gauge("prefix_cache_cells", "KV cells held by the prefix cache, shared with running requests or not.",
                    s.prefix_cache_cells)
        yield gauge("prefix_cache_hit_rate", "Prefix cache hits / queries, in tokens, since start.",
                    s.prefix_cache_hit_rate)
        yield gauge("kv_cache_capacity_cells", "KV cells in all.", s.kv_capacity)
        yield counter("prompt_tokens", "Prompt tokens of scheduled requests (cached ones included).",
                      s.prompt_tokens_total)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield counter("num_preemptions", "Requests preempted for KV room and recomputed.", s.num_preemptions)
        yield counter("engine_steps", "Engine steps run.", s.num_steps)
        yield counter("engine_step_seconds", "Seconds spent in engine steps.", s.step_seconds_total)
        finished = CounterMetricFamily("llaisys:request_success", "Finished completions by reason.",
                                       labels=["model_name", "finished_reason"])
        for reason, count in sorted(s.finished_by_reason.items()):
            finished.add_metric(label + [reason], count)
        yield finished
        yield counter("request_failure", "Requests the engine could not finish.", s.requests_failed)
        spec = s.spec_decode
        yield counter("spec_decode_num_drafts", "Verifies of drafted tokens.", spec.num_drafts)
        yield counter("spec_decode_num_draft_tokens", "Drafted tokens verified.", spec.num_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Drafted tokens the model accepted.", spec.num_accepted_tokens)
        per_pos = CounterMetricFamily("llaisys:spec_decode_num_accepted_tokens_per_pos",
                                      "Drafted tokens accepted, by position in the draft (0 = first).",
                                      labels=["model_name", "position"])
        for position, count in enumerate(spec.accepted_per_position):
            per_pos.add_metric(label + [str(position)], count)
        yield per_pos


class ServerMetrics:
    """The server's registry: the engine collector plus per-request histograms."""

    def __init__(self, model_name: str, stats: Callable[[], Optional[EngineStats]]):
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(model_name, stats))

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(f"llaisys:{name}", doc, ["model_name"], registry=self.registry,
                             buckets=buckets).labels(model_name)

        self.ttft = histogram("time_to_first_token_seconds", "From arrival to the first generated token.",
                              LATENCY_BUCKETS)
        self.itl = histogram("inter_token_latency_seconds", "Between successive tokens of a completion, "
                             "as streamed by the server.", ITL_BUCKETS)
        self.e2e = histogram("e2e_request_latency_seconds", "From arrival to the end, for finished requests.",
                             LATENCY_BUCKETS)
        self.queue = histogram("request_queue_time_seconds", "From arrival to first being scheduled.",
                               LATENCY_BUCKETS)
        self.prompt_tokens = histogram("request_prompt_tokens", "Prompt length of finished requests.",
                                       TOKEN_BUCKETS)
        self.generation_tokens = histogram("request_generation_tokens", "Tokens generated by finished "
                                           "requests.", TOKEN_BUCKETS)

        self.http_requests = Counter("llaisys:http_requests", "HTTP requests answered, by route and status.",
                                     ["method", "route", "status"], registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class RequestTimer:
    """Watches one request's increments: inter-token gaps as they arrive, the rest when it finishes."""

    def __init__(self, metrics: ServerMetrics):
        self.metrics = metrics
        self.last_token: dict[int, float] = {}  # completion index -> when its last token arrived

    def observe(self, delta: RequestOutput) -> None:
        now = time.monotonic()
        for c in delta.outputs:
            if not c.token_ids:
                continue
            last = self.last_token.get(c.index)
            if last is not None:  # a step gives each completion one token; spread a gap over any more
                gap = (now - last) / len(c.token_ids)
                for _ in c.token_ids:
                    self.metrics.itl.observe(gap)
            self.last_token[c.index] = now
        if delta.finished and delta.state == "finished":
            m = delta.metrics
            for histogram, value in ((self.metrics.ttft, m.time_to_first_token), (self.metrics.e2e, m.e2e_latency),
                                     (self.metrics.queue, m.queue_time)):
                if value is not None:
                    histogram.observe(value)
            self.metrics.prompt_tokens.observe(m.num_prompt_tokens)
            self.metrics.generation_tokens.observe(m.num_generated_tokens)
