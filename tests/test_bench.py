"""`dsjax bench`: its statistics, roofline arithmetic and report format (no timing assertions)."""

import json
import math

import numpy as np
import pytest

import dsjax
from dsjax import bench, cli

# tiny-gpt2 (dsjax.presets): vocab 512, 256 learned positions, width 64, 2 layers, 4 heads of 16,
# MLP 256, tied LM head. Parameters one decode step reads, per layer: two LayerNorms 2 * 128,
# qkv 64 * 192 + 192, out 64 * 64 + 64, up 64 * 256 + 256, down 256 * 64 + 64 = 49984; then the
# final norm 128 and the tied embedding 512 * 64 (the LM head), not the 256 * 64 positions.
TINY_GEMM = 64 * 192 + 64 * 64 + 64 * 256 + 256 * 64  # 49152 GEMM weights per layer
TINY_OTHER = 2 * 128 + 192 + 64 + 256 + 64  # 832 norm and bias parameters per layer
TINY_READ = 2 * (TINY_GEMM + TINY_OTHER) + 128 + 512 * 64  # 132864


@pytest.fixture(scope="module")
def tiny():
    return dsjax.init_inference("tiny-gpt2", dtype="bf16", max_out_tokens=64, progress=False)


def test_percentile_by_hand_and_against_numpy():
    assert bench.percentile([1, 2, 3, 4], 50) == 2.5
    assert bench.percentile(range(1, 11), 95) == pytest.approx(9.55)
    assert bench.percentile([4, 1, 3], 0) == 1 and bench.percentile([4, 1, 3], 100) == 4
    assert bench.percentile([7.0], 95) == 7.0
    xs = np.random.default_rng(0).exponential(size=13)
    for q in (0, 5, 25, 50, 90, 95, 99, 100):
        assert bench.percentile(xs, q) == pytest.approx(np.percentile(xs, q))
    with pytest.raises(ValueError):
        bench.percentile([], 50)


def test_latency_stats():
    s = bench.latency_stats([3.0, 1.0, 2.0])
    assert s == {"p50": 2.0, "p95": pytest.approx(2.9), "mean": 2.0, "min": 1.0, "max": 3.0, "n": 3}


def test_the_decode_measure():
    """The one decode measure every benchmark uses: the calls it makes, and (P50 T(n) - P50 T(1))
    / (n - 1) with P50 the median."""
    calls = []

    def generate(n):
        calls.append(n)
        return np.full((2, n), len(calls))

    measured = bench.time_generate(generate, 5, warmup=1, reps=2)
    assert calls == [5, 5, 5, 1, 1, 1]  # a warm-up, 2 timed, the one-token warm-up, 2 timed
    assert len(measured["full_ms"]) == len(measured["first_ms"]) == 2
    assert measured["tokens"] == [[3] * 5] * 2  # the last timed full call's
    assert bench.decode_ms_per_token([30.0, 10.0, 20.0], [4.0, 2.0, 3.0], 3) == (20 - 3) / 2
    assert bench.decode_ms_per_token([10.0, 20.0], [1.0, 3.0], 6) == (15 - 2) / 5
    row = bench.timing({"full_ms": [30.0, 10.0, 20.0], "first_ms": [4.0, 2.0, 3.0],
                        "tokens": [[0] * 3] * 2}, 3)
    assert row["decode_ms_per_token"] == (20 - 3) / 2 and row["ttft_ms"] == 3.0
    assert row["ms_per_token"] == pytest.approx(20 / 3)
    assert row["tokens_per_s"] == pytest.approx(2 * 3 / 0.020)  # batch x tokens / mean


def test_random_prompts_depend_on_seed_and_batch_alone():
    a = bench.random_prompts(512, 2, 8, seed=0)
    assert a.shape == (2, 8) and 0 <= a.min() and a.max() < 512
    np.testing.assert_array_equal(a, np.random.default_rng([0, 2]).integers(0, 512, (2, 8)))
    assert not np.array_equal(a, bench.random_prompts(512, 2, 8, seed=1))


def test_weight_bytes_per_step(tiny):
    assert bench.weight_bytes_per_step(tiny) == TINY_READ * 2  # bf16
    assert tiny.num_params() == TINY_READ + 256 * 64


def test_quantized_weights_count_their_stored_bytes():
    int8 = dsjax.init_inference("tiny-gpt2", quant={"bits": 8}, progress=False)
    # int8 values, one float32 scale per output channel (192 + 64 + 256 + 64), the rest bf16
    per_layer = TINY_GEMM + 4 * (192 + 64 + 256 + 64) + 2 * TINY_OTHER
    assert bench.weight_bytes_per_step(int8) == 2 * per_layer + 2 * (128 + 512 * 64)
    int4 = dsjax.init_inference("tiny-gpt2", quant={"bits": 4, "group_size": 32},
                                kv_cache_dtype="int8", progress=False)
    # two values a byte, a float32 scale per 32 rows of K
    scales = 4 * (2 * 192 + 2 * 64 + 2 * 256 + 8 * 64)
    per_layer = TINY_GEMM // 2 + scales + 2 * TINY_OTHER
    assert bench.weight_bytes_per_step(int4) == 2 * per_layer + 2 * (128 + 512 * 64)
    assert bench.kv_itemsize(int4) == 1 + 4 / 16  # int8 plus a float32 scale per 16-wide head


def test_roofline_arithmetic(tiny):
    # batch 2, context 10: K and V x 2 layers x 2 rows x 4 heads x 10 tokens x 16 dims x 2 bytes
    kv = bench.kv_bytes_per_step(tiny.config, 2, 10, bench.kv_itemsize(tiny))
    assert kv == 2 * 2 * 2 * 4 * 10 * 16 * 2 == 10240
    floor = bench.roofline(bench.weight_bytes_per_step(tiny), kv, bytes_per_s=1e9)
    assert floor == {"weight_bytes": 265728, "kv_bytes": 10240, "floor_ms": pytest.approx(0.275968)}


def test_gemv_bandwidth_small_shape():
    bw = bench.gemv_bandwidth(k=64, n=128, copies=2, calls=2, reps=1)
    assert bw["shape"] == [1, 64, 128] and bw["bytes_per_s"] > 0
    assert bw["bytes_per_s"] == pytest.approx(64 * 128 * 2 / (bw["us_per_gemv"] * 1e-6))


def _row(batch, peak):
    latency = {"p50": 10.0, "p95": 12.0, "mean": 10.5, "min": 9.0, "max": 12.5, "n": 10}
    return {"batch": batch, "prompt_len": 8, "new_tokens": 4, "latency_ms": latency,
            "ms_per_token": 2.5, "decode_ms_per_token": 1.0, "tokens_per_s": 380.9, "ttft_ms": 7.0,
            "compile_s": 3.0, "peak_memory_bytes": peak, "weight_bytes": 100, "kv_bytes": 10,
            "floor_ms": 0.5, "over_floor": 2.0}


def _table(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")[1:-1]] for line in markdown.splitlines()
            if line.startswith("|")]


def test_report_markdown_format():
    env = {"device": "NVIDIA H200", "device_count": 1, "jax": "0.11.2", "git_commit": "abc",
           "date": "today", "gemv_bandwidth": {"shape": [1, 8192, 28672], "bytes_per_s": 4e12}}
    args = {"model": "llama3-8b", "dtype": "bf16", "quant": "int8", "kernels": "on",
            "prompt_len": 8, "new_tokens": 4, "reps": 10, "warmup": 2, "command": "dsjax bench ..."}
    md = bench.report_markdown([_row(1, 2**31), _row(8, None)], env, args)
    assert md.startswith("# dsjax bench: llama3-8b")
    assert "4.000 TB/s" in md and "Command: `dsjax bench ...`" in md
    header, rule, *rows = _table(md)
    assert header == list(bench.COLUMNS) and len(rule) == len(header)
    assert [r[0] for r in rows] == ["1", "8"]
    assert rows[0][header.index("peak memory GiB")] == "2.00"
    assert rows[1][header.index("peak memory GiB")] == "n/a"  # no statistics: never a made-up 0
    assert rows[0][header.index("decode / floor")] == "2.00x"


def test_cli_bench_end_to_end(tmp_path, capsys):
    args = ["-q", "bench", "--model", "tiny-gpt2", "--batch-sizes", "1,2", "--prompt-len", "8",
            "--new-tokens", "4", "--reps", "2", "--warmup", "1", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    payload = json.loads((tmp_path / "bench-tiny-gpt2-bf16.json").read_text())
    md = (tmp_path / "bench-tiny-gpt2-bf16.md").read_text()
    assert md in out and f"wrote {tmp_path / 'bench-tiny-gpt2-bf16.json'}" in out
    assert payload["args"]["batch_sizes"] == [1, 2] and payload["env"]["gemv_bandwidth"]["bytes_per_s"] > 0
    rows = payload["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        assert r["latency_ms"]["n"] == 2 and r["new_tokens"] == 4 and r["weight_bytes"] == TINY_READ * 2
        assert r["kv_bytes"] == 2 * 2 * r["batch"] * 4 * (8 + 2) * 16 * 2
        numbers = [v for k, v in r.items() if isinstance(v, (int, float))] + list(r["latency_ms"].values())
        assert all(math.isfinite(v) for v in numbers)
        assert r["peak_memory_bytes"] is None  # the CPU keeps no memory statistics
    header, _, *table = _table(md)
    assert header == list(bench.COLUMNS) and [t[0] for t in table] == ["1", "2"]


def test_cli_bench_bad_parallel_degree_is_a_clean_error(tmp_path, capsys):
    args = ["-q", "bench", "--model", "tiny-gpt2", "--tp", "3", "--out", str(tmp_path)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("dsjax bench: tp_size=3 does not divide") and "Traceback" not in err
    assert not any(tmp_path.iterdir())


def test_cli_bench_rejects_bad_flags(capsys):
    for bad in (["--batch-sizes", "1,x"], ["--batch-sizes", "0"], ["--new-tokens", "1"]):
        with pytest.raises(SystemExit):
            cli.main(["bench", "--model", "tiny-gpt2", *bad])
    assert "--new-tokens" in capsys.readouterr().err


def test_new_presets_build_their_configs():
    import converters
    from dsjax import presets

    for name, (layers, heads, dim_head, tied) in {"gptj-6b": (28, 16, 256, False),
                                                   "bloom-7b1": (30, 32, 128, True)}.items():
        hf = presets.hf_config(name)
        cfg = converters.policy_for(hf).make_config(hf)
        assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (4096, layers, heads)
        assert (cfg.dim_head, cfg.tie_word_embeddings) == (dim_head, tied)
    assert converters.policy_for(presets.hf_config("gptj-6b")).make_config(
        presets.hf_config("gptj-6b")).rotary_dim == 64
