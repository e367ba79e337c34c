"""Several processes, one mesh: two CPU processes of 4 devices each (gloo collectives) run
tensor, pipeline and data parallelism over all 8 devices (tests/parallel/_mp_worker.py), and
give the tokens of this process's one-process engine on its 8 simulated devices."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dsjax.launch import free_port
from tests.parallel import _mp_worker as worker

WORKER = Path(worker.__file__)
ROOT = WORKER.parents[2]


def hf_checkpoint(directory: Path, nan: bool = False) -> int:
    """A tiny HF LLaMA saved as safetensors (fp32, every parameter random; with nan, the last
    row of layer 1's up_proj, which one device's slice holds, starts with NaN); its weight
    bytes."""
    import torch
    import transformers

    cfg = worker.config()
    hf = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        intermediate_size=cfg.intermediate_size, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hf)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        if nan:
            model.model.layers[1].mlp.up_proj.weight[-1, 0] = float("nan")
    model.save_pretrained(directory)
    return sum(p.numel() * 4 for p in model.parameters())


def _env(rank: int, port: int) -> dict:
    flags = os.environ.get("XLA_FLAGS", "").replace("device_count=8", "device_count=4")
    env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_COMPILATION_CACHE")}
    return dict(env, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                DSJAX_COMPILATION_CACHE="0",  # no persistent cache shared between ranks
                DSJAX_COORDINATOR=f"127.0.0.1:{port}", DSJAX_NUM_PROCESSES="2",
                DSJAX_PROCESS_ID=str(rank), DSJAX_HEARTBEAT_TIMEOUT="5")


class Pair:
    """Two worker processes on `cases`; their outputs go to files under `tmp`."""

    def __init__(self, cases: str, tmp: Path):
        port, self.tmp = free_port(), tmp
        self.logs = [open(tmp / f"log{r}.txt", "w") for r in range(2)]
        self.procs = [subprocess.Popen(
            [sys.executable, str(WORKER), cases, str(tmp / f"out{r}.json")], env=_env(r, port),
            stdout=self.logs[r], stderr=subprocess.STDOUT, cwd=ROOT) for r in range(2)]

    def wait(self, timeout: float, fail_fast: bool) -> list[int | None]:
        """Exit codes (None: still running at the timeout, then killed); fail_fast kills the
        other process as soon as one fails."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            codes = [p.poll() for p in self.procs]
            if all(c is not None for c in codes) or (fail_fast and any(codes)):
                break
            time.sleep(0.2)
        codes = [p.poll() for p in self.procs]
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for f in self.logs:
            f.close()
        return codes

    def log(self, rank: int) -> str:
        return (self.tmp / f"log{rank}.txt").read_text()[-3000:]

    def result(self, rank: int) -> dict:
        return json.loads((self.tmp / f"out{rank}.json").read_text())


def test_two_processes_give_the_one_process_tokens(tmp_path, monkeypatch):
    """Every case's tokens equal the one-process engine's; from an HF checkpoint each process
    reads about half of its bytes (the one process all of them, each once); a NaN that only
    one process reads fails both, naming the weight."""
    weights = hf_checkpoint(tmp_path / "hf")
    hf_checkpoint(tmp_path / "nan", nan=True)
    monkeypatch.setenv("DSJAX_TEST_HF", str(tmp_path / "hf"))
    monkeypatch.setenv("DSJAX_TEST_HF_NAN", str(tmp_path / "nan"))
    cases = list(worker.CASES)
    pair = Pair(",".join(cases), tmp_path)
    try:  # the one-process reference, on this process's 8 devices, while they run
        expected = {case: worker.run(worker.engine_for(case), case) for case in cases}
    finally:
        codes = pair.wait(timeout=180, fail_fast=True)
    assert codes == [0, 0], f"exit codes {codes}\n{pair.log(0)}\n{pair.log(1)}"
    got = [pair.result(r) for r in range(2)]
    assert expected["hf"].pop("bytes_read") == weights
    read = [g["hf"].pop("bytes_read") for g in got]
    assert sum(read) >= weights and all(0.45 * weights < r < 0.55 * weights for r in read), read
    nan = [g.pop("nan") for g in got]  # process 1 read the NaN; process 0 says so
    assert all(n.startswith("NonFiniteWeights") and "layers.1.mlp.up.kernel" in n for n in nan), nan
    assert "process 1 failed" in nan[0] and "in the slice of shape" in nan[1], nan
    assert got[0] == got[1]
    for case in cases:
        assert got[0][case]["greedy"] == expected[case]["greedy"], case
        assert got[0][case].get("sampled") == expected[case].get("sampled"), case
        for numbers in ("logprobs", "logits"):
            np.testing.assert_allclose(got[0][case].get(numbers, 0.0),
                                       expected[case].get(numbers, 0.0), rtol=1e-5, atol=1e-5,
                                       err_msg=f"{case} {numbers}")
    assert got[0]["serve"]["blocks"] == 0 and got[0]["serve"]["replicas"] == [0, 1]
    assert "choose degrees whose product is 8" in got[0]["error"]



@pytest.mark.parametrize("cases", ["die-0", "die-1-late"])
def test_a_dead_process_fails_the_other(tmp_path, cases):
    """Rank 0 (the coordinator) dies right after joining, or rank 1 after building its
    engine: the survivor exits non-zero within the heartbeat timeout, never hangs."""
    start = time.monotonic()
    pair = Pair(cases, tmp_path)
    codes = pair.wait(timeout=60, fail_fast=False)
    assert None not in codes, f"a process still ran after 60 s\n{pair.log(0)}\n{pair.log(1)}"
    assert all(codes), codes
    assert time.monotonic() - start < 60
    survivor = 1 if cases == "die-0" else 0
    assert "another task died" in pair.log(survivor)


def test_partial_environment_is_a_clear_error(monkeypatch):
    from dsjax.parallel import distributed

    monkeypatch.setattr(distributed.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setenv("DSJAX_COORDINATOR", "127.0.0.1:1234")
    monkeypatch.delenv("DSJAX_NUM_PROCESSES", raising=False)
    with pytest.raises(ValueError, match="set all of DSJAX_COORDINATOR"):
        distributed.initialize()
    monkeypatch.setenv("DSJAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("DSJAX_PROCESS_ID", "2")
    with pytest.raises(ValueError, match="must be in 0..1"):
        distributed.initialize()


def test_launch_runs_one_command_on_every_rank(monkeypatch):
    import io

    from dsjax import launch

    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    monkeypatch.setenv("DSJAX_COMPILATION_CACHE", "0")
    out = io.StringIO()
    code = launch.main(["-n", "2", "--cpu-devices", "4", "--", "-q", "generate", "--model",
                        "tiny-llama", "--prompt", "hello", "--tp", "4", "--pp", "2", "--dtype",
                        "fp32", "--max-new-tokens", "3", "--max-out-tokens", "16"], out=out)
    lines = out.getvalue().splitlines()
    assert code == 0, "\n".join(lines[-20:])
    texts = [[ln[4:] for ln in lines if ln.startswith(f"[{r}] [0] hello")] for r in range(2)]
    assert len(texts[0]) == 1 and texts[0] == texts[1]


def test_launch_stops_the_others_when_one_fails():
    import io

    from dsjax import launch

    script = ("import os, sys, time\n"
              "rank = int(os.environ['DSJAX_PROCESS_ID'])\n"
              "print('rank', rank, os.environ['DSJAX_NUM_PROCESSES'], flush=True)\n"
              "time.sleep(60 * rank)\n"
              "sys.exit(0 if rank else 5)\n")
    out, start = io.StringIO(), time.monotonic()
    assert launch.run([sys.executable, "-c", script], 2, out=out) == 5
    assert time.monotonic() - start < 20
    assert "[0] rank 0 2" in out.getvalue()
    assert launch.main(["-n", "2"]) == 2  # no command: a usage line, nothing started


def test_launch_gives_each_rank_its_share_of_the_gpus(monkeypatch, tmp_path):
    """On a GPU machine each rank sees only its GPUs (JAX would give every process all of
    them); an uneven split is refused before anything starts."""
    import io

    from dsjax import launch

    script = "import os; print('sees', os.environ['CUDA_VISIBLE_DEVICES'], flush=True)\n"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert launch.local_gpus() == ["0", "1", "2", "3"]
    out = io.StringIO()
    assert launch.run([sys.executable, "-c", script], 2, out=out,
                      rank_env=launch.gpu_shares(2, launch.local_gpus())) == 0
    assert sorted(out.getvalue().splitlines()) == ["[0] sees 0,1", "[1] sees 2,3"]
    assert launch.gpu_shares(4, ["4", "5", "6", "7"])[3] == {"CUDA_VISIBLE_DEVICES": "7"}
    assert launch.gpu_shares(2, []) is None  # no GPUs: nothing set
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    assert launch.main(["-n", "3", "--", "generate", "--model", "tiny-llama"]) == 2
    assert "3 processes cannot share 4 GPUs evenly" in err.getvalue()
    fake = tmp_path / "nvidia-smi"  # no CUDA_VISIBLE_DEVICES: nvidia-smi's GPUs, not its MIGs
    fake.write_text("#!/bin/sh\necho 'GPU 0: H100 (UUID: a)'\n"
                    "echo '  MIG 1g.10gb Device 0: (UUID: m)'\necho 'GPU 1: H100 (UUID: b)'\n")
    fake.chmod(0o755)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    assert launch.local_gpus() == ["0", "1"]


def test_no_cluster_is_a_clear_error(monkeypatch):
    import jax

    from dsjax.parallel import distributed

    def no_cluster(**kw):
        raise ValueError("coordinator_address should be defined.")

    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", no_cluster)
    for name in distributed.ENV:
        monkeypatch.delenv(name, raising=False)
    before = jax.config.jax_cpu_collectives_implementation
    try:
        with pytest.raises(ValueError, match="found no cluster.*dsjax launch"):
            distributed.initialize()
    finally:
        jax.config.update("jax_cpu_collectives_implementation", before)
