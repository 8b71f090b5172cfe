"""Two agents take turns on one local model; each turn resumes the agent's context from pool blocks.

    python -m semantic.demo [--preset smollm2-135m] [--context-tokens 320] [--turns 2]

Prints, per turn, the time to first token when the agent's context is rebuilt
from blocks (warm) next to re-reading the same context from scratch (cold).
"""

from __future__ import annotations

import argparse
import gc

import numpy as np

from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing.local_models import load_local_model

TOPICS = {
    "alice": "the history of maps, the stars that guided sailors, and the ports they found",
    "bob": "the care of a vegetable garden, the seasons of planting and the tools of the trade",
}


def context_prompt(topic: str, n_tokens: int, tokenizer) -> list:
    words = np.random.default_rng(len(topic)).permutation(topic.split() * 400)
    tokens = tokenizer.encode(f"You are an assistant who knows {topic}. Notes: " + " ".join(words))
    return tokens[:n_tokens]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smollm2-135m", help="local model preset (semantic.testing.local_models)")
    parser.add_argument("--context-tokens", type=int, default=320)
    parser.add_argument("--turns", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args(argv)

    model, tokenizer = load_local_model(args.preset)
    spec = ModelCacheSpec.from_model(model)
    per_agent = spec.blocks_per_agent(args.context_tokens + args.turns * (args.max_tokens + 32))
    pool = BlockPool(spec, total_blocks=4 * per_agent)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    print(f"model: {args.preset} ({spec.describe()})")
    print(f"pool: {pool.total_blocks} blocks, {pool.nbytes / 2**20:.0f} MiB\n")

    engine.generate("warmup", "hello", max_tokens=2).blocks.release()  # compile kernels once
    blocks = {}
    print(f"{'turn':>4}  {'agent':<6} {'context':>7}  {'TTFT warm':>10}  {'TTFT cold':>10}  reply")
    for turn in range(args.turns):
        for agent, topic in TOPICS.items():
            if turn == 0:
                first = engine.generate(agent, context_prompt(topic, args.context_tokens, tokenizer),
                                        max_tokens=args.max_tokens)
                blocks[agent] = first.blocks
                print(f"{turn:>4}  {agent:<6} {first.blocks.num_tokens:>7}  {'-':>10}  "
                      f"{first.time_to_first_token * 1e3:>8.1f}ms  {first.text[:40]!r}")
                continue
            message = f" Tell me more, turn {turn}."
            warm = engine.generate(agent, message, cache=blocks[agent], max_tokens=args.max_tokens)
            follow_up = tokenizer.encode(message, add_special_tokens=False)
            cold = engine.generate(agent + "-cold", list(blocks[agent].token_ids) + follow_up,
                                   max_tokens=args.max_tokens)
            same = "same tokens" if warm.token_ids == cold.token_ids else "tokens differ (bf16)"
            print(f"{turn:>4}  {agent:<6} {warm.blocks.num_tokens:>7}  {warm.time_to_first_token * 1e3:>8.1f}ms  "
                  f"{cold.time_to_first_token * 1e3:>8.1f}ms  {warm.text[:40]!r} ({same})")
            cold.blocks.release()
            blocks[agent].release()
            blocks[agent] = warm.blocks
    usage = pool.usage()
    print(f"\npool in use: {usage.used_blocks} blocks ({usage.used_bytes / 2**20:.1f} MiB) for "
          f"{len(blocks)} agents: {', '.join(f'{a}={n} blocks' for a, (n, _) in usage.per_agent.items())}")
    for handle in blocks.values():
        handle.release()
    del warm, cold, first
    gc.collect()
    print(f"after release: {pool.usage().used_blocks} blocks in use")


if __name__ == "__main__":
    main()
