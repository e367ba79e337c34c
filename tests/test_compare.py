"""benchmarks/compare.py (HF transformers vs DeepSpeed-Inference vs dsjax) and its plots, on the CPU
with a tiny model: the statistics it derives, the token comparison, the report, the DeepSpeed
subprocess protocol (with a stand-in deepspeed package) and the deadline. No timing assertions."""

import dataclasses
import json
import math
import time

import numpy as np
import pytest

from benchmarks import compare, harness, plot_compare
from dsjax.policy import KernelPolicy

pytest.importorskip("torch")
pytest.importorskip("transformers")

SMALL = ["--model", "tiny-gpt2", "--batch-sizes", "1,2", "--prompt-len", "8", "--new-tokens", "4",
         "--reps", "2", "--warmup", "1"]
QUICK = SMALL[:2] + ["--batch-sizes", "1", "--prompt-len", "4", "--new-tokens", "2", "--reps", "1",
                     "--warmup", "0"]

# A stand-in for DeepSpeed: its op "builds", and init_inference returns an engine whose generate
# is the HF model's own, so the subprocess protocol runs end to end on the CPU.
FAKE_DEEPSPEED = '''
__version__ = "0.0-test"


class _Engine:
    def __init__(self, module):
        self.module = module

    def generate(self, *args, **kwargs):
        return self.module.generate(*args, **kwargs)


def init_inference(model, dtype=None, replace_with_kernel_inject=False, tensor_parallel=None):
    assert replace_with_kernel_inject and tensor_parallel == {"tp_size": 1}
    return _Engine(model.to(dtype))
'''


def _fake_deepspeed(root, source=FAKE_DEEPSPEED):
    pkg = root / "deepspeed"
    (pkg / "ops").mkdir(parents=True)
    (pkg / "__init__.py").write_text(source)
    (pkg / "ops" / "__init__.py").write_text("")
    (pkg / "ops" / "op_builder.py").write_text("class InferenceBuilder:\n    def load(self):\n        pass\n")
    return root


@pytest.fixture(autouse=True)
def fixed_bandwidth(monkeypatch):
    """A run's two GEMV bandwidth measurements (about a second each on the CPU) give a fixed
    figure here: the floors are computed from it all the same, and the measurement itself is
    dsjax.bench.gemv_bandwidth, which test_bench.py runs."""
    figure = {"shape": [1, 1024, 4096], "us_per_gemv": 1000.0, "bytes_per_s": 8.4e9}
    monkeypatch.setattr(harness, "gemv_bandwidth", lambda: dict(figure))


def _table(markdown: str) -> list[list[str]]:
    return [[c.strip() for c in line.split("|")[1:-1]] for line in markdown.splitlines()
            if line.startswith("|")]


def test_prompts_are_the_same_for_every_system_and_depend_on_batch_and_seed():
    a = compare.make_prompts(512, 2, 8, seed=0)
    assert a.shape == (2, 8) and a.min() >= 0 and a.max() < 512
    np.testing.assert_array_equal(a, compare.make_prompts(512, 2, 8, seed=0))
    assert not np.array_equal(a, compare.make_prompts(512, 2, 8, seed=1))
    assert not np.array_equal(a[:1], compare.make_prompts(512, 1, 8, seed=0))


def test_first_differences():
    ref = [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert compare.first_differences(ref, ref) == [4, 4]
    assert compare.first_differences([[1, 2, 0, 4], [0, 6, 7, 8]], ref) == [2, 0]
    with pytest.raises(ValueError, match="shapes differ"):
        compare.first_differences([[1, 2, 3]], ref)


def test_measure_calls_and_times():
    calls = []

    def generate(prompts, n):
        calls.append(n)
        return np.full((len(prompts), n), len(calls))

    out = compare.measure(generate, np.zeros((2, 3), int), new_tokens=5, warmup=2, reps=3)
    assert calls == [5, 5, 5, 5, 5, 1, 1, 1, 1]  # 2 warm-ups, 3 timed, 1 + 3 one-token calls
    assert len(out["full_ms"]) == len(out["first_ms"]) == 3 and min(out["full_ms"]) >= 0
    assert out["tokens"] == [[5] * 5] * 2  # the last timed full call's tokens


def test_timing_row_arithmetic():
    measured = {"full_ms": [30.0, 10.0, 20.0], "first_ms": [4.0, 2.0, 3.0], "tokens": [[1, 2, 3], [4, 5, 6]]}
    row = compare.timing_row(measured, 3, reference=[[1, 2, 3], [4, 0, 6]])
    assert row["latency_ms"]["p50"] == 20.0 and row["ttft_ms"] == 3.0
    assert row["ms_per_token"] == pytest.approx(20 / 3)
    assert row["decode_ms_per_token"] == pytest.approx((20 - 3) / 2)  # the prompt phase removed
    assert row["tokens_per_s"] == pytest.approx(2 * 3 / 0.020)  # batch x tokens / mean
    assert row["tokens_equal_hf"] is False and row["first_difference"] == [3, 1]
    assert compare.timing_row(measured, 3, reference=measured["tokens"])["tokens_equal_hf"] is True
    assert compare.timing_row(measured, 3)["tokens_equal_hf"] is None
    compare.add_floor(row, {"weight_bytes": 100, "kv_bytes": 20, "floor_ms": 2.0})
    assert row["over_floor"] == pytest.approx(8.5 / 2.0) and row["weight_bytes"] == 100


def _ok(system, batch, p50, equal, diffs=None):
    label = compare.SYSTEMS[system][0]
    row = {"system": system, "label": label, "batch": batch, "prompt_len": 8, "new_tokens": 4,
           "status": "ok", "latency_ms": {"p50": p50, "p95": p50 + 1, "mean": p50, "min": p50,
                                          "max": p50 + 1, "n": 2},
           "ms_per_token": p50 / 4, "ttft_ms": 1.0, "decode_ms_per_token": (p50 - 1) / 3,
           "tokens_per_s": 1.0, "weight_bytes": 10, "kv_bytes": 1, "floor_ms": 0.5,
           "over_floor": (p50 - 1) / 3 / 0.5, "tokens_equal_hf": equal}
    if diffs is not None:
        row["first_difference"] = diffs
    return row


def _payload(rows):
    env = {"device": "cpu", "jax": "0.10.2", "git_commit": "abc", "date": "today", "torch": "2.13",
           "transformers": "5.23", "gemv_bandwidth": {"shape": [1, 8192, 28672], "bytes_per_s": 4e12},
           "deepspeed_process": {"deepspeed": "0.19.8", "transformers": "4.46.3"}}
    args = compare.parse_args(SMALL + ["--systems", "dsjax-xla,deepspeed,hf-eager"])
    settings = dict(vars(args), command=compare.command_line(args))
    return {"env": env, "args": settings, "notes": {"hf-compile": ["not compiled"]}, "rows": rows}


def test_report_markdown_format():
    failed = {"system": "deepspeed", "label": compare.SYSTEMS["deepspeed"][0], "batch": 1,
              "status": "failed", "error": "RuntimeError: no kernel"}
    rows = [_ok("dsjax-xla", 2, 4.0, False, [4, 1]), _ok("dsjax-xla", 1, 5.0, True), failed,
            _ok("hf-eager", 1, 20.0, True), _ok("hf-eager", 2, 40.0, True)]
    md = compare.report_markdown(_payload(rows))
    assert md.startswith("# tiny-gpt2: HF transformers, DeepSpeed-Inference and dsjax")
    assert "4.000 TB/s" in md and "DeepSpeed 0.19.8 with transformers 4.46.3" in md
    assert "Command: `python benchmarks/compare.py --model tiny-gpt2 --batch-sizes 1,2 --systems " \
           "hf-eager,dsjax-xla,deepspeed " in md  # HF eager first: its tokens are the reference
    header, rule, *table = _table(md)
    assert header == list(compare.COLUMNS) and len(rule) == len(header)
    assert [(r[0], r[1]) for r in table] == [  # in the order of --systems, then batch
        ("HF transformers eager", "1"), ("HF transformers eager", "2"), ("dsjax XLA", "1"),
        ("dsjax XLA", "2"), ("DeepSpeed-Inference kernel inject", "1")]
    col = {name: header.index(name) for name in header}
    assert table[2][col["P50 vs HF eager"]] == "4.00x" and table[3][col["P50 vs HF eager"]] == "10.00x"
    assert table[2][col["tokens = HF eager"]] == "yes"
    assert table[3][col["tokens = HF eager"]] == "no: from token 2; 1/2 rows equal"
    assert table[2][col["decode / floor"]] == "2.67x"
    assert table[4][2] == "failed: RuntimeError: no kernel" and table[4][3:] == ["-"] * 9
    assert "- HF static cache + torch.compile: not compiled" in md


def test_report_against_the_first_variant():
    """Without HF eager the first system is the reference: its name heads the two columns."""
    rows = [_ok("dsjax-xla", 1, 5.0, True), _ok("dsjax-int8", 1, 4.0, False, [2, 4])]
    payload = _payload(rows)
    payload["args"].update(systems=["dsjax-xla", "dsjax-int8"], reference="dsjax-xla", own_floor=True)
    payload.update(notes={})
    payload["env"].pop("deepspeed_process")
    md = compare.report_markdown(payload)
    assert md.startswith("# tiny-gpt2: dsjax variants on the same workload")
    assert "each dsjax variant's own weights and K/V cache" in md and "torch" not in md
    header, _, *table = _table(md)
    assert header[-2:] == ["P50 vs dsjax-xla", "tokens = dsjax-xla"]
    assert [r[0] for r in table] == ["dsjax XLA", "dsjax INT8 weights (XLA)"]
    assert table[1][-2:] == ["1.25x", "no: from token 3; 1/2 rows equal"]


def test_variants_are_whole_kernel_policies_and_take_their_former_names():
    for name, (label, options) in harness.DSJAX_VARIANTS.items():
        assert compare.SYSTEMS[name] == (label, options)
        assert isinstance(options["kernels"], KernelPolicy)
        assert set(options) <= {"kernels", "quant", "kv_cache_dtype"}
    assert harness.DSJAX_VARIANTS["dsjax-pallas"][1]["kernels"] == KernelPolicy.pallas()
    assert harness.DSJAX_VARIANTS["dsjax-int8-pallas-gemv1"][1]["kernels"] == dataclasses.replace(
        KernelPolicy.pallas(), int8_gemv_rows=1)
    a = compare.parse_args(["--systems", "bf16-pallas,int8-xla,attn-pallas"])
    assert a.systems == ["dsjax-pallas", "dsjax-int8", "dsjax-kernels"] and a.reference == "dsjax-pallas"
    assert compare.parse_args(["--systems", "dsjax-xla,hf-eager"]).reference == "hf-eager"


def test_error_line_is_type_and_first_line():
    assert compare.error_line(RuntimeError("first\nsecond")) == "RuntimeError: first"
    assert compare.error_line(KeyError()) == "KeyError"


def test_parse_args_rejects_unknown_systems(capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(["--systems", "hf-eager,vllm"])
    assert "unknown systems ['vllm']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.parse_args(["--new-tokens", "1"])


def test_end_to_end_same_weights_and_a_deepspeed_process(tmp_path, monkeypatch):
    """fp32, so that every system that runs the same weights on the same prompts makes exactly
    HF eager's greedy tokens; DeepSpeed's subprocess (a stand-in package on --deepspeed-site)
    loads the saved weights and is timed like the rest."""
    site = _fake_deepspeed(tmp_path / "site")
    monkeypatch.setenv("MASTER_PORT", "29555")
    out = tmp_path / "out"
    argv = SMALL + ["--dtype", "fp32", "--systems", "dsjax-xla,deepspeed,hf-eager",
                    "--deepspeed-site", str(site), "--out", str(out)]
    assert compare.main(argv) == 0
    payload = json.loads((out / "compare-tiny-gpt2.json").read_text())
    md = (out / "compare-tiny-gpt2.md").read_text()
    rows = {(r["system"], r["batch"]): r for r in payload["rows"]}
    assert sorted(rows) == sorted((s, b) for s in ("hf-eager", "dsjax-xla", "deepspeed") for b in (1, 2))
    for (system, _), r in rows.items():
        assert r["status"] == "ok", r
        assert r["latency_ms"]["n"] == 2 and r["new_tokens"] == 4
        numbers = [r[k] for k in ("ms_per_token", "decode_ms_per_token", "ttft_ms", "floor_ms")]
        assert all(math.isfinite(v) for v in numbers + list(r["latency_ms"].values()))
        assert r["weight_bytes"] == rows[("hf-eager", 1)]["weight_bytes"]  # one floor per model
        assert r["tokens_equal_hf"] is True, r
    assert payload["env"]["deepspeed_process"]["deepspeed"] == "0.0-test"
    assert isinstance(payload["env"]["deepspeed_build_s"], float)  # as its build process reported it
    assert "DeepSpeed's op JIT build (or its load from the cache) took" in md
    assert payload["env"]["git_commit"] and payload["env"]["jax"] and payload["env"]["torch"]
    assert payload["args"]["systems"][0] == "hf-eager"
    header, _, *table = _table(md)
    assert len(table) == 6 and all(t[header.index("tokens = HF eager")] != "n/a" for t in table)


def test_dsjax_variants_alone(tmp_path, monkeypatch):
    """Variants without HF or DeepSpeed: no torch model (each engine makes the preset's random
    weights), the first variant's tokens are the reference, each floor counts its own weights
    (--own-floor), and every variant's policy is recorded."""
    def no_torch(*args, **kwargs):
        raise AssertionError("no HF model is needed")

    monkeypatch.setattr(compare.presets, "hf_torch_model", no_torch)
    out = tmp_path / "out"
    argv = QUICK + ["--systems", "dsjax-xla,int8-xla", "--own-floor", "--name", "variants", "--out", str(out)]
    assert compare.main(argv) == 0
    payload = json.loads((out / "variants.json").read_text())
    rows = {r["system"]: r for r in payload["rows"]}
    assert all(r["status"] == "ok" and r["compile_s"] > 0 for r in rows.values())
    xla, int8 = rows["dsjax-xla"], rows["dsjax-int8"]
    assert xla["tokens_equal_hf"] is True and int8["tokens_equal_hf"] is not None
    assert int8["weight_bytes"] < xla["weight_bytes"] and int8["kv_bytes"] == xla["kv_bytes"]
    policy = json.loads(json.dumps(dataclasses.asdict(KernelPolicy())))  # tuples become lists
    assert payload["variants"]["dsjax-int8"] == {"kernels": policy, "quant": {"bits": 8}}
    assert payload["args"]["reference"] == "dsjax-xla" and payload["env"]["gemv_bandwidth_at_end"]
    assert "--own-floor --name variants" in payload["args"]["command"]
    assert (out / "variants.md").read_text().startswith("# tiny-gpt2: dsjax variants")


def test_logits_against_hf_float32(tmp_path):
    """--logits: one prompt's logits of HF at --dtype and of each dsjax variant against a
    float32 copy of the HF model (the timed HF model itself is left in bf16)."""
    out = tmp_path / "out"
    assert compare.main(QUICK + ["--systems", "hf-eager,dsjax-xla", "--logits", "--out", str(out)]) == 0
    payload = json.loads((out / "compare-tiny-gpt2.json").read_text())
    got = payload["logits"]["systems"]
    assert set(got) == {"hf-eager", "dsjax-xla"}
    for e in got.values():
        assert 0 < e["rel_l2_vs_fp32"] < 0.05 and 0 <= e["argmax_agreement_vs_fp32"] <= 1
    assert payload["logits"]["median_top2_gap_over_logit_std"] > 0
    assert {r["status"] for r in payload["rows"]} == {"ok"}
    md = (out / "compare-tiny-gpt2.md").read_text()
    assert "One prompt's logits against HF transformers in float32" in md
    assert "| HF transformers eager (bf16) |" in md and "| dsjax XLA |" in md


def test_failures_and_the_deadline_are_rows(tmp_path):
    """No deepspeed importable (an empty site), or one whose kernel injection raises: its rows
    say why. A deadline already past: the systems not started are 'skipped' rows, and the
    report is still written."""
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    raising = FAKE_DEEPSPEED + "\n\ndef init_inference(model, **kw):\n    raise AssertionError(" \
        "'Merging tensors   is not allowed here!\\nsecond line')\n"
    _fake_deepspeed(tmp_path / "raising", raising)
    for site, error in ((tmp_path / "empty", "ModuleNotFoundError: No module named 'deepspeed'"),
                        (tmp_path / "raising", "AssertionError: Merging tensors is not allowed here!")):
        argv = QUICK + ["--systems", "hf-eager,deepspeed", "--deepspeed-site", str(site), "--out", str(out)]
        assert compare.main(argv) == 0
        payload = json.loads((out / "compare-tiny-gpt2.json").read_text())
        ds = [r for r in payload["rows"] if r["system"] == "deepspeed"]
        assert [(r["status"], r["error"]) for r in ds] == [("failed", error)]
        assert f"failed: {error} |" in (out / "compare-tiny-gpt2.md").read_text()
    assert payload["env"]["deepspeed_process"]["deepspeed"] == "0.0-test"  # known before it failed
    assert compare.main(QUICK + ["--systems", "hf-eager,dsjax-xla", "--deadline", str(time.time()),
                                 "--out", str(out)]) == 0
    rows = json.loads((out / "compare-tiny-gpt2.json").read_text())["rows"]
    assert {r["status"] for r in rows} == {"skipped"} and len(rows) == 2
    assert "skipped: " in (out / "compare-tiny-gpt2.md").read_text()


def test_plot_data_and_png(tmp_path):
    rows = [_ok("hf-eager", 1, 20.0, True), _ok("hf-eager", 2, 40.0, True), _ok("dsjax-xla", 2, 4.0, False, [4, 1]),
            _ok("dsjax-xla", 1, 5.0, True), {"system": "deepspeed", "label": "DS", "batch": 1,
                                             "status": "failed", "error": "x"}]
    payload = _payload(rows)
    assert plot_compare.series(payload) == {"HF transformers eager": [(1, 19 / 3), (2, 13.0)],
                                            "dsjax XLA": [(1, 4 / 3), (2, 1.0)]}
    assert plot_compare.floor_series(payload) == [(1, 0.5), (2, 0.5)]
    assert plot_compare.bs1_latency(payload) == {"HF transformers eager": 20.0, "dsjax XLA": 5.0}
    pytest.importorskip("matplotlib")
    png = plot_compare.plot_model(payload, tmp_path / "one.png")
    both = plot_compare.plot_models([payload, payload], tmp_path / "all.png")
    assert png.read_bytes()[:4] == both.read_bytes()[:4] == b"\x89PNG"
