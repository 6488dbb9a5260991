"""Prometheus metrics, named `ember:*`, on a registry of the server's own.

Engine gauges and the prefix-cache counters are read from the engine when /metrics is scraped;
per-request histograms are observed by the server as each request finishes.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# Not a `*_created` gauge beside every counter and histogram (as vLLM leaves them out too):
# nothing reads them, and they double what each scrape stores.
disable_created_metrics()

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)
TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class EngineCollector:
    def __init__(self, state) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        engine = self.state.engine
        if engine is None:
            return
        s = engine.core.stats()
        model = self.state.model_name
        for name, doc, value in (
            ("ember:num_requests_running", "Sequences in the running batch.", s.num_running),
            ("ember:num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting),
            (
                "ember:kv_cache_usage_perc",
                "Fraction of KV cache blocks in use (0-1).",
                s.kv_cache_usage,
            ),
        ):
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric([model], value)
            yield g
        # The endpoint picker's prefix-cache scorer reads the block size from this info gauge.
        runner = engine.core.runner
        info = GaugeMetricFamily(
            "ember:cache_config_info",
            "KV cache configuration (value 1; the settings are labels).",
            labels=["model_name", "block_size", "num_gpu_blocks"],
        )
        info.add_metric([model, str(runner.block_size), str(runner.num_blocks)], 1)
        yield info
        for name, doc, value in (
            (
                "ember:prefix_cache_queries",
                "Prompt tokens looked up in the prefix cache.",
                s.prefix_cache_queries,
            ),
            (
                "ember:prefix_cache_hits",
                "Prompt tokens found in the prefix cache.",
                s.prefix_cache_hits,
            ),
            (
                "ember:num_preemptions",
                "Sequences preempted for lack of KV blocks.",
                s.num_preemptions,
            ),
        ):
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric([model], value)
            yield c


class ServerMetrics:
    def __init__(self, state) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(EngineCollector(state))
        labels = ["model_name"]
        self.prompt_tokens = Counter(
            "ember:prompt_tokens", "Prompt tokens processed.", labels, registry=self.registry
        )
        self.generation_tokens = Counter(
            "ember:generation_tokens", "Tokens generated.", labels, registry=self.registry
        )
        self.request_success = Counter(
            "ember:request_success",
            "Finished sequences by finish reason.",
            labels + ["finished_reason"],
            registry=self.registry,
        )
        self.ttft = Histogram(
            "ember:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.tpot = Histogram(
            "ember:time_per_output_token_seconds",
            "Time per output token after the first.",
            labels,
            buckets=TPOT_BUCKETS,
            registry=self.registry,
        )
        self.e2e = Histogram(
            "ember:e2e_request_latency_seconds",
            "End-to-end sequence latency.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rejected = Counter(
            "ember:num_requests_rejected",
            "Requests refused with 503 at once: overloaded (admission bound) or shutting_down.",
            labels + ["reason"],
            registry=self.registry,
        )
        # Every series from the start (at 0), so rates and alerts see them before the first
        # event, as vLLM's finished_reason series are.
        for reason in ("stop", "length", "abort", "error"):
            self.request_success.labels(state.model_name, reason)
        for reason in ("overloaded", "shutting_down"):
            self.rejected.labels(state.model_name, reason)
        self.queue_time = Histogram(
            "ember:request_queue_time_seconds",
            "Time waiting before the first schedule.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
