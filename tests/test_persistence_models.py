"""On real local models: a context read back from disk continues with exactly the tokens the never-saved
context gives, in this process and after a restart; agents that do not all fit take turns through disk;
fingerprints tell models apart."""

import json

import mlx.core as mx
import mlx_lm
import pytest

from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.domain.errors import InvalidRequestError, PoolExhaustedError, UnknownRequestError
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.persistence import AgentCacheStore, CacheWriteError, IncompatibleCacheFileError, model_fingerprint
from semantic.testing.local_models import build_local_model, load_local_model
from test_persistence_support import nothing_changes, run_python, snapshot

WORDS = ("the old river ran past a quiet town where people made bread and told long stories about the sea "
         "and the mountains and the years that came before them").split()


def text(n_words: int, offset: int = 0) -> str:
    return " ".join(WORDS[(offset + i) % len(WORDS)] for i in range(n_words))


# Over 512 tokens: several blocks, and past every sliding window (128 and 512).
LONG_PROMPT = text(700)
FOLLOW_UP = " and then, one morning, " + text(12, offset=5)


def engine_for(preset: str, total_blocks: int = 200) -> BlockPoolBatchEngine:
    model, tokenizer = load_local_model(preset)
    return BlockPoolBatchEngine(model, tokenizer, BlockPool(ModelCacheSpec.from_model(model), total_blocks))


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gemma3", "tiny-gemma3-w512"])
def test_a_loaded_context_continues_exactly_like_the_never_saved_one(tmp_path, preset):
    engine = engine_for(preset)
    store = AgentCacheStore.for_engine(tmp_path, engine)
    first = engine.generate("agent", LONG_PROMPT, max_tokens=24)
    assert first.blocks.num_tokens > 700
    store.save(first.blocks)
    with store.load("agent") as loaded:
        assert snapshot(loaded) == snapshot(first.blocks)
        resumed = engine.generate("agent", FOLLOW_UP, cache=loaded, max_tokens=24)
    never_saved = engine.generate("agent", FOLLOW_UP, cache=first.blocks, max_tokens=24)
    assert resumed.token_ids == never_saved.token_ids
    assert len(set(resumed.token_ids)) > 4  # a real continuation, not one token repeated


# ---- a restart ------------------------------------------------------------------------------------
PROMPTS = {"short": text(40), "two-blocks": text(300, offset=3), "long": LONG_PROMPT}

ENGINE_IN_CHILD = """
import json, sys
from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.domain.errors import PoolExhaustedError
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.persistence import AgentCacheStore
from semantic.testing.local_models import load_local_model
directory, preset = sys.argv[1], sys.argv[2]
prompts, follow_up = json.loads(sys.argv[3]), sys.argv[4]
model, tokenizer = load_local_model(preset)
engine = BlockPoolBatchEngine(model, tokenizer, BlockPool(ModelCacheSpec.from_model(model), 200))
store = AgentCacheStore.for_engine(directory, engine)
"""

# Process A: run the agents, keep them in the store, close it (all written); then continue the never-saved contexts.
BEFORE_RESTART = ENGINE_IN_CHILD + """
contexts = {}
for agent, prompt in prompts.items():
    completion = store.generate(engine, agent, prompt, max_tokens=16)
    contexts[agent] = completion.blocks
store.close()
continued = {agent: engine.generate(agent, follow_up, cache=blocks, max_tokens=16).token_ids
             for agent, blocks in contexts.items()}
print(json.dumps({"agents": store.list(), "fingerprint": store.model_fingerprint, "continued": continued}))
"""

# Process B: a fresh process continues every agent from what process A left on disk.
AFTER_RESTART = ENGINE_IN_CHILD + """
agents = store.list()
continued = {agent: store.generate(engine, agent, follow_up, max_tokens=16).token_ids for agent in agents}
print(json.dumps({"agents": agents, "fingerprint": store.model_fingerprint, "continued": continued}))
"""


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gemma3"])
def test_agents_continue_identically_in_a_new_process(tmp_path, preset):
    args = (tmp_path, preset, json.dumps(PROMPTS), FOLLOW_UP)
    before = run_python(BEFORE_RESTART, *args)
    after = run_python(AFTER_RESTART, *args)
    assert before["agents"] == after["agents"] == sorted(PROMPTS)
    assert before["fingerprint"] == after["fingerprint"]
    assert after["continued"] == before["continued"]


# ---- more agents than fit -----------------------------------------------------------------------------
N_AGENTS, ROUNDS = 6, 3
AGENT_BLOCKS = 8  # tiny-llama: 4 layers x 2 blocks for the ~500-token first turns below (3 blocks later)


@pytest.mark.parametrize("limit", ["memory budget", "pool size"])
def test_agents_answer_correctly_when_more_of_them_than_fit_take_turns(tmp_path, limit):
    """Six agents take three rounds of turns, in the order that is worst for an LRU. The store keeps at most
    about two of them in the pool (by its budget, or because the pool is that small); every answer equals
    the answer of an engine that keeps every agent in a roomy pool."""
    reference = engine_for("tiny-llama")
    if limit == "memory budget":
        engine = engine_for("tiny-llama")
        budget = 2 * AGENT_BLOCKS * engine.pool.block_bytes
    else:  # two agents, plus the blocks of the turn in progress
        engine, budget = engine_for("tiny-llama", total_blocks=3 * AGENT_BLOCKS), None
    store = AgentCacheStore.for_engine(tmp_path, engine, memory_budget_bytes=budget)
    kept = {}
    for turn in range(ROUNDS):
        for i in range(N_AGENTS):
            agent = f"agent-{i}"
            prompt = text(300, offset=i) if turn == 0 else FOLLOW_UP
            previous = kept.get(agent)
            answer = reference.generate(agent, prompt, cache=previous, max_tokens=8)
            kept[agent] = answer.blocks
            completion = store.generate(engine, agent, prompt, max_tokens=8)
            assert completion.token_ids == answer.token_ids, (turn, agent)
            completion.blocks.release()
            assert len(store.resident) < N_AGENTS
            if budget is not None:
                assert store.resident_bytes <= budget
                assert engine.pool.used_blocks * engine.pool.block_bytes <= budget
            engine.pool.check_invariants()
    assert store.list() == sorted(kept)
    assert len(list(store.directory.glob("*.safetensors"))) >= N_AGENTS - 2  # the evicted ones are on disk


def test_a_turn_that_cannot_get_blocks_is_cancelled_with_a_typed_error(tmp_path):
    engine = engine_for("tiny-llama", total_blocks=12)
    store = AgentCacheStore.for_engine(tmp_path, engine)
    pinned = store.generate(engine, "a", text(300), max_tokens=8).blocks  # 8 of 12 blocks, held by us
    with nothing_changes(store), pytest.raises(PoolExhaustedError, match="handles held outside the store"):
        store.generate(engine, "b", text(300, offset=1), max_tokens=8)
    assert engine.pending == 0 and "b" not in store
    pinned.release()
    assert store.generate(engine, "b", text(300, offset=1), max_tokens=8).token_ids  # now "a" can move to disk


def test_a_turn_cancelled_while_it_waits_for_room_raises_and_moves_no_more_agents_to_disk(tmp_path, monkeypatch):
    """Cancelled (``engine.cancel`` or ``close()``, from another thread) while it waited for room: before, the turn
    went on making room for a request that would never run, moving every agent to disk, then raised
    ``PoolExhaustedError`` though nothing pinned anything. Now ``UnknownRequestError``, after the one move made
    before the cancel."""
    engine = engine_for("tiny-llama", total_blocks=2 * AGENT_BLOCKS + 4)  # a third agent's turn waits for room
    store = AgentCacheStore.for_engine(tmp_path, engine)
    for agent in "ab":
        store.generate(engine, agent, text(300, offset=ord(agent)), max_tokens=8).blocks.release()
    making_room = store.make_room

    def cancelled_meanwhile(n_blocks):  # the cancel lands while the store moves an agent to disk
        moved = making_room(n_blocks)
        for uid in list(engine._by_uid):
            engine.cancel(uid)
        return moved

    monkeypatch.setattr(store, "make_room", cancelled_meanwhile)
    with pytest.raises(UnknownRequestError, match="cancelled"):
        store.generate(engine, "c", text(300, offset=3), max_tokens=8)
    assert len(store.resident) == 1 and engine.pending == 0 and "c" not in store
    engine.pool.check_invariants()


@pytest.mark.parametrize("kwargs", [{"bogus": 1}, {"cache": None}, {"max_token": 3}])
def test_generate_refuses_keywords_submit_does_not_take_with_a_typed_error(tmp_path, kwargs):
    """Before, submit's own TypeError came out (or "got multiple values for cache")."""
    engine = engine_for("tiny-llama", total_blocks=24)
    store = AgentCacheStore.for_engine(tmp_path, engine)
    store.generate(engine, "a", text(20), max_tokens=2).blocks.release()
    with nothing_changes(store), pytest.raises(InvalidRequestError):
        store.generate(engine, "a", text(5, offset=1), **kwargs)
    assert engine.pending == 0


def test_a_write_through_turn_whose_write_fails_keeps_the_turn_and_says_so(tmp_path):
    """Before, the error came out and the turn was lost: its text with the exception, its context unstored."""
    engine = engine_for("tiny-llama", total_blocks=48)
    store = AgentCacheStore.for_engine(tmp_path, engine, write_through=True)
    store.generate(engine, "a", text(20), max_tokens=2).blocks.release()
    (store.directory / ".a.lock").unlink()
    (store.directory / ".a.lock").mkdir()  # a's file cannot be written now
    with pytest.raises(CacheWriteError) as raised:
        store.generate(engine, "a", text(5, offset=1), max_tokens=3)
    turn = raised.value.completion
    context = turn.blocks.token_ids
    assert turn.token_ids and store.resident == ("a",)
    with store.get("a") as current:
        assert current.token_ids == context
    turn.blocks.release()
    (store.directory / ".a.lock").rmdir()
    store.close()
    with store.load("a") as saved:
        assert saved.token_ids == context


# ---- threads ---------------------------------------------------------------------------------------
LOADS_BESIDE_STEPS = """
import faulthandler, json, sys, threading
faulthandler.dump_traceback_later(60, exit=True)  # a hang ends the child, printing every thread's stack
from semantic.adapters import mlx_threads
from semantic.application.batch_engine import BlockPoolBatchEngine
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.persistence import AgentCacheStore
from semantic.testing.local_models import load_local_model
model, tokenizer = load_local_model("tiny-llama")
engine = BlockPoolBatchEngine(model, tokenizer, BlockPool(ModelCacheSpec.from_model(model), 64), prefill_step_size=64)
store = AgentCacheStore.for_engine(sys.argv[1], engine)
first = engine.generate("alice", list(range(10, 300)), max_tokens=2)
store.save(first.blocks)
first.blocks.release()
stepped, loads = threading.Event(), []

def step():  # the README's server: one thread steps; each prefill chunk ends in mlx-lm's mx.clear_cache()
    for i in range(12):
        engine.submit(f"s{i}", list(range(20, 400)), max_tokens=2)
        for completion in engine.step():
            completion.blocks.release()
    stepped.set()
    mlx_threads.end_thread()

def load():
    while not stepped.is_set():
        store.load("alice").release()
        loads.append(1)
    mlx_threads.end_thread()

threads = [threading.Thread(target=step), threading.Thread(target=load)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"loads": len(loads)}))
"""


def test_loading_an_agent_beside_a_stepping_engine_does_not_freeze_the_process(tmp_path):
    """A store's load on one thread while another steps the engine. MLX read the file object on its own threads,
    which need the GIL for it, while mlx-lm's ``mx.clear_cache()`` held the GIL waiting for them: the whole
    process froze within a second. In a child, which ends itself with every thread's stack if it hangs."""
    assert run_python(LOADS_BESIDE_STEPS, str(tmp_path), timeout=240)["loads"] > 0


# ---- fingerprints -------------------------------------------------------------------------------
def test_fingerprints_tell_apart_models_of_one_architecture():
    model, tokenizer = load_local_model("tiny-llama")
    fingerprint = model_fingerprint(model, tokenizer)
    assert fingerprint == model_fingerprint(model, tokenizer)
    assert fingerprint.startswith("llama-4x2x32-bfloat16:")
    other_weights = load_local_model("tiny-llama", seed=1)  # same architecture and geometry, another "fine-tune"
    others = {
        "other weights": model_fingerprint(*other_weights),
        "other dtype": model_fingerprint(*load_local_model("tiny-llama", dtype="float32")),
        "no tokenizer": model_fingerprint(model),
    }
    assert fingerprint not in others.values() and len(set(others.values())) == len(others)


def test_any_change_to_the_weights_changes_the_fingerprint():
    """Swapping two weights, or moving two by one ulp in opposite directions, kept the old sampled
    fingerprint (and each model accepted the other's caches)."""
    model, tokenizer = mlx_lm.load(str(build_local_model("tiny-llama")))  # a private copy to change
    original = model_fingerprint(model, tokenizer)
    projection = model.model.layers[1].self_attn.o_proj
    weight = projection.weight
    flat = weight.reshape(-1)
    bits = flat.view(mx.uint16)
    changes = {
        "swap of flat 1001 and 2003": flat.at[mx.array([1001, 2003])].add(flat[mx.array([2003, 1001])] - flat[mx.array([1001, 2003])]),
        "+1 ulp and -1 ulp": bits.at[mx.array([1001, 2003])].add(mx.array([1, -1], dtype=mx.int32).astype(mx.uint16)).view(weight.dtype),
        "one weight doubled": flat.at[1234].multiply(2),
    }
    seen = {original}
    for name, changed in changes.items():
        assert not mx.array_equal(changed, flat).item(), name
        projection.weight = changed.reshape(weight.shape)
        fingerprint = model_fingerprint(model, tokenizer)
        assert fingerprint not in seen, name
        seen.add(fingerprint)
    projection.weight = weight
    assert model_fingerprint(model, tokenizer) == original


def test_a_file_with_an_old_sampled_fingerprint_is_refused_with_its_own_message(tmp_path):
    engine = engine_for("tiny-llama")
    first = engine.generate("agent", text(40), max_tokens=4)
    old_scheme = "llama-4x2x32-bfloat16:0123456789abcdef0123456789abcdef"
    AgentCacheStore(tmp_path, engine.pool, old_scheme).save(first.blocks)
    store = AgentCacheStore.for_engine(tmp_path, engine)
    with nothing_changes(store), pytest.raises(IncompatibleCacheFileError, match="older model fingerprint"):
        store.get("agent")


def test_a_file_of_another_model_of_the_same_geometry_is_refused(tmp_path):
    engine = engine_for("tiny-llama")
    first = engine.generate("agent", text(40), max_tokens=4)
    AgentCacheStore.for_engine(tmp_path, engine).save(first.blocks)
    other_model = AgentCacheStore(tmp_path, engine.pool, model_fingerprint(*load_local_model("tiny-llama", seed=1)))
    with nothing_changes(other_model), pytest.raises(IncompatibleCacheFileError, match="written for model"):
        other_model.get("agent")
