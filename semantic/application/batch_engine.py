"""``BlockPoolBatchEngine``: continuous batching on mlx-lm, with every agent's context kept as pool blocks.

Lifecycle of a request:

1. ``submit`` tokenizes, works out how many new blocks the finished context can
   need at most, and queues the request.
2. Admission (in ``submit`` when there is room, else in ``step``, first come first
   served): the pool *reserves* those blocks, the cache is rebuilt from the
   source blocks (if any) and the sequence goes into mlx-lm's ``BatchGenerator``.
   A reservation guarantees that the finished context can be stored.
3. ``step`` runs the batch and yields a :class:`Completion` as soon as each
   sequence finishes; its ``blocks`` share every unchanged block of the source
   context and write only the new ones.

Blocks return to the pool when their last handle is released: call
``AgentBlocks.release()`` (or use it as a context manager), or drop the last
reference to it (a finalizer gives its blocks back at the pool's next operation).
The engine itself keeps only weak references to completed contexts.

Two ways to resume an agent:

* ``submit(agent, prompt, cache=blocks)`` continues ``blocks``: ``prompt`` is
  appended to the context (no BOS is added).
* ``submit(agent, full_prompt, cache=blocks, match_prefix=True)`` is for callers
  that re-send the whole conversation: the longest common *token* prefix of the
  cached context and ``full_prompt`` is reused (trimmed inside a block if they
  diverge there) and only the rest is prefilled. A model with sliding-window
  layers can reuse a prefix shorter than the cached context only while that
  context still fits in the window; otherwise the prompt is prefilled in full.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Deque, Dict, Iterator, List, Optional, Sequence, Union

from semantic.adapters import mlx_lm_adapter as adapter
from semantic.application.block_cache import blocks_to_cache, cache_to_blocks, can_trim, layer_ids_for
from semantic.domain.entities import AgentBlocks
from semantic.domain.errors import (
    IncompatibleCacheError,
    InvalidRequestError,
    PoolExhaustedError,
    UnknownRequestError,
)
from semantic.domain.services import BlockPool, Reservation
from semantic.domain.value_objects import ModelCacheSpec

Prompt = Union[str, Sequence[int]]


class PoolPressureWarning(UserWarning):
    """``step`` returned with requests still waiting for blocks that live handles hold."""


@dataclass
class Completion:
    """A finished request. ``token_ids`` are the generated tokens; ``blocks`` the agent's whole
    context after them (source context + prompt + generated tokens), owned by the pool."""

    uid: int
    agent_id: str
    text: str
    token_ids: List[int]
    finish_reason: str
    blocks: AgentBlocks
    prompt_tokens: int
    reused_tokens: int
    time_to_first_token: float


@dataclass
class _Request:
    uid: int
    agent_id: str
    prompt_tokens: List[int]
    context_tokens: List[int]  # reused from the source, already in the cache
    source: Optional[AgentBlocks]
    max_tokens: int
    sampler: object
    logits_processors: list
    new_blocks_bound: int
    submitted_at: float
    reservation: Optional[Reservation] = None
    generator_uid: Optional[int] = None
    generated: List[int] = field(default_factory=list)
    first_token_at: Optional[float] = None

    @property
    def reused_tokens(self) -> int:
        return len(self.context_tokens)


class BlockPoolBatchEngine:
    """Batched generation for many agents sharing one model, their caches kept in ``pool``."""

    def __init__(self, model, tokenizer, pool: BlockPool, spec: Optional[ModelCacheSpec] = None, *,
                 prefill_step_size: int = 2048, prefill_batch_size: int = 8, completion_batch_size: int = 32):
        model_spec = ModelCacheSpec.from_model(model)
        spec = pool.spec if spec is None else spec
        for name, other in (("spec", spec), ("pool.spec", pool.spec)):
            if _geometry(other) != _geometry(model_spec):
                raise IncompatibleCacheError(
                    f"{name} ({other.describe()}) does not match the model ({model_spec.describe()}); "
                    "build both from ModelCacheSpec.from_model(model)"
                )
        if spec.block_format != pool.spec.block_format:
            raise IncompatibleCacheError(
                f"spec keeps {spec.block_format.name} blocks, the pool {pool.spec.block_format.name} blocks; "
                "pass the pool's spec (or none)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.pool = pool
        self.spec = pool.spec
        self._generator = adapter.Generator(
            model,
            stop_token_ids=sorted(getattr(tokenizer, "eos_token_ids", ()) or ()),
            prefill_step_size=prefill_step_size,
            prefill_batch_size=prefill_batch_size,
            completion_batch_size=completion_batch_size,
        )
        self._lock = threading.RLock()
        self._uids = itertools.count()
        self._waiting: Deque[_Request] = collections.deque()
        self._running: Dict[int, _Request] = {}  # by generator uid
        self._by_uid: Dict[int, _Request] = {}
        self._finished: "weakref.WeakValueDictionary[int, AgentBlocks]" = weakref.WeakValueDictionary()

    # ---- submitting -------------------------------------------------------------------------------
    def submit(self, agent_id: str, prompt: Prompt, cache: Optional[AgentBlocks] = None, max_tokens: int = 256,
               *, match_prefix: bool = False, temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0,
               min_p: float = 0.0, repetition_penalty: Optional[float] = None) -> int:
        """Queue a request and return its uid. Greedy unless ``temperature`` > 0 (mlx-lm's samplers)."""
        if not isinstance(agent_id, str) or not agent_id:
            raise InvalidRequestError(f"agent_id must be a non-empty string, got {agent_id!r}")
        if not isinstance(max_tokens, int) or max_tokens <= 0:
            raise InvalidRequestError(f"max_tokens must be a positive int, got {max_tokens!r}")
        if temperature < 0 or not 0 <= top_p <= 1 or top_k < 0 or not 0 <= min_p <= 1:
            raise InvalidRequestError(
                f"sampling parameters out of range: temperature={temperature} (>= 0), top_p={top_p} (0..1), "
                f"top_k={top_k} (>= 0), min_p={min_p} (0..1)"
            )
        if cache is not None:
            self.pool.check_handle(cache)
        elif match_prefix:
            raise InvalidRequestError("match_prefix=True needs cache= (the blocks to match the prompt against)")
        tokens = self._tokenize(prompt, continuation=cache is not None and not match_prefix)

        with self._lock:
            context: List[int] = []
            if cache is not None:
                reuse = self._reusable_prefix(cache, tokens) if match_prefix else cache.num_tokens
                context = list(cache.token_ids[:reuse])
                if match_prefix:
                    tokens = tokens[reuse:]
            bound = self._new_blocks_bound(len(context) + len(tokens) + max_tokens, len(context))
            pinned = cache.num_blocks if cache is not None else 0
            if bound > self.pool.total_blocks - pinned:
                raise PoolExhaustedError(
                    bound, self.pool.total_blocks - pinned,
                    f"(a context of {len(context) + len(tokens) + max_tokens} tokens can never fit this pool; "
                    "shorten the prompt or max_tokens)",
                )
            request = _Request(
                uid=next(self._uids), agent_id=agent_id, prompt_tokens=tokens, context_tokens=context,
                source=cache.share() if cache is not None and context else None, max_tokens=max_tokens,
                sampler=adapter.sampler_for(temperature, top_p, top_k, min_p),
                logits_processors=adapter.logits_processors_for(repetition_penalty),
                new_blocks_bound=bound, submitted_at=time.perf_counter(),
            )
            self._by_uid[request.uid] = request
            self._waiting.append(request)
            self._admit()
            return request.uid

    def _tokenize(self, prompt: Prompt, continuation: bool) -> List[int]:
        if isinstance(prompt, str):
            tokens = self.tokenizer.encode(prompt, add_special_tokens=not continuation) if prompt else []
        elif isinstance(prompt, Sequence) and all(isinstance(t, int) and t >= 0 for t in prompt):
            tokens = list(prompt)
        else:
            raise InvalidRequestError("prompt must be a string or a sequence of non-negative token ids")
        if not tokens:
            raise InvalidRequestError("the prompt is empty (no tokens to process); give at least one token")
        return list(tokens)

    def _reusable_prefix(self, cache: AgentBlocks, tokens: List[int]) -> int:
        common = 0
        for a, b in zip(cache.token_ids, tokens):
            if a != b:
                break
            common += 1
        common = min(common, len(tokens) - 1)  # at least one token must be fed to get logits
        return common if can_trim(self.spec, cache, common) else 0

    def _new_blocks_bound(self, final_tokens: int, reused_tokens: int) -> int:
        """Most blocks a context can need that it does not share with its source, at any length up to
        ``final_tokens`` (generation may stop early)."""
        spec, size = self.spec, self.spec.block_size
        bound = 0
        for window in spec.layer_windows:
            if window is None:
                bound += spec.blocks_for_tokens(final_tokens) - reused_tokens // size
            else:
                bound += min(spec.blocks_for_tokens(final_tokens), -(-window // size) + 1)
        return bound

    def _admit(self) -> None:
        """Move waiting requests into the generator, first come first served, while blocks can be reserved."""
        while self._waiting:
            request = self._waiting[0]
            try:
                request.reservation = self.pool.reserve(request.new_blocks_bound, f"request {request.uid}")
            except PoolExhaustedError:
                return
            try:
                cache = self._reconstruct_cache(request.source, request.reused_tokens) if request.source else None
                request.generator_uid = self._generator.insert(
                    request.prompt_tokens, cache, request.context_tokens, request.max_tokens,
                    request.sampler, request.logits_processors,
                )
            except BaseException:
                request.reservation.cancel()
                request.reservation = None
                raise
            self._waiting.popleft()
            self._running[request.generator_uid] = request

    # ---- running ----------------------------------------------------------------------------------
    def step(self) -> Iterator[Completion]:
        """Run until every admitted request has finished, yielding each completion as soon as it finishes.

        Requests waiting for blocks are admitted as finished contexts are released
        (a completion dropped inside the loop frees its blocks at once). If requests
        still wait when nothing runs, the blocks they need are held by handles the
        caller keeps: ``step`` returns, warns with ``PoolPressureWarning``, and
        ``pending`` says how many wait; release handles and call ``step`` again.
        """
        while True:
            with self._lock:
                self._admit()
                if not self._running:
                    if self._waiting:
                        head = self._waiting[0]
                        warnings.warn(PoolPressureWarning(
                            f"{len(self._waiting)} request(s) wait for blocks: the next needs "
                            f"{head.new_blocks_bound}, {self.pool.available_blocks} are free. Release AgentBlocks "
                            "you no longer need, then call step() again."
                        ), stacklevel=2)
                    return
                done = self.step_once()
            yield from done

    def step_once(self) -> List[Completion]:
        """One batched model step (a prefill chunk or one token for every running sequence);
        returns the requests that finished in it."""
        with self._lock:
            self._admit()
            if not self._running:
                return []
            events = self._generator.next()
            return [c for c in map(self._on_event, events) if c is not None]

    def generate(self, agent_id: str, prompt: Prompt, **kwargs) -> Completion:
        """Submit one request and run the engine until it finishes (other requests run along)."""
        uid = self.submit(agent_id, prompt, **kwargs)
        result = None
        for completion in self.step():
            if completion.uid == uid:
                result = completion
        return result

    def _on_event(self, event: adapter.GenerationEvent) -> Optional[Completion]:
        request = self._running[event.uid]
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        request.generated.append(event.token)
        if event.finish_reason is None:
            return None
        del self._running[event.uid]
        try:
            blocks = cache_to_blocks(
                self.pool, request.agent_id, event.cache, event.context_tokens, source=request.source,
                reused_tokens=request.reused_tokens, reservation=request.reservation,
            )
        finally:
            self._retire(request)
        self._finished[request.uid] = blocks
        return Completion(
            uid=request.uid, agent_id=request.agent_id,
            text=self.tokenizer.decode(request.generated, skip_special_tokens=True),
            token_ids=list(request.generated), finish_reason=event.finish_reason, blocks=blocks,
            prompt_tokens=len(request.prompt_tokens), reused_tokens=request.reused_tokens,
            time_to_first_token=request.first_token_at - request.submitted_at,
        )

    def _retire(self, request: _Request) -> None:
        if request.reservation is not None:
            request.reservation.cancel()
        if request.source is not None:
            request.source.release()
            request.source = None
        del self._by_uid[request.uid]

    def cancel(self, uid: int) -> None:
        """Drop a queued or running request and give back everything it held."""
        with self._lock:
            request = self._request(uid)
            if request.generator_uid is None:
                self._waiting.remove(request)
            else:
                self._generator.remove(request.generator_uid)
                del self._running[request.generator_uid]
            self._retire(request)

    @property
    def pending(self) -> int:
        """Requests submitted and not yet finished."""
        with self._lock:
            return len(self._by_uid)

    def close(self) -> None:
        """Cancel everything in flight and release what it held."""
        with self._lock:
            for uid in list(self._by_uid):
                self.cancel(uid)
            self._generator.close()

    # ---- cache conversions ------------------------------------------------------------------------
    def _reconstruct_cache(self, agent_blocks: AgentBlocks, n_tokens: Optional[int] = None):
        """``agent_blocks`` (its first ``n_tokens`` tokens, default all) -> one evaluated mlx-lm cache
        per layer, as the model's own ``make_cache`` would hold them."""
        return blocks_to_cache(self.pool, agent_blocks, n_tokens)

    def _extract_cache(self, uid: int) -> AgentBlocks:
        """The request's current context as a new handle, at any stage: waiting, prefilling, generating,
        or finished (while its completion's blocks are alive)."""
        with self._lock:
            finished = self._finished.get(uid)
            if finished is not None and not finished.released:
                return finished.share()
            request = self._request(uid)
            if request.generator_uid is not None:
                found = self._generator.extract(request.generator_uid)
                if found is not None:
                    caches, tokens = found
                    return cache_to_blocks(self.pool, request.agent_id, caches, tokens, source=request.source,
                                           reused_tokens=request.reused_tokens)
            return self._prefix_handle(request)

    def _prefix_handle(self, request: _Request) -> AgentBlocks:
        """The context a request starts from, sharing its source's blocks."""
        n = request.reused_tokens
        with self.pool.build_handle(request.agent_id) as builder:
            if request.source is None:
                ids = [() for _ in range(self.spec.n_layers)]
            else:
                ids = [layer_ids_for(self.spec, request.source, layer, n) for layer in range(self.spec.n_layers)]
            builder.retain([b for layer in ids for b in layer])
            return builder.finish(request.context_tokens, ids)

    def _request(self, uid: int) -> _Request:
        try:
            return self._by_uid[uid]
        except (KeyError, TypeError):
            raise UnknownRequestError(
                f"no request {uid!r} in flight (finished requests are found only while their blocks are alive)"
            ) from None


def _geometry(spec: ModelCacheSpec):
    return (spec.n_layers, spec.n_kv_heads, spec.k_head_dim, spec.v_head_dim, spec.dtype, spec.block_size,
            spec.layer_windows)
