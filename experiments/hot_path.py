"""The hot path against its baselines, in one process: ``python -m experiments.hot_path [--out DIR]``.

Per EXP-006 target case (p50 / p95 ms over 100 calls after 10 warm-ups, each ending with ``mx.eval``
and, on a GPU, ``mx.synchronize()``): ``blocks_to_cache``; ``pool.gather`` alone; the experiment plan's
design (one ``mx.concatenate`` of per-block arrays per layer); ``cache_to_blocks`` of the same context
into fresh blocks; and the device's plain copy of the same bytes. Then a warm resume through the engine
against mlx-lm's hot path (``cases.warm_resume_against_hot_path``) on the smollm2-135m local preset
(random weights), the turns of a conversation continued from each context, each engine turn resuming the
blocks the turn before stored (``cases.conversation_against_hot_path``), and a cProfile of warm resumes at
the longest context. Prints tables; ``--out``
also gets the numbers as JSON and the profile as text.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path
from typing import Callable, Dict, List

import mlx.core as mx
import numpy as np

from semantic.application.block_cache import blocks_to_cache
from semantic.benchmarking import cases
from semantic.testing.local_models import PRESETS


def percentiles(fn: Callable[[], object], repeat: int = 100, warmup: int = 10) -> Dict[str, float]:
    samples = cases.time_samples(fn, repeat, warmup=warmup, sync=cases.on_gpu())
    return {"p50_ms": float(np.percentile(samples, 50)) * 1e3, "p95_ms": float(np.percentile(samples, 95)) * 1e3}


def per_layer_concatenate(ctx: cases.Context) -> List[mx.array]:
    """The plan's design: per layer, its blocks' arrays concatenated along the tokens."""
    pool, out = ctx.pool, []
    for ids in ctx.handle.all_block_ids:
        for block in (pool.block_keys, pool.block_values):
            parts = [block(b)[None] for b in ids]
            out.append(mx.concatenate(parts, axis=2) if len(parts) > 1 else parts[0])
    return out


def copy_cases(repeat: int, max_mib: float) -> List[dict]:
    rows = []
    for case in cases.TARGET_CASES:
        if cases.spec_for(case.geometry, case.layers).bytes_per_agent(case.blocks * 256) > max_mib * 2**20:
            continue
        ctx = cases.context(case.geometry, case.blocks, case.layers, case.blocks)
        groups = [[ctx.handle.layer_block_ids(layer) for layer in range(case.layers)]]
        copy = cases.plain_copy(ctx.nbytes)
        row = {"case": case.name, "geometry": case.geometry, "MiB": ctx.nbytes / 2**20, "target_ms": case.target_ms,
               "rebuild": percentiles(lambda: cases.reconstruct(ctx), repeat),
               "gather": percentiles(lambda: mx.eval(ctx.pool.gather(groups[0])), repeat),
               "per_layer_concatenate": percentiles(lambda: mx.eval(per_layer_concatenate(ctx)), repeat),
               "store": percentiles(lambda: cases.extract(ctx), repeat),
               "device_copy": percentiles(copy, repeat)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        cases.context.cache_clear()
        del ctx
        mx.clear_cache()
    return rows


def resume_cases(preset: str, tokens: List[int], repeat: int, conversation_turns: int) -> List[dict]:
    from semantic.application.batch_engine import BlockPoolBatchEngine
    from semantic.domain.services import BlockPool
    from semantic.domain.value_objects import ModelCacheSpec
    from semantic.testing.local_models import load_local_model

    model, tokenizer = load_local_model(preset, dtype="bfloat16")
    spec = ModelCacheSpec.from_model(model)
    longest = max(tokens) + (conversation_turns + 1) * (cases.RESUME_NEW_TOKENS + cases.CONVERSATION_REPLY_TOKENS)
    pool = BlockPool(spec, total_blocks=4 * spec.blocks_per_agent(longest))
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)
    rows = []
    for n in tokens:
        ctx = cases.cache_to_blocks(pool, "stored", cases.random_caches(spec, n), cases.prompt_tokens(engine, n))
        resumed, hot = cases.warm_resume_against_hot_path(engine, ctx, repeat=repeat)
        rebuild = percentiles(lambda: blocks_to_cache(pool, ctx), 20, 3)
        turn, hot_turn, same_tokens = cases.conversation_against_hot_path(engine, ctx, conversation_turns)
        row = {"context_tokens": n, "engine_ms": resumed * 1e3, "hot_path_ms": hot * 1e3,
               "ratio": resumed / hot, "rebuild_p50_ms": rebuild["p50_ms"],
               "conversation_engine_ms": turn * 1e3, "conversation_hot_path_ms": hot_turn * 1e3,
               "conversation_ratio": turn / hot_turn, "conversation_same_tokens": same_tokens}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if n == max(tokens):
            profile = cProfile.Profile()
            profile.enable()
            cases.warm_resume_against_hot_path(engine, ctx, repeat=5, warmup=0)
            profile.disable()
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(30)
            row["profile"] = text.getvalue()
        ctx.release()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m experiments.hot_path", description=__doc__)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--repeat", type=int, default=100)
    parser.add_argument("--resume-tokens", default="256,1024,4096,8192",
                        help="contexts of the warm resume; 256 fills one block per layer (rebuilt with a second"
                        " for the prompt)")
    parser.add_argument("--resume-repeat", type=int, default=10)
    parser.add_argument("--conversation-turns", type=int, default=8,
                        help="turns of the conversation comparison, each resuming the blocks the last stored")
    parser.add_argument("--preset", default="smollm2-135m")
    parser.add_argument("--max-mib", type=float, default=4096, help="leave out copy cases larger than this")
    args = parser.parse_args()
    # Checked before anything runs: the resume cases come after minutes of copy cases.
    for option in ("repeat", "resume_repeat", "conversation_turns"):  # none of a sample has no mean: NaN columns
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} must be at least 1")
    try:
        resume_tokens = [int(tokens) for tokens in args.resume_tokens.split(",")]
    except ValueError:
        parser.error(f"--resume-tokens must be token counts separated by commas, got {args.resume_tokens!r}")
    if min(resume_tokens) < 1:
        parser.error("--resume-tokens must be at least 1")
    if args.preset not in PRESETS:
        parser.error(f"--preset must be one of {', '.join(sorted(PRESETS))}, got {args.preset!r}")
    start = time.time()
    result = {"device": str(mx.default_device()), "copy": copy_cases(args.repeat, args.max_mib),
              "resume": resume_cases(args.preset, resume_tokens, args.resume_repeat, args.conversation_turns)}
    print("\n| case | MiB | rebuild p50/p95 | gather | per-layer concat | store | device copy |")
    print("|---|---|---|---|---|---|---|")
    for r in result["copy"]:
        cells = [f"{r[k]['p50_ms']:.3f} / {r[k]['p95_ms']:.3f}"
                 for k in ("rebuild", "gather", "per_layer_concatenate", "store", "device_copy")]
        print(f"| {r['case']} | {r['MiB']:.1f} | " + " | ".join(cells) + " |")
    print("\n| context | engine ms | mlx-lm hot path ms | ratio | rebuild p50 ms | conversation turn: engine ms | "
          "hot path ms | ratio | same tokens |\n|---|---|---|---|---|---|---|---|---|")
    for r in result["resume"]:
        print(f"| {r['context_tokens']} | {r['engine_ms']:.1f} | {r['hot_path_ms']:.1f} | {r['ratio']:.2f} | "
              f"{r['rebuild_p50_ms']:.3f} | {r['conversation_engine_ms']:.1f} | {r['conversation_hot_path_ms']:.1f} | "
              f"{r['conversation_ratio']:.2f} | {r['conversation_same_tokens']} |")
    print(f"({time.time() - start:.0f} s)")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        profiles = [r.pop("profile") for r in result["resume"] if "profile" in r]
        (args.out / "hot_path.json").write_text(json.dumps(result, indent=1))
        (args.out / "hot_path_profile.txt").write_text("\n".join(profiles))


if __name__ == "__main__":
    main()
