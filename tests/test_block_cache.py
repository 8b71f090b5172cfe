"""Blocks <-> mlx-lm caches on real models: bit-exact round trips and identical generation."""

import copy
import gc
import threading

import mlx.core as mx
import numpy as np
import pytest

from conftest import run_in_threads
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.adapters.mlx_kernels import host_view
from semantic.application.block_cache import blocks_to_cache, cache_to_blocks, can_trim, layer_ids_for
from semantic.benchmarking.cases import random_caches, random_values
from semantic.domain.errors import IncompatibleCacheError, InvalidRequestError, UnsupportedModelError
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec


KERNEL_TOLERANCE = 1e-2
"""Largest difference allowed between float32 results of different kernels (a GPU picks kernels by shape)."""


def prefill(model, tokens, chunk=512, decode=3):
    """The model's own cache after ``tokens`` (prefilled in chunks, as mlx-lm does) and ``decode``
    greedy steps: (cache, the tokens it holds, the next token, sampled and not yet fed)."""
    cache = adapter.make_cache(model)
    context = list(tokens)
    for i in range(0, len(context), chunk):
        logits = model(mx.array([context[i : i + chunk]]), cache=cache)
    nxt = int(mx.argmax(logits[0, -1]))
    for _ in range(decode):
        context.append(nxt)
        nxt = int(mx.argmax(model(mx.array([[nxt]]), cache=cache)[0, -1]))
    mx.eval([c.state for c in cache])
    return cache, context, nxt


def greedy(model, cache, token, n):
    out = []
    for _ in range(n):
        token = int(mx.argmax(model(mx.array([[token]]), cache=cache)[0, -1]))
        out.append(token)
    return out


def prompt_tokens(n, seed=0, vocab=2000):
    return [int(t) for t in np.random.default_rng(seed).integers(4, vocab, n)]


def visible(cache):
    keys, values, first, offset = adapter.read_layer_cache(cache)
    return np.array(keys.astype(mx.float32)), np.array(values.astype(mx.float32)), first, offset


@pytest.mark.parametrize("model_name", ["llama32", "gemma32", "gemma512"])
@pytest.mark.parametrize("n_tokens", [1, 255, 256, 257, 3000])
def test_extract_then_reconstruct_is_bit_exact(request, model_name, n_tokens):
    model, _ = request.getfixturevalue(model_name)
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, total_blocks=spec.blocks_per_agent(n_tokens + 8))
    decode = min(3, n_tokens - 1)
    cache, context, _ = prefill(model, prompt_tokens(n_tokens - decode), decode=decode)
    assert cache[0].offset == len(context) == n_tokens

    handle = cache_to_blocks(pool, "a", cache, context)
    rebuilt = blocks_to_cache(pool, handle)

    for layer, (original, copy) in enumerate(zip(cache, rebuilt)):
        assert type(copy) is type(original)
        assert copy.offset == original.offset == len(context)
        k0, v0, f0, o0 = visible(original)
        k1, v1, f1, o1 = visible(copy)
        assert (f0, o0) == (f1, o1)
        np.testing.assert_array_equal(k0, k1, err_msg=f"layer {layer} keys")
        np.testing.assert_array_equal(v0, v1, err_msg=f"layer {layer} values")
        if type(original).__name__ == "KVCache":  # same buffer length a prefill leaves
            assert copy.keys.shape[2] == spec.blocks_for_tokens(len(context)) * spec.block_size
    del rebuilt, copy  # caches viewing one block per layer keep their blocks while they live
    handle.release()
    assert pool.usage().used_blocks == 0
    pool.check_invariants()


@pytest.mark.parametrize("model_name", ["llama32", "gemma32", "gemma512", "qwen3"])
def test_generating_from_rebuilt_cache_equals_generating_from_original(request, model_name):
    model, _ = request.getfixturevalue(model_name)
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, total_blocks=spec.blocks_per_agent(1200))
    cache, context, nxt = prefill(model, prompt_tokens(700, seed=3))
    handle = cache_to_blocks(pool, "a", cache, context)

    from_original = greedy(model, cache, nxt, 40)
    from_blocks = greedy(model, blocks_to_cache(pool, handle), nxt, 40)

    assert from_blocks == from_original
    assert len(set(from_original)) >= 8, "the test model must not emit a constant token"


def test_extracted_blocks_do_not_keep_the_source_cache_alive(llama32):
    model, _ = llama32
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, total_blocks=spec.blocks_per_agent(600))
    cache, context, _ = prefill(model, prompt_tokens(520))
    handle = cache_to_blocks(pool, "a", cache, context)
    expected = [visible(c) for c in cache]
    del cache
    mx.clear_cache()
    for layer, copy in enumerate(blocks_to_cache(pool, handle)):
        np.testing.assert_array_equal(visible(copy)[0], expected[layer][0])


def test_rebuild_of_a_prefix_trims_inside_a_block(llama32):
    model, _ = llama32
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, total_blocks=spec.blocks_per_agent(800))
    cache, context, _ = prefill(model, prompt_tokens(600))
    handle = cache_to_blocks(pool, "a", cache, context)
    short, _, _ = prefill(model, context[:300], decode=0)

    rebuilt = blocks_to_cache(pool, handle, 300)

    for stored, original, copy in zip(cache, short, rebuilt):
        assert copy.offset == 300
        # The same computation: exactly the first 300 tokens of the blocks it came from.
        np.testing.assert_array_equal(visible(copy)[0], visible(stored)[0][..., :300, :])
        np.testing.assert_array_equal(visible(copy)[1], visible(stored)[1][..., :300, :])
        # A prefill of 300 tokens: the same values, up to the rounding of other kernels on a GPU
        # (measured 0.0018 on an H200; bit-equal on CPU).
        np.testing.assert_allclose(visible(copy)[0], visible(original)[0], rtol=0, atol=KERNEL_TOLERANCE)


def test_random_geometry_round_trip_without_a_model():
    spec = ModelCacheSpec.preset("gemma-3-12b").with_layers(12)
    pool = BlockPool(spec, total_blocks=spec.blocks_per_agent(2000))
    caches = random_caches(spec, 1900, seed=1)
    handle = cache_to_blocks(pool, "a", caches, list(range(1900)))
    assert handle.num_blocks == spec.blocks_per_agent(1900) < 12 * 8  # windows keep fewer blocks
    for original, copy in zip(caches, blocks_to_cache(pool, handle)):
        np.testing.assert_array_equal(visible(copy)[0], visible(original)[0])
        np.testing.assert_array_equal(visible(copy)[1], visible(original)[1])


@pytest.mark.parametrize("block_format,dims,block_size", [("dense", (64, 32), 16), ("dense", (5, 3), 4),
                                                          ("q8g32", (64, 32), 16), ("q4g32", (32, 64), 16)])
def test_a_gather_apart_holds_the_gather_of_each_layer(block_format, dims, block_size):
    """``BlockPool.gather_apart``: per layer, what ``gather`` holds for it, bit for bit, in the cache's shape.
    Blocks of 4 x 5 float16 values are not whole 16-byte words: the portable path on every backend."""
    spec = ModelCacheSpec(n_layers=3, n_kv_heads=2, k_head_dim=dims[0], v_head_dim=dims[1], dtype="float16",
                          block_size=block_size, block_format=block_format)
    pool = BlockPool(spec, total_blocks=spec.blocks_per_agent(70) + 3)
    handle = cache_to_blocks(pool, "a", random_caches(spec, 70, seed=3), list(range(70)))
    rows = pool.gather_rows([handle.layer_block_ids(layer) for layer in range(3)])
    keys, values = pool.gather(rows=rows)
    with pool.storage_lock:
        apart = pool.gather_apart(rows)
        mx.eval(apart)
    assert len(apart) == 3
    for layer, (layer_keys, layer_values) in enumerate(apart):
        for got, want in ((layer_keys, keys[layer : layer + 1]), (layer_values, values[layer : layer + 1])):
            tokens = spec.blocks_for_tokens(70) * block_size
            assert got.shape == want.shape == (1, 2, tokens, got.shape[-1]) and got.dtype == want.dtype
            np.testing.assert_array_equal(np.array(got.view(mx.uint16)), np.array(want.view(mx.uint16)))


def strided_like(caches, layout):
    """``caches`` with their arrays as views: ``"batch"``, row 1 of a 3-row buffer after 5 slots of left
    padding (how a batch's sequence is extracted); ``"transposed"``, a buffer stored dim-major, so the
    last axis is strided too; ``"tail"``, full-attention layers as buffers longer than their tokens (how a
    lone sequence leaves its batch), the unused tail not zero."""
    def view(array, cache):
        batch, heads, tokens, dim = array.shape
        if layout == "batch":
            buffer = mx.zeros((3, heads, tokens + 9, dim), array.dtype)
            buffer[1:2, :, 5 : 5 + tokens] = array
            return buffer[1:2, :, 5 : 5 + tokens]
        if layout == "tail":
            if type(cache).__name__ != "KVCache":
                return array
            garbage = mx.full((batch, heads, tokens + 100 - cache.offset, dim), 7, array.dtype)
            return mx.concatenate([array[:, :, : cache.offset], garbage], axis=2)
        return mx.contiguous(array.swapaxes(2, 3)).swapaxes(2, 3)
    views = []
    for cache in caches:
        views.append(copy.copy(cache))
        views[-1].keys, views[-1].values = view(cache.keys, cache), view(cache.values, cache)
    mx.eval([(c.keys, c.values) for c in views])
    return views


@pytest.mark.parametrize("fragmented, layout, host_threads", [
    (False, "contiguous", 1), (True, "contiguous", 1), (False, "batch", 1), (True, "batch", 1),
    (False, "transposed", 1), (False, "tail", 1), (True, "tail", 1),
    (False, "contiguous", 2), (True, "batch", 2), (True, "tail", 2),
])
def test_the_device_write_path_stores_what_the_host_path_stores(monkeypatch, fragmented, layout, host_threads):
    """On CPU blocks are written through NumPy views (large stores by several threads taking the layers in
    turn: ``host_threads`` 2 forces that on); other backends write with MLX ops (slices of rows, or one
    scatter when the free list is fragmented), CUDA with one kernel writing into the pool's arrays. All
    must store the same bytes, from sources of any layout (``strided_like``)."""
    from semantic.adapters import mlx_kernels
    from semantic.domain import services

    if host_threads > 1:
        monkeypatch.setattr(mlx_kernels, "_HOST_COPY_THREADS", host_threads)
        monkeypatch.setattr(mlx_kernels, "_PARALLEL_COPY_BYTES", 0)
        monkeypatch.setattr(mlx_kernels, "_PARALLEL_ITEM_BYTES", 0)
    spec = ModelCacheSpec(6, 2, 16, 16, "bfloat16", layer_windows=(None, 300) * 3, name="small")
    pool = BlockPool(spec, total_blocks=4 * spec.blocks_per_agent(1100))
    tokens = list(range(1100))
    cache_to_blocks(pool, "dirty", random_caches(spec, 1100, seed=9), tokens).release()  # free blocks hold data
    if fragmented:  # every other block free: no run of two free ids left
        held = pool.allocate(pool.free_blocks, "x")
        pool.release_blocks(held[::2], "x")
    caches = random_caches(spec, 1100, seed=3)
    sources = caches if layout == "contiguous" else strided_like(caches, layout)
    with monkeypatch.context() as patch:
        patch.setattr(services, "writes_through_host", lambda: False)
        on_device = cache_to_blocks(pool, "device", sources, tokens)
    on_host = cache_to_blocks(pool, "host", sources, tokens)
    runs = len(list(services.id_runs([b for ids in on_device.all_block_ids for b in ids], 0, on_device.num_blocks)))
    assert (runs > services._MAX_SLICE_WRITES) == fragmented
    for original, a, b in zip(caches, blocks_to_cache(pool, on_host), blocks_to_cache(pool, on_device)):
        for x, y, z in zip(visible(original)[:2], visible(a)[:2], visible(b)[:2]):
            np.testing.assert_array_equal(y, x)
            np.testing.assert_array_equal(z, x)
    used = 1100 % spec.block_size
    for handle in (on_host, on_device):  # a last block's rows past the context stay zero, whatever the source held
        for layer in range(len(spec.layer_windows)):
            last = handle.layer_block_ids(layer)[-1]
            assert not mx.any(pool.block_keys(last)[:, used:]).item()
            assert not mx.any(pool.block_values(last)[:, used:]).item()


def test_the_pack_plan_puts_every_token_in_its_block_and_nothing_else():
    """The CUDA pack kernel's plan (built for all blocks at once), carried out here in NumPy: every block
    it cuts holds exactly its tokens of its write (the first and last partly), zeros elsewhere, and goes to
    its block id, each of the writes' blocks once, in order."""
    from semantic.domain import services

    size = 8
    writes = [  # (ids, first block index, keys, values, first token, tokens); sources hold their token numbers
        ([5, 6, 7], 0, np.arange(20), None, 0, 20),  # full attention: last block partly filled
        ([1, 2, 3, 4], 2, np.arange(19, 40), None, 19, 21),  # a window: tokens 19..39 in blocks 2..5
    ]
    plan = services._pack_plan(writes, size)
    assert plan.dtype == np.int32 and plan.shape == (7, 5)
    ids = plan[:, 4].tolist()
    assert ids == [5, 6, 7, 1, 2, 3, 4]
    for k, (source, tok0, lo, hi, _) in enumerate(plan.tolist()):
        block_ids, first_index, tokens_held, _, first_token, n_tokens = writes[source]
        slots = np.arange(size)
        copied, read = (slots >= lo) & (slots < hi), tok0 + slots  # the kernel copies source[read] or writes 0
        assert np.all((read[copied] >= 0) & (read[copied] < len(tokens_held)))
        cut = np.where(copied, tokens_held[np.clip(read, 0, len(tokens_held) - 1)], -1)
        first = (first_index + block_ids.index(ids[k])) * size  # the block's first token
        held = (first + slots >= first_token) & (first + slots < first_token + n_tokens)
        np.testing.assert_array_equal(cut, np.where(held, first + slots, -1))


def described_rows(first_id, layouts, described, size):
    """The CUDA kernel's ``_DESCRIBED_ROW``, block by block, in Python: the plan row each block derives."""
    rows = []
    n_blocks = sum(described[layout][3] for layout in layouts)
    for block in range(n_blocks):
        source, start = 0, 0
        while block >= start + described[layouts[source]][3]:
            start += described[layouts[source]][3]
            source += 1
        first_index, first_token, n_tokens, _ = described[layouts[source]]
        tok0 = (first_index + block - start) * size - first_token
        rows.append([source, tok0, max(-tok0, 0), min(n_tokens - tok0, size), first_id + block])
    return np.array(rows, np.int32).reshape(-1, 5)


@pytest.mark.parametrize("writes,ids_described", [
    # gemma-like: full-attention and window layers interleaved, one run of ids
    ([([10, 11, 12], 0, None, None, 0, 20), ([13, 14], 2, None, None, 19, 21), ([15, 16, 17], 0, None, None, 0, 20)],
     True),
    ([([3], 1, None, None, 8, 5)], True),  # a continuation's one new block, starting inside it
    ([([10, 11], 0, None, None, 0, 16), ([13, 12], 0, None, None, 0, 16)], False),  # not one run
    ([([1], 0, None, None, 0, 8), ([2], 1, None, None, 8, 8), ([3], 2, None, None, 16, 8)], False),  # 3 layouts
])
def test_a_store_described_by_a_few_numbers_writes_what_its_plan_says(writes, ids_described):
    """CUDA stores whose new blocks are one run of ids pass the kernel a description, not a plan array: the rows
    it derives are the plan's, row for row; other stores keep the plan."""
    from semantic.domain import services

    ids = [b for w in writes for b in w[0]]
    described = services._described_writes(writes, ids, one_run=False)
    assert (described is not None) == ids_described
    if ids_described:  # a builder that took them as one run says so: the same description, ids not compared
        assert services._described_writes(writes, ids, one_run=True) == described
    if described is not None:
        np.testing.assert_array_equal(described_rows(ids[0], *described, 8), services._pack_plan(writes, 8))


@pytest.mark.parametrize("block_format", ["dense", "q4g32"])
def test_compiling_the_store_kernels_leaves_the_pool_as_it_was(block_format):
    """An engine has its pool compile the store's kernel at start-up (on CUDA MLX compiles a custom kernel at its
    first launch in each process), launched on scratch arrays: the pool's blocks, its free count and a handle's
    rebuild stay as they were. Off CUDA there is nothing to compile."""
    spec = ModelCacheSpec(n_layers=3, n_kv_heads=2, k_head_dim=64, v_head_dim=32, dtype="bfloat16", block_size=16,
                          block_format=block_format)
    pool = BlockPool(spec, total_blocks=spec.blocks_per_agent(70) + 3)
    handle = cache_to_blocks(pool, "a", random_caches(spec, 70, seed=5), list(range(70)))

    def contents():
        every_block = pool.gather(rows=pool.gather_rows([list(range(pool.total_blocks))]))
        rebuilt = [array for cache in blocks_to_cache(pool, handle) for array in visible(cache)[:2]]
        return [np.array(array.view(mx.uint16)) for array in every_block] + rebuilt

    before, free = contents(), pool.free_blocks
    assert pool.compile_kernels() == (mx.default_device() == mx.gpu and mx.cuda.is_available())
    after = contents()
    assert len(after) == len(before) == 2 + 2 * spec.n_layers
    for got, want in zip(after, before):
        np.testing.assert_array_equal(got, want)
    assert pool.free_blocks == free


# ---- rebuilds that view the pool's arrays (one dense block per layer) ------------------------------
VIEW_CASES = [  # (model, tokens stored, tokens rebuilt)
    ("llama32", 200, 200),  # full attention: the whole block, offset inside it
    ("llama32", 256, 256),
    ("llama32", 200, 130),  # a trim inside the block
    ("gemma32", 200, 200),  # window 128: the visible slots [72, 200) of block 0
    ("gemma32", 100, 60),  # a trim inside the block, window not yet full
    ("gemma32", 400, 400),  # sliding layers view block 1's [16, 144), full-attention layers gather 2 blocks
]


def pool_bytes(pool):
    keys, values = pool._host_arenas()
    return keys.copy(), values.copy()


def views_pool(cache, pool):
    # The pool's array as it is now: off the CPU a store may replace it (and a view kept here would make it do so).
    return np.shares_memory(host_view(cache.keys), host_view(pool._keys))


@pytest.mark.parametrize("model_name,n_tokens,rebuilt_tokens", VIEW_CASES)
def test_single_block_layers_are_views_bit_exact_with_the_gather(request, model_name, n_tokens, rebuilt_tokens):
    model, _ = request.getfixturevalue(model_name)
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, total_blocks=spec.blocks_per_agent(n_tokens) + 4)
    cache, context, _ = prefill(model, prompt_tokens(n_tokens - 3, seed=5))
    handle = cache_to_blocks(pool, "a", cache, context)

    viewed = blocks_to_cache(pool, handle, rebuilt_tokens)
    gathered = blocks_to_cache(pool, handle, rebuilt_tokens, views=False)

    for layer, (view, copy) in enumerate(zip(viewed, gathered)):
        single_block = len(layer_ids_for(spec, handle, layer, rebuilt_tokens)) == 1
        assert views_pool(view, pool) == single_block, f"layer {layer}"
        assert not views_pool(copy, pool)
        assert type(view) is type(copy) and view.offset == copy.offset == rebuilt_tokens
        assert view.keys.shape == copy.keys.shape
        for a, b in zip(view.state, copy.state):
            if isinstance(a, mx.array):
                np.testing.assert_array_equal(np.array(a), np.array(b), err_msg=f"layer {layer}")
            else:
                assert a == b
    assert any(views_pool(c, pool) for c in viewed)


def test_a_model_run_on_a_rebuilt_cache_changes_neither_its_blocks_nor_later_rebuilds(llama32):
    """mlx-lm's ``update_and_fetch`` writes ``keys[...] = new``, which rebinds that array handle: a rebuild
    of one block per layer views the pool, and the views the pool keeps must not be the handles a cache
    gets. Else the next rebuild of the block would get the first cache's copy, and so would another agent
    the freed block was written for."""
    model, _ = llama32
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, total_blocks=2 * spec.n_layers)
    cache, context, nxt = prefill(model, prompt_tokens(197, seed=8))
    handle = cache_to_blocks(pool, "a", cache, context)
    ran = blocks_to_cache(pool, handle)
    assert all(views_pool(c, pool) for c in ran)
    greedy(model, ran, nxt, 4)  # tokens 200..203 go into the cache's slots past its context
    mx.eval([c.state for c in ran])

    def assert_rebuilds_its_blocks(agent):
        for layer, c in enumerate(blocks_to_cache(pool, agent)):
            (block,) = agent.layer_block_ids(layer)
            assert views_pool(c, pool), f"layer {layer}"
            np.testing.assert_array_equal(np.array(c.keys[0]), np.array(pool.block_keys(block)))
            np.testing.assert_array_equal(np.array(c.values[0]), np.array(pool.block_values(block)))

    assert_rebuilds_its_blocks(handle)
    del ran
    gc.collect()
    freed = handle.all_block_ids
    handle.release()
    other_cache, other_context, _ = prefill(model, prompt_tokens(197, seed=9))
    other = cache_to_blocks(pool, "b", other_cache, other_context)
    assert other.all_block_ids == freed  # the freed blocks, written again
    assert_rebuilds_its_blocks(other)
    other.release()


@pytest.mark.parametrize("model_name,n_tokens,rebuilt_tokens", VIEW_CASES)
def test_views_keep_their_blocks_until_the_caches_are_gone(request, model_name, n_tokens, rebuilt_tokens):
    """The pool rewrites freed blocks in place: caches viewing blocks must keep them referenced, and give
    them back once they (and their copies) are garbage-collected."""
    model, _ = request.getfixturevalue(model_name)
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, total_blocks=2 * spec.blocks_per_agent(n_tokens) + 2 * spec.n_layers)
    cache, context, _ = prefill(model, prompt_tokens(n_tokens - 3, seed=6))
    handle = cache_to_blocks(pool, "a", cache, context)
    ids = [b for layer in handle.all_block_ids for b in layer]
    rebuilt = blocks_to_cache(pool, handle, rebuilt_tokens)
    copies = copy.deepcopy(rebuilt)  # shares the arrays' memory: must keep the blocks too
    expected = [[np.array(a) for a in c.state[:2]] for c in rebuilt]

    handle.release()
    assert all(pool.refcount(b) == 1 for b in ids)  # the caches' reference
    free = pool.allocate(pool.free_blocks, "filler")  # every free block, written with other data
    shape = (1, spec.n_kv_heads, len(free) * spec.block_size)
    pool.write_blocks(free, 0, random_values(shape + (spec.k_head_dim,), spec.dtype, 1),
                      random_values(shape + (spec.v_head_dim,), spec.dtype, 2), 0)
    for c, (keys, values) in zip(rebuilt, expected):
        np.testing.assert_array_equal(np.array(c.keys), keys)
        np.testing.assert_array_equal(np.array(c.values), values)
    pool.release_blocks(free, "filler")

    del rebuilt, c
    gc.collect()
    assert all(pool.refcount(b) == 1 for b in ids)  # the copies still view them
    del copies
    gc.collect()
    assert pool.free_blocks == pool.total_blocks
    pool.check_invariants()


@pytest.mark.parametrize("model_name,n_tokens,rebuilt_tokens", VIEW_CASES)
def test_mlx_lm_updating_caches_built_from_views_never_writes_the_pool(request, model_name, n_tokens,
                                                                        rebuilt_tokens):
    model, _ = request.getfixturevalue(model_name)
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, total_blocks=spec.blocks_per_agent(n_tokens) + 4)
    cache, context, nxt = prefill(model, prompt_tokens(n_tokens - 3, seed=7))
    handle = cache_to_blocks(pool, "a", cache, context)
    before = pool_bytes(pool)

    rebuilt = blocks_to_cache(pool, handle, rebuilt_tokens)
    assert any(views_pool(c, pool) for c in rebuilt)
    generated = greedy(model, rebuilt, context[rebuilt_tokens] if rebuilt_tokens < n_tokens else nxt, 40)
    mx.eval([c.state for c in rebuilt])

    for stored, now in zip(before, pool_bytes(pool)):
        np.testing.assert_array_equal(now, stored)
    assert not any(views_pool(c, pool) for c in rebuilt)  # updating copied them out of the pool
    assert len(set(generated)) > 1


def test_views_of_a_rewritten_block_show_its_new_contents(llama32):
    """The pool keeps each block's views once made (on CPU, where it writes blocks in place): a block freed
    and written again must rebuild with its new tokens, never the old ones."""
    model, _ = llama32
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, total_blocks=spec.n_layers)  # exactly one context of one block per layer
    contexts = [prefill(model, prompt_tokens(200, seed=seed)) for seed in (11, 12)]
    rebuilt = []
    for cache, context, _ in contexts:
        handle = cache_to_blocks(pool, "a", cache, context)
        viewed = blocks_to_cache(pool, handle)
        assert all(views_pool(c, pool) for c in viewed)
        rebuilt.append([[np.array(a) for a in c.state[:2]] for c in viewed])
        for view, copied in zip(viewed, blocks_to_cache(pool, handle, views=False)):
            np.testing.assert_array_equal(np.array(view.keys), np.array(copied.keys))
            np.testing.assert_array_equal(np.array(view.values), np.array(copied.values))
        del viewed, view
        handle.release()
        gc.collect()
        assert pool.free_blocks == pool.total_blocks
    assert not np.array_equal(rebuilt[0][0][0], rebuilt[1][0][0])  # the same blocks held other tokens


@pytest.mark.parametrize("model_name", ["llama32", "gemma32"])
@pytest.mark.parametrize("n_tokens,room", [(200, 40), (256, 1), (600, 300), (600, 0)])
@pytest.mark.parametrize("views", [True, False])
def test_room_for_a_prompt_lengthens_only_full_attention_buffers(request, model_name, n_tokens, room, views):
    """``room``: full-attention layers hold whole blocks for the context and the prompt, as a prefill of both
    would leave them; the tokens, and every sliding-window layer, are those of a rebuild without room.
    Gathered caches hold arrays of their own (a lone one goes into mlx-lm's batch uncopied); views do not."""
    model, _ = request.getfixturevalue(model_name)
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, total_blocks=spec.blocks_per_agent(n_tokens) + spec.n_layers)
    cache, context, _ = prefill(model, prompt_tokens(n_tokens - 3, seed=8))
    handle = cache_to_blocks(pool, "a", cache, context)

    plain = blocks_to_cache(pool, handle, views=False)
    roomy = blocks_to_cache(pool, handle, views=views, room=room)

    for layer, (window, a, b) in enumerate(zip(spec.layer_windows, plain, roomy)):
        assert type(a) is type(b) and a.offset == b.offset == n_tokens
        held = a.keys.shape[2]
        if window is None:
            held = spec.blocks_for_tokens(n_tokens + room) * spec.block_size
        assert b.keys.shape[2] == b.values.shape[2] == held, f"layer {layer}"
        for x, y in zip(visible(a), visible(b)):
            np.testing.assert_array_equal(x, y, err_msg=f"layer {layer}")
        assert (b.__dict__.get("merge") is adapter.merge_keeping_arrays) == (not views_pool(b, pool))
    plans = set(handle._memo)
    blocks_to_cache(pool, handle, views=views, room=room + 1)  # a prompt one longer: the same plan if ...
    grew = spec.blocks_for_tokens(n_tokens + room + 1) != spec.blocks_for_tokens(n_tokens + room)
    assert (set(handle._memo) != plans) == grew  # ... it needs no more blocks
    with pytest.raises(InvalidRequestError, match="room"):
        blocks_to_cache(pool, handle, room=-1)
    del plain, roomy, a, b
    gc.collect()
    handle.release()
    assert pool.free_blocks == pool.total_blocks


@pytest.mark.parametrize("model_name,block_format", [("llama32", "dense"), ("gemma32", "dense"), ("llama32", "q4g32")])
def test_with_room_the_batch_writes_the_prompt_into_the_rebuilt_buffers_in_place(request, model_name, block_format):
    """A lone rebuilt cache with room goes into mlx-lm's batch as it is, and the batch's first update (the
    prompt's tokens) writes every full-attention layer's buffer in place: the rebuild is the context's only
    copy. Without room several layers are views of one gather, sharing its buffer, which MLX copies whole
    at that update. Sliding-window layers are not checked: mlx-lm concatenates a prompt onto them anyway.
    Quantized blocks are dequantized into buffers of their own the same way."""
    model, _ = request.getfixturevalue(model_name)
    spec = ModelCacheSpec.from_model(model).with_format(block_format)
    pool = BlockPool(spec, total_blocks=spec.blocks_per_agent(600) + spec.n_layers)
    cache, context, _ = prefill(model, prompt_tokens(597, seed=9))
    handle = cache_to_blocks(pool, "a", cache, context)
    full_attention = [layer for layer, window in enumerate(spec.layer_windows) if window is None]
    address = lambda array: host_view(array).ctypes.data  # noqa: E731

    for room in (0, 3):
        rebuilt = blocks_to_cache(pool, handle, views=False, room=room)
        batch = [rebuilt[layer].merge([rebuilt[layer]]) for layer in full_attention]
        before = [(address(b.keys), address(b.values)) for b in batch]
        want = [np.array(b.keys[..., :600, :]) for b in batch]
        del rebuilt
        gc.collect()
        new = mx.ones((1, spec.n_kv_heads, 3, spec.k_head_dim), batch[0].keys.dtype)
        for b in batch:
            b.update_and_fetch(new, new[..., : spec.v_head_dim])
        mx.eval([(b.keys, b.values) for b in batch])
        in_place = [(address(b.keys), address(b.values)) == was for b, was in zip(batch, before)]
        alone = len(full_attention) == 1  # one layer's gather is its own buffer, room or not
        assert in_place == [room > 0 or alone] * len(batch), f"room {room}"
        for b, keys in zip(batch, want):
            np.testing.assert_array_equal(np.array(b.keys[..., :600, :]), keys)
            np.testing.assert_array_equal(np.array(b.keys[..., 600:603, :]), np.ones_like(keys[..., :3, :]))
    del batch, b
    gc.collect()
    handle.release()
    assert pool.free_blocks == pool.total_blocks


# ---- bad arguments: a typed error, and the pool as it was -----------------------------------------------
def small_pool_with_context(n_tokens=300, blocks=20, seed=1):
    spec = ModelCacheSpec.preset("smollm2-135m").with_layers(2)
    pool = BlockPool(spec, total_blocks=blocks)
    return pool, cache_to_blocks(pool, "a", random_caches(spec, n_tokens, seed=seed), list(range(n_tokens)))


def unchanged(pool, usage):
    gc.collect()
    pool.check_invariants()
    return pool.usage() == usage


@pytest.mark.parametrize("n_tokens", [301, -5, 1.5, True, "10", 10**9])
def test_a_rebuild_of_tokens_the_handle_does_not_hold_is_refused(n_tokens):
    """301 of 300 tokens rebuilt a cache whose last key and value were never computed."""
    pool, handle = small_pool_with_context()
    usage = pool.usage()
    with pytest.raises(InvalidRequestError, match="n_tokens"):
        blocks_to_cache(pool, handle, n_tokens)
    assert unchanged(pool, usage)


@pytest.mark.parametrize("n_tokens", [697, 650, 571])
def test_a_rebuild_whose_window_starts_before_what_the_handle_holds_is_refused(n_tokens):
    """A sliding window of 128 over 699 tokens holds tokens 571..698; 697 tokens would need 569 and 570,
    which came back as zeros (they share a block with tokens the window kept)."""
    spec = ModelCacheSpec(2, 2, 16, 16, "float32", layer_windows=(128, None), name="windowed")
    pool = BlockPool(spec, total_blocks=12)
    handle = cache_to_blocks(pool, "a", random_caches(spec, 699, seed=2), list(range(699)))
    usage = pool.usage()
    with pytest.raises(IncompatibleCacheError, match="no longer hold"):
        blocks_to_cache(pool, handle, n_tokens)
    assert unchanged(pool, usage)
    assert [visible(c)[3] for c in blocks_to_cache(pool, handle, 699)] == [699, 699]


@pytest.mark.parametrize("room", [10**9, 20 * 256])
def test_room_for_a_context_the_pool_could_never_store_is_refused(room):
    """room=10**9 made MLX allocate ~768 GB for the caches, and crash."""
    pool, handle = small_pool_with_context()
    usage = pool.usage()
    with pytest.raises(InvalidRequestError, match="room"):
        blocks_to_cache(pool, handle, room=room, views=False)
    assert unchanged(pool, usage)
    assert len(blocks_to_cache(pool, handle, room=256 * 7)) == 2  # 9 blocks per layer, 18 of the pool's 20


def test_a_store_reuses_only_tokens_its_source_holds():
    pool, source = small_pool_with_context()
    other_pool, foreign = small_pool_with_context()
    spec = pool.spec
    caches = random_caches(spec, 600, seed=2)
    tokens = list(range(600))
    usage = pool.usage()
    for error, kwargs in [
        (IncompatibleCacheError, dict(source=foreign, reused_tokens=300)),  # another pool's ids: a stranger's blocks
        (InvalidRequestError, dict(source=source, reused_tokens=301)),  # more than the source holds
        (InvalidRequestError, dict(source=source, reused_tokens=-1)),
        (InvalidRequestError, dict(source=source, reused_tokens=2.0)),
        (InvalidRequestError, dict(reused_tokens=300)),  # no source to reuse from
    ]:
        with pytest.raises(error):
            cache_to_blocks(pool, "b", caches, tokens, **kwargs)
        assert unchanged(pool, usage)
    with pytest.raises(IncompatibleCacheError, match="differ"):
        cache_to_blocks(pool, "b", caches, [7] + tokens[1:], source=source, reused_tokens=300)
    assert unchanged(pool, usage)
    stored = cache_to_blocks(pool, "b", caches, tokens, source=source, reused_tokens=300)
    assert stored.layer_block_ids(0)[0] == source.layer_block_ids(0)[0]  # the whole first block is shared


def test_a_context_shorter_than_its_source_shares_the_blocks_it_can_and_stores_the_rest():
    """A 512-token window over 256-token blocks: 900 tokens of a 1,001-token source start their window (388)
    before the source's (489), so the source's block 1 lacks tokens the new window needs while its blocks 2
    and 3 hold all they need. Only a prefix of a layer's blocks is shared, so that layer stores all three
    (a bare AssertionError before); the full-attention layer shares its first three."""
    spec = ModelCacheSpec(2, 1, 8, 8, "float32", layer_windows=(None, 512))
    pool = BlockPool(spec, total_blocks=24)
    data = random_values((1, 1, 1001, 8), "float32", seed=5)

    def caches_of(n_tokens):
        caches = []
        for layer, window in enumerate(spec.layer_windows):
            start, end = spec.visible_range(layer, n_tokens)
            keys = data[:, :, start:end]
            if window is None:
                keys = mx.pad(keys, [(0, 0), (0, 0), (0, spec.blocks_for_tokens(n_tokens) * 256 - n_tokens), (0, 0)])
            caches.append(adapter.build_layer_cache(window, keys, keys * 2, n_tokens))
        return caches

    tokens = list(range(1001))
    source = cache_to_blocks(pool, "a", caches_of(1001), tokens)
    shorter = cache_to_blocks(pool, "b", caches_of(900), tokens[:900], source=source, reused_tokens=900)
    assert shorter.layer_block_ids(0)[:3] == source.layer_block_ids(0)[:3]
    assert not set(shorter.layer_block_ids(1)) & set(source.layer_block_ids(1))
    for got, want in zip(blocks_to_cache(pool, shorter), caches_of(900)):
        assert all(np.array_equal(a, b) for a, b in zip(visible(got), visible(want)))
    pool.check_invariants()


@pytest.mark.parametrize("block_format", ["dense", "q8"])
def test_caches_computed_lazily_on_another_threads_stream_are_refused_and_change_nothing(block_format):
    """MLX streams belong to the thread that made them: a store of caches whose arrays another thread built but
    never evaluated raised MLX's bare RuntimeError."""
    spec = ModelCacheSpec(2, 1, 64, 64, "float32")
    pool = BlockPool(spec.with_format(block_format), total_blocks=8)
    arrays = []
    thread = threading.Thread(target=lambda: arrays.extend(
        random_values((1, 1, 256, 64), "float32", seed=layer) * 2 for layer in range(2)))
    thread.start()
    thread.join()
    caches = [adapter.build_layer_cache(None, keys, keys, 256) for keys in arrays]
    usage = pool.usage()
    with pytest.raises(InvalidRequestError, match="another thread's stream"):
        cache_to_blocks(pool, "a", caches, list(range(256)))
    assert unchanged(pool, usage)


def test_caches_of_another_dtype_are_refused_not_stored_as_other_bits():
    pool, _ = small_pool_with_context()  # bfloat16
    usage = pool.usage()
    for dtype in ("float16", "float32"):
        caches = random_caches(ModelCacheSpec(**{**pool.spec.__dict__, "dtype": dtype}), 300, seed=3)
        with pytest.raises(IncompatibleCacheError, match=dtype):
            cache_to_blocks(pool, "b", caches, list(range(300)))
        assert unchanged(pool, usage)


def _corrupt(cache, how):
    keys, values = cache.keys, cache.values
    if how == "heads":
        cache.keys = mx.concatenate([keys, keys[:, :1]], axis=1)
    elif how == "head dim":
        cache.values = mx.concatenate([values, values], axis=3)
    elif how == "buffer shorter than offset":  # one token short of what the cache says it holds
        short = min(cache.offset, keys.shape[2]) - 1
        cache.keys, cache.values = keys[:, :, :short], values[:, :, :short]
    elif how == "values shorter than keys":
        cache.values = values[:, :, : min(cache.offset, keys.shape[2]) - 1]
    elif how == "float16":
        cache.keys, cache.values = keys.astype(mx.float16), values.astype(mx.float16)
    elif how == "numpy":
        cache.keys = np.array(keys.astype(mx.float32))
    elif how == "no values":
        cache.values = None
    elif how == "3-D keys":
        cache.keys = keys[0]
    elif how == "write position":
        cache._idx = 1.5
    elif how == "window size not an int":  # a float reached the pool's cached block arithmetic, and every
        cache.max_size = float(cache.max_size)  # later store of that layout failed
    elif how == "kept tokens":  # stored with the kept tokens as the window's oldest, before
        cache.keep = 4


@pytest.mark.parametrize("how,layer", [
    (how, layer) for layer in (0, 1) for how in ("heads", "head dim", "buffer shorter than offset",
                                                 "values shorter than keys", "float16", "numpy", "no values",
                                                 "3-D keys", "write position", "window size not an int",
                                                 "kept tokens")
    # a full-attention cache has no write position, window size or kept tokens
    if not (how in ("write position", "window size not an int", "kept tokens") and layer == 0)])
def test_a_store_refuses_one_layer_unlike_the_others_and_changes_nothing(how, layer):
    """A store checks its layers' arrays once per distinct shape, not once per layer: a single layer that
    differs from the rest (here the first, full-attention, or the second, a sliding window's) is still
    refused with a typed error, with nothing taken. A buffer shorter than the tokens it claims would be
    read past its end by the device's copy."""
    spec = ModelCacheSpec.preset("smollm2-135m").with_layers(2)
    spec = ModelCacheSpec(**{**spec.__dict__, "layer_windows": (None, 128)})
    pool = BlockPool(spec, total_blocks=20)
    usage = pool.usage()
    caches = random_caches(pool.spec, 300, seed=3)
    _corrupt(caches[layer], how)
    with pytest.raises((IncompatibleCacheError, InvalidRequestError)):
        cache_to_blocks(pool, "b", caches, list(range(300)))
    assert unchanged(pool, usage)
    stored = cache_to_blocks(pool, "b", random_caches(pool.spec, 300, seed=3), list(range(300)))
    stored.release()
    assert unchanged(pool, usage)


@pytest.mark.parametrize("caches,token_ids", [
    (None, list(range(300))), ([None, None], list(range(300))), ("nan offset", list(range(300))),
    ("good", None), ("good", (t for t in range(300))), ("good", [True] * 300), ("good", [1.0] * 300),
    ("good", [0] * 299 + [-1]), ("good", [2**64] * 299 + [-1]), ("good", np.arange(300.0)), ("good", np.array(5)), ("good", np.zeros((1, 300), int)),
    ("good", range(2**64)), ("not a pool", list(range(300))),
])
def test_a_store_of_arguments_that_are_not_caches_and_token_ids_is_a_typed_error(caches, token_ids):
    pool, handle = small_pool_with_context()
    usage = pool.usage()
    target = pool
    if caches in ("good", "nan offset", "not a pool"):
        made = random_caches(pool.spec, 300, seed=3)
        if caches == "nan offset":
            made[0].offset = float("nan")
        elif caches == "not a pool":
            target = "pool"
        caches = made
    with pytest.raises((InvalidRequestError, IncompatibleCacheError, UnsupportedModelError)):
        cache_to_blocks(target, "b", caches, token_ids)
    assert unchanged(pool, usage)


def test_numpy_token_ids_are_stored_as_plain_ints_and_a_reused_prefix_as_the_source_holds_it():
    pool, source = small_pool_with_context()
    caches = random_caches(pool.spec, 300, seed=3)
    stored = cache_to_blocks(pool, "b", caches, np.arange(300))
    assert stored.token_ids == tuple(range(300)) and {type(t) for t in stored.token_ids} == {int}
    tokens = [np.int64(t) for t in source.token_ids]
    continued = cache_to_blocks(pool, "c", caches, tokens, source=source, reused_tokens=290)
    assert continued.token_ids == source.token_ids and {type(t) for t in continued.token_ids} == {int}
    with pytest.raises(InvalidRequestError, match="token_ids"):
        cache_to_blocks(pool, "c", caches, [*source.token_ids[:290], *[True] * 10], source=source,
                        reused_tokens=290)


def test_token_ids_too_large_for_a_machine_word_are_stored_as_given():
    """The pool bounds no id (a store on disk does: ``AgentCacheStore.put``); the non-negative check's C fast path
    overflows on them and must not refuse them."""
    pool, _ = small_pool_with_context()
    tokens = [2**64 + t for t in range(300)]
    stored = cache_to_blocks(pool, "b", random_caches(pool.spec, 300, seed=3), tokens)
    assert stored.token_ids == tuple(tokens)


def test_a_failed_store_leaves_its_reservation_whole():
    pool, _ = small_pool_with_context()
    reservation = pool.reserve(4, "b")
    usage = pool.usage()
    with pytest.raises(InvalidRequestError):
        cache_to_blocks(pool, "b", random_caches(pool.spec, 300), [-1] * 300, reservation=reservation)
    assert unchanged(pool, usage) and reservation.remaining == 4


def test_a_handle_released_elsewhere_between_the_check_and_the_gather_is_refused(monkeypatch):
    """The handle is checked again under the pool's lock, with the gather: released in between (another
    thread), its freed blocks could be rewritten for another agent before they were read."""
    from semantic.application import block_cache
    from semantic.domain.errors import ReleasedHandleError

    pool, handle = small_pool_with_context(blocks=8)
    real_plan = block_cache._gather_plan

    def another_thread_after_the_plan(*args):
        plan = real_plan(*args)
        handle.release()
        cache_to_blocks(pool, "bob", random_caches(pool.spec, 300, seed=9), list(range(300)))
        return plan

    monkeypatch.setattr(block_cache, "_gather_plan", another_thread_after_the_plan)
    with pytest.raises(ReleasedHandleError):
        blocks_to_cache(pool, handle, views=False)


@pytest.mark.parametrize("block_format,injected_at", [("dense", "build_handle"), ("q8", "build_handle"),
                                                      ("q8", "_write_checked")])
def test_a_source_released_elsewhere_during_a_store_is_refused_not_shared_with_another_agent(block_format,
                                                                                             injected_at):
    """A store reads the source's block ids, then takes references on them (and, quantized, copies slots of
    the block after them). Released in between by another thread, and its blocks given to another agent,
    the new context would hold that agent's keys: the source is checked again under the pool's lock."""
    from semantic.benchmarking.cases import with_block_format
    from semantic.domain.errors import ReleasedHandleError

    spec = with_block_format(ModelCacheSpec.preset("smollm2-135m").with_layers(2), block_format)
    pool = BlockPool(spec, total_blocks=10)
    caches = random_caches(spec, 300, seed=1)
    source = cache_to_blocks(pool, "a", caches, list(range(300)))
    victim = {}
    real = getattr(pool, injected_at)

    def another_thread_meanwhile(*args, **kwargs):
        setattr(pool, injected_at, real)
        if "victim" not in victim:
            source.release()
            victim["victim"] = cache_to_blocks(pool, "victim", random_caches(spec, 300, seed=9), list(range(300)))
            victim["snapshot"] = [visible(c) for c in blocks_to_cache(pool, victim["victim"], views=False)]
        return real(*args, **kwargs)

    setattr(pool, injected_at, another_thread_meanwhile)
    with pytest.raises(ReleasedHandleError):
        cache_to_blocks(pool, "b", caches, list(range(300)), source=source, reused_tokens=290)
    gc.collect()
    pool.check_invariants()
    assert pool.usage().per_agent.keys() == {"victim"}
    for before, after in zip(victim["snapshot"], blocks_to_cache(pool, victim["victim"], views=False)):
        np.testing.assert_array_equal(before[0], visible(after)[0])


def test_a_cache_that_lacks_tokens_its_layer_keeps_is_refused():
    """A sliding window's cache (here rotated: it holds the last 4 of 10 tokens) for a full-attention layer was
    stored with zeros for the tokens it dropped."""
    pool, handle = small_pool_with_context()
    usage = pool.usage()
    caches = []
    for _ in range(pool.spec.n_layers):
        cache = adapter.RotatingKVCache(max_size=4, keep=0)
        for token in range(10):
            x = mx.full((1, pool.spec.n_kv_heads, 1, pool.spec.k_head_dim), token + 1, dtype=mx.bfloat16)
            cache.update_and_fetch(x, x)
        caches.append(cache)
    with pytest.raises(IncompatibleCacheError, match="holds tokens 6..9 of 10, but keeps tokens 0.."):
        cache_to_blocks(pool, "b", caches, list(range(10)))
    assert unchanged(pool, usage)


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("fault", ["fewer tokens", "a shorter window"])
def test_a_store_names_the_layer_whose_cache_does_not_hold_the_context(layer, fault):
    """The layers are checked all at once; one that fails (the first, full-attention, or the second, a window
    of 128) is still named, with nothing taken."""
    spec = ModelCacheSpec.preset("smollm2-135m").with_layers(2)
    pool = BlockPool(ModelCacheSpec(**{**spec.__dict__, "layer_windows": (None, 128)}), total_blocks=20)
    usage = pool.usage()
    caches = random_caches(pool.spec, 300, seed=3)
    if fault == "fewer tokens":
        caches[layer] = random_caches(pool.spec, 299, seed=3)[layer]
        expected = f"layer {layer} holds 299 tokens, expected 300"
    else:
        caches[layer] = adapter.RotatingKVCache(max_size=64, keep=0)
        full = random_caches(pool.spec, 300, seed=3)[0]
        caches[layer].update_and_fetch(full.keys[:, :, :300], full.values[:, :, :300])
        expected = f"layer {layer} holds tokens 236..299 of 300, but keeps tokens {(0, 172)[layer]}.."
    with pytest.raises(IncompatibleCacheError, match=expected):
        cache_to_blocks(pool, "b", caches, list(range(300)))
    assert unchanged(pool, usage)


def test_rebuilds_from_several_threads_at_once_are_bit_exact():
    """On CPU a gather's values are taken on a second stream; MLX streams belong to the thread that made
    them, so each thread needs its own (one shared stream failed in every thread but its maker's)."""
    pool, handle = small_pool_with_context(n_tokens=1000, blocks=40)
    expected = [visible(c)[:2] for c in blocks_to_cache(pool, handle, views=False)]

    def rebuild(n):
        for i in range(n):
            for want, cache in zip(expected, blocks_to_cache(pool, handle, views=False, room=(i % 2) * 300)):
                got = visible(cache)[:2]
                assert all(np.array_equal(a, b) for a, b in zip(want, got))

    run_in_threads(rebuild, 20)


def test_can_trim_answers_for_a_spec_a_handle_and_a_token_count_and_refuses_anything_else():
    """A str or None raised a bare TypeError, a str handle an AttributeError, and a float count was answered."""
    spec = ModelCacheSpec(2, 1, 4, 4, "float32", block_size=16, layer_windows=(None, 20))
    pool = BlockPool(spec, total_blocks=16)
    handle = cache_to_blocks(pool, "a", random_caches(spec, 50), list(range(50)))
    assert can_trim(spec, handle, 50) and can_trim(spec, handle, np.int64(50)) and can_trim(spec, handle, 0)
    assert not can_trim(spec, handle, 40) and not can_trim(spec, handle, 51)  # before the window; past the end
    assert not can_trim(spec, handle, -1) and not can_trim(spec, handle, np.int64(-1))
    for args in ((spec, handle, None), (spec, handle, "3"), (spec, handle, 20.5), (spec, "h", 1), (None, handle, 1)):
        with pytest.raises(InvalidRequestError):
            can_trim(*args)
    handle.release()
    pool.check_invariants()
