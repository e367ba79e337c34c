"""The server's Prometheus metrics (prometheus_client, one registry per server): the engine's
state read at each scrape, and per-request latencies and token counts as requests finish."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class ServerMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, serving):
        self.registry = r = CollectorRegistry()
        scheds = serving.scheds

        def gauge(name, doc, fn):
            Gauge(name, doc, registry=r).set_function(fn)
        gauge("dsjax_requests_running", "Requests with KV blocks (running)",
              lambda: sum(len(s.running) for s in scheds))
        gauge("dsjax_requests_waiting", "Requests waiting for admission",
              lambda: sum(len(s.waiting) for s in scheds))
        gauge("dsjax_kv_blocks_used", "KV blocks held by requests", serving.blocks_in_use)
        gauge("dsjax_kv_blocks_total", "KV blocks that can be handed out",
              lambda: sum(s.alloc.capacity for s in scheds))
        gauge("dsjax_prefix_cache_hit_rate", "Full prompt blocks found in the prefix cache / looked up",
              lambda: sum(s.prefix_hits for s in scheds) / max(1, sum(s.prefix_queried for s in scheds)))
        gauge("dsjax_preemptions", "Sequences preempted (recomputed later) so far",
              lambda: sum(s.preemptions for s in scheds))
        hist = lambda name, doc: Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=r)  # noqa: E731
        self.ttft = hist("dsjax_time_to_first_token_seconds", "Arrival to first token")
        self.tpot = hist("dsjax_time_per_output_token_seconds", "(E2E - TTFT) / (tokens - 1)")
        self.e2e = hist("dsjax_e2e_request_latency_seconds", "Arrival to last token")
        self.prompt_tokens = Counter("dsjax_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("dsjax_generation_tokens", "Generated tokens", registry=r)
        self.finished = Counter("dsjax_requests_finished", "Finished requests by reason",
                                ["finish_reason"], registry=r)

    def record(self, prompt_tokens: int, times: list[float], arrival: float, reason: str) -> None:
        """A finished choice: its prompt size, the times its tokens arrived, why it ended."""
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(len(times))
        self.finished.labels(reason).inc()
        if times:
            self.ttft.observe(times[0] - arrival)
            self.e2e.observe(times[-1] - arrival)
            if len(times) > 1:
                self.tpot.observe((times[-1] - times[0]) / (len(times) - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
