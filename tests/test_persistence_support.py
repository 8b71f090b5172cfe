"""Helpers for the ``test_persistence*`` modules and the child processes they start (no tests here).

Imports neither pytest nor mlx-lm, so a child process that uses it starts in
about half a second.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import subprocess
import sys
from typing import List, Optional, Tuple

import mlx.core as mx
import numpy as np

from semantic.domain.entities import AgentBlocks
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.persistence import AgentCacheStore

TESTS_DIR = pathlib.Path(__file__).resolve().parent
REPO_ROOT = TESTS_DIR.parent
FINGERPRINT = "synthetic-test-model:0123456789abcdef"

# 4-token blocks, and a 6-token sliding window that spans two or three blocks.
SMALL_SPEC = ModelCacheSpec(3, 2, 4, 4, "bfloat16", block_size=4, layer_windows=(None, 6, None), name="small")

# A context that takes a while to save (6 layers x 2 blocks, 2.4 MB), for the crash tests' child processes.
CRASH_SPEC = ModelCacheSpec.preset("smollm2-135m").with_layers(6)
CRASH_TOKENS = 500
CRASH_POOL_BLOCKS = 3 * CRASH_SPEC.blocks_per_agent(CRASH_TOKENS)

Snapshot = Tuple[Tuple[int, ...], Tuple[bytes, ...]]


def random_handle(pool: BlockPool, agent_id: str, n_tokens: int, seed: int) -> AgentBlocks:
    """A context of ``n_tokens`` random tokens with random keys and values, the same for the same seed in
    any process, holding exactly the blocks a real context of that length holds."""
    spec = pool.spec
    rng = np.random.default_rng(seed)
    dtype = getattr(mx, spec.dtype)
    with pool.build_handle(agent_id) as builder:
        layer_ids, plan = [], []
        for layer in range(spec.n_layers):
            first, last = spec.layer_block_range(layer, n_tokens)
            ids = builder.allocate(last - first)
            layer_ids.append(ids)
            if ids:
                tokens = (last - first) * spec.block_size
                keys, values = (
                    mx.array(rng.random((1, spec.n_kv_heads, tokens, dim), dtype=np.float32)).astype(dtype)
                    for dim in (spec.k_head_dim, spec.v_head_dim)
                )
                plan.append((ids, first, keys, values, first * spec.block_size))
        pool.write_many(plan)
        return builder.finish(rng.integers(0, 50_000, n_tokens).tolist(), layer_ids)


def snapshot(handle: AgentBlocks) -> Snapshot:
    """Token ids and every layer's key and value bytes: equal snapshots are equal contexts."""
    layers = []
    for ids in handle.all_block_ids:
        if ids:
            keys, values = handle.pool.gather([ids])
            layers.append(np.array(keys.view(mx.uint8)).tobytes() + np.array(values.view(mx.uint8)).tobytes())
        else:
            layers.append(b"")
    return handle.token_ids, tuple(layers)


def snapshot_of(pool: BlockPool, agent_id: str, n_tokens: int, seed: int) -> Snapshot:
    with random_handle(pool, agent_id, n_tokens, seed) as handle:
        return snapshot(handle)


def open_store(directory, spec: ModelCacheSpec = SMALL_SPEC, total_blocks: int = 200, **kwargs) -> AgentCacheStore:
    return AgentCacheStore(directory, BlockPool(spec, total_blocks), FINGERPRINT, **kwargs)


def loaded_snapshot(store: AgentCacheStore, agent_id: str) -> Snapshot:
    with store.load(agent_id) as handle:
        return snapshot(handle)


def directory_state(directory) -> dict:
    """Every file's name and bytes: what "no change to the other files" compares."""
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(directory).iterdir()) if p.is_file()}


@contextlib.contextmanager
def nothing_changes(store: AgentCacheStore, *, except_file: Optional[str] = None):
    """The block below may raise, but must leave the pool, the store and the other files as they were."""
    usage, resident = store.pool.usage(), store.resident
    files = {k: v for k, v in directory_state(store.directory).items() if k != except_file}
    yield
    assert store.pool.usage() == usage
    store.pool.check_invariants()
    assert store.resident == resident
    assert {k: v for k, v in directory_state(store.directory).items() if k != except_file} == files


def temp_files(directory) -> List[str]:
    return sorted(p.name for p in pathlib.Path(directory).glob(".*.tmp"))


def python_child(code: str, *args, **popen_kwargs) -> subprocess.Popen:
    """A Python child running ``code`` (with this module importable) on ``args``; stdout is a pipe."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(TESTS_DIR)])}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            text=True, env=env, cwd=REPO_ROOT, **popen_kwargs)


def run_python(code: str, *args, timeout: float = 300) -> dict:
    """Run ``code`` in a child and return the JSON object it prints last; fails loudly with its output."""
    child = python_child(code, *args, stderr=subprocess.PIPE)
    out, err = child.communicate(timeout=timeout)
    if child.returncode != 0:
        raise AssertionError(f"child failed ({child.returncode}):\n{out}\n{err}")
    return json.loads(out.strip().splitlines()[-1])

