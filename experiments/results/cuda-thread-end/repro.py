"""A thread that ran an engine ends (its streams cleared) while the main thread's engine prefills.

Run: PYTHONPATH=$PWD python experiments/results/cuda-thread-end/repro.py MODE [--iters N]
MODE: ``clear`` (the worker's last call is ``mx.clear_streams()``), ``end_thread`` (it is
``semantic.adapters.mlx_threads.end_thread()``, which waits for no engine's device work to run), ``alive``
(the worker clears its streams only once the main thread stopped generating). Exit code 134 is MLX's abort.
"""
import argparse
import threading
import time

import semantic  # noqa: F401
import mlx.core as mx

from semantic.adapters import mlx_threads
from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing.local_models import load_local_model

STORY = "the quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire " * 4


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["clear", "end_thread", "alive"])
    p.add_argument("--iters", type=int, default=30)
    args = p.parse_args()
    model, tokenizer = load_local_model("tiny-llama", dtype="float32")
    pool = BlockPool(ModelCacheSpec.from_model(model), 4096)
    main_engine = BlockPoolBatchEngine(model, tokenizer, pool)
    main_engine.generate("warm", STORY, max_tokens=2).blocks.release()
    t0 = time.time()
    main_generates = 0
    for _ in range(args.iters):
        worker_generated, main_done = threading.Event(), threading.Event()

        def worker():
            engine = BlockPoolBatchEngine(model, tokenizer, pool)
            engine.generate("w", STORY, max_tokens=4).blocks.release()
            worker_generated.set()
            if args.mode == "alive":
                main_done.wait()
            if args.mode == "end_thread":
                mlx_threads.end_thread()
            else:
                mx.clear_streams()

        thread = threading.Thread(target=worker)
        thread.start()
        # clear / end_thread: generate until the worker has ended; alive: until it has generated, then stop
        # before it clears its streams
        while thread.is_alive() if args.mode != "alive" else not worker_generated.is_set():
            main_engine.generate("m", STORY, max_tokens=2).blocks.release()
            main_generates += 1
        main_done.set()
        thread.join()
    print(f"{args.mode}: {args.iters} worker threads ended, {main_generates} main generates, "
          f"{time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
