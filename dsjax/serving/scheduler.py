"""Dynamic SplitFuse on the host: which tokens each step runs.

Every step has a token budget. Each running sequence that has its prompt in the cache gets its
decode token first; prompt chunks fill the rest, a long prompt split over several steps, and
only the chunk that ends a prompt samples a token (FastGen's schedule). A new request is admitted
only when blocks exist for its whole prompt; when a running sequence needs a block and none is
free, the newest sequence is preempted (its blocks freed; it comes back later and recomputes its
tokens) instead of failing or stalling. A request that could never fit is refused when it is
added. Full blocks of prompt tokens are shared through the prefix cache (blocks.py).
"""

from __future__ import annotations

import collections
import dataclasses

import numpy as np

from dsjax.serving.blocks import BlockAllocator, OutOfBlocks, prefix_keys


PENDING = -1  # a token the device has sampled and the host has not read yet


@dataclasses.dataclass(eq=False)
class Sequence:
    """One request's tokens and the blocks that hold their K/V."""

    id: str
    prompt: list[int]
    max_new: int
    order: int  # admission order (the newest is preempted first)
    out: list[int] = dataclasses.field(default_factory=list)
    blocks: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # tokens whose K/V are in the cache
    preemptions: int = 0
    pending_row: int | None = None  # the in-flight step's output row of its last token
    keys: list[bytes] | None = None  # prefix keys of the prompt's full blocks (set when added)
    _table: tuple = dataclasses.field(default=(None, None), repr=False)  # (blocks, as int32)

    def block_array(self) -> np.ndarray:
        """blocks as an int32 array, kept between steps: a list of blocks only ever grows at its
        end (preemption and removal replace it)."""
        src, arr = self._table
        if src is not self.blocks or len(arr) > len(self.blocks):
            src, arr = self.blocks, np.asarray(self.blocks, np.int32)
        elif len(arr) < len(self.blocks):
            arr = np.concatenate([arr, np.asarray(self.blocks[len(arr):], np.int32)])
        self._table = (src, arr)
        return arr

    @property
    def length(self) -> int:
        return len(self.prompt) + len(self.out)

    def token_slice(self, start: int, n: int) -> list[int]:
        """tokens[start:start + n] without building the whole list."""
        p = len(self.prompt)
        if start + n <= p:
            return self.prompt[start:start + n]
        return self.prompt[start:p] + self.out[max(start - p, 0):start + n - p]

    @property
    def pending(self) -> int:
        """Tokens to run before the next token can be sampled."""
        return len(self.prompt) + len(self.out) - self.computed


@dataclasses.dataclass(frozen=True)
class Chunk:
    """seq runs tokens [start, start + n) of its tokens this step; samples after the last. A
    burst's chunk (steps > 1) runs n = steps decode steps: its first token is known (or in
    flight), the step samples each of the others from the one before, and a token after the
    last."""

    seq: Sequence
    start: int
    n: int
    samples: bool  # the chunk ends the sequence's tokens: a token is sampled after it
    steps: int = 1  # tokens sampled (decode steps run)

    @property
    def fed(self) -> int:
        """Tokens it puts in the step's buffer: all n, or a burst's first (the step makes the
        others)."""
        return self.n - self.steps + 1

    @classmethod
    def of(cls, seq: Sequence, n: int) -> Chunk:
        """seq's next n pending tokens."""
        return cls(seq, seq.computed, n, seq.computed + n == seq.length)


class Scheduler:
    def __init__(self, allocator: BlockAllocator, token_budget: int, max_seqs: int,
                 max_len: int, prefix_salt: bytes = b""):
        self.alloc, self.budget, self.max_seqs, self.max_len = allocator, token_budget, max_seqs, max_len
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self.salt, self.preemptions = prefix_salt, 0
        self.prefix_queried = self.prefix_hits = 0  # full prompt blocks looked up / found
        self._dropped: set[Sequence] = set()  # preempted during the schedule() running

    def check(self, prompt_len: int, max_new: int) -> None:
        """Refuses, at admission, a request that could never run."""
        total = prompt_len + max_new
        if total > self.max_len:
            raise ValueError(f"prompt of {prompt_len} tokens + max_new_tokens={max_new} exceeds "
                             f"the engine's max_model_len={self.max_len}")
        need = -(-total // self.alloc.block_size)
        if need > self.alloc.capacity:
            raise ValueError(f"this request needs {need} KV blocks; the pool has "
                             f"{self.alloc.capacity} for sequences (of its "
                             f"{self.alloc.num_blocks}, one is reserved): it can never run")

    def add(self, seq: Sequence) -> None:
        self.check(len(seq.prompt), seq.max_new)
        seq.keys = prefix_keys(seq.prompt, self.alloc.block_size, self.salt)
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """A finished or aborted sequence: its blocks freed, wherever it was."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.alloc.free(seq.blocks)
        seq.blocks = []

    def schedule(self) -> list[Chunk]:
        """This step's chunks: decode tokens first, then prompt chunks, within the budget (none
        of a sequence preempted meanwhile)."""
        chunks, left, self._dropped = [], self.budget, set()
        for seq in sorted((s for s in self.running if s.pending == 1), key=lambda s: s.order):
            if seq in self._dropped or left == 0 or len(seq.out) >= seq.max_new:
                continue  # preempted while making room for an older one
            if self._grow(seq, seq.computed + 1):
                chunks.append(Chunk.of(seq, 1))
                left -= 1
        prompts = [s for s in self.running if s.pending > 1]
        for i, seq in enumerate(prompts + list(self.waiting)):
            if left == 0 or len(chunks) >= self.max_seqs:
                break
            # first come, first served: no later request jumps the queue (whose head may be a
            # sequence preempted just now: it waits for the next step)
            if seq in self._dropped or i >= len(prompts) and not self._admit(seq):
                break
            n = min(seq.pending, left)
            if self._grow(seq, seq.computed + n):
                chunks.append(Chunk.of(seq, n))
                left -= n
        return [c for c in chunks if c.seq not in self._dropped]

    def burst_runs(self, steps: int) -> list[tuple[Sequence, int]] | None:
        """For a burst of `steps` decode steps: each running sequence and the steps it runs
        (fewer for one that reaches its max_new_tokens first; [] when idle), or None where a
        single step is due: a request waiting, a prompt still running, no sequence with all
        `steps` left (a shorter burst would waste steps), or too few free blocks for every
        sequence's next tokens (a burst never preempts). Changes nothing."""
        if self.waiting or any(s.pending != 1 for s in self.running):
            return None
        runs, need = [], 0
        for seq in sorted(self.running, key=lambda s: s.order):
            n = min(steps, seq.max_new - len(seq.out))
            if n > 0:
                runs.append((seq, n))
                need += max(0, self._short(seq, seq.computed + n))
        if not runs:
            return []
        if len(runs) > self.budget or need > self.alloc.num_free or max(n for _, n in runs) < steps:
            return None
        return runs

    def burst(self, runs: list[tuple[Sequence, int]]) -> list[Chunk]:
        """The chunks of burst_runs()' runs, their blocks allocated (free ones: counted there)."""
        chunks = []
        for seq, n in runs:
            self._grow(seq, seq.computed + n)
            chunks.append(Chunk(seq, seq.computed, n, True, n))
        return chunks

    def _admit(self, seq: Sequence) -> bool:
        """Moves the queue's head to running if blocks exist for its whole prompt (after taking
        what the prefix cache holds)."""
        if len(self.running) >= self.max_seqs:
            return False
        n = seq.length
        keys = seq.keys[:(n - 1) // self.alloc.block_size]  # (only prompt blocks
        # are ever published: a block holding output tokens is never found)
        for key in keys:
            block = self.alloc.cached(key)
            if block is None:
                break
            seq.blocks.append(block)
        seq.computed = len(seq.blocks) * self.alloc.block_size
        need = self._short(seq, n)
        if need > self.alloc.num_free:
            self.alloc.free(seq.blocks)
            seq.blocks, seq.computed = [], 0
            return False
        self.waiting.remove(seq)
        self.running.append(seq)
        self.prefix_queried += len(keys)
        self.prefix_hits += len(seq.blocks)
        return True

    def _short(self, seq: Sequence, tokens: int) -> int:
        """Blocks seq lacks to hold its first `tokens` tokens (negative: it holds more)."""
        return -(-tokens // self.alloc.block_size) - len(seq.blocks)

    def _grow(self, seq: Sequence, tokens: int) -> bool:
        """Blocks for seq's first `tokens` tokens, preempting the newest other sequences when
        the pool is empty; False if seq itself had to go."""
        while len(seq.blocks) * self.alloc.block_size < tokens:
            try:
                seq.blocks.append(self.alloc.allocate())
            except OutOfBlocks:
                victim = max(self.running, key=lambda s: s.order)
                self.preempt(victim)
                if victim is seq:
                    return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Frees seq's blocks and puts it back at the queue's head: it recomputes its prompt and
        the tokens it made so far when it runs again."""
        self.running.remove(seq)
        self._dropped.add(seq)
        self.alloc.free(seq.blocks)
        seq.blocks, seq.computed = [], 0
        seq.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(seq)

    def advance(self, chunks: list[Chunk]) -> None:
        """After a step: the chunks' tokens are in the cache; full prompt blocks published."""
        bs = self.alloc.block_size
        for c in chunks:
            c.seq.computed = c.start + c.n
            done = min(c.seq.computed, len(c.seq.prompt)) // bs
            for i in range(c.start // bs, done):
                self.alloc.publish(c.seq.blocks[i], c.seq.keys[i])
