"""Loaded weights must be finite: a NaN or inf in a checkpoint (a corrupt file, an overflowed
cast, a diverged training run) is an error that names the tensor, not NaN logits later.

Host arrays are checked by their exponent bits in chunks (no copy of a whole tensor), device
arrays by one fused reduction each; init_inference(check_finite=False) skips both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

_CHUNK = 1 << 24  # elements per host pass


class NonFiniteWeights(ValueError):
    """A loaded weight holds NaN or inf."""


def check(name: str, x, origin: str, whole: tuple | None = None) -> None:
    """Raises NonFiniteWeights when x (a numpy or JAX array, or a quantized weight's float
    scales and zeros, and its codes when they are floats: FP8) holds NaN or inf; whole: the
    weight's shape where x is one device's slice of it."""
    fields = ("values", "scales", "zeros")  # (integer codes pass _finite as they are)
    parts = [getattr(x, f) for f in fields] if hasattr(x, "scales") else [x]
    for part in parts:
        if part is not None and not _finite(part):
            where = f"shape {tuple(part.shape)}" if whole is None else (
                f"shape {tuple(whole)}, in the slice of shape {tuple(part.shape)} read for a device")
            raise NonFiniteWeights(
                f"{origin}: weight {name!r} ({part.dtype}, {where}) holds NaN or inf; the "
                "checkpoint is corrupt or was saved from a diverged model "
                "(init_inference(check_finite=False) loads it anyway)")


def check_all(flat: dict, origin: str) -> None:
    """check() over {path: weight}, in path order (the first bad tensor is named)."""
    for name in sorted(flat):
        check(name, flat[name], origin)


def _finite(x) -> bool:
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return True
    if isinstance(x, jax.Array):
        return bool(_all_finite(x))
    return _host_finite(np.asarray(x))


@jax.jit
def _all_finite(x):
    return jnp.all(jnp.isfinite(x))


def _host_finite(x: np.ndarray) -> bool:
    """All exponent fields short of all-ones (inf and NaN have every exponent bit set), read in
    chunks of the array's own memory (a transposed view is read as it lies)."""
    info = ml_dtypes.finfo(x.dtype)
    bits = np.dtype(f"u{x.dtype.itemsize}")
    mask = bits.type(((1 << info.nexp) - 1) << info.nmant)
    if x.dtype == ml_dtypes.float8_e4m3fn:  # no inf; all-ones exponents are finite but for
        mask = bits.type(0x7F)  # the one NaN pattern, every bit but the sign set
    x = x.T if x.flags.f_contiguous else x
    x = x.reshape(-1) if x.flags.c_contiguous else x
    step = max(1, _CHUNK // max(1, x[:1].size))  # leading-axis entries per pass
    for i in range(0, len(x), step):
        part = np.ascontiguousarray(x[i: i + step]).view(bits)
        if ((part & mask) == mask).any():
            return False
    return True
