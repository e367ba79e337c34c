"""The command line on bad input: every expected error is ONE line `dsjax <cmd>: <message>` on
stderr and exit status 2, raised before any weight is read and before anything is written;
--debug shows the traceback; -q silences log lines and progress bars; --help needs no JAX."""

import subprocess
import sys

import numpy as np
import pytest

from dsjax import cli
from tests.conftest import WORDS, gpt2_model, transformers, word_tokenizer


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A GPT-2 HF directory with its tokenizer, and a BERT directory."""
    root = tmp_path_factory.mktemp("models")
    gpt2_model(vocab_size=len(WORDS) + 6, eos_token_id=0).save_pretrained(root / "hf")
    word_tokenizer(root / "hf")
    bert = transformers.BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
                                   num_attention_heads=2, intermediate_size=8,
                                   max_position_embeddings=16)
    transformers.BertModel(bert).save_pretrained(root / "bert")
    return root


@pytest.fixture()
def paths(models, tmp_path):
    """The argv placeholders: the shared models, a non-empty directory, a plain file, an image,
    a dsjax checkpoint whose dsjax.json is cut short."""
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("mine")
    (tmp_path / "file").write_text("mine")
    np.save(tmp_path / "image.npy", np.zeros((3, 16, 16), np.float32))
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "dsjax.json").write_text("{\"format_version\": 2,")
    return {"hf": models / "hf", "bert": models / "bert", "tmp": tmp_path}


def _argv(words, paths):
    return [w.format(**paths) for w in words]


GEN = ["generate", "--prompt", "hello", "--dtype", "fp32"]

# (id, argv with {placeholders}, exit status, message fragment)
CASES = [
    ("convert_into_full_dir", ["convert", "{hf}", "{tmp}/full"], 2, "exists and is not empty"),
    ("convert_onto_a_file", ["convert", "{hf}", "{tmp}/file"], 2, "exists and is not a directory"),
    ("convert_under_a_file", ["convert", "{hf}", "{tmp}/file/ck"], 2, "is not a directory, so"),
    ("convert_missing_source", ["convert", "{tmp}/nowhere", "{tmp}/out"], 2,
     "is neither a directory nor a built-in architecture"),
    ("convert_group_without_quant", ["convert", "{hf}", "{tmp}/out", "--group-size", "8"], 2,
     "--group-size / --asymmetric need --quant"),
    ("convert_bad_group", ["convert", "{hf}", "{tmp}/out", "--quant", "int8", "--group-size", "6"],
     2, "group_size=6 does not divide K=32"),
    ("generate_on_encoder", [*GEN, "--model", "{bert}"], 2, "is an encoder (bert); use dsjax embed"),
    ("generate_missing_model", [*GEN, "--model", "{tmp}/nowhere"], 2, "is neither a directory"),
    ("generate_over_positions", [*GEN, "--model", "{hf}", "--max-out-tokens", "1000"], 2,
     "exceeds the 128 learned positions"),
    ("generate_bad_tp", [*GEN, "--model", "tiny-gpt2", "--tp", "3"], 2, "tp_size=3 does not divide"),
    ("generate_cut_meta", [*GEN, "--model", "{tmp}/cut"], 2,
     "{tmp}/cut/dsjax.json (dsjax checkpoint metadata): is not valid JSON"),
    ("embed_on_decoder", ["embed", "--model", "{hf}", "--text", "hi"], 2,
     "is a gpt2 decoder; use dsjax generate"),
    ("embed_nothing", ["embed", "--model", "{bert}"], 2, "give at least one --text or --image"),
    ("embed_image_on_text_model", ["embed", "--model", "{bert}", "--image", "{tmp}/image.npy"], 2,
     "has no image tower"),
    ("embed_save_to_dir", ["embed", "--model", "{bert}", "--text", "hi", "--save", "{tmp}/full"],
     2, "is a directory; name a .npz file"),
    ("embed_save_under_file", ["embed", "--model", "{bert}", "--text", "hi", "--save",
                               "{tmp}/file/x.npz"], 2, "is not a directory, so"),
    ("bench_out_is_a_file", ["bench", "--model", "tiny-gpt2", "--out", "{tmp}/file"], 2,
     "--out {tmp}/file exists and is not a directory"),
    ("bench_on_encoder", ["bench", "--model", "{bert}", "--out", "{tmp}/r"], 2, "is an encoder"),
]


@pytest.mark.parametrize("name,argv,status,message", CASES, ids=[c[0] for c in CASES])
def test_expected_errors_are_one_line_before_any_work(name, argv, status, message, paths,
                                                      no_weights, capsys):
    before = sorted(paths["tmp"].rglob("*"))
    assert cli.main(_argv(argv, paths)) == status
    out, err = capsys.readouterr()
    assert out == "" and err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith(f"dsjax {argv[0]}: ") and message.format(**paths) in err
    assert sorted(paths["tmp"].rglob("*")) == before  # nothing written


def test_unwritable_output_is_refused_before_any_work(paths, no_weights, monkeypatch, capsys):
    monkeypatch.setattr("os.access", lambda *args, **kwargs: False)
    assert cli.main(["convert", str(paths["hf"]), str(paths["tmp"] / "out")]) == 2
    assert f"{paths['tmp']} is not writable" in capsys.readouterr().err


def test_debug_shows_the_traceback(paths):
    with pytest.raises(FileNotFoundError, match="neither a directory"):
        cli.main(["--debug", *GEN, "--model", str(paths["tmp"] / "nowhere")])


def test_log_lines_show_and_quiet_silences_them(paths, capsys):
    """The default budget adapts to the model's 128 learned positions, the kernel line shows,
    the conversion shows its progress bar; -q leaves stderr empty."""
    argv = [*GEN, "--model", str(paths["hf"]), "--max-new-tokens", "2"]
    assert cli.main(argv) == 0
    err = capsys.readouterr().err
    assert "dsjax: gpt2, 2 layers, float32, budget 128 tokens, kernels xla" in err
    assert "loading gpt2" in err  # the conversion's progress bar
    assert cli.main(["-q", *argv]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("[0] hello") and err == ""


def test_help_does_not_import_jax():
    code = ("import sys\nfrom dsjax.cli import main\n"
            "for argv in (['--help'], ['generate', '--help'], ['embed', '--help'], "
            "['convert', '--help'], ['bench', '--help'], ['demo', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit as e:\n        assert e.code == 0\n"
            "assert 'jax' not in sys.modules, sorted(m for m in sys.modules if 'jax' in m)[:5]\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage: dsjax generate" in proc.stdout and "--debug" in proc.stdout
