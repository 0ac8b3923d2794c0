"""Prometheus metrics of the server: counters and histograms updated per request, gauges read at scrape time."""
from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

from idlm.decoding.stats import RequestStats
from idlm.engine.async_llm import EngineState

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _EngineCollector:
    """Queue depth, running requests, KV blocks and the prefix-cache hit rate, read when scraped."""

    def __init__(self, state: Callable[[], EngineState], metrics: "Metrics"):
        self.state, self.metrics = state, metrics

    def collect(self):
        s = self.state()
        for name, doc, value in (
            ("idlm_queue_depth", "Requests waiting to run", s.waiting),
            ("idlm_running_requests", "Requests in the running batch", s.running),
            ("idlm_kv_blocks_free", "Free KV cache blocks", s.kv_blocks_free),
            ("idlm_kv_blocks_used", "KV cache blocks in use", s.kv_blocks_total - s.kv_blocks_free),
            ("idlm_prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens",
             self.metrics.prefix_hit_rate()),
        ):
            g = GaugeMetricFamily(name, doc)
            g.add_metric([], value)
            yield g


class Metrics:
    def __init__(self, state: Callable[[], EngineState]):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("idlm_requests", "Finished requests (choices) by status and finish reason",
                                ["status", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("idlm_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("idlm_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache",
                                     registry=r)
        self.generated_tokens = Counter("idlm_generated_tokens", "Generated tokens", registry=r)
        self.tpf = Histogram("idlm_tokens_per_forward", "Tokens per forward of finished requests",
                             buckets=(1.0, 1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0, 6.0, 8.0), registry=r)
        self.acceptance = Histogram("idlm_draft_acceptance", "Accepted / tested drafts of finished ISD requests",
                                    buckets=tuple(i / 10 for i in range(1, 11)), registry=r)
        self.ttft = Histogram("idlm_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS,
                              registry=r)
        self.itl = Histogram("idlm_inter_token_latency_seconds", "Time between streamed deltas / tokens in them",
                             buckets=LATENCY_BUCKETS, registry=r)
        self.e2e = Histogram("idlm_request_seconds", "Request latency, arrival to last token", buckets=LATENCY_BUCKETS,
                             registry=r)
        self._prompt = self._cached = 0
        r.register(_EngineCollector(state, self))

    def prefix_hit_rate(self) -> float:
        return self._cached / self._prompt if self._prompt else 0.0

    def finished(self, status: str, finish_reason: str | None, stats: RequestStats | None, seconds: float) -> None:
        self.requests.labels(status, finish_reason or "none").inc()
        if stats is None:
            return
        self._prompt += stats.prompt_tokens
        self._cached += stats.cached_tokens
        self.prompt_tokens.inc(stats.prompt_tokens)
        self.cached_tokens.inc(stats.cached_tokens)
        self.generated_tokens.inc(stats.generated_tokens)
        if stats.forwards:
            self.tpf.observe(stats.tokens_per_forward)
        if stats.drafts_tested:
            self.acceptance.observe(sum(stats.accepted_by_position) / stats.drafts_tested)
        self.e2e.observe(seconds)

    def rejected(self, status: str) -> None:
        """A request refused before it ran (4xx, 503)."""
        self.requests.labels(status, "none").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
