"""MoQ evidence on the CPU: does DeepSpeed's Mixture-of-Quantization beat plain QAT?

    python benchmarks/moq.py [--quick] [--seed 0] [--out DIR]      (~11 min on 2 cores)

Generates a corpus from a probabilistic grammar (number agreement across relative clauses and
sentential complements, Zipf-distributed words), trains a small decoder (dsjax's generic
Transformer) in full precision, then quantizes it to 8 and 4 bits by
  (a) post-training rounding on MoQ's grid (and, for context, init_inference's own per-channel
      rounding, a finer format),
  (b) plain QAT: fine-tuning at the target bits from the first step,
  (c) MoQ: fine-tuning from target + 3 bits, the bits dropping at steps P, 2P, 4P (P = steps / 8),
  (d) MoQ with the eigenvalue schedule: the same bits, P small enough (steps / 200) that a
      layer stretched 5x at every drop still reaches the target halfway (DeepSpeed's advice),
and, as the reference for what fine-tuning alone does, the full-precision model fine-tuned
for the same steps (twice, in two batch orders: the noise of a fine-tune). 8 and 4 bits cost
this model little, so the same four run at 2 bits (DeepSpeed's ternary weights) too, where
rounding costs a lot. The 8- and 4-bit models are exported, saved, loaded with init_inference
and scored by the served engine (fp32 compute) on held-out text; 2-bit ones (not servable) in
the training forward pass. All fine-tunes share the optimizer, learning-rate schedule, batches
and step count; the MoQ runs are configured with DeepSpeed's own `quantize_training` JSON.
Writes results/moq.{json,md} and moq.png (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

import dsjax  # noqa: E402
from benchmarks import harness  # noqa: E402
from dsjax import checkpoint  # noqa: E402
from dsjax.config import ModelConfig  # noqa: E402
from dsjax.model import random_params  # noqa: E402
from dsjax.quant.train import MoQTrainer, next_token_loss, parse_deepspeed_config  # noqa: E402

# ----------------------------------------------------------------------------- the corpus

NOUNS = ("dog cat bird child teacher farmer river city song machine idea garden king horse "
         "student doctor").split()
VERBS_INTRANSITIVE = "sleep run laugh wait sing fall grow shine".split()
VERBS_TRANSITIVE = "see like find follow help watch carry build".split()
VERBS_SENTENTIAL = "think say know hope".split()
WORDS = {
    "det.s": "the a this every".split(), "det.p": "the some these many".split(),
    "noun.s": NOUNS, "noun.p": [n + "s" for n in NOUNS],
    "vi.s": [v + "s" for v in VERBS_INTRANSITIVE], "vi.p": VERBS_INTRANSITIVE,
    "vt.s": [v + ("es" if v.endswith("ch") else "s") for v in VERBS_TRANSITIVE],
    "vt.p": VERBS_TRANSITIVE,
    "vs.s": [v + "s" for v in VERBS_SENTENTIAL], "vs.p": VERBS_SENTENTIAL,
    "adj": "big small old young red quiet happy strange bright dark".split(),
    "prep": "near with under behind from over".split(),
}
VOCAB = sorted({w for ws in WORDS.values() for w in ws} | {"that", "."})
MAX_DEPTH = 3


class Grammar:
    """S -> NP[n] VP[n]; NP[n] -> Det[n] (Adj) N[n] (that VP[n] | Prep NP); VP[n] -> Vi[n] |
    Vt[n] NP | Vs[n] that S. Words are drawn Zipf-like within their class; deeper phrases
    branch less (none past MAX_DEPTH)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.ids = {w: i for i, w in enumerate(VOCAB)}
        self.classes = {c: (np.asarray([self.ids[w] for w in ws]),
                            (p := 1 / np.arange(1, len(ws) + 1)) / p.sum())
                        for c, ws in WORDS.items()}

    def word(self, cls: str) -> int:
        ids, p = self.classes[cls]
        return int(self.rng.choice(ids, p=p))

    def sentence(self, depth: int = 0) -> list[int]:
        n = "sp"[self.rng.integers(2)]
        return self.noun_phrase(n, depth) + self.verb_phrase(n, depth)

    def noun_phrase(self, n: str, depth: int) -> list[int]:
        out = [self.word("det." + n)]
        if self.rng.random() < 0.3:
            out.append(self.word("adj"))
        out.append(self.word("noun." + n))
        r = self.rng.random() if depth < MAX_DEPTH else 0.0
        if r > 0.85:  # a relative clause: its verb agrees with this noun
            out += [self.ids["that"]] + self.verb_phrase(n, depth + 1)
        elif r > 0.7:
            out += [self.word("prep")] + self.noun_phrase("sp"[self.rng.integers(2)], depth + 1)
        return out

    def verb_phrase(self, n: str, depth: int) -> list[int]:
        r = self.rng.random() if depth < MAX_DEPTH else 0.0
        if r < 0.4:
            return [self.word("vi." + n)]
        if r < 0.85:
            return [self.word("vt." + n)] + self.noun_phrase("sp"[self.rng.integers(2)], depth + 1)
        return [self.word("vs." + n), self.ids["that"]] + self.sentence(depth + 1)

    def stream(self, tokens: int) -> np.ndarray:
        out: list[int] = []
        while len(out) < tokens:
            out += self.sentence() + [self.ids["."]]
        return np.asarray(out[:tokens], np.int32)


def windows(stream: np.ndarray, length: int, count: int, rng) -> np.ndarray:
    starts = rng.integers(0, len(stream) - length, count)
    return np.stack([stream[s: s + length] for s in starts])


# ----------------------------------------------------------------------------- training

def model_config(quick: bool) -> ModelConfig:
    return ModelConfig(family="moq-bench", vocab_size=len(VOCAB), hidden_size=64 if quick else 96,
                       num_layers=2 if quick else 3, num_heads=4,
                       intermediate_size=256 if quick else 384, max_position_embeddings=64)


def moq_json(start: int, target: int, period: int, groups: int, eigenvalue: bool) -> dict:
    """DeepSpeed's quantize_training block (the seeds' form)."""
    return {"quantize_training": {
        "enabled": True, "quantize_type": "symmetric", "quantize_groups": groups,
        "quantize_bits": {"start_bits": start, "target_bits": target},
        "quantize_schedule": {"quantize_period": period, "schedule_offset": 0},
        "eigenvalue": {"enabled": eigenvalue, "max_iter": 20, "tol": 1e-2,
                       "gas_boundary_resolution": 1}}}


def methods(bits: int, steps: int, groups: int, drops: int = 3) -> dict[str, dict]:
    """(b), (c), (d) for `steps` fine-tuning steps. (c) reaches the target at steps / 2; so does
    (d) for a layer whose period is stretched 5x at every drop: P (10)^(drops - 1) <= steps / 2."""
    start = bits + drops
    return {"qat": moq_json(bits, bits, 1, groups, False),
            "moq": moq_json(start, bits, steps // 2 ** drops, groups, False),
            "moq_eig": moq_json(start, bits, max(1, steps // (2 * 10 ** (drops - 1))), groups,
                                True)}


def train(trainer: MoQTrainer, params, batches: np.ndarray, seed: int):
    """Runs one step per batch; the losses and bits stay on the device until the end. Returns
    (state, losses, {layer: the bits of each step's forward pass, its weights' lowest})."""
    state = trainer.init(params, seed=seed)
    losses, bits = [], []
    if trainer.moq is not None:
        bits.append(jnp.stack([state.schedule.bits[p.path] for p in trainer.plan]))
    for batch in batches:
        state, loss = trainer.step(state, jnp.asarray(batch))
        losses.append(loss)
        if trainer.moq is not None:
            bits.append(jnp.stack([state.schedule.bits[p.path] for p in trainer.plan]))
    losses = np.round(np.asarray(jax.device_get(losses), np.float64), 4).tolist()
    if not bits:
        return state, losses, {}
    bits = np.asarray(jax.device_get(bits))[: max(len(batches), 1)]  # [steps, weights]
    layers = sorted({p.layer for p in trainer.plan})
    return state, losses, {str(k): bits[:, [i for i, p in enumerate(trainer.plan) if p.layer == k]]
                           .min(axis=1).tolist() for k in layers}


def optimizer(steps: int, peak: float, warmup: int):
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, steps, peak * 0.05)
    return optax.adamw(schedule, weight_decay=0.01)


# ----------------------------------------------------------------------------- scoring

SERVED_BITS = (8, 4)  # what init_inference serves; 2 bits (ternary) is scored in training's forward


def served_perplexity(path: Path, held_out: np.ndarray, quant=None) -> float:
    """Held-out perplexity of the checkpoint at `path` as init_inference serves it (fp32)."""
    engine = dsjax.init_inference(path, dtype="fp32", quant=quant, progress=False)
    nll = []
    for rows in np.array_split(held_out, max(1, len(held_out) // 64)):
        logp = jax.nn.log_softmax(engine(rows)[:, :-1])
        nll.append(-np.take_along_axis(np.asarray(logp), rows[:, 1:, None], axis=-1)[..., 0])
    return float(math.exp(np.concatenate(nll).mean()))


def trained_perplexity(trainer: MoQTrainer, state, held_out: np.ndarray) -> float:
    """Held-out perplexity of the model as the training forward pass sees it (fake-quantized)."""
    params = trainer.forward_params(state)
    nll = [float(_mean_nll(trainer.graphdef, params, jnp.asarray(rows)))
           for rows in np.array_split(held_out, max(1, len(held_out) // 64))]
    return float(math.exp(np.mean(nll)))


@jax.jit
def _mean_nll(graphdef, params, tokens):
    return next_token_loss(nnx.merge(graphdef, params), tokens)


def quantized_run(name, ds, cfg, fp_params, batches, held_out, seed, tmp) -> dict:
    """Fine-tunes with one MoQ config (no batches: rounding only), then scores the exported
    model as init_inference serves it (8 and 4 bits) and the training forward's model."""
    steps = max(len(batches), 1)
    trainer = MoQTrainer(cfg, parse_deepspeed_config(ds), optimizer(steps, 3e-4, 0),
                         num_steps=steps)
    t0 = time.perf_counter()
    state, losses, bits = train(trainer, fp_params, batches, seed)
    row = {"seconds": time.perf_counter() - t0, "losses": losses, "layer_bits": bits,
           "config": ds, "trained_ppl": trained_perplexity(trainer, state, held_out)}
    row["ppl"] = row["trained_ppl"]
    if trainer.moq.lowest_bits in SERVED_BITS:
        row["ppl"] = served_perplexity(trainer.save(state, Path(tmp) / name), held_out)
    if state.eigenvalues is not None:
        row["eigenvalues"] = np.asarray(state.eigenvalues).tolist()
    print(f"  {name:10s} ppl {row['ppl']:.4f} (training forward {row['trained_ppl']:.4f}, "
          f"{row['seconds']:.0f} s)", flush=True)
    return row


def data_for(args, pre_steps: int, tune_steps: int, batch: int, length: int) -> dict:
    rng = np.random.default_rng(args.seed)
    corpus = Grammar(args.seed).stream(pre_steps * batch * length // 4)
    held_out = Grammar(args.seed + 1000).stream(40_000)
    tune = windows(corpus, length, tune_steps * batch, rng).reshape(tune_steps, batch, length)
    return {"corpus_tokens": len(corpus),
            "pretrain": windows(corpus, length, pre_steps * batch, rng)
            .reshape(pre_steps, batch, length),
            "train": tune, "train_reordered": tune[rng.permutation(tune_steps)],
            "held_out": windows(held_out, length, 64 if args.quick else 256, rng)}


def full_precision(cfg, data, out: dict, seed: int, tmp) -> tuple[dict, Path]:
    """Pre-trains; scores it, and the same fine-tuning in full precision in two data orders."""
    pre_steps, tune_steps = len(data["pretrain"]), len(data["train"])
    t0 = time.perf_counter()
    fp = MoQTrainer(cfg, None, optimizer(pre_steps, 3e-3, pre_steps // 20), num_steps=pre_steps)
    state, out["pretrain_losses"], _ = train(fp, random_params(cfg, seed=seed), data["pretrain"],
                                             seed)
    fp_params, out["pretrain_seconds"] = state.params, time.perf_counter() - t0
    fp_path = checkpoint.save(Path(tmp) / "fp", cfg, fp_params)
    out["fp_ppl"] = served_perplexity(fp_path, data["held_out"])
    print(f"full precision: ppl {out['fp_ppl']:.4f} after {pre_steps} steps "
          f"({out['pretrain_seconds']:.0f} s)", flush=True)
    tuned = MoQTrainer(cfg, None, optimizer(tune_steps, 3e-4, 0), num_steps=tune_steps)
    for key, order in (("fp_finetuned", "train"), ("fp_finetuned_reordered", "train_reordered")):
        state, out[f"{key}_losses"], _ = train(tuned, fp_params, data[order], seed)
        out[f"{key}_ppl"] = trained_perplexity(tuned, state, data["held_out"])
        print(f"{key.replace('_', ' ')}: ppl {out[f'{key}_ppl']:.4f}", flush=True)
    return fp_params, fp_path


def run(args) -> dict:
    cfg = model_config(args.quick)
    pre_steps, tune_steps = (150, 48) if args.quick else (1200, 400)
    batch, length, groups = 16, 64, 8
    data = data_for(args, pre_steps, tune_steps, batch, length)
    out = {"model": json.loads(cfg.to_json()), "vocab": len(VOCAB),
           "corpus_tokens": data["corpus_tokens"], "pretrain_steps": pre_steps,
           "finetune_steps": tune_steps, "batch": batch, "seq_len": length,
           "quantize_groups": groups, "seed": args.seed, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        fp_params, fp_path = full_precision(cfg, data, out, args.seed, tmp)
        for bits in (8, 4, 2):
            print(f"{bits} bits:", flush=True)
            rows = {}
            if bits in SERVED_BITS:
                rows["ptq_dsjax"] = {"ppl": served_perplexity(fp_path, data["held_out"],
                                                              quant={"bits": bits})}
            rows["ptq"] = quantized_run(f"ptq{bits}", methods(bits, 1, groups)["qat"], cfg,
                                        fp_params, data["train"][:0], data["held_out"],
                                        args.seed, tmp)
            for name, ds in methods(bits, tune_steps, groups, 2 if args.quick else 3).items():
                rows[name] = quantized_run(f"{name}{bits}", ds, cfg, fp_params, data["train"],
                                           data["held_out"], args.seed, tmp)
            out["runs"][str(bits)] = rows
    return out


# ----------------------------------------------------------------------------- report

LABELS = {"ptq_dsjax": "post-training rounding, init_inference's format (per channel)",
          "ptq": "(a) post-training rounding on MoQ's grid",
          "qat": "(b) plain QAT at the target bits",
          "moq": "(c) MoQ",
          "moq_eig": "(d) MoQ + eigenvalue schedule"}
BITS = ("8", "4", "2")


def markdown(r: dict, env: dict) -> str:
    m = r["model"]
    lines = [
        "# MoQ vs plain QAT vs post-training rounding (CPU, generated grammar corpus)", "",
        f"{env}", "",
        f"Decoder: {m['num_layers']} layers, width {m['hidden_size']}, MLP "
        f"{m['intermediate_size']}, {m['num_heads']} heads, vocabulary {r['vocab']} words; "
        f"pre-trained {r['pretrain_steps']}"
        f" steps (batch {r['batch']} x {r['seq_len']} tokens), then each method fine-tunes "
        f"{r['finetune_steps']} steps (AdamW 3e-4, cosine, the same batches). Weights quantized: "
        f"the block GEMM kernels, DeepSpeed's symmetric grid in {r['quantize_groups']} groups of "
        "output columns. Perplexity on held-out text: 8 and 4 bits as the exported model is "
        "served by init_inference (fp32 compute); 2 bits (DeepSpeed's ternary weights, which "
        "init_inference does not serve) in the training forward pass.", "",
        f"Full precision: **{r['fp_ppl']:.4f}**. The same in full precision fine-tuned for the "
        f"same steps: **{r['fp_finetuned_ppl']:.4f}** (**{r['fp_finetuned_reordered_ppl']:.4f}** "
        "with the batches in another order: the run-to-run noise of a fine-tune).", "",
        "| method | " + " | ".join(f"{b} bits | vs fp" for b in BITS) + " |",
        "|---|" + "---|---|" * len(BITS)]
    for key, label in LABELS.items():
        cells = []
        for b in BITS:
            row = r["runs"][b].get(key)
            cells += ([f"{row['ppl']:.4f}", f"{row['ppl'] - r['fp_ppl']:+.4f}"] if row
                      else ["-", "-"])
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", *_comparisons(r)]
    gap = max(abs(v["ppl"] - v["trained_ppl"]) for b in BITS if int(b) in SERVED_BITS
              for v in r["runs"][b].values() if "trained_ppl" in v)
    lines += ["", f"Served (exported, int8/int4 kernels' format) vs the training forward's "
              f"fake-quantized model: perplexities agree within {gap:.1e}.", "",
              "| fine-tuning | bits | start bits | quantize_period | first step at each lower "
              "precision, per layer |", "|---|---|---|---|---|"]
    for b in BITS:
        for k in ("qat", "moq", "moq_eig"):
            run = r["runs"][b][k]
            qt = run["config"]["quantize_training"]
            start = qt["quantize_bits"]["start_bits"]
            drops = {layer: _drop_steps(v, start) for layer, v in run["layer_bits"].items()}
            lines.append(f"| {k} | {b} | {start} | {qt['quantize_schedule']['quantize_period']} "
                         f"| {drops} |")
    lines.append("")
    for b in BITS:
        eig = r["runs"][b]["moq_eig"]["eigenvalues"]
        lines.append(f"Eigenvalue run, {b} bits: top Hessian eigenvalue per layer at its last "
                     f"measurement {[round(e, 3) for e in eig]}.  ")
    return "\n".join(lines) + "\n"


def _comparisons(r: dict) -> list[str]:
    """The numbers behind the seeds' claim (plain QAT loses ~0.9 points at 8 bits where MoQ
    matches the baseline): each fine-tune against the full-precision one, and the noise."""
    base = r["fp_finetuned_ppl"]
    noise = abs(base - r["fp_finetuned_reordered_ppl"])
    out = [f"Against the full-precision fine-tune (the baseline; a reordering of its batches "
           f"moves it by {noise:.4f}):", ""]
    for b in BITS:
        runs = r["runs"][b]
        out.append(f"- {b} bits: QAT {runs['qat']['ppl'] - base:+.4f}, MoQ "
                   f"{runs['moq']['ppl'] - base:+.4f}, MoQ + eigenvalues "
                   f"{runs['moq_eig']['ppl'] - base:+.4f}; MoQ - QAT "
                   f"{runs['moq']['ppl'] - runs['qat']['ppl']:+.4f}.")
    return out


def _drop_steps(bits: list[int], start: int) -> list[int]:
    """bits[i]: the bits of step i + 1. The first step at each lower precision."""
    return [i + 1 for i, b in enumerate(bits) if b < (bits[i - 1] if i else start)]


def plot(r: dict, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", flush=True)
        return
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.5))
    colors = {"ptq_dsjax": "#bbb", "ptq": "#999", "qat": "#d62728", "moq": "#1f77b4",
              "moq_eig": "#2ca02c"}
    for ax, bits in zip(axes, BITS):
        keys = [k for k in LABELS if k in r["runs"][bits]]
        vals = [r["runs"][bits][k]["ppl"] for k in keys]
        tuned = [r["runs"][bits][k]["ppl"] for k in ("qat", "moq", "moq_eig")]
        lo = min(tuned + [r["fp_ppl"], r["fp_finetuned_ppl"]])
        hi = max(tuned + [r["fp_ppl"]])
        top = hi + 0.5 * (hi - lo) + 1e-3  # rounding far above the rest: its bar is cut
        ax.bar(range(len(keys)), vals, color=[colors[k] for k in keys])
        for i, v in enumerate(vals):
            ax.text(i, min(v, top), f"{v:.4f}", ha="center", va="bottom", fontsize=7)
        ax.axhline(r["fp_ppl"], color="k", ls="--", label="full precision")
        ax.axhline(r["fp_finetuned_ppl"], color="k", ls=":", label="fp fine-tuned")
        ax.set_xticks(range(len(keys)), [k.replace("_", "\n") for k in keys])
        ax.set(ylim=(lo - 0.3 * (hi - lo) - 1e-3, top + 0.15 * (top - lo)),
               ylabel="held-out perplexity", title=f"{bits}-bit weights")
        ax.legend(fontsize=8)
    ax = axes[3]
    smooth = lambda x: np.convolve(x, np.ones(20) / 20, mode="valid")  # noqa: E731
    ax.plot(smooth(r["fp_finetuned_losses"]), color="k", lw=1, label="full precision")
    for k in ("qat", "moq", "moq_eig"):
        ax.plot(smooth(r["runs"]["2"][k]["losses"]), color=colors[k], lw=1, label=f"{k}, 2 bits")
    ax.set(xlabel="fine-tuning step", ylabel="training loss (20-step mean)",
           title="fine-tuning to 2 bits (ternary)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run to check the script")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None,
                        help="where to write moq.{json,md,png} (default: benchmarks/results)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    result = run(args)
    env = harness.environment()
    result["environment"], result["total_seconds"] = env, time.perf_counter() - t0
    name = "moq_quick" if args.quick else "moq"
    out_dir = args.out or (Path(tempfile.gettempdir()) if args.quick else harness.RESULTS)
    harness.save(name, result, markdown(result, env), out_dir)
    plot(result, out_dir / f"{name}.png")
    print(markdown(result, env))
    print(f"total {result['total_seconds']:.0f} s; wrote {out_dir}/{name}.*")


if __name__ == "__main__":
    main()
