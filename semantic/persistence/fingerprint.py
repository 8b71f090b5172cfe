"""``model_fingerprint``: which model a cache file belongs to.

A KV cache is only valid for the exact weights (and tokenizer) that computed
it; two fine-tunes of one architecture have identical geometry and would
silently accept each other's caches. The fingerprint is a SHA-256 over:

* the model's config (``model.args``) and its cache geometry and dtype;
* every parameter, in sorted name order: its name, shape, dtype and the SHA-256
  of all of its bytes as the model holds them (every byte, so any change to any
  weight, a swap of two weights included, gives another fingerprint);
* the tokenizer's vocabulary, when given: token ids mean nothing without it.

SHA-256 runs at memory-read speed where the CPU has SHA instructions (x86 SHA-NI,
ARMv8 SHA2) and releases the GIL, so the parameters are hashed on worker threads:
0.3-0.4 s for a 111M-parameter bfloat16 model on a 2-core x86 CPU, half of it the probe forward
pass of ``ModelCacheSpec.from_model`` (``python -m experiments.fingerprint_cost``).

``SCHEME`` names how the digest is made; fingerprints of an older scheme (which
sampled weights) are recognised in files and refused with their own message
(``file_format``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any, List, Optional, Tuple

from mlx.utils import tree_flatten

from semantic.domain.errors import InvalidRequestError
from semantic.domain.request_checks import of_this_thread
from semantic.domain.value_objects import ModelCacheSpec
from semantic.persistence.file_format import byte_views, checksum_pool, geometry_of, sha256_hex

SCHEME = "sha256-all-weights"


def model_fingerprint(model, tokenizer=None) -> str:
    """``"<model type>-<layers>x<kv heads>x<head dim>-<dtype>:<SCHEME>:<128-bit hex digest>"``; equal for the
    same weights, config and vocabulary in any process, different when any of them differ."""
    return _fingerprints(model, (tokenizer,))[0]


def fingerprints_of(model, tokenizer) -> Tuple[str, str]:
    """:func:`model_fingerprint` of ``model`` with ``tokenizer`` and without it (a store may be fingerprinted
    either way), its weights hashed once."""
    with_vocabulary, without = _fingerprints(model, (tokenizer, None))
    return with_vocabulary, without


def names_weights(fingerprint: str) -> bool:
    """Whether ``fingerprint`` has :func:`model_fingerprint`'s form: another string (a store may be given any)
    names no weights to compare with."""
    return fingerprint.count(":") >= 2 and fingerprint.rsplit(":", 2)[1] == SCHEME


def _fingerprints(model, tokenizers) -> List[str]:
    """:func:`model_fingerprint` of ``model`` with each of ``tokenizers``, its weights hashed once."""
    spec = ModelCacheSpec.from_model(model)
    shared = [_config(model), geometry_of(spec), _weights(model)]
    label = f"{spec.name or 'model'}-{spec.n_layers}x{spec.n_kv_heads}x{spec.k_head_dim}-{spec.dtype}"
    fingerprints = []
    for tokenizer in tokenizers:
        digest = hashlib.sha256()
        for part in (*shared, _vocabulary(tokenizer)):
            digest.update(json.dumps(part, sort_keys=True, default=str).encode("utf-8"))
            digest.update(b"\x00")
        fingerprints.append(f"{label}:{SCHEME}:{digest.hexdigest()[:32]}")
    return fingerprints


def _config(model) -> Any:
    args = getattr(model, "args", None)
    if dataclasses.is_dataclass(args):
        return dataclasses.asdict(args)
    return vars(args) if args is not None else None


def _weights(model) -> List[Any]:
    params = sorted(tree_flatten(model.parameters()), key=lambda item: item[0])
    views = of_this_thread(lambda: byte_views([param for _, param in params]), "the model's weights")
    digests = checksum_pool().map(sha256_hex, views)
    return [[name, list(param.shape), str(param.dtype), digest] for (name, param), digest in zip(params, digests)]


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
