"""Quantized blocks (q8/q4): stored as mx.quantize, rebuilt as mx.dequantize, quantized once, saved packed,
and kept apart from blocks of other formats."""

import json
import threading

import mlx.core as mx
import numpy as np
import pytest

from conftest import make_engine, run_in_threads
from semantic.adapters import mlx_lm_adapter as adapter
from semantic.adapters.mlx_kernels import gather_dequantized_pairs, gather_dequantized_pairs_apart
from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.application.block_cache import blocks_to_cache, cache_to_blocks
from semantic.domain.block_format import BlockFormat
from semantic.domain.errors import BlockOwnershipError, IncompatibleCacheError, InvalidRequestError
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.persistence import AgentCacheStore, IncompatibleCacheFileError
from test_block_cache import prefill, prompt_tokens, visible
from test_persistence_support import FINGERPRINT, nothing_changes, random_handle, run_python

GIB = 1 << 30


# Head dim 32 (quantized in groups of 32), 4-token blocks, a 6-token window spanning two or three blocks.
QSPEC = ModelCacheSpec(3, 2, 32, 32, "bfloat16", block_size=4, layer_windows=(None, 6, None), name="q-small")


def packed(handle):
    """Every layer's stored parts as bytes, ``[heads, tokens, bytes of one token's row]`` each."""
    return [[np.array(p.view(mx.uint8))[0] for p in handle.pool.gather_stored([ids])] if ids else []
            for ids in handle.all_block_ids]


def quantized(data, fmt):
    return mx.quantize(data, group_size=fmt.group_size, bits=fmt.bits)


def test_formats_parse_and_weigh_what_they_store():
    assert BlockFormat.parse("q4") == BlockFormat(4, 64) and BlockFormat.parse("q8g32") == BlockFormat(8, 32)
    assert BlockFormat.parse(None).name == "dense" and BlockFormat.parse(4).name == "q4"
    for bad in ("q3", "fp8", "q4g48", 16):
        with pytest.raises(InvalidRequestError):
            BlockFormat.parse(bad)
    # 8.0 failed inside MLX when a pool was made; a NumPy group size failed every JSON write of a store.
    for bits, group_size in ((8.0, 32), (4, 32.0), (True, 32), (8, None), ("8", 32)):
        with pytest.raises(InvalidRequestError, match="must be an int"):
            BlockFormat(bits, group_size)
    numpy_made = BlockFormat(np.int64(8), np.int32(32))
    assert numpy_made == BlockFormat(8, 32) and {type(numpy_made.bits), type(numpy_made.group_size)} == {int}
    with pytest.raises(InvalidRequestError, match="divisible by its group size"):
        ModelCacheSpec(2, 2, 32, 32).with_format("q4")  # group 64 > head dim 32

    dense = ModelCacheSpec.preset("smollm2-135m")
    ratios = {f: dense.with_format(f).bytes_per_block_per_layer / dense.bytes_per_block_per_layer for f in ("q8", "q4")}
    assert ratios == {"q8": 68 / 128, "q4": 36 / 128}  # head dim 64: packed bytes + one bf16 scale and bias
    for fmt in ("q8", "q4"):
        pool = BlockPool(dense.with_layers(1).with_format(fmt), 8, grow_buffer_cache=False)
        assert pool.nbytes == 8 * pool.block_bytes
    agents = {f: GIB // dense.with_format(f).bytes_per_agent(4096) for f in ("dense", "q8", "q4")}
    assert agents["q4"] >= 3.5 * agents["dense"]


@pytest.mark.parametrize("fmt", ["q8", "q4"])
@pytest.mark.parametrize("tail", [0, 11])
def test_store_is_mx_quantize_and_rebuild_is_mx_dequantize_exactly(fmt, tail):
    """``tail``: the data passed as buffers longer than its 37 tokens, the rest not zero, with its token count."""
    spec = ModelCacheSpec(2, 3, 64, 64, "bfloat16", block_size=16, name="q").with_format(fmt)
    pool = BlockPool(spec, 20, grow_buffer_cache=False)
    fmt = spec.block_format
    keys, values = (mx.random.normal((1, 3, 37, 64), key=mx.random.key(s)).astype(mx.bfloat16) for s in (1, 2))
    earlier = pool.allocate(3, "earlier owner")
    pool.write_blocks(earlier, 0, keys + 5, values + 5, 0)
    pool.release_blocks(earlier, "earlier owner")
    ids = pool.allocate(3, "a")  # blocks 1..3 of the sequence, the data from token 21: ragged at both ends
    assert ids == earlier
    if tail:
        garbage = mx.full((1, 3, tail, 64), 9, mx.bfloat16)
        pool.write_many([(ids, 1, mx.concatenate([keys, garbage], 2), mx.concatenate([values, garbage], 2), 21, 37)])
    else:
        pool.write_blocks(ids, 1, keys, values, 21)

    stored = pool.gather_stored([ids])
    expected = [*quantized(keys, fmt), *quantized(values, fmt)]
    for part, want in zip(stored, expected):
        assert mx.array_equal(part[:, :, 5:42], want).item()
    for dense in (mx.dequantize(*stored[i:i + 3], group_size=fmt.group_size, bits=fmt.bits) for i in (0, 3)):
        assert not mx.any(dense[:, :, :5]).item() and not mx.any(dense[:, :, 42:]).item()  # nothing earlier survives
    rebuilt_keys, rebuilt_values = pool.gather([ids])
    assert mx.array_equal(rebuilt_keys[:, :, 5:42], mx.dequantize(*expected[:3], group_size=fmt.group_size,
                                                                  bits=fmt.bits)).item()
    assert mx.array_equal(rebuilt_values[:, :, 5:42], mx.dequantize(*expected[3:], group_size=fmt.group_size,
                                                                    bits=fmt.bits)).item()
    assert mx.array_equal(pool.block_keys(ids[1]), rebuilt_keys[0, :, 16:32]).item()


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16, mx.float32])
@pytest.mark.parametrize("bits,group_size", [(8, 64), (8, 32), (4, 64), (4, 32), (2, 32)])
def test_the_dequantizing_gather_equals_mx_dequantize_bit_for_bit(dtype, bits, group_size):
    # On CUDA this is the one-kernel path (its arithmetic must be MLX's own, bit for bit); elsewhere the
    # portable gather-then-dequantize. Expected: dequantize everything, then gather (another order).
    tables = [mx.quantize((mx.random.normal((9, 16, dim), key=mx.random.key(dim)) * 4).astype(dtype),
                          group_size=group_size, bits=bits) for dim in (64, 128)]  # keys and values of other widths
    rows = mx.array([[[3, 0, 8], [3, 5, 1]]], dtype=mx.int32)
    got = gather_dequantized_pairs(tuple(tables[0]), tuple(tables[1]), rows, group_size=group_size, bits=bits)
    for table, result in zip(tables, got):
        want = mx.take(mx.dequantize(*table, group_size=group_size, bits=bits), rows, axis=0)
        assert result.dtype == dtype and result.shape == want.shape
        assert np.array_equal(np.array(result.view(mx.uint8)), np.array(want.view(mx.uint8)))

    # Apart: one output pair per index of the first axis (a layer), in the shape asked for.
    layers = mx.array([[[3, 0, 8], [3, 5, 1]], [[7, 2, 2], [6, 4, 0]]], dtype=mx.int32)
    shapes = [(1, 2, 3 * 16, dim) for dim in (64, 128)]
    apart = gather_dequantized_pairs_apart(tuple(tables[0]), tuple(tables[1]), layers, *shapes,
                                           group_size=group_size, bits=bits)
    assert len(apart) == 2
    for layer, pair in enumerate(apart):
        for table, shape, result in zip(tables, shapes, pair):
            want = mx.take(mx.dequantize(*table, group_size=group_size, bits=bits), layers[layer], axis=0)
            assert result.dtype == dtype and result.shape == shape
            assert np.array_equal(np.array(result.view(mx.uint8)), np.array(want.reshape(shape).view(mx.uint8)))


def test_quantized_stores_and_rebuilds_from_several_threads_at_once_are_bit_exact():
    """On CPU a quantized pool's values are quantized and dequantized on a second stream of the calling
    thread (MLX streams belong to the thread that made them): threads storing and rebuilding at once each
    get exactly what one thread gets alone."""
    spec = QSPEC.with_format("q4g32")
    pool = BlockPool(spec, 400, grow_buffer_cache=False)
    caches = [adapter.build_layer_cache(window, *(mx.random.normal((1, 2, 23 if window is None else 6, 32),
                                                                    key=mx.random.key(3 * layer + part))
                                                   .astype(mx.bfloat16) for part in (1, 2)), 23)
              for layer, window in enumerate(spec.layer_windows)]
    tokens = list(range(23))
    first = cache_to_blocks(pool, "first", caches, tokens)
    want_packed = packed(first)
    want = [visible(cache)[:2] for cache in blocks_to_cache(pool, first, views=False)]

    def store_and_rebuild(n):
        for i in range(n):
            handle = cache_to_blocks(pool, f"agent {threading.get_ident()}", caches, tokens)
            got_packed = packed(handle)
            assert [len(layer) for layer in got_packed] == [len(layer) for layer in want_packed]
            assert all(np.array_equal(a, b) for got, exp in zip(got_packed, want_packed) for a, b in zip(got, exp))
            rebuilt = blocks_to_cache(pool, handle, views=False, room=(i % 2) * 5)
            for exp, cache in zip(want, rebuilt):
                assert all(np.array_equal(a, b) for a, b in zip(visible(cache)[:2], exp))
            handle.release()

    run_in_threads(store_and_rebuild, 10)
    first.release()
    assert pool.free_blocks == pool.total_blocks


@pytest.mark.parametrize("model_name", ["llama32", "gemma32"])
def test_a_rebuilt_model_cache_is_the_dequantized_cache(request, model_name):
    model, _ = request.getfixturevalue(model_name)
    spec = ModelCacheSpec.from_model(model).with_format("q4g32")
    pool = BlockPool(spec, spec.blocks_per_agent(602))
    cache, context, _ = prefill(model, prompt_tokens(600), decode=2)
    with cache_to_blocks(pool, "a", cache, context) as handle:
        rebuilt = blocks_to_cache(pool, handle)
        for original, copy in zip(cache, rebuilt):
            assert type(copy) is type(original) and copy.offset == original.offset
            for got, want in zip(adapter.read_layer_cache(copy)[:2], adapter.read_layer_cache(original)[:2]):
                expected = mx.dequantize(*quantized(want, spec.block_format), group_size=32, bits=4)
                assert mx.array_equal(got, expected).item()


def blocks_by_index(handle, layer):
    first = handle.spec.layer_block_range(layer, handle.num_tokens)[0]
    return {first + k: block for k, block in enumerate(handle.layer_block_ids(layer))}


@pytest.mark.parametrize("model_name", ["llama32", "gemma32"])
def test_a_context_stored_rebuilt_and_continued_is_quantized_once(request, model_name):
    engine = make_engine(request.getfixturevalue(model_name), pool_format="q4g32")
    spec, size = engine.spec, engine.spec.block_size
    first = engine.generate("a", "the old river ran past a quiet town " * 40, max_tokens=6)
    n = first.blocks.num_tokens
    assert n % size  # a partly filled tail block
    second = engine.generate("a", " and then", cache=first.blocks, max_tokens=6)

    before, after = packed(first.blocks), packed(second.blocks)
    for layer in range(spec.n_layers):
        old, new = blocks_by_index(first.blocks, layer), blocks_by_index(second.blocks, layer)
        assert all(new[i] == old[i] for i in new if i < n // size)  # whole blocks: shared, not copied
        assert new[n // size] != old[n // size]  # the tail block was written anew...
        start = spec.visible_range(layer, second.blocks.num_tokens)[0]  # ...its old tokens' bytes unchanged
        old_first, new_first = (min(blocks) * size for blocks in (old, new))
        for rows_before, rows_after in zip(before[layer], after[layer]):
            assert np.array_equal(rows_after[:, start - new_first : n - new_first],
                                  rows_before[:, start - old_first : n - old_first])


def test_trimming_inside_a_block_keeps_the_reused_rows_packed(llama32):
    engine = make_engine(llama32, pool_format="q8g32")
    first = engine.generate("a", "red green blue " * 120, max_tokens=4)
    context = list(first.blocks.token_ids)
    edited = context[:300] + [t + 1 for t in context[300:310]]
    resent = engine.generate("a", edited, cache=first.blocks, match_prefix=True, max_tokens=5)
    assert resent.reused_tokens == 300
    old, new = packed(first.blocks), packed(resent.blocks)
    for layer in range(engine.spec.n_layers):
        for rows_old, rows_new in zip(old[layer], new[layer]):
            assert np.array_equal(rows_new[:, :300], rows_old[:, :300])
            assert not np.array_equal(rows_new[:, 300:310], rows_old[:, 300:310])  # the edited tokens are new


def test_quantized_agents_batch_together_and_each_continues_as_alone(llama32):
    engine = make_engine(llama32, total_blocks=300, pool_format="q4g32")
    prompts = {"alice": "the old river ran past a quiet town " * 30, "bob": "one two three four five six " * 40}
    firsts = {c.agent_id: c for c in [engine.generate(a, p, max_tokens=5) for a, p in prompts.items()]}
    for agent in prompts:
        engine.submit(agent, " again", cache=firsts[agent].blocks, max_tokens=12)
    together = {c.agent_id: c.token_ids for c in engine.step()}
    alone = {a: engine.generate(a, " again", cache=firsts[a].blocks, max_tokens=12).token_ids for a in prompts}
    assert together == alone and len(set(map(tuple, alone.values()))) == 2


@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_a_saved_quantized_agent_loads_bit_exact_in_a_new_process(tmp_path, fmt):
    spec = ModelCacheSpec.preset("smollm2-135m").with_layers(4).with_format(fmt)
    store = AgentCacheStore(tmp_path, BlockPool(spec, 64, grow_buffer_cache=False), FINGERPRINT)
    dense_bytes = ModelCacheSpec.preset("smollm2-135m").with_layers(4).bytes_per_agent(700)
    with random_handle(store.pool, "agent", 700, seed=3) as handle:
        store.save(handle)
        expected = packed(handle)
    file_bytes = (tmp_path / "agent.safetensors").stat().st_size
    assert file_bytes < {"q8": 0.54, "q4": 0.29}[fmt] * dense_bytes  # packed blocks, header included

    child = run_python(
        "import sys, json, mlx.core as mx, numpy as np\n"
        "from semantic.domain.services import BlockPool\n"
        "from semantic.domain.value_objects import ModelCacheSpec\n"
        "from semantic.persistence import AgentCacheStore\n"
        "from test_persistence_support import FINGERPRINT\n"
        "from test_quantized_blocks import packed\n"
        "spec = ModelCacheSpec.preset('smollm2-135m').with_layers(4).with_format(sys.argv[2])\n"
        "store = AgentCacheStore(sys.argv[1], BlockPool(spec, 64, grow_buffer_cache=False), FINGERPRINT)\n"
        "with store.load('agent') as handle:\n"
        "    print(json.dumps([[p.tobytes().hex() for p in layer] for layer in packed(handle)]))\n",
        tmp_path, fmt,
    )
    assert child == [[p.tobytes().hex() for p in layer] for layer in expected]


def test_format_mismatches_are_typed_errors_that_change_nothing(tmp_path, llama32):
    formats = {"dense": QSPEC, "q4": QSPEC.with_format("q4g32"), "q8": QSPEC.with_format("q8g32")}
    stores = {}
    for name, spec in formats.items():
        (tmp_path / name).mkdir()
        stores[name] = AgentCacheStore(tmp_path / name, BlockPool(spec, 40, grow_buffer_cache=False), FINGERPRINT)
        with random_handle(stores[name].pool, "agent", 11, seed=1) as handle:
            stores[name].save(handle)
    for file_format, pool_format in (("q4", "dense"), ("dense", "q4"), ("q8", "q4")):
        (stores[pool_format].directory / "other.safetensors").write_bytes(
            (stores[file_format].directory / "agent.safetensors").read_bytes())
        with nothing_changes(stores[pool_format]), pytest.raises(IncompatibleCacheFileError, match="block format"):
            stores[pool_format].load("other")

    with random_handle(stores["q4"].pool, "x", 11, seed=2) as q4_handle, nothing_changes(stores["dense"]):
        with pytest.raises(IncompatibleCacheError, match="q4g32 blocks"):
            stores["dense"].pool.check_handle(q4_handle)
        with pytest.raises(IncompatibleCacheError):
            stores["dense"].put(q4_handle)

    engine = make_engine(llama32, total_blocks=40)
    q4_engine = make_engine(llama32, total_blocks=40, pool_format="q4g32")
    with q4_engine.generate("a", "the old river", max_tokens=3).blocks as q4_blocks:
        usage = engine.pool.usage()
        with pytest.raises(IncompatibleCacheError):
            engine.submit("a", " more", cache=q4_blocks)
        assert engine.pool.usage() == usage and engine.pending == 0
    with pytest.raises(IncompatibleCacheError, match="pool's spec"):
        BlockPoolBatchEngine(*llama32, engine.pool, q4_engine.spec)


def test_the_quality_experiment_measures_dense_against_itself_as_exact(tmp_path):
    from experiments.exp_014_quantized_quality import main

    out = tmp_path / "quality.json"
    assert main(["--model", "tiny-llama", "--turns", "2", "--tokens-per-turn", "4", "--min-generated", "8", "--ppl-tokens", "200",
                 "--ppl-chunk", "80", "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    dense, q8, q4 = (record["results"][f] for f in ("dense", "q8g32", "q4g32"))
    assert dense["greedy_agreement"] == 1.0 and dense["mean_kl"] == 0.0 and dense["positions"] >= 8
    assert 0 < q8["mean_kl"] < q4["mean_kl"]  # 8 bits change the distributions less than 4
    assert q8["bytes_per_block_vs_dense"] == 0.5625 and q4["bytes_per_block_vs_dense"] == 0.3125



@pytest.mark.parametrize("fmt", ["q8", "q4"])
def test_an_empty_gather_is_empty_as_in_a_dense_pool(fmt):
    """A gather of no blocks: empty arrays of the dense pool's shapes (MLX's reshape of an empty array raised)."""
    spec = ModelCacheSpec(n_layers=1, n_kv_heads=2, k_head_dim=64, v_head_dim=64, dtype="float16")
    dense, quantized = BlockPool(spec, 2), BlockPool(spec.with_format(fmt), 2)
    assert [a.shape for a in quantized.gather([[]])] == [a.shape for a in dense.gather([[]])] == [(1, 2, 0, 64)] * 2
    assert [a.shape for a in quantized.gather_stored([[]])] == [(1, 2, 0, part.width)
                                                                for part in quantized.spec.stored_parts]
    apart = [[(k.shape, v.shape) for k, v in pool.gather_apart(pool.gather_rows([[], []][:1]))]
             for pool in (quantized, dense)]  # a bare ValueError from MLX's reshape before
    assert apart[0] == apart[1] == [((1, 2, 0, 64), (1, 2, 0, 64))]


@pytest.mark.parametrize("fmt", ["dense", "q8", "q4"])
def test_a_write_of_no_tokens_beside_others_writes_the_others(fmt):
    """A write of no blocks and no tokens in a write_many: NumPy took its empty id list as float indices
    (IndexError, quantized pools), and a memoryview of a source with no tokens could not be cast (TypeError,
    dense pools on the host)."""
    pool = BlockPool(ModelCacheSpec(2, 2, 64, 64, "float32", block_size=16).with_format(fmt), 4)
    ids = pool.allocate(1, "a")
    data = mx.arange(2 * 5 * 64, dtype=mx.float32).reshape(1, 2, 5, 64) / 64
    empty = mx.zeros((1, 2, 0, 64))
    pool.write_many([([], 0, empty, empty, 0), (ids, 0, data, data, 0)])
    fresh = BlockPool(pool.spec, 4)
    pool_ids = fresh.allocate(1, "a")
    fresh.write_many([(pool_ids, 0, data, data, 0)])
    assert all(mx.array_equal(a, b).item() for a, b in zip(pool.gather([ids]), fresh.gather([pool_ids])))
    pool.check_invariants()


@pytest.mark.parametrize("fmt", ["q8g32", "q4g32"])
def test_stored_parts_are_written_only_into_blocks_held_once_and_only_in_the_pools_format(fmt):
    """The quantized path of write_stored skipped the dense path's checks: it rewrote a shared block (another
    agent's context), wrote a free one, and cast parts of another dtype."""
    spec = QSPEC.with_format(fmt)
    pool = BlockPool(spec, total_blocks=24)
    alice = random_handle(pool, "alice", 11, seed=1)
    bob = alice.share("bob")
    before = packed(alice)
    (fresh,) = pool.allocate(1, "carol")
    free = next(b for b in range(24) if pool.refcount(b) == 0)

    def parts(dtype_of=lambda part: getattr(mx, part.dtype), heads=spec.n_kv_heads):
        return [mx.zeros((1, heads, spec.block_size, part.width), dtype=dtype_of(part)) for part in spec.stored_parts]

    usage = pool.usage()
    for error, block, stored in [
        (BlockOwnershipError, alice.layer_block_ids(0)[0], parts()),  # shared with bob
        (BlockOwnershipError, free, parts()),
        (IncompatibleCacheError, fresh, parts(lambda part: mx.float16)),
        (IncompatibleCacheError, fresh, parts(heads=1)),
        (IncompatibleCacheError, fresh, parts()[:-1]),
    ]:
        with pytest.raises(error):
            pool.write_stored([([block], 0, stored, 0)])
        assert all(np.array_equal(a, b) for now, then in zip(packed(alice), before) for a, b in zip(now, then))
        assert pool.usage() == usage
        pool.check_invariants()
    pool.write_stored([([fresh], mx.array(0), parts(), np.int64(0))])  # 0-d MLX / NumPy ints: a bare ValueError before
    bob.release()
    alice.release()


def test_row_copies_and_views_that_cannot_be_are_typed_errors_that_change_nothing():
    """copy_token_rows took malformed copies to bare TypeErrors and ValueErrors, and it and block_views
    raised AssertionError for a pool of the other kind."""
    pool = BlockPool(QSPEC.with_format("q8g32"), total_blocks=16)
    alice = random_handle(pool, "alice", 11, seed=1)
    source = alice.layer_block_ids(0)[0]
    (fresh,) = pool.allocate(1, "carol")
    before, usage = packed(alice), pool.usage()
    for copies in ([(fresh, source, "x", 2)], [(fresh, source, 0.5, 2)], [(fresh, source)], [5],
                   [(fresh, source, 3, 2)], [(fresh, source, 0, 10**30)], (c for c in [(fresh, source, 0, 2)])):
        with pytest.raises(InvalidRequestError):
            pool.copy_token_rows(copies)
        assert pool.usage() == usage
        assert all(np.array_equal(a, b) for now, then in zip(packed(alice), before) for a, b in zip(now, then))
    with pytest.raises(IncompatibleCacheError, match="no dense view"):
        pool.block_views([source], 0, 2)
    with pytest.raises(IncompatibleCacheError, match="for quantized blocks"):
        BlockPool(QSPEC, total_blocks=2).copy_token_rows([(0, 1, 0, 2)])
    pool.copy_token_rows([(fresh, source, mx.array(0), np.int32(2))])
    assert all(mx.array_equal(a[..., :2, :], b[..., :2, :]).item()
               for a, b in zip(pool.gather_stored([[fresh]]), pool.gather_stored([[source]])))
    alice.release()


@pytest.mark.parametrize("n_blocks,first_index,first_token,n_tokens", [
    (3, 0, 0, 10), (1, 0, 0, 600), (1, 0, 600, 10), (1, 5, 0, 10), (1, 0, 0, 0),
])
def test_stored_blocks_that_do_not_fit_their_tokens_are_refused_and_nothing_is_written(n_blocks, first_index,
                                                                                        first_token, n_tokens):
    """write_stored of a quantized pool took these: tokens dropped, blocks left as zeros, or an untyped MLX
    error, where the dense pool's write_many refuses them."""
    pool = BlockPool(ModelCacheSpec(1, 2, 32, 32).with_format("q8g32"), 4, grow_buffer_cache=False)
    ids = pool.allocate(n_blocks, "a")
    parts = [mx.zeros((1, 2, n_tokens, part.width), dtype=getattr(mx, part.dtype)) for part in pool.spec.stored_parts]
    before = pool.gather_stored([list(range(4))])
    with pytest.raises(InvalidRequestError, match="do not fit"):
        pool.write_stored([(ids, first_index, parts, first_token)])
    assert all(mx.array_equal(a, b).item() for a, b in zip(before, pool.gather_stored([list(range(4))])))
    pool.check_invariants()
