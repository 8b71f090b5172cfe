"""``model_fingerprint``: which model a cache file belongs to.

A KV cache is only valid for the exact weights (and tokenizer) that computed
it; two fine-tunes of one architecture have identical geometry and would
silently accept each other's caches. The fingerprint hashes:

* the model's config (``model.args``) and its cache geometry and dtype;
* every parameter's name, shape and dtype, the wrapping 32-bit sum of all of its
  bytes (read as unsigned words: exact, so independent of reduction order and
  device, and changed by any single changed weight), and 256 evenly strided
  elements (so a reordering of values changes it too);
* the tokenizer's vocabulary, when given: token ids mean nothing without it.

Reading every weight once is cheap next to loading them (about 60 ms for a
135M-parameter model on CPU; a GPU reads gigabytes in milliseconds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, List, Optional

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from semantic.domain.errors import InvalidRequestError
from semantic.domain.value_objects import ModelCacheSpec
from semantic.persistence.file_format import geometry_of, unsigned_view

_SAMPLES_PER_TENSOR = 256


def model_fingerprint(model, tokenizer=None) -> str:
    """``"<model type>-<layers>x<kv heads>x<head dim>-<dtype>:<128-bit hex digest>"``; equal for the same
    weights, config and vocabulary in any process, different when any of them differ."""
    spec = ModelCacheSpec.from_model(model)
    digest = hashlib.sha256()
    for part in (_config(model), geometry_of(spec), _weights(model), _vocabulary(tokenizer)):
        digest.update(json.dumps(part, sort_keys=True, default=str).encode("utf-8"))
        digest.update(b"\x00")
    label = f"{spec.name or 'model'}-{spec.n_layers}x{spec.n_kv_heads}x{spec.k_head_dim}-{spec.dtype}"
    return f"{label}:{digest.hexdigest()[:32]}"


def _config(model) -> Any:
    args = getattr(model, "args", None)
    if dataclasses.is_dataclass(args):
        return dataclasses.asdict(args)
    return vars(args) if args is not None else None


def _weights(model) -> List[Any]:
    params = sorted(tree_flatten(model.parameters()), key=lambda item: item[0])
    sums, samples = [], []
    for _, param in params:
        flat = param.reshape(-1)
        words = unsigned_view(flat)
        sums.append(mx.sum(words.view(mx.uint32) if flat.nbytes % 4 == 0 else words.astype(mx.uint32)))
        samples.append(words[:: max(1, flat.size // _SAMPLES_PER_TENSOR)][:_SAMPLES_PER_TENSOR])
    mx.eval(sums, samples)
    return [
        [name, list(param.shape), str(param.dtype), int(total.item()), hashlib.sha256(np.array(sample)).hexdigest()]
        for (name, param), total, sample in zip(params, sums, samples)
    ]


def _vocabulary(tokenizer) -> Optional[List[Any]]:
    if tokenizer is None:
        return None
    try:
        vocab = tokenizer.get_vocab()
    except AttributeError:
        raise InvalidRequestError(
            f"the tokenizer ({type(tokenizer).__name__}) has no get_vocab(); pass mlx-lm's or a Hugging Face tokenizer"
        ) from None
    return sorted(vocab.items(), key=lambda item: item[1])
