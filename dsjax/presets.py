"""Built-in architectures (HF config dicts): run with random weights, no download needed.

The same dict builds the HF torch model (for parity checks and baselines) and, through the
family's converter, the dsjax ModelConfig, so both sides always describe the same network.
"""

from __future__ import annotations

import copy

PRESETS: dict[str, dict] = {
    # GPT-2 small (124M): the default of `dsjax demo`
    "gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=50257,
                 n_positions=1024, n_embd=768, n_layer=12, n_head=12, eos_token_id=50256,
                 bos_token_id=50256, activation_function="gelu_new", layer_norm_epsilon=1e-5),
    # GPT-2 1.3B architecture as DeepSpeed's benchmarks use it (24 layers, 2048 wide)
    "gpt2-1.3b": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=50257,
                      n_positions=2048, n_embd=2048, n_layer=24, n_head=16, eos_token_id=50256,
                      bos_token_id=50256, activation_function="gelu_new", layer_norm_epsilon=1e-5),
    "llama3-8b": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
                      hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                      hidden_act="silu", tie_word_embeddings=False, bos_token_id=128000,
                      eos_token_id=128001),
    # Llama-3.2-1B's shape (16 layers x 2048 wide, GQA 32/8 x 64, tied embeddings; no RoPE
    # scaling): the small model of the serving benchmark
    "llama3.2-1b": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=128256,
                        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                        num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                        max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=500000.0,
                        hidden_act="silu", tie_word_embeddings=True, bos_token_id=128000,
                        eos_token_id=128001),
    # EleutherAI/gpt-j-6b's config.json (DeepSpeed's inference tutorials use it)
    "gptj-6b": dict(model_type="gptj", architectures=["GPTJForCausalLM"], vocab_size=50400,
                    n_positions=2048, n_embd=4096, n_layer=28, n_head=16, rotary_dim=64,
                    n_inner=None, activation_function="gelu_new", layer_norm_epsilon=1e-5,
                    tie_word_embeddings=False, bos_token_id=50256, eos_token_id=50256),
    # bigscience/bloom-7b1's config.json
    "bloom-7b1": dict(model_type="bloom", architectures=["BloomForCausalLM"], vocab_size=250880,
                      hidden_size=4096, n_layer=30, n_head=32, layer_norm_epsilon=1e-5,
                      apply_residual_connection_post_layernorm=False, pretraining_tp=1,
                      slow_but_exact=False, bos_token_id=1, eos_token_id=2, pad_token_id=3),
    # tiny ones for tests and quick looks
    "tiny-gpt2": dict(model_type="gpt2", architectures=["GPT2LMHeadModel"], vocab_size=512,
                      n_positions=256, n_embd=64, n_layer=2, n_head=4, eos_token_id=511,
                      bos_token_id=511, activation_function="gelu_new"),
    "tiny-llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=512,
                       hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       hidden_act="silu", tie_word_embeddings=False, eos_token_id=2,
                       bos_token_id=1),
}


def hf_config(name: str) -> dict:
    try:
        return copy.deepcopy(PRESETS[name])
    except KeyError:
        raise ValueError(f"unknown built-in architecture {name!r}; known: {', '.join(PRESETS)}") from None


def model_config(name: str):
    """The dsjax ModelConfig of a built-in architecture (through its family's converter)."""
    import converters

    hf = hf_config(name)
    return converters.policy_for(hf).make_config(hf)


def hf_torch_model(name: str, seed: int = 0, dtype=None, device: str = "cpu"):
    """The HF transformers torch model of a preset with seeded random weights (needs torch),
    initialised directly on `device` in `dtype` (default float32)."""
    import torch
    import transformers

    hf = hf_config(name)
    config = transformers.AutoConfig.for_model(**hf)
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype or torch.float32)
    try:
        with torch.device(device):
            model = getattr(transformers, hf["architectures"][0])(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, for presets that ship no tokenizer. Ids >= 256 (which
    random weights produce) decode as <id>."""

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        out, run = [], bytearray()
        for i in map(int, ids):
            if i < 256:
                run.append(i)
                continue
            out.append(run.decode("utf-8", errors="replace"))
            run = bytearray()
            out.append(f"<{i}>")
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)
