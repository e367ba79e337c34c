"""Latency metrics of served requests, as serving benchmarks define them (vLLM's and SGLang's
benchmark_serving, DeepSpeed-FastGen's effective throughput).

Per request, from the time it arrived and the time each of its output tokens reached the client:
TTFT (first token - arrival), E2E (last token - arrival), TPOT ((E2E - TTFT) / (tokens - 1),
requests with one token have none), ITL (the gaps between consecutive tokens; tokens that
arrive together, as one step's read, give a gap of 0 for all but the first). A run summary has
P50/P90/P95/P99 and the mean of each, request and token throughput over the run's duration, and
FastGen's effective throughput: the requests per second that meet its SLA (TTFT <= prompt
tokens / 512 s, and the exponential moving average, span 16, of the per-token latencies stays
at or under 1 / rate for a generation rate of 2, 4 or 6 tokens/s).
"""

from __future__ import annotations

import dataclasses

import numpy as np

PERCENTILES = (50, 90, 95, 99)
FASTGEN_PROMPT_RATE = 512.0  # prompt tokens per second a request's TTFT may take
FASTGEN_SPAN = 16  # the moving average's span: alpha = 2 / (span + 1)
FASTGEN_RATES = (2.0, 4.0, 6.0)  # generation tokens/s of the three SLAs


@dataclasses.dataclass
class RequestTiming:
    arrival: float  # seconds (any clock shared with token_times)
    prompt_tokens: int
    token_times: list[float] = dataclasses.field(default_factory=list)  # one per output token
    # (or per streamed chunk, when a client sees chunks: then output_tokens counts the tokens)
    output_tokens: int | None = None

    @property
    def tokens(self) -> int:
        return len(self.token_times) if self.output_tokens is None else self.output_tokens

    @property
    def ttft(self) -> float:
        return self.token_times[0] - self.arrival

    @property
    def e2e(self) -> float:
        return self.token_times[-1] - self.arrival

    @property
    def tpot(self) -> float | None:
        n = self.tokens
        return None if n < 2 or not self.token_times else (self.e2e - self.ttft) / (n - 1)

    @property
    def itls(self) -> list[float]:
        return list(np.diff(self.token_times))

    def meets_fastgen_sla(self, rate: float) -> bool:
        """TTFT <= prompt_tokens / 512 s and the EMA (span 16) of the inter-token latencies never
        above 1 / rate."""
        if not self.token_times or self.ttft > self.prompt_tokens / FASTGEN_PROMPT_RATE:
            return False
        alpha, ema = 2.0 / (FASTGEN_SPAN + 1), None
        for gap in self.itls:
            ema = gap if ema is None else alpha * gap + (1 - alpha) * ema
            if ema > 1.0 / rate:
                return False
        return True


def distribution(values) -> dict:
    """{mean, p50, p90, p95, p99} of values in seconds, as milliseconds (None when empty)."""
    v = np.asarray([x for x in values if x is not None], np.float64) * 1e3
    if v.size == 0:
        return {k: None for k in ("mean", *(f"p{p}" for p in PERCENTILES))}
    return {"mean": float(v.mean()), **{f"p{p}": float(np.percentile(v, p)) for p in PERCENTILES}}


def summarize(timings: list[RequestTiming], duration: float) -> dict:
    """The run's figures (see module docstring); duration: seconds from the first arrival to the
    last token."""
    done = [t for t in timings if t.token_times]
    out_tokens = sum(t.tokens for t in done)
    in_tokens = sum(t.prompt_tokens for t in done)
    return {
        "requests": len(timings), "completed": len(done), "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_tokens": out_tokens, "output_tokens_per_s": out_tokens / duration,
        "total_tokens_per_s": (in_tokens + out_tokens) / duration,
        "ttft_ms": distribution(t.ttft for t in done),
        "tpot_ms": distribution(t.tpot for t in done),
        "itl_ms": distribution(x for t in done for x in t.itls),
        "e2e_ms": distribution(t.e2e for t in done),
        "effective_throughput": {
            f"{rate:g} tok/s": sum(t.meets_fastgen_sla(rate) for t in done) / duration
            for rate in FASTGEN_RATES},
    }
