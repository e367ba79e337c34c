"""The command line: the built-in default job, convert, and generate with the checkpoint's tokenizer."""

import pytest

from dsjax import cli
from tests.conftest import WORDS, gpt2_model, word_tokenizer


def test_demo_default_job_agrees_with_hf(capsys):
    # the README's main job (built-in GPT-2 124M), shortened
    assert cli.main(["-q", "demo", "--max-new-tokens", "8", "--runs", "1"]) == 0
    out = capsys.readouterr().out
    assert "dsjax demo: gpt2 (124.4M params" in out
    assert "token agreement with HF: identical (8/8" in out
    assert "ms/token" in out


def test_demo_without_hf(capsys):
    assert cli.main(["-q", "demo", "--arch", "tiny-llama", "--no-hf", "--max-new-tokens", "4", "--runs", "1"]) == 0
    assert "generated 4 tokens" in capsys.readouterr().out


def test_convert_then_generate_with_checkpoint_tokenizer(tmp_path, capsys):
    gpt2_model(vocab_size=len(WORDS) + 6, eos_token_id=0).save_pretrained(tmp_path / "hf")
    word_tokenizer(tmp_path / "hf")
    assert cli.main(["-q", "convert", str(tmp_path / "hf"), str(tmp_path / "ds"), "--dtype", "fp32"]) == 0
    assert (tmp_path / "ds" / "tokenizer.json").exists()
    assert "wrote dsjax checkpoint" in capsys.readouterr().out
    args = ["-q", "generate", "--prompt", "hello world", "--prompt", "deep speed on jax",
            "--max-new-tokens", "5", "--dtype", "fp32", "--max-out-tokens", "64", "--logprobs"]
    assert cli.main(args + ["--model", str(tmp_path / "ds")]) == 0
    from_ckpt = capsys.readouterr().out
    assert from_ckpt.startswith("[0] hello world")
    assert "[1] deep speed on jax" in from_ckpt and "logprobs:" in from_ckpt
    assert cli.main(args + ["--model", str(tmp_path / "hf")]) == 0
    assert capsys.readouterr().out == from_ckpt  # same weights, same tokenizer, same text


def test_help_explains_flags(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--prompt", "--max-new-tokens", "--top-p", "--max-out-tokens", "--seed"):
        assert flag in text


def test_serve_kernels_choose_the_serving_benchmarks_fastest_on_a_gpu():
    """dsjax serve --kernels: auto is Pallas attention and paged-KV kernels with XLA's GEMMs on
    a GPU (what benchmarks/serving.py measured fastest), XLA on the CPU (which would interpret
    the Pallas kernels); the named sets are what they say."""
    from dsjax.cli_serve import kernel_policy
    from dsjax.policy import KernelPolicy

    gpu = kernel_policy("auto", "gpu")
    assert (gpu.paged_attention, gpu.attention, gpu.linear, gpu.experts) == (
        "pallas", "pallas", "xla", "xla")
    assert kernel_policy("auto", "cpu") == KernelPolicy() == kernel_policy("xla", "gpu")
    assert kernel_policy("pallas", "cpu") == KernelPolicy.pallas()
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "tiny-llama", "--kernels", "triton"])
