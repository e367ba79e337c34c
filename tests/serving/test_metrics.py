"""Serving latency metrics on hand-made timings (expected values worked out by hand)."""

import pytest

from dsjax.serving.metrics import RequestTiming, summarize


def test_request_latencies():
    t = RequestTiming(arrival=1.0, prompt_tokens=1024, token_times=[1.5, 1.6, 1.6, 2.0])
    assert t.ttft == pytest.approx(0.5) and t.e2e == pytest.approx(1.0)
    assert t.tpot == pytest.approx(0.5 / 3)
    assert t.itls == pytest.approx([0.1, 0.0, 0.4])
    assert RequestTiming(0.0, 8, [0.2]).tpot is None


def test_fastgen_sla():
    # TTFT 0.5 s <= 1024 / 512 = 2 s; EMA (alpha 2/17) of gaps 0.1, 0.0, 0.4:
    # 0.1, then 0.1 * 15/17 = 0.0882, then 0.4 * 2/17 + 0.0882 * 15/17 = 0.1249
    t = RequestTiming(arrival=1.0, prompt_tokens=1024, token_times=[1.5, 1.6, 1.6, 2.0])
    assert t.meets_fastgen_sla(6.0)  # 1/6 = 0.167 s
    assert not t.meets_fastgen_sla(10.0)  # 1/10 = 0.1 s: the EMA reaches 0.1249
    assert not RequestTiming(0.0, 256, [0.6, 0.7]).meets_fastgen_sla(2.0)  # TTFT 0.6 > 0.5 s
    slow_start = RequestTiming(0.0, 512, [0.1, 0.5, 0.55, 0.6])  # first gap 0.4 s > 1/4
    assert slow_start.meets_fastgen_sla(2.0) and not slow_start.meets_fastgen_sla(4.0)


def test_summary():
    a = RequestTiming(0.0, 100, [1.0, 2.0, 3.0])  # TTFT 1, TPOT 1
    b = RequestTiming(1.0, 300, [2.0, 4.0])  # TTFT 1, TPOT 2
    s = summarize([a, b, RequestTiming(2.0, 50)], duration=4.0)  # the third never answered
    assert s["completed"] == 2 and s["request_throughput"] == pytest.approx(0.5)
    assert s["output_tokens"] == 5 and s["output_tokens_per_s"] == pytest.approx(1.25)
    assert s["total_tokens_per_s"] == pytest.approx((400 + 5) / 4)
    assert s["tpot_ms"]["mean"] == pytest.approx(1500) and s["ttft_ms"]["p50"] == pytest.approx(1000)
    assert s["itl_ms"]["p50"] == pytest.approx(1000) and s["itl_ms"]["mean"] == pytest.approx(4000 / 3)
    assert s["effective_throughput"]["2 tok/s"] == 0  # neither meets TTFT <= prompt / 512
