"""dsjax.lazy: every block of a lazy tensor built with numpy's functions equals the same block
of the numpy array built by the same functions, and reads only its own bytes."""

import numpy as np
import pytest

from dsjax.lazy import ReadCounter, Stored
from dsjax.parallel.tensor import Slicing, pieces


@pytest.fixture
def pair():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((12, 10)).astype(np.float32)
    b = rng.standard_normal((6, 10)).astype(np.float32)
    counter = ReadCounter()
    return (a, b), (Stored(a, counter), Stored(b, counter)), counter


def build(x, y):
    """What the converters and the mesh placement do: fuse transposed parts, gather rows per
    head, pad, split, stack, cast."""
    fused = np.concatenate([x.T, y.T], axis=1)  # [10, 18]
    rows = np.arange(12).reshape(2, 3, 2).swapaxes(0, 1).reshape(-1)
    heads = np.take(x, rows, axis=0).T  # [10, 12]
    padded = np.pad(fused, [(0, 0), (0, 2)])  # [10, 20]
    quarters = np.split(padded, 4, axis=1)
    stacked = np.stack([np.concatenate(quarters[::-1], axis=1), padded])
    return [fused, heads, padded, *quarters, stacked, stacked.astype(np.float16), heads[2:7, 3:]]


def test_blocks_equal_numpy(pair):
    arrays, lazies, _ = pair
    for want, got in zip(build(*arrays), build(*lazies)):
        assert got.shape == want.shape and got.dtype == want.dtype
        np.testing.assert_array_equal(np.asarray(got), want)
        index = tuple(slice(n // 3, n - n // 4) for n in want.shape)
        np.testing.assert_array_equal(np.asarray(got[index]), want[index])


def test_tensor_slices_read_their_own_bytes(pair):
    """The mesh's pieces of a fused QKV kernel: each reads only its share of the checkpoint."""
    arrays, lazies, counter = pair
    how = Slicing(-1, ((2, 4), (1, 2), (1, 2)))  # q 2 heads x 4 | k 1 x 2 | v 1 x 2 (units < T)
    fused_np, fused = (np.concatenate([a.T for a in (x, y)], axis=1) for x, y in (arrays, lazies))
    for want, got in zip(pieces(fused_np[:, :16], how, 2), pieces(fused[:, :16], how, 2)):
        counter.bytes_read = 0
        np.testing.assert_array_equal(np.asarray(got), want)
        assert counter.bytes_read == want.nbytes


def test_unsupported_functions_are_errors_not_whole_reads(pair):
    _, (x, _), counter = pair
    with pytest.raises(TypeError):
        np.sum(x)
    with pytest.raises(TypeError, match="slices only"):
        x[[1, 2]]
    with pytest.raises(TypeError, match="zeros only"):
        np.pad(x, 1, mode="edge")
    for elementwise in (np.abs, np.isfinite, lambda a: a * 2):
        with pytest.raises(TypeError):
            elementwise(x)
    with pytest.raises(ValueError, match="do not join"):
        np.concatenate([x, x.T], axis=0)
    with pytest.raises(ValueError, match="do not join"):
        np.stack([x, x[:3]])
    assert counter.bytes_read == 0
