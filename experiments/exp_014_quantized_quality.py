"""EXP-014: what quantized blocks (q8, q4) cost in quality, against blocks in the model's dtype.

    python -m experiments.exp_014_quantized_quality --model tiny-llama          # a local preset (random weights)
    python -m experiments.exp_014_quantized_quality --model smollm2-135m --turns 8 --tokens-per-turn 64
    python -m experiments.exp_014_quantized_quality --model /path/to/mlx-lm/model --output results.json

``--model`` is a local preset (``semantic.testing.local_models``: random weights, so the numbers say how
much the blocks change the computation, not how a trained model degrades), a name ``semantic.models.fetch``
knows, or any mlx-lm model folder.

A conversation of ``--turns`` user turns is held three times, each turn resumed from the pool's blocks
(``blocks_to_cache``) and stored back at its end (``cache_to_blocks``), exactly as the engine does:

1. dense blocks, greedy: the reference trajectory (the user turns and the tokens generated for them);
2. per format (dense again, q8, q4): the same trajectory teacher-forced, turn by turn, through that format's
   blocks. At every generated position: does the format's greedy token equal the dense one (agreement),
   and KL(dense || format) of the next-token distributions. Dense-through-dense agrees 100 % with KL 0,
   which checks the harness itself;
3. a fixed text read in ``--ppl-chunk``-token pieces, each piece resumed from blocks: perplexity per format.

Group size: 64 where the head dimension allows it, else 32 (the tiny presets' head dim is 32).
Writes a JSON with every number and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import semantic  # noqa: F401  (before MLX: its CPU matmuls bind to OpenBLAS, see semantic.cpu_blas)
import mlx.core as mx
import numpy as np

from semantic.adapters import mlx_lm_adapter as adapter
from semantic.application.block_cache import blocks_to_cache, cache_to_blocks
from semantic.domain.block_format import BlockFormat, fitted
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec

from experiments.records import provenance, write_record

TURNS = (
    "Tell me about the river that runs past the old town, and the people who live along it.",
    "What did the bakers make in the mornings, and who bought their bread?",
    "Describe the storm that came over the mountains in the autumn of that year.",
    "How did the fishermen prepare their boats before the winter?",
    "Who kept the records of the town, and what did they write down?",
    "What songs did the children sing when the first snow fell?",
    "Explain how the bridge over the river was built and repaired.",
    "What happened at the market on the last day of the year?",
    "Which stories did the oldest people tell about the sea?",
    "How did the town change when the railway finally arrived?",
    "Summarise everything you have told me so far in a few sentences.",
    "What do you think the town will look like in a hundred years?",
)

MAX_TURNS = 40

CONFIDENT_MARGIN = 0.5
"""Nats between the dense top-1 and top-2 log-probabilities above which a position counts as confident:
a random-weight model is almost never confident, so its plain agreement is dominated by ties."""

PPL_TEXT = (
    "The old river ran past a quiet town where people made bread and told long stories about the sea. "
    "In the mornings the bakers lit their ovens before dawn, and by the time the fishermen came back from "
    "the harbour the smell of fresh loaves filled the narrow streets. The town kept its records in a tall "
    "stone building near the bridge, where a clerk wrote down every birth, every marriage and every storm. "
    "When the railway arrived, the market grew, strangers came with new songs, and the children learned "
    "the names of cities they had never seen. Yet every autumn, when the wind came down from the mountains, "
    "the oldest people still gathered by the fire and told the same stories their grandparents had told. "
)


def load_model(name: str):
    """A local preset, a name ``semantic.models.fetch`` knows, or an mlx-lm model folder."""
    from semantic.testing.local_models import PRESETS, load_local_model

    if name in PRESETS:
        return load_local_model(name), f"local preset {name} (random weights)"
    import mlx_lm

    if not Path(name).exists():
        try:
            from semantic.models import fetch
        except ImportError:
            raise SystemExit(f"{name!r} is neither a local preset ({', '.join(sorted(PRESETS))}) nor a folder")
        return mlx_lm.load(str(fetch(name))), f"{name} (pretrained, via semantic.models.fetch)"
    return mlx_lm.load(name), f"{name} (mlx-lm folder)"


class Conversation:
    """One agent's context in one pool, resumed from and stored into blocks at every step."""

    def __init__(self, model, pool: BlockPool):
        self.model, self.pool, self.handle = model, pool, None

    @property
    def tokens(self) -> List[int]:
        return list(self.handle.token_ids) if self.handle is not None else []

    def resume(self):
        if self.handle is None:
            return adapter.make_cache(self.model)
        return blocks_to_cache(self.pool, self.handle)

    def store(self, cache, tokens: Sequence[int]) -> None:
        source = self.handle
        self.handle = cache_to_blocks(self.pool, "agent", cache, tokens, source=source,
                                      reused_tokens=len(source.token_ids) if source is not None else 0)
        if source is not None:
            source.release()

    def forward(self, cache, tokens: Sequence[int], chunk: int = 512) -> mx.array:
        """Log-probabilities ``[len(tokens), vocab]`` (float32) after each of ``tokens``."""
        out = []
        for i in range(0, len(tokens), chunk):
            logits = self.model(mx.array([list(tokens[i:i + chunk])]), cache=cache)[0].astype(mx.float32)
            out.append(logits - mx.logsumexp(logits, axis=-1, keepdims=True))
            mx.eval(out[-1])
        return mx.concatenate(out, axis=0)


def turn_tokens(tokenizer, context: Sequence[int], message: str) -> List[int]:
    """A user turn as tokens: the chat template where the model has one (``semantic.models.chat``),
    else a plain ``User:`` / ``Assistant:`` transcript."""
    try:
        from semantic.models import chat
    except ImportError:
        return tokenizer.encode(f"\nUser: {message}\nAssistant:", add_special_tokens=not context)
    return chat.next_turn(tokenizer, context, message) if context else chat.first_turn(tokenizer, message)


def reference_trajectory(model, tokenizer, spec: ModelCacheSpec, min_turns: int, tokens_per_turn: int,
                         min_generated: int, pool_blocks: int):
    """Per turn: (prompt tokens, greedily generated tokens), dense blocks, resumed at every turn. A reply
    ends at an end-of-sequence token or after ``tokens_per_turn``; turns go on until there are at least
    ``min_turns`` and ``min_generated`` generated tokens (at most ``MAX_TURNS``)."""
    conversation = Conversation(model, BlockPool(spec, pool_blocks))
    stop = set(getattr(tokenizer, "eos_token_ids", ()) or ()) | {tokenizer.eos_token_id}
    trajectory, generated_count = [], 0
    while len(trajectory) < MAX_TURNS and (len(trajectory) < min_turns or generated_count < min_generated):
        prompt = turn_tokens(tokenizer, conversation.tokens, TURNS[len(trajectory) % len(TURNS)])
        cache = conversation.resume()
        logprobs = conversation.forward(cache, prompt)
        generated = []
        token = int(mx.argmax(logprobs[-1]))
        while len(generated) < tokens_per_turn:
            generated.append(token)
            if token in stop:
                break
            token = int(mx.argmax(conversation.forward(cache, [token])[-1]))
        conversation.store(cache, conversation.tokens + prompt + generated)
        trajectory.append((prompt, generated))
        generated_count += len(generated)
        print(f"reference turn {len(trajectory)}: {len(generated)} tokens ({generated_count} in all)", file=sys.stderr,
              flush=True)
    return trajectory


def teacher_forced(model, spec: ModelCacheSpec, trajectory, pool_blocks: int) -> List[mx.array]:
    """Per turn, the log-probabilities at the positions that predict each generated token."""
    conversation = Conversation(model, BlockPool(spec, pool_blocks))
    per_turn = []
    for prompt, generated in trajectory:
        cache = conversation.resume()
        fed = prompt + generated
        logprobs = conversation.forward(cache, fed)
        # position len(prompt) - 1 predicts generated[0]; the last one predicts the next turn's first token
        per_turn.append(logprobs[len(prompt) - 1 : len(fed) - 1])
        conversation.store(cache, conversation.tokens + fed)
    return per_turn


def perplexity(model, spec: ModelCacheSpec, tokens: Sequence[int], chunk: int, pool_blocks: int) -> float:
    """exp(mean NLL) of ``tokens[1:]``, read ``chunk`` tokens at a time, each chunk resumed from blocks."""
    conversation = Conversation(model, BlockPool(spec, pool_blocks))
    nll, count, previous = 0.0, 0, None
    for i in range(0, len(tokens), chunk):
        piece = list(tokens[i:i + chunk])
        cache = conversation.resume()
        logprobs = conversation.forward(cache, piece)
        targets = mx.array(piece[1:])
        if previous is not None:  # the previous chunk's last position predicts this chunk's first token
            nll -= float(previous[piece[0]])
            count += 1
        if len(piece) > 1:
            nll -= float(mx.take_along_axis(logprobs[:-1], targets[:, None], axis=-1).sum())
            count += len(piece) - 1
        previous = logprobs[-1]
        conversation.store(cache, conversation.tokens + piece)
    return math.exp(nll / count)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama")
    parser.add_argument("--formats", default="q8,q4", help="comma-separated block formats to compare with dense")
    parser.add_argument("--turns", type=int, default=8, help="at least this many user turns")
    parser.add_argument("--tokens-per-turn", type=int, default=64, help="longest reply")
    parser.add_argument("--min-generated", type=int, default=512, help="turns go on until this many replies' tokens")
    parser.add_argument("--ppl-tokens", type=int, default=2048)
    parser.add_argument("--ppl-chunk", type=int, default=300)
    parser.add_argument("--output", type=Path, default=None, help="JSON file for every number (default: print only)")
    args = parser.parse_args(argv)

    started = time.time()
    (model, tokenizer), model_description = load_model(args.model)
    dense = ModelCacheSpec.from_model(model)
    formats = [fitted(f, dense.k_head_dim) for f in args.formats.split(",")]
    text_tokens = tokenizer.encode(PPL_TEXT * (1 + args.ppl_tokens // 100))[: args.ppl_tokens]
    longest = max(args.ppl_tokens, MAX_TURNS * (args.tokens_per_turn + 64))
    pool_blocks = 2 * dense.blocks_per_agent(longest) + 2 * dense.n_layers

    trajectory = reference_trajectory(model, tokenizer, dense, args.turns, args.tokens_per_turn, args.min_generated,
                                      pool_blocks)
    reference = teacher_forced(model, dense, trajectory, pool_blocks)
    reference_tokens = mx.concatenate([mx.argmax(r, axis=-1) for r in reference])
    generated = np.concatenate([g for _, g in trajectory])
    results: Dict[str, dict] = {}
    for fmt in [BlockFormat()] + formats:
        spec = dense.with_format(fmt)
        forced = teacher_forced(model, spec, trajectory, pool_blocks)
        logprobs, ref = mx.concatenate(forced), mx.concatenate(reference)
        kl = (mx.exp(ref) * (ref - logprobs)).sum(axis=-1)
        agree = mx.argmax(logprobs, axis=-1) == reference_tokens
        top2 = mx.sort(ref, axis=-1)[:, -2:]
        confident = (top2[:, 1] - top2[:, 0]) > CONFIDENT_MARGIN
        per_turn_agreement = [float(mx.mean(mx.argmax(f, -1) == mx.argmax(r, -1))) for f, r in zip(forced, reference)]
        results[fmt.name] = {
            "bytes_per_block_vs_dense": spec.bytes_per_block_per_layer / dense.bytes_per_block_per_layer,
            "positions": int(agree.size),
            "greedy_agreement": float(mx.mean(agree)),
            "greedy_agreement_per_turn": per_turn_agreement,
            "confident_positions": int(confident.sum()),
            "confident_agreement": float((agree * confident).sum() / mx.maximum(confident.sum(), 1)),
            "mean_kl": float(mx.mean(kl)),
            "max_kl": float(mx.max(kl)),
            "perplexity": perplexity(model, spec, text_tokens, args.ppl_chunk, pool_blocks),
        }
        print(f"{fmt.name}: {results[fmt.name]}", file=sys.stderr, flush=True)

    record = {
        "experiment": "EXP-014 quantized block quality",
        "model": args.model, "model_description": model_description, "spec": dense.describe(),
        "turns": len(trajectory), "tokens_per_turn": args.tokens_per_turn, "generated_tokens": int(generated.size),
        "reference_distinct_tokens": int(len(set(generated.tolist()))),
        "ppl_tokens": len(text_tokens), "ppl_chunk": args.ppl_chunk,
        **provenance("experiments.exp_014_quantized_quality", argv),
        "seconds": round(time.time() - started, 1), "results": results,
    }
    write_record(args.output, record)
    print(markdown_rows(record))
    return 0


def markdown_rows(record: dict) -> str:
    lines = [f"{record['model_description']}: {record['turns']} turns, replies of up to {record['tokens_per_turn']} "
             f"tokens ({record['generated_tokens']} generated positions), perplexity over {record['ppl_tokens']} tokens in "
             f"{record['ppl_chunk']}-token resumed chunks", "",
             "| format | bytes vs dense | greedy agreement | agreement where dense is confident (positions) "
             "| mean KL (nats) | max KL | perplexity |",
             "|---|---|---|---|---|---|---|"]
    for name, r in record["results"].items():
        confident = f"{100 * r['confident_agreement']:.2f} %" if r["confident_positions"] else "n/a"
        lines.append(f"| {name} | {r['bytes_per_block_vs_dense']:.3f} | {100 * r['greedy_agreement']:.2f} % | "
                     f"{confident} ({r['confident_positions']}) | "
                     f"{r['mean_kl']:.2e} | {r['max_kl']:.2e} | {r['perplexity']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
