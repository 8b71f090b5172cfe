"""semantic: every agent's KV cache kept in a pool of fixed 256-token blocks, on MLX and mlx-lm.

Layout: ``domain`` (the block pool, blocks, geometry, errors), ``adapters`` (the one
module that touches mlx-lm internals), ``application`` (the batch engine and the
block <-> cache conversions), ``persistence`` (agents kept on disk), ``testing``
(local models with random weights for tests, benchmarks and the demo).
"""

# First, before anything imports mlx.core: MLX's CPU matmuls must bind to OpenBLAS (see cpu_blas).
from semantic import cpu_blas  # noqa: F401  (imported for its effect)

__version__ = "0.1.0"
