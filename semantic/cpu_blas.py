"""Make MLX's Linux CPU build use OpenBLAS instead of the reference BLAS its wheel bundles.

MLX's ``mlx[cpu]`` wheel links netlib's reference BLAS: a float32 matmul of a 135M-parameter model runs
at a few GFLOP/s. Debian's OpenBLAS (``libopenblas0-pthread``) exports the same ``cblas_*`` symbols;
loaded with global symbols before ``mlx.core``, it is what MLX's calls bind to. This module does that
on import, which ``semantic/__init__.py`` does before anything imports MLX.

``OPENBLAS`` is the path loaded, or None. ``SEMANTIC_OPENBLAS`` names another library file to load;
``SEMANTIC_OPENBLAS=0`` turns the loading off (to measure without it).
"""

from __future__ import annotations

import ctypes
import glob
import os
import sys
from typing import Optional

# Debian/Ubuntu's multiarch paths: the pthread build first (its threads work with MLX's own).
_CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)
INSTALL_HINT = "sudo apt-get install libopenblas0-pthread"


def _find() -> Optional[str]:
    chosen = os.environ.get("SEMANTIC_OPENBLAS")
    if chosen:
        return chosen
    for pattern in _CANDIDATES:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    return None


def _already_loaded() -> Optional[str]:
    """The OpenBLAS this process already maps (``LD_PRELOAD``, or loaded by someone else)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                if "libopenblas" in line:
                    return line.split()[-1]
    except OSError:
        pass
    return None


def _load() -> Optional[str]:
    if not sys.platform.startswith("linux") or os.environ.get("SEMANTIC_OPENBLAS") == "0":
        return None
    loaded = _already_loaded()
    if loaded:
        return loaded
    path = _find()
    if path is None:
        print(f"semantic: OpenBLAS not found, MLX's CPU matmuls use the slow reference BLAS; "
              f"install it with: {INSTALL_HINT}", file=sys.stderr)
        return None
    if "mlx.core" in sys.modules:
        # Measured: loaded after mlx.core, the matmuls stay on the reference BLAS.
        print(f"semantic: mlx.core was imported before semantic, too late to load OpenBLAS; import semantic "
              f"first, or start Python with LD_PRELOAD={path}", file=sys.stderr)
        return None
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        print(f"semantic: could not load OpenBLAS from {path} ({exc}); MLX's CPU matmuls stay slow",
              file=sys.stderr)
        return None
    return path


OPENBLAS: Optional[str] = _load()
