"""Engine A (its own thread) runs one request: it resumes a source only the request holds, with a long
prompt, so its store at the end writes many blocks. Its completion's handle is handed (in transit) to B's
thread, which resumes it on engine B. Meanwhile B's thread calls B.generate() for a context that fits the
pool once A's request has ended (its source given back), even with A's completion handle still held.
B's generate() must succeed every time: until then A's request is in flight.

Run: PYTHONPATH=$PWD python experiments/results/engine-thread-race/repro.py [--iters N] [--repeat R]
"""
import argparse, gc, queue, sys, threading, time, traceback

import semantic  # noqa: F401
import mlx.core as mx

from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.domain.errors import PoolExhaustedError
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing.local_models import load_local_model

STORY = "the quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire " * 2


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--iters", type=int, default=100)
    p.add_argument("--repeat", type=int, default=12, help="A's prompt: STORY x repeat (~165 tokens each)")
    p.add_argument("--max-tokens", type=int, default=4)
    p.add_argument("--switch", type=float, default=0.0)
    args = p.parse_args()
    if args.switch:
        sys.setswitchinterval(args.switch)
    model, tok = load_local_model("tiny-llama", dtype="float32")
    spec = ModelCacheSpec.from_model(model)
    # sizes: measured once
    probe_pool = BlockPool(spec, 4096)
    probe = BlockPoolBatchEngine(model, tok, probe_pool)
    src = probe.generate("a", STORY, max_tokens=1).blocks
    a_prompt = STORY * args.repeat
    uid = probe.submit("a", a_prompt, cache=src, max_tokens=args.max_tokens)
    bound = probe._by_uid[uid].new_blocks_bound
    probe.cancel(uid)
    handle_blocks = bound  # the completion's new blocks (at most its reservation)
    src_blocks = src.num_blocks
    src.release()
    b_prompt = STORY * 8  # B: > 256 tokens: 2 blocks a layer
    uid = probe.submit("b", b_prompt, max_tokens=2)
    b_needs = probe._by_uid[uid].new_blocks_bound
    probe.cancel(uid)
    # Before A's request ends: its source + reservation held. After: its handle only (<= its reservation).
    probe.close()
    pool = BlockPool(spec, b_needs + handle_blocks)
    a = BlockPoolBatchEngine(model, tok, pool)
    b = BlockPoolBatchEngine(model, tok, pool, wait_for_blocks_s=30)
    print(f"A: source {src_blocks} blocks, reservation {bound}; B needs {b_needs}; pool {pool.total_blocks}", flush=True)
    failures = 0
    t0 = time.time()
    for it in range(args.iters):
        running, handoff = threading.Event(), queue.Queue()
        errors = []

        def a_thread():
            try:
                source = a.generate("a", STORY, max_tokens=1).blocks
                a.submit("a", a_prompt, cache=source, max_tokens=args.max_tokens)
                source.release()
                del source
                running.set()
                for completion in a.step():
                    handoff.put(completion)  # in transit to B's thread
                    del completion
            except BaseException as exc:
                errors.append(f"A: {exc!r}\n{traceback.format_exc()}")
                running.set()
                handoff.put(None)
            finally:
                mx.clear_streams()

        worker = threading.Thread(target=a_thread)
        worker.start()
        assert running.wait(60)
        try:
            try:
                b.generate("b", b_prompt, max_tokens=2).blocks.release()
            except PoolExhaustedError as exc:
                errors.append(f"B gave up: {exc}")
            c = handoff.get(timeout=60)
            if c is not None:
                r = b.generate("a", " again", cache=c.blocks, max_tokens=2)
                c.blocks.release()
                r.blocks.release()
                del c, r
        except BaseException as exc:
            errors.append(f"B: {exc!r}\n{traceback.format_exc()}")
        worker.join(60)
        if worker.is_alive():
            print(f"iter {it}: HANG", *errors, sep="\n  ", flush=True)
            sys.exit(3)
        gc.collect()
        try:
            pool.check_invariants()
            u = pool.usage()
            if u.used_blocks or u.reserved_blocks:
                errors.append(f"LEAK {u}")
        except AssertionError as exc:
            errors.append(f"invariants {exc}")
        if errors:
            failures += 1
            if failures <= 3:
                print(f"iter {it}: FAILED", *errors, sep="\n  ", flush=True)
    print(f"{args.iters - failures}/{args.iters} iterations passed in {time.time() - t0:.1f}s", flush=True)
    mx.clear_streams()
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
