"""Shared fixtures: small random HF torch models (the reference) and their dsjax engines."""

from __future__ import annotations

import json
import os
import struct

# Set before JAX starts (xdist workers inherit the environment), each unless already set:
# - eight simulated CPU devices for the multi-device tests (the others run on the first device);
# - the suite is compile-bound (tiny models, Pallas kernels interpreted): LLVM's optimization of
#   the same HLO is skipped, as the kernel tests' FAST_COMPILE does, and lowering records only
#   the innermost source frame of each op (together about -30% of the suite's time).
# - XLA's CPU fusions through its older IR emitters, where this XLA still has them: they
#   compile the suite's programs in about half the time of the MLIR fusion emitters (the
#   backend compile of test_decoder_families 21 -> 10 s, test_kernel_injection 71 -> 34 s)
_FLAGS = ("--xla_force_host_platform_device_count=8", "--xla_backend_optimization_level=0",
          "--xla_llvm_disable_expensive_passes=true")
_OPTIONAL = ("--xla_cpu_use_fusion_emitters=false",)


def _xla_knows(flag: str) -> bool:
    """Whether this jaxlib's XLA takes `flag` (an unknown flag aborts the process that
    starts a backend): asked of a child process, once per session (the answer travels to the
    workers in DSJAX_TESTS_XLA_UNKNOWN)."""
    import subprocess
    import sys

    if flag in os.environ.get("DSJAX_TESTS_XLA_UNKNOWN", "").split():
        return False
    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    try:
        known = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                               capture_output=True, timeout=120).returncode == 0
    except subprocess.TimeoutExpired:
        known = False
    if not known:
        os.environ["DSJAX_TESTS_XLA_UNKNOWN"] = (os.environ.get("DSJAX_TESTS_XLA_UNKNOWN", "")
                                                 + " " + flag).strip()
    return known


for _flag in _FLAGS + _OPTIONAL:
    if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", "") and (
            _flag not in _OPTIONAL or _xla_knows(_flag)):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS", "false")
# - torch (the HF reference models, tiny) on one thread per worker: with two workers on two
#   cores, its threads would wait for each other at every op
os.environ.setdefault("OMP_NUM_THREADS", "1")
# - one persistent compilation cache for the session, shared by the xdist workers: a program
#   that both workers build (the shared engines' generate, a kernel test's shapes) compiles once
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="dsjax-tests-jit-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)  # its creator
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.2"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import dsjax  # noqa: E402

# A wide init spreads the logits, so greedy tokens vary instead of repeating one token.
INIT = 0.25


def perturb(model, scale=0.5):
    """Adds Gaussian noise of std `scale` to every parameter of a torch model, biases and norm
    scales too: HF initialises those to 0 and 1, behind which a wrongly mapped tensor (two norms
    swapped, a bias dropped or misordered) converts to the same numbers and a parity test cannot
    see it. The model builders below perturb by INIT: greedy tokens still vary and fp32 logits
    stay within the parity tests' 1e-4."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def gpt2_model(seed=0, **overrides):
    cfg = dict(vocab_size=96, n_positions=128, n_embd=32, n_layer=2, n_head=4,
               initializer_range=INIT, eos_token_id=None, bos_token_id=None)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return perturb(transformers.GPT2LMHeadModel(transformers.GPT2Config(**cfg)), INIT)


def llama_model(seed=0, **overrides):
    cfg = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
               initializer_range=INIT, eos_token_id=None, bos_token_id=None, pad_token_id=None,
               tie_word_embeddings=False)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return perturb(transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)), INIT)


def hf_greedy(model, prompt, n, eos_token_id=None):
    """HF transformers' own greedy tokens for one prompt (new tokens only)."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             do_sample=False, eos_token_id=eos_token_id, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def hf_greedy_logprobs(model, prompt, n):
    """HF's greedy tokens and the log-probability of each under its own (unprocessed) logits."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, pad_token_id=0,
                             output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):]
    logits = torch.stack(out.logits)[:, 0].float()
    return tokens.tolist(), torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0].numpy()


def hf_logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


WORDS = ["<eos>", "<unk>", "hello", "world", "deep", "speed", "jax", "on", "the", "gpu"]


def edit_safetensors_header(path, fn) -> None:
    """Rewrites a safetensors file's header JSON through fn(header) (in place), keeping its data
    section: how the tests plant a malformed entry the format's own writer would refuse."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    fn(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def word_tokenizer(directory):
    """Saves a tiny word-level HF tokenizer (built offline) into a checkpoint directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>",
                                         unk_token="<unk>").save_pretrained(directory)


def prompt(seed, length, vocab=96):
    return np.random.default_rng(seed).integers(0, vocab, length).tolist()


@pytest.fixture(scope="session")
def gpt2_pair():
    model = gpt2_model()
    return model, dsjax.init_inference(model, dtype="fp32", max_out_tokens=128, progress=False)


@pytest.fixture(scope="session")
def llama_pair():
    model = llama_model()
    return model, dsjax.init_inference(model, dtype="fp32", max_out_tokens=128, progress=False)


# The modules whose tests take longest (compile-bound: interpreted Pallas kernels, meshes of 8
# simulated devices, one engine per family; benchmark runs in subprocesses), run first, so that the last tests of the run are
# short ones and neither xdist worker waits for the other at the end.
SLOW_FIRST = ("tests/test_compare.py", "tests/test_kernel_injection.py", "tests/parallel/",
              "tests/converters/test_decoder_families.py", "tests/pallas_kernels/",
              "tests/test_cli.py")


@pytest.hookimpl(trylast=True)  # after pytest's own grouping by fixture parameters
def pytest_collection_modifyitems(items):
    def rank(item):
        return next((i for i, p in enumerate(SLOW_FIRST) if item.nodeid.startswith(p)),
                    len(SLOW_FIRST))
    items.sort(key=rank)  # stable: each module keeps its order
