"""One process of a multi-process test (tests/parallel/test_multiprocess.py): joins the others
through DSJAX_* environment variables, builds a tiny random model over the global mesh,
generates, and writes its tokens as JSON.

    python _mp_worker.py CASES OUT.json     (CASES: see main)
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

CASES = {  # mesh degrees, dp x pp x tp = 8 over two processes of 4 devices
    "tp": dict(tensor_parallel=8),
    "pp": dict(tensor_parallel=4, pipeline_parallel=2),
    "dp": dict(tensor_parallel=4, data_parallel=2),
    # an HF safetensors checkpoint (its directory in DSJAX_TEST_HF), int8 weights: each process
    # reads and quantizes only its devices' slices
    "hf": dict(tensor_parallel=8, quant={"bits": 8, "group_size": 8}),
    # the continuous-batching engine, a replica on each process
    "serve": dict(tensor_parallel=4, data_parallel=2),
}
NAN = dict(tensor_parallel=8)  # DSJAX_TEST_HF_NAN: a checkpoint with a NaN one process reads
PROMPTS = [[1, 5, 9, 13], [1, 7], [1, 2, 3, 4, 5, 6], [1, 100, 200]]


def config():
    from dsjax.config import ModelConfig

    return ModelConfig(family="llama", vocab_size=256, hidden_size=64, num_layers=2, num_heads=8,
                       num_kv_heads=8, intermediate_size=128, norm="rmsnorm", activation="silu",
                       gated_mlp=True, positions="rotary")


def run(engine, case: str) -> dict:
    """Greedy tokens with their log-probabilities of PROMPTS; sampled tokens (fixed key), or
    for the dp case engine(ids)'s logits instead (a program fewer to compile); for the serve
    case the serving engine's tokens, greedy and sampled (seeded), and its blocks in use."""
    import jax

    if case == "serve":
        return serve(engine)

    greedy = engine.generate(PROMPTS, max_new_tokens=6, eos_token_id=[], return_logprobs=True)
    out = dict(greedy=greedy.sequences, logprobs=greedy.logprobs.tolist())
    if engine.bytes_read is not None:
        out["bytes_read"] = engine.bytes_read
    if case == "dp":
        out["logits"] = np.asarray(engine([PROMPTS[0][:2], PROMPTS[1]])).tolist()
    else:
        out["sampled"] = engine.generate(PROMPTS, max_new_tokens=6, eos_token_id=[],
                                         do_sample=True, temperature=1.0,
                                         prng_key=jax.random.key(7)).sequences
    return out


def serve(engine) -> dict:
    from dsjax.serving.engine import ServingEngine

    srv = ServingEngine(engine, block_size=4, num_blocks=24, token_budget=16, max_seqs=4)
    ids = [srv.add_request(p, max_new_tokens=6, eos_token_id=[]) for p in PROMPTS]
    ids += [srv.add_request(PROMPTS[0], max_new_tokens=6, eos_token_id=[], do_sample=True,
                            temperature=1.0, seed=11)]
    replicas = sorted({srv.requests[i].replica for i in ids})
    done = {}
    while srv.has_unfinished():
        done.update({o.request_id: o for o in srv.step() if o.finished})
    return dict(greedy=[done[i].token_ids for i in ids[:-1]], sampled=done[ids[-1]].token_ids,
                logprobs=[done[i].logprobs for i in ids[:-1]], blocks=srv.blocks_in_use(),
                replicas=replicas)


def engine_for(case: str, **kw):
    import dsjax
    from dsjax.sources import open_source

    hf = {"hf": "DSJAX_TEST_HF", "nan": "DSJAX_TEST_HF_NAN"}.get(case)
    model = open_source(os.environ[hf]) if hf else config()
    engine = dsjax.init_inference(model, dtype="fp32", max_out_tokens=16, progress=False,
                                  seed=3, **{**CASES.get(case, NAN), **kw})
    engine.bytes_read = model.read.bytes_read if case == "hf" else None
    return engine


def main(cases: str, out: str) -> None:
    """cases: comma-separated names of CASES, each run in turn; "die-R" / "die-R-late":
    rank R leaves right after joining / after building its engine (the others must fail,
    not hang)."""
    from dsjax.parallel import distributed

    distributed.initialize()
    rank = int(os.environ["DSJAX_PROCESS_ID"])
    if cases.startswith("die-"):
        _, dying, *late = cases.split("-")
        if not late and rank == int(dying):
            os._exit(3)
        engine = engine_for("tp", distributed=True)
        if rank == int(dying):
            os._exit(3)
        run(engine, "tp")
        return
    result = {case: run(engine_for(case, distributed=True), case) for case in cases.split(",")}
    try:  # degrees that leave devices out: an error before any weight is read
        engine_for("tp", distributed=True, tensor_parallel=4)
    except ValueError as e:
        result["error"] = str(e)
    try:  # a NaN in a slice that one process reads: both fail, naming it
        engine_for("nan", distributed=True)
    except ValueError as e:
        result["nan"] = f"{type(e).__name__}: {e}"
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:3])
