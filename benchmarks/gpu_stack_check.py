"""On the GPU machine: the Pallas kernels compiled for the GPU (not interpreted) against the XLA
path, per policy, on built-in random-weight architectures: greedy tokens and the largest logit
difference, and which kernels each program holds. Prints one table; writes it as JSON to $OUT.

    python benchmarks/gpu_stack_check.py [--archs tiny-llama,tiny-gpt2]

(`benchmarks/gpu_stack_tests.sh` runs it after the test suite on that machine's JAX.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

import jax
import numpy as np

import dsjax
from dsjax import KernelPolicy
from dsjax.pallas_ops import pallas_calls

POLICIES = {
    "pallas": KernelPolicy.pallas(),
    "pallas-gemv0": KernelPolicy.pallas(gemv_rows=0),
    "pallas-lnfused": KernelPolicy.pallas(gemv_fused_norms=("rmsnorm", "layernorm")),
    "pallas-split256": KernelPolicy.pallas(min_split_keys=256),
}


def kernels_of(engine, rows) -> dict:
    """Kernel name -> pallas_call count in the program engine.generate(rows) runs."""
    fn, args, kw = engine.greedy_program(rows, 8, int8_cache=False)
    return dict(pallas_calls(fn.trace(*args, **kw).jaxpr))


def check(arch: str, name: str, policy: KernelPolicy) -> dict:
    kw = dict(dtype="fp32", max_out_tokens=256, progress=False)
    xla = dsjax.init_inference(arch, **kw)
    pallas = dsjax.init_inference(arch, kernels=policy, **kw)
    rng = np.random.default_rng(0)
    rows = [rng.integers(0, xla.config.vocab_size, 20).tolist()]
    ids = np.asarray(rows)
    diff = float(np.abs(np.asarray(pallas(ids)) - np.asarray(xla(ids))).max())
    a = xla.generate(rows, max_new_tokens=16, eos_token_id=[]).sequences
    b = pallas.generate(rows, max_new_tokens=16, eos_token_id=[]).sequences
    return {"arch": arch, "policy": name, "same_tokens": a == b, "max_logit_diff": diff,
            "kernels": kernels_of(pallas, rows), "policy_fields": dataclasses.asdict(policy)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default="tiny-llama,tiny-gpt2")
    a = p.parse_args()
    rows = []
    with jax.default_matmul_precision("highest"):  # fp32 on both sides, no TF32
        for arch in a.archs.split(","):
            for name, policy in POLICIES.items():
                rows.append(check(arch, name, policy))
                r = rows[-1]
                print(f"{arch:12s} {name:16s} same tokens {r['same_tokens']!s:5s} "
                      f"max |dlogit| {r['max_logit_diff']:.2e}  {r['kernels']}", flush=True)
    env = {"device": str(jax.devices()[0]), "jax": jax.__version__}
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_stack_check.json").write_text(
            json.dumps({"env": env, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
