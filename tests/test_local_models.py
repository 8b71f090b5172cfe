"""Local model folders: real files, opened by the real ``mlx_lm.load``, decoded greedily."""

import os
import pathlib

import mlx.core as mx
import mlx_lm
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step

from semantic.domain.errors import InvalidRequestError
from semantic.domain.value_objects import ModelCacheSpec
from semantic.testing import local_models
from semantic.testing.local_models import PRESETS, build_local_model, load_local_model

TINY_PRESETS = sorted(name for name in PRESETS if name.startswith("tiny-"))
PROMPTS = ("The old man came back to the state", "Where were the two people")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> pathlib.Path:
    return tmp_path_factory.mktemp("local_models")


@pytest.fixture(scope="session")
def loaded(models_dir):
    """Each preset built once into the session folder and loaded with mlx_lm.load."""
    cache = {}

    def load(preset):
        if preset not in cache:
            cache[preset] = mlx_lm.load(str(build_local_model(preset, models_dir / preset)))
        return cache[preset]

    return load


def greedy_tokens(model, tokenizer, prompt, max_tokens):
    prompt_ids = mx.array(tokenizer.encode(prompt))
    return [int(token) for token, _ in generate_step(prompt_ids, model, max_tokens=max_tokens)]


def test_presets_cover_the_promised_architectures():
    assert {"smollm2-135m", "smollm2-135m-narrow", "tiny-llama", "tiny-qwen3", "tiny-qwen2",
            "tiny-gemma3", "tiny-gemma3-w512"} <= set(PRESETS)


@pytest.mark.parametrize(
    "preset, max_tokens, min_distinct",
    [*((name, 40, 8) for name in TINY_PRESETS),
     ("smollm2-135m-narrow", 40, 8),
     # 30 layers at hidden 576 decode slowly on CPU: a few tokens show it varies.
     ("smollm2-135m", 6, 4)],
)
def test_greedy_decoding_varies_within_and_across_prompts(loaded, preset, max_tokens, min_distinct):
    model, tokenizer = loaded(preset)
    continuations = [greedy_tokens(model, tokenizer, prompt, max_tokens) for prompt in PROMPTS]
    for tokens in continuations:
        assert len(tokens) == max_tokens
        assert len(set(tokens)) >= min_distinct, tokens
    assert continuations[0] != continuations[1]


@pytest.mark.parametrize("preset", TINY_PRESETS)
def test_config_matches_the_built_model(loaded, preset):
    model, _ = loaded(preset)
    spec = PRESETS[preset]
    assert model.model_type == spec.config["model_type"]
    assert len(model.layers) == spec.config["num_hidden_layers"]
    logits = model(mx.array([[1, 5, 9]]))
    assert logits.shape == (1, 3, spec.vocab_size)
    assert logits.dtype == mx.bfloat16


def test_smollm2_preset_has_smollm2_geometry(loaded):
    model, tokenizer = loaded("smollm2-135m")
    args = model.args
    assert (args.hidden_size, args.num_hidden_layers, args.intermediate_size) == (576, 30, 1536)
    assert (args.num_attention_heads, args.num_key_value_heads, args.head_dim) == (9, 3, 64)
    assert (args.rope_theta, args.rms_norm_eps, args.tie_word_embeddings) == (100000, 1e-5, True)
    assert args.vocab_size == len(tokenizer.vocab) == 8192


def test_narrow_smollm2_keeps_its_cache_geometry_and_tokenizer(loaded, models_dir):
    full, full_tokenizer = loaded("smollm2-135m")
    narrow, narrow_tokenizer = loaded("smollm2-135m-narrow")
    spec = ModelCacheSpec.from_model(narrow)
    assert spec == ModelCacheSpec.from_model(full)
    assert (spec.n_layers, spec.n_kv_heads, spec.k_head_dim, spec.v_head_dim) == (30, 3, 64, 64)
    assert narrow_tokenizer.vocab == full_tokenizer.vocab
    tokenizer_json = models_dir / "smollm2-135m-narrow" / "tokenizer.json"
    assert tokenizer_json.read_bytes() == (models_dir / "smollm2-135m" / "tokenizer.json").read_bytes()

    def parameters(model):
        return sum(array.size for _, array in tree_flatten(model.parameters()))

    assert (narrow.args.hidden_size, narrow.args.intermediate_size) == (144, 384)
    assert parameters(narrow) * 8 < parameters(full)


def test_gemma3_presets_mix_sliding_window_and_global_layers(loaded):
    for preset, window in (("tiny-gemma3", 128), ("tiny-gemma3-w512", 512)):
        model, _ = loaded(preset)
        caches = model.make_cache()
        windows = [getattr(cache, "max_size", None) for cache in caches]
        assert windows[:6] == [window] * 5 + [None]
        assert len(caches) > 6


def test_logits_stay_finite_past_the_sliding_window(loaded):
    model, tokenizer = loaded("tiny-gemma3")
    prompt = tokenizer.encode(" ".join(["the old man came back to the world"] * 40))
    assert len(prompt) > 2 * 128
    steps = generate_step(mx.array(prompt), model, max_tokens=4, prefill_step_size=128)
    for _, logprobs in steps:
        assert mx.all(mx.isfinite(logprobs)).item()


def test_tokenizer_adds_bos_round_trips_and_knows_eos(loaded):
    _, tokenizer = loaded("tiny-llama")
    text = "Two people came back, and 1984 was a good year?"
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.eos_token_id in tokenizer.eos_token_ids
    assert tokenizer.eos_token_id != tokenizer.bos_token_id
    assert max(ids) < PRESETS["tiny-llama"].vocab_size


def test_same_seed_gives_identical_files_and_another_seed_does_not(tmp_path):
    first = build_local_model("tiny-qwen3", tmp_path / "first", seed=7)
    second = build_local_model("tiny-qwen3", tmp_path / "second", seed=7)
    other = build_local_model("tiny-qwen3", tmp_path / "other", seed=8)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    assert (first / "model.safetensors").read_bytes() != (other / "model.safetensors").read_bytes()
    assert (first / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()


def test_dtype_is_written_into_the_weights(tmp_path):
    folder = build_local_model("tiny-llama", tmp_path / "f32", dtype="float32")
    weights = mx.load(str(folder / "model.safetensors"))
    assert {array.dtype for array in weights.values()} == {mx.float32}


def test_a_complete_folder_is_reused_not_rewritten(tmp_path):
    folder = build_local_model("tiny-llama", tmp_path / "model")
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert build_local_model("tiny-llama", tmp_path / "model") == folder
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before


def test_a_folder_of_another_seed_is_rebuilt(tmp_path):
    folder = build_local_model("tiny-llama", tmp_path / "model", seed=1)
    seed_one = (folder / "model.safetensors").read_bytes()
    build_local_model("tiny-llama", folder, seed=2)
    assert (folder / "model.safetensors").read_bytes() != seed_one


def test_an_interrupted_build_is_rebuilt_and_its_leftovers_removed(tmp_path):
    folder = tmp_path / "model"
    # What a build killed mid-way leaves: its temp folder (named after a dead
    # process) and, from an older non-atomic writer, a folder with no marker.
    dead_pid = 2**22 + 12345  # above Linux's pid_max, so never a live process
    stray = tmp_path / f".model.tmp-{dead_pid}-abc123"
    stray.mkdir()
    (stray / "config.json").write_text("{")
    folder.mkdir()
    (folder / "config.json").write_text("{")
    (folder / "model.safetensors").write_bytes(b"truncated")

    assert build_local_model("tiny-llama", folder) == folder.absolute()
    assert not stray.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    model, tokenizer = mlx_lm.load(str(folder))
    assert len(greedy_tokens(model, tokenizer, PROMPTS[0], 3)) == 3


def test_a_build_that_a_concurrent_build_beats_keeps_the_finished_folder(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    write_folder = local_models._write_folder
    rival_weights = []

    def write_while_a_rival_finishes_first(staging, *args):
        write_folder(staging, *args)
        monkeypatch.setattr(local_models, "_write_folder", write_folder)
        build_local_model("tiny-qwen3", folder)
        rival_weights.append((folder / "model.safetensors").stat().st_ino)

    monkeypatch.setattr(local_models, "_write_folder", write_while_a_rival_finishes_first)
    assert build_local_model("tiny-qwen3", folder) == folder
    assert (folder / "model.safetensors").stat().st_ino == rival_weights[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
    assert mlx_lm.load(str(folder))[0].model_type == "qwen3"


def test_a_folder_with_foreign_files_is_refused_and_left_alone(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(InvalidRequestError, match="notes.txt"):
        build_local_model("tiny-llama", tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "model.safetensors").exists()


def test_unknown_preset_and_dtype_list_the_valid_choices(tmp_path):
    with pytest.raises(InvalidRequestError, match="tiny-llama") as error:
        build_local_model("gpt-7", tmp_path / "x")
    assert all(name in str(error.value) for name in PRESETS)
    with pytest.raises(InvalidRequestError, match="bfloat16"):
        build_local_model("tiny-llama", tmp_path / "x", dtype="int4")
    with pytest.raises(InvalidRequestError):
        load_local_model("gpt-7")
    with pytest.raises(InvalidRequestError, match="seed"):
        build_local_model("tiny-llama", tmp_path / "x", seed=-1)
    assert not (tmp_path / "x").exists()


def test_arguments_that_are_not_a_preset_dtype_or_path_are_typed_errors(tmp_path):
    """An unhashable preset or dtype (TypeError), a path of an int or bytes (TypeError), with a NUL (ValueError),
    of an unknown user's home (RuntimeError) or under a file (FileExistsError) came out bare."""
    (tmp_path / "a-file").write_text("")
    for call in (lambda: build_local_model(["tiny-llama"]), lambda: load_local_model("tiny-llama", dtype=["float32"]),
                 lambda: build_local_model("tiny-llama", 3), lambda: build_local_model("tiny-llama", b"/tmp/x"),
                 lambda: build_local_model("tiny-llama", str(tmp_path / "a\0b")),
                 lambda: build_local_model("tiny-llama", "~no-such-user-x/m"),
                 lambda: build_local_model("tiny-llama", tmp_path / "a-file" / "m")):
        with pytest.raises(InvalidRequestError):
            call()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]


def test_default_folder_lives_in_the_model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMANTIC_MODEL_CACHE", str(tmp_path))
    folder = build_local_model("tiny-qwen2", seed=3, dtype="float16")
    assert folder == tmp_path / "tiny-qwen2-float16-s3"
    assert (folder / "model.safetensors").is_file()


def test_load_local_model_loads_once_per_process(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMANTIC_MODEL_CACHE", str(tmp_path))
    model, tokenizer = load_local_model("tiny-gemma3", seed=5)
    assert load_local_model("tiny-gemma3", seed=5) == (model, tokenizer)
    assert load_local_model("tiny-gemma3", seed=6)[0] is not model
    assert os.path.isdir(tmp_path / "tiny-gemma3-bfloat16-s5")
