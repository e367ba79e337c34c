"""Host tensors read block by block: a converted checkpoint tensor that is not read until a
block of it is asked for, so that over a mesh each process reads from the checkpoint only the
slices its own devices hold.

A `Lazy` has a shape and a dtype and answers `np.asarray(x[index])` by reading just that block
from the file (a memory map). The converters' transforms and the mesh placement build them
with the numpy functions they already use on arrays: `.T`, slicing, `np.concatenate`,
`np.stack` (axis 0), `np.take`, `np.split`, `np.pad` (zeros) and `astype`. Any other numpy
function or ufunc (np.abs, x * 2) is a TypeError, never a silent read of the whole tensor.
`Stored` wraps the array a source gives (a memory-map view) and counts the bytes read through
it into a `ReadCounter`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

Index = tuple  # one 1-D integer array per axis: the block is their outer product


@dataclasses.dataclass
class ReadCounter:
    """Bytes read through the Stored tensors that share it (their dtype as stored)."""

    bytes_read: int = 0


class Lazy:
    shape: tuple
    dtype: np.dtype
    __array_ufunc__ = None  # np.abs(x), x * 2, ...: a TypeError, not a read of the whole tensor

    def block(self, index: Index) -> np.ndarray:
        """The outer-indexed block x[np.ix_(*index)]."""
        raise NotImplementedError

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.size * self.dtype.itemsize

    @property
    def T(self) -> Lazy:
        return Transposed(self)

    def astype(self, dtype) -> Lazy:
        dtype = np.dtype(dtype)
        return self if dtype == self.dtype else Mapped(self, lambda b: b.astype(dtype), dtype)

    def map(self, fn: Callable[[np.ndarray], np.ndarray]) -> Lazy:
        """fn over every block read (a check, or a dtype-keeping transform)."""
        return Mapped(self, fn, self.dtype)

    def reshape(self, *shape) -> Lazy:
        raise TypeError(f"{type(self).__name__} tensors are not reshaped lazily")

    def __array__(self, dtype=None, copy=None):
        whole = self.block(tuple(np.arange(n) for n in self.shape))
        return whole if dtype is None else whole.astype(dtype)

    def __getitem__(self, key) -> Lazy:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = key.index(Ellipsis)
            key = key[:at] + (slice(None),) * (self.ndim - len(key) + 1) + key[at + 1:]
        if len(key) > self.ndim or not all(isinstance(k, slice) for k in key):
            raise TypeError(f"lazy tensors take slices only, got {key!r}")
        out = self
        for axis, k in enumerate(key):
            if k != slice(None):
                out = Taken(out, axis, np.arange(self.shape[axis])[k])
        return out

    def __array_function__(self, func, types, args, kwargs):
        handler = _HANDLERS.get(func)
        if handler is None:
            return NotImplemented
        return handler(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={self.shape}, dtype={self.dtype})"


def lazy(x) -> Lazy:
    return x if isinstance(x, Lazy) else Stored(np.asarray(x))


def _run(ix: np.ndarray):
    """A slice for a contiguous ascending run of indices, else the indices."""
    if ix.size and ix[-1] - ix[0] == ix.size - 1 and (ix.size < 2 or np.all(np.diff(ix) == 1)):
        return slice(int(ix[0]), int(ix[-1]) + 1)
    return ix


class Stored(Lazy):
    """An array as a source gives it (typically a memory-map view): a block reads only itself."""

    def __init__(self, array: np.ndarray, counter: ReadCounter | None = None):
        self.array, self.counter = array, counter
        self.shape, self.dtype = tuple(array.shape), array.dtype

    def block(self, index: Index) -> np.ndarray:
        runs = [_run(np.asarray(ix)) for ix in index]
        out = self.array[tuple(r if isinstance(r, slice) else slice(None) for r in runs)]
        for axis, r in enumerate(runs):
            if not isinstance(r, slice):
                out = np.take(out, r, axis=axis)
        out = np.array(out) if isinstance(out, np.memmap) else out  # read here, not later
        if self.counter is not None:
            self.counter.bytes_read += out.nbytes
        return out

    def reshape(self, *shape) -> Lazy:
        return Stored(self.array.reshape(*shape), self.counter)


class Transposed(Lazy):
    def __init__(self, src: Lazy):
        self.src, self.shape, self.dtype = src, src.shape[::-1], src.dtype

    def block(self, index: Index) -> np.ndarray:
        return self.src.block(index[::-1]).T


class Mapped(Lazy):
    def __init__(self, src: Lazy, fn, dtype):
        self.src, self.fn, self.shape, self.dtype = src, fn, src.shape, np.dtype(dtype)

    def block(self, index: Index) -> np.ndarray:
        return self.fn(self.src.block(index))


class Computed(Lazy):
    """A value made whole by fn() when a block of it is first asked for (e.g. one slice's
    quantized codes: fn shares its work with the slice's other leaves)."""

    def __init__(self, shape, dtype, fn: Callable[[], np.ndarray]):
        self.shape, self.dtype, self.fn = tuple(shape), np.dtype(dtype), fn

    def block(self, index: Index) -> np.ndarray:
        return self.fn()[np.ix_(*index)]


class Taken(Lazy):
    """src's entries `indices` along `axis`; an index of -1 is a row of zeros (padding)."""

    def __init__(self, src: Lazy, axis: int, indices):
        self.src, self.axis, self.indices = src, axis % src.ndim, np.asarray(indices, np.int64)
        self.shape = src.shape[:self.axis] + (len(self.indices),) + src.shape[self.axis + 1:]
        self.dtype = src.dtype

    def block(self, index: Index) -> np.ndarray:
        sub = self.indices[np.asarray(index[self.axis])]
        keep = sub >= 0
        got = self.src.block(_at(index, self.axis, sub[keep]))
        if keep.all():
            return got
        out = np.zeros(tuple(len(ix) for ix in index), self.dtype)
        out[_at((slice(None),) * len(index), self.axis, keep)] = got
        return out


class Concat(Lazy):
    def __init__(self, parts: list[Lazy], axis: int):
        self.parts, self.axis = parts, axis % parts[0].ndim
        _same_shapes(parts, self.axis)
        self.offsets = np.cumsum([0] + [p.shape[self.axis] for p in parts])
        self.shape = _along(parts[0].shape, self.axis, int(self.offsets[-1]))
        self.dtype = np.result_type(*(p.dtype for p in parts))

    def block(self, index: Index) -> np.ndarray:
        pos = np.asarray(index[self.axis])
        which = np.searchsorted(self.offsets, pos, side="right") - 1
        out = np.empty(tuple(len(ix) for ix in index), self.dtype)
        for p in np.unique(which):
            sel = which == p
            got = self.parts[p].block(_at(index, self.axis, pos[sel] - self.offsets[p]))
            out[_at((slice(None),) * len(index), self.axis, sel)] = got
        return out


class Stacked(Lazy):
    def __init__(self, parts: list[Lazy]):
        _same_shapes(parts, None)
        self.parts, self.shape = parts, (len(parts),) + parts[0].shape
        self.dtype = np.result_type(*(p.dtype for p in parts))

    def block(self, index: Index) -> np.ndarray:
        return np.stack([self.parts[i].block(index[1:]).astype(self.dtype, copy=False)
                         for i in np.asarray(index[0])])


def _same_shapes(parts: list[Lazy], axis: int | None) -> None:
    """As numpy: parts joined along `axis` (None: stacked) agree on every other axis."""
    def other(shape):
        return shape if axis is None else shape[:axis] + shape[axis + 1:]
    if len({(p.ndim, other(p.shape)) for p in parts}) > 1:
        raise ValueError(f"lazy tensors of shapes {[p.shape for p in parts]} do not join "
                         f"{'by stacking' if axis is None else f'along axis {axis}'}")


def _at(index: tuple, axis: int, value) -> tuple:
    return index[:axis] + (value,) + index[axis + 1:]


def _along(shape: tuple, axis: int, n: int) -> tuple:
    return shape[:axis] + (n,) + shape[axis + 1:]


# ----------------------------------------------------------------------------- numpy functions

def _concatenate(arrays, axis=0, **kw):
    _no_options("concatenate", kw)
    return Concat([lazy(a) for a in arrays], axis)


def _stack(arrays, axis=0, **kw):
    _no_options("stack", kw)
    if axis != 0:
        raise TypeError("lazy tensors stack along axis 0 only")
    return Stacked([lazy(a) for a in arrays])


def _take(a, indices, axis=None, **kw):
    _no_options("take", kw)
    if axis is None or np.ndim(indices) != 1:
        raise TypeError("lazy tensors take 1-D indices along one axis")
    return Taken(lazy(a), axis, np.arange(a.shape[axis])[np.asarray(indices)])


def _split(a, sections, axis=0):
    if not isinstance(sections, int) or a.shape[axis] % sections:
        raise TypeError("lazy tensors split into equal parts only")
    return [Taken(a, axis, ix) for ix in np.split(np.arange(a.shape[axis]), sections)]


def _pad(a, pad_width, mode="constant", **kw):
    if mode != "constant" or kw.get("constant_values", 0) != 0:
        raise TypeError("lazy tensors pad with zeros only")
    out = a
    for axis, (before, after) in enumerate(np.broadcast_to(pad_width, (a.ndim, 2))):
        if before or after:
            ix = np.concatenate([np.full(before, -1), np.arange(a.shape[axis]), np.full(after, -1)])
            out = Taken(out, axis, ix)
    return out


def _no_options(name: str, kw: dict) -> None:
    if any(v is not None for v in kw.values()):
        raise TypeError(f"lazy tensors take np.{name} without {sorted(kw)}")


_HANDLERS = {np.concatenate: _concatenate, np.stack: _stack, np.take: _take, np.split: _split,
             np.pad: _pad, np.shape: lambda a: a.shape, np.ndim: lambda a: a.ndim}
