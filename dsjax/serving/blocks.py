"""The host side of the paged KV cache: which blocks are free, who holds each block, and the
prefix cache.

A block holds `block_size` consecutive tokens of one sequence (for every layer: the pools are
per-layer arrays indexed by the same block ids). A full block of prompt tokens can be shared:
its key is a hash of every token from the sequence's start to the block's end (so equal keys
mean equal K/V), and requests with that prefix take a reference instead of computing it again.
A block whose references drop to zero keeps its content and its key until it is reused, least
recently freed first (LRU eviction).
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np


class OutOfBlocks(Exception):
    """No free block is left (the scheduler preempts a sequence and retries)."""


class BlockAllocator:
    """num_blocks blocks of block_size tokens; block 0 is never handed out (it is the padding
    entry of block tables and the target of writes that must land nowhere)."""

    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 2:
            raise ValueError(f"a KV pool needs at least 2 blocks (one is reserved), got {num_blocks}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs = np.zeros(num_blocks, np.int32)
        self._free = collections.OrderedDict((b, None) for b in range(1, num_blocks))
        self._key_of: dict[int, bytes] = {}  # block -> its prefix key (full prompt blocks)
        self._block_of: dict[bytes, int] = {}  # prefix key -> block
        self.hits = 0  # blocks taken from the prefix cache

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (cached prefixes included: they are evictable)."""
        return len(self._free)

    @property
    def capacity(self) -> int:
        return self.num_blocks - 1

    def allocate(self) -> int:
        """A fresh block (the least recently freed one; its cached prefix, if any, is evicted)."""
        if not self._free:
            raise OutOfBlocks
        block, _ = self._free.popitem(last=False)
        key = self._key_of.pop(block, None)
        if key is not None:
            del self._block_of[key]
        self.refs[block] = 1
        return block

    def free(self, blocks) -> None:
        """Drops one reference to each block; unreferenced blocks become free (their prefix stays
        findable until the block is reused)."""
        for block in blocks:
            if self.refs[block] <= 0:
                raise RuntimeError(f"block {block} freed more often than allocated")
            self.refs[block] -= 1
            if self.refs[block] == 0:
                self._free[block] = None

    def cached(self, key: bytes) -> int | None:
        """The block holding the prefix `key`, with a new reference to it, or None."""
        block = self._block_of.get(key)
        if block is None:
            return None
        if self.refs[block] == 0:
            del self._free[block]
        self.refs[block] += 1
        self.hits += 1
        return block

    def publish(self, block: int, key: bytes) -> None:
        """Marks a full block of prompt tokens as holding the prefix `key` (first one wins)."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key], self._key_of[block] = block, key

    def forget_prefixes(self) -> None:
        """Drops every cached prefix (the K/V they hold are stale once the weights change)."""
        self._key_of.clear()
        self._block_of.clear()

    def in_use(self) -> int:
        """Blocks referenced by some sequence."""
        return int(np.count_nonzero(self.refs))


def prefix_keys(tokens, block_size: int, salt: bytes = b"") -> list[bytes]:
    """The prefix key of each full block of `tokens`: a hash chained over the blocks, so a key
    names the whole prefix up to its block's end (salt: e.g. the KV dtype)."""
    keys, h = [], hashlib.sha256(salt)
    arr = np.asarray(tokens, np.int64)
    for start in range(0, len(arr) - block_size + 1, block_size):
        h.update(arr[start:start + block_size].tobytes())
        keys.append(h.copy().digest())
    return keys
