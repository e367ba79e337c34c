"""Pallas GPU kernels, one module per kernel, each with a pure-JAX reference beside it.

The kernels arrive with the GEMM- and attention-kernel issues and register themselves with
`dsjax.ops` under the "pallas" implementation name; until then the model runs its XLA path.
"""
