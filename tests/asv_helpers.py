"""What the asv tests share: running asv in a throwaway HOME, the project's asv.conf.json pointed at
a repository and a scratch folder, and git with a fixed identity."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest
from asv.util import load_json

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXISTING = f"existing:{sys.executable}"  # the interpreter running the tests, with semantic installed
FORK = ("--launch-method", "forkserver")  # as `make bench` on MLX's CPU build: imports once, not per process


def asv(env: dict, config, *args, cwd=ROOT, check=True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "asv"] + (["--config", str(config)] if config else []) + list(args)
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}")
    return proc


def config_for(tmp: pathlib.Path, repo: pathlib.Path = ROOT, **overrides) -> pathlib.Path:
    """The project's asv.conf.json, reading ``repo``'s history (and its committed reference results) and
    writing everything under ``tmp``."""
    conf = load_json(str(ROOT / "asv.conf.json"), js_comments=True)
    conf.update(
        repo=str(repo),
        benchmark_dir=str(repo / "benchmarks"),
        results_dir=str(tmp / "results"),
        html_dir=str(tmp / "html"),
        env_dir=str(tmp / "env"),
        reference_results_dir=str(repo / "benchmarks" / "results"),
    )
    conf.update(overrides)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "asv.conf.json"
    path.write_text(json.dumps(conf, indent=2))
    return path


def git(repo: pathlib.Path, *args) -> str:
    return subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@localhost", *args],
        cwd=repo, capture_output=True, text=True, check=True,
    ).stdout.strip()


def table_rows(output: str):
    """The rows of the tables asv compare / continuous print: cells of each ``| ... |`` line."""
    return [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in output.splitlines()
            if line.lstrip().startswith("|")]
