"""How far bf16 MoE models part from their own float32 run (CPU): HF transformers' Mixtral and
dsjax's (XLA expert op) on the same random weights, each in bf16 against HF in float32, and
against each other.

    python benchmarks/experiments/moe_bf16_routing.py [--layers 2,8] [--name moe_bf16_routing]

An experiment, not a benchmark of the library. Why: on an H100, benchmarks/moe.py's check gave
bf16 variants of a random 8-layer Mixtral that disagreed with each other and with HF's bf16
(relative logit differences near 1, argmax agreeing in 62% of prompts) while every expert op
equalled a float32 reference at every shape. The question is whether bf16 itself does that
to a random router (its near-ties round differently in every implementation, and one flipped
expert changes a token's output wholesale) or one implementation is wrong. A Mixtral of
hidden size 1024 (8 experts, top-2, HF's own random init), 8 prompts of 64 tokens; measures
as moe.py's check (benchmarks.moe.agreement). Writes results/NAME.{json,md} (and $OUT).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import transformers  # noqa: E402

import dsjax  # noqa: E402
from benchmarks import harness  # noqa: E402
from benchmarks.moe import agreement, check, check_hf  # noqa: E402

VOCAB, PROMPT = 4096, 64


def run(layers: int) -> dict:
    cfg = transformers.AutoConfig.for_model(
        model_type="mixtral", vocab_size=VOCAB, hidden_size=1024, intermediate_size=3584,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=2,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=1e6, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.MixtralForCausalLM(cfg).float().eval()
    hf32 = check_hf(model, VOCAB, PROMPT)
    ours = {dtype: check(dsjax.init_inference(model, dtype=dtype, progress=False,
                                              max_out_tokens=PROMPT + 32), VOCAB, PROMPT)
            for dtype in ("fp32", "bf16")}
    hf16 = check_hf(model.to(torch.bfloat16), VOCAB, PROMPT)
    return {"layers": layers, "pairs": {
        "HF bf16 vs HF fp32": agreement(hf16, hf32),
        "dsjax bf16 vs HF fp32": agreement(ours["bf16"], hf32),
        "dsjax bf16 vs HF bf16": agreement(ours["bf16"], hf16),
        "dsjax fp32 vs HF fp32": agreement(ours["fp32"], hf32)}}


def markdown(payload: dict) -> str:
    lines = ["# bf16 MoE against float32 (random Mixtral, hidden 1024, top-2 of 8; CPU)", "",
             "| layers | pair | logit diff | same argmax | tokens agreeing |", "|---|---|---|---|---|"]
    for r in payload["rows"]:
        lines += [f"| {r['layers']} | {pair} | {a['logit_diff']:.2e} | {a['same_argmax']:.3f} | "
                  f"{a['tokens_agreeing']} |" for pair, a in r["pairs"].items()]
    return "\n".join(lines + ["", harness.versions_line(payload["environment"])]) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=harness.ints, default=[2, 8])
    ap.add_argument("--name", default="moe_bf16_routing")
    ap.add_argument("--out", default=str(harness.RESULTS))
    args = ap.parse_args()
    payload = {"environment": harness.environment(), "rows": [run(n) for n in args.layers]}
    harness.save(args.name, payload, markdown(payload), args.out)
    print(markdown(payload))


if __name__ == "__main__":
    main()
