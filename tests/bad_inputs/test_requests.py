"""Bad requests and options: one row per case, each an error of the expected type whose message
names the problem, raised before the expensive step (no program traced, no weight read)."""

import json
import logging
import shutil

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

import dsjax
import dsjax.cache
import dsjax.engine
from dsjax.integrity import NonFiniteWeights
from tests.conftest import gpt2_model, prompt

BIG = np.int64(2**40)

# (id, generate keyword arguments, exception, message fragment)
GENERATE = [
    ("float_ids", dict(input_ids=[[1.0, 2.0]]), TypeError, "integer token ids, got float64"),
    ("int64_beyond_int32", dict(input_ids=np.array([[3, BIG]])), ValueError,
     r"must lie in \[0, 2147483647\]"),
    ("a_string", dict(input_ids="hello"), TypeError, "got a string; encode text"),
    ("list_of_strings", dict(input_ids=["hello", "world"]), TypeError, "encode text"),
    ("bool_ids", dict(input_ids=np.array([[True, False]])), TypeError, "integer token ids, got bool"),
    ("nested_deeper", dict(input_ids=[[[1, 2]], [[3, 4]]]), ValueError, "row 0 is nested deeper"),
    ("array_3d", dict(input_ids=np.zeros((1, 1, 2), np.int32)), ValueError, r"\[batch, tokens\]"),
    ("empty_row", dict(input_ids=[[1, 2], []]), ValueError, "at least one token"),
    ("ids_outside_vocab", dict(input_ids=[[1, 96]]), ValueError, r"must lie in \[0, 96\)"),
    ("mask_not_0_1", dict(input_ids=[[1, 2]], attention_mask=[[1, 2]]), ValueError,
     "must hold 0 and 1"),
    ("mask_shape", dict(input_ids=[[1, 2]], attention_mask=[[1, 1, 1]]), ValueError,
     "attention_mask shape"),
    ("max_new_tokens_float", dict(max_new_tokens=5.0), TypeError, "max_new_tokens must be an integer"),
    ("max_new_tokens_bool", dict(max_new_tokens=True), TypeError, "max_new_tokens must be an integer"),
    ("max_new_tokens_zero", dict(max_new_tokens=0), ValueError, "max_new_tokens must be >= 1"),
    ("over_budget", dict(max_new_tokens=200), ValueError, "exceeds the token budget"),
    ("do_sample_string", dict(do_sample="False"), TypeError, "do_sample must be True or False"),
    ("logprobs_int", dict(return_logprobs=1), TypeError, "return_logprobs must be True or False"),
    ("nan_temperature", dict(do_sample=True, temperature=float("nan")), ValueError,
     "temperature must be finite"),
    ("inf_top_p", dict(do_sample=True, top_p=float("inf")), ValueError, "top_p must be finite"),
    ("zero_temperature_sampling", dict(do_sample=True, temperature=0.0), ValueError,
     "temperature must be > 0 when sampling"),
    ("float_top_k", dict(do_sample=True, top_k=2.5), TypeError, "top_k must be an integer"),
    ("no_key_sampling", dict(do_sample=True, prng_key=None), ValueError, "needs an explicit prng_key"),
    ("int_key", dict(do_sample=True, prng_key=0), TypeError, "prng_key must be one jax.random.key"),
    ("eos_string", dict(eos_token_id="</s>"), TypeError, "eos_token_id must be a token id"),
    ("eos_float", dict(eos_token_id=[2.0]), TypeError, "eos_token_id must be an integer"),
    ("pad_outside_vocab", dict(pad_token_id=500), ValueError, r"pad_token_id must lie in \[0, 96\)"),
    ("pad_negative", dict(pad_token_id=-1), ValueError, "pad_token_id must be >= 0"),
]


@pytest.fixture()
def untraced(gpt2_pair, monkeypatch):
    """The shared GPT-2 engine, with tracing and running a program made an error."""
    engine = gpt2_pair[1]

    def boom(*args, **kwargs):
        raise AssertionError("a program ran before the request was checked")

    monkeypatch.setattr(engine, "generate_program", boom)
    monkeypatch.setattr(engine.runner, "forward", boom)
    return engine


@pytest.mark.parametrize("kwargs,err,match", [r[1:] for r in GENERATE], ids=[r[0] for r in GENERATE])
def test_bad_generate_request(untraced, kwargs, err, match):
    kwargs = {"input_ids": [[1, 2, 3]], "max_new_tokens": 4, "prng_key": jax.random.key(0),
              **kwargs}
    with pytest.raises(err, match=match):
        untraced.generate(**kwargs)


@pytest.mark.parametrize("ids,err,match", [
    ([[1.0, 2.0]], TypeError, "integer token ids, got float64"),
    (np.array([[1, BIG]]), ValueError, r"must lie in \[0, 2147483647\]"),
    ("hello", TypeError, "got a string"),
    (np.zeros((1, 1, 2), np.int32), ValueError, r"\[batch, tokens\]"),
    (np.array([[1, 96]]), ValueError, r"must lie in \[0, 96\)"),
], ids=["float_ids", "int64_beyond_int32", "a_string", "array_3d", "outside_vocab"])
def test_bad_forward_request(untraced, ids, err, match):
    """engine(ids) checks ids exactly as generate() does (no cast that wraps or truncates)."""
    with pytest.raises(err, match=match):
        untraced(ids)


def test_a_batch_beyond_device_memory_is_refused_with_the_bytes(untraced, monkeypatch):
    """A packed batch whose KV cache exceeds the device's free memory: an error stating the
    bytes, before the program runs (the device reports 1 MB free here)."""
    monkeypatch.setattr(dsjax.cache, "device_memory", lambda device: (2**20, 0))
    # 2 layers x 2 (K, V) x 4 heads x 8 dims x 4 bytes x 128 slots = 64 KiB per row; 64 rows
    with pytest.raises(ValueError, match=r"a batch of 64 packed rows .* needs 4,194,304 bytes of "
                                         r"KV cache .* 1,048,576 bytes free"):
        untraced.generate([[1, 2]] * 40, max_new_tokens=2)


def test_device_memory_reports_the_host_on_a_cpu():
    limit, used = dsjax.cache.device_memory(jax.devices()[0])
    assert 2**28 < limit and 0 <= used < limit


def test_numpy_scalars_and_greedy_sampling_values(gpt2_pair):
    """numpy integers are integers everywhere; greedy decoding ignores the sampling values it
    does not read (temperature=0 included), as HF's generate does."""
    engine = gpt2_pair[1]
    rows = [prompt(1, 5), prompt(2, 7)]
    plain = engine.generate(rows, max_new_tokens=6, eos_token_id=[])
    again = engine.generate([np.array(r, np.int64) for r in rows], max_new_tokens=np.int32(6),
                            eos_token_id=np.array([], np.int64), temperature=0.0, top_k=-3,
                            top_p=float("nan"), pad_token_id=np.int64(0))
    np.testing.assert_array_equal(plain.tokens, again.tokens)
    logits = engine(np.array(rows[0], np.uint8))
    assert logits.shape == (1, 5, 96)


PRESET = "tiny-llama"
# (id, init_inference keyword arguments, exception, message fragment)
OPTIONS = [
    ("budget_beyond_int32", dict(max_out_tokens=10**12), ValueError, "max_out_tokens must be <= 2147483647"),
    ("budget_beyond_memory", dict(max_out_tokens=2**30), ValueError,
     r"max_out_tokens=1073741824 for the smallest batch \(2 rows\) needs [\d,]+ bytes of KV cache"),
    ("budget_string", dict(max_out_tokens="1024"), TypeError, "max_out_tokens must be an integer"),
    ("budget_float", dict(max_out_tokens=64.0), TypeError, "max_out_tokens must be an integer"),
    ("inject_string", dict(replace_with_kernel_inject="yes"), TypeError,
     "replace_with_kernel_inject must be True or False"),
    ("progress_int", dict(progress=1), TypeError, "progress must be True or False"),
    ("check_finite_none", dict(check_finite=None), TypeError, "check_finite must be True or False"),
    ("seed_float", dict(seed=1.5), TypeError, "seed must be an integer"),
    ("config_not_dict", dict(config=[("dtype", "fp32")]), TypeError, "config must be a dict"),
    ("config_and_keyword_differ", dict(config={"dtype": "fp32"}, dtype="bf16"), ValueError,
     "dtype is given twice with different values: 'bf16' as a keyword and 'fp32' in config"),
]


@pytest.fixture()
def unloaded(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("weights were loaded before the options were checked")

    monkeypatch.setattr(dsjax.engine, "load_params", boom)


@pytest.mark.parametrize("kwargs,err,match", [r[1:] for r in OPTIONS], ids=[r[0] for r in OPTIONS])
def test_bad_init_option(unloaded, kwargs, err, match):
    with pytest.raises(err, match=match):
        dsjax.init_inference(PRESET, **kwargs)


def test_same_option_twice_with_one_value_and_numpy_budget():
    engine = dsjax.init_inference(PRESET, config={"dtype": "fp32"}, dtype="fp32",
                                  max_out_tokens=np.int64(64), progress=False)
    assert engine.inference_config.max_out_tokens == 64 and engine.inference_config.dtype == "float32"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt2")
    gpt2_model().save_pretrained(directory)
    return directory


def test_config_ids_outside_the_vocabulary_warn_once_and_run_as_hf(gpt2_dir, tmp_path, caplog):
    """config.json's eos/pad 50256 with a 96-token vocabulary (a common copy-paste): a warning
    naming the field, then generate runs as transformers' does: never stopping at that eos,
    filling a row that ended at the caller's eos with the config's pad."""
    gpt2_dir = _copy(gpt2_dir, tmp_path)
    cfg = json.loads((gpt2_dir / "config.json").read_text())
    (gpt2_dir / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 50256,
                                                      "pad_token_id": 50256, "bos_token_id": 50256}))
    hf = gpt2_model()
    with caplog.at_level(logging.WARNING, logger="dsjax"):
        engine = dsjax.init_inference(gpt2_dir, dtype="fp32", max_out_tokens=128, progress=False)
    warned = [r.getMessage() for r in caplog.records if "outside the 96-token vocabulary" in r.getMessage()]
    assert len(warned) == 3 and all("config.json" in w for w in warned)
    assert any("pad_token_id=50256" in w for w in warned)
    rows = [prompt(3, 6), prompt(4, 6)]
    n = 8
    first = engine.generate(rows, max_new_tokens=n).tokens  # eos 50256 never stops a row
    assert (first < 96).all()
    stop = int(first[0, 2])  # row 0 stops at its third token (or earlier)
    ours = engine.generate(rows, max_new_tokens=n, eos_token_id=stop)
    for row, tokens, count in zip(rows, ours.tokens, ours.num_tokens):
        # one row at a time: transformers feeds a finished row's pad back into its embedding,
        # which fails for a pad outside the vocabulary; dsjax only writes it to the output
        with torch.no_grad():
            theirs = hf.generate(torch.tensor([row]), attention_mask=torch.ones(1, 6, dtype=torch.long),
                                 max_new_tokens=n, do_sample=False, eos_token_id=stop,
                                 pad_token_id=50256)[0, 6:].tolist()
        assert tokens[:count].tolist() == theirs
        assert (tokens[count:] == 50256).all()
    assert ours.num_tokens[0] <= 3


def _copy(directory, tmp_path):
    shutil.copytree(directory, tmp_path / "copy")
    return tmp_path / "copy"


def test_a_nan_weight_is_named_and_check_finite_false_loads_it(gpt2_dir, tmp_path):
    bad = _copy(gpt2_dir, tmp_path)
    tensors = load_file(bad / "model.safetensors")
    tensors["transformer.h.1.mlp.c_proj.weight"][3, 5] = np.inf
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(NonFiniteWeights, match=r"'layers\.1\.mlp\.down\.kernel' .* holds NaN or inf"):
        dsjax.init_inference(bad, dtype="fp32", max_out_tokens=128, progress=False)
    with pytest.raises(NonFiniteWeights, match=r"'layers\.1\.mlp\.down\.kernel' .*in the slice"):
        dsjax.init_inference(bad, dtype="fp32", max_out_tokens=128, progress=False,
                             tensor_parallel=2)  # a lazy load: the slice holding it, checked
    engine = dsjax.init_inference(bad, dtype="fp32", max_out_tokens=128, progress=False,
                                  check_finite=False)
    assert not np.isfinite(np.asarray(engine.params["layers"][1]["mlp"]["down"]["kernel"])).all()
