"""Local model folders that ``mlx_lm.load(path)`` opens like a downloaded model.

Each preset is a real mlx-lm architecture (llama, qwen2, qwen3, gemma3_text) with
random weights and a byte-level BPE tokenizer trained here on a synthetic corpus,
so tests and benchmarks run real models with no network and no downloaded weights.

A folder holds ``config.json``, ``model.safetensors``, ``tokenizer.json``,
``tokenizer_config.json``, ``special_tokens_map.json`` and ``local_model_build.json``,
the marker that says the folder is complete and what recipe built it. Everything
follows from the seed: the same (preset, seed, dtype) gives byte-identical files.

The weights are initialised so that greedy decoding does not collapse onto one
token (what a plainly random-initialised transformer does), which would make
every "same output" comparison vacuous; see ``InitScheme``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
import pathlib
import random
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Mapping, Tuple

import mlx.core as mx
import mlx_lm
import tokenizers
from mlx.utils import tree_flatten

from semantic.domain.errors import InvalidRequestError
from semantic.domain.request_checks import checked_path

DTYPES: Dict[str, mx.Dtype] = {
    "bfloat16": mx.bfloat16,
    "float16": mx.float16,
    "float32": mx.float32,
}

# Bump when anything that shapes the written files changes, so cached folders rebuild.
_RECIPE_VERSION = 1
_MARKER = "local_model_build.json"

UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
_SPECIAL_TOKENS = (UNK, BOS, EOS, PAD)  # ids 0..3, in this order


@dataclass(frozen=True)
class InitScheme:
    """How random weights are drawn; chosen so greedy decoding keeps changing token.

    A plainly random-initialised transformer emits one token forever: its residual
    stream is mostly the current token's embedding, and with tied embeddings that
    token's own logit wins (or, in gemma3, whose norms rescale every block's output,
    the context average wins). So embeddings are small next to what the blocks add
    (``embedding_std``); every projection has ``linear_gain / sqrt(fan_in)`` scale,
    above the usual 1, so blocks transform rather than pass the stream through;
    q/k norms scale by ``qk_norm_gain`` so attention picks out tokens instead of
    averaging the context; every norm's gain is spread ``±norm_spread`` around that
    so no direction dominates.
    """

    embedding_std: float = 0.02
    linear_gain: float = 2.0
    qk_norm_gain: float = 3.0
    norm_spread: float = 0.5
    bias_std: float = 0.1


INIT = InitScheme()

# gemma3's RMSNorm scales by (1 + weight); the others scale by weight.
_NORM_WEIGHT_OFFSET = {"gemma3_text": -1.0}


@dataclass(frozen=True)
class LocalModelPreset:
    name: str
    description: str
    vocab_size: int
    config: Mapping[str, Any] = field(repr=False)  # config.json minus vocab and token ids

    def model_config(self) -> Dict[str, Any]:
        return {
            **self.config,
            "vocab_size": self.vocab_size,
            "bos_token_id": _SPECIAL_TOKENS.index(BOS),
            "eos_token_id": _SPECIAL_TOKENS.index(EOS),
            "pad_token_id": _SPECIAL_TOKENS.index(PAD),
        }


def _tiny_gemma3(sliding_window: int) -> Dict[str, Any]:
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": 128,
        # 5 sliding-window layers, 1 global, then 2 more sliding: both cache kinds
        # and a pattern that does not end on a global layer.
        "num_hidden_layers": 8,
        "sliding_window_pattern": 6,
        "sliding_window": sliding_window,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "intermediate_size": 256,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
        "hidden_activation": "gelu_pytorch_tanh",
    }


_SMOLLM2_135M: Dict[str, Any] = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    # Explicit, so a preset that changes hidden_size keeps this KV geometry
    # (mlx-lm's llama otherwise derives it as hidden_size // num_attention_heads).
    "head_dim": 64,
    "intermediate_size": 1536,
    "hidden_act": "silu",
    "rope_theta": 100000.0,
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": True,
}


PRESETS: Dict[str, LocalModelPreset] = {
    preset.name: preset
    for preset in (
        LocalModelPreset(
            name="smollm2-135m",
            description=(
                "SmolLM2-135M's geometry (llama, 30 layers, hidden 576, 9 heads / 3 KV heads, "
                "head_dim 64) with random weights; its vocabulary is this module's 8192-token "
                "tokenizer, not SmolLM2's 49152, so it has ~111M parameters rather than 135M"
            ),
            vocab_size=8192,
            config=_SMOLLM2_135M,
        ),
        LocalModelPreset(
            name="smollm2-135m-narrow",
            description=(
                "smollm2-135m's KV cache (30 layers, 3 KV heads, head_dim 64) and tokenizer with "
                "hidden 144 and MLP 384 (~13M parameters): the same blocks at a fraction of the "
                "compute, for tests that exercise the cache rather than the model"
            ),
            vocab_size=8192,
            config={**_SMOLLM2_135M, "hidden_size": 144, "intermediate_size": 384},
        ),
        LocalModelPreset(
            name="tiny-llama",
            description="llama, 4 layers, hidden 128, 4 heads / 2 KV heads: for fast tests",
            vocab_size=2048,
            config={
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "hidden_size": 128,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 32,
                "intermediate_size": 256,
                "hidden_act": "silu",
                "rope_theta": 10000.0,
                "rms_norm_eps": 1e-5,
                "max_position_embeddings": 8192,
                "tie_word_embeddings": True,
            },
        ),
        LocalModelPreset(
            name="tiny-qwen3",
            description="qwen3 (q/k norms), 4 layers, hidden 128, 4 heads / 2 KV heads",
            vocab_size=2048,
            config={
                "model_type": "qwen3",
                "architectures": ["Qwen3ForCausalLM"],
                "hidden_size": 128,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "head_dim": 32,
                "intermediate_size": 256,
                "hidden_act": "silu",
                "rope_theta": 1_000_000.0,
                "rms_norm_eps": 1e-6,
                "max_position_embeddings": 32768,
                "tie_word_embeddings": True,
            },
        ),
        LocalModelPreset(
            name="tiny-qwen2",
            description="qwen2 (q/k/v biases), 4 layers, hidden 128, 4 heads / 2 KV heads",
            vocab_size=2048,
            config={
                "model_type": "qwen2",
                "architectures": ["Qwen2ForCausalLM"],
                "hidden_size": 128,
                "num_hidden_layers": 4,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "intermediate_size": 256,
                "hidden_act": "silu",
                "rope_theta": 1_000_000.0,
                "rms_norm_eps": 1e-6,
                "max_position_embeddings": 32768,
                "tie_word_embeddings": True,
            },
        ),
        LocalModelPreset(
            name="tiny-gemma3",
            description="gemma3_text, 8 layers (sliding window 128 on 5 of every 6), hidden 128",
            vocab_size=2048,
            config=_tiny_gemma3(sliding_window=128),
        ),
        LocalModelPreset(
            name="tiny-gemma3-w512",
            description="tiny-gemma3 with sliding window 512, a window spanning several 256-token blocks",
            vocab_size=2048,
            config=_tiny_gemma3(sliding_window=512),
        ),
    )
}


def _validated(preset: str, seed: int, dtype: str) -> LocalModelPreset:
    if not isinstance(preset, str) or preset not in PRESETS:  # a list is unhashable: TypeError before
        raise InvalidRequestError(
            f"unknown local model preset {preset!r}; choose one of {', '.join(sorted(PRESETS))}"
        )
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InvalidRequestError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidRequestError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return PRESETS[preset]


# --- tokenizer ------------------------------------------------------------------

# A fixed corpus seed: the tokenizer belongs to the vocabulary size, not to the model seed.
_CORPUS_SEED = 20240611
_COMMON_WORDS = (
    "the of and to in is was that for it with as his on be at by had are but from or have "
    "an they which one you were all we her she there would their will when who him been has "
    "more if no out so what up its about into than them can only other time new some could "
    "these two may first then do any like my now over such our man me even most made after "
    "also did many before must through back years where much your way well down should "
    "because each just those people how too little state good very make world still own see "
    "men work long here get both between life being under never day same another know while "
    "last might us great old year off come since against go came right used take three"
).split()
_ONSETS = ("", "b", "br", "c", "ch", "cl", "d", "dr", "f", "fl", "g", "gr", "h", "j", "k", "l",
           "m", "n", "p", "pl", "pr", "r", "s", "sh", "st", "str", "t", "th", "tr", "v", "w", "wh",
           "y", "z")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ea", "ee", "oo", "ou", "ie", "y")
_CODAS = ("", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "ck", "rt", "sh", "th", "x")


def _synthetic_corpus(vocab_size: int) -> list[str]:
    """English-like sentences: common words plus coined ones, Zipf-weighted.

    Coined words scale with the vocabulary so BPE has enough distinct merges to
    reach ``vocab_size`` exactly.
    """
    rng = random.Random(_CORPUS_SEED)
    coined = sorted(
        {
            "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
                    for _ in range(rng.randint(1, 3)))
            for _ in range(vocab_size)
        }
    )
    words = _COMMON_WORDS + coined
    cumulative, total = [], 0.0
    for rank in range(len(words)):
        total += 1.0 / (rank + 1) ** 0.8
        cumulative.append(total)
    sentences = []
    for _ in range(vocab_size // 2):
        sentence = rng.choices(words, cum_weights=cumulative, k=rng.randint(4, 16))
        sentence[0] = sentence[0].capitalize()
        if rng.random() < 0.2:
            sentence.insert(rng.randrange(len(sentence)), str(rng.randint(0, 2030)))
        if rng.random() < 0.3:
            sentence[rng.randrange(len(sentence) - 1)] += ","
        sentences.append(" ".join(sentence) + rng.choice(".....?!"))
    return sentences


@functools.lru_cache(maxsize=None)
def _tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE tokenizer (like GPT-2's / SmolLM2's) whose encode prepends BOS."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_synthetic_corpus(vocab_size), trainer)
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(
            f"the synthetic corpus yielded {tokenizer.get_vocab_size()} tokens, not {vocab_size}"
        )
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return tokenizer.to_str()


def _tokenizer_files(preset: LocalModelPreset) -> Dict[str, str]:
    special = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": preset.config["max_position_embeddings"],
    }
    return {
        "tokenizer.json": _tokenizer_json(preset.vocab_size),
        "tokenizer_config.json": _dumps(tokenizer_config),
        "special_tokens_map.json": _dumps(special),
    }


# --- weights --------------------------------------------------------------------


def _random_weights(preset: LocalModelPreset, seed: int, dtype: str) -> Dict[str, mx.array]:
    config = preset.model_config()
    architecture = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = architecture.Model(architecture.ModelArgs.from_dict(config))
    shapes = dict(tree_flatten(model.parameters()))
    if config["tie_word_embeddings"]:
        # gemma3_text always builds lm_head and drops it on load when the file has none.
        shapes.pop("lm_head.weight", None)

    names = sorted(shapes)  # a stable order, so each name always gets the same key
    keys = mx.random.split(mx.random.key(seed), len(names))
    norm_offset = _NORM_WEIGHT_OFFSET.get(config["model_type"], 0.0)
    weights = {}
    for name, key in zip(names, keys):
        shape = shapes[name].shape
        if name.endswith("embed_tokens.weight"):
            value = _uniform_with_std(INIT.embedding_std, shape, key)
        elif "norm" in name:
            centre = INIT.qk_norm_gain if name.endswith(("q_norm.weight", "k_norm.weight")) else 1.0
            low, high = centre * (1 - INIT.norm_spread), centre * (1 + INIT.norm_spread)
            value = mx.random.uniform(low, high, shape, key=key) + norm_offset
        elif name.endswith(".bias"):
            value = _uniform_with_std(INIT.bias_std, shape, key)
        else:
            value = _uniform_with_std(INIT.linear_gain / shape[-1] ** 0.5, shape, key)
        weights[name] = value.astype(DTYPES[dtype])
    mx.eval(weights)
    return weights


def _uniform_with_std(std: float, shape: Tuple[int, ...], key: mx.array) -> mx.array:
    # Uniform rather than normal: mx.random.normal is ~3x slower on CPU, which
    # is seconds for smollm2-135m, and the shape of the distribution does not matter here.
    bound = std * 3**0.5
    return mx.random.uniform(-bound, bound, shape, key=key)


# --- folders --------------------------------------------------------------------


def _dumps(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True) + "\n"


def _recipe(preset: LocalModelPreset, seed: int, dtype: str) -> Dict[str, Any]:
    """What the marker records: anything that changes the files changes the digest."""
    recipe_source = {
        "version": _RECIPE_VERSION,
        "config": preset.model_config(),
        "init": asdict(INIT),
        "corpus_seed": _CORPUS_SEED,
    }
    digest = hashlib.sha256(_dumps(recipe_source).encode()).hexdigest()
    return {"preset": preset.name, "seed": seed, "dtype": dtype, "digest": digest}


_FOLDER_FILES = frozenset(
    {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
     "special_tokens_map.json", _MARKER}
)


def _is_complete(folder: pathlib.Path, recipe: Mapping[str, Any]) -> bool:
    try:
        marker = json.loads((folder / _MARKER).read_text())
        return marker["recipe"] == recipe and all(
            (folder / name).stat().st_size == size for name, size in marker["file_sizes"].items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):  # a damaged marker
        return False


def _check_replaceable(folder: pathlib.Path) -> None:
    """Refuse to delete a folder this module did not write (a mistyped ``path``)."""
    if folder.is_dir():
        foreign = sorted(p.name for p in folder.iterdir() if p.name not in _FOLDER_FILES)
        if foreign:
            raise InvalidRequestError(
                f"{folder} exists and holds files a local model folder does not ({', '.join(foreign[:5])}); "
                "pass an empty or new path, or a folder build_local_model wrote"
            )
    elif folder.exists():
        raise InvalidRequestError(f"{folder} exists and is not a folder; pass a new path")


def _temp_prefix(folder: pathlib.Path) -> str:
    return f".{folder.name}.tmp-"


def _remove_abandoned_builds(folder: pathlib.Path) -> None:
    """Delete temp folders of builds whose process is gone (killed mid-build)."""
    prefix = _temp_prefix(folder)
    for stray in folder.parent.glob(prefix + "*"):
        pid_text = stray.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            shutil.rmtree(stray, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _write_folder(folder: pathlib.Path, preset: LocalModelPreset, seed: int, dtype: str,
                  recipe: Mapping[str, Any]) -> None:
    texts = {"config.json": _dumps({**preset.model_config(), "torch_dtype": dtype}),
             **_tokenizer_files(preset)}
    for name, text in texts.items():
        (folder / name).write_text(text, encoding="utf-8")
    mx.save_safetensors(str(folder / "model.safetensors"), _random_weights(preset, seed, dtype),
                        metadata={"format": "mlx"})
    file_sizes = {name: (folder / name).stat().st_size for name in sorted(_FOLDER_FILES - {_MARKER})}
    # The marker goes last: its presence is what says the rest is complete.
    (folder / _MARKER).write_text(_dumps({"recipe": recipe, "file_sizes": file_sizes}))


def default_model_dir(preset: str, *, seed: int = 0, dtype: str = "bfloat16") -> pathlib.Path:
    """``$SEMANTIC_MODEL_CACHE`` (else ``~/.cache/semantic/models``) / ``<preset>-<dtype>-s<seed>``."""
    _validated(preset, seed, dtype)
    root = os.environ.get("SEMANTIC_MODEL_CACHE") or pathlib.Path.home() / ".cache" / "semantic" / "models"
    return pathlib.Path(root) / f"{preset}-{dtype}-s{seed}"


def build_local_model(
    preset: str,
    path: str | os.PathLike | None = None,
    *,
    seed: int = 0,
    dtype: str = "bfloat16",
) -> pathlib.Path:
    """Write the preset's model folder at ``path`` (default: ``default_model_dir``) and return it.

    A folder already complete for the same preset, seed and dtype is reused as is.
    The folder is built in a temp folder beside it and renamed into place, so a
    killed or concurrent build never leaves a half-written folder at ``path``.
    Raises ``InvalidRequestError`` for an unknown preset or dtype, or when ``path``
    holds files this module did not write.
    """
    chosen = _validated(preset, seed, dtype)
    folder = checked_path("path", path if path is not None else default_model_dir(preset, seed=seed, dtype=dtype))
    recipe = _recipe(chosen, seed, dtype)
    if _is_complete(folder, recipe):
        return folder
    _check_replaceable(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file in the way, no permission
        raise InvalidRequestError(f"cannot make the folder {folder.parent} ({exc.strerror or exc}); pass another "
                                  "path") from exc
    _remove_abandoned_builds(folder)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f"{_temp_prefix(folder)}{os.getpid()}-", dir=folder.parent))
    try:
        _write_folder(staging, chosen, seed, dtype, recipe)
        _move_into_place(staging, folder, recipe)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _move_into_place(staging: pathlib.Path, folder: pathlib.Path, recipe: Mapping[str, Any]) -> None:
    if _is_complete(folder, recipe):  # a concurrent build finished first
        return
    # Move what is in the way aside whole, so the path never shows a mix of old
    # and new files; the name marks it as this process's, for abandoned-build cleanup.
    aside = staging.with_name(staging.name + "-replaced")
    try:
        os.replace(folder, aside)
    except FileNotFoundError:
        pass
    shutil.rmtree(aside, ignore_errors=True)
    try:
        os.replace(staging, folder)
    except OSError:
        if not _is_complete(folder, recipe):  # else a concurrent build won the race
            raise


@functools.lru_cache(maxsize=None)
def _load_memoised(preset: str, seed: int, dtype: str) -> Tuple[Any, Any]:
    return mlx_lm.load(str(build_local_model(preset, seed=seed, dtype=dtype)))


def load_local_model(preset: str, *, seed: int = 0, dtype: str = "bfloat16") -> Tuple[Any, Any]:
    """``(model, tokenizer)`` from ``mlx_lm.load`` of the preset's cached folder.

    Loaded once per (preset, seed, dtype) in a process; callers share the
    returned objects, so they must not change the model's weights.
    """
    _validated(preset, seed, dtype)
    return _load_memoised(preset, seed, dtype)
