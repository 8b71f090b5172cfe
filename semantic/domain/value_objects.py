"""Value objects: the geometry of a model's KV cache, and what a block of it weighs."""

from __future__ import annotations

import collections
import functools
from dataclasses import dataclass, field, replace
from typing import Dict, Iterable, Optional, Sequence, Tuple

from semantic.domain.block_format import DENSE, BlockFormat, StoredPart, part_bytes
from semantic.domain.errors import InvalidRequestError
from semantic.domain.request_checks import checked_int

BLOCK_SIZE = 256
"""Tokens per block. Equal to mlx-lm's ``KVCache.step``, so a rebuilt cache has the
same buffer length a freshly prefilled one has."""
MAX_ARRAY_DIM = 2**31  # MLX array dimensions are 32-bit ints
MAX_LAYERS = 2**16  # far above any model; a spec keeps a tuple per layer (2**31 layers took 17 GB before refusal)

_DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4}


@dataclass(frozen=True)
class ModelCacheSpec:
    """The shape of one model's KV cache, independent of any weights.

    ``layer_windows[i]`` is ``None`` for a full-attention layer and the window
    length in tokens for a sliding-window layer (mlx-lm's ``RotatingKVCache``
    with ``keep=0``). Every layer has ``n_kv_heads`` heads of ``k_head_dim`` /
    ``v_head_dim``; models that vary these per layer are not supported.

    ``block_format`` is how a pool keeps blocks at rest (see ``block_format.py``):
    the model's ``dtype`` (``"dense"``, the default) or quantized (``"q8"``, ``"q4"``).
    A model's own geometry is always dense; ``with_format`` gives a pool's.
    """

    n_layers: int
    n_kv_heads: int
    k_head_dim: int
    v_head_dim: int
    dtype: str = "bfloat16"
    block_size: int = BLOCK_SIZE
    layer_windows: Tuple[Optional[int], ...] = field(default=())
    name: str = ""
    block_format: BlockFormat = DENSE

    def __post_init__(self):
        for attr in ("n_layers", "n_kv_heads", "k_head_dim", "v_head_dim", "block_size"):
            value = getattr(self, attr)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < MAX_ARRAY_DIM:
                raise InvalidRequestError(f"ModelCacheSpec.{attr} must be a positive int below 2**31 (MLX's "
                                          f"array dimensions are 32-bit), got {value!r}")
        if self.n_layers > MAX_LAYERS:
            raise InvalidRequestError(f"ModelCacheSpec.n_layers must be at most {MAX_LAYERS}, got {self.n_layers}")
        if not isinstance(self.dtype, str) or self.dtype not in _DTYPE_BYTES:
            raise InvalidRequestError(
                f"ModelCacheSpec.dtype must be one of {sorted(_DTYPE_BYTES)}, got {self.dtype!r}"
            )
        # A set has no order: its windows would go to layers in hash order.
        if isinstance(self.layer_windows, (str, bytes, dict, set, frozenset)) or not isinstance(self.layer_windows,
                                                                                               Iterable):
            raise InvalidRequestError(f"layer_windows must be a sequence (None per full-attention layer, a window "
                                      f"length per sliding one), got {type(self.layer_windows).__name__}")
        windows = tuple(self.layer_windows) or (None,) * self.n_layers
        if len(windows) != self.n_layers:
            raise InvalidRequestError(
                f"layer_windows has {len(windows)} entries for {self.n_layers} layers; give one per layer"
            )
        for w in windows:
            if w is not None and (isinstance(w, bool) or not isinstance(w, int) or w <= 0):
                raise InvalidRequestError(f"a sliding window must be a positive int or None, got {w!r}")
        object.__setattr__(self, "layer_windows", windows)
        block_format = BlockFormat.parse(self.block_format)
        for dim in (self.k_head_dim, self.v_head_dim):
            block_format.check_head_dim(dim)
        object.__setattr__(self, "block_format", block_format)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model) -> "ModelCacheSpec":
        """Read the geometry from a loaded mlx-lm model (its own ``make_cache`` and one probe step)."""
        from semantic.adapters.mlx_lm_adapter import cache_spec_from_model

        return cache_spec_from_model(model)

    @classmethod
    def preset(cls, name: str) -> "ModelCacheSpec":
        """A named geometry of a real model, e.g. ``"gemma-3-12b"``; see ``PRESETS``."""
        try:
            return PRESETS[name]
        except (KeyError, TypeError):  # TypeError: an unhashable name
            raise InvalidRequestError(f"unknown preset {name!r}; known presets: {', '.join(sorted(PRESETS))}") from None

    def with_layers(self, n_layers: int) -> "ModelCacheSpec":
        """The same geometry cut or extended to ``n_layers``, repeating the layer pattern."""
        n_layers = checked_int("n_layers", n_layers, 1, MAX_LAYERS)
        windows = tuple(self.layer_windows[i % self.n_layers] for i in range(n_layers))
        return replace(self, n_layers=n_layers, layer_windows=windows)

    def with_format(self, block_format) -> "ModelCacheSpec":
        """The same geometry with blocks kept in ``block_format`` (a ``BlockFormat`` or a name: ``"q4"``, ...)."""
        return replace(self, block_format=BlockFormat.parse(block_format))

    # ---- derived quantities -------------------------------------------------------------------
    @property
    def dtype_bytes(self) -> int:
        return _DTYPE_BYTES[self.dtype]

    @property
    def head_dim(self) -> int:
        """Key head dim (equal to the value head dim for every preset)."""
        return self.k_head_dim

    @property
    def stored_parts(self) -> Tuple[StoredPart, ...]:
        """The arrays one block is stored as (keys and values, or their packed words, scales and biases)."""
        return self.block_format.parts(self.dtype, self.k_head_dim, self.v_head_dim)

    @property
    def bytes_per_token_per_layer(self) -> int:
        """At rest, in the block format (quantization groups' scales and biases included)."""
        return self.n_kv_heads * sum(part_bytes(p) for p in self.stored_parts)

    @property
    def bytes_per_block_per_layer(self) -> int:
        """Bytes of one block: keys and values of ``block_size`` tokens of one layer."""
        return self.bytes_per_token_per_layer * self.block_size

    @property
    def full_attention_layers(self) -> Tuple[int, ...]:
        return tuple(i for i, w in enumerate(self.layer_windows) if w is None)

    @property
    def sliding_window_layers(self) -> Tuple[int, ...]:
        return tuple(i for i, w in enumerate(self.layer_windows) if w is not None)

    def blocks_for_tokens(self, n_tokens: int) -> int:
        """Blocks a full-attention layer needs for ``n_tokens``."""
        return -(-n_tokens // self.block_size)  # integers: a float quotient overflows past ~1e308 tokens

    def visible_range(self, layer: int, n_tokens: int) -> Tuple[int, int]:
        """Token positions ``[start, n_tokens)`` a layer's cache holds after ``n_tokens`` tokens."""
        window = self.layer_windows[layer]
        start = 0 if window is None else max(0, n_tokens - window)
        return start, n_tokens

    def layer_block_range(self, layer: int, n_tokens: int) -> Tuple[int, int]:
        """Indices ``[first, last)`` of the blocks a layer keeps for a context of ``n_tokens``."""
        start, end = self.visible_range(layer, n_tokens)
        if end == 0:
            return 0, 0
        return start // self.block_size, self.blocks_for_tokens(end)

    @functools.cached_property
    def _layers_per_window(self) -> Tuple[Tuple[int, int], ...]:
        """``(first layer, layers)`` per distinct window: a layer's blocks depend on it only through its window."""
        counts = collections.Counter(self.layer_windows)
        return tuple((self.layer_windows.index(window), n) for window, n in counts.items())

    def blocks_per_layer(self, n_tokens: int) -> Tuple[int, ...]:
        """Blocks each layer keeps for a context of ``n_tokens`` (computed once per window)."""
        per_window = {}
        for first_layer, _ in self._layers_per_window:
            first, last = self.layer_block_range(first_layer, n_tokens)
            per_window[self.layer_windows[first_layer]] = last - first
        return tuple(map(per_window.__getitem__, self.layer_windows))

    def blocks_per_agent(self, n_tokens: int) -> int:
        """Blocks (over all layers) a context of ``n_tokens`` occupies. Once per window, not per layer: every
        rebuild with room checks it (48 layers: 24 us -> a few)."""
        if type(n_tokens) is not int or n_tokens < 0:  # public sizing arithmetic: a str raised a bare TypeError
            n_tokens = checked_int("n_tokens", n_tokens, 0)
        return sum(n * (last - first) for layer, n in self._layers_per_window
                   for first, last in (self.layer_block_range(layer, n_tokens),))

    def bytes_per_agent(self, n_tokens: int) -> int:
        return self.blocks_per_agent(n_tokens) * self.bytes_per_block_per_layer

    def describe(self) -> str:
        n_window = len(self.sliding_window_layers)
        kinds = f"{n_window} sliding-window" if n_window else "all full-attention"
        return (
            f"{self.name or 'model'}: {self.n_layers} layers ({kinds}), {self.n_kv_heads} KV heads, "
            f"head dim {self.k_head_dim}/{self.v_head_dim}, {self.dtype}, {self.block_format.name} blocks, "
            f"{self.bytes_per_block_per_layer} bytes per block per layer"
        )


def _gemma3_windows(n_layers: int, window: int, pattern: int = 6) -> Tuple[Optional[int], ...]:
    """Gemma 3 puts one global layer after every ``pattern - 1`` sliding-window layers."""
    return tuple(None if (i + 1) % pattern == 0 else window for i in range(n_layers))


PRESETS: Dict[str, ModelCacheSpec] = {
    "smollm2-135m": ModelCacheSpec(30, 3, 64, 64, "bfloat16", name="smollm2-135m"),
    "qwen2.5-0.5b": ModelCacheSpec(24, 2, 64, 64, "bfloat16", name="qwen2.5-0.5b"),
    "llama-3.1-8b": ModelCacheSpec(32, 8, 128, 128, "bfloat16", name="llama-3.1-8b"),
    "gemma-3-12b": ModelCacheSpec(
        48, 8, 256, 256, "bfloat16", layer_windows=_gemma3_windows(48, 1024), name="gemma-3-12b"
    ),
    "gemma-3-12b-full": ModelCacheSpec(48, 8, 256, 256, "bfloat16", name="gemma-3-12b-full"),
}
"""Real geometries, so benchmarks can use them without the weights. ``gemma-3-12b-full``
treats every layer as full attention (the worst case for bytes moved)."""


def spec_names() -> Sequence[str]:
    return sorted(PRESETS)
