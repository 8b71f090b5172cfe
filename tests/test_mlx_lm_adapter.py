"""The contract semantic relies on from mlx-lm (see semantic/adapters/mlx_lm_adapter.py).

An mlx-lm upgrade that changes a cache's ``state`` layout, ``BatchGenerator``'s
calls or its responses fails here first, naming what moved.
"""

import copy
import inspect

import mlx.core as mx
import numpy as np
import mlx_lm
import pytest
from mlx_lm.generate import BatchGenerator, GenerationBatch, generation_stream
from mlx_lm.models.cache import KVCache, RotatingKVCache

from semantic.adapters import mlx_lm_adapter as adapter
from semantic.adapters.mlx_kernels import host_view
from semantic.domain.errors import UnsupportedModelError
from semantic.domain.request_checks import SamplingParams
from semantic.domain.value_objects import ModelCacheSpec


def test_installed_mlx_lm_is_in_the_supported_range():
    adapter.check_mlx_lm_version()
    major, minor, patch = (int(p) for p in mlx_lm.__version__.split(".")[:3])
    assert (major, minor) == (0, 32) and patch >= 2


def test_cache_state_layouts():
    keys = mx.zeros((1, 2, 256, 8))
    full = KVCache()
    full.state = (keys, keys, 10)
    assert full.offset == 10 and full.size() == 10
    rotating = RotatingKVCache(max_size=64, keep=0)
    rotating.state = (keys[..., :64, :], keys[..., :64, :], 300, 0, 64, 64)
    assert (rotating.offset, rotating.max_size, rotating.keep, rotating._idx) == (300, 64, 0, 64)
    assert rotating._temporal_order(rotating.keys).shape[2] == 64


def test_batch_generator_calls_the_engine_makes():
    insert = inspect.signature(BatchGenerator.insert).parameters
    for name in ("prompts", "max_tokens", "caches", "all_tokens", "samplers", "logits_processors"):
        assert name in insert, f"BatchGenerator.insert lost {name!r}"
    init = inspect.signature(BatchGenerator.__init__).parameters
    for name in ("stop_tokens", "prefill_step_size", "prefill_batch_size", "completion_batch_size"):
        assert name in init, f"BatchGenerator() lost {name!r}"
    for method in ("next_generated", "extract_cache", "remove", "close"):
        assert callable(getattr(BatchGenerator, method, None)), method
    step = inspect.getsource(GenerationBatch._step)  # per-sequence samplers and processors: failures attributable
    assert "self.samplers" in step and "self.logits_processors[e]" in step


def test_generator_round_trip_returns_cache_and_context(llama32):
    model, tokenizer = llama32
    generator = adapter.Generator(model, stop_token_ids=[])
    prompt = tokenizer.encode("one two three four five")
    uid = generator.insert(prompt, None, [], 4, SamplingParams(), tag="t")
    assert generator._gen._stream is generation_stream  # the stream adapter.synchronize waits for
    assert generator.extract(uid)[1] == []  # queued: nothing processed yet
    events = []
    while not any(e.finish_reason for e in events):
        events += generator.next()
    last = events[-1]
    assert last.uid == uid and last.finish_reason == "length" and len(events) == 4
    assert last.context_tokens == prompt + [e.token for e in events]  # every reported token is in the cache
    assert all(type(c) is KVCache and c.offset == len(last.context_tokens) for c in last.cache)
    assert generator.extract(uid) is None
    generator.close()


@pytest.mark.parametrize("model_name", ["llama32", "gemma32"])
@pytest.mark.parametrize("sequences", [
    [(0, 150)], [(0, 140), (0, 3)],
    [(100, 10), (50, 60)],  # cached contexts: left padding common to both after the prompt
    [(0, 140), (0, 150), (0, 3)],  # two finish their prompts first: mlx-lm's own split
])
def test_prompts_move_to_generation_without_copies_and_decode_as_mlx_lm_does(model_name, sequences, request):
    """Sequences that all finish their prompts at once move to the generation batch with their caches as
    they are (mlx-lm's split copies them); the generation then holds what mlx-lm's own generator holds,
    token for token and array for array. ``sequences``: (cached context, prompt) lengths."""
    model, tokenizer = request.getfixturevalue(model_name)
    words = tokenizer.encode("one two three " * 60)
    prompts = [words[context : context + n] for context, n in sequences]
    step = 145  # a prompt of more than 146 tokens needs two prefill steps

    def caches():
        made = []
        for context, _ in sequences:
            made.append(adapter.make_cache(model))
            if context:
                model(mx.array([words[:context]]), cache=made[-1])
        mx.eval([c.state for cache in made for c in cache if c.keys is not None])
        return made if any(context for context, _ in sequences) else None

    ours = adapter.Generator(model, stop_token_ids=[], prefill_step_size=step)._gen
    stock = BatchGenerator(model, stop_tokens=None, prefill_step_size=step)
    for generator in (ours, stock):
        generator.insert(prompts, max_tokens=[20] * len(prompts), caches=caches())
    moved = None
    for _ in range(8):
        if len(ours._generation_batch) == 0:
            moved = list(ours._prompt_batch.prompt_cache)
        ours.next(), stock.next()
        for a, b in zip(ours._generation_batch.prompt_cache, stock._generation_batch.prompt_cache):
            assert a is not b
            for name in ("keys", "values", "offset", "left_padding"):
                assert mx.array_equal(getattr(a, name), getattr(b, name)), name
            assert a._idx == b._idx
        assert ours._generation_batch.tokens == stock._generation_batch.tokens
    assert len(ours._generation_batch) == len(sequences)  # all of them decoding, none finished yet
    moves_whole = len(sequences) == 1 or max(n for _, n in sequences) - 1 <= step
    assert all(a is b for a, b in zip(moved, ours._generation_batch.prompt_cache)) == moves_whole


def prefilled(model, tokens):
    """The model's own cache after ``tokens``, evaluated."""
    live = adapter.make_cache(model)
    model(mx.array([tokens]), cache=live)
    mx.eval([c.state for c in live])
    return live


def own_arrays_copy(live, room):
    """``live``'s contents in arrays made for the copy (``own_arrays``), full-attention buffers with ``room``
    slots after their tokens."""
    made = []
    for layer, cache in enumerate(live):
        window = adapter.layer_window(cache, layer)
        keys, values, _, offset = adapter.read_layer_cache(cache)
        if window is None and room:
            keys, values = (mx.concatenate([a, mx.zeros(a.shape[:2] + (room,) + a.shape[3:], a.dtype)], axis=2)
                            for a in (keys, values))
        made.append(adapter.build_layer_cache(window, mx.array(keys), mx.array(values), offset, own_arrays=True))
    mx.eval([c.state for c in made])
    return made


@pytest.mark.parametrize("model_name", ["llama32", "gemma32"])
@pytest.mark.parametrize("room", [0, 40])
def test_a_lone_cache_of_its_own_arrays_goes_into_the_batch_uncopied_and_decodes_as_mlx_lm_does(
        model_name, room, request):
    """A cache built with ``own_arrays`` (as a rebuild's gathered layers are) is merged alone into a batch as
    it is: the batch's buffers are its arrays (handles of its own on them), with whatever room they have
    after the tokens. Decoding from it gives mlx-lm's own tokens and batch contents, and the cache given
    still holds what it held, its room included. Merged with others, mlx-lm's merge copies them as usual.
    gemma: sliding layers (window 128) past their window."""
    model, tokenizer = request.getfixturevalue(model_name)
    words = tokenizer.encode("one two three four " * 80)
    context, prompt = words[:300], words[300:330]
    live = prefilled(model, context)

    mine = own_arrays_copy(live, room)
    for cache in mine:
        alone = cache.merge([cache])
        for got, given in ((alone.keys, cache.keys), (alone.values, cache.values)):
            assert got is not given and got.shape == given.shape
            assert np.shares_memory(host_view(got), host_view(given))  # no copy
        together = cache.merge([cache, live[mine.index(cache)]])
        stock_merge = type(cache).merge([cache, live[mine.index(cache)]])
        for name in ("keys", "values", "offset", "left_padding"):
            assert mx.array_equal(getattr(together, name), getattr(stock_merge, name)), name
    given = [[np.array(a) for a in (c.keys, c.values)] for c in mine]

    ours = adapter.Generator(model, stop_token_ids=[])._gen
    stock = BatchGenerator(model, stop_tokens=None)
    ours.insert([prompt], max_tokens=[24], caches=[mine], all_tokens=[context])
    stock.insert([prompt], max_tokens=[24], caches=[copy.deepcopy(live)], all_tokens=[context])
    tokens = {id(ours): [], id(stock): []}
    for _ in range(25):
        for generator in (ours, stock):
            tokens[id(generator)] += [r.token for r in generator.next_generated()]
        for a, b in zip(ours._generation_batch.prompt_cache, stock._generation_batch.prompt_cache):
            assert a._idx == b._idx
            for got, want in zip(a.keys_and_values() if hasattr(a, "keys_and_values") else (a.keys, a.values),
                                 b.keys_and_values() if hasattr(b, "keys_and_values") else (b.keys, b.values)):
                assert mx.array_equal(got, want)
    assert tokens[id(ours)] == tokens[id(stock)] and len(tokens[id(ours)]) == 24
    assert len(set(tokens[id(ours)])) > 1, "the test model must not emit a constant token"
    for cache, (keys, values) in zip(mine, given):
        np.testing.assert_array_equal(np.array(cache.keys), keys)
        np.testing.assert_array_equal(np.array(cache.values), values)


def test_merges_next_insert_alone_says_when_the_batch_will_keep_a_caches_arrays(llama32):
    """True only while nothing is queued or prefilling: then a cache with room goes into the batch as it is
    (its buffer's length survives the prefill); a cache inserted behind another is merged with it."""
    model, tokenizer = llama32
    words = tokenizer.encode("one two three four " * 80)
    live = prefilled(model, words[:300])
    generator = adapter.Generator(model, stop_token_ids=[], prefill_step_size=64)

    assert generator.merges_next_insert_alone()
    generator.insert(words[300:320], own_arrays_copy(live, 40), words[:300], 30, SamplingParams(), "alone")
    assert not generator.merges_next_insert_alone()  # a second insert now would be merged with the first
    generator.next()
    assert [c.keys.shape[2] for c in generator._gen._generation_batch.prompt_cache] == [340] * len(live)

    generator.insert(words[:200], None, [], 5, SamplingParams(), "long prompt")  # prefilled in 64-token steps
    generator.next()
    assert len(generator._gen._prompt_batch) == 1 and not generator.merges_next_insert_alone()
    generator.close()

    together = adapter.Generator(model, stop_token_ids=[])
    for tag in ("a", "b"):
        together.insert(words[300:320], own_arrays_copy(live, 40), words[:300], 30, SamplingParams(), tag)
    together.next()
    assert all(c.keys.shape[2] != 340 for c in together._gen._generation_batch.prompt_cache)
    together.close()


@pytest.mark.parametrize("model_name", ["llama32", "gemma32"])
@pytest.mark.parametrize("sequences", [1, 2])
def test_sequences_are_extracted_as_views_equal_to_mlx_lm_extract(model_name, sequences, request):
    """Every layer of a batch extracted as a view holds what mlx-lm's own ``extract`` copies out: one
    sequence alone (the batch's buffers themselves, longer than its tokens), or two of different lengths
    (left padding); gemma's sliding layers past their 128-token window (a rotated buffer)."""
    model, tokenizer = request.getfixturevalue(model_name)
    generator = adapter.Generator(model, stop_token_ids=[])
    prompts = [tokenizer.encode("one two three " * 40)[:120], tokenizer.encode("four five")][:sequences]
    for prompt in prompts:
        generator.insert(prompt, None, [], 30, SamplingParams(), tag=len(prompt))
    for _ in range(20):  # decoding writes the window's buffer in place: past 128 tokens it wraps around
        generator.next()
    batch = generator._gen._generation_batch
    assert len(batch.uids) == sequences
    kinds = set()
    for cache in batch.prompt_cache:
        kinds.add((type(cache).__name__, getattr(cache, "rotated", False)))
        for idx in range(sequences):
            view, copy = adapter.extract_view(cache, idx), cache.extract(idx)
            assert type(view) is type(copy) and view.offset == copy.offset
            assert getattr(view, "_idx", None) == getattr(copy, "_idx", None)
            for got, want in zip(adapter.read_layer_cache(view)[:2], adapter.read_layer_cache(copy)[:2]):
                assert mx.array_equal(got, want)
    assert kinds == ({("BatchKVCache", False)} if model_name == "llama32"
                     else {("BatchKVCache", False), ("BatchRotatingKVCache", True)})
    extracted = batch.extract_cache(0)  # the generator's batches extract this way
    assert [c.offset for c in extracted] == [cache.extract(0).offset for cache in batch.prompt_cache]
    generator.close()


def test_spec_from_models_reads_their_own_cache_layout(llama32, gemma32, qwen3):
    llama = ModelCacheSpec.from_model(llama32[0])
    assert llama.sliding_window_layers == () and llama.dtype == "float32"
    gemma = ModelCacheSpec.from_model(gemma32[0])
    pattern = gemma32[0].args.sliding_window_pattern
    assert gemma.full_attention_layers == tuple(i for i in range(gemma.n_layers) if (i + 1) % pattern == 0)
    assert set(gemma.layer_windows) - {None} == {gemma32[0].args.sliding_window}
    qwen = ModelCacheSpec.from_model(qwen3[0])
    assert qwen.n_kv_heads == qwen3[0].args.num_key_value_heads


def test_unsupported_cache_types_are_refused_clearly():
    with pytest.raises(UnsupportedModelError, match="keeps 4 tokens"):
        adapter.layer_window(RotatingKVCache(max_size=64, keep=4), 3)
    from mlx_lm.models.cache import ArraysCache

    with pytest.raises(UnsupportedModelError, match="ArraysCache"):
        adapter.layer_window(ArraysCache(2), 0)


def test_vocab_size_is_what_the_embedding_and_logits_take(llama32, gemma32):
    for model, _ in (llama32, gemma32):
        assert adapter.vocab_size(model) == model.args.vocab_size == model.model.embed_tokens.weight.shape[0]


def test_a_failing_step_names_the_sequence_whose_sampler_raised_and_empties_the_generator(llama32, monkeypatch):
    model, tokenizer = llama32
    generator = adapter.Generator(model, stop_token_ids=[])
    prompt = tokenizer.encode("one two three")
    generator.insert(prompt, None, [], 4, SamplingParams(), tag="greedy")
    generator.insert(prompt, None, [], 4, SamplingParams(temperature=1.0, top_k=5), tag="sampled")
    real = adapter.sampler_for

    def broken(sampling, vocab):
        sampler = real(sampling, vocab)
        return (lambda logprobs: 1 / 0) if sampling.top_k == 6 else sampler

    monkeypatch.setattr(adapter, "sampler_for", broken)
    generator.insert(prompt, None, [], 4, SamplingParams(temperature=1.0, top_k=6), tag="bad")
    with pytest.raises(adapter.StepFailed) as info:
        while True:
            generator.next()
    assert info.value.attributed and info.value.tags == ["bad"]
    assert isinstance(info.value.cause, ZeroDivisionError)
    assert generator.next() == []  # emptied: a step that raised cannot be resumed


def test_a_failing_forward_pass_names_every_sequence(llama32, monkeypatch):
    model, tokenizer = llama32
    generator = adapter.Generator(model, stop_token_ids=[])
    for tag in ("a", "b"):
        generator.insert(tokenizer.encode("one two three"), None, [], 4, SamplingParams(), tag=tag)
    monkeypatch.setattr(type(model), "__call__", lambda *args, **kwargs: 1 / 0)
    with pytest.raises(adapter.StepFailed) as info:
        generator.next()
    assert not info.value.attributed and sorted(info.value.tags) == ["a", "b"]


def test_an_empty_copy_runs_its_own_sequences_even_when_a_method_was_wrapped_on_the_original(llama32):
    """The engine probes a suspect alone in an empty copy. A method set on the original instance (pytest 9.1's
    monkeypatch leaves one there on undo) came along bound to the original, so the probe's sequence ran in
    the live batch: on an H100 every survivor of a failed prefill was failed with the culprit."""
    model, tokenizer = llama32
    generator = adapter.Generator(model, stop_token_ids=[])
    generator.insert, generator.next = generator.insert, generator.next
    probe = generator.empty_copy()
    assert vars(probe).keys() == vars(adapter.Generator(model, stop_token_ids=[])).keys()  # every setting copied
    probe.insert(tokenizer.encode("one two three"), None, [], 2, SamplingParams(), tag="probe")
    assert generator.next() == []
    events = probe.next()
    assert [e.uid for e in events] == [0] and probe.resets == generator.resets == 0
    probe.close()
