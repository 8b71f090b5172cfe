"""An independent fault-injection pass over the engine, the pool and the store (issue 13's table).

    python -m experiments.fault_injection                 # tiny-llama on CPU, about 400 trials
    python -m experiments.fault_injection --trials 100 --seed 3

Trials run in a child process so a crash (a signal) or a hang (no answer within ``--timeout`` s) is
counted instead of ending the pass; the child is restarted after either. Each trial is one of:

* ``submit``: ``engine.generate`` with arguments drawn from valid and invalid values (ids past the
  vocabulary, bools, bytes, NaN, out-of-range sampling parameters, ...). The expected outcome comes
  from this script's own rules, not from the engine's checks.
* ``fault``: three good requests and one bad one in a batch, the bad one made to fail in admission,
  prefill, decode (forward pass or its own sampler) or store by patching the model / engine in the
  child; the others' tokens are compared with a run without it. In ``company`` the bad one fails only
  in a batch of more than one (as a batch too large for memory would): the engine keeps requests found
  failing together apart, and runs one alone before failing it, so every request, the bad one too, must
  get its tokens (the bad one failed counts as a valid input refused).
* ``pool``: a random public ``BlockPool`` call with random (often bad) arguments.
* ``file``: a saved agent file damaged in its header (bytes changed, padding included), its tensors
  or its length, a planted lock symlink, a directory in its place, or an agent id with ``/``.

After every trial the pool must be whole: ``check_invariants()`` and, once handles are released,
no block used or reserved. Prints one table: trials, typed errors, wrong data accepted, untyped
errors, crashes, hangs, blocks lost (and valid inputs refused).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import selectors
import subprocess
import sys
import time

CHILD = r"""
import gc, json, math, os, pathlib, random, struct, sys, tempfile
from semantic.testing.local_models import load_local_model  # first: semantic loads OpenBLAS before MLX
import numpy as np, mlx.core as mx
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.domain.errors import SemanticError
from semantic.application import batch_engine
from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.persistence import AgentCacheStore

model, tok = load_local_model("tiny-llama")
spec = ModelCacheSpec.from_model(model)
pool = BlockPool(spec, 64)
engine = BlockPoolBatchEngine(model, tok, pool)
VOCAB = 2048
GOOD = {"a": "the quick brown fox jumps over the lazy dog " * 4, "b": "one two three four five six " * 5,
        "c": "red green blue " * 12}
reference = {}
for agent, prompt in GOOD.items():
    reference[agent] = engine.generate(agent, prompt, max_tokens=8).token_ids

BASE_USED = 0  # the saved context's blocks, held for the whole run

def whole():
    gc.collect()
    pool.check_invariants()
    u = pool.usage()
    return u.used_blocks == BASE_USED and u.reserved_blocks == 0

V, I = True, False
PROMPTS = [("hello", V), ([5, 6], V), (np.array([5, 6]), V), (mx.array([5, 6]), V), ([np.int64(5), 7], V),
           ([2**31], I), ([2**31 - 1], I), ([2**40], I), ([5000, 6000], I), ([2**64], I), ([-1], I),
           ([True, False], I), (b"abc", I), ([], I), ("", I), ([1.0], I), (np.array([1.5]), I), ([[1]], I),
           (None, I), ([VOCAB], I), ([VOCAB - 1], V)]
PARAMS = {
    "temperature": [(0.0, V), (0.7, V), (float("nan"), I), (float("inf"), I), (-1, I), ("hot", I), (True, I), (None, I)],
    "top_p": [(0.0, V), (0.9, V), (1.0, V), (1.5, I), (-0.1, I), (float("nan"), I)],
    "top_k": [(0, V), (5, V), (VOCAB, V), (1.5, I), (5000, I), (-1, I), (True, I)],
    "min_p": [(0.0, V), (0.05, V), (2.0, I), (float("nan"), I)],
    "repetition_penalty": [(None, V), (1.1, V), ("x", I), (-1.0, I), (0.0, I), (float("nan"), I)],
    "max_tokens": [(3, V), (1, V), (True, I), (0, I), (-3, I), (2.0, I), ("3", I)],
}

def pick(rng, options):
    good = [o for o in options if o[1]]
    return rng.choice(good) if rng.random() < 0.9 else rng.choice(options)

def trial_submit(rng):
    prompt, valid = pick(rng, PROMPTS)
    if rng.random() < 0.2:  # random ids, some past the vocabulary
        ids = [rng.randrange(-2, VOCAB + 50) for _ in range(rng.randrange(1, 12))]
        prompt, valid = ids, all(0 <= t < VOCAB for t in ids)
    kwargs = {}
    for name, options in PARAMS.items():
        value, ok = pick(rng, options)
        kwargs[name] = value
        valid = valid and ok
    try:
        c = engine.generate("x", prompt, **kwargs)
    except SemanticError:
        return "valid input refused" if valid else "typed error"
    except Exception as exc:
        return "untyped error: " + type(exc).__name__
    ok_tokens = all(0 <= t < VOCAB for t in c.token_ids)
    c.blocks.release()
    return "ok" if valid and ok_tokens else "wrong data accepted"

def inject(stage, rng, patches):
    ids = tok.encode("once upon a time there was a tiny village " * 4)
    poison = 1999
    if stage == "admission":
        real = engine._generator.insert
        def insert(prompt_tokens, *a, **k):
            if poison in prompt_tokens: raise RuntimeError("injected")
            return real(prompt_tokens, *a, **k)
        patches.append((engine._generator, "insert", real)); engine._generator.insert = insert
        return ids + [poison], {}
    if stage in ("prefill", "decode", "company"):
        cls = type(model); real = cls.__call__
        wide = stage != "decode"
        def forward(self, x, *a, **k):
            arr = np.array(x)
            fires = arr.shape[0] > 1 if stage == "company" else (arr.shape[1] > 1) == wide
            if fires and (arr == poison).any(): raise RuntimeError("injected")
            return real(self, x, *a, **k)
        patches.append((cls, "__call__", real)); cls.__call__ = forward
        return (ids[:5] + [poison] + ids[5:] if wide else ids + [poison]), {}
    if stage == "sampler":
        real = adapter.sampler_for
        def sampler_for(sampling, vocab):
            s = real(sampling, vocab)
            if sampling.top_k != 7: return s
            calls = []
            def failing(lp):
                calls.append(1)
                if len(calls) == 2: raise RuntimeError("injected")
                return s(lp)
            return failing
        patches.append((adapter, "sampler_for", real)); adapter.sampler_for = sampler_for
        return ids, dict(temperature=0.5, top_k=7)
    real = batch_engine.cache_to_blocks
    def store(p, agent, *a, **k):
        if agent == "bad": raise RuntimeError("injected")
        return real(p, agent, *a, **k)
    patches.append((batch_engine, "cache_to_blocks", real)); batch_engine.cache_to_blocks = store
    return ids, {}

def trial_fault(rng):
    stage = rng.choice(["admission", "prefill", "decode", "sampler", "store", "company"])
    patches = []
    try:
        prompt, kwargs = inject(stage, rng, patches)
        agents = list(GOOD); rng.shuffle(agents)
        order = agents[:rng.randrange(0, 4)] + ["bad"] + agents
        order = list(dict.fromkeys(order))
        uids = {}
        for agent in order:
            if agent == "bad": uids[engine.submit("bad", prompt, max_tokens=8, **kwargs)] = "bad"
            else: uids[engine.submit(agent, GOOD[agent], max_tokens=8)] = agent
        done = {}
        while engine.pending:
            for c in engine.step(): done[uids[c.uid]] = c
    except SemanticError:
        return "untyped error: step raised (isolation broken)"
    except Exception as exc:
        return "untyped error: " + type(exc).__name__
    finally:
        for obj, name, real in reversed(patches): setattr(obj, name, real)
    bad = done.pop("bad")
    taken_down = [a for a in done if done[a].error is not None]
    survivors_right = all(done[a].token_ids == reference[a] for a in done if a not in taken_down) and len(done) == 3
    for c in [bad, *done.values()]:
        if c.error is None: c.blocks.release()  # a failed request's blocks went back to the pool
    if stage == "company":  # apart from the others, it runs alone in the end
        if not survivors_right or taken_down:
            return "wrong data accepted"
        return "ok" if bad.error is None else "valid input refused"
    if bad.error is None or taken_down: return "wrong data accepted"
    return "typed error" if survivors_right else "wrong data accepted"

pool2 = BlockPool(spec, 64)  # the misuse trials' own pool
BAD_NUMS = [-3, -1, 0, 1, 2, 1.5, float("nan"), "3", None, True, False, np.int64(-2), 2**70, [1]]
held = []

def trial_pool(rng):
    method = rng.choice(["allocate", "reserve", "retain", "release_blocks", "refcount", "gather", "build", "share"])
    n = rng.choice(BAD_NUMS)
    agent = rng.choice(["a", "", None, 5, "b"])
    ids = rng.choice([[0], [1, 2], [-1], [64], [True], "01", None, 3, [2**40], [1.5]])
    before = pool2.usage()
    try:
        if method == "allocate": held.append((pool2.allocate(n, agent), agent))
        elif method == "reserve": pool2.reserve(n, agent).cancel()
        elif method == "retain": pool2.retain(ids, agent); held.append((list(ids), agent))
        elif method == "release_blocks": pool2.release_blocks(ids, agent)
        elif method == "refcount": pool2.refcount(n)
        elif method == "gather": pool2.gather([ids])
        elif method == "build":
            with pool2.build_handle(agent) as b:
                got = b.allocate(n)
                b.finish([1], [got + ([] if rng.random() < .5 else [0])] + [[]] * (spec.n_layers - 1)).release()
        else:
            with pool2.build_handle("s") as b:
                got = b.allocate(1)
                h = b.finish([1], [got] + [[]] * (spec.n_layers - 1))
            try: h.share(agent).release()
            finally: h.release()
        result = "ok"
    except SemanticError:
        result = "typed error"
        if pool2.usage() != before: result = "blocks lost"
    except Exception as exc:
        result = "untyped error: " + type(exc).__name__
    pool2.check_invariants()
    return result

def release_held():
    while held:
        ids, agent = held.pop()
        pool2.release_blocks(ids, agent)

store_dir = pathlib.Path(tempfile.mkdtemp())
store = AgentCacheStore.for_engine(store_dir / "s", engine)
base = engine.generate("f", "some context to save " * 20, max_tokens=4).blocks
store.save(base)
BASE_USED = base.num_blocks
good_file = (store_dir / "s" / "f.safetensors").read_bytes()
header_end = 8 + struct.unpack("<Q", good_file[:8])[0]

def trial_file(rng):
    path = store_dir / "s" / "f.safetensors"
    kind = rng.choice(["header", "padding", "tensor", "truncate", "lock-link", "directory", "slash-id"])
    lock = store_dir / "s" / ".f.lock"
    if kind == "slash-id":
        agent = rng.choice(["team/alice", "https://x.org/a?b=1", "../up", "a\\b", "."])
        h = base.share(agent); store.save(h); h.release()
        with store.load(agent) as back:
            ok = back.token_ids == base.token_ids and back.agent_id == agent
        store.delete(agent)
        return "ok" if ok and list((store_dir).iterdir()) == [store_dir / "s"] else "wrong data accepted"
    data = bytearray(good_file)
    if kind == "header":
        for _ in range(rng.randrange(1, 4)):
            i = rng.randrange(0, header_end); data[i] = (data[i] + rng.randrange(1, 256)) % 256
    elif kind == "padding":
        data[header_end - 1] = ord(rng.choice("\t\n\r x"))
    elif kind == "tensor":
        i = rng.randrange(header_end, len(data)); data[i] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        data = data[: rng.randrange(0, len(data))]
    if kind == "lock-link":
        outside = store_dir / "outside"
        lock.unlink(missing_ok=True); lock.symlink_to(outside)
        try:
            h = base.share(); store.save(h); h.release(); return "wrong data accepted"
        except SemanticError:
            return "typed error" if not outside.exists() else "wrong data accepted"
        finally:
            lock.unlink(missing_ok=True)
    if kind == "directory":
        path.unlink(); path.mkdir()
    else:
        path.write_bytes(bytes(data))
    changed = kind == "directory" or bytes(data) != good_file
    try:
        with store.load("f") as back:
            same = back.token_ids == base.token_ids
        result = "ok" if same and not changed else "wrong data accepted"
    except SemanticError:
        result = "typed error" if changed else "valid input refused"
    except Exception as exc:
        result = "untyped error: " + type(exc).__name__
    if kind == "directory": path.rmdir()
    path.write_bytes(good_file)
    return result

TRIALS = {"submit": trial_submit, "fault": trial_fault, "pool": trial_pool, "file": trial_file}
print(json.dumps({"ready": True}), flush=True)
for line in sys.stdin:
    task = json.loads(line)
    rng = random.Random(task["seed"])
    outcome = TRIALS[task["kind"]](rng)
    if task["kind"] == "pool" and rng.random() < 0.3: release_held()
    lost = False
    if task["kind"] != "pool":
        lost = not whole()
    print(json.dumps({"outcome": outcome, "lost": lost}), flush=True)
"""


WEIGHTS = {"submit": 0.4, "fault": 0.15, "pool": 0.3, "file": 0.15}
"""How often each kind of trial (the child's ``TRIALS``) is drawn."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a trial may take before it is a hang")
    parser.add_argument("--kinds", default=",".join(WEIGHTS), help="the kinds of trial to draw from")
    args = parser.parse_args()

    kinds = args.kinds.split(",")
    if set(kinds) - set(WEIGHTS):
        parser.error(f"--kinds takes some of {', '.join(WEIGHTS)}")
    rng = random.Random(args.seed)
    tasks = [{"kind": rng.choices(kinds, [WEIGHTS[k] for k in kinds])[0], "seed": rng.randrange(2**32)}
             for _ in range(args.trials)]
    table = {k: collections.Counter() for k in kinds}
    child = None
    started = time.perf_counter()
    for task in tasks:
        if child is None:
            child = subprocess.Popen([sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
            assert json.loads(child.stdout.readline())["ready"]
        child.stdin.write(json.dumps(task) + "\n")
        child.stdin.flush()
        result = _read_line(child, args.timeout)
        row = table[task["kind"]]
        row["trials"] += 1
        if result is None:
            row["hang" if child.poll() is None else "crash"] += 1
            child.kill()
            child.wait()
            child = None
            continue
        outcome = json.loads(result)
        row[outcome["outcome"]] += 1
        row["blocks lost"] += outcome["lost"]
    if child is not None:
        child.stdin.close()
        child.wait()
    elapsed = time.perf_counter() - started
    columns = ["trials", "typed error", "ok", "wrong data accepted", "valid input refused", "crash", "hang",
               "blocks lost"]
    untyped = sorted({k for row in table.values() for k in row if k.startswith("untyped")})
    print(f"{args.trials} trials, seed {args.seed}, {elapsed:.0f} s")
    print("| kind | " + " | ".join(columns + untyped) + " |")
    print("|" + "---|" * (len(columns) + len(untyped) + 1))
    for kind in kinds:
        print(f"| {kind} | " + " | ".join(str(table[kind][c]) for c in columns + untyped) + " |")
    total = sum((table[k] for k in kinds), collections.Counter())
    print("| all | " + " | ".join(str(total[c]) for c in columns + untyped) + " |")


def _read_line(child, timeout: float):
    """The child's next line, or None if it died or took longer than ``timeout`` seconds."""
    selector = selectors.DefaultSelector()
    selector.register(child.stdout, selectors.EVENT_READ)
    ready = selector.select(timeout)
    selector.close()
    if not ready:
        return None
    line = child.stdout.readline()
    return line or None


if __name__ == "__main__":
    main()
