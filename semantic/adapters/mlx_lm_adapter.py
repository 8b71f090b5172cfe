"""Every touch of mlx-lm's cache classes and ``BatchGenerator`` lives here.

mlx-lm changes these almost every release (``RotatingKVCache.state`` gained
``keep``/``max_size``/``_idx``, ``BatchGenerator.next`` changed its return type,
...). Supported: ``SUPPORTED_MLX_LM``; ``tests/test_mlx_lm_adapter.py`` pins the
contract this module relies on, so an upgrade that breaks it fails there first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx_lm.generate import BatchGenerator, generation_stream
from mlx_lm.models.cache import BatchKVCache, BatchRotatingKVCache, KVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.sample_utils import greedy_sampler, make_logits_processors, make_sampler

from semantic.domain.errors import IncompatibleCacheError, UnsupportedModelError
from semantic.domain.request_checks import SamplingParams, of_this_thread
from semantic.domain.value_objects import ModelCacheSpec

SUPPORTED_MLX_LM = (">=0.32.2", "<0.33")

LayerCache = Any  # KVCache | RotatingKVCache


def mlx_lm_version() -> str:
    return mlx_lm.__version__


def check_mlx_lm_version() -> None:
    major, minor, patch = (int(p) for p in mlx_lm.__version__.split(".")[:3])
    if (major, minor) != (0, 32) or patch < 2:
        raise UnsupportedModelError(
            f"semantic supports mlx-lm {' '.join(SUPPORTED_MLX_LM)}, found {mlx_lm.__version__}; "
            "install a supported version (pip install 'mlx-lm>=0.32.2,<0.33')"
        )


def synchronize() -> None:
    """Wait for everything MLX queued on the default stream and on mlx-lm's generation stream, where
    ``BatchGenerator`` runs: it queues a sequence's next step before returning its token, and
    ``mx.synchronize()`` alone waits for the default stream only."""
    mx.synchronize()
    mx.synchronize(generation_stream)


def make_cache(model) -> List[LayerCache]:
    """The empty cache the model's own ``make_cache`` (or mlx-lm's default) creates."""
    return make_prompt_cache(model)


def layer_window(cache: LayerCache, layer: int) -> Optional[int]:
    """``None`` for a full-attention cache, the window for a sliding-window one; anything else is unsupported."""
    if type(cache) is KVCache:
        return None
    if type(cache) is RotatingKVCache:
        if cache.keep != 0:
            raise UnsupportedModelError(
                f"layer {layer} keeps {cache.keep} tokens at the start of its rotating cache; "
                "only sliding windows without kept tokens (keep=0) can be stored in blocks"
            )
        return cache.max_size
    raise UnsupportedModelError(
        f"layer {layer} uses {type(cache).__name__}; semantic stores only KVCache and RotatingKVCache layers "
        "(attention models such as llama, qwen2/3, gemma3)"
    )


def cache_spec_from_model(model) -> ModelCacheSpec:
    """Read the geometry from the model's own cache: its types give the windows, one probe token the shapes."""
    check_mlx_lm_version()
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"model must be a loaded mlx-lm model (an mlx.nn.Module, as mlx_lm.load "
                                    f"returns), got {type(model).__name__}")
    caches = make_cache(model)
    windows = tuple(layer_window(c, i) for i, c in enumerate(caches))
    model(mx.array([[0]]), cache=caches)
    shapes = {(c.keys.shape[1], c.keys.shape[3], c.values.shape[3], c.keys.dtype) for c in caches}
    of_this_thread(lambda: mx.eval([c.state for c in caches]), "the model's weights")
    if len(shapes) != 1:
        raise UnsupportedModelError(
            f"layers of this model have different KV shapes {sorted(map(str, shapes))}; "
            "a block pool needs one geometry for all layers"
        )
    (heads, k_dim, v_dim, dtype), = shapes
    name = getattr(getattr(model, "args", None), "model_type", "") or type(model).__module__.rsplit(".", 1)[-1]
    return ModelCacheSpec(
        n_layers=len(caches), n_kv_heads=heads, k_head_dim=k_dim, v_head_dim=v_dim,
        dtype=str(dtype).rsplit(".", 1)[-1], layer_windows=windows, name=name,
    )


def empty_layer_cache(window: Optional[int]) -> LayerCache:
    return KVCache() if window is None else RotatingKVCache(max_size=window, keep=0)


def build_layer_cache(window: Optional[int], keys: mx.array, values: mx.array, offset: int,
                      keep_alive: object = None, *, own_arrays: bool = False) -> LayerCache:
    """A cache object holding ``keys``/``values`` ``[1, heads, T, dim]`` after ``offset`` tokens.

    Full attention: ``T`` may exceed ``offset`` (the unused tail of the last
    block), exactly like ``KVCache`` after a prefill. Sliding window: ``T`` is
    ``min(offset, window)`` tokens in temporal order. ``keep_alive``, if given, is
    kept by the cache object (and by its copies) for as long as it lives: what its
    arrays' memory depends on.

    ``own_arrays``: the arrays were made for this cache (not views of memory that is written in
    place elsewhere, such as the pool's), so a batch that merges the cache alone takes them as its
    own buffers instead of copying them (:func:`merge_keeping_arrays`).
    """
    if window is None:
        cache = KVCache()
        cache.state = (keys, values, offset)
    else:
        cache = RotatingKVCache(max_size=window, keep=0)
        cache.state = (keys, values, offset, 0, window, keys.shape[2])
    # mlx-lm's cache classes keep their state in __dict__; an instance's ``merge`` is found before the
    # class's (a classmethod), and ``copy.deepcopy`` keeps functions as they are.
    if keep_alive is not None:
        cache.semantic_keep_alive = keep_alive
    if own_arrays:
        cache.merge = merge_keeping_arrays
    return cache


def merge_keeping_arrays(caches: List[LayerCache]):
    """mlx-lm's batch merge (``BatchKVCache.merge``, ``BatchRotatingKVCache.merge``) of one layer's caches,
    when a cache is merged alone and already holds what the batch would: the batch takes its arrays as
    they are, room after the tokens included. mlx-lm's merge makes the batch's buffer exactly as long as
    the cached tokens (a copy, unless the cache's buffer is exactly that long), so the first prompt token
    overflows it and mlx-lm grows it with a copy of the whole context; a rebuilt cache whose
    full-attention buffer has room for the prompt (see ``blocks_to_cache``) goes into the batch with no
    copy at all. mlx-lm's own batch buffers are longer than their tokens after any update: its methods
    read ``[..., :_idx]``.

    The batch gets its own handles on the arrays: mlx-lm updates a batch with ``keys[...] = ...``, which
    rebinds the handle it is applied to, so the cache given never sees the batch's tokens. MLX updates a
    buffer in place only once nothing else holds it (until then it copies it first)."""
    cache = caches[0]
    if len(caches) == 1 and cache.keys is not None:
        keys, values = cache.keys.reshape(cache.keys.shape), cache.values.reshape(cache.values.shape)
        if type(cache) is KVCache:
            batch = BatchKVCache([0])
            batch.keys, batch.values, batch._idx = keys, values, cache.offset
            batch.offset = mx.array([cache.offset])
            return batch
        held = keys.shape[2]
        if type(cache) is RotatingKVCache and cache._idx == held == cache.size():  # in temporal order already
            batch = BatchRotatingKVCache(cache.max_size, [0])
            batch.keys, batch.values, batch._idx, batch._offset = keys, values, held, held
            batch.offset = mx.array([cache.offset])
            return batch
    return type(cache).merge(caches)  # the class's own


def read_layer_cache(cache: LayerCache, *, whole_buffer: bool = False) -> Tuple[mx.array, mx.array, int, int]:
    """``(keys, values, first_token, offset)``: the tokens a cache still sees, in temporal order,
    ``[1, heads, offset - first_token, dim]`` (lazy views; evaluate or copy them). A buffer that holds
    exactly those tokens is returned as it is: slicing it would add an operation and, on some paths,
    a strided copy. ``whole_buffer``: a full-attention cache's buffer is returned as it is even when it
    holds more (its unused tail, after the ``offset - first_token`` tokens), for a caller that reads
    only those tokens."""
    if type(cache) not in (KVCache, RotatingKVCache):
        raise UnsupportedModelError(f"cannot read a {type(cache).__name__}: semantic stores KVCache and "
                                    "RotatingKVCache layers")
    offset = cache.offset
    if type(offset) is not int or offset < 0:  # set by hand, e.g. to a float
        raise IncompatibleCacheError(f"a cache's offset must be an int >= 0, got {offset!r}")
    if cache.keys is None:
        return None, None, 0, 0
    keys, values = cache.keys, cache.values
    if type(cache) is KVCache and whole_buffer:
        # As they are, unchecked: a store checks its layers' arrays once per distinct shape, where a check
        # here would cost every layer (~0.2 us each); nothing below would touch them.
        return keys, values, 0, offset
    if type(keys) is not mx.array or type(values) is not mx.array or keys.ndim != 4 or values.ndim != 4:
        raise IncompatibleCacheError(
            f"a cache's keys and values must be mx.arrays [1, heads, tokens, head_dim], got "
            f"{_array_description(keys)} and {_array_description(values)}")
    if type(cache) is KVCache:
        if keys.shape[2] == offset:
            return keys, values, 0, offset
        # Plain slices of the token axis: MLX builds them in half the time of ``[..., :offset, :]``.
        return keys[:, :, :offset], values[:, :, :offset], 0, offset
    if type(cache.max_size) is not int or cache.max_size <= 0 or cache.keep != 0:
        # A float size would reach the pool's block arithmetic (and its caches) as a float; kept tokens
        # (keep > 0) sit at the front of the buffer, not in temporal order, and would be stored as the oldest.
        raise IncompatibleCacheError(
            f"a RotatingKVCache must have an int max_size > 0 and keep=0 (semantic stores plain sliding "
            f"windows), got max_size={cache.max_size!r}, keep={cache.keep!r}")
    if type(cache._idx) is not int or not 0 <= cache._idx <= keys.shape[2] or keys.shape[2] != values.shape[2]:
        raise IncompatibleCacheError(
            f"a RotatingKVCache's write position ({cache._idx!r}) must be an int within its buffers of "
            f"{keys.shape[2]} (keys) and {values.shape[2]} (values) tokens")
    visible = min(offset, cache.max_size)
    keys, values = cache._temporal_order(keys), cache._temporal_order(values)
    if keys.shape[2] != visible:
        keys, values = keys[:, :, -visible:], values[:, :, -visible:]
    return keys, values, offset - visible, offset


def _array_description(value) -> str:
    if type(value) is mx.array:
        return f"an mx.array of shape {value.shape}"
    return f"{type(value).__name__} {getattr(value, 'shape', '')}".rstrip()


# A prefill chunk's peak memory on the CPU, over its attention scores alone: 1.14-1.35x on tiny-llama (chunks of
# 2,048 and 4,096 tokens against contexts of 4,096 and 8,192, ``mx.get_peak_memory``).
_PREFILL_PEAK_OVER_SCORES = 1.4


def prefill_chunk_bytes(model, sequences: Sequence[Tuple[int, int]], step: int, dtype_bytes: int) -> int:
    """Memory the largest prefill chunk of ``sequences`` (``(cached tokens, prompt tokens)`` each) needs when
    mlx-lm prefills them together, where MLX's attention materialises its scores: on the CPU,
    ``scaled_dot_product_attention`` is a matmul, a softmax and a matmul, ``[batch, query heads, chunk,
    context]`` scores at once, every sequence padded to the longest chunk and context (Metal and CUDA run fused
    kernels: 0 there). 0 for a model whose config names no ``num_attention_heads``."""
    heads = getattr(getattr(model, "args", None), "num_attention_heads", None)
    if mx.default_device() != mx.cpu or not isinstance(heads, int) or not sequences:
        return 0
    longest_prompt = max(prompt for _, prompt in sequences)
    context = max(cached for cached, _ in sequences) + longest_prompt  # caches merged left-padded, prompts padded
    return int(len(sequences) * heads * min(step, longest_prompt) * context * dtype_bytes * _PREFILL_PEAK_OVER_SCORES)


def vocab_size(model) -> int:
    """How many token ids the model can take and score: the smallest of its config's ``vocab_size``, its
    token embedding's rows and its logits' width (an id past any of them indexes out of bounds)."""
    return _vocabulary(model)[0]


def _vocabulary(model) -> Tuple[int, int]:
    """``(vocab_size(model), the width of its logits)``."""
    sizes = []
    configured = getattr(getattr(model, "args", None), "vocab_size", None)
    if isinstance(configured, int) and configured > 0:
        sizes.append(configured)
    for name, module in model.named_modules():
        if name.endswith("embed_tokens") and isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)):
            sizes.append(module.num_embeddings if isinstance(module, nn.QuantizedEmbedding) else module.weight.shape[0])
    width = model(mx.array([[0]]), cache=make_cache(model)).shape[-1]
    return min(sizes + [width]), width


def _first_ids(sampler, vocab: int):
    """``sampler`` choosing among the first ``vocab`` token ids only."""
    return lambda logprobs: sampler(logprobs[..., :vocab])


def sampler_for(sampling: SamplingParams, vocab: int):
    """mlx-lm's sampler; ``top_k`` of the whole vocabulary keeps every token, which mlx-lm spells 0. It
    samples in float32: mlx-lm scales the logits by 1/temperature in their own dtype, which in float16
    overflows (and samples at random) from temperatures below ~1e-5."""
    top_k = 0 if sampling.top_k >= vocab else sampling.top_k
    sampler = make_sampler(temp=sampling.temperature, top_p=sampling.top_p, top_k=top_k, min_p=sampling.min_p)
    if sampling.greedy:
        return sampler
    return lambda logprobs: sampler(logprobs.astype(mx.float32))


def logits_processors_for(sampling: SamplingParams):
    """mlx-lm's repetition penalty, computed on float32 logits and handed back in the logits' own dtype.

    mlx-lm divides the logits by the penalty in their dtype, which in float16 overflows (inf, then NaN: tokens
    at random) for penalties below ~1e-4. The row goes back in its dtype because mlx-lm concatenates the batch's
    rows: one float32 row made every neighbour's log-softmax float32, and a bfloat16 neighbour's greedy tokens
    changed at near-ties."""
    penalty = sampling.repetition_penalty
    if penalty is None or penalty == 1:
        return []
    return [lambda tokens, logits, processor=processor:
            _in_dtype_of(logits, processor(tokens, logits.astype(mx.float32)))
            for processor in make_logits_processors(repetition_penalty=penalty)]


def _in_dtype_of(logits: mx.array, processed: mx.array) -> mx.array:
    """``processed`` (float32) in ``logits``' dtype. A row whose largest value that dtype cannot hold (float16,
    a tiny penalty) is first shifted so that its largest is 0: every sampler reads log-probabilities, which a
    shift leaves as they were, where clipping would tie the largest values."""
    if logits.dtype == processed.dtype:
        return processed
    top = mx.max(processed, axis=-1, keepdims=True)
    shift = mx.where(top > mx.finfo(logits.dtype).max, top, mx.zeros_like(top))
    return (processed - shift).astype(logits.dtype)


@dataclass
class GenerationEvent:
    """One token of one sequence; ``cache`` and ``context_tokens`` are set when it finished."""

    uid: int
    token: int
    finish_reason: Optional[str]
    cache: Optional[List[LayerCache]]
    context_tokens: Optional[List[int]]


class StepFailed(Exception):
    """A batched step raised. ``tags`` are the sequences it is attributed to: the one whose own sampler or
    logits processor raised, else every sequence the generator held (the shared forward pass failed, so
    any of them may be the cause). The generator is empty afterwards: its state was lost mid-step."""

    def __init__(self, tags: List[Any], attributed: bool, cause: BaseException):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.tags = tags
        self.attributed = attributed
        self.cause = cause


class _SequenceError(Exception):
    def __init__(self, tag: Any, cause: BaseException):
        super().__init__(tag)
        self.tag = tag
        self.cause = cause


def _attributed(function, tag):
    """``function`` raising ``_SequenceError(tag)`` instead of what it raises, so a batched step that fails
    inside one sequence's own sampler or logits processor names that sequence."""
    def call(*args):
        try:
            return function(*args)
        except Exception as exc:
            raise _SequenceError(tag, exc) from exc
    return call


def extract_view(cache: LayerCache, idx: int) -> LayerCache:
    """Sequence ``idx`` of a batch layer cache, as mlx-lm's own ``extract`` gives it but without that
    method's final ``mx.contiguous``: its arrays are views of the batch's buffers. Every cache the engine
    takes out of a batch is stored at once (the store reads only its new blocks' tokens), so the copy of
    the whole context per layer that ``extract`` makes was pure cost (a store's main cost on a GPU).
    A view keeps the batch's buffer alive: drop it before the batch's next step, or that step copies the
    buffer instead of updating it in place. Other cache types: their own ``extract``."""
    if type(cache) is BatchKVCache:
        mx.eval(cache.left_padding)
        padding = cache.left_padding.tolist()[idx]
        view = KVCache()
        if cache.keys.shape[0] == 1 and padding == 0:  # the buffers themselves, a KVCache's usual unused tail
            view.keys, view.values = cache.keys, cache.values  # included: no operation at all
        else:
            view.keys = cache.keys[idx : idx + 1, :, padding : cache._idx]
            view.values = cache.values[idx : idx + 1, :, padding : cache._idx]
        view.offset = cache._idx - padding
        return view
    if type(cache) is BatchRotatingKVCache:
        mx.eval(cache.left_padding, cache.offset)
        padding = max(0, cache.left_padding.tolist()[idx])
        view = RotatingKVCache(cache.max_size)
        keys, values, end = cache.keys[idx : idx + 1], cache.values[idx : idx + 1], cache._idx
        if cache.rotated:  # a copy in temporal order, as mlx-lm makes it
            keys, values, end = mx.roll(keys, -end, axis=2), mx.roll(values, -end, axis=2), cache.max_size
        view.keys, view.values = keys[:, :, padding:end], values[:, :, padding:end]
        view.offset = cache.offset.tolist()[idx]
        view._idx = view.keys.shape[2]
        return view
    return cache.extract(idx)


def split_moving_all(batch, indices: List[int]):
    """mlx-lm's ``PromptProcessingBatch.split(indices)``, without its copies when every sequence moves (a
    lone request, or requests that finish their prompts together): the caches themselves go to the new
    batch. mlx-lm's split deep-copies the whole batch cache, then keeps all rows of the copy with a take
    (copies of every layer's buffers, and a host sync per layer), and empties the original. Only a
    ``BatchKVCache`` of several sequences is still filtered: its filter also drops left padding common to
    all of them (a take)."""
    if sorted(indices) != list(range(len(batch.uids))):
        return type(batch).split(batch, indices)
    caches, batch.prompt_cache = batch.prompt_cache, []
    moved = batch._copy()  # the lists, with no caches to deep-copy
    batch.filter([])
    moved.prompt_cache = caches
    if len(indices) > 1:
        for cache in caches:
            if type(cache) is BatchKVCache:
                cache.filter(indices)
    return moved


def _without_batch_copies(generator: BatchGenerator) -> BatchGenerator:
    """``generator`` with its prompt and generation batches extracting sequences as :func:`extract_view`s,
    and its prompt batch splitting as :func:`split_moving_all`. Both batches live as long as the generator
    (mlx-lm extends them, never replaces them); the overrides are on these two objects only, not on
    mlx-lm's classes."""
    for batch in (generator._prompt_batch, generator._generation_batch):
        batch.extract_cache = lambda idx, batch=batch: [extract_view(c, idx) for c in batch.prompt_cache]
    generator._prompt_batch.split = lambda indices, batch=generator._prompt_batch: split_moving_all(batch, indices)
    return generator


class Generator:
    """mlx-lm's ``BatchGenerator`` behind the few calls the engine needs.

    Each sequence carries a ``tag`` (the engine's request id); a step that raises
    raises ``StepFailed`` naming the tags it is attributed to, and leaves the
    generator empty (``BatchGenerator`` cannot be resumed after an exception
    inside a step: caches and token lists are half updated).
    """

    def __init__(self, model, *, stop_token_ids: Sequence[int], prefill_step_size: int = 2048,
                 prefill_batch_size: int = 8, completion_batch_size: int = 32):
        check_mlx_lm_version()
        self._make = lambda: _without_batch_copies(BatchGenerator(
            model,
            stop_tokens=[[t] for t in stop_token_ids] or None,
            prefill_step_size=prefill_step_size,
            prefill_batch_size=prefill_batch_size,
            completion_batch_size=completion_batch_size,
        ))
        self._gen = self._make()
        self._vocab, width = _vocabulary(model)
        # Logits wider than the vocabulary (an untied head with rows past the embedding's, or a config's
        # smaller vocab_size): a sampled id past it comes back as the next input, and the embedding reads out
        # of bounds (SIGSEGV on CPU). Samplers see only the first ids; greedy requests all get one object, as
        # with mlx-lm's own greedy sampler, so a batch of them still samples in one call.
        self._cut = width > self._vocab
        self._greedy = _first_ids(greedy_sampler, self._vocab)
        self._tags: Dict[int, Any] = {}
        self.resets = 0  # how many times every sequence was dropped and the batch started over

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def insert(self, prompt_tokens: List[int], cache: Optional[List[LayerCache]], context_tokens: List[int],
               max_tokens: int, sampling: SamplingParams, tag: Any) -> int:
        """Queue a sequence that continues ``cache`` (which holds ``context_tokens``) with ``prompt_tokens``."""
        sampler = sampler_for(sampling, self._vocab)
        if self._cut:
            sampler = self._greedy if sampler is greedy_sampler else _first_ids(sampler, self._vocab)
        if not sampling.greedy:  # greedy requests share mlx-lm's one sampler: one argmax for the whole batch
            sampler = _attributed(sampler, tag)
        processors = [_attributed(p, tag) for p in logits_processors_for(sampling)]
        # Tagged before mlx-lm queues it, under the uid mlx-lm will give it: a sequence queued by an insert that
        # an interrupt (Ctrl-C) cut short before it returned is still known, and remove_tagged finds it.
        uid = self._gen._uid_count
        self._tags[uid] = tag
        try:
            (queued,) = self._gen.insert(
                [prompt_tokens], max_tokens=[max_tokens], caches=[cache] if cache is not None else None,
                all_tokens=[list(context_tokens)], samplers=[sampler], logits_processors=[processors],
            )
        except Exception:
            if self._gen._uid_count == uid:  # refused before it was queued
                self._tags.pop(uid, None)
            raise
        if queued != uid:
            raise AssertionError(f"mlx-lm numbered the sequence {queued}, not {uid}: see check_mlx_lm_version")
        return uid

    def remove_tagged(self, tag: Any) -> None:
        """Remove every sequence inserted with ``tag``: one that an interrupted :meth:`insert` queued holds the
        cache it was given (and what that cache pins) until removed."""
        uids = [uid for uid, t in self._tags.items() if t == tag]
        if uids:
            self._remove(uids)

    def merges_next_insert(self) -> bool:
        """Whether a sequence inserted now is merged into mlx-lm's batch at the next :meth:`next` (where
        mlx-lm copies inserted caches and keeps nothing of them): its queue is shorter than the room
        its prompt and generation batches leave (``BatchGenerator._next``; a step that finishes
        sequences may leave more room, never less)."""
        gen = self._gen
        room = min(gen.prefill_batch_size - len(gen._prompt_batch),
                   gen.completion_batch_size - len(gen._generation_batch))
        return len(gen._unprocessed_sequences) < room

    def merges_next_insert_alone(self) -> bool:
        """Whether a sequence inserted now is merged into mlx-lm's batch at the next :meth:`next` by itself
        (its cache alone, then no other prompt to join: :func:`merge_keeping_arrays` keeps its arrays),
        unless more sequences are inserted before that step: nothing is queued or prefilling, and the
        batches have room for it."""
        gen = self._gen
        return not gen._unprocessed_sequences and len(gen._prompt_batch) == 0 and self.merges_next_insert()

    def next(self) -> List[GenerationEvent]:
        """Advance every active sequence by one step (prefill chunk or decoded token)."""
        try:
            responses = self._gen.next_generated()
            events = [
                GenerationEvent(r.uid, int(r.token), r.finish_reason, r.prompt_cache, r.all_tokens) for r in responses
            ]
        except _SequenceError as exc:
            self.reset()
            raise StepFailed([exc.tag], True, exc.cause) from exc.cause
        except Exception as exc:
            tags = list(self._tags.values())
            self.reset()
            raise StepFailed(tags, False, exc) from exc
        except BaseException:
            self.reset()
            raise
        for event in events:
            if event.finish_reason is not None:
                self._tags.pop(event.uid, None)
        return events

    def empty_copy(self) -> "Generator":
        """A new, empty generator with the same model and settings."""
        copy = object.__new__(Generator)
        # The settings only, not the whole instance dict: a method wrapped on this instance (instrumentation;
        # pytest 9.1's monkeypatch leaves one bound here on undo) came along bound to this generator, and the
        # copy's inserts went into this batch.
        copy._make, copy._vocab, copy._cut, copy._greedy = self._make, self._vocab, self._cut, self._greedy
        copy._gen, copy._tags, copy.resets = self._make(), {}, 0
        return copy

    def reset(self) -> None:
        """Drop every sequence: the batch starts over (``resets`` counts it)."""
        self.resets += 1
        self._gen.close()
        self._gen = self._make()
        self._tags.clear()

    def extract(self, uid: int) -> Optional[Tuple[List[LayerCache], List[int]]]:
        """The sequence's current cache and the tokens it holds, or ``None`` if it is not here."""
        found = self._gen.extract_cache([uid])
        if uid not in found:
            return None
        cache, tokens = found[uid]
        return cache, list(tokens)

    def remove(self, uid: int) -> None:
        self._remove([uid])

    def _remove(self, uids: List[int]) -> None:
        try:
            self._gen.remove(uids)
        except BaseException:  # an interrupt inside mlx-lm's remove can leave its batches half filtered
            self.reset()
            raise
        for uid in uids:
            self._tags.pop(uid, None)

    def close(self) -> None:
        self._gen.close()
        self._tags.clear()
