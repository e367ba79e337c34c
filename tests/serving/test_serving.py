"""The serving engine (continuous batching, Dynamic SplitFuse, paged KV pools) against the
static engine: on the CPU in fp32 every request's greedy tokens and log-probabilities equal
engine.generate's for that prompt alone, whatever the arrival order, token budget, chunk split,
preemptions, prefix-cache hits and decode bursts; and the pool is fully free after every
scenario."""

import time

import jax
import numpy as np
import pytest

import dsjax
from dsjax.parallel.mesh import Parallel
from dsjax.serving.blocks import BlockAllocator, OutOfBlocks, prefix_keys
from dsjax.serving.engine import ServingEngine
from dsjax.settings import Defaults
from tests.conftest import prompt
from tests.converters.test_decoder_families import build

FAMILIES = ["qwen2_qkv_bias_gqa", "mistral_window_5_gqa", "bloom_alibi"]
NEW = 10


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    engine = dsjax.init_inference(build(request.param), dtype="fp32", max_out_tokens=64,
                                  progress=False)
    prompts = [prompt(200 + i, 2 + 5 * i) for i in range(6)]
    prompts += [prompts[4][:9] + prompt(300, 6), prompts[4][:9] + prompt(301, 3)]  # shared prefix
    want = [engine.generate([p], max_new_tokens=NEW, eos_token_id=[], return_logprobs=True)
            for p in prompts]
    return engine, prompts, [(w.sequences[0], w.logprobs[0][:NEW]) for w in want]


def run_scenario(engine, prompts, rng, **kw):
    """Requests arrive at random steps (in a random order); returns {index: output}."""
    srv = ServingEngine(engine, **kw)
    srv.replica_of, srv.bursts = {}, 0
    order, done, step = list(rng.permutation(len(prompts))), {}, 0
    while order or srv.has_unfinished():
        while order and (not srv.has_unfinished() or rng.random() < 0.5):
            i = order.pop()
            srv.add_request(prompts[i], request_id=str(i), max_new_tokens=NEW, eos_token_id=[])
            srv.replica_of[i] = srv.requests[str(i)].replica
        for out in srv.step():
            if out.finished:
                done[int(out.request_id)] = out
        srv.bursts += any(c.steps > 1 for c in srv.last_step.chunks)
        step += 1
        assert step < 500
    for sched in srv.scheds:
        assert sched.alloc.in_use() == 0 and sched.alloc.num_free == sched.alloc.capacity
    return srv, done


@pytest.mark.parametrize("kw", [
    dict(block_size=4, num_blocks=64, token_budget=16, max_seqs=8),  # chunked prompts
    dict(block_size=4, num_blocks=20, token_budget=32, max_seqs=8),  # KV pressure: preemption
    dict(block_size=4, num_blocks=48, token_budget=8, max_seqs=4),  # tiny budget, many chunks
    dict(block_size=4, num_blocks=24, token_budget=32, max_seqs=8, decode_steps=3),  # bursts
], ids=["chunked", "preempting", "tiny_budget", "bursts"])
def test_tokens_equal_each_prompt_alone(family, kw):
    engine, prompts, want = family
    srv, done = run_scenario(engine, prompts, np.random.default_rng(len(kw) + kw["num_blocks"]), **kw)
    for i, (tokens, logprobs) in enumerate(want):
        assert done[i].token_ids == tokens, i
        np.testing.assert_allclose(done[i].logprobs, logprobs, atol=2e-5)
        assert done[i].finish_reason == "length"
    if kw["num_blocks"] == 20:
        assert srv.sched.preemptions > 0  # the scenario did preempt
    assert (srv.bursts > 0) == ("decode_steps" in kw)
    if kw["token_budget"] == 16:
        assert srv.alloc.hits > 0  # the shared prefix came from the cache


@pytest.mark.parametrize("family", ["qwen2_qkv_bias_gqa", "bloom_alibi"], indirect=True)
def test_tensor_slices_and_replicas_equal_one_device(family):
    """tp=2 x dp=2 on four simulated devices: each replica its own requests and blocks, each
    device its KV heads (ALiBi: its heads' slopes); the tokens of every request as generate()'s
    on one device, the log-probabilities within float32 summation-order noise."""
    engine, prompts, want = family
    mesh = dsjax.build_engine(engine.config, engine.runner.stored_params(),
                              inference=engine.inference_config,
                              parallel=Parallel.parse(tensor_parallel=2, data_parallel=2))
    srv, done = run_scenario(mesh, prompts, np.random.default_rng(3), block_size=4,
                             num_blocks=24, token_budget=16, max_seqs=4, decode_steps=3)
    for i, (tokens, logprobs) in enumerate(want):
        assert done[i].token_ids == tokens, i
        np.testing.assert_allclose(done[i].logprobs, logprobs, atol=1e-4)
    assert sorted(set(srv.replica_of.values())) == [0, 1] and srv.bursts > 0


@pytest.mark.parametrize("family", ["qwen2_qkv_bias_gqa"], indirect=True)
def test_int8_blocks_equal_the_int8_cache(family):
    """int8 blocks quantize each token and head as the static engine's int8 cache does: the
    same tokens and log-probabilities as generate() with kv_cache_dtype="int8" (one family: the
    quantization is the same code for all)."""
    engine, prompts, _ = family
    int8 = dsjax.build_engine(engine.config, engine.runner.stored_params(),
                              inference=dsjax.InferenceConfig(dtype="fp32", max_out_tokens=64,
                                                              kv_cache_dtype="int8"))
    outs = ServingEngine(int8, block_size=4, num_blocks=40, token_budget=16).generate(
        prompts[2:5], max_new_tokens=NEW, eos_token_id=[])
    for out, p in zip(outs, prompts[2:5]):
        want = int8.generate([p], max_new_tokens=NEW, eos_token_id=[], return_logprobs=True)
        assert out.token_ids == want.sequences[0]
        np.testing.assert_allclose(out.logprobs, want.logprobs[0][:NEW], atol=2e-5)


def test_steady_state_does_not_recompile(llama_pair):
    _, engine = llama_pair
    srv = ServingEngine(engine, block_size=8, num_blocks=64, token_budget=32, max_seqs=4)
    for i in range(4):
        srv.add_request(prompt(400 + i, 5 + i), max_new_tokens=40, eos_token_id=[])
    for _ in range(8):  # prompts done, every step now decodes four tokens
        srv.step()
    before = srv.program._cache_size()
    for _ in range(20):
        srv.step()
    assert srv.program._cache_size() == before


def test_warmup_compiles_every_step_shape(llama_pair):
    """After warmup() a run of requests (chunked prompts, then decoding) traces and compiles
    nothing, and every step's timing record is filled."""
    _, engine = llama_pair
    srv = ServingEngine(engine, block_size=8, num_blocks=64, token_budget=32, max_seqs=4)
    assert srv.warmup() == 4  # steps of 16 or 32 tokens, of up to 4 sequences, greedy or not
    calls, compiles = srv.program._cache_size(), []
    listener = lambda name, secs, **kw: compiles.append(name) if "backend_compile" in name else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        outs = srv.generate([prompt(410 + i, 3 + 9 * i) for i in range(4)], max_new_tokens=6,
                            eos_token_id=[])
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == [] and [len(o.token_ids) for o in outs] == [6] * 4
    assert srv.program._cache_size() == calls  # not even traced again
    assert srv.last_step.prepare_s > 0 and srv.last_step.wait_s >= 0
    # swapped weights run in the warmed executables: as jit's path gives them, no compile
    p, noisy = prompt(420, 9), jax.tree.map(lambda x: x * 1.5, engine.params)
    jit_path = ServingEngine(engine, block_size=8, num_blocks=64, token_budget=32, max_seqs=4)
    for s in (srv, jit_path):
        s.swap_params(noisy)
    want = jit_path.generate([p], max_new_tokens=6, eos_token_id=[])[0].token_ids
    calls = srv.program._cache_size()  # (the same jitted step as jit_path's, which traced it)
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        got = srv.generate([p], max_new_tokens=6, eos_token_id=[])[0].token_ids
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert got == want and compiles == [] and srv.program._cache_size() == calls


def test_stop_tokens_abort_and_rejection(llama_pair):
    _, engine = llama_pair
    p = prompt(500, 7)
    free = engine.generate([p], max_new_tokens=12, eos_token_id=[]).sequences[0]
    srv = ServingEngine(engine, block_size=4, num_blocks=12, token_budget=16)
    a = srv.add_request(p, max_new_tokens=12, eos_token_id=free[4])
    b = srv.add_request(prompt(501, 9), max_new_tokens=12)
    outs = {}
    while srv.has_unfinished():
        for out in srv.step():
            outs.setdefault(out.request_id, []).append(out)
            if out.request_id == b and len(out.token_ids) == 3:
                assert srv.abort(b).finish_reason == "abort"
    assert outs[a][-1].token_ids == free[:5] and outs[a][-1].finish_reason == "stop"
    assert [o.new_token_ids for o in outs[a]] == [[t] for t in free[:5]]  # streamed one by one
    assert srv.blocks_in_use() == 0
    with pytest.raises(ValueError, match="can never run"):
        srv.add_request(prompt(502, 60), max_new_tokens=4)  # 16 blocks; the pool has 11
    with pytest.raises(ValueError, match="max_model_len"):
        srv.add_request(prompt(503, 60), max_new_tokens=100)
    with pytest.raises(TypeError, match="does not serve"):
        srv.add_request(p, num_beams=2)
    staged = dsjax.build_engine(engine.config, engine.runner.stored_params(),
                                inference=engine.inference_config,
                                parallel=Parallel.parse(pipeline_parallel=2))
    with pytest.raises(ValueError, match="pipeline stages"):
        ServingEngine(staged, num_blocks=8)


def test_unserved_generation_defaults_are_refused(llama_pair, monkeypatch):
    """A model default the step does not apply (a repetition penalty) is an error naming it,
    not ignored."""
    _, engine = llama_pair
    srv = ServingEngine(engine, block_size=4, num_blocks=12)
    monkeypatch.setattr(engine, "defaults", Defaults({"repetition_penalty": 1.3}, []))
    with pytest.raises(ValueError, match="repetition/presence/frequency penalties"):
        srv.add_request(prompt(504, 4), max_new_tokens=2)
    assert not srv.has_unfinished()


def test_top_logprobs_are_the_models(llama_pair):
    """top_logprobs: each token's most likely tokens and their log-probabilities, as a full
    forward pass over prompt + output gives them (sorted, the greedy token first)."""
    _, engine = llama_pair
    p = prompt(650, 7)
    srv = ServingEngine(engine, block_size=4, num_blocks=40, token_budget=8)
    out = srv.generate([p], max_new_tokens=5, eos_token_id=[], top_logprobs=4)[0]
    logits = np.asarray(engine(np.asarray([p + out.token_ids[:-1]])))[0, len(p) - 1:]
    want = np.asarray(jax.nn.log_softmax(logits))
    for step, top in enumerate(out.top_logprobs):
        ids = [i for i, _ in top]
        assert ids == list(np.argsort(-want[step])[:4]) and ids[0] == out.token_ids[step]
        np.testing.assert_allclose([v for _, v in top], want[step][ids], atol=2e-5)
    with pytest.raises(ValueError, match="top_logprobs"):
        srv.add_request(p, top_logprobs=21)


def test_seeded_sampling_ignores_the_company(llama_pair):
    _, engine = llama_pair
    p, opts = prompt(600, 6), dict(max_new_tokens=8, do_sample=True, temperature=1.5, seed=7)
    alone = ServingEngine(engine, block_size=4, num_blocks=40).generate([p], **opts)[0]
    srv = ServingEngine(engine, block_size=4, num_blocks=40, token_budget=8)
    crowd = srv.generate([prompt(601, 11), p, prompt(602, 3)], **opts)
    assert crowd[1].token_ids == alone.token_ids
    # a greedy request in steps with sampled rows (the sampling path of the step program)
    want = engine.generate([p], max_new_tokens=8, eos_token_id=[]).sequences[0]
    srv.add_request(p, request_id="greedy", max_new_tokens=8, eos_token_id=[])
    srv.add_request(prompt(603, 5), request_id="sampled", **opts)
    mixed = {}
    while srv.has_unfinished():
        mixed.update({o.request_id: o for o in srv.step() if o.finished})
    assert mixed["greedy"].token_ids == want
    assert crowd[0].token_ids != crowd[2].token_ids or crowd[0].token_ids != alone.token_ids


def test_weights_swap_in_place_without_recompiling(llama_pair):
    model, engine = llama_pair
    srv = ServingEngine(engine, block_size=4, num_blocks=40)
    p = prompt(700, 6)
    before = srv.generate([p], max_new_tokens=6, eos_token_id=[])[0].token_ids
    compiled = srv.program._cache_size()
    other = dsjax.init_inference("tiny-llama", dtype="fp32", max_out_tokens=64, progress=False)
    with pytest.raises(ValueError, match="structure|leaf"):
        srv.swap_params(other.params)
    noisy = jax.tree.map(lambda x: x * 1.5, engine.params)
    srv.swap_params(noisy)
    after = srv.generate([p], max_new_tokens=6, eos_token_id=[])[0].token_ids
    fresh = dsjax.build_engine(engine.config, jax.tree.map(lambda x: x * 1.5,
                                                           engine.runner.stored_params()),
                               inference=engine.inference_config)
    assert after == fresh.generate([p], max_new_tokens=6, eos_token_id=[]).sequences[0]
    assert after != before and srv.program._cache_size() == compiled


def test_allocator_refcounts_prefixes_and_lru():
    alloc = BlockAllocator(4, 2)
    a, b, c = alloc.allocate(), alloc.allocate(), alloc.allocate()
    with pytest.raises(OutOfBlocks):
        alloc.allocate()
    k1, k2 = prefix_keys([1, 2, 3, 4], 2)
    assert prefix_keys([1, 2, 9, 9], 2)[0] == k1 and prefix_keys([1, 2, 9, 9], 2)[1] != k2
    alloc.publish(a, k1)
    alloc.free([a, b])
    assert alloc.cached(k1) == a and alloc.refs[a] == 1  # found while free: taken back
    alloc.free([a])
    assert alloc.allocate() == b  # b was freed first: reused before a (LRU)
    assert alloc.allocate() == a and alloc.cached(k1) is None  # reusing a evicts its prefix
    alloc.free([a, b, c])
    with pytest.raises(RuntimeError, match="freed more often"):
        alloc.free([a])
    assert alloc.num_free == alloc.capacity == 3


def test_llm_generate_in_order_and_async_streams():
    import asyncio

    llm = dsjax.LLM("tiny-llama", dtype="fp32", max_out_tokens=64, progress=False,
                    block_size=4, num_blocks=48, token_budget=16)
    prompts = ["Hello there", [5, 6, 7], "A much longer prompt than the others"]
    params = [{"max_new_tokens": 5}, {"max_new_tokens": 3}, {"max_new_tokens": 7,
                                                            "eos_token_id": []}]
    outs = llm.generate(prompts, params, progress=False)
    want = [llm.engine.generate([llm.token_ids(p)], **o).sequences[0] for p, o in zip(prompts, params)]
    assert [o.token_ids for o in outs] == want
    assert outs[0].text == llm.tokenizer.decode(want[0])

    async def consume(prompt, n, stop_after=None):
        pieces, last = [], None
        async for out in llm.stream(prompt, max_new_tokens=n, eos_token_id=[]):
            pieces.append(out.delta)
            last = out
            if stop_after and len(out.token_ids) == stop_after:
                break
        return "".join(pieces), last

    async def main():
        return await asyncio.gather(consume("Hello there", 6), consume("Stop early", 20, 2))
    (text, last), (_, cut) = asyncio.run(main())
    assert last.finished and last.token_ids == llm.engine.generate(
        [llm.token_ids("Hello there")], max_new_tokens=6, eos_token_id=[]).sequences[0]
    assert text == llm.tokenizer.decode(last.token_ids) and len(cut.token_ids) == 2
    deadline = time.time() + 5
    while llm._thread is not None and time.time() < deadline:  # the step thread ends
        time.sleep(0.01)
    assert llm._thread is None
    assert not llm.serving.has_unfinished() and llm.serving.blocks_in_use() == 0

    def lost():
        raise RuntimeError("device lost")
    llm.serving.step = lost  # a step that fails reaches the stream waiting on it

    async def waiting():
        async for _ in llm.stream("Hello", max_new_tokens=3):
            pass
    with pytest.raises(RuntimeError, match="device lost"):
        asyncio.run(asyncio.wait_for(waiting(), 30))
    assert llm._thread is None and llm.serving.blocks_in_use() == 0


def test_stop_strings_end_the_text_before_them():
    llm = dsjax.LLM("tiny-llama", dtype="fp32", max_out_tokens=64, progress=False,
                    block_size=4, num_blocks=48, token_budget=16)
    free = llm.generate(["Hello there"], {"max_new_tokens": 12, "eos_token_id": []},
                        progress=False)[0]
    text = llm.tokenizer.decode(free.token_ids)
    stop = text[len(text) // 2: len(text) // 2 + 2]
    out = llm.generate(["Hello there"], {"max_new_tokens": 12, "eos_token_id": [],
                                         "stop_strings": [stop, "never there"]}, progress=False)[0]
    assert out.finish_reason == "stop" and out.stop_string == stop
    assert out.text == text[:text.find(stop)] and out.token_ids == free.token_ids[:len(out.token_ids)]
    assert stop in llm.tokenizer.decode(out.token_ids) and stop not in llm.tokenizer.decode(
        out.token_ids[:-1])


def test_incremental_text_joins_to_the_whole_decode_at_a_constant_cost_per_token():
    """A byte-level BPE tokenizer (trained here with `tokenizers`) on random ids, multi-byte
    characters split across tokens included: the pieces join to the decode of the whole output
    after the prompt's context, and each step decodes a window, not the whole output."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dsjax.serving.detokenize import IncrementalText

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = "Ünïcödé façade — naïve café, 東京 and 🙂 emoji; " * 20
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                                        initial_alphabet=alphabet))
    decoded = []

    class Counting:
        def decode(self, ids):
            decoded.append(len(ids))
            return tok.decode(ids)
    rng = np.random.default_rng(0)
    for _ in range(5):
        prompt, out = rng.integers(0, 300, 12).tolist(), rng.integers(0, 300, 400).tolist()
        decoded.clear()
        inc = IncrementalText(Counting(), prompt)
        pieces = [inc.delta(out[:n]) for n in range(1, len(out))]
        pieces.append(inc.delta(out, final=True))
        whole = tok.decode(prompt[-8:] + out)[len(tok.decode(prompt[-8:])):]
        assert "".join(pieces) == whole == inc.shown
        assert sum(decoded) < 12 * len(out)  # (decoding the whole output each step: ~n^2 / 2)


def test_incremental_text_holds_back_what_may_begin_a_stop_string():
    from dsjax.presets import ByteTokenizer
    from dsjax.serving.detokenize import IncrementalText

    text = IncrementalText(ByteTokenizer(), list(b"> "), ["Hello"])
    # (the step whose token completes a stop string is final: the engine found it there)
    shown = [text.delta(list(b"Hello"[:i])) for i in range(1, 5)]
    assert shown == [""] * 4 and text.delta(list(b"Hello"), final=True, stop="Hello") == ""
    text = IncrementalText(ByteTokenizer(), [], ["XY"])
    assert [text.delta(list(b"abcX"[:i])) for i in range(1, 5)] == ["", "a", "b", "c"]
    assert text.delta(list(b"abcXZ"), final=True) == "XZ"


def test_default_pool_on_the_cpu_holds_max_seqs_full_sequences():
    """Without num_blocks the pool takes memory_fraction of the free memory; on the CPU (the
    host's own memory) no more than max_seqs sequences of max_model_len tokens can use."""
    engine = dsjax.init_inference("tiny-llama", dtype="fp32", max_out_tokens=100, progress=False)
    srv = ServingEngine(engine, block_size=16, max_seqs=6)
    assert srv.alloc.num_blocks == 1 + 6 * 7  # (block 0 reserved; 100 tokens: 7 blocks)
    assert ServingEngine(engine, block_size=16, max_seqs=6, num_blocks=500).alloc.num_blocks == 500


def test_incremental_text_decodes_windows_without_hfs_space_clean_up():
    """HF's clean_up_tokenization_spaces can shorten the text a token before the new one
    ("don '" + "t" -> "don't"), which cut characters out of the pieces; windows are decoded
    without it: the pieces join to the whole output's decode without clean-up."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from dsjax.serving.detokenize import IncrementalText

    text = "I don ' t know . We ' re here ! It ' s rock ' n ' roll , isn ' t it ? " * 30
    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.decoder = decoders.WordPiece()
    wp.train_from_iterator([text], trainers.WordPieceTrainer(vocab_size=200, show_progress=False,
                                                             special_tokens=["[UNK]"]))
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=wp,
                                               clean_up_tokenization_spaces=True)
    ids = tok.encode(text, add_special_tokens=False)
    plain = lambda t: tok.decode(t, clean_up_tokenization_spaces=False)  # noqa: E731
    for start in range(0, 200, 7):
        prompt, out = ids[start:start + 10], ids[start + 10:start + 40]
        inc = IncrementalText(tok, prompt)
        pieces = [inc.delta(out[:n]) for n in range(1, len(out))] + [inc.delta(out, final=True)]
        assert "".join(pieces) == plain(prompt[-8:] + out)[len(plain(prompt[-8:])):]


def test_a_reused_request_id_gets_none_of_the_aborted_requests_tokens():
    """A request aborted with its token in flight, then a new request under the same id: the
    new one's tokens are what its prompt gives alone (the in-flight token is not its)."""
    engine = dsjax.init_inference("tiny-llama", dtype="fp32", max_out_tokens=64, progress=False)
    srv = ServingEngine(engine, block_size=4, num_blocks=48, token_budget=16)
    alone = srv.generate([[9, 8, 7]], max_new_tokens=4, eos_token_id=[])[0].token_ids
    srv.add_request([1, 2, 3, 4, 5], request_id="x", max_new_tokens=4, eos_token_id=[])
    srv.step()  # its prompt dispatched, its first token in flight
    srv.abort("x")
    srv.add_request([9, 8, 7], request_id="x", max_new_tokens=4, eos_token_id=[])
    outs = []
    while srv.has_unfinished():
        outs += srv.step()
    assert [o.new_token_ids for o in outs] == [[t] for t in alone]
    assert outs[-1].token_ids == alone and outs[-1].finish_reason == "length"
    assert srv.blocks_in_use() == 0
