"""The serving engine's front doors.

    llm = dsjax.LLM("path/to/checkpoint", dtype="bf16", token_budget=512)
    outs = llm.generate(["Hello", "The capital of France is"],
                        [{"max_new_tokens": 64}, {"do_sample": True, "temperature": 0.7, "seed": 1}])
    print(outs[1].text)

    async for out in llm.stream("Tell me a story", max_new_tokens=256):   # asyncio, per request
        print(out.delta, end="")

`LLM.generate` runs a whole list (throughput jobs, evals, RL rollouts) with a progress bar and
returns the outputs in input order; `LLM.stream` feeds one request into the same engine from an
asyncio task, and the steps run in a background thread while any stream is open. Text is
decoded incrementally: a step's `delta` holds only whole characters.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading

from dsjax.serving.engine import ServingEngine
from dsjax.serving.requests import RequestOutput
from dsjax.serving.detokenize import IncrementalText

SERVING_KEYS = ("block_size", "num_blocks", "memory_fraction", "token_budget", "max_seqs",
                "max_model_len", "decode_steps")


@dataclasses.dataclass
class Completion:
    """A request's output with its text (whole, and this step's piece when streaming)."""

    output: RequestOutput
    text: str
    delta: str = ""

    def __getattr__(self, name):
        return getattr(self.output, name)


def _deliver(items) -> None:
    """On a stream's event loop: each (queue, output) of one step into its queue."""
    for queue, out in items:
        queue.put_nowait(out)


class LLM:
    """An engine (init_inference's options) and a ServingEngine on it (SERVING_KEYS)."""

    def __init__(self, model, **options):
        from dsjax.engine import init_inference

        serving = {k: options.pop(k) for k in SERVING_KEYS if k in options}
        self.engine = init_inference(model, **options)
        self.serving = ServingEngine(self.engine, **serving)
        self._lock, self._streams, self._thread = threading.Lock(), {}, None
        self._aborts: collections.deque[str] = collections.deque()  # from closed streams
        self._done: dict[str, RequestOutput] = {}  # finished outputs of generate()'s requests

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def token_ids(self, prompt) -> list[int]:
        """A prompt's token ids (text through the tokenizer; ids as they are)."""
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def generate(self, prompts, sampling_params=None, *, progress: bool = True) -> list[Completion]:
        """Every prompt (text or token ids) to its end; sampling_params: one dict of options
        (generate()'s names and a seed) for all, or a list with one per prompt."""
        from tqdm import tqdm

        per = (sampling_params if isinstance(sampling_params, (list, tuple))
               else [sampling_params or {}] * len(prompts))
        if len(per) != len(prompts):
            raise ValueError(f"sampling_params has {len(per)} entries for {len(prompts)} prompts")
        with self._lock:
            ids = [self.serving.add_request(self.token_ids(p), **dict(o)) for p, o in zip(prompts, per)]
        with tqdm(total=len(ids), disable=not progress, desc="dsjax", unit="req") as bar:
            while any(i not in self._done for i in ids):
                before = sum(i in self._done for i in ids)
                self._step()
                bar.update(sum(i in self._done for i in ids) - before)
        return [self._completion(self._done.pop(i)) for i in ids]

    def _step(self) -> None:
        """One engine step; each output goes to its stream's queue, or (finished) to _done.
        Handed over under the lock, so that a stream gets its steps in order whichever thread
        steps (generate()'s caller or the stream thread)."""
        with self._lock:
            while self._aborts:  # streams whose reader left
                rid = self._aborts.popleft()
                if self._streams.pop(rid, None) is not None:
                    self.serving.abort(rid)
            by_loop: dict = {}  # one hand-off per event loop and step, not one per token
            for o in self.serving.step():
                target = self._streams.get(o.request_id)
                if o.finished:
                    self._streams.pop(o.request_id, None)
                    if target is None:
                        self._done[o.request_id] = o
                if target is not None:
                    by_loop.setdefault(target[0], []).append((target[1], o))
            for loop, items in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_deliver, items)
                except RuntimeError:  # its event loop is closed: nobody reads it any more
                    self._aborts.extend(o.request_id for _, o in items)

    def _completion(self, out: RequestOutput) -> Completion:
        try:
            text = self.tokenizer.decode(out.token_ids)
        except ValueError:  # no tokenizer: token ids only
            text = ""
        at = -1 if out.stop_string is None else text.find(out.stop_string)
        if at >= 0:  # the text ends before the stop string
            text = text[:at]
        return Completion(out, text)

    async def stream(self, prompt, **options):
        """Yields a Completion per new token of one request (delta: its new text, never a
        piece of a stop string); closing the iterator early aborts the request and frees its
        blocks. The event loop never waits for a step: the request is added from a worker
        thread, an abort is handed to the step thread."""
        queue: asyncio.Queue = asyncio.Queue()
        ids = self.token_ids(prompt)
        adding = asyncio.ensure_future(asyncio.to_thread(
            self._add, ids, options, (asyncio.get_running_loop(), queue)))
        try:
            rid = await asyncio.shield(adding)
        except asyncio.CancelledError:  # the add goes on in its thread: abort what it adds
            adding.add_done_callback(
                lambda f: f.cancelled() or f.exception() or self._aborts.append(f.result()))
            raise
        text = IncrementalText(self.tokenizer, ids, options.get("stop_strings"))
        finished = False
        try:
            while not finished:
                out = await queue.get()
                if isinstance(out, BaseException):  # the step thread failed
                    finished = True
                    raise RuntimeError(f"the serving engine failed: {out}") from out
                finished = out.finished
                piece = text.delta(out.token_ids, final=finished, stop=out.stop_string)
                yield Completion(out, text.shown, piece)
        finally:
            if not finished:
                self._aborts.append(rid)

    def _add(self, ids, options: dict, target) -> str:
        """Adds a streamed request; starts the step thread if none runs (decided under the
        lock the thread exits under, so a request never lands after its last look)."""
        with self._lock:
            rid = self.serving.add_request(ids, **options)
            self._streams[rid] = target
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True,
                                                name="dsjax-steps")
                self._thread.start()
        return rid

    def _run(self) -> None:
        """Steps while a stream is open (and until the last step dispatched is read); an error
        in a step goes to every open stream, whose reader then raises it."""
        try:
            while True:
                with self._lock:
                    if not self._streams and not self.serving.has_unfinished():
                        self._thread = None
                        return
                self._step()
        except Exception as e:  # noqa: BLE001 (handed to every reader)
            self._fail(e)

    def _fail(self, error: Exception) -> None:
        with self._lock:
            targets, self._streams, self._thread = list(self._streams.items()), {}, None
            for rid, _ in targets:
                try:
                    self.serving.abort(rid)  # (frees its blocks if the engine still can)
                except Exception:  # noqa: BLE001
                    pass
        for _, (loop, queue) in targets:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, error)
            except RuntimeError:  # its loop is closed
                pass
