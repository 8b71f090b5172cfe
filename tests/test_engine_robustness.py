"""One bad request never harms another: input checks in submit, failure isolation in step, a fuzz test.

Faults are injected by this module only (monkeypatching the model's forward pass,
the engine's generator, samplers and the store step), never by production code.
"""

import collections
import gc
import pathlib
import threading
import time
import weakref
from fractions import Fraction

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import semantic
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.adapters import mlx_threads
from semantic.application import batch_engine
from semantic.application.block_cache import blocks_to_cache, cache_to_blocks
from semantic.domain.errors import (
    IncompatibleCacheError,
    InvalidRequestError,
    PoolExhaustedError,
    RequestFailedError,
    SemanticError,
    UnknownRequestError,
    UnsupportedModelError,
)
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec

from conftest import make_engine
from test_engine import LOGIT_TOLERANCE, SAME_KERNELS, greedy_gap
from interrupt_points import at_every_point, traced

STORY = "the quick brown fox jumps over the lazy dog while the cat sleeps by the warm fire " * 6
COUNTING = "numbers one two three four five six seven eight nine ten " * 5
VOCAB = 2048  # tiny-llama's


@pytest.fixture(scope="module")
def engine(llama32):
    return make_engine(llama32, total_blocks=64)


def whole(pool) -> bool:
    gc.collect()
    pool.check_invariants()
    usage = pool.usage()
    return usage.used_blocks == 0 and usage.reserved_blocks == 0


# ---- input checks: the findings 1, 2, 4, 5 ---------------------------------------------------
BAD_SUBMISSIONS = {
    "id 2**31 (SIGSEGV before)": dict(prompt=[2**31]),
    "id 2**31-1": dict(prompt=[2**31 - 1]),
    "id 2**40": dict(prompt=[2**40]),
    "id 2**64 (bad_cast before)": dict(prompt=[2**64]),
    "ids past the vocabulary": dict(prompt=[5000, 6000]),
    "id == vocabulary": dict(prompt=[1, VOCAB]),
    "negative id": dict(prompt=[3, -1]),
    "bool ids": dict(prompt=[True, False]),
    "numpy bool ids": dict(prompt=np.array([True, False])),
    "float ids": dict(prompt=[1.0, 2.0]),
    "float array": dict(prompt=np.array([1.5, 2.0])),
    "2-d array": dict(prompt=np.array([[1, 2]])),
    "mlx ids past the vocabulary": dict(prompt=mx.array([1, 5000])),
    "nested ids": dict(prompt=[[1, 2]]),
    "a None id (bare TypeError before)": dict(prompt=[1, None]),
    "bytes": dict(prompt=b"abc"),
    "bytearray": dict(prompt=bytearray(b"abc")),
    "None": dict(prompt=None),
    "an int": dict(prompt=5),
    "lone surrogate": dict(prompt="a\ud800b"),
    "top_k 1.5": dict(top_k=1.5, temperature=1.0),
    "top_k past the vocabulary": dict(top_k=5000, temperature=1.0),
    "top_k bool": dict(top_k=True, temperature=1.0),
    "top_k negative": dict(top_k=-1),
    "temperature text": dict(temperature="hot"),
    "temperature nan": dict(temperature=float("nan")),
    "temperature inf": dict(temperature=float("inf")),
    "temperature negative": dict(temperature=-0.5),
    "top_p above 1": dict(top_p=1.5),
    "min_p negative": dict(min_p=-0.1),
    "min_p nan": dict(min_p=float("nan")),
    "repetition_penalty text": dict(repetition_penalty="x"),
    "repetition_penalty negative": dict(repetition_penalty=-1.0),
    "repetition_penalty zero": dict(repetition_penalty=0.0),
    "repetition_penalty inf": dict(repetition_penalty=float("inf")),
    "repetition_penalty 1e-40 (logits overflowed to inf, then NaN)": dict(repetition_penalty=1e-40, temperature=0.7),
    "a prompt of 10**12 ids (MemoryError before)": dict(prompt=range(10**12)),
    "a prompt of 2**64 ids (OverflowError from len() before)": dict(prompt=range(2**64)),
    "max_tokens True": dict(max_tokens=True),
    "max_tokens float": dict(max_tokens=2.0),
    "max_tokens text": dict(max_tokens="3"),
    "max_tokens huge": dict(max_tokens=2**70),
    "max_tokens 10**400 (OverflowError before)": dict(max_tokens=10**400),
    "match_prefix text": dict(match_prefix="yes"),
    "agent id bytes": dict(agent_id=b"a"),
    # Review 2: str() of an int of over 4,300 digits raises ValueError, which came out of the error's message.
    "id 10**5000 (ValueError before)": dict(prompt=[5, 10**5000]),
    "a list holding 10**5000 as an id (ValueError before)": dict(prompt=[[10**5000]]),
    "agent id 10**5000 (ValueError before)": dict(agent_id=10**5000),
    "match_prefix 10**5000 (ValueError before)": dict(match_prefix=10**5000),
    "max_tokens [10**5000] (ValueError before)": dict(max_tokens=[10**5000]),
    "temperature Fraction(10**5000) (ValueError before)": dict(temperature=Fraction(10**5000)),
    "a broadcast array of 10**12 ids (MemoryError before)": dict(prompt=np.broadcast_to(np.int32(1), (10**12,))),
    # Review 4: a NumPy dtype was called an integer one when its name held "int" (a structured dtype's field).
    "a structured array (TypeError before)": dict(prompt=np.array([(5,), (6,)], dtype=[("int", "<i4")])),
    "max_tokens a structured 0-d array (TypeError before)": dict(max_tokens=np.array((3,), dtype=[("int", "<i4")])),
}


@pytest.mark.parametrize("case", sorted(BAD_SUBMISSIONS))
def test_a_bad_submission_raises_a_typed_error_and_reserves_nothing(engine, case):
    kwargs = {"agent_id": "a", "prompt": "hello", "max_tokens": 2, **BAD_SUBMISSIONS[case]}
    agent, prompt = kwargs.pop("agent_id"), kwargs.pop("prompt")
    before = engine.pool.usage()
    with pytest.raises((InvalidRequestError, PoolExhaustedError)) as info:
        engine.submit(agent, prompt, **kwargs)
    assert str(info.value)
    if isinstance(info.value, InvalidRequestError):  # what AgentCacheStore.generate asks before it fetches a context
        with pytest.raises(InvalidRequestError):
            engine.check_request(agent, prompt, False, **kwargs)
    assert engine.pending == 0 and engine.pool.usage() == before
    engine.pool.check_invariants()
    assert engine.generate("a", "hello", max_tokens=2).token_ids  # the engine still works


def test_integer_ids_of_numpy_and_mlx_work_like_python_ints(engine):
    ids = engine.tokenizer.encode(STORY)[:40]
    expected = engine.generate("a", ids, max_tokens=6).token_ids
    for prompt in (np.array(ids), np.array(ids, dtype=np.uint16), mx.array(ids), [np.int64(t) for t in ids],
                   [mx.array(t) for t in ids], tuple(ids)):
        assert engine.generate("a", prompt, max_tokens=np.int32(6)).token_ids == expected, type(prompt)


def test_a_lazy_prompt_array_of_another_thread_is_a_typed_error(engine):
    """MLX streams belong to the thread that made them: a slice another thread built but never evaluated cannot
    run here (MLX's bare RuntimeError before). Evaluated there first, the same array is a good prompt."""
    prompts = {}

    def client():
        ids = mx.array([5, 6, 7, 8, 9])
        prompts["lazy"], prompts["evaluated"] = ids[1:], ids[1:]
        mx.eval(prompts["evaluated"])

    thread = threading.Thread(target=client)
    thread.start()
    thread.join()
    before = engine.pool.usage()
    with pytest.raises(InvalidRequestError, match="another thread's stream.*evaluate it"):
        engine.submit("a", prompts["lazy"], max_tokens=2)
    assert engine.pending == 0 and engine.pool.usage() == before
    assert engine.generate("a", prompts["evaluated"], max_tokens=3).token_ids == \
        engine.generate("a", [6, 7, 8, 9], max_tokens=3).token_ids


def test_the_edges_of_the_sampling_ranges_are_accepted(engine):
    greedy = engine.generate("a", STORY, max_tokens=4).token_ids
    assert engine.generate("a", STORY, max_tokens=4, top_k=VOCAB, top_p=1.0, min_p=0.0).token_ids == greedy
    assert engine.generate("a", STORY, max_tokens=4, temperature=np.float64(0.0), repetition_penalty=1.0).token_ids \
        == greedy
    sampled = engine.generate("a", STORY, max_tokens=4, temperature=1e-30, top_k=1, top_p=1e-9, min_p=1.0,
                              repetition_penalty=1e-3)
    assert all(0 <= t < VOCAB for t in sampled.token_ids)


def own_tiny_llama():
    """tiny-llama (float32) as a new object, which a test may change: ``load_local_model``'s is shared."""
    import mlx_lm

    from semantic.testing.local_models import build_local_model

    return mlx_lm.load(str(build_local_model("tiny-llama", dtype="float32")))


def test_a_temperature_too_large_to_scale_by_samples_among_the_kept_tokens(engine):
    """mlx-lm scales float32 logits by 1/temperature, 0 from ~1e46: the tokens top_k / top_p / min_p dropped became
    -inf * 0 = NaN, and the last id of the vocabulary came out every time."""
    greedy = engine.generate("a", STORY, max_tokens=4).token_ids
    for temperature in (1e46, 1e300):
        for only_the_top in (dict(top_k=1), dict(min_p=1.0), dict(top_p=1e-9)):
            assert engine.generate("a", STORY, max_tokens=4, temperature=temperature, **only_the_top).token_ids \
                == greedy, (temperature, only_the_top)


def test_logits_wider_than_the_vocabulary_never_sample_an_id_past_it():
    """An untied head with rows past the embedding's: prompts were checked against the vocabulary, but sampling
    saw every logit, and the id it chose came back into the embedding, out of bounds (SIGSEGV with logits 512x
    the vocabulary; with 2x, ids past it, stored, then the context refused as another tokenizer's)."""
    model, tokenizer = own_tiny_llama()
    narrow = make_engine((model, tokenizer), total_blocks=64)
    expected = narrow.generate("a", STORY, max_tokens=6).token_ids
    embedding = model.model.embed_tokens.weight
    rows, dim = embedding.shape
    head = nn.Linear(dim, 2 * rows)  # the tied head's rows, then as many that would win every time
    head.weight = mx.concatenate([embedding, mx.zeros((rows, dim))])
    head.bias = mx.concatenate([mx.zeros((rows,)), mx.full((rows,), 1e4)])
    model.lm_head, model.args.tie_word_embeddings = head, False
    wide = make_engine((model, tokenizer), total_blocks=64)
    done = wide.generate("a", STORY, max_tokens=6)
    assert done.token_ids == expected
    assert all(t < rows for t in wide.generate("b", STORY, max_tokens=6, temperature=1.0, top_k=50).token_ids)
    assert wide.generate("a", [5], cache=done.blocks, max_tokens=2).token_ids  # its context resumes
    done.blocks.release()
    assert whole(wide.pool)


def test_a_model_whose_weights_are_lazy_on_another_thread_is_a_typed_error():
    """A weight changed on another thread and not evaluated there cannot be computed here: MLX's bare
    RuntimeError came out of the cache spec, the engine and the fingerprint. Evaluated there, it works."""
    from semantic.persistence import model_fingerprint

    model, tokenizer = own_tiny_llama()

    def scaled_on_another_thread(module, evaluate):
        weight = module.weight

        def change():
            module.weight = weight * 1.0
            if evaluate:
                mx.eval(module.weight)

        thread = threading.Thread(target=change)
        thread.start()
        thread.join()
        return weight

    embedding = scaled_on_another_thread(model.model.embed_tokens, evaluate=False)  # read by the spec's probe
    for door in (lambda: ModelCacheSpec.from_model(model), lambda: make_engine((model, tokenizer), total_blocks=8)):
        with pytest.raises(InvalidRequestError, match="the model's weights: .*another thread's stream"):
            door()
    model.model.embed_tokens.weight = embedding
    norm = scaled_on_another_thread(model.model.norm, evaluate=False)  # after the keys and values: only hashed
    ModelCacheSpec.from_model(model)
    with pytest.raises(InvalidRequestError, match="the model's weights: .*another thread's stream"):
        model_fingerprint(model, tokenizer)
    model.model.norm.weight = norm
    scaled_on_another_thread(model.model.embed_tokens, evaluate=True)
    assert model_fingerprint(model, tokenizer)
    assert make_engine((model, tokenizer), total_blocks=8).generate("a", [5, 6], max_tokens=2).token_ids


def test_a_cached_context_of_ids_past_the_vocabulary_is_refused_before_mlx_lm_reads_them(engine):
    """mlx-lm's repetition penalty indexes the logits with the context's ids: one past the vocabulary
    crashed the process (SIGSEGV). The pool knows no vocabulary, so any store may hold such ids."""
    good = engine.generate("a", STORY, max_tokens=2)
    caches = blocks_to_cache(engine.pool, good.blocks)
    for bad in (VOCAB, 5000, 2**31):
        tokens = list(good.blocks.token_ids[:-1]) + [bad]
        stranger = cache_to_blocks(engine.pool, "stranger", caches, tokens)
        usage = engine.pool.usage()
        with pytest.raises(InvalidRequestError, match=f"the cache's token id {bad} .*store.delete"):
            engine.submit("a", [5], cache=stranger, max_tokens=3, repetition_penalty=1.5)
        assert engine.pending == 0 and engine.pool.usage() == usage
        stranger.release()
    del caches
    assert engine.generate("a", [5], cache=good.blocks, max_tokens=3, repetition_penalty=1.5).token_ids
    good.blocks.release()
    assert whole(engine.pool)


def test_cancelling_an_int_too_long_to_print_is_an_unknown_request(engine):
    """The message quoted the uid: str() of an int of over 4,300 digits raised ValueError instead."""
    with pytest.raises(UnknownRequestError, match="an int of 16610 bits"):
        engine.cancel(10**5000)


class _Tokenizer:
    """``tokenizer`` whose ``encode`` answers ``encode(text)`` instead."""

    def __init__(self, tokenizer, encode):
        self._tokenizer, self.encode = tokenizer, encode

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


def test_a_tokenizer_that_fails_or_gives_odd_ids_is_a_typed_error_or_works(engine, monkeypatch):
    """A tokenizer raising came out of submit as its own error (a RuntimeError, or TypeError for a None it
    returned); NumPy ids failed the request in its prefill (MLX refused an int64 list), floats there too."""
    real = engine.tokenizer
    ids = real.encode("hello world")
    expected = engine.generate("a", ids, max_tokens=3).token_ids
    for encode, error in ((lambda *a, **k: _raise(RuntimeError("broken tokenizer")), "broken tokenizer"),
                          (lambda *a, **k: None, "NoneType"), (lambda *a, **k: [5.0, 6], "must be ints")):
        monkeypatch.setattr(engine, "tokenizer", _Tokenizer(real, encode))
        before = engine.pool.usage()
        with pytest.raises(InvalidRequestError, match=error):
            engine.submit("a", "hello world", max_tokens=3)
        assert engine.pending == 0 and engine.pool.usage() == before
    for as_numpy in (np.array, lambda ids: [np.int64(t) for t in ids]):
        monkeypatch.setattr(engine, "tokenizer", _Tokenizer(real, lambda text, **k: as_numpy(ids)))
        assert engine.generate("a", "hello world", max_tokens=3).token_ids == expected
    monkeypatch.undo()
    assert whole(engine.pool)


CHATML = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% if m['role'] == 'assistant' %}</s>"
          "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_next_turn_refuses_a_context_that_is_not_token_ids_with_a_typed_error(llama32, monkeypatch):
    """An array's truth value (ValueError), a set or an int (not subscriptable) and an unhashable last item
    (TypeError) came out untyped; a 1-d integer array is token ids like a list."""
    from semantic.models.chat import next_turn

    tokenizer = llama32[1]
    monkeypatch.setattr(tokenizer._tokenizer, "chat_template", CHATML, raising=False)  # the wrapper reads it there
    end = tokenizer.eos_token_id
    after_end = next_turn(tokenizer, [5, end], "hi")
    assert after_end != next_turn(tokenizer, [5, 6], "hi")
    for context in (np.array([5, end]), mx.array([5, end]), (5, end), range(end - 1, end + 1)):
        assert next_turn(tokenizer, context, "hi") == after_end
    assert next_turn(tokenizer, np.array([], dtype=np.int64), "hi") == next_turn(tokenizer, [], "hi")
    for context in (np.array([]), np.array([[5, 2]]), 5, {1, 2}, iter([1]), "abc", b"\x02",
                    [[1]], [5, 2.0], [None]):
        with pytest.raises(InvalidRequestError, match="context"):
            next_turn(tokenizer, context, "hi")


def test_chat_turns_of_something_not_a_tokenizer_are_typed_errors(llama32, monkeypatch):
    """None and a str (whose ``encode`` is str.encode) raised AttributeError and LookupError; a tokenizer
    without an end token AttributeError, a template that gives no ids TypeError."""
    from semantic.models.chat import first_turn, next_turn

    for not_a_tokenizer in (None, "tokenizer", 5):
        for turn in (lambda t: first_turn(t, "hi"), lambda t: next_turn(t, [5], "hi")):
            with pytest.raises(InvalidRequestError, match="tokenizer must be the model's tokenizer"):
                turn(not_a_tokenizer)
    tokenizer = llama32[1]
    monkeypatch.setattr(tokenizer._tokenizer, "chat_template", CHATML, raising=False)
    assert first_turn(tokenizer, "hi") and next_turn(tokenizer, [5, tokenizer.eos_token_id], "hi")
    monkeypatch.setattr(type(tokenizer), "eos_token", None, raising=False)
    with pytest.raises(InvalidRequestError, match="no end token"):
        next_turn(tokenizer, [5], "hi")
    monkeypatch.setattr(tokenizer, "apply_chat_template", lambda *args, **kwargs: None, raising=False)
    with pytest.raises(InvalidRequestError, match="gave NoneType"):
        first_turn(tokenizer, "hi")
    # Without a template: the raw tokenizers.Tokenizer's Encoding was returned as the ids; an encode without
    # add_special_tokens raised a bare TypeError.
    raw = tokenizer._tokenizer.backend_tokenizer
    text_only = _Tokenizer(raw, lambda text: [5, 6])
    for turn in (lambda t: first_turn(t, "hi"), lambda t: next_turn(t, [5], "hi")):
        with pytest.raises(InvalidRequestError, match="gave Encoding"):
            turn(raw)
    assert first_turn(text_only, "hi") == [5, 6]
    with pytest.raises(InvalidRequestError, match="cannot take"):
        next_turn(text_only, [5], "hi")


@pytest.mark.parametrize("option", ["prefill_step_size", "prefill_batch_size", "completion_batch_size"])
@pytest.mark.parametrize("value", [0, -1, 1.5, True, "8"])
def test_batch_sizes_that_would_stall_mlx_lm_are_refused(llama32, option, value):
    """prefill_batch_size=0 admitted nothing and prefill_step_size=0 prefilled nothing: step() never returned."""
    with pytest.raises(InvalidRequestError, match=option):
        make_engine(llama32, total_blocks=8, **{option: value})


def test_an_engine_of_something_not_a_model_pool_or_spec_is_a_typed_error(llama32):
    """Each was a bare AttributeError from deep inside (the model's probe step, ``pool.spec``)."""
    model, tokenizer = llama32
    pool = BlockPool(ModelCacheSpec.from_model(model), 8)
    for args, error, what in [((None, tokenizer, pool), UnsupportedModelError, "mlx-lm model"),
                              (("model", tokenizer, pool), UnsupportedModelError, "mlx-lm model"),
                              ((model, tokenizer, None), InvalidRequestError, "pool must be a BlockPool"),
                              ((model, tokenizer, pool, "spec"), InvalidRequestError, "spec must be a ModelCacheSpec")]:
        with pytest.raises(error, match=what):
            batch_engine.BlockPoolBatchEngine(*args)
    assert whole(pool)


def test_a_prefill_chunk_larger_than_mlx_may_allocate_is_refused_at_the_door(llama32):
    """On the CPU a prefill chunk's attention scores are made whole (query heads x chunk x context): a
    100,000-token prompt prefilled in one chunk asked MLX for ~200 GiB, and its failed allocation killed the
    process (SIGSEGV). Here 40,000 tokens, ~33 GiB. The error names a prefill step that fits; with the default
    step the same prompt is taken."""
    if mx.default_device() != mx.cpu:
        pytest.skip("Metal and CUDA run attention as fused kernels: no scores made whole")
    prompt = [5 + i % 1000 for i in range(40_000)]
    whole_prompt = make_engine(llama32, total_blocks=800, prefill_step_size=10**9)
    before = whole_prompt.pool.usage()
    with pytest.raises(InvalidRequestError, match=r"40000 tokens .* prefill_step_size=\d+ or less"):
        whole_prompt.submit("a", prompt, max_tokens=1)
    assert whole_prompt.pending == 0 and whole_prompt.pool.usage() == before
    chunked = make_engine(llama32, total_blocks=800)
    chunked.cancel(chunked.submit("a", prompt, max_tokens=1))
    assert chunked.pending == 0 and whole(chunked.pool)


def test_prompts_too_large_to_prefill_together_are_prefilled_one_after_the_other(llama32):
    """mlx-lm prefills the prompts in its batch together, their scores at once: each prompt fitting alone
    did not mean that two fit. With MLX's limit set to 1.5x one prompt's chunk, the second prompt waits until
    the first has prefilled (together they peaked at 2.2x), and each gets the tokens it gets alone."""
    if mx.default_device() != mx.cpu:
        pytest.skip("Metal and CUDA run attention as fused kernels: no scores made whole")
    engine = make_engine(llama32, total_blocks=200)
    prompts = {agent: [5 + (i * k) % 900 for i in range(1500)] for agent, k in (("a", 7), ("b", 13))}
    alone = {}
    for agent, prompt in prompts.items():
        completion = engine.generate(agent, prompt, max_tokens=4)
        alone[agent] = completion.token_ids
        completion.blocks.release()
    one = adapter.prefill_chunk_bytes(llama32[0], [(0, 1500)], 2048, engine.spec.dtype_bytes)
    limit, base = mx.get_memory_limit(), mx.get_active_memory()
    mx.set_memory_limit(base + int(1.5 * one))
    try:
        mx.reset_peak_memory()
        agents = {engine.submit(agent, prompt, max_tokens=4): agent for agent, prompt in prompts.items()}
        done = {agents[c.uid]: c for c in _steps_until_idle(engine)}
        peak = mx.get_peak_memory() - base
    finally:
        mx.set_memory_limit(limit)
    assert {agent: c.token_ids for agent, c in done.items()} == alone
    assert peak < 1.5 * one, f"peak {peak / one:.2f}x one prompt's chunk"
    for completion in done.values():
        completion.blocks.release()
    assert whole(engine.pool)


# ---- generate never returns None: finding 6 ----------------------------------------------------------
def test_generate_names_the_agents_holding_the_pool_instead_of_returning_none(llama32):
    layers = ModelCacheSpec.from_model(llama32[0]).n_layers
    engine = make_engine(llama32, total_blocks=2 * layers)
    held = [engine.generate(agent, "keep me", max_tokens=3) for agent in ("alice", "bob")]
    with pytest.raises(PoolExhaustedError, match=r"agent 'alice' \d+ blocks, agent 'bob' \d+ blocks"):
        engine.generate("carol", "no room", max_tokens=3)
    assert engine.pending == 0  # cancelled, not left waiting
    held[0].blocks.release()
    assert engine.generate("carol", "no room", max_tokens=3).blocks.num_tokens > 0
    del held
    assert whole(engine.pool)


# ---- failure isolation -------------------------------------------------------------------------------
def run_batch(engine, requests):
    """Submit ``requests`` ({agent: (prompt, kwargs)}) together and step until all are done."""
    uids = {engine.submit(agent, prompt, **kwargs): agent for agent, (prompt, kwargs) in requests.items()}
    done = {}
    while engine.pending:
        for completion in engine.step():
            done[uids[completion.uid]] = completion
    return done


def flag_calls(monkeypatch, engine, method: str) -> list:
    """A list that is not empty while the engine's ``method`` runs."""
    real, inside = getattr(engine, method), []

    def flagged(*args):
        inside.append(1)
        try:
            return real(*args)
        finally:
            inside.pop()

    monkeypatch.setattr(engine, method, flagged)
    return inside


def no_room_while_seeking_company(monkeypatch, engine):
    """While the engine seeks a failing company, no prefill fits in memory: no half can be probed."""
    prefill_fits, seeking = engine._prefill_fits, flag_calls(monkeypatch, engine, "_failing_company")
    monkeypatch.setattr(engine, "_prefill_fits", lambda prefills: not seeking and prefill_fits(prefills))


def good_requests(engine):
    return {
        "alice": (STORY, dict(max_tokens=10)),
        "bob": (COUNTING, dict(max_tokens=14)),
        "carol": (engine.tokenizer.encode("red green blue " * 30), dict(max_tokens=8, repetition_penalty=1.2)),
    }


@pytest.fixture(scope="module")
def reference(engine):
    """Survivors' tokens from a run without the bad request, and the tokens they see (prompt or output)."""
    done = run_batch(engine, good_requests(engine))
    tokens = {agent: c.token_ids for agent, c in done.items()}
    seen = set().union(*(c.blocks.token_ids for c in done.values()))
    for completion in done.values():
        completion.blocks.release()
    return tokens, seen


def poison_forward(monkeypatch, model, when):
    """The model's forward pass raises for a batch that ``when(inputs)`` picks."""
    real = type(model).__call__

    def forward(self, inputs, *args, **kwargs):
        if when(np.array(inputs)):
            raise RuntimeError("injected forward-pass failure")
        return real(self, inputs, *args, **kwargs)

    monkeypatch.setattr(type(model), "__call__", forward)


def inject(stage, monkeypatch, engine, seen):
    """Make agent "mallory"'s request fail in ``stage``, triggered by a token the others never see (``seen``);
    returns its prompt and kwargs."""
    ids = engine.tokenizer.encode("once upon a time there was a tiny village " * 8)
    poison = min(set(range(4, VOCAB)) - seen)
    if stage == "admission":
        real = engine._generator.insert

        def insert(prompt_tokens, *args, **kwargs):
            if poison in prompt_tokens:
                raise RuntimeError("injected admission failure")
            return real(prompt_tokens, *args, **kwargs)

        monkeypatch.setattr(engine._generator, "insert", insert)
        return ids + [poison], {}
    if stage == "prefill":  # the shared forward pass: only re-running each request alone can tell
        poison_forward(monkeypatch, engine.model, lambda x: x.shape[1] > 1 and (x == poison).any())
        return ids[:20] + [poison] + ids[20:], {}
    if stage == "decode":  # fed back as the input of a later decoding step: a token it generates
        alone = engine.generate("alone", ids, max_tokens=12)
        trigger = next(t for t in alone.token_ids[2:] if t not in seen | set(ids))
        alone.blocks.release()
        poison_forward(monkeypatch, engine.model, lambda x: x.shape[1] == 1 and (x == trigger).any())
        return ids, {}
    if stage == "decode-sampler":  # the request's own sampler raises on its 3rd token
        real_sampler_for = adapter.sampler_for

        def sampler_for(sampling, vocab):
            sampler, calls = real_sampler_for(sampling, vocab), []
            if sampling.top_k != 7:
                return sampler

            def failing(logprobs):
                calls.append(1)
                if len(calls) == 3:
                    raise RuntimeError("injected sampler failure")
                return sampler(logprobs)

            return failing

        monkeypatch.setattr(adapter, "sampler_for", sampler_for)
        return ids, dict(temperature=0.7, top_k=7)
    if stage == "store":
        real_store = batch_engine.cache_to_blocks

        def cache_to_blocks(pool, agent_id, *args, **kwargs):
            if agent_id == "mallory":
                raise RuntimeError("injected store failure")
            return real_store(pool, agent_id, *args, **kwargs)

        monkeypatch.setattr(batch_engine, "cache_to_blocks", cache_to_blocks)
        return ids, {}
    raise AssertionError(stage)


@pytest.mark.parametrize("stage", ["admission", "prefill", "decode", "decode-sampler", "store"])
def test_a_request_failing_in_any_stage_ends_alone_and_the_others_get_their_tokens(
        engine, reference, monkeypatch, stage):
    expected, seen = reference
    free_before = engine.pool.free_blocks
    prompt, kwargs = inject(stage, monkeypatch, engine, seen)
    requests = good_requests(engine)
    requests = {"alice": requests.pop("alice"), "mallory": (prompt, dict(max_tokens=12, **kwargs)), **requests}

    done = run_batch(engine, requests)

    failed = done.pop("mallory")
    assert failed.finish_reason == "error" and isinstance(failed.error, RequestFailedError)
    assert failed.error.stage == stage.split("-")[0] and failed.error.uid == failed.uid
    assert "injected" in str(failed.error)
    with pytest.raises(RequestFailedError):
        failed.blocks
    assert all(c.error is None for c in done.values())
    if SAME_KERNELS or stage not in ("prefill", "decode"):
        assert {agent: c.token_ids for agent, c in done.items()} == expected
    else:  # the survivors are prefilled again after the failure, in another batch than the reference's:
        # other kernels on a GPU
        for agent, (prompt, kwargs) in good_requests(engine).items():
            if "repetition_penalty" not in kwargs:  # a penalised choice is not greedy on the model's logits
                context = engine.tokenizer.encode(prompt)
                assert greedy_gap(engine.model, context, done[agent].token_ids) <= LOGIT_TOLERANCE, agent
    for completion in done.values():
        completion.blocks.release()
    monkeypatch.undo()
    assert engine.pool.free_blocks == free_before and whole(engine.pool)
    assert engine.pending == 0


@pytest.mark.parametrize("seed", range(6))
def test_culprits_among_fresh_and_resumed_requests_fail_alone_and_the_others_get_what_they_get_alone(
        own_engine, monkeypatch, seed):
    """Four to seven requests, fresh and resumed, submitted at once; one to three carry a token whose prefill
    raises. The batch's forward pass fails for all, so only each request probed alone tells the culprits:
    exactly those end, in prefill, and every other gets the tokens it gets with no culprit beside it (equal
    on CPU, greedy up to rounding elsewhere). The probes run in an empty copy of the generator, here one with
    a method wrapped on the live instance: a copy that brought it along inserted into the live batch, and
    every survivor failed with the culprits."""
    engine, rng = own_engine, np.random.default_rng(seed)
    bases = [engine.generate(f"base{i}", STORY[: 40 + 60 * i], max_tokens=3).blocks for i in range(2)]
    requests = []
    for i in range(int(rng.integers(4, 8))):
        prompt = [int(t) for t in rng.integers(4, VOCAB // 2, int(rng.choice([1, 7, 60, 300])))]
        base = bases[i % 2] if rng.random() < 0.5 else None
        requests.append((f"agent{i}", prompt, base, int(rng.integers(2, 9))))
    alone = {}
    for agent, prompt, base, max_tokens in requests:
        completion = engine.generate(agent, prompt, cache=base, max_tokens=max_tokens)
        alone[agent] = completion.token_ids
        completion.blocks.release()
    seen = set().union(*(prompt for _, prompt, _, _ in requests), *alone.values(), *(b.token_ids for b in bases))
    poison = max(set(range(4, VOCAB)) - seen)
    culprits = {requests[int(i)][0] for i in rng.choice(len(requests), int(rng.integers(1, 4)), replace=False)}
    poison_forward(monkeypatch, engine.model, lambda x: (x == poison).any())  # a lone token is fed alone too
    live_insert, inserts = engine._generator.insert, []  # a user's instrumentation, on the live generator
    monkeypatch.setattr(engine._generator, "insert", lambda *a, **k: inserts.append(1) or live_insert(*a, **k))
    uids = {}
    for agent, prompt, base, max_tokens in requests:
        if agent in culprits:
            prompt = prompt[: len(prompt) // 2] + [poison] + prompt[len(prompt) // 2 :]
        uids[engine.submit(agent, prompt, cache=base, max_tokens=max_tokens)] = agent
    done = {uids[c.uid]: c for c in _steps_until_idle(engine)}
    monkeypatch.undo()
    assert sorted(done) == sorted(uids.values()) and len(inserts) >= len(requests)
    failed = {agent for agent, c in done.items() if c.error is not None}
    assert failed == culprits, f"culprits {sorted(culprits)}, failed {sorted(failed)}"
    assert all(isinstance(done[a].error, RequestFailedError) and done[a].error.stage == "prefill" for a in failed)
    for agent, completion in done.items():
        if agent in culprits:
            continue
        if SAME_KERNELS:
            assert completion.token_ids == alone[agent], agent
        else:
            context = completion.blocks.token_ids
            assert greedy_gap(engine.model, context[: len(context) - len(completion.token_ids)],
                              completion.token_ids) <= LOGIT_TOLERANCE, agent
        completion.blocks.release()
    for base in bases:
        base.release()
    del done
    assert engine.pending == 0 and whole(engine.pool)


def test_generate_raises_the_failure_of_its_own_request(engine, reference, monkeypatch):
    prompt, kwargs = inject("prefill", monkeypatch, engine, reference[1])
    with pytest.raises(RequestFailedError, match="prefill"):
        engine.generate("mallory", prompt, max_tokens=4, **kwargs)
    assert whole(engine.pool)


def test_a_transient_batch_failure_is_retried_and_costs_nobody_their_tokens(engine, reference, monkeypatch):
    """One failing step of the whole batch, which no probe repeats: the batch is retried together (not kept
    apart, which would run it one request at a time)."""
    expected, _ = reference
    failures, batch_sizes = [], []

    def fails(x):
        batch_sizes.append(x.shape[0])
        return x.shape[1] == 1 and not failures and not failures.append(len(batch_sizes))

    poison_forward(monkeypatch, engine.model, fails)
    done = run_batch(engine, good_requests(engine))
    assert len(failures) == 1
    assert {agent: c.token_ids for agent, c in done.items()} == expected
    assert max(batch_sizes[failures[0]:]) == len(expected), "the batch was not retried together"
    del done
    assert whole(engine.pool)


@pytest.mark.parametrize("room", ["enough", "none"])
def test_a_whole_batch_failing_twice_runs_as_its_two_halves(engine, reference, monkeypatch, room):
    """The batch of three fails twice and no probe fails. The first time it is retried together (transient?);
    the second, its halves are kept apart: alice from bob and carol, who were probed together and passed, so
    they still share a batch after alice (not every request kept from every other, one at a time). With no
    room to probe the halves (their prefills would not fit in memory), the same halves, unprobed."""
    expected, _ = reference
    failures, real_batches = [], []
    probing = flag_calls(monkeypatch, engine, "_fails_together")
    if room == "none":
        no_room_while_seeking_company(monkeypatch, engine)

    def when(x):
        if probing:
            return False
        real_batches.append(x.shape[0])
        if x.shape[0] == 3 and len(failures) < 2:
            failures.append(len(real_batches))
            return True
        return False

    poison_forward(monkeypatch, engine.model, when)
    uids = {engine.submit(agent, prompt, **kwargs): agent for agent, (prompt, kwargs) in good_requests(engine).items()}
    done = {uids[c.uid]: c for c in _steps_until_idle(engine)}
    assert len(failures) == 2
    assert max(real_batches[failures[1]:]) == 2, real_batches  # bob and carol together, alice before them
    assert {agent: c.token_ids for agent, c in done.items()} == expected
    for completion in done.values():
        completion.blocks.release()
    del done
    assert whole(engine.pool)


@pytest.mark.parametrize("n_requests", [3, 4])
def test_requests_that_fail_together_are_kept_apart_and_all_end_with_their_tokens(engine, n_requests, monkeypatch):
    """Any batch of two or more fails, and nobody fails alone. Three requests: halving finds a failing pair (bob
    and carol), kept apart from then on; alice then fails with bob, and with carol, and those pairs are kept
    apart too, so each runs alone (two failures each, one under the bound; before, the
    first pair was failed). Four: the first request fails with each of the others in turn and reaches the
    bound without ever running alone; it gets one run alone instead of being failed, and so does each that
    follows it there. Every request ends with the tokens it gets alone."""
    requests = {**good_requests(engine), "dave": (engine.tokenizer.encode("one two three " * 20), dict(max_tokens=6))}
    requests = dict(list(requests.items())[:n_requests])
    alone = {}
    for agent, (prompt, kwargs) in requests.items():
        completion = engine.generate(agent, prompt, **kwargs)
        alone[agent] = completion.token_ids
        completion.blocks.release()
    failed_batches = []
    poison_forward(monkeypatch, engine.model, lambda x: x.shape[0] > 1 and not failed_batches.append(x.shape[0]))
    uids = {engine.submit(agent, prompt, **kwargs): agent for agent, (prompt, kwargs) in requests.items()}
    done = {uids[c.uid]: c for c in _steps_until_idle(engine)}
    assert set(done) == set(requests)
    assert {agent: c.error for agent, c in done.items()} == dict.fromkeys(done)
    for agent, completion in done.items():
        if SAME_KERNELS:
            assert completion.token_ids == alone[agent], agent
        completion.blocks.release()
    assert len(failed_batches) >= n_requests - 1  # the poison did fire
    del done
    assert engine.pending == 0 and whole(engine.pool)


def test_a_failure_no_probe_repeats_ends_after_bounded_retries(engine, monkeypatch):
    """Every step fails, yet every probe (alone or in halves) passes: nothing tells which company fails. The
    batch is retried together once, then its halves are kept apart, and each request that reaches the bound
    runs alone once more before it is failed: all fail in the end, with nothing left held."""
    poison_forward(monkeypatch, engine.model, lambda x: True)
    monkeypatch.setattr(engine, "_fails_together", lambda requests: False)
    requests = good_requests(engine)
    uids = {engine.submit(agent, prompt, **kwargs): agent for agent, (prompt, kwargs) in requests.items()}
    done = {uids[c.uid]: c for c in _steps_until_idle(engine)}
    assert set(done) == set(requests)
    assert all(isinstance(c.error, RequestFailedError) and c.error.stage == "prefill" for c in done.values())
    monkeypatch.undo()
    del done
    assert engine.pending == 0 and whole(engine.pool)


def test_a_request_that_fails_only_in_company_takes_down_no_other(own_engine, monkeypatch):
    """Its poisoned token is fed as a lone token when it runs alone, and raises only in a padded batch (a
    stand-in for a failure that needs company, as a batch too large for the device's memory): it never fails
    alone. Halving the batch finds it and one other failing together; the two are kept apart, so the others
    run with one of them and the other runs after: every request, it too, ends with the tokens it gets alone
    (before, the whole batch failed; later, that pair did)."""
    engine, rng = own_engine, np.random.default_rng(7)
    others = {f"agent{i}": [int(t) for t in rng.integers(4, VOCAB // 2, 40 + 10 * i)] for i in range(5)}
    prompts = {**others, "mallory": None}
    alone = {}
    for agent, prompt in others.items():
        completion = engine.generate(agent, prompt, max_tokens=4)
        alone[agent] = completion.token_ids
        completion.blocks.release()
    seen = set().union(*others.values(), *alone.values())
    poison = max(set(range(4, VOCAB)) - seen)
    prompts["mallory"] = [poison, 5]
    fired = []
    poison_forward(monkeypatch, engine.model,
                   lambda x: x.shape[1] > 1 and bool((x == poison).any()) and not fired.append(1))
    completion = engine.generate("mallory", prompts["mallory"], max_tokens=4)
    alone["mallory"] = completion.token_ids
    completion.blocks.release()
    assert not fired  # alone it passes
    uids = {engine.submit(agent, prompt, max_tokens=4): agent for agent, prompt in prompts.items()}
    done = {uids[c.uid]: c for c in _steps_until_idle(engine)}
    monkeypatch.undo()
    assert fired  # in company it failed
    assert {agent: c.error for agent, c in done.items()} == dict.fromkeys(prompts)
    for agent, completion in done.items():
        if SAME_KERNELS:
            assert completion.token_ids == alone[agent], agent
        completion.blocks.release()
    del done
    assert engine.pending == 0 and whole(engine.pool)


def test_an_interrupt_while_finished_requests_are_stored_leaves_the_engine_whole(engine, reference, monkeypatch):
    """Ctrl-C inside the store of the first of two requests finishing in one step: that one ends with an
    error, the other still gets its tokens, nothing stays reserved, and step() returns (it looped forever
    over requests mlx-lm had already dropped, and cancel() raised ValueError)."""
    expected, _ = reference
    real_store, stores = batch_engine.cache_to_blocks, []

    def interrupted(*args, **kwargs):
        stores.append(1)
        if len(stores) == 1:
            raise KeyboardInterrupt
        return real_store(*args, **kwargs)

    monkeypatch.setattr(batch_engine, "cache_to_blocks", interrupted)
    requests = dict(list(good_requests(engine).items())[:2])  # both finish in the same step
    uids = {engine.submit(agent, prompt, max_tokens=10): agent for agent, (prompt, _) in requests.items()}
    done = []
    with pytest.raises(KeyboardInterrupt):
        while True:
            done += engine.step_once()
    done += list(engine.step())
    assert sorted(uids) == sorted(c.uid for c in done) and engine.pending == 0
    failed = [c for c in done if c.error is not None]
    assert len(failed) == 1 and failed[0].error.stage == "store"
    (survivor,) = [c for c in done if c.error is None]
    assert survivor.token_ids == expected[uids[survivor.uid]][:10]
    survivor.blocks.release()
    del done, survivor
    assert whole(engine.pool)


def test_a_tokenizer_failing_on_one_finished_request_fails_only_that_one(engine, reference, monkeypatch):
    expected, _ = reference
    real_decode, victims = engine.tokenizer.decode, []

    def decode(ids, *args, **kwargs):
        if victims and ids is victims[0].generated:  # the engine decodes the request's own token list
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")
        return real_decode(ids, *args, **kwargs)

    # mlx-lm's TokenizerWrapper hands decode to the tokenizer it wraps: patch that one
    monkeypatch.setattr(getattr(engine.tokenizer, "_tokenizer", engine.tokenizer), "decode", decode)
    requests = dict(list(good_requests(engine).items())[:2])
    uids = {engine.submit(agent, prompt, max_tokens=10): agent for agent, (prompt, _) in requests.items()}
    victims.append(engine._by_uid[min(uids)])
    done = {c.uid: c for c in engine.step()}
    assert sorted(done) == sorted(uids) and engine.pending == 0
    assert done[min(uids)].error.stage == "store" and "injected" in str(done[min(uids)].error)
    survivor = done[max(uids)]
    assert survivor.error is None and survivor.token_ids == expected[uids[max(uids)]][:10]
    survivor.blocks.release()
    del done, survivor, victims[:]
    assert whole(engine.pool)


# ---- interrupts (Ctrl-C) anywhere in a step, and leaving a step loop early --------------------------------
def test_an_interrupt_while_a_resumed_request_is_admitted_ends_that_request(engine, reference):
    """Ctrl-C while the cache of a resumed request is rebuilt: the request ends with an error completion and
    gives back its reservation and its source. Before, it stayed in flight, in no queue: step() never ended
    it, cancel() raised ValueError, and its blocks were held for good."""
    base = engine.generate("a", STORY, max_tokens=2)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(batch_engine, "blocks_to_cache", lambda *args, **kwargs: _raise(KeyboardInterrupt()))
        with pytest.raises(KeyboardInterrupt):
            engine.submit("a", " more", cache=base.blocks, max_tokens=3)
    (failed,) = engine.step()
    assert failed.error.stage == "admission" and engine.pending == 0
    base.blocks.release()
    del base
    assert whole(engine.pool)
    assert engine.generate("b", STORY, max_tokens=10).token_ids == reference[0]["alice"]


def step_until_interrupted(engine, monkeypatch, when):
    """The good requests, submitted with the forward pass poisoned by ``when`` and stepped until Ctrl-C comes
    out of a step; returns (agent by uid, completions by uid so far, the names of the interrupt's frames)."""
    poison_forward(monkeypatch, engine.model, when)
    uids = {engine.submit(agent, prompt, **kwargs): agent for agent, (prompt, kwargs) in good_requests(engine).items()}
    done = {}
    with pytest.raises(KeyboardInterrupt) as interrupt:
        while engine.pending:
            done.update((c.uid, c) for c in engine.step())
    return uids, done, {entry.name for entry in interrupt.traceback}


def test_an_interrupt_while_the_engine_recovers_from_a_failed_step_loses_nobody(engine, reference, monkeypatch):
    """A batched decoding step fails (nobody named), then Ctrl-C arrives while a suspect is re-run alone.
    Before, every running request was lost: pending for ever, its blocks reserved, cancel() a KeyError."""
    expected, _ = reference
    calls = []

    def when(inputs):
        calls.append(inputs.shape)
        if len(calls) > 1 and calls[-2] == "failed":
            raise KeyboardInterrupt
        if inputs.shape[0] > 1 and inputs.shape[1] == 1 and "failed" not in calls:
            calls.append("failed")
            return True
        return False

    uids, done, frames = step_until_interrupted(engine, monkeypatch, when)
    assert "_culprits_alone" in frames
    done.update((c.uid, c) for c in engine.step())
    assert engine.pending == 0
    assert {uids[uid]: c.token_ids for uid, c in done.items()} == expected
    del done
    assert whole(engine.pool)


def test_an_interrupt_while_halves_of_a_failed_batch_are_probed_loses_nobody(engine, reference, monkeypatch):
    """A batched decoding step fails once, so nobody fails alone and halves of the batch are probed together
    for a failing company; Ctrl-C arrives in that probe. Every request still ends with its own tokens, and
    the pool is whole."""
    expected, _ = reference
    calls = []

    def when(inputs):
        if "failed" not in calls:
            if inputs.shape[0] > 1 and inputs.shape[1] == 1:
                calls.append("failed")
                return True
        elif "interrupted" not in calls:
            if inputs.shape[0] > 1:  # the first batch after the failure: the alone probes all run one request
                calls.append("interrupted")
                raise KeyboardInterrupt
            calls.append("alone")
        return False

    uids, done, frames = step_until_interrupted(engine, monkeypatch, when)
    assert len(uids) > 2, "a batch is halved only when it holds more than two suspects"
    assert "_failing_company" in frames and calls.count("alone") >= len(uids)  # in a halves' probe, after all alone
    while engine.pending:
        done.update((c.uid, c) for c in engine.step())
    assert {uids[uid]: c.token_ids for uid, c in done.items()} == expected
    del done
    assert whole(engine.pool)


@pytest.mark.parametrize("room", ["enough", "none"])
def test_halves_are_probed_only_where_they_can_tell_something(engine, reference, monkeypatch, room):
    """A batched decoding step fails once, so none of the three requests fails alone. Seeking the failing
    company probes the half of two, not the half of one, which just passed alone. Where a half's prefill would
    not fit in memory (no room while the company is sought), no half is probed: the whole batch counts, as
    for a transient failure. Either way everyone ends with its own tokens."""
    expected, _ = reference
    failed, probes = [], []

    def when(inputs):
        if not failed and inputs.shape[0] > 1 and inputs.shape[1] == 1:
            failed.append(1)
            return True
        return False

    poison_forward(monkeypatch, engine.model, when)
    fails_together = engine._fails_together
    monkeypatch.setattr(engine, "_fails_together", lambda requests: probes.append(len(requests)) or
                        fails_together(requests))
    if room == "none":
        no_room_while_seeking_company(monkeypatch, engine)
    done = run_batch(engine, good_requests(engine))
    assert failed and probes == ([1, 1, 1, 2] if room == "enough" else [1, 1, 1])
    assert {agent: c.token_ids for agent, c in done.items()} == expected
    for completion in done.values():
        completion.blocks.release()
    del done
    assert whole(engine.pool)


def test_an_interrupt_as_a_steps_tokens_arrive_restarts_the_requests_once(engine, reference, monkeypatch):
    """Ctrl-C just after mlx-lm returned a step's tokens. Before, mlx-lm kept running the old sequences beside
    their restarts, and every later step raised KeyError for them."""
    expected, _ = reference
    real_event, events = adapter.GenerationEvent, []

    def event(*args):
        events.append(1)
        if len(events) == 3:
            raise KeyboardInterrupt
        return real_event(*args)

    monkeypatch.setattr(adapter, "GenerationEvent", event)
    requests = dict(list(good_requests(engine).items())[:2])
    uids = {engine.submit(agent, prompt, **kwargs): agent for agent, (prompt, kwargs) in requests.items()}
    done, raised = {}, []
    while engine.pending and len(raised) < 5:
        try:
            done.update((c.uid, c) for c in engine.step())
        except BaseException as exc:
            raised.append(type(exc).__name__)
    assert raised == ["KeyboardInterrupt"]
    assert {uids[uid]: c.token_ids for uid, c in done.items()} == {agent: expected[agent] for agent in requests}
    del done
    assert whole(engine.pool)


def test_completions_a_step_loop_left_untaken_come_with_the_next_step(engine, reference):
    """Two requests finish in one step; the loop takes the first and breaks. Before, the second was gone
    (not pending, not in flight, its tokens lost)."""
    requests = dict(list(good_requests(engine).items())[:2])  # both finish in the same step
    uids = [engine.submit(agent, prompt, max_tokens=10) for agent, (prompt, _) in requests.items()]
    for first in engine.step():
        break
    assert engine.pending == 1
    (second,) = engine.step()
    assert sorted([first.uid, second.uid]) == uids and second.error is None
    first.blocks.release()
    second.blocks.release()
    del first, second
    assert whole(engine.pool)


def test_an_interrupt_while_a_failed_request_is_decoded_still_ends_it(engine, monkeypatch):
    real_insert = engine._generator.insert
    monkeypatch.setattr(engine._generator, "insert", lambda *args, **kwargs: _raise(RuntimeError("injected")))
    monkeypatch.setattr(getattr(engine.tokenizer, "_tokenizer", engine.tokenizer), "decode",
                        lambda *args, **kwargs: _raise(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        engine.submit("mallory", STORY, max_tokens=3)
    monkeypatch.setattr(engine._generator, "insert", real_insert)
    (failed,) = engine.step()
    assert failed.error.stage == "admission" and "injected" in str(failed.error) and engine.pending == 0
    assert whole(engine.pool)


def test_match_prefix_that_reuses_nothing_does_not_count_the_cache_against_the_pool(llama32):
    """The request keeps no source when nothing is reused. Before, the cache's blocks were counted as pinned
    and a prompt that fits the pool was refused as one that "can never fit"."""
    spec = ModelCacheSpec.from_model(llama32[0])
    cached, fresh = list(range(10, 310)), list(range(1000, 1700))
    small = make_engine(llama32, total_blocks=spec.blocks_per_agent(302) + spec.blocks_per_agent(704) - 1)
    cache = small.generate("a", cached, max_tokens=2).blocks
    small.submit("b", fresh, cache=cache, match_prefix=True, max_tokens=4)  # waits until the cache is released
    with pytest.raises(PoolExhaustedError, match="more than this pool could ever give.*can never fit"):
        small.submit("b", fresh + fresh, max_tokens=4)
    cache.release()
    (done,) = small.step()
    assert done.error is None and done.reused_tokens == 0 and len(done.token_ids) == 4
    done.blocks.release()
    del done
    assert whole(small.pool)


def test_a_temperature_too_small_to_sample_with_is_greedy(engine, reference):
    """mlx-lm scales the logits by 1/temperature: at 1e-45 that overflowed and the tokens were uniformly random."""
    for temperature in (1e-45, 5e-324):
        done = engine.generate("alice", STORY, max_tokens=10, temperature=temperature)
        assert done.token_ids == reference[0]["alice"]
        done.blocks.release()


def test_a_generate_inside_a_step_loop_leaves_the_loops_completions_to_it(engine):
    """Two requests finish in one step; the loop body runs a follow-up generate(). Before, that generate
    consumed the second completion (it was left in the engine's queue of completions) and dropped it."""
    requests = dict(list(good_requests(engine).items())[:2])  # both finish in the same step
    uids = [engine.submit(agent, prompt, max_tokens=10) for agent, (prompt, _) in requests.items()]
    seen = []
    for completion in engine.step():
        seen.append(completion)
        engine.generate("zed", "hello there", max_tokens=2).blocks.release()
    assert sorted(c.uid for c in seen) == uids and engine.pending == 0
    for completion in seen:
        completion.blocks.release()
    del seen, completion
    assert whole(engine.pool)


def test_a_restarted_request_keeps_its_reservation(engine, reference, monkeypatch):
    """After a transient failure the running requests restart. Before, each gave its reservation back and
    took it again, so another thread reserving in between left it with no blocks: cancelled, though running."""
    expected, _ = reference
    failures, stolen = [], []
    poison_forward(monkeypatch, engine.model,
                   lambda x: x.shape[1] == 1 and not failures and not failures.append(1))
    real_cancel = type(engine.pool)._cancel_reservation

    def cancel_then_another_thread_reserves(pool, reservation):
        real_cancel(pool, reservation)
        if failures and not stolen and pool.available_blocks:
            stolen.append(pool.reserve(pool.available_blocks, "another thread"))

    monkeypatch.setattr(type(engine.pool), "_cancel_reservation", cancel_then_another_thread_reserves)
    done = engine.generate("alice", STORY, max_tokens=10)
    assert failures and done.token_ids == expected["alice"]
    done.blocks.release()
    for reservation in stolen:
        reservation.cancel()
    del done
    assert whole(engine.pool)


def test_a_sequence_mlx_lm_queued_before_an_interrupt_is_stopped(engine, monkeypatch):
    """Ctrl-C inside the generator's insert, after mlx-lm queued the sequence: the request ends with an error,
    and mlx-lm stops running the orphan. Before, it ran to max_tokens beside everything else."""
    mlx_lm_generator = engine._generator._gen
    real_insert = mlx_lm_generator.insert

    def insert_then_interrupt(*args, **kwargs):
        real_insert(*args, **kwargs)
        monkeypatch.setattr(mlx_lm_generator, "insert", real_insert)
        raise KeyboardInterrupt

    monkeypatch.setattr(mlx_lm_generator, "insert", insert_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        engine.submit("mallory", STORY, max_tokens=40)
    real_next, orphan_events = engine._generator.next, []

    def next_counting_orphans():
        events = real_next()
        orphan_events.extend(e for e in events if e.uid not in engine._running)
        return events

    monkeypatch.setattr(engine._generator, "next", next_counting_orphans)
    (failed,) = engine.step()
    assert failed.error.stage == "admission"
    engine.generate("alice", STORY, max_tokens=10).blocks.release()
    assert len(orphan_events) <= 1
    assert whole(engine.pool)


def test_an_interrupt_while_a_culprit_is_failed_loses_nobody_else(engine, reference, monkeypatch):
    expected, seen = reference
    poison = min(set(range(4, VOCAB)) - seen)
    poison_forward(monkeypatch, engine.model, lambda x: (x == poison).any())
    inner = getattr(engine.tokenizer, "_tokenizer", engine.tokenizer)
    real_decode = inner.decode

    def decode_interrupted_once(*args, **kwargs):
        monkeypatch.setattr(inner, "decode", real_decode)
        raise KeyboardInterrupt

    requests = dict(list(good_requests(engine).items())[:2])
    uids = {engine.submit(agent, prompt, max_tokens=10): agent for agent, (prompt, _) in requests.items()}
    uids[engine.submit("mallory", [5, 6, poison, 7], max_tokens=5)] = "mallory"
    monkeypatch.setattr(inner, "decode", decode_interrupted_once)
    done = {}
    with pytest.raises(KeyboardInterrupt):
        for completion in engine.step():
            done[uids[completion.uid]] = completion
    done.update((uids[c.uid], c) for c in engine.step())
    assert done.pop("mallory").error is not None and engine.pending == 0
    assert {agent: c.token_ids for agent, c in done.items()} == {agent: expected[agent][:10] for agent in requests}
    del done
    assert whole(engine.pool)


def test_tiny_temperatures_and_small_repetition_penalties_behave_in_float16_as_in_float32():
    """mlx-lm scales float16 logits by 1/temperature, and divides them by the repetition penalty, in float16:
    from ~1e-5 down that overflowed (inf, then NaN), and tokens came at random."""
    from semantic.testing.local_models import load_local_model

    half = make_engine(load_local_model("tiny-llama", dtype="float16"), total_blocks=64)
    greedy = half.generate("a", STORY, max_tokens=10)
    for temperature in (1e-5, 1e-8, 1e-20):
        sampled = half.generate("a", STORY, max_tokens=10, temperature=temperature)
        assert sampled.token_ids == greedy.token_ids
        sampled.blocks.release()
    full = make_engine(load_local_model("tiny-llama", dtype="float32"), total_blocks=64)
    for penalty in (1e-3, 1e-5, 1e-30):  # the same weights, rounded: the same tokens in either dtype
        penalized = [engine.generate("a", STORY, max_tokens=10, repetition_penalty=penalty) for engine in (half, full)]
        assert penalized[0].token_ids == penalized[1].token_ids != greedy.token_ids


def test_a_neighbours_repetition_penalty_leaves_a_bfloat16_requests_tokens_as_they_were_alone():
    """The penalty runs on float32 logits; its row came back float32, and mlx-lm's concatenation of the batch's
    rows made every neighbour's log-softmax float32: bfloat16 near-ties resolved otherwise (3 of 3 prompts)."""
    from semantic.testing.local_models import load_local_model

    engine = make_engine(load_local_model("tiny-llama", dtype="bfloat16"), total_blocks=64)
    rng = np.random.default_rng(1)
    for _ in range(3):
        prompt, neighbour = rng.integers(4, VOCAB, 513).tolist(), rng.integers(4, VOCAB, 2).tolist()
        alone = engine.generate("a", prompt, max_tokens=30)
        done = run_batch(engine, {"a": (prompt, dict(max_tokens=30)),
                                  "b": (neighbour, dict(max_tokens=30, repetition_penalty=1.3))})
        assert done["a"].token_ids == alone.token_ids
        for completion in (alone, *done.values()):
            completion.blocks.release()
    assert whole(engine.pool)


def _raise(exc):
    raise exc


# ---- fuzz --------------------------------------------------------------------------------------------
TEXTS = st.text(max_size=40)
IDS = st.lists(st.integers(-5, VOCAB + 5) | st.sampled_from([2**31, 2**64, True]), max_size=30)
ARRAYS = st.builds(np.array, st.lists(st.integers(0, VOCAB + 3), max_size=20)) | st.builds(
    mx.array, st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=20))
PROMPTS = TEXTS | IDS | ARRAYS | st.sampled_from([b"abc", None, 3, [1.5], [[1]]])
NUMBERS = st.floats(allow_nan=True, allow_infinity=True) | st.integers(-3, VOCAB + 3) | st.sampled_from(
    ["x", None, True, 2**70])
SUBMIT = st.fixed_dictionaries({}, optional={
    "max_tokens": st.integers(-1, 5) | st.sampled_from([True, 2.0, "2"]),
    "temperature": NUMBERS, "top_p": NUMBERS, "top_k": NUMBERS, "min_p": NUMBERS,
    "repetition_penalty": NUMBERS, "match_prefix": st.booleans(), "use_cache": st.booleans(),
})
OPERATIONS = st.lists(
    st.tuples(st.just("submit"), PROMPTS, SUBMIT)
    | st.tuples(st.sampled_from(["step_once", "step_once", "cancel", "extract"]), st.integers(-1, 40)
                | st.sampled_from(["x", None, 1.5, [1]]), st.none()),
    min_size=1, max_size=12,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(operations=OPERATIONS)
def test_fuzzing_the_engine_gives_only_typed_errors_and_leaves_the_pool_whole(engine, operations):
    handles, uids = [], []
    for op, arg, options in operations:
        try:
            if op == "submit":
                options = dict(options)
                options.setdefault("max_tokens", 3)
                cache = handles[-1] if options.pop("use_cache", False) and handles else None
                uids.append(engine.submit("fuzz", arg, cache=cache, **options))
            elif op == "step_once":
                for completion in engine.step_once():
                    assert completion.error is None or isinstance(completion.error, RequestFailedError)
                    if completion.error is None:
                        assert all(0 <= t < VOCAB for t in completion.token_ids)
                        handles.append(completion.blocks)
            elif op == "cancel":
                engine.cancel(uids[arg % len(uids)] if uids and isinstance(arg, int) else arg)
            else:
                handles.append(engine._extract_cache(uids[arg % len(uids)] if uids and isinstance(arg, int) else arg))
        except SemanticError:
            pass
        engine.pool.check_invariants()
    for uid in uids:
        try:
            engine.cancel(uid)
        except SemanticError:
            pass
    engine.step_once()  # returns failures queued by the cancelled requests' admission
    assert engine.pending == 0
    for handle in handles:
        handle.release()
    assert whole(engine.pool)


def test_a_context_computed_by_another_model_on_the_same_pool_is_refused(llama32, tmp_path):
    """Two models of one geometry (tiny-llama of two seeds) may share a pool; one's keys and values mean
    nothing to the other, whose engine continued them silently before. Through a store fingerprinted for
    the model, in memory or on disk, a context still moves between two objects of the same model."""
    from semantic.persistence import AgentCacheStore, model_fingerprint
    from semantic.testing.local_models import load_local_model

    other_model = load_local_model("tiny-llama", dtype="float32", seed=1)
    first = make_engine(llama32, total_blocks=64)
    second = batch_engine.BlockPoolBatchEngine(*other_model, first.pool)
    context = first.generate("a", STORY, max_tokens=2).blocks
    before = first.pool.usage()
    for cache in (context, context.share()):  # shares keep where they came from
        with pytest.raises(IncompatibleCacheError, match="computed by another model"):
            second.submit("a", " and then", cache=cache, max_tokens=2)
    gc.collect()
    assert second.pending == 0 and first.pool.usage() == before
    assert first.generate("a", " and then", cache=context, max_tokens=2).token_ids  # its own engine goes on
    reloaded = own_tiny_llama()  # the same weights, a new object
    assert reloaded[0] is not llama32[0]
    same_weights = batch_engine.BlockPoolBatchEngine(*reloaded, first.pool)
    expected = first.generate("a", " and then", cache=context, max_tokens=2).token_ids
    store = AgentCacheStore(tmp_path, first.pool, model_fingerprint(*llama32))
    store.put(context.share())
    for tier in ("memory", "disk"):
        with store.get("a") as resumed:
            assert same_weights.generate("a", " and then", cache=resumed, max_tokens=2).token_ids == expected, tier
        store.evict("a")
    # The store vouches for its own model only: another model's engine continued its contexts silently, and
    # store.generate then kept that model's keys and values under this model's fingerprint.
    with pytest.raises(IncompatibleCacheError, match="fingerprinted for another model"):  # read from disk
        with store.get("a") as resumed:
            second.submit("a", " and then", cache=resumed, max_tokens=2)
    gc.collect()
    before = first.pool.usage()  # "a" resident again
    for take in (lambda: store.load("a"), lambda: store.get("a")):  # the file, the memory tier
        with take() as resumed, pytest.raises(IncompatibleCacheError, match="fingerprinted for another model"):
            second.submit("a", " and then", cache=resumed, max_tokens=2)
    with pytest.raises(IncompatibleCacheError, match="fingerprinted for another model"):
        store.generate(second, "a", " and then", max_tokens=2)
    gc.collect()
    assert second.pending == 0 and "a" in store.resident and first.pool.usage() == before


def _interrupted_once_after(real):
    """``real``, interrupted (KeyboardInterrupt) once right after its first call did its work."""
    calls = []

    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        if not calls:
            calls.append(1)
            raise KeyboardInterrupt
        return result
    return wrapper


def _interrupted_once_before(real):
    """``real``, interrupted once as its first call begins (a Ctrl-C handled at its first line)."""
    calls = []

    def wrapper(*args, **kwargs):
        if not calls:
            calls.append(1)
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    return wrapper


@pytest.fixture
def own_engine(llama32):
    """An engine of its own: a test that breaks it (a request no step can end) must not hang the others."""
    return make_engine(llama32, total_blocks=64)


def _steps_until_idle(engine, limit=200, where=""):
    completions = []
    for _ in range(limit):
        if not engine.pending:
            return completions
        completions += engine.step_once()
    raise AssertionError(f"{where}{': ' if where else ''}{engine.pending} request(s) still pending after {limit} "
                         "steps: the engine would hang")


def _the_story_completes_and_gives_back_everything(engine, reference):
    """The one request in flight (STORY, 10 tokens) runs to its reference tokens, and once its blocks are
    released the pool holds nothing."""
    (completion,) = _steps_until_idle(engine)
    assert completion.token_ids == reference[0]["alice"]
    completion.blocks.release()
    del completion
    assert whole(engine.pool)


def test_an_interrupt_in_cancel_after_mlx_lm_dropped_the_sequence_ends_the_request(own_engine, reference,
                                                                                     monkeypatch):
    """The request stayed among the running ones with no sequence behind it: every later step() and
    generate() looped forever, and its reservation stayed taken."""
    engine = own_engine
    uid = engine.submit("a", STORY, max_tokens=20)
    engine.step_once()
    monkeypatch.setattr(adapter.Generator, "remove", _interrupted_once_after(adapter.Generator.remove))
    with pytest.raises(KeyboardInterrupt):
        engine.cancel(uid)
    assert engine.pending == 0 and whole(engine.pool)
    with pytest.raises(UnknownRequestError):
        engine.cancel(uid)
    engine.submit("b", STORY, max_tokens=10)
    _the_story_completes_and_gives_back_everything(engine, reference)


@pytest.mark.parametrize("where", ["cancel", "finish"])
def test_an_interrupt_as_a_request_gives_back_its_reservation_still_gives_back_everything(own_engine, monkeypatch,
                                                                                          where):
    """A Ctrl-C at the start of the reservation's cancel left a request known but in no queue (pending
    forever, a raw KeyError from cancel and close), its reservation and source taken, and on the finishing
    path its completion lost."""
    from semantic.domain.services import Reservation

    engine = own_engine
    uid, base, completions = _a_resumed_request_ended_through(
        engine, where, lambda: monkeypatch.setattr(Reservation, "cancel", _interrupted_once_before(Reservation.cancel)))
    assert [c.uid for c in completions] == ([] if where == "cancel" else [uid])  # delivered after the interrupt
    with pytest.raises(UnknownRequestError):
        engine.cancel(uid)
    engine.close()
    base.blocks.release()
    del base, completions
    assert whole(engine.pool)


def _a_resumed_request_ended_through(engine, where, interrupt):
    """A request resumed from stored blocks, stepped once, then ``interrupt()`` (setting up a KeyboardInterrupt)
    and the request cancelled or stepped to its end, which the interrupt cuts short; then the steps the caller
    makes next. ``(uid, the stored blocks' completion, the completions of those next steps)``."""
    base = engine.generate("a", STORY, max_tokens=2)
    uid = engine.submit("a", " more", cache=base.blocks, max_tokens=3)
    engine.step_once()
    interrupt()
    with pytest.raises(KeyboardInterrupt):
        if where == "cancel":
            engine.cancel(uid)
        else:
            _steps_until_idle(engine)
    return uid, base, _steps_until_idle(engine)


@pytest.mark.parametrize("where", ["cancel", "finish"])
def test_a_request_an_interrupt_left_in_no_queue_ends_at_the_next_step(own_engine, where):
    """Ctrl-C at the start of the call retiring a request (found once the interrupt sweep tried functions'
    starts): the request stayed known in no queue, pending forever, holding its reservation and its source."""
    engine = own_engine
    uid, base, completions = _a_resumed_request_ended_through(
        engine, where, lambda: setattr(engine, "_retire", _interrupted_once_before(engine._retire)))
    assert [c.uid for c in completions] == [uid]
    if where == "finish":  # its completion was out before the interrupt: not a second one
        assert completions[0].error is None and len(completions[0].token_ids) == 3
        completions[0].blocks.release()
    else:
        assert completions[0].error.stage == "an interrupted step"
    with pytest.raises(UnknownRequestError):
        engine.cancel(uid)
    base.blocks.release()
    del base, completions
    assert whole(engine.pool)


@pytest.mark.parametrize("interrupted", [_interrupted_once_before, _interrupted_once_after])
def test_an_interrupt_as_a_request_is_started_leaves_it_to_run_or_end(own_engine, reference, interrupted):
    """Ctrl-C as _start began, after admission took the request out of the queue with its reservation and before
    _start's own handler: the request stayed in flight, in no queue, holding its blocks; no step ran or ended it."""
    own_engine._start = interrupted(own_engine._start)
    with pytest.raises(KeyboardInterrupt):
        own_engine.submit("b", STORY, max_tokens=10)
    _the_story_completes_and_gives_back_everything(own_engine, reference)


class _QueueInterruptedOnce(collections.deque):
    """The engine's waiting queue, its first append interrupted (KeyboardInterrupt) before or after it
    queued the item: a real Ctrl-C is raised once the append returned; the other order stands for any
    failure before the request was queued."""
    def __init__(self, queued: bool):
        super().__init__()
        self.queued, self.interrupted = queued, False

    def append(self, item):
        if self.interrupted:
            return super().append(item)
        self.interrupted = True
        if self.queued:
            super().append(item)
        raise KeyboardInterrupt


@pytest.mark.parametrize("queued", [False, True])
def test_an_interrupt_as_a_request_is_queued_leaves_it_to_run_or_nothing_known_or_pinned(own_engine, queued):
    """Ctrl-C after submit registered the request: not yet queued, it stayed known, in no queue, pending
    forever, and the share of its cache pinned that cache's blocks; queued, it must run as any request."""
    engine = own_engine
    base = engine.generate("a", STORY, max_tokens=2)

    def references():
        return [engine.pool.refcount(b) for ids in base.blocks.all_block_ids for b in ids]

    before = references()
    engine._waiting = _QueueInterruptedOnce(queued)
    with pytest.raises(KeyboardInterrupt) as interrupt:  # its traceback keeps submit's frame, and its locals
        engine.submit("a", " more", cache=base.blocks, max_tokens=3)
    if queued:
        (completion,) = _steps_until_idle(engine)
        assert completion.uid == base.uid + 1 and completion.error is None and len(completion.token_ids) == 3
        completion.blocks.release()
        del completion
    else:
        assert engine.pending == 0 and references() == before
        with pytest.raises(UnknownRequestError):
            engine.cancel(base.uid + 1)  # the uid the interrupted submit drew
    del interrupt
    base.blocks.release()
    del base
    assert whole(engine.pool)


def test_an_error_completion_does_not_keep_alive_what_the_failed_store_held(own_engine, monkeypatch):
    """The error's cause kept its traceback's frames, and with them the store's new handle: its blocks stayed
    taken for as long as the caller kept the completion."""
    engine = own_engine
    monkeypatch.setattr(batch_engine, "cache_to_blocks", _interrupted_once_after(batch_engine.cache_to_blocks))
    engine.submit("a", STORY, max_tokens=2)
    with pytest.raises(KeyboardInterrupt):
        _steps_until_idle(engine)
    (failed,) = _steps_until_idle(engine) or engine.step_once()
    assert failed.error.stage == "store"
    assert whole(engine.pool)  # the completion is alive
    assert "cache_to_blocks" in "".join(__import__("traceback").format_exception(failed.error.__cause__))


def test_an_error_completion_keeps_no_frame_of_the_caller_an_interrupt_cut_short(own_engine, monkeypatch):
    """A store interrupted inside a caller's step loop: the interrupt's traceback, kept as the error's cause,
    held the loop's frames and through them what the loop had collected (another request's completion and
    its blocks) for as long as the error completion lived."""
    engine = own_engine
    monkeypatch.setattr(batch_engine, "cache_to_blocks", _interrupted_once_after(batch_engine.cache_to_blocks))
    engine.submit("a", STORY, max_tokens=2)
    kept = []

    class Collected:
        pass

    def caller_loop():
        collected = Collected()  # what the loop holds when the interrupt comes
        kept.append(weakref.ref(collected))
        _steps_until_idle(engine)

    with pytest.raises(KeyboardInterrupt):
        caller_loop()
    (failed,) = _steps_until_idle(engine) or engine.step_once()
    gc.collect()
    assert failed.error.stage == "store" and kept[0]() is None
    assert "cache_to_blocks" in failed.error.cause_traceback


@pytest.mark.parametrize("interrupted", ["Completion", "RequestFailedError"])
def test_an_interrupt_while_a_completion_is_made_still_ends_the_request(own_engine, monkeypatch, interrupted):
    """Made before the request was retired, an interrupted completion left it pending forever, holding its
    reservation and source. Now only the completion is lost."""
    engine = own_engine
    base = engine.generate("a", STORY, max_tokens=2)
    uid = engine.submit("a", " more", cache=base.blocks, max_tokens=3)
    if interrupted == "RequestFailedError":  # the store fails, so the request ends with an error completion
        monkeypatch.setattr(batch_engine, "cache_to_blocks", lambda *args, **kwargs: _raise(OSError("disk")))
    monkeypatch.setattr(batch_engine, interrupted, _interrupted_once_before(getattr(batch_engine, interrupted)))
    with pytest.raises(KeyboardInterrupt):
        _steps_until_idle(engine)
    assert engine.pending == 0
    with pytest.raises(UnknownRequestError):
        engine.cancel(uid)
    base.blocks.release()
    del base
    assert whole(engine.pool)


# ---- threads, engines sharing a pool, requests waiting for blocks ------------------------------------
def on_a_thread_of_its_own(work):
    """``work`` for a thread that ends after it: MLX's streams of a thread that ran mlx-lm must be cleared
    before it ends, and on CUDA not while another thread evaluates (see README, "Threads")."""
    def run(*args):
        try:
            work(*args)
        finally:
            mlx_threads.end_thread()
    return run


def test_a_generate_inside_a_step_loop_leaves_the_completions_of_requests_still_running_to_it(engine):
    """Bob finishes while the loop body's generate() runs: before, that generate dropped his completion,
    and the loop never saw it (no error, pending 0)."""
    uids = {engine.submit("alice", STORY, max_tokens=2): "alice", engine.submit("bob", COUNTING, max_tokens=12): "bob"}
    seen = []
    for completion in engine.step():
        seen.append(completion)
        if completion.agent_id == "alice":
            engine.generate("zed", "hello there", max_tokens=2).blocks.release()
    assert sorted(c.uid for c in seen) == sorted(uids) and engine.pending == 0
    del seen, completion
    assert whole(engine.pool)


def test_while_nothing_runs_a_request_that_does_not_fit_lets_smaller_ones_behind_it_go_first(own_engine):
    """A request waiting for blocks the caller's handles hold stalled every request behind it, and
    generate() of a small one raised "N blocks requested, M free" with M > N."""
    engine = own_engine
    kept = engine.generate("keep", STORY, max_tokens=2)
    layers = engine.spec.n_layers
    big_tokens = engine.pool.total_blocks // layers * engine.spec.block_size - 8  # fits the pool, not beside kept
    big = engine.submit("big", [5] * big_tokens, max_tokens=4)
    small = engine.generate("small", "hi there", max_tokens=2)
    assert len(small.token_ids) == 2 and engine.pending == 1
    with pytest.warns(batch_engine.PoolPressureWarning, match="held by handles you keep: agent 'keep'"):
        assert list(engine.step()) == []
    engine.cancel(big)
    for completion in (kept, small):
        completion.blocks.release()
    assert whole(engine.pool)


def wait_until_a_thread_waits_to_end():
    """Until an end_thread() waits for the device work to stop (read from the lock: a sleep could be too short
    on a loaded machine, and the test would then check nothing)."""
    deadline = time.monotonic() + 30
    while not mlx_threads._streams_in_use._exclusive_waiting:
        assert time.monotonic() < deadline, "end_thread() never started waiting"
        time.sleep(0.005)


def test_a_thread_ends_only_once_no_engine_step_runs_on_another_thread(engine):
    """On CUDA a thread clearing its streams while another thread's engine evaluated aborted the process (MLX
    0.32.4: the evaluating thread's CUDA graph capture was invalidated). end_thread() waits for a step running
    on another thread, and a step that starts meanwhile waits behind it."""
    in_step, go_on = threading.Event(), threading.Event()
    real_next = engine._generator.next

    def held_next():  # the engine's step, held inside its device work
        in_step.set()
        assert go_on.wait(30)
        return real_next()

    engine._generator.next = held_next
    ended, ended_before_late_work = threading.Event(), []
    stepper = threading.Thread(target=lambda: engine.generate("a", STORY, max_tokens=2).blocks.release())
    stepper.start()
    assert in_step.wait(60)
    ender = threading.Thread(target=lambda: (mlx_threads.end_thread(), ended.set()))
    ender.start()

    def late_work():
        with mlx_threads.device_work():
            ended_before_late_work.append(ended.is_set())

    wait_until_a_thread_waits_to_end()
    late = threading.Thread(target=late_work)
    late.start()
    assert not ended.wait(0.3)  # the step on the other thread still runs
    go_on.set()
    for thread in (stepper, ender, late):
        thread.join(60)
    assert ended.is_set() and ended_before_late_work == [True]
    assert whole(engine.pool)


def collect_errors(errors):
    """A thread's body whose exception (an assertion) is kept in ``errors`` for the test's own thread."""
    def wrap(work):
        def run():
            try:
                work()
            except BaseException as exc:
                errors.append(exc)
        return run
    return wrap


def test_a_step_inside_a_step_does_not_wait_behind_a_thread_ending():
    """A thread in the engine's device work enters it again at once (generate() inside a step loop's body),
    even while another thread waits to end: else each would wait for the other."""
    ended, nested_done, errors = threading.Event(), threading.Event(), []

    @collect_errors(errors)
    def holder():
        with mlx_threads.device_work():
            ender.start()
            wait_until_a_thread_waits_to_end()
            with mlx_threads.device_work():
                nested_done.set()
            assert not ended.is_set()
            with pytest.raises(InvalidRequestError, match="after its last step"):
                mlx_threads.end_thread()

    # daemons: if either waited for the other, the test fails instead of hanging the process at exit
    ender = threading.Thread(target=lambda: (mlx_threads.end_thread(), ended.set()), daemon=True)
    thread = threading.Thread(target=holder, daemon=True)
    thread.start()
    thread.join(30)
    ender.join(30)
    assert not errors and nested_done.is_set() and ended.is_set()


def test_an_interrupt_at_any_point_of_taking_or_giving_back_the_device_work_lock_leaves_it_free():
    """Ctrl-C while a step or a thread's end takes or gives back the lock between them. Before, an interrupt
    there could leave a holder counted after it had gone, or the lock's own ``Condition`` held, and the next
    ``end_thread()`` then waited forever (it hung this file's thread tests after the interrupt sweeps)."""
    lock = mlx_threads._SharedExclusiveLock()

    def a_step_inside_a_step_then_a_thread_end():
        with lock.shared():
            with lock.shared():
                pass
        with lock.exclusive():
            pass

    def run(at):
        _, interrupted, tracer = traced(a_step_inside_a_step_then_a_thread_end, {mlx_threads.__file__}, at)
        assert not tracer.swallowed(interrupted), f"the interrupt at point {at} was swallowed"
        gc.collect()
        assert lock.is_free(), f"interrupted at point {at}"
        return tracer.count

    at_every_point(run, minimum=10, second=(1, 2, 3))


def test_an_engine_waits_for_the_blocks_another_engines_running_requests_reserved(llama32):
    """Two engines on one pool, each stepped by a thread of its own: the second's generate() raised
    PoolExhaustedError at once, and blamed "handles you keep", while the blocks were only reserved by the
    first engine's running request."""
    model, tokenizer = llama32
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, total_blocks=spec.n_layers * 3 // 2)  # one request's blocks, not two
    first, second = (batch_engine.BlockPoolBatchEngine(model, tokenizer, pool) for _ in range(2))
    impatient = batch_engine.BlockPoolBatchEngine(model, tokenizer, pool, wait_for_blocks_s=0.2)
    running, go_on = threading.Event(), threading.Event()

    def first_engines_thread():  # runs a request, then, told to, cancels it: its reservation comes back
        for _ in range(2):
            uid = first.submit("a", STORY, max_tokens=20)  # within one block per layer
            first.step_once()
            running.set()
            go_on.wait()
            go_on.clear()
            first.cancel(uid)

    worker = threading.Thread(target=on_a_thread_of_its_own(first_engines_thread))
    worker.start()
    assert running.wait(60)
    with pytest.raises(PoolExhaustedError, match="reserved by requests in flight"):
        impatient.generate("c", STORY, max_tokens=4)  # waits 0.2 s, no longer
    running.clear()
    go_on.set()
    assert running.wait(60)  # the first engine's second request runs
    threading.Timer(0.3, go_on.set).start()
    second.generate("b", STORY, max_tokens=4).blocks.release()  # waits for it to end
    worker.join()
    assert whole(pool)


def test_an_engine_waits_while_another_engines_finished_request_is_still_being_stored(llama32, monkeypatch):
    """Two engines on one pool, each stepped by a thread of its own. A finishing request leaves the first
    engine's running set before its context is stored and its source and reservation are given back: the
    second engine's generate(), waiting for exactly those blocks, looked at that moment, saw nothing running
    there, and raised PoolExhaustedError ("held by handles you keep") though the blocks came back a moment
    later (natively ~1-3 % of handoffs; here the store is held until the waiting thread has looked). The
    completion's handle, handed to the waiting thread, then resumes on the second engine."""
    model, tokenizer = llama32
    short_story = STORY[: len(STORY) // 3]
    layers = ModelCacheSpec.from_model(model).n_layers
    # The first engine's request holds its source (a block a layer, referred to by the request alone) and a
    # reservation (a block a layer); the second's needs a block a layer: it fits once the first's has ended.
    pool = BlockPool(ModelCacheSpec.from_model(model), 3 * layers - 1)
    first = batch_engine.BlockPoolBatchEngine(model, tokenizer, pool)
    second = batch_engine.BlockPoolBatchEngine(model, tokenizer, pool, wait_for_blocks_s=30)
    first_runs, second_waits, armed, storing, second_looked = (threading.Event() for _ in range(5))
    real_wait, real_store = pool.wait_for_blocks, batch_engine.cache_to_blocks

    def wait_for_blocks(n_blocks, timeout, stop=lambda: False):  # the second engine's thread
        def stop_polled():
            answer = stop()
            if storing.is_set():
                second_looked.set()
            return answer
        second_waits.set()
        return real_wait(n_blocks, timeout, stop_polled)

    def store(*args, **kwargs):  # the first engine's finishing request, held until the other thread looked
        if armed.is_set() and not storing.is_set():
            storing.set()
            second_looked.wait(10)
        return real_store(*args, **kwargs)

    monkeypatch.setattr(pool, "wait_for_blocks", wait_for_blocks)
    monkeypatch.setattr(batch_engine, "cache_to_blocks", store)
    handoff, errors = [], []

    def first_engines_thread():
        try:
            source = first.generate("a", short_story, max_tokens=1).blocks
            first.submit("a", " and then", cache=source, max_tokens=4)
            source.release()  # the request's own share is now the only reference
            assert first.step_once() == []  # this thread steps the first engine
            first_runs.set()
            assert second_waits.wait(30)
            armed.set()
            handoff.extend(first.step())  # the completion's handle, in transit to the other thread
        except BaseException as exc:
            errors.append(exc)
            first_runs.set()

    worker = threading.Thread(target=on_a_thread_of_its_own(first_engines_thread))
    worker.start()
    try:
        assert first_runs.wait(60) and not errors, errors
        second.generate("b", short_story, max_tokens=2).blocks.release()  # waits until the store is done
    finally:
        storing.set()
        second_looked.set()
        worker.join(60)
    assert not worker.is_alive() and not errors, errors
    (completion,) = handoff
    resumed = second.generate("a", " again", cache=completion.blocks, max_tokens=2)
    assert len(resumed.token_ids) == 2
    completion.blocks.release()
    resumed.blocks.release()
    del completion, resumed, handoff
    assert whole(pool)


def test_one_thread_steps_an_engine_while_requests_run_others_may_submit_and_cancel(own_engine):
    """Several threads stepping one engine failed its requests ("There is no Stream(cpu, N) in current
    thread"), made generate() say a request nobody cancelled was cancelled, and close() raise a bare
    RuntimeError out of mlx-lm."""
    engine = own_engine
    running = engine.submit("a", STORY, max_tokens=30)
    engine.step_once()  # this thread steps the engine: the request runs on its streams
    outcome = {}

    def another_thread():
        for name, call in {"step_once": engine.step_once, "step": lambda: next(engine.step()),
                           "generate": lambda: engine.generate("x", "hi", max_tokens=2)}.items():
            with pytest.raises(InvalidRequestError, match="step an engine from one thread"):
                call()
        outcome["submitted"] = engine.submit("b", COUNTING, max_tokens=3)
        engine.cancel(running)  # dropped at this thread's next step

    worker = threading.Thread(target=on_a_thread_of_its_own(another_thread))
    worker.start()
    worker.join()
    assert engine.pending == 2  # the refused generate() queued nothing
    assert [c.uid for c in engine.step()] == [outcome["submitted"]]
    assert engine.pending == 0 and whole(engine.pool)

    engine.submit("a", STORY, max_tokens=30)
    engine.step_once()
    worker = threading.Thread(target=on_a_thread_of_its_own(engine.close))  # its running request: at our next step
    worker.start()
    worker.join()
    assert engine.step_once() == [] and engine.pending == 0 and whole(engine.pool)

    worker = threading.Thread(target=on_a_thread_of_its_own(
        lambda: outcome.update(idle=engine.generate("c", STORY, max_tokens=2))))
    worker.start()  # nothing runs: the engine changes hands
    worker.join()
    assert len(outcome.pop("idle").token_ids) == 2
    assert len(engine.generate("d", STORY, max_tokens=2).token_ids) == 2  # and back

    def submit_then_step():  # admitted by submit(), not yet stepped: it runs on no thread's streams yet
        engine.submit("e", STORY, max_tokens=2)
        outcome["stepped"] = [len(c.token_ids) for c in engine.step()]

    worker = threading.Thread(target=on_a_thread_of_its_own(submit_then_step))
    worker.start()
    worker.join()
    assert outcome["stepped"] == [2] and engine.pending == 0 and whole(engine.pool)


def test_one_thread_stepping_two_engines_does_not_wait_for_itself(llama32, monkeypatch):
    """The second engine's request holds the blocks and only this thread can step it: waiting for it (60 s
    by default) could only end in the same PoolExhaustedError."""
    model, tokenizer = llama32
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, total_blocks=spec.n_layers * 3 // 2)
    first, second = (batch_engine.BlockPoolBatchEngine(model, tokenizer, pool) for _ in range(2))
    uid = second.submit("b", STORY, max_tokens=4)
    second.step_once()  # this thread steps it
    monkeypatch.setattr(pool, "wait_for_blocks", lambda *args, **kwargs: pytest.fail("waited for itself"))
    with pytest.raises(PoolExhaustedError, match="reserved by requests in flight"):
        first.generate("a", STORY, max_tokens=4)
    second.cancel(uid)
    assert whole(pool)


class _ReadUnderLock:
    """A container of an engine's that fails a read (iteration) while ``lock`` is not held: other threads submit,
    cancel and build engines on the pool meanwhile."""

    def __init__(self, *args, lock, **kwargs):
        super().__init__(*args, **kwargs)
        self.lock = lock

    def __iter__(self):
        held = self.lock._is_owned() if hasattr(self.lock, "_is_owned") else self.lock.locked()
        assert held, f"{type(self).__name__} read without its lock"
        return super().__iter__()


class _WaitingRequests(_ReadUnderLock, collections.deque):
    pass


class _EnginesOfAPool(_ReadUnderLock, weakref.WeakSet):
    pass


def test_a_step_reads_the_waiting_requests_and_the_pools_engines_under_their_locks(llama32, monkeypatch):
    """A step that returned with requests waiting read them for its warning without the engine's lock, and every
    step listed the pool's engines without theirs: a submit (or an engine built on the pool) on another thread
    meanwhile made ``step()`` raise a bare RuntimeError (a deque, a set, changed during iteration)."""
    model, tokenizer = llama32
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, total_blocks=2 * spec.n_layers)  # two one-block contexts
    engine = batch_engine.BlockPoolBatchEngine(model, tokenizer, pool, wait_for_blocks_s=0)
    monkeypatch.setattr(engine, "_waiting", _WaitingRequests(lock=engine._lock))
    monkeypatch.setitem(batch_engine._ENGINES, pool, _EnginesOfAPool([engine], lock=batch_engine._ENGINES_LOCK))
    held = [engine.generate(agent, "hello there", max_tokens=2).blocks for agent in "ab"]
    engine.submit("c", "hello there", max_tokens=2)
    with pytest.warns(batch_engine.PoolPressureWarning, match="1 request"):
        assert list(engine.step()) == []
    held.pop().release()
    (completion,) = engine.step()
    assert completion.error is None
    del completion
    held.pop().release()
    assert whole(pool)


def test_waiting_for_a_request_no_longer_in_flight_raises_and_makes_no_room(own_engine):
    """Before, ``wait_for`` called ``make_room`` for a request cancelled meanwhile (from another thread), again
    and again while it made room: ``store.generate`` moved every agent to disk for a request that never came."""
    uid = own_engine.submit("a", STORY, max_tokens=3)
    own_engine.cancel(uid)
    calls = []

    def make_room() -> bool:
        calls.append(1)
        return len(calls) < 3

    with pytest.raises(UnknownRequestError, match="not in flight"):
        own_engine.wait_for(uid, make_room=make_room)
    assert calls == []
    with pytest.raises(UnknownRequestError, match="never submitted"):
        own_engine.wait_for(uid + 1000)
    assert whole(own_engine.pool)


ENGINE_MODULES = {str(path) for path in pathlib.Path(semantic.__file__).parent.rglob("*.py")}


# Requests submitted together and stepped to their ends: (agent, prompt, submit's keywords, resumed from blocks);
# the agent whose request is cancelled after the first step, if any (CLOSE: the engine is closed then); every
# how many points of the run an interrupt is tried; and how many points after it a second one comes, if any
# (Ctrl-C pressed twice). Every point of each run passed here, but all 2,011 of the two-request run took 4.5 min
# on 2 cores: the suite tries every fourth point of the two-request runs.
CLOSE = "close()"
ONE_RESUMED = [("a", " more", dict(max_tokens=3), True)]
TWO_REQUESTS = [("a", " more", dict(max_tokens=3), True), ("b", COUNTING, dict(max_tokens=5), False)]
INTERRUPTED_RUNS = {
    "resumed": (ONE_RESUMED, None, 1, ()),
    "resumed, interrupted twice": (ONE_RESUMED, None, 2, (1, 3, 8)),
    "resumed and fresh, ending apart": (TWO_REQUESTS, None, 4, ()),
    "one of two cancelled after a step": (TWO_REQUESTS, "b", 4, ()),
    "closed after a step": (TWO_REQUESTS, CLOSE, 4, ()),
}


@pytest.mark.parametrize("run", INTERRUPTED_RUNS)
def test_an_interrupt_at_any_point_of_a_run_loses_nothing(llama32, run):
    """Ctrl-C at every point of semantic's own code where Python handles signals (``interrupt_points``), once or
    twice, while requests (one resumed from stored blocks) are submitted and stepped to their ends. After each,
    the caller goes on stepping: each request either completes with the tokens an uninterrupted run gives, or
    ends with an error completion, or (interrupted before it was queued) never runs; no uid completes twice; and
    once the completions' blocks are released the pool holds exactly the resumed context's blocks, each with the
    references it had, and promises nothing."""
    engine = make_engine(llama32, total_blocks=64)
    base = engine.generate("a", STORY, max_tokens=2)
    references = [engine.pool.refcount(b) for ids in base.blocks.all_block_ids for b in ids]
    used = engine.pool.used_blocks
    agents = {}
    requests, cancelled, stride, second = INTERRUPTED_RUNS[run]
    stopped = {agent for agent, *_ in requests} if cancelled == CLOSE else {cancelled} - {None}

    def submit_and_step(cancel=cancelled):
        uids = {}
        for agent, prompt, kwargs, resumed in requests:
            uids[agent] = engine.submit(agent, prompt, cache=base.blocks if resumed else None, **kwargs)
            agents[uids[agent]] = agent
        if cancel is None:
            return _steps_until_idle(engine)
        completions = engine.step_once()
        engine.close() if cancel == CLOSE else engine.cancel(uids[cancel])
        return completions + _steps_until_idle(engine)

    expected = {}
    if cancelled is not None:  # interrupted before the cancel took, a request completes as if never cancelled
        for completion in submit_and_step(cancel=None):
            expected[agents[completion.uid]] = completion.token_ids
            completion.blocks.release()

    def run(at):
        completions, interrupted, tracer = traced(submit_and_step, ENGINE_MODULES, at)
        assert not tracer.swallowed(interrupted), f"the interrupt at point {at} was swallowed"
        where = f"interrupted at point {at}"
        completions = (completions or []) + _steps_until_idle(engine, where=where)  # what the caller does next
        if at is None:
            assert len(completions) == len(requests) - len(stopped)
            for completion in completions:
                assert completion.error is None
                assert expected.setdefault(agents[completion.uid], completion.token_ids) == completion.token_ids
        assert len({c.uid for c in completions}) == len(completions), where
        for completion in completions:  # the uid of a submit cut short is not known: by agent, if at all
            agent = agents.get(completion.uid, completion.agent_id)
            assert completion.error is not None or completion.token_ids == expected[agent], where
            if completion.error is None:
                completion.blocks.release()
        completions = completion = None
        gc.collect()
        engine.pool.check_invariants()
        assert engine.pool.used_blocks == used and engine.pool.reserved_blocks == 0, where
        assert [engine.pool.refcount(b) for ids in base.blocks.all_block_ids for b in ids] == references, where
        assert mlx_threads._streams_in_use.is_free(), where
        return tracer.count

    at_every_point(run, minimum=500, stride=stride, second=second)
    finished = {agents[c.uid]: c.token_ids for c in submit_and_step()}  # the engine still works
    assert finished == {agent: tokens for agent, tokens in expected.items() if agent not in stopped}
