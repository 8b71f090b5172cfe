"""BlockPoolBatchEngine on real local models and mlx-lm's real BatchGenerator."""

import gc
import warnings

import mlx.core as mx
import numpy as np
import pytest

from semantic.adapters import mlx_lm_adapter as adapter
from semantic.application.batch_engine import BlockPoolBatchEngine, PoolPressureWarning
from semantic.domain.errors import (
    IncompatibleCacheError,
    InvalidRequestError,
    PoolExhaustedError,
    ReleasedHandleError,
    RequestFailedError,
    UnknownRequestError,
)
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec

from conftest import make_engine

STORY = "the quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire " * 12


SAME_KERNELS = mx.default_device() == mx.cpu
"""On CPU a resume and a prefill of the whole context run the same kernels, so their tokens are equal bit
for bit. A GPU picks kernels by shape (a prefill of 300 tokens or of 600, a batch of one or of three), so
there generated tokens are checked with :func:`greedy_gap` instead: greedy up to rounding."""
LOGIT_TOLERANCE = 0.2
"""Largest logit difference allowed between kernels. The test models are float32, but MLX's CUDA backend
multiplies float32 matrices in TF32 (10-bit mantissas): gaps up to 0.08 were seen on an H200."""


def greedy_gaps(model, context, generated):
    """How far each token of ``generated`` is from greedy after ``context`` and the tokens before it: the
    best logit minus the chosen token's (0: greedy), all scored in one prefill of the whole sequence."""
    sequence = list(context) + list(generated)
    logits = model(mx.array([sequence[:-1]]), cache=adapter.make_cache(model))[0, len(context) - 1 :]
    logits = logits.astype(mx.float32)
    chosen = mx.take_along_axis(logits, mx.array(generated)[:, None], axis=1)[:, 0]
    return (logits.max(axis=1) - chosen).tolist()


def greedy_gap(model, context, generated):
    """The largest of :func:`greedy_gaps`: within ``LOGIT_TOLERANCE``, ``generated`` is greedy up to rounding."""
    return max(greedy_gaps(model, context, generated))


def run(engine, agent, prompt, **kwargs):
    uid = engine.submit(agent, prompt, **kwargs)
    done = {c.uid: c for c in engine.step()}
    return done[uid]


def cold_continuation(engine, blocks, follow_up_tokens, max_tokens):
    """One request over the whole context + follow-up, with no cache."""
    return run(engine, "cold", list(blocks.token_ids) + follow_up_tokens, max_tokens=max_tokens)


def at_start(pool):
    gc.collect()
    usage = pool.usage()
    pool.check_invariants()
    return usage.used_blocks == 0 and usage.reserved_blocks == 0


@pytest.mark.parametrize("model_name", ["llama32", "gemma32", "gemma512", "qwen3"])
def test_warm_resume_equals_cold(request, model_name):
    engine = make_engine(request.getfixturevalue(model_name))
    first = run(engine, "a", STORY, max_tokens=20)
    assert len(set(first.token_ids)) >= 5, "the test model must not emit a constant token"
    follow_up = engine.tokenizer.encode(" and then the dog", add_special_tokens=False)

    warm = run(engine, "a", " and then the dog", cache=first.blocks, max_tokens=25)
    cold = cold_continuation(engine, first.blocks, follow_up, max_tokens=25)

    assert warm.reused_tokens == first.blocks.num_tokens
    context = list(first.blocks.token_ids) + follow_up
    for completion in (warm, cold):
        assert greedy_gap(engine.model, context, completion.token_ids) <= LOGIT_TOLERANCE
    if SAME_KERNELS:
        assert warm.token_ids == cold.token_ids
        assert warm.blocks.token_ids == cold.blocks.token_ids
    assert len(set(warm.token_ids)) >= 5
    for c in (first, warm, cold):
        c.blocks.release()
    assert at_start(engine.pool)


def test_completion_reports_context_and_shares_unchanged_blocks(llama32):
    engine = make_engine(llama32)
    first = run(engine, "a", STORY, max_tokens=10)
    spec = engine.spec
    n = first.blocks.num_tokens
    assert n == first.prompt_tokens + len(first.token_ids)
    assert first.blocks.num_blocks == spec.n_layers * spec.blocks_for_tokens(n)
    assert first.text == engine.tokenizer.decode(first.token_ids, skip_special_tokens=True)

    second = run(engine, "a", " more", cache=first.blocks, max_tokens=5)
    full_blocks = n // spec.block_size
    for layer in range(spec.n_layers):
        assert second.blocks.layer_block_ids(layer)[:full_blocks] == first.blocks.layer_block_ids(layer)[:full_blocks]
        assert engine.pool.refcount(first.blocks.layer_block_ids(layer)[0]) == 2
    # stored once: the continuation added only its own tail blocks
    assert engine.pool.usage().used_blocks == first.blocks.num_blocks + spec.n_layers * (
        spec.blocks_for_tokens(second.blocks.num_tokens) - full_blocks
    )


def test_caches_rebuilt_as_views_are_not_kept_once_mlx_lm_merged_them(llama32):
    """A context of one block per layer is rebuilt as views of the pool's arrays, which keep a reference on
    its blocks. mlx-lm copies an inserted cache into its batch at the next step and must keep nothing of it
    afterwards (on a GPU a live view makes each store copy the whole pool array instead of writing in place)."""
    engine = make_engine(llama32)
    first = run(engine, "a", list(range(10, 110)), max_tokens=3)
    block = first.blocks.layer_block_ids(0)[0]
    assert engine.spec.blocks_for_tokens(first.blocks.num_tokens) == 1

    uid = engine.submit("a", list(range(200, 216)), cache=first.blocks, max_tokens=4)
    assert engine.pool.refcount(block) == 3  # the caller's handle, the request's source, the rebuilt views
    engine.step_once()  # the prefill: mlx-lm merges the inserted cache into its batch
    assert engine.pool.refcount(block) == 2  # freed by reference counting alone, no gc.collect() needed
    second = {c.uid: c for c in engine.step()}[uid]
    assert len(second.token_ids) == 4
    first.blocks.release()
    second.blocks.release()
    assert at_start(engine.pool)


def test_where_stores_replace_the_pool_arrays_views_are_used_only_for_caches_mlx_lm_merges_at_its_next_step(
        llama32, monkeypatch):
    """Where stores replace the pool's arrays (MLX slice updates: Metal), a live view makes each store copy
    the whole pool array, so the engine rebuilds as views only a cache that mlx-lm merges before the stores
    of its next step; one queued behind a full prompt batch is gathered (a copy that holds no reference on
    the pool)."""
    from semantic.domain import services

    engine = make_engine(llama32, prefill_batch_size=1)
    firsts = [run(engine, agent, list(range(10 + k, 110 + k)), max_tokens=3) for k, agent in enumerate("ab")]
    blocks = [first.blocks.layer_block_ids(0)[0] for first in firsts]
    monkeypatch.setattr(services, "writes_through_host", lambda: False)
    monkeypatch.setattr(services, "packs_blocks", lambda keys, values: False)
    assert not engine.pool.writes_in_place

    uids = [engine.submit(first.agent_id, list(range(200, 216)), cache=first.blocks, max_tokens=2) for first in firsts]
    # a: merged at the next step (room for one prompt), rebuilt as views; b: queued behind it, gathered
    assert [engine.pool.refcount(b) for b in blocks] == [3, 2]
    done = {c.uid: c for c in engine.step()}
    assert all(len(done[uid].token_ids) == 2 for uid in uids)
    for completion in [*firsts, *done.values()]:
        completion.blocks.release()
    assert at_start(engine.pool)


def test_several_agents_in_one_batch_keep_their_own_context(llama32):
    engine = make_engine(llama32, total_blocks=600)
    prompts = {"alice": STORY, "bob": "numbers one two three four five six " * 20, "carol": "red green blue " * 50}
    uids = {agent: engine.submit(agent, p, max_tokens=12) for agent, p in prompts.items()}
    firsts = {c.agent_id: c for c in engine.step()}
    assert {firsts[a].uid for a in prompts} == set(uids.values())

    follow_up = " again"
    resumed_uids = {a: engine.submit(a, follow_up, cache=firsts[a].blocks, max_tokens=15) for a in prompts}
    resumed = {c.agent_id: c for c in engine.step()}  # all three decoded in one batch
    assert len(resumed) == 3
    tokens = engine.tokenizer.encode(follow_up, add_special_tokens=False)
    contexts = {agent: list(firsts[agent].blocks.token_ids) + tokens for agent in prompts}
    for agent in prompts:
        assert resumed[agent].uid == resumed_uids[agent]
        # Greedy after its own context, and far from greedy after each other agent's: a cache mixed up
        # within the batch fails by a margin no rounding covers (a mean gap of 0.4, against 0.2 allowed
        # for any one token of the agent's own continuation).
        for other in prompts:
            gaps = greedy_gaps(engine.model, contexts[other], resumed[agent].token_ids)
            if other == agent:
                assert max(gaps) <= LOGIT_TOLERANCE, agent
            else:  # measured on CPU: every token 0.3-1.6 from greedy, 0.75 on average
                assert sum(gaps) / len(gaps) > 2 * LOGIT_TOLERANCE, (agent, other, gaps)
        if SAME_KERNELS:
            alone = cold_continuation(engine, firsts[agent].blocks, tokens, max_tokens=15)
            assert resumed[agent].token_ids == alone.token_ids, agent


def test_resending_the_whole_conversation_reuses_the_common_prefix(llama32):
    engine = make_engine(llama32)
    first = run(engine, "a", STORY, max_tokens=8)
    conversation = list(first.blocks.token_ids) + engine.tokenizer.encode(" next question", add_special_tokens=False)

    resent = run(engine, "a", conversation, cache=first.blocks, match_prefix=True, max_tokens=12)
    cold = run(engine, "cold", conversation, max_tokens=12)

    assert resent.reused_tokens == first.blocks.num_tokens
    assert resent.token_ids == cold.token_ids


def test_prompt_diverging_inside_a_block_is_trimmed_to_the_common_prefix(llama32):
    engine = make_engine(llama32)
    first = run(engine, "a", STORY + STORY, max_tokens=4)
    context = list(first.blocks.token_ids)
    assert len(context) > 300
    edited = context[:300] + [t + 1 for t in context[300:310]]  # diverges at 300, inside block 1

    resent = run(engine, "a", edited, cache=first.blocks, match_prefix=True, max_tokens=10)
    cold = run(engine, "cold", edited, max_tokens=10)

    assert resent.reused_tokens == 300
    assert resent.token_ids == cold.token_ids
    # block 0 is shared, block 1 (trimmed inside) was written anew
    assert resent.blocks.layer_block_ids(0)[0] == first.blocks.layer_block_ids(0)[0]
    assert resent.blocks.layer_block_ids(0)[1] != first.blocks.layer_block_ids(0)[1]


def test_sliding_window_model_falls_back_to_full_prefill_when_the_window_lost_the_prefix(gemma32):
    engine = make_engine(gemma32)
    first = run(engine, "a", STORY, max_tokens=4)  # longer than the 128-token window
    context = list(first.blocks.token_ids)
    edited = context[:200] + [5, 6, 7]

    resent = run(engine, "a", edited, cache=first.blocks, match_prefix=True, max_tokens=10)
    cold = run(engine, "cold", edited, max_tokens=10)

    assert resent.reused_tokens == 0
    assert resent.token_ids == cold.token_ids


def test_extract_cache_at_every_stage(llama32):
    engine = make_engine(llama32)
    base = run(engine, "a", STORY, max_tokens=6)
    uid = engine.submit("a", " go on and on", cache=base.blocks, max_tokens=30)

    waiting = engine._extract_cache(uid)  # not stepped yet: the context it starts from, shared
    assert waiting.token_ids == base.blocks.token_ids
    assert waiting.all_block_ids == base.blocks.all_block_ids

    snapshots = []
    finished = []
    while not finished:
        finished = engine.step_once()
        if not finished:
            snapshots.append(engine._extract_cache(uid))
    (final,) = finished
    assert len(snapshots) >= 20
    context = final.blocks.token_ids
    spec = engine.spec
    for snap in snapshots:  # every snapshot is a prefix of the final context, bit for bit
        assert context[: snap.num_tokens] == snap.token_ids
        mid = engine._reconstruct_cache(snap)
        end = engine._reconstruct_cache(final.blocks, snap.num_tokens)
        for a, b in zip(mid, end):
            assert a.offset == b.offset == snap.num_tokens
            assert mx.array_equal(a.keys[..., : a.offset, :], b.keys[..., : b.offset, :]).item()
        # unchanged full blocks of the source are shared, not copied
        full = base.blocks.num_tokens // spec.block_size
        assert snap.layer_block_ids(0)[:full] == base.blocks.layer_block_ids(0)[:full]

    again = engine._extract_cache(uid)  # finished, while its completion's blocks are alive
    assert again.all_block_ids == final.blocks.all_block_ids
    for handle in snapshots + [again, final.blocks, waiting, base.blocks]:
        handle.release()
    del final, finished
    gc.collect()
    with pytest.raises(UnknownRequestError):
        engine._extract_cache(uid)
    assert at_start(engine.pool)


@pytest.mark.parametrize("as_given", [int, np.int64, mx.array], ids=["int", "numpy", "mlx"])
def test_cancel_gives_back_everything(llama32, as_given):
    """A NumPy or MLX integer uid was "no request in flight" before, and nothing was cancelled."""
    engine = make_engine(llama32)
    base = run(engine, "a", STORY, max_tokens=4)
    uid = engine.submit("a", " more", cache=base.blocks, max_tokens=30)
    engine.step_once()
    engine.cancel(as_given(uid))
    assert engine.pending == 0
    base.blocks.release()
    del base
    assert at_start(engine.pool)


def test_bad_inputs_raise_typed_errors_and_change_nothing(llama32, gemma32):
    engine = make_engine(llama32, total_blocks=64)
    good = run(engine, "a", STORY, max_tokens=4)
    other = make_engine(llama32, total_blocks=64)
    foreign = run(other, "a", STORY, max_tokens=4)
    gemma_engine = make_engine(gemma32, total_blocks=64)
    other_geometry = run(gemma_engine, "g", STORY, max_tokens=4)
    released = good.blocks.share()
    released.release()
    before = engine.pool.usage()

    cases = [
        (InvalidRequestError, lambda: engine.submit("a", "", max_tokens=4)),
        (InvalidRequestError, lambda: engine.submit("a", [], max_tokens=4)),
        (InvalidRequestError, lambda: engine.submit("a", STORY, max_tokens=0)),
        (InvalidRequestError, lambda: engine.submit("a", STORY, max_tokens=-3)),
        (InvalidRequestError, lambda: engine.submit("", STORY)),
        (InvalidRequestError, lambda: engine.submit("a", STORY, temperature=-1)),
        (InvalidRequestError, lambda: engine.submit("a", STORY, match_prefix=True)),
        (UnknownRequestError, lambda: engine._extract_cache(12345)),
        (UnknownRequestError, lambda: engine.cancel(12345)),
        (IncompatibleCacheError, lambda: engine.submit("a", "x", cache=foreign.blocks)),
        (IncompatibleCacheError, lambda: engine.submit("a", "x", cache=other_geometry.blocks)),
        (IncompatibleCacheError, lambda: engine._reconstruct_cache(other_geometry.blocks)),
        (PoolExhaustedError, lambda: engine.submit("a", STORY * 20, max_tokens=10)),
        (ReleasedHandleError, lambda: engine.submit("a", "x", cache=released)),
        (ReleasedHandleError, lambda: engine._reconstruct_cache(released)),
        (ReleasedHandleError, lambda: released.release()),
    ]
    for error, call in cases:
        with pytest.raises(error) as info:
            call()
        assert str(info.value), error
        assert engine.pool.usage() == before
        engine.pool.check_invariants()
    assert engine.pending == 0


def test_pool_exhausted_error_says_what_was_asked_and_what_the_pool_could_ever_give(llama32):
    engine = make_engine(llama32, total_blocks=10)
    with pytest.raises(PoolExhaustedError) as info:
        engine.submit("a", STORY * 10, max_tokens=10)
    assert info.value.available == 10 and info.value.requested > 10
    assert f"{info.value.requested} blocks needed, more than this pool could ever give (10)" in str(info.value)
    assert "Release AgentBlocks" not in str(info.value)  # releasing could never help


def test_requests_wait_for_blocks_and_run_when_handles_are_released(llama32):
    layers = ModelCacheSpec.from_model(llama32[0]).n_layers
    engine = make_engine(llama32, total_blocks=2 * layers)  # room for two short contexts
    uids = [engine.submit(agent, "hello there", max_tokens=5) for agent in "abc"]
    assert engine.pending == 3
    with pytest.warns(PoolPressureWarning, match="1 request"):
        done = list(engine.step())  # the list keeps both completions' blocks: the third must wait
    assert sorted(c.uid for c in done) == uids[:2]
    assert engine.pending == 1
    del done
    (third,) = list(engine.step())
    assert third.uid == uids[2]
    del third
    texts = [c.text for c in (engine.generate(a, "hello there", max_tokens=5) for a in "xyz")]
    assert len(texts) == 3  # completions dropped as they come: nothing waits

    held = [run(engine, agent, "keep me", max_tokens=5) for agent in "de"]
    waiting = engine.submit("f", "wait for room", max_tokens=5)
    with pytest.warns(PoolPressureWarning, match="wait for blocks"):
        assert list(engine.step()) == []
    assert engine.pending == 1
    held[0].blocks.release()
    (late,) = list(engine.step())
    assert late.uid == waiting


def test_waiting_resumes_that_pin_each_others_room_end_the_newest_and_run_the_rest(llama32):
    """Each waiting resume keeps the context it resumes until it runs: two of them, each with room to run alone
    once the other's context is free, waited for each other forever (the warning asked the caller to release
    handles, which could not help). Now the newest ends with a typed error and the other runs."""
    layers = ModelCacheSpec.from_model(llama32[0]).n_layers
    engine = make_engine(llama32, total_blocks=2 * layers)  # room for two one-block contexts
    contexts = [run(engine, agent, "hello there", max_tokens=2).blocks for agent in "ab"]
    first, second = (engine.submit(agent, " and then", cache=blocks, max_tokens=3)
                     for agent, blocks in zip("ab", contexts))
    assert len(engine._waiting) == 1  # the second ended at once: nothing runs that could make room
    for blocks in contexts:
        blocks.release()
    done = {c.uid: c for c in engine.step()}
    assert set(done) == {first, second}
    assert done[first].error is None and list(done[first].blocks.token_ids[-3:]) == done[first].token_ids
    assert isinstance(done[second].error, RequestFailedError) and done[second].error.stage == "admission"
    assert isinstance(done[second].error.__cause__, PoolExhaustedError)
    assert "the newest on its engine, was ended" in str(done[second].error)
    del done
    assert engine.pending == 0 and at_start(engine.pool)

    # Room for one of them if the caller releases a context it keeps: it waits, and the warning says so.
    contexts = [run(engine, agent, "hello there", max_tokens=2).blocks for agent in "ab"]
    waiting = engine.submit("a", " and then", cache=contexts[0], max_tokens=3)
    with pytest.warns(PoolPressureWarning, match=f"{layers} of these blocks are contexts that waiting requests"):
        assert list(engine.step()) == []
    contexts[1].release()
    (late,) = list(engine.step())
    assert late.uid == waiting and late.error is None
    del late
    contexts[0].release()
    assert at_start(engine.pool)


def test_waiting_resumes_on_two_engines_that_pin_each_others_room_end_one_and_run_the_other(llama32):
    """As above, one waiting resume on each of two engines sharing a pool: each engine counted only the contexts
    its own waiting requests resume, so each took the other's for handles the caller could release, and both
    waited forever. Now the newest ends (as it is submitted: nothing runs), and the other engine's runs."""
    model, tokenizer = llama32
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, 2 * spec.n_layers)  # room for two one-block contexts
    engines = [BlockPoolBatchEngine(model, tokenizer, pool, spec, wait_for_blocks_s=0) for _ in range(2)]
    contexts = [run(engine, agent, "hello there", max_tokens=2).blocks for engine, agent in zip(engines, "ab")]
    uids = [engine.submit(agent, " and then", cache=blocks, max_tokens=3)
            for engine, agent, blocks in zip(engines, "ab", contexts)]
    for blocks in contexts:
        blocks.release()
    done = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PoolPressureWarning)
        for _ in range(3):
            for index, engine in enumerate(engines):
                done.update({(index, c.uid): c for c in engine.step()})
    assert set(done) == {(0, uids[0]), (1, uids[1])}
    ran, ended = done[0, uids[0]], done[1, uids[1]]
    assert isinstance(ended.error, RequestFailedError) and ended.error.stage == "admission"
    assert "2 waiting requests on this pool" in str(ended.error)
    assert ran.error is None and list(ran.blocks.token_ids[-3:]) == ran.token_ids
    del done, ended, ran
    assert all(engine.pending == 0 for engine in engines) and at_start(pool)


def test_pool_returns_to_start_and_does_not_grow_over_200_turns(llama32):
    engine = make_engine(llama32, total_blocks=200)
    blocks = run(engine, "a", "start", max_tokens=3).blocks
    high_water = 0
    for turn in range(200):
        completion = run(engine, "a", f" turn {turn}", cache=blocks, max_tokens=2)
        blocks.release()
        blocks = completion.blocks
        if blocks.num_tokens > engine.spec.block_size:  # keep the context short: restart it
            blocks.release()
            blocks = run(engine, "a", "start", max_tokens=3).blocks
        high_water = max(high_water, engine.pool.usage().used_blocks)
    assert high_water <= 2 * engine.spec.n_layers * 2
    blocks.release()
    assert at_start(engine.pool)


def test_resuming_one_stored_context_again_plans_its_rebuild_once(llama32, monkeypatch):
    """The engine rebuilds from a share of the handle it is given, made per request; the rebuild's plan
    (its row index) is the same for every share, so resuming one context again reuses it."""
    from semantic.application import block_cache

    engine = make_engine(llama32)
    stored = run(engine, "a", STORY, max_tokens=2).blocks
    plan, plans = block_cache._gather_plan, []
    monkeypatch.setattr(block_cache, "_gather_plan", lambda *args: plans.append(args) or plan(*args))
    for _ in range(3):
        completion = run(engine, "a", " and then", cache=stored, max_tokens=2)
        completion.blocks.release()
    assert len(plans) == 1
    stored.release()
    assert at_start(engine.pool)


@pytest.mark.parametrize("model_name", ["llama32", "gemma32"])
def test_conversation_benchmark_sides_agree_and_leave_the_pool_as_it_was(request, model_name):
    """``cases.conversation_against_hot_path`` (asv's ConversationVsHotPath): the engine resuming each turn's
    stored blocks and mlx-lm continuing its live cache generate the same tokens (on CPU, bit for bit), and
    every handle the comparison made is given back."""
    from semantic.benchmarking import cases

    engine = make_engine(request.getfixturevalue(model_name), total_blocks=400)
    stored = run(engine, "stored", STORY, max_tokens=2).blocks  # the model's keys: 461 tokens
    held = engine.pool.usage()
    engine_s, hot_s, same_tokens = cases.conversation_against_hot_path(engine, stored, turns=3)
    assert engine_s > 0 and hot_s > 0
    if SAME_KERNELS:
        assert same_tokens
    gc.collect()
    assert engine.pool.usage() == held
    engine.pool.check_invariants()
    stored.release()
    assert at_start(engine.pool)


@pytest.mark.filterwarnings("ignore::semantic.application.batch_engine.PoolPressureWarning")
def test_seed_experiment_loops_run_as_written():
    """EXP-006's three loops, verbatim, on SmolLM2's cache geometry with total_blocks=500."""
    import time

    import numpy as np

    from semantic.testing.local_models import load_local_model

    # The loops exercise the cache, not the model: the narrow preset has smollm2-135m's KV geometry and
    # tokenizer at ~1/9 of its parameters, and float32 runs faster than bfloat16 on CPU (this test took
    # 262 s on smollm2-135m, 66 s on the narrow preset in bfloat16, 36 s in float32, on a 2-core CPU).
    model, tokenizer = load_local_model("smollm2-135m-narrow", dtype="float32")
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec=spec, total_blocks=500)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, spec)

    uid = engine.submit("agent", "Long prompt..." * 50, max_tokens=100)
    completions = list(engine.step())
    agent_blocks = completions[0].blocks
    times_reconstruct = []
    for _ in range(100):
        start = time.perf_counter()
        cache = engine._reconstruct_cache(agent_blocks)
        end = time.perf_counter()
        times_reconstruct.append((end - start) * 1000)
    assert cache[0].offset == agent_blocks.num_tokens

    uid = engine.submit("agent", "Prompt", max_tokens=100)
    list(engine.step())
    times_extract = []
    for _ in range(100):
        uid = engine.submit("agent", "Test", max_tokens=10)
        start = time.perf_counter()
        blocks = engine._extract_cache(uid)
        end = time.perf_counter()
        times_extract.append((end - start) * 1000)

    times_roundtrip = []
    for _ in range(100):
        start = time.perf_counter()
        cache = engine._reconstruct_cache(agent_blocks)
        uid = engine.submit("agent", "Continue", cache=agent_blocks, max_tokens=10)
        completions = list(engine.step())
        end = time.perf_counter()
        times_roundtrip.append((end - start) * 1000)

    assert len(times_reconstruct) == len(times_extract) == len(times_roundtrip) == 100
    assert np.isfinite(times_roundtrip).all()
    del completions, blocks, cache
    while engine.pending:  # requests the pool made wait while the loop held completions
        assert list(engine.step())
    agent_blocks.release()
    assert at_start(pool)
