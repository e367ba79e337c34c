"""`dsjax serve` as a real process on 127.0.0.1, driven by the official openai client and by raw
HTTP for the edge cases; every request's greedy tokens as the offline engine gives them, and the
KV pool fully free after each test. Bounded in time: the server must be ready within 180 s and
every request has a timeout."""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx2 as httpx  # what the openai client itself speaks HTTP with
import numpy as np
import openai
import pytest

import dsjax

KEY = "test-key"
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}" \
           "{% if add_generation_prompt %}<assistant>{% endif %}"
ARGS = ["--dtype", "fp32", "--max-num-seqs", "8", "--max-batched-tokens", "32", "--num-blocks", "96",
        "--block-size", "4", "--max-model-len", "128", "--max-waiting", "64"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path, *extra) -> tuple[subprocess.Popen, str]:
    template = tmp_path / "chat.jinja"
    template.write_text(TEMPLATE)
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "dsjax.cli", "serve", "tiny-llama", "--port",
                             str(port), "--chat-template", str(template), *ARGS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stdout.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise TimeoutError("the server was not ready within 180 s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # decode bursts: every answer below comes through single steps and bursts alike
    proc, url = start(tmp_path_factory.mktemp("serve"), "--api-key", KEY, "--decode-steps", "3")
    yield proc, url
    proc.kill()
    proc.wait(10)


@pytest.fixture(scope="module")
def offline():
    return dsjax.init_inference("tiny-llama", dtype="fp32", max_out_tokens=128, progress=False)


@pytest.fixture
def client(server):
    yield openai.OpenAI(base_url=f"{server[1]}/v1", api_key=KEY, timeout=60, max_retries=0)
    _assert_pool_free(server[1])


def _metric(url: str, name: str) -> float:
    """A sample of /metrics (name with its labels, as Prometheus prints it; 0 if absent)."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    lines = [ln for ln in text.splitlines() if ln.startswith(name + " ")]
    return float(lines[0].split()[1]) if lines else 0.0


def _assert_pool_free(url: str, within: float = 10.0) -> None:
    deadline = time.time() + within
    while _metric(url, "dsjax_kv_blocks_used") or _metric(url, "dsjax_requests_running"):
        assert time.time() < deadline, "KV blocks still held"
        time.sleep(0.1)


def _greedy(offline, text: str, n: int):
    ids = offline.tokenizer.encode(text)
    out = offline.generate([ids], max_new_tokens=n, eos_token_id=[], return_logprobs=True)
    return out.sequences[0], out.logprobs[0][:n]


def test_completions_equal_the_offline_engine(client, offline):
    want, lps = _greedy(offline, "Hello there", 6)
    r = client.completions.create(model="tiny-llama", prompt="Hello there", max_tokens=6,
                                  temperature=0, logprobs=2, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.text == offline.tokenizer.decode(want) and c.finish_reason == "length"
    np.testing.assert_allclose(c.logprobs.token_logprobs, lps, atol=2e-5)
    for top, lp in zip(c.logprobs.top_logprobs, c.logprobs.token_logprobs):  # keyed by text:
        assert 1 <= len(top) <= 2 and max(top.values()) == pytest.approx(lp)  # pieces may collide
    assert r.usage.prompt_tokens == len("Hello there") and r.usage.completion_tokens == 6
    assert [m.id for m in client.models.list().data] == ["tiny-llama"]


def test_streams_equal_the_whole_answer(client, offline):
    want, _ = _greedy(offline, "Stream me", 8)
    chunks = list(client.completions.create(
        model="tiny-llama", prompt="Stream me", max_tokens=8, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == offline.tokenizer.decode(want)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8


def test_chat_uses_the_template(client, offline):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = "<system>Be brief.\n<user>Hi\n<assistant>"
    want, _ = _greedy(offline, prompt, 5)
    r = client.chat.completions.create(model="tiny-llama", messages=messages, max_tokens=5,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].message.content == offline.tokenizer.decode(want)
    assert r.usage.prompt_tokens == len(prompt)
    pieces = list(client.chat.completions.create(
        model="tiny-llama", messages=messages, max_tokens=5, temperature=0, stream=True,
        logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True}))
    assert pieces[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in pieces) == r.choices[0].message.content
    tops = [t for p in pieces if p.choices[0].logprobs for t in p.choices[0].logprobs.content]
    assert len(tops) == 5 and all(len(t.top_logprobs) == 3 for t in tops)


def test_n_choices_and_stop_strings(client, offline):
    want, _ = _greedy(offline, "Hello there", 12)
    text = offline.tokenizer.decode(want)
    stop = text[5:7]
    r = client.completions.create(model="tiny-llama", prompt="Hello there", max_tokens=12,
                                  temperature=0, n=2, stop=[stop], extra_body={"ignore_eos": True})
    assert [c.text for c in r.choices] == [text[:text.find(stop)]] * 2
    assert {c.finish_reason for c in r.choices} == {"stop"}
    seeded = [client.completions.create(model="tiny-llama", prompt="Hi", max_tokens=6, seed=3,
                                        temperature=1.0).choices[0].text for _ in range(2)]
    assert seeded[0] == seeded[1]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "x", "foo": 1}, "foo"),  # unknown field
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),  # wrong type
    ({"prompt": "x", "n": 1000}, "n"),  # huge n
    ({"prompt": "x", "max_tokens": 10 ** 6}, "max_tokens"),  # beyond the context
    ({"prompt": "x" * 200}, "max_tokens"),  # a prompt over the context limit
    ({"prompt": ""}, "prompt"),
    ({"prompt": "x", "presence_penalty": 0.5}, "presence_penalty"),  # not served: never ignored
])
def test_bad_requests_are_400s(server, body, param):
    r = httpx.post(f"{server[1]}/v1/completions", json={"model": "tiny-llama", **body},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["message"]


def test_auth_json_and_openai_errors(server, client):
    url = server[1]
    assert httpx.post(f"{url}/v1/completions", json={}, timeout=10).status_code == 401
    r = httpx.post(f"{url}/v1/completions", content=b"{not json", timeout=10,
                   headers={"Authorization": f"Bearer {KEY}", "content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    bad = {"role": "user", "content": "x"}
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-llama", messages=[])
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-llama", messages=[dict(bad, role="robot")])
    assert httpx.get(f"{url}/health", timeout=5).json() == {"status": "ok"}


def test_a_client_that_leaves_frees_its_request(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "tiny-llama", "prompt": "Go on", "max_tokens": 100, "stream": True,
            "ignore_eos": True}
    aborted, ended = (f'dsjax_requests_finished_total{{finish_reason="{r}"}}' for r in ("abort", "length"))
    before = _metric(server[1], aborted), _metric(server[1], ended)
    with httpx.stream("POST", f"{server[1]}/v1/completions", json=body, headers=headers,
                      timeout=30) as r:
        lines = r.iter_lines()
        first = next(line for line in lines if line.startswith("data:"))
        assert json.loads(first[5:])["choices"]
    _assert_pool_free(server[1])
    assert (_metric(server[1], aborted), _metric(server[1], ended)) == (before[0] + 1, before[1])


def test_sigterm_drains_in_flight_requests(tmp_path):
    """SIGTERM mid-stream: the stream ends normally, then the process exits 0. SIGUSR1 before
    it prints every thread's stack and leaves the server serving."""
    proc, url = start(tmp_path)
    proc.send_signal(signal.SIGUSR1)
    body = {"model": "tiny-llama", "prompt": "Drain", "max_tokens": 40, "stream": True,
            "ignore_eos": True}
    chunks = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and not chunks:
                proc.send_signal(signal.SIGTERM)  # mid-stream
            if line.startswith("data:"):
                chunks.append(line[5:].strip())
    assert chunks[-1] == "[DONE]"
    assert json.loads(chunks[-2])["choices"][0]["finish_reason"] == "length"
    assert proc.wait(60) == 0
    log = proc.stdout.read()
    assert "(most recent call first)" in log and "uvicorn/server.py" in log


def test_sigterm_while_warming_up_exits_at_once():
    """SIGTERM before the server is ready: it says so and exits 0 without waiting for the
    warm-up (whose thread may be inside XLA, where the interpreter's shutdown would abort)."""
    port = _port()
    proc = subprocess.Popen([sys.executable, "-m", "dsjax.cli", "serve", "tiny-llama", "--port",
                             str(port), "--max-num-seqs", "64", "--max-batched-tokens", "1024",
                             "--num-blocks", "256", "--max-model-len", "128"],  # (many programs)
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    assert httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 503
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert "dsjax serve: stopped while warming up" in proc.stdout.read()


def test_a_full_queue_answers_429(server):
    """64 requests may wait for their first token; a burst of 120 gets some 429s with
    Retry-After, and every other request its answer (answers of 32 tokens: the 8 sequences a
    step runs hold their places long enough for the queue to fill, however fast steps are)."""
    async def burst():
        async with httpx.AsyncClient(timeout=60, headers={"Authorization": f"Bearer {KEY}"}) as c:
            body = {"model": "tiny-llama", "prompt": "Burst", "max_tokens": 32, "temperature": 0,
                    "ignore_eos": True}
            return await asyncio.gather(*[c.post(f"{server[1]}/v1/completions", json=body)
                                          for _ in range(120)])
    answers = asyncio.run(asyncio.wait_for(burst(), 120))
    codes = sorted({r.status_code for r in answers})
    assert codes == [200, 429]
    full = next(r for r in answers if r.status_code == 429)
    assert full.headers["retry-after"] and full.json()["error"]["type"] == "rate_limit_exceeded"
    _assert_pool_free(server[1])


def test_load_of_concurrent_streams(server, offline):
    """110 clients at once: 80 greedy streams (each exactly the offline engine's text), 20 that
    leave after their first chunk, 10 bad requests; /health answers throughout; the client
    retries 429s as it would against any OpenAI server."""
    prompts = [f"Request {i}" for i in range(8)]
    want = {p: offline.tokenizer.decode(_greedy(offline, p, 8)[0]) for p in prompts}
    client = openai.AsyncOpenAI(base_url=f"{server[1]}/v1", api_key=KEY, timeout=60, max_retries=8)
    opts = dict(model="tiny-llama", max_tokens=8, temperature=0, stream=True,
                extra_body={"ignore_eos": True})

    async def good(i):
        p = prompts[i % len(prompts)]
        stream = await client.completions.create(prompt=p, **opts)
        return p, "".join([c.choices[0].text async for c in stream if c.choices])

    async def leaver(i):
        stream = await client.completions.create(prompt=prompts[i % 8], **dict(opts, max_tokens=60))
        async for _ in stream:
            break
        await stream.close()

    async def bad(i):
        with pytest.raises(openai.BadRequestError):
            await client.completions.create(prompt="x", n=1000, **opts)

    async def main():
        health, done = [], asyncio.Event()

        async def poll():
            async with httpx.AsyncClient(timeout=5) as c:
                while not done.is_set():
                    health.append((await c.get(f"{server[1]}/health")).status_code)
                    await asyncio.sleep(0.05)
        poller = asyncio.create_task(poll())
        results = await asyncio.gather(*[good(i) for i in range(80)], *[leaver(i) for i in range(20)],
                                       *[bad(i) for i in range(10)])
        done.set()
        await poller
        return results[:80], health
    results, health = asyncio.run(asyncio.wait_for(main(), 180))
    assert all(text == want[p] for p, text in results)
    assert health and set(health) == {200}
    _assert_pool_free(server[1])


def test_bench_serve_measures_the_server(server, tmp_path):
    """The load generator against the server: every request completes with the output length
    it asked for, and the report has the latency figures."""
    from dsjax import cli

    args = ["bench", "serve", "--url", server[1], "--api-key", KEY, "--num-prompts", "12",
            "--input-len", "4,20", "--output-len", "3,9", "--request-rate", "50",
            "--max-concurrency", "6", "--slo-ttft-ms", "60000", "--out", str(tmp_path)]
    assert cli.main(args) == 0
    fig = json.loads((tmp_path / "bench-serve.json").read_text())
    from dsjax.bench_serve import dataset, parser
    want = sum(r["max_tokens"] for r in dataset(parser().parse_args(args[2:])))
    assert fig["completed"] == 12 and fig["failures"] == 0 and fig["output_tokens"] == want
    assert 0 < fig["ttft_ms"]["p50"] <= fig["e2e_ms"]["p50"] and fig["tpot_ms"]["p95"] > 0
    assert fig["goodput"] == pytest.approx(fig["request_throughput"])
    assert "TTFT" in (tmp_path / "bench-serve.md").read_text()
    assert len(fig["samples_ms"]["ttft"]) == 12 and len(fig["samples_ms"]["itl"]) > 0


def test_a_failed_warmup_is_reported_not_left_warming():
    """A warm-up that raises (e.g. out of memory compiling) is logged and answered: /ready and
    every request say it failed and why (500), instead of 'warming up' forever."""
    from dsjax.serving.server import create_app

    class Serving:
        scheds = []

        def blocks_in_use(self):
            return 0

        def warmup(self):
            raise RuntimeError("RESOURCE_EXHAUSTED: out of memory while compiling")

    class BrokenLLM:
        serving, tokenizer = Serving(), type("Tok", (), {"encode": lambda self, s: [1]})()

        def token_ids(self, prompt):
            return [1]

    app = create_app(BrokenLLM(), "m")
    app.state.server.warm()

    async def ask():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            return (await c.get("/ready"),
                    await c.post("/v1/completions", json={"model": "m", "prompt": "hi"}))
    ready, completion = asyncio.run(ask())
    assert ready.status_code == 500 and "out of memory" in ready.json()["error"]
    assert completion.status_code == 500 and "warm-up failed" in completion.text
