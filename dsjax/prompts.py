"""Host-side prompt handling shared by generate() and the encoders: token rows from the forms a
user passes, HF-style masks cut off, and right-padding to bucketed shapes (so new lengths inside
a bucket reuse a compiled program)."""

from __future__ import annotations

import numpy as np

from dsjax.numerics import next_pow2
from dsjax.validate import id_array, mask_array


def bucket(n: int, minimum: int = 16) -> int:
    """Next power of two >= n (at least `minimum`): prompt lengths and batch sizes compile once
    per bucket instead of once per value."""
    return max(minimum, next_pow2(n))


def token_rows(x, what: str) -> list[np.ndarray]:
    """A token list, a list of token lists, or a [B, T] / [T] array -> list of 1-D int32 rows
    (validated as given: floats, strings, bools, values beyond int32 and deeper nesting are
    errors, see dsjax.validate.id_array)."""
    if isinstance(x, (list, tuple)) and x and not isinstance(x[0], (list, tuple, np.ndarray)):
        x = [x]  # one token list
    if isinstance(x, (list, tuple)):
        rows = [id_array(f"{what}[{i}]", r) for i, r in enumerate(x)]
        deeper = next((i for i, r in enumerate(rows) if r.ndim != 1), None)
        if deeper is not None:
            raise ValueError(f"{what} must be [batch, tokens]: row {deeper} is nested deeper "
                             f"(shape {rows[deeper].shape})")
    else:
        a = id_array(what, x)
        rows = list(a[None] if a.ndim == 1 else a)
    if not rows or any(r.size == 0 for r in rows):
        raise ValueError(f"{what}: every row needs at least one token")
    return rows


def row_mask(rows: list[np.ndarray], attention_mask) -> np.ndarray:
    """An HF-style attention_mask for token rows of one length: 0/1 values of their [B, T]
    shape, as bool."""
    if len({r.size for r in rows}) != 1:
        raise ValueError(f"attention_mask needs input_ids rows of one length, got lengths "
                         f"{sorted({r.size for r in rows})}")
    return mask_array("attention_mask", attention_mask, (len(rows), rows[0].size))


def prompt_rows(input_ids, attention_mask) -> list[np.ndarray]:
    """Token rows of a generate() call; an HF-style mask (either side) cuts each row's padding."""
    rows = token_rows(input_ids, "input_ids")
    if attention_mask is None:
        return rows
    mask = row_mask(rows, attention_mask)
    out = []
    for r, m in zip(rows, mask):
        idx = np.flatnonzero(m)
        if idx.size and idx[-1] - idx[0] + 1 != idx.size:
            raise ValueError("attention_mask rows must be one contiguous run of 1s (left or right padding)")
        out.append(r[idx])
    return out


def pack(rows: list[np.ndarray], budget: int, pad: int, groups: int = 1,
          min_rows: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Right-pads to a bucketed [B', T'] (B' / groups and T' powers of two, `groups` = the
    replicas x micro-batches the batch is cut into); filler rows have length 0 (generate treats
    them as finished from the start, so they never hold up an early stop).

    B' >= min_rows: 2 for XLA's GEMMs (with one row XLA's GPU rewrites small decode GEMVs into a
    slower multiply + reduce), 1 for the Pallas gemv, which pays for every row it is given
    (docs/decisions.md#two-row-batch-minimum)."""
    B = groups * bucket(-(-len(rows) // groups), minimum=min_rows)
    T = min(bucket(max(len(r) for r in rows)), budget)
    tokens = np.full((B, T), pad, np.int32)
    lengths = np.zeros((B,), np.int32)
    for b, r in enumerate(rows):
        tokens[b, : len(r)] = r
        lengths[b] = len(r)
    return tokens, lengths
