"""cProfile of a conversation's turns, engine and mlx-lm's hot path alternated
(``cases.conversation_against_hot_path``), smollm2-135m local preset in bf16, from a stored context.

python profile_conversation.py OUT TOKENS TURNS
"""

import cProfile
import pstats
import sys

from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.benchmarking import cases
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing.local_models import load_local_model


def main(out_dir: str, n_tokens: int, turns: int) -> None:
    model, tokenizer = load_local_model("smollm2-135m", dtype="bfloat16")
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, total_blocks=4 * spec.blocks_per_agent(n_tokens + 64 * (turns + 2)))
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    ctx = cases.cache_to_blocks(pool, "stored", cases.random_caches(spec, n_tokens), cases.prompt_tokens(engine, n_tokens))
    print("unprofiled", cases.conversation_against_hot_path(engine, ctx, turns), flush=True)
    profile = cProfile.Profile()
    profile.enable()
    result = cases.conversation_against_hot_path(engine, ctx, turns)
    profile.disable()
    print("profiled", result, flush=True)
    with open(f"{out_dir}/conversation_profile_{n_tokens}.txt", "w") as f:
        stats = pstats.Stats(profile, stream=f)
        stats.sort_stats("cumulative").print_stats(45)
        stats.sort_stats("tottime").print_stats("semantic", 30)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
