"""Prometheus metrics of one server (prometheus-client, a registry per app so that several apps
in one process, as in the tests, keep their own counts).

Counters and histograms are observed by the HTTP handlers when a request ends; the gauges
(running, waiting, KV pages, prefix-cache hit rate) are read from each scheduler when
/metrics is scraped.
"""
from __future__ import annotations

from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0)


class _SchedulerCollector:
    """Gauges read from the live schedulers at scrape time. `schedulers` returns
    {model name: PagedScheduler or ReplicaScheduler} of the models loaded so far; a
    ReplicaScheduler's pools are summed (pages) and pooled (hit rate: hit tokens over
    looked-up tokens of all replicas, not a mean of rates)."""

    def __init__(self, schedulers: Callable[[], dict]):
        self.schedulers = schedulers

    def describe(self) -> Iterable:
        return []  # collect() runs at scrape time only: nothing is read at registration

    def collect(self) -> Iterable:
        running = GaugeMetricFamily("jaxformer_requests_running",
                                    "requests holding a decode slot", labels=["model"])
        waiting = GaugeMetricFamily("jaxformer_requests_waiting",
                                    "requests queued for a slot", labels=["model"])
        pages = GaugeMetricFamily("jaxformer_kv_pages_in_use",
                                  "KV-cache pages referenced by a request", labels=["model"])
        total = GaugeMetricFamily("jaxformer_kv_pages_total",
                                  "KV-cache pages in the pool (page 0, the null page, "
                                  "excluded)", labels=["model"])
        hit = GaugeMetricFamily("jaxformer_prefix_cache_hit_rate",
                                "prompt tokens found in the prefix cache / tokens looked up",
                                labels=["model"])
        preempt = CounterMetricFamily("jaxformer_preemptions",
                                      "requests preempted for pages", labels=["model"])
        for name, s in self.schedulers().items():
            running.add_metric([name], s.running)
            waiting.add_metric([name], s.waiting)
            pools = _pools(s)
            if pools:
                pages.add_metric([name], sum(p.num_in_use for p in pools))
                total.add_metric([name], sum(p.num_pages - 1 for p in pools))
                looked = sum(p.prefix_query_tokens for p in pools)
                hit.add_metric([name], sum(p.prefix_hit_tokens for p in pools)
                               / max(1, looked))
                preempt.add_metric([name], s.preemptions)
        yield from (running, waiting, pages, total, hit, preempt)


def _pools(s) -> list:
    """The page pools of a scheduler: a PagedScheduler's one, a ReplicaScheduler's paged
    replicas' (none for contiguous engines)."""
    if hasattr(s, "replicas"):
        return [p for p in (getattr(r, "pool", None) for r in s.replicas) if p is not None]
    pool = getattr(s, "pool", None)
    return [] if pool is None else [pool]


class Metrics:
    """The server's metrics; `observe` one request when it ends."""

    def __init__(self, schedulers: Callable[[], dict]):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("jaxformer_requests", "requests by outcome (finished_stop, "
                                "finished_length, aborted, failed, rejected_queue_full, "
                                "bad_request)", ["model", "outcome"], registry=r)
        self.ttft = Histogram("jaxformer_time_to_first_token_seconds",
                              "submission to first token", ["model"], buckets=_LATENCY,
                              registry=r)
        self.itl = Histogram("jaxformer_inter_token_latency_seconds",
                             "mean time per output token after the first, per request",
                             ["model"], buckets=_ITL, registry=r)
        self.e2e = Histogram("jaxformer_e2e_request_latency_seconds",
                             "submission to end", ["model"], buckets=_LATENCY, registry=r)
        self.tokens_in = Counter("jaxformer_prompt_tokens", "prompt tokens of ended requests",
                                 ["model"], registry=r)
        self.tokens_out = Counter("jaxformer_generation_tokens", "generated tokens",
                                  ["model"], registry=r)
        r.register(_SchedulerCollector(schedulers))

    def count(self, model: str, outcome: str) -> None:
        self.requests.labels(model, outcome).inc()

    def observe(self, model: str, out) -> None:
        """One ended request (a scheduler RequestOutput)."""
        outcome = out.status if out.status != "finished" else f"finished_{out.reason}"
        self.count(model, outcome)
        t = out.times
        if "first_token" in t:
            self.ttft.labels(model).observe(t["first_token"] - t["submitted"])
            if len(out.tokens) > 1 and "end" in t:
                self.itl.labels(model).observe((t["end"] - t["first_token"])
                                               / (len(out.tokens) - 1))
        if "end" in t:
            self.e2e.labels(model).observe(t["end"] - t["submitted"])
        self.tokens_in.labels(model).inc(out.prompt_tokens)
        self.tokens_out.labels(model).inc(len(out.tokens))

    def render(self) -> bytes:
        return generate_latest(self.registry)
