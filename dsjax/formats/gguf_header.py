"""A bounded first pass over a GGUF file's metadata, before gguf's GGUFReader parses it.

GGUFReader builds Python objects for every item of every metadata array, so an untrusted file
declaring tens of millions of array items (or a count larger than the file) would cost gigabytes
and minutes before any check of dsjax's. This pass walks the key-value section with no more
than one integer read per string item, and refuses counts that exceed the caps or the bytes
left in the file.
"""

from __future__ import annotations

import mmap
from pathlib import Path

from converters.loader import CheckpointError

MAX_KV = 1 << 16  # metadata keys
MAX_ITEMS = 1 << 22  # items in one metadata array (vocabularies and merges hold ~10^5)
MAX_STRING = 1 << 24  # bytes in one string (a chat template, a key)
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # type -> bytes
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, data, path: Path):
        self.data, self.at, self.path = data, 0, path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.at + n > len(self.data):
            raise CheckpointError(f"{self.path}: {what} runs past the end of the file "
                                  f"({len(self.data)} bytes): it is truncated or malformed")
        out = self.data[self.at:self.at + n]
        self.at += n
        return out

    def uint(self, size: int, what: str) -> int:
        return int.from_bytes(self.take(size, what), "little")


def check_metadata(path: Path) -> None:
    """Walks the header's key-value section; raises CheckpointError (naming the file and the
    key) for an unknown value type, a count over the caps or past the end of the file."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        c = _Cursor(data, path)
        c.take(4 + 4 + 8, "the header")  # magic, version, tensor count
        kv = c.uint(8, "the metadata count")
        if kv > MAX_KV:
            raise CheckpointError(f"{path}: declares {kv} metadata keys (at most {MAX_KV} read)")
        for _ in range(kv):
            key = _string(c, "a metadata key").decode("utf-8", "replace")
            _value(c, c.uint(4, f"{key!r}'s type"), key, depth=0)


def _string(c: _Cursor, what: str) -> bytes:
    n = c.uint(8, f"{what}'s length")
    if n > MAX_STRING:
        raise CheckpointError(f"{c.path}: {what} declares {n} bytes (at most {MAX_STRING})")
    return c.take(n, what)


def _value(c: _Cursor, kind: int, key: str, depth: int) -> None:
    if kind in _FIXED:
        c.take(_FIXED[kind], f"{key!r}'s value")
    elif kind == _STRING:
        _string(c, f"{key!r}'s value")
    elif kind == _ARRAY and depth == 0:
        item, n = c.uint(4, f"{key!r}'s item type"), c.uint(8, f"{key!r}'s item count")
        if n > MAX_ITEMS:
            raise CheckpointError(f"{c.path}: metadata {key!r} declares {n} items (at most "
                                  f"{MAX_ITEMS} read)")
        if item in _FIXED:
            c.take(n * _FIXED[item], f"{key!r}'s {n} items")
        else:
            for _ in range(n):
                _value(c, item, key, depth + 1)
    else:
        raise CheckpointError(f"{c.path}: metadata {key!r} has value type {kind}, which GGUF "
                              "does not define (or an array nested in an array)")
