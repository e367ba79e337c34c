"""One step's inputs as a single int32 buffer: built on the host from the scheduler's chunks,
sent in one transfer, and taken apart inside the jitted step.

The buffer of one replica holds, flattened:

    tokens     [5, N]  token id, the previous step's row (-1: none), position, slot, sequence row
    rows       [S, R]  per sequence row: ROW_COLUMNS, then its EOS ids (-1 padded)
    tables     [S, MB] block tables

float32 and uint32 values lie in it as their bits. Each request's sampling values are packed
once, when it is added (`request_record`); a step copies its records into the rows. The
buffer's `Layout` (N, S, EOS columns, MB, decode steps) is static: part of the step program's
key. A step of several decode steps (a burst: every chunk a running sequence's decode token,
`Chunk.steps` > 1) holds one token per sequence, its first; the program makes the others (each
row's `steps` column says how many decode steps it runs).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from dsjax import sampling as smp
from dsjax import settings as st
from dsjax.numerics import next_pow2
from dsjax.serving.paged import StepMeta, slots_of

# the fixed columns of a row; EOS ids follow
ROW_COLUMNS = ("sample_at", "new_tokens", "steps", "seed", "do_sample", "temperature", "top_k",
               "top_p", "min_p", "min_new")
_FLOATS = ("temperature", "top_p", "min_p")
_COL = {name: i for i, name in enumerate(ROW_COLUMNS)}
MIN_EOS = 8  # EOS columns of a step: at least this many (a power of two), so that requests
# with a few EOS ids each share one program


@dataclasses.dataclass(frozen=True)
class Layout:
    """The shapes of one step's buffer (static)."""

    tokens: int  # N
    seqs: int  # S
    eos: int  # EOS columns
    max_blocks: int  # MB
    steps: int = 1  # decode steps the program runs (> 1: a burst of one token per sequence)

    @property
    def size(self) -> int:
        return 5 * self.tokens + self.seqs * (len(ROW_COLUMNS) + self.eos + self.max_blocks)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class StepInputs:
    """The device's view of a step's buffer."""

    tokens: jax.Array  # [N] int32 (padding: 0)
    from_prev: jax.Array  # [N] int32: >= 0 takes the previous step's token of that row instead
    positions: jax.Array  # [N] int32
    meta: StepMeta
    sample_at: jax.Array  # [S] int32: the index in N of each sequence's last token
    new_tokens: jax.Array  # [S] int32: tokens each sequence has generated so far
    steps: jax.Array  # [S] int32: decode steps each sequence runs (0: a filler row)
    seeds: jax.Array  # [S] uint32: each request's sampling seed
    sampling: smp.Sampling  # [S] rows


def request_record(settings: st.GenerationSettings, prompt_len: int, seed: int) -> np.ndarray:
    """A request's row (sample_at, new_tokens and steps left 0: the step fills them) as
    int32."""
    s = st.sampling_rows([settings], 1, [prompt_len])
    row = np.zeros(len(ROW_COLUMNS) + len(settings.eos_token_id), np.int32)
    values = dict(seed=np.uint32(seed), do_sample=s.do_sample[0], temperature=s.temperature[0],
                  top_k=s.top_k[0], top_p=s.top_p[0], min_p=s.min_p[0], min_new=s.min_new[0])
    for name, v in values.items():
        dtype = np.float32 if name in _FLOATS else np.uint32 if name == "seed" else np.int32
        row[_COL[name]] = np.asarray(v, dtype).reshape(1).view(np.int32)[0]
    row[len(ROW_COLUMNS):] = settings.eos_token_id
    return row


def pack(chunks, records: list[np.ndarray], fill: np.ndarray, layout: Layout, block_size: int):
    """One replica's buffer: chunks (scheduler Chunks, in row order), their requests' records,
    the record of filler rows. A burst's chunk puts its first token in the buffer."""
    N, S, MB, k = layout.tokens, layout.seqs, layout.max_blocks, len(chunks)
    tok = np.zeros((5, N), np.int32)
    tok[1], tok[3] = -1, -1  # no previous-step token; padding writes nowhere
    rows = np.full((S, len(ROW_COLUMNS) + layout.eos), -1, np.int32)
    tables = np.zeros((S, MB), np.int32)
    ids, prev_at, prev_row = [], [], []
    ns = np.fromiter((c.fed for c in chunks), np.int32, k)
    for i, (c, rec, n) in enumerate(zip(chunks, records, ns.tolist())):
        seq = c.seq
        if seq.pending_row is not None:  # its last token is the step in flight's
            last = seq.length - 1
            if c.start <= last < c.start + n:
                prev_at.append(len(ids) + last - c.start)
                prev_row.append(seq.pending_row)
        ids += seq.token_slice(c.start, n)
        blocks = seq.block_array()
        tables[i, :len(blocks)] = blocks
        rows[i, :len(rec)] = rec
    ends = np.cumsum(ns, dtype=np.int32)
    n = int(ends[-1]) if k else 0
    seq_of = np.repeat(np.arange(k, dtype=np.int32), ns)
    starts = np.fromiter((c.start for c in chunks), np.int32, k)
    pos = np.arange(n, dtype=np.int32) + np.repeat(starts - ends + ns, ns)
    tok[0, :n] = np.maximum(ids, 0)  # (a pending token's place: from_prev fills it)
    tok[1, prev_at] = prev_row
    tok[2, :n], tok[4, :n] = pos, seq_of
    tok[3, :n] = slots_of(tables, seq_of, pos, block_size)
    rows[:k, 0], rows[:k, 1] = ends - 1, [len(c.seq.out) for c in chunks]
    rows[:k, 2] = [c.steps for c in chunks]
    rows[k:, :len(fill)] = fill
    return np.concatenate([tok.ravel(), rows.ravel(), tables.ravel()])


def eos_columns(records) -> int:
    return next_pow2(max([MIN_EOS] + [len(r) - len(ROW_COLUMNS) for r in records]))


def unpack(buf, layout: Layout) -> StepInputs:
    """The buffer [layout.size] int32 as StepInputs (inside the jitted step)."""
    N, S, MB = layout.tokens, layout.seqs, layout.max_blocks
    R = len(ROW_COLUMNS) + layout.eos
    tok = buf[:5 * N].reshape(5, N)
    rows = buf[5 * N:5 * N + S * R].reshape(S, R)
    tables = buf[5 * N + S * R:].reshape(S, MB)
    col = lambda name: rows[:, _COL[name]]  # noqa: E731
    f32 = lambda name: jax.lax.bitcast_convert_type(col(name), jnp.float32)  # noqa: E731
    ones, zeros = jnp.ones(S, jnp.float32), jnp.zeros(S, jnp.float32)
    sampling = smp.Sampling(
        do_sample=col("do_sample") != 0, temperature=f32("temperature"), top_k=col("top_k"),
        top_p=f32("top_p"), min_p=f32("min_p"), repetition_penalty=ones, presence_penalty=zeros,
        frequency_penalty=zeros, no_repeat_ngram=jnp.zeros(S, jnp.int32), min_new=col("min_new"),
        eos=rows[:, len(ROW_COLUMNS):], bias_ids=jnp.full((S, 1), -1, jnp.int32),
        bias=jnp.zeros((S, 1), jnp.float32), bad_seqs=jnp.full((S, 1, 2), -1, jnp.int32))
    return StepInputs(tok[0], tok[1], tok[2], StepMeta(tok[3], tok[4], tables), col("sample_at"),
                      col("new_tokens"), col("steps"),
                      jax.lax.bitcast_convert_type(col("seed"), jnp.uint32), sampling)
