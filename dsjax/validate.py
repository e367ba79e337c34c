"""Checks of the values a caller passes (options, generate arguments, token ids): each is
validated as given, never coerced, and a bad one is an error that names it before any work.

A numpy integer is an integer wherever a Python int is; a bool is not an integer; a float is
never a token id; a string is never split into characters.
"""

from __future__ import annotations

import math
import numbers

import numpy as np

INT32_MAX = 2**31 - 1


def integer(name: str, value, low: int | None = None, high: int | None = None) -> int:
    """A Python or numpy integer (not a bool) within [low, high], as a Python int."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {_show(value)}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    hi = INT32_MAX if high is None else high
    if value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def boolean(name: str, value) -> bool:
    """True or False (numpy's bool too); a string such as "False" or a 0/1 is an error."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {_show(value)}")
    return bool(value)


def real(name: str, value) -> float:
    """A finite int or float (numpy's too), as a Python float."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {_show(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return float(value)


def token_list(name: str, value, low: int | None = 0) -> list[int]:
    """One token id or a list of them (stop tokens): ints only, never a string's characters."""
    if value is None:
        return []
    if isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_)):
        value = [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple, np.ndarray)):
        raise TypeError(f"{name} must be a token id or a list of token ids, got {_show(value)}")
    items = value.tolist() if isinstance(value, np.ndarray) else value
    return [integer(f"{name}[{i}]" if len(items) > 1 else name, v, low=low)
            for i, v in enumerate(items)]


def id_array(name: str, value) -> np.ndarray:
    """A [T] or [B, T] array-like of token ids -> int32, refusing floats, strings, bools, deeper
    nesting and values beyond int32 (a cast would wrap them into other, valid-looking ids)."""
    if isinstance(value, (str, bytes)):
        raise TypeError(f"{name} must be token ids, got a string; encode text with "
                        "engine.tokenizer.encode(text) first")
    try:
        a = np.asarray(value)
    except ValueError:  # ragged nesting
        raise ValueError(f"{name}: rows of different lengths need an attention_mask-free list "
                         "of lists (generate) or padding with a mask") from None
    if a.size == 0:
        a = a.astype(np.int32)  # [] and [[]]: numpy makes them float64
    if a.dtype.kind in "USO":
        raise TypeError(f"{name} must hold integer token ids, got {a.dtype} values"
                        + ("; encode text with engine.tokenizer.encode(text) first"
                           if a.dtype.kind in "US" else ""))
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name} must hold integer token ids, got {a.dtype} values")
    if a.ndim not in (1, 2):
        raise ValueError(f"{name} must be [batch, tokens] or [tokens], got shape {a.shape}")
    if a.size and (a.min() < 0 or a.max() > INT32_MAX):
        raise ValueError(f"{name} must lie in [0, {INT32_MAX}]; got [{a.min()}, {a.max()}]")
    return a.astype(np.int32)


def mask_array(name: str, value, shape: tuple) -> np.ndarray:
    """An HF-style attention mask of `shape`: 0/1 integers or bools -> bool."""
    m = np.asarray(value)
    m = m[None] if m.ndim == 1 and len(shape) == 2 and shape[0] == 1 else m
    if m.shape != tuple(shape):
        raise ValueError(f"{name} shape {m.shape} != input_ids shape {tuple(shape)}")
    if m.dtype.kind not in "biu" or (m.size and not np.isin(m, (0, 1)).all()):
        raise ValueError(f"{name} must hold 0 and 1 (or bools), got {m.dtype} values "
                         f"{np.unique(m)[:4].tolist()}")
    return m.astype(bool)


def _show(value) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"
