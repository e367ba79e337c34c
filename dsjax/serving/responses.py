"""The bodies of /v1/completions and /v1/chat/completions: each choice one engine request (a
prompt x n), streamed together as server-sent events or gathered into one JSON body, in
OpenAI's formats (text_completion / chat.completion[.chunk], usage, logprobs)."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
import uuid

from fastapi.responses import StreamingResponse

from dsjax.serving import openai_api as api


async def completion(srv, req: api.CompletionRequest):
    req.refuse_unserved()
    prompts = [srv.llm.token_ids(p) for p in req.prompts()]
    streams = await _start(srv, req, prompts, default_max=16, top=req.logprobs or 0)
    head = dict(id=request_id("cmpl"), object="text_completion", created=int(time.time()),
                model=srv.name)
    want_lp = req.logprobs is not None

    def choice(i, c, text, final, whole):
        return {"index": i, "text": text, "finish_reason": final,
                "logprobs": _completion_logprobs(srv, c, whole) if want_lp else None}
    return await _respond(srv, req, streams, prompts, head, choice, chat=False)


async def chat_completion(srv, req: api.ChatRequest):
    req.refuse_unserved()
    prompts = [srv.chat_prompt(req)]
    streams = await _start(srv, req, prompts, default_max=None, top=req.top_logprobs or 0)
    head = dict(id=request_id("chatcmpl"), object="chat.completion", created=int(time.time()),
                model=srv.name)

    def choice(i, c, text, final, whole):
        lp = {"content": _chat_logprobs(srv, c, whole)} if req.logprobs else None
        return {"index": i, "finish_reason": final, "logprobs": lp, "text": text}
    return await _respond(srv, req, streams, prompts, head, choice, chat=True)


async def _start(srv, req, prompts: list[list[int]], *, default_max, top: int) -> list:
    """Every choice's engine request, started (its errors are 400s here, nothing started
    stays running)."""
    srv.check_capacity(len(prompts) * req.n)
    serving, eos = srv.llm.serving, srv.llm.engine.eos_token_id
    opts = [api.engine_options(req, eos=eos, prompt_len=len(p), max_len=serving.max_len,
                               default_max=default_max, top_logprobs=top,
                               seed=None if req.seed is None else req.seed + j)
            for p in prompts for j in range(req.n)]
    starts = [first_of(srv.llm.stream(p, **o))
              for p, o in zip([p for p in prompts for _ in range(req.n)], opts)]
    srv.admitting += len(starts)
    try:
        started = await asyncio.gather(*starts, return_exceptions=True)
    finally:
        srv.admitting -= len(starts)
    failed = [s for s in started if isinstance(s, BaseException)]
    if failed:
        for s in started:
            if not isinstance(s, BaseException):
                await s[1].aclose()
        raise failed[0]
    return started


async def _merged(streams):
    """(choice index, Completion) from every choice's stream as they come."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i, first, stream):
        try:
            queue.put_nowait((i, first))
            async for item in stream:
                queue.put_nowait((i, item))
        finally:
            await stream.aclose()
            queue.put_nowait((i, None))
    tasks = [asyncio.create_task(pump(i, f, s)) for i, (f, s) in enumerate(streams)]
    try:
        left = len(tasks)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _respond(srv, req, streams, prompts, head: dict, choice, *, chat: bool):
    arrival, times = time.perf_counter(), [[] for _ in streams]
    usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 0}

    done, prompt_lens = set(), [len(p) for p in prompts for _ in range(req.n)]

    def finish(i, c):
        done.add(i)
        srv.metrics.record(prompt_lens[i], times[i], arrival, c.finish_reason)
        usage["completion_tokens"] += len(c.token_ids)

    async def chunks():
        sent_role, streamed = set(), dict(head, object=head["object"] + (".chunk" if chat else ""))
        try:
            async for i, c in _merged(streams):
                times[i].append(time.perf_counter())
                final = c.finish_reason if c.finished else None
                if final:
                    finish(i, c)
                body = choice(i, c, c.delta, final, False)
                if chat:
                    text = body.pop("text")
                    body["delta"] = {} if final and not text else {"content": text}
                    if i not in sent_role:
                        body["delta"]["role"] = "assistant"
                        sent_role.add(i)
                if body.get("text") or body.get("delta") or final or body.get("logprobs"):
                    yield dict(streamed, choices=[body])
        finally:  # the client left: its unfinished choices were aborted
            for i in set(range(len(streams))) - done:
                srv.metrics.record(prompt_lens[i], times[i], arrival, "abort")
        if req.stream_options and req.stream_options.include_usage:
            yield dict(streamed, choices=[], usage=_total(usage))

    if req.stream:
        return sse(chunks())
    last = {}
    async for i, c in _merged(streams):
        times[i].append(time.perf_counter())
        last[i] = c
        if c.finished:
            finish(i, c)
    choices = []
    for i in range(len(streams)):
        body = choice(i, last[i], last[i].text, last[i].finish_reason, True)
        if chat:
            body["message"] = {"role": "assistant", "content": body.pop("text")}
        choices.append(body)
    return dict(head, choices=choices, usage=_total(usage))


def _total(usage: dict) -> dict:
    return dict(usage, total_tokens=usage["prompt_tokens"] + usage["completion_tokens"])


def _piece(srv, token: int) -> str:
    return srv.llm.tokenizer.decode([token])


def _tokens(c, whole: bool):
    """(ids, their log-probabilities, their top log-probabilities) of this step's new tokens,
    or of the whole output."""
    ids = c.token_ids if whole else c.new_token_ids
    start = len(c.token_ids) - len(ids)
    tops = (c.top_logprobs or [[]] * len(c.token_ids))[start:]
    return ids, c.logprobs[start:], tops


def _completion_logprobs(srv, c, whole: bool) -> dict:
    """OpenAI's completions logprobs; text_offset counts from the choice's first character
    (a streamed chunk's tokens start where the text sent before it ends)."""
    ids, lps, tops = _tokens(c, whole)
    pieces = [_piece(srv, t) for t in ids]
    base = 0 if whole else len(c.text) - len(c.delta)
    offsets = list(itertools.accumulate([base] + [len(p) for p in pieces[:-1]]))
    return {"tokens": pieces, "token_logprobs": lps, "text_offset": offsets,
            "top_logprobs": [_by_text(srv, top) for top in tops]}


def _by_text(srv, top) -> dict:
    """OpenAI's {token text: log p}; tokens whose texts collide keep the likeliest's value."""
    out: dict[str, float] = {}
    for t, v in top:
        out.setdefault(_piece(srv, t), v)
    return out


def _chat_logprobs(srv, c, whole: bool) -> list[dict]:
    ids, lps, tops = _tokens(c, whole)

    def entry(t, v):
        s = _piece(srv, t)
        return {"token": s, "logprob": v, "bytes": list(s.encode())}
    return [dict(entry(t, v), top_logprobs=[entry(a, b) for a, b in top])
            for t, v, top in zip(ids, lps, tops)]


def sse(chunks) -> StreamingResponse:
    """An async iterator of dicts as server-sent events, closed by data: [DONE]."""
    async def events():
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk)}\n\n"
        yield "data: [DONE]\n\n"
    return StreamingResponse(events(), media_type="text/event-stream")


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


async def first_of(stream):
    """(the first item, the stream): a request's errors surface before the response starts."""
    try:
        return await stream.__anext__(), stream
    except ValueError as e:  # the engine refused it (it checks what the API could not)
        await stream.aclose()
        raise api.ApiError(400, str(e)) from None
    except asyncio.CancelledError:
        await stream.aclose()
        raise
