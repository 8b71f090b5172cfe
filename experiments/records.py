"""What every experiment's JSON record says about where it ran, and how it is written."""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Optional, Sequence

import mlx.core as mx


def provenance(module: str, argv: Optional[Sequence[str]]) -> dict:
    """The command that reproduces the run (``argv`` as given to ``main``, else the process's) and the
    machine, MLX version and device it ran on."""
    args = sys.argv[1:] if argv is None else argv
    return {"command": f"python -m {module} " + " ".join(args), "machine": platform.platform(),
            "mlx": mx.__version__, "device": str(mx.default_device())}


def write_record(path: Optional[Path], record: dict) -> None:
    """Write ``record`` as indented JSON to ``path`` (its folders made); nothing when ``path`` is None."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2) + "\n")
