"""A GGUF file (llama.cpp's format) -> an mlx-lm model folder that ``mlx_lm.load(path)`` opens.

Two architectures, the two of the models this package fetches:

* ``llama`` (SmolLM2): MLX reads Q4_0/Q4_1/Q8_0 tensors natively as its own affine quantization
  (``mx.load``), so they are kept bit for bit; only the scales and biases become float32 (MLX's CPU
  quantized matmul is ~40x slower with float16 scales) and llama.cpp's q/k row permutation is undone.
* ``gemma3`` (Gemma 3 270M): its K-quants have no MLX counterpart, so every tensor is dequantized
  with the ``gguf`` package and re-quantized to MLX 8-bit; llama.cpp stores the norm weights as
  ``1 + w`` (mlx-lm adds the 1 itself).

Any other file with only MLX-native tensor types and an architecture listed here converts the same
way; anything else raises ``UnsupportedModelError`` rather than writing a folder that would load and
talk nonsense.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Callable, Dict, Iterable, Mapping, Tuple

import mlx.core as mx
import numpy as np

from semantic.domain.errors import InvalidRequestError
from semantic.domain.errors import UnsupportedModelError as _DomainUnsupportedModelError
from semantic.models.gguf_header import GGUFHeaderError, check_gguf_header
from semantic.models.gguf_tokenizer import TokenizerFiles, tokenizer_files

# MLX quantization kept as is: GGUF type name -> (bits, group size).
NATIVE_QUANT = {"Q4_0": (4, 32), "Q4_1": (4, 32), "Q8_0": (8, 32)}
UNQUANTIZED = {"F32", "F16", "BF16"}
REQUANT_BITS, REQUANT_GROUP = 8, 64


class UnsupportedModelError(_DomainUnsupportedModelError, InvalidRequestError):
    """The GGUF file holds an architecture or tensor type this converter does not handle, or is not a
    complete, consistent model file."""


class ConversionIOError(_DomainUnsupportedModelError, OSError):
    """The GGUF file could not be read or the converted folder written (disk full, permissions)."""


# --- names ----------------------------------------------------------------------------------------

_LAYER_NAMES = {
    "llama": {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    },
    "gemma3": {
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
        "attn_norm": "input_layernorm", "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
    },
}
_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def mlx_lm_name(architecture: str, gguf_name: str) -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight`` (and ``.scales``/``.biases``)."""
    stem, _, suffix = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_NAMES[architecture]:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[architecture][parts[2]]}.{suffix}"
    if len(parts) == 1 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{suffix}"
    raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no {architecture} counterpart in mlx-lm")


# --- llama's q/k permutation ------------------------------------------------------------------------


def _head_rows(rows, n_heads: int) -> Tuple[int, ...]:
    """``rows.shape``, checked to split into ``n_heads`` heads of row pairs."""
    shape = rows.shape
    if n_heads <= 0 or shape[0] % (2 * n_heads):
        # MLX accepts negative reshape sizes here, and evaluating the result never returns.
        raise UnsupportedModelError(f"{shape[0]} rows cannot be {n_heads} attention heads of row pairs")
    return shape


def llama_cpp_permute(rows, n_heads: int):
    """What llama.cpp's converter does to llama's q/k projections (each head's rotary halves interleaved)."""
    shape = _head_rows(rows, n_heads)
    return rows.reshape(n_heads, 2, shape[0] // n_heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def llama_cpp_unpermute(rows, n_heads: int):
    """The inverse of :func:`llama_cpp_permute`; works on packed quantized rows and their scales too,
    since quantization groups run along a row."""
    shape = _head_rows(rows, n_heads)
    return rows.reshape(n_heads, shape[0] // n_heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


# --- configs ----------------------------------------------------------------------------------------


def _field(metadata: Mapping[str, Any], key: str, default: Any = None) -> Any:
    if key in metadata:
        return metadata[key]
    if default is None:
        raise UnsupportedModelError(f"the GGUF file has no {key!r}; it is not a complete model file")
    return default


def _llama_config(md: Mapping[str, Any], tied: bool) -> Dict[str, Any]:
    a = "llama"
    heads = int(_field(md, f"{a}.attention.head_count"))
    hidden = int(_field(md, f"{a}.embedding_length"))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(_field(md, f"{a}.block_count")),
        "intermediate_size": int(_field(md, f"{a}.feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(md, f"{a}.attention.head_count_kv", heads)),
        "head_dim": int(_field(md, f"{a}.rope.dimension_count", hidden // heads)),
        "rms_norm_eps": float(_field(md, f"{a}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(md, f"{a}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(md, f"{a}.context_length")),
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
    }


def _gemma3_config(md: Mapping[str, Any], tied: bool) -> Dict[str, Any]:
    a = "gemma3"
    head_dim = int(_field(md, f"{a}.attention.key_length"))
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": int(_field(md, f"{a}.embedding_length")),
        "num_hidden_layers": int(_field(md, f"{a}.block_count")),
        "intermediate_size": int(_field(md, f"{a}.feed_forward_length")),
        "num_attention_heads": int(_field(md, f"{a}.attention.head_count")),
        "num_key_value_heads": int(_field(md, f"{a}.attention.head_count_kv")),
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "rms_norm_eps": float(_field(md, f"{a}.attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(md, f"{a}.rope.freq_base")),
        "sliding_window": int(_field(md, f"{a}.attention.sliding_window")),
        # Not in the file: Gemma 3's fixed choices (5 sliding-window layers per global one, local rope base).
        "sliding_window_pattern": 6,
        "rope_local_base_freq": 10000.0,
        "max_position_embeddings": int(_field(md, f"{a}.context_length")),
        "hidden_activation": "gelu_pytorch_tanh",
        "tie_word_embeddings": tied,
    }


def _check_shape_config(gguf_path: pathlib.Path, config: Dict[str, Any], tensor_names: Iterable[str]) -> None:
    sizes = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads",
             "head_dim")
    bad = [f"{key}={config[key]}" for key in sizes if config[key] <= 0]
    if not bad and config["num_attention_heads"] % config["num_key_value_heads"]:
        bad.append(f"{config['num_attention_heads']} attention heads over {config['num_key_value_heads']} KV heads")
    # A block count past the layers the file holds made mlx-lm build them all at load (10,000,000: unbounded).
    layers = {name.split(".")[1] for name in tensor_names if name.startswith("blk.")}
    if not bad and layers != {str(layer) for layer in range(config["num_hidden_layers"])}:
        bad.append(f"{config['num_hidden_layers']} layers, but tensors of {len(layers)} (blk.N)")
    if bad:
        raise UnsupportedModelError(f"{gguf_path.name}: impossible model sizes ({', '.join(bad)})")


_CONFIGS: Dict[str, Callable[[Mapping[str, Any], bool], Dict[str, Any]]] = {
    "llama": _llama_config, "gemma3": _gemma3_config,
}
# llama.cpp writes Gemma's norm weights as 1 + w; mlx-lm's Gemma RMSNorm scales by 1 + w itself.
_NORM_OFFSET = {"gemma3": -1.0}


# --- reading ----------------------------------------------------------------------------------------


def read_metadata(reader) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """``(metadata, {tensor name: GGUF type name})`` of a ``gguf.GGUFReader``."""
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        metadata[key] = field.contents()
    return metadata, {t.name: t.tensor_type.name for t in reader.tensors}


def _unpermuted(architecture: str, md: Mapping[str, Any]):
    """``(GGUF name, rows) -> rows`` with llama's q/k projections (and their scales and biases) un-permuted."""
    heads = {"attn_q": md.get(f"{architecture}.attention.head_count"),
             "attn_k": md.get(f"{architecture}.attention.head_count_kv", md.get(f"{architecture}.attention.head_count"))}

    def unpermuted(name: str, rows):
        kind = name.split(".")[-2] if name.startswith("blk.") else None
        return llama_cpp_unpermute(rows, int(heads[kind])) if architecture == "llama" and kind in heads else rows

    return unpermuted


def _native_tensors(path: pathlib.Path, architecture: str, md: Mapping[str, Any]) -> Dict[str, mx.array]:
    """MLX's own reading of Q4_0/Q4_1/Q8_0 (weight, scales, biases), scales and biases as float32."""
    raw = mx.load(str(path))
    unpermuted = _unpermuted(architecture, md)
    weights = {}
    for name, value in raw.items():
        value = unpermuted(name, value)
        if name.endswith((".scales", ".biases")) or value.dtype in (mx.float16, mx.bfloat16):
            value = value.astype(mx.float32)
        weights[mlx_lm_name(architecture, name)] = value
    return weights


def _requantized_tensors(reader, architecture: str, md: Mapping[str, Any]) -> Dict[str, mx.array]:
    """Every tensor dequantized with ``gguf`` (NumPy) and matrices re-quantized to MLX 8-bit, float32 scales."""
    from gguf.quants import dequantize

    offset = _NORM_OFFSET.get(architecture, 0.0)
    unpermuted = _unpermuted(architecture, md)
    weights = {}
    for tensor in reader.tensors:
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
        value = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        value = unpermuted(tensor.name, value)
        name = mlx_lm_name(architecture, tensor.name)
        if name.endswith("norm.weight"):
            value = value + offset
        array = mx.array(value)
        if array.ndim == 2 and array.shape[-1] % REQUANT_GROUP == 0:
            packed, scales, biases = mx.quantize(array, group_size=REQUANT_GROUP, bits=REQUANT_BITS)
            stem = name[: -len(".weight")]
            weights.update({name: packed, f"{stem}.scales": scales, f"{stem}.biases": biases})
        else:
            weights[name] = array
        mx.eval(list(weights.values()))
    return weights


def _quantization_config(architecture: str, types: Mapping[str, str], requantize: bool) -> Dict[str, Any]:
    """mlx-lm's ``quantization`` entry: the most common layout, plus an override per module that differs
    (SmolLM2's Q8_0 embedding among Q4_1 matrices)."""
    if requantize:
        return {"group_size": REQUANT_GROUP, "bits": REQUANT_BITS}
    layouts = {}
    for name, kind in types.items():
        if kind in NATIVE_QUANT:
            layouts[mlx_lm_name(architecture, name).rpartition(".")[0]] = NATIVE_QUANT[kind]
    if not layouts:
        return {}
    values = list(layouts.values())
    bits, group = max(set(values), key=values.count)
    config: Dict[str, Any] = {"group_size": group, "bits": bits}
    for module, (b, g) in sorted(layouts.items()):
        if (b, g) != (bits, group):
            config[module] = {"group_size": g, "bits": b}
    return config


def convert(gguf_path: str | pathlib.Path, out_dir: str | pathlib.Path) -> Dict[str, Any]:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files into ``out_dir`` (which must
    exist); returns the config written. A file that is not a complete GGUF of a supported model raises
    ``UnsupportedModelError`` naming it."""
    gguf_path, out_dir = pathlib.Path(gguf_path), pathlib.Path(out_dir)
    try:
        return _convert(gguf_path, out_dir)
    except _DomainUnsupportedModelError:
        raise
    except OSError as exc:  # the file cannot be read, or the folder written
        raise ConversionIOError(f"converting {gguf_path} into {out_dir} failed: {exc}") from exc
    # Whatever a truncated or crafted file makes the reader, the lookups and the tokenizer library raise
    # (KeyError for a missing field, IndexError for an id past the vocabulary, tokenizers' bare Exception
    # for a merge of unknown tokens, ...): the cause is chained.
    except Exception as exc:
        raise UnsupportedModelError(
            f"{gguf_path.name} is not a complete GGUF model file ({type(exc).__name__}: {exc})") from exc


def _convert(gguf_path: pathlib.Path, out_dir: pathlib.Path) -> Dict[str, Any]:
    from gguf import GGUFReader

    try:
        mlx_reads_it = check_gguf_header(gguf_path)
    except GGUFHeaderError as exc:
        raise UnsupportedModelError(f"{gguf_path.name} is not a GGUF model file this converter reads: {exc}") from None
    reader = GGUFReader(str(gguf_path))  # parsing Gemma's vocabulary takes half a minute: once
    metadata, types = read_metadata(reader)
    architecture = metadata.get("general.architecture")
    if architecture not in _CONFIGS:
        raise UnsupportedModelError(
            f"{gguf_path.name}: architecture {architecture!r} is not supported; supported: {', '.join(_CONFIGS)}"
        )
    if not types:
        raise UnsupportedModelError(f"{gguf_path.name} holds no tensors: it is not a model file")
    unknown = sorted(set(types.values()) - UNQUANTIZED - set(NATIVE_QUANT))
    requantize = architecture == "gemma3" or bool(unknown) or not mlx_reads_it

    tied = "output.weight" not in types
    tokenizer: TokenizerFiles = tokenizer_files(metadata)
    config = _CONFIGS[architecture](metadata, tied)
    _check_shape_config(gguf_path, config, types)
    config.update(vocab_size=len(metadata["tokenizer.ggml.tokens"]), **tokenizer.config_ids)
    if requantize:
        weights = _requantized_tensors(reader, architecture, metadata)
    else:
        weights = _native_tensors(gguf_path, architecture, metadata)
    quantization = _quantization_config(architecture, types, requantize)
    if quantization:
        config["quantization"] = quantization
    if tied:
        # gemma3_text always builds lm_head and drops it on load when the file has none; so does llama.
        weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
    _write_folder(out_dir, weights, config, tokenizer)
    return config


def _write_folder(out_dir: pathlib.Path, weights: Dict[str, mx.array], config: Dict[str, Any],
                  tokenizer: TokenizerFiles) -> None:
    """The folder's files, written beside it first and moved in only once all are whole: a failed write (a
    full disk, a folder in the way) leaves ``out_dir`` as it was, not a folder that loads half a model."""
    staging = pathlib.Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir))
    moved = []
    try:
        try:
            mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
        except RuntimeError as exc:  # MLX reports a failed write (a full disk) as RuntimeError
            raise ConversionIOError(f"could not write {out_dir / 'model.safetensors'}: {exc} (disk full?)") from exc
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        tokenizer.write(staging)
        names = sorted(path.name for path in staging.iterdir())
        in_the_way = [name for name in names if (out_dir / name).is_dir()]
        if in_the_way:
            raise ConversionIOError(f"{out_dir / in_the_way[0]} is a folder; move it away and convert again")
        for name in names:
            os.replace(staging / name, out_dir / name)
            moved.append(out_dir / name)
    except BaseException:
        for path in moved:
            path.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
