"""``BlockPoolBatchEngine``: continuous batching on mlx-lm, with every agent's context kept as pool blocks.

Lifecycle of a request:

1. ``submit`` tokenizes, works out how many new blocks the finished context can
   need at most, and queues the request.
2. Admission (in ``submit`` when there is room, else in ``step``, first come first
   served; while nothing runs, a request that does not fit lets those behind it that
   do go first, and waiting resumes that could never all fit beside the contexts they
   resume end newest first; requests kept apart after failing together wait for each
   other, see Failures): the pool *reserves* those blocks, the cache is rebuilt from the
   source blocks (if any) and the sequence goes into mlx-lm's ``BatchGenerator``.
   A reservation guarantees that the finished context can be stored.
3. ``step`` runs the batch and yields a :class:`Completion` as soon as each
   sequence finishes; its ``blocks`` share every unchanged block of the source
   context and write only the new ones.

Failures. ``submit`` checks every argument (token ids against the model's
vocabulary, sampling parameters against mlx-lm's ranges) and raises
``InvalidRequestError`` before anything is reserved. A request that fails later
(rebuilding its cache, in a batched step, storing its context) ends alone: its
completion has ``finish_reason == "error"`` and ``error`` set to a
``RequestFailedError`` naming it (``generate`` raises it; ``blocks`` raises it
too), its blocks and reservation go back to the pool, and the other requests go
on to the tokens they would have produced without it. A step that fails inside
one request's sampler or logits processor names that request; one that fails in
the shared forward pass is re-run for each request alone, and those that fail
alone are the culprits. If none does, halves of the batch are run to find the
company that fails (a pair, at best), and the batch is retried; the members of
that company (the whole batch when no half fails) count towards a bounded number
of retries. A company found to fail is kept apart (unless it is the whole batch and
none of its members failed before: a transient failure passes when retried
together): those of its members that did not pass a probe together never share
a batch again. A request that reaches the bound gets one run on its own (each
passed alone when probed), and is failed only if that fails too; until it has
run, nothing else is admitted.
Either way the batch is rebuilt (mlx-lm cannot resume a step that raised), so the
survivors' prompts and generated tokens are prefilled again: a failure costs one
prefill of every running request.

Blocks return to the pool when their last handle is released: call
``AgentBlocks.release()`` (or use it as a context manager), or drop the last
reference to it (the pool watches it, and gives its blocks back at its next operation).
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
import contextlib
import itertools
import threading
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, Iterator, List, Optional, Sequence, Set, Tuple, Union

from semantic.adapters import mlx_lm_adapter as adapter
from semantic.adapters import mlx_threads
from semantic.adapters.mlx_kernels import allocatable_bytes
from semantic.application.block_cache import blocks_to_cache, cache_to_blocks, can_trim, layer_ids_for
from semantic.domain.entities import AgentBlocks
from semantic.domain.errors import (
    IncompatibleCacheError,
    InvalidRequestError,
    PoolExhaustedError,
    ReleasedHandleError,
    RequestFailedError,
    UnknownRequestError,
)
from semantic.domain.request_checks import (
    SamplingParams,
    check_text,
    check_vocabulary,
    checked_int,
    checked_real,
    int_items,
    is_int,
    shown,
    token_ids,
)
from semantic.domain.services import BlockPool, Reservation
from semantic.domain.value_objects import ModelCacheSpec

Prompt = Union[str, Sequence[int]]

# A request in this many batches that failed, each time without failing alone, gets one run alone, and is
# failed if that fails too: retries of a failure that needs company (or keeps recurring) must end.
_MAX_UNATTRIBUTED_FAILURES = 3
# The pool knows no vocabulary: a handle past it was stored for another model (or its file was altered).
_FOREIGN_CACHE = ("that context was not made with this model's tokenizer and cannot be resumed here: release it "
                  "(if an AgentCacheStore gave it, store.delete(agent_id) drops it for good)")


class PoolPressureWarning(UserWarning):
    """``step`` returned with requests still waiting for blocks that live handles hold."""


@dataclass
class Completion:
    """A finished request. ``token_ids`` are the generated tokens; ``blocks`` the agent's whole
    context after them (source context + prompt + generated tokens), owned by the pool.

    ``finish_reason`` is ``"stop"``, ``"length"`` or ``"error"``: a failed request has ``error`` set
    (a ``RequestFailedError``), ``token_ids`` holds what it generated before failing, and reading
    ``blocks`` raises ``error``."""

    uid: int
    agent_id: str
    text: str
    token_ids: List[int]
    finish_reason: str
    context_blocks: Optional[AgentBlocks] = field(repr=False)
    prompt_tokens: int
    reused_tokens: int
    time_to_first_token: Optional[float]
    error: Optional[RequestFailedError] = None

    @property
    def blocks(self) -> AgentBlocks:
        if self.error is not None:
            raise self.error
        return self.context_blocks


@dataclass
class _Request:
    uid: int
    agent_id: str
    prompt_tokens: List[int]
    context_tokens: List[int]  # reused from the source, already in the cache
    source: Optional[AgentBlocks]
    max_tokens: int
    sampling: SamplingParams
    new_blocks_bound: int
    submitted_at: float
    reservation: Optional[Reservation] = None
    generator_uid: Optional[int] = None
    generated: List[int] = field(default_factory=list)
    first_token_at: Optional[float] = None
    unattributed_failures: int = 0
    kept_apart_from: Set[int] = field(default_factory=set)  # uids of requests it must not share a batch with
    runs_alone: bool = False  # reached the bound of unattributed failures: its last chance runs with no company
    prefilling: bool = False  # in mlx-lm's batch, its first token (since it went in) not out yet

    @property
    def prefill(self) -> Tuple[int, int]:
        """Tokens cached and tokens to prefill when it goes into mlx-lm's batch."""
        return self.reused_tokens, len(self.prompt_tokens) + len(self.generated)

    @property
    def reused_tokens(self) -> int:
        return len(self.context_tokens)


class BlockPoolBatchEngine:
    """Batched generation for many agents sharing one model, their caches kept in ``pool``.

    Threads. One thread steps the engine (``step``, ``step_once``, ``generate``) while requests run: MLX keeps
    a stream per thread and mlx-lm leaves work queued on the stepping thread's, so a step from another
    thread would fail every request (it raises ``InvalidRequestError`` instead). The engine changes hands
    when nothing runs. ``submit`` and ``cancel`` may come from any thread; a running request cancelled (or
    ``close``) from another thread is dropped at the stepping thread's next step. ``step`` yields each
    completion to the loop that ran the step finishing it.

    Engines sharing one pool: while another engine's requests run, stepped by another thread, requests that
    wait for blocks wait in ``step`` (up to ``wait_for_blocks_s`` seconds) for them to end.
    """

    def __init__(self, model, tokenizer, pool: BlockPool, spec: Optional[ModelCacheSpec] = None, *,
                 prefill_step_size: int = 2048, prefill_batch_size: int = 8, completion_batch_size: int = 32,
                 wait_for_blocks_s: float = 60.0):
        if not isinstance(pool, BlockPool):
            raise InvalidRequestError(f"pool must be a BlockPool, got {type(pool).__name__}")
        if not isinstance(spec, (ModelCacheSpec, type(None))):
            raise InvalidRequestError(f"spec must be a ModelCacheSpec (or None: the pool's), got {type(spec).__name__}")
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
        # mlx-lm loops forever on a prefill of 0 tokens or a batch admitting none, so these are checked here.
        self._prefill_step_size = prefill_step_size = checked_int("prefill_step_size", prefill_step_size, 1)
        prefill_batch_size = checked_int("prefill_batch_size", prefill_batch_size, 1)
        completion_batch_size = checked_int("completion_batch_size", completion_batch_size, 1)
        self._wait_for_blocks_s = checked_real("wait_for_blocks_s", wait_for_blocks_s, 0.0)
        self.model = model
        self._model_ref = weakref.ref(model)  # stamped on the contexts this engine computes
        self._fingerprints: Optional[Tuple[str, str]] = None  # the model's, with and without the vocabulary
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
        self._done: Deque[Completion] = collections.deque()  # finished or failed, not yet returned by step_once
        self._finished: "weakref.WeakValueDictionary[int, AgentBlocks]" = weakref.WeakValueDictionary()
        self._driver: Optional[threading.Thread] = None  # the thread stepping the engine (see the class docstring)
        self._cancels: List[int] = []  # running requests another thread cancelled: dropped at the next step
        self._close_requested = False  # close() from another thread: the generator closes once nothing runs
        # Requests holding a reservation, from admission until _retire has given back what they held (a finishing
        # request leaves _running before its store and _retire): other engines' _others_run reads it unlocked.
        self._holding = 0
        # Set as an interrupt is handled, cleared once the requests it cut short are queued again: a second
        # interrupt in between leaves the next step to run every running request again.
        self._out_of_step = False
        self._resets_known = self._generator.resets  # the generator's resets this engine has restarted after
        pool.compile_kernels()  # at start-up, where a fresh process's first store would wait 1.4-2.3 s for it
        _add_engine(pool, self)  # engines sharing a pool wait for each other's running requests (see step)

    # ---- submitting -------------------------------------------------------------------------------
    def submit(self, agent_id: str, prompt: Prompt, cache: Optional[AgentBlocks] = None, max_tokens: int = 256,
               *, match_prefix: bool = False, temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0,
               min_p: float = 0.0, repetition_penalty: Optional[float] = None) -> int:
        """Queue a request and return its uid. Greedy unless ``temperature`` > 0 (mlx-lm's samplers).

        ``prompt``: text, or token ids (a sequence of ints, or a 1-d integer NumPy / MLX array), each
        below the model's vocabulary size. Sampling ranges: ``temperature`` >= 0 (below 1e-30, greedy: the
        limit it tends to, where mlx-lm's 1/temperature would overflow and sample at random; above 1e30, as
        1e30: uniformly among the kept tokens, where 1/temperature would round to 0), ``top_p`` and
        ``min_p`` in [0, 1], ``top_k`` an int in [0, vocabulary] (0: off), ``repetition_penalty``
        None or > 0; all finite. Anything else raises ``InvalidRequestError`` and reserves nothing.
        """
        max_tokens, sampling = self._checked_arguments(agent_id, cache is not None, max_tokens, match_prefix,
                                                       temperature, top_p, top_k, min_p, repetition_penalty)
        if cache is not None:
            self.pool.check_handle(cache)
            computed_by = cache.computed_by() if cache.computed_by is not None else None
            if computed_by is not None and computed_by is not self.model:
                raise IncompatibleCacheError(
                    f"the cache of agent {cache.agent_id!r} was computed by another model object sharing this "
                    "pool (its keys and values are that model's): continue it on that model's engine, or carry "
                    "it over through an AgentCacheStore (put, then get or load) fingerprinted for the model")
            if computed_by is None and cache.vouched_for is not None and not self._fits(cache.vouched_for):
                raise IncompatibleCacheError(
                    f"the cache of agent {cache.agent_id!r} comes from an AgentCacheStore fingerprinted for "
                    f"another model ({cache.vouched_for}): continue it on an engine of that model")
            # Any pool's handle may hold any ids (the pool knows no vocabulary), and mlx-lm indexes its
            # logits with the context's ids (repetition penalty): out of range, that reads outside memory.
            cache.memo(("vocabulary", self._generator.vocab_size),
                       lambda: check_vocabulary(cache.token_ids, self._generator.vocab_size, "the cache's ",
                                                _FOREIGN_CACHE))
        tokens = self._tokenize(prompt, continuation=cache is not None and not match_prefix)

        with self._lock:
            context: List[int] = []
            if cache is not None:
                reuse = self._reusable_prefix(cache, tokens) if match_prefix else cache.num_tokens
                context = list(cache.token_ids[:reuse])
                if match_prefix:
                    tokens = tokens[reuse:]
            bound = self._new_blocks_bound(len(context) + len(tokens) + max_tokens, len(context))
            pinned = cache.num_blocks if context else 0  # the source the request keeps, all of it
            if bound > self.pool.total_blocks - pinned:
                resumed = f", {pinned} of them the cache it resumes" if pinned else ""
                raise PoolExhaustedError(
                    bound, self.pool.total_blocks - pinned,
                    f"(a context of {len(context) + len(tokens) + max_tokens} tokens can never fit this pool of "
                    f"{self.pool.total_blocks} blocks{resumed}; shorten the prompt or max_tokens)", ever=True,
                )
            self._check_prefill_memory(len(context), len(tokens))
            request = _Request(
                uid=next(self._uids), agent_id=agent_id, prompt_tokens=tokens, context_tokens=context,
                source=cache.share() if cache is not None and context else None, max_tokens=max_tokens,
                sampling=sampling, new_blocks_bound=bound, submitted_at=time.perf_counter(),
            )
            self._by_uid[request.uid] = request
            try:
                self._waiting.append(request)
            except BaseException:  # e.g. Ctrl-C. Queued (a signal is handled once the append returned), the
                # request runs as any does; not queued, nothing may stay known or pinned: the caller has no uid
                if not (self._waiting and self._waiting[-1] is request):
                    self._retire(request)
                raise
            self._admit()
            return request.uid

    def _checked_arguments(self, agent_id, resumes: bool, max_tokens, match_prefix, temperature, top_p, top_k,
                           min_p, repetition_penalty) -> Tuple[int, SamplingParams]:
        """``max_tokens`` and the sampling parameters checked, with everything else :meth:`submit` checks before
        it reads the cache or the prompt (``resumes``: with a ``cache=``)."""
        if not isinstance(agent_id, str) or not agent_id:
            raise InvalidRequestError(f"agent_id must be a non-empty string, got {shown(agent_id)}")
        max_tokens = checked_int("max_tokens", max_tokens, 1)
        if not isinstance(match_prefix, bool):
            raise InvalidRequestError(f"match_prefix must be True or False, got {shown(match_prefix)}")
        sampling = SamplingParams.checked(
            self._generator.vocab_size, temperature=temperature, top_p=top_p, top_k=top_k, min_p=min_p,
            repetition_penalty=repetition_penalty,
        )
        if match_prefix and not resumes:
            raise InvalidRequestError("match_prefix=True needs cache= (the blocks to match the prompt against)")
        return max_tokens, sampling

    def check_request(self, agent_id: str, prompt: Prompt, resumes: bool, max_tokens: int = 256, *,
                      match_prefix: bool = False, temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0,
                      min_p: float = 0.0, repetition_penalty: Optional[float] = None) -> None:
        """Raise what :meth:`submit` would for these arguments (``resumes``: with a ``cache=``), without a
        cache or anything queued: for callers that must fetch the cache first (an ``AgentCacheStore``)."""
        self._checked_arguments(agent_id, resumes, max_tokens, match_prefix, temperature, top_p, top_k, min_p,
                                repetition_penalty)
        self._tokenize(prompt, continuation=resumes and not match_prefix)

    def _check_prefill_memory(self, context: int, prompt: int) -> None:
        """``InvalidRequestError`` for a prompt whose largest prefill chunk would need more memory than MLX may
        still allocate (on the CPU its attention scores are made whole): MLX crashes, rather than raising, when it
        cannot get the memory (a 100,000-token prompt in one chunk did). Prompts that would not fit beside it in
        one batch are kept apart by :meth:`_admit`."""
        step = self._prefill_step_size
        needed = adapter.prefill_chunk_bytes(self.model, [(context, prompt)], step, self.spec.dtype_bytes)
        if needed and needed > (room := allocatable_bytes()):  # 0 off the CPU: nothing to ask of MLX
            per_token = needed / min(step, prompt)
            raise InvalidRequestError(
                f"a prompt of {prompt} tokens after {context} cached ones, prefilled {step} tokens at a time, needs "
                f"~{needed / 2**30:.1f} GiB for one chunk's attention, more than MLX may still allocate "
                f"({room / 2**30:.1f} GiB); use an engine with prefill_step_size={max(1, int(room // per_token))} "
                "or less, or a shorter prompt")

    def _tokenize(self, prompt: Prompt, continuation: bool) -> List[int]:
        vocab = self._generator.vocab_size
        if isinstance(prompt, str):
            check_text("prompt", prompt)
            try:
                tokens = list(self.tokenizer.encode(prompt, add_special_tokens=not continuation)) if prompt else []
            except Exception as exc:  # the tokenizer's own error (or a non-list it returned): nothing is queued yet
                raise InvalidRequestError(
                    f"the tokenizer failed on the prompt ({type(exc).__name__}: {exc}); pass token ids instead, or "
                    "fix the tokenizer") from exc
            # Python ints: NumPy ids (or floats) from a tokenizer failed the request later, in its prefill.
            tokens = int_items(tokens, "the tokenizer's token ids")
            check_vocabulary(tokens, vocab)  # a tokenizer of another model
        else:  # a length no pool could hold is refused before a list is made (the exact bound comes later)
            tokens = token_ids(prompt, vocab, max_tokens=self.pool.total_blocks * self.spec.block_size)
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
        """Move waiting requests into the generator, first come first served, while blocks can be reserved
        (a restarted request keeps the reservation it has). While nothing runs, a request that does not fit
        no longer holds up those behind it that do: no step of this engine would free blocks for it (handles
        the caller keeps, or another engine's requests, hold them). A request whose prompt would not fit in
        memory beside those still prefilling (mlx-lm prefills them as one batch) waits, with those behind it,
        until they have prefilled. A request kept apart from a running one (:meth:`_culprits_alone`) waits for it
        to end, and those behind it go on; one that is to run alone waits, with those behind it, until nothing
        runs, and nothing joins it. While nothing runs, waiting requests that could never all get their
        blocks (:meth:`_end_a_pinned_wait`) are ended, newest first, until the others can."""
        self._admit_in_order()
        while not self._running and self._waiting and not self._others_run() and self._end_a_pinned_wait():
            self._admit_in_order()

    def _admit_in_order(self) -> None:
        index = 0
        while index < len(self._waiting):
            request = self._waiting[index]
            if self._running and (request.runs_alone or any(r.runs_alone for r in self._running.values())):
                return
            if request.kept_apart_from and any(r.uid in request.kept_apart_from for r in self._running.values()):
                index += 1  # waits for its company to end (it runs, so it will): those behind it go on
                continue
            if not self._prefills_beside_running(request):
                return
            try:
                if request.reservation is None:
                    request.reservation = self.pool.reserve(request.new_blocks_bound, f"request {request.uid}")
                    self._holding += 1
            except PoolExhaustedError:
                if self._running:
                    return
                index += 1
                continue
            del self._waiting[index]
            try:
                self._start(request)
            except BaseException:
                # An interrupt as _start began, before its handler could end the request: back to the queue (its
                # reservation kept), else nothing would ever run, end or release it.
                if request.uid in self._by_uid and all(r is not request for r in self._running.values()):
                    request.generator_uid = None
                    self._waiting.insert(index, request)
                    # A sequence mlx-lm queued meanwhile goes now (else it is stopped at its first event).
                    self._generator.remove_tagged(request.uid)
                raise

    def _end_a_pinned_wait(self) -> bool:
        """Whether it ended the newest waiting request that resumes a context, because no waiting request could
        get its blocks even if the caller released every handle it keeps: each keeps the context it resumes
        until it runs, and those contexts leave too little room, so they would wait for each other forever.
        The waiting requests of every engine on the pool count (:meth:`_waiting_on_pool`)."""
        on_pool = self._waiting_on_pool()
        if on_pool is None:
            return False
        waiting, pinned = on_pool
        room = self.pool.total_blocks - pinned - self.pool.reserved_blocks
        if any(request.new_blocks_bound <= room for request in waiting):
            return False
        victim = next((request for request in reversed(self._waiting) if request.source is not None), None)
        if victim is None:  # another engine's then: it ends one of its own as it steps
            return False
        self._waiting.remove(victim)
        self._fail(victim, "admission", PoolExhaustedError(
            victim.new_blocks_bound, room,
            f"(while nothing ran, the {len(waiting)} waiting requests on this pool could never all get their blocks: "
            f"the {pinned} blocks of the contexts they resume stay held until they run, which leaves {room} "
            "for new blocks, fewer than any of them needs. This one, the newest on its engine, was ended so that "
            "the others can run; submit it again once they have finished)"))
        return True

    def _waiting_on_pool(self) -> Optional[Tuple[List[_Request], int]]:
        """The waiting requests of every engine on this pool and how many blocks the contexts they resume hold;
        None while another engine holds requests (they give blocks back as it steps). Other engines' queues are
        read without their locks, as :meth:`_others_run` reads them: taking them could deadlock two engines
        stepped on two threads, and an interrupt could leave one taken. A deque copied by ``tuple`` is one C call
        under the GIL; a context released meanwhile pins nothing (:func:`_pinned_by`)."""
        others = [engine for engine in _engines_on(self.pool) if engine is not self]
        if any(engine._holding for engine in others):
            return None
        waiting = [*self._waiting, *itertools.chain.from_iterable(tuple(engine._waiting) for engine in others)]
        return waiting, len(_pinned_by(waiting))

    def _prefills_beside_running(self, request: _Request) -> bool:
        """Whether ``request``'s prompt fits in memory in one prefill batch with the running requests still
        prefilling (on the CPU; alone, it was checked at submit)."""
        prefilling = [r.prefill for r in self._running.values() if r.prefilling]
        return not prefilling or self._prefill_fits(prefilling + [request.prefill])

    def _prefill_fits(self, prefills: list) -> bool:
        """Whether these prompts (``_Request.prefill`` each) fit in memory prefilled in one batch (on the CPU;
        elsewhere MLX's fused attention needs no room for the scores)."""
        needed = adapter.prefill_chunk_bytes(self.model, prefills, self._prefill_step_size, self.spec.dtype_bytes)
        return not needed or needed <= allocatable_bytes()

    def _start(self, request: _Request) -> None:
        """Put a request with its reservation into the generator: from its source context, fed its prompt
        and whatever it generated before (a restart after a failed step), to generate the rest."""
        try:
            request.generator_uid = self._insert(request, self._generator)
        except BaseException as exc:  # an interrupt too: the request must end, else its blocks stay held
            request.generator_uid = None
            try:  # a sequence queued by an insert interrupted before it returned: its cache pins the source
                self._generator.remove_tagged(request.uid)
            finally:
                self._fail(request, "admission", exc)
            if not isinstance(exc, Exception):
                raise
            return
        request.prefilling = True
        self._running[request.generator_uid] = request

    def _insert(self, request: _Request, generator: adapter.Generator) -> int:
        """Queue the request in ``generator`` with its cache rebuilt from its source (if any), fed its prompt
        and whatever it generated before (a restart after a failed step); its uid there."""
        prompt = request.prompt_tokens + request.generated
        cache = None
        if request.source is not None:
            cache = self._reconstruct_cache(request.source, request.reused_tokens, len(prompt), generator)
        return generator.insert(prompt, cache, request.context_tokens, request.max_tokens - len(request.generated),
                                request.sampling, request.uid)

    def _fail(self, request: _Request, stage: str, cause: BaseException) -> None:
        """End a request with an error completion (returned by the next ``step_once``), giving back what it held,
        also if an interrupt comes while the completion is made (then only the completion is lost)."""
        interrupt = None
        try:
            try:
                text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
            except BaseException as exc:  # the error completion is appended even if interrupted
                text = ""
                if not isinstance(exc, Exception):
                    interrupt = exc
            self._done.append(Completion(
                uid=request.uid, agent_id=request.agent_id, text=text, token_ids=list(request.generated),
                finish_reason="error", context_blocks=None, prompt_tokens=len(request.prompt_tokens),
                reused_tokens=request.reused_tokens,
                time_to_first_token=None if request.first_token_at is None
                else request.first_token_at - request.submitted_at,
                error=RequestFailedError(request.uid, request.agent_id, stage, cause),
            ))
        finally:
            self._retire(request)
        if interrupt is not None:
            raise interrupt

    # ---- running ----------------------------------------------------------------------------------
    def step(self) -> Iterator[Completion]:
        """Run until every admitted request has finished, yielding each completion as soon as it finishes.

        Completions a loop leaves untaken (a ``break``, an exception in its body) stay pending and come
        with the next ``step()`` or ``step_once()``. Requests waiting for blocks are admitted as finished
        contexts are released (a completion dropped inside the loop frees its blocks at once). Failed
        requests are yielded too, with ``error`` set (see the module docstring). If requests still wait
        when nothing runs, the blocks they need are held by handles the caller keeps, or by another engine's
        requests on this pool: while those run on another thread, ``step`` waits for them (up to
        ``wait_for_blocks_s`` seconds). Then it returns, warns with ``PoolPressureWarning``, and ``pending``
        says how many wait; release handles and call ``step`` again.
        """
        while True:
            with self._lock, mlx_threads.device_work():
                self._admit()
                idle = not self._done and not self._running
                if not idle:
                    if not self._done:
                        self._claim_driver("step()")
                        self._step()
                    done = self._take_done()  # out of _done: a generate() called inside this loop must not consume them
                elif not self._waiting:
                    return
                else:
                    needs = min(request.new_blocks_bound for request in self._waiting)
            if idle:  # waiting outside the engine's lock: other threads may submit or cancel meanwhile
                if self._others_run() and self.pool.wait_for_blocks(
                        needs, self._wait_for_blocks_s,
                        stop=lambda: self._running or self._done or not self._waiting or not self._others_run()):
                    continue
                with self._lock:  # _holders reads the waiting requests, which other threads submit and cancel
                    waiting = len(self._waiting)
                    holders = self._holders() if waiting else ""
                if waiting:
                    warnings.warn(PoolPressureWarning(
                        f"{waiting} request(s) wait for blocks: the smallest needs {needs}, "
                        f"{self.pool.available_blocks} are free; {holders}. Release AgentBlocks you no "
                        "longer need, then call step() again."
                    ), stacklevel=2)
                return
            try:
                while done:
                    yield done.popleft()
            finally:
                if done:  # the loop left early: the rest come with the next step
                    with self._lock:
                        self._done.extendleft(reversed(done))

    def step_once(self) -> List[Completion]:
        """One batched model step (a prefill chunk or one token for every running sequence);
        returns the requests that finished in it (and any an earlier ``step`` loop left untaken)."""
        with self._lock, mlx_threads.device_work():
            self._claim_driver("step_once()")
            self._step()
            return list(self._take_done())

    def _take_done(self) -> Deque[Completion]:
        done, self._done = self._done, collections.deque()
        return done

    def _others_run(self) -> bool:
        """Whether another engine on this pool runs requests that a live thread other than this one steps:
        those end, giving back blocks and reservations, without this thread doing anything."""
        current = threading.current_thread()
        for engine in _engines_on(self.pool):
            # _holding, not _running: a request leaves _running before its context is stored and its blocks given
            # back. _driver read once: the other thread may set it to None in between.
            driver = engine._driver
            if engine is not self and engine._holding > 0 and driver not in (None, current) and driver.is_alive():
                return True
        return False

    def _claim_driver(self, call: str) -> None:
        """Make the calling thread the one stepping the engine (the lock held): see :meth:`_check_driver`."""
        self._check_driver(call)
        self._driver = threading.current_thread()

    def _check_driver(self, call: str) -> None:
        """``InvalidRequestError`` while requests another live thread stepped run on its streams. No thread
        holds the engine once nothing runs (:meth:`_release_driver_if_idle`)."""
        current, driver = threading.current_thread(), self._driver
        if driver is not None and driver is not current and driver.is_alive():
            raise InvalidRequestError(
                f"{call} from thread {current.name!r}, but requests run on thread {driver.name!r}, which steps this "
                "engine (MLX keeps their work on that thread's streams): step an engine from one thread, e.g. a "
                "worker that calls step() in a loop; submit() and cancel() may come from any thread")

    def _start_over(self) -> None:
        """After an interrupt cut short the handling of another (or mlx-lm's own remove): mlx-lm's batch may
        hold sequences no request owns, miss ones requests think it has, or be half changed. A new batch, and
        every running request run again from what it has."""
        self._generator.reset()
        self._resets_known = self._generator.resets
        self._restart(list(self._running.values()))

    def _end_stranded(self) -> None:
        """End the requests an interrupt stranded: known, but neither waiting nor running (Ctrl-C at the start of
        the call that was to retire or queue one). Retired, with an error completion unless theirs is out."""
        waiting = {id(request) for request in self._waiting}
        stranded = [request for request in self._by_uid.values()
                    if id(request) not in waiting and self._running.get(request.generator_uid) is not request]
        if stranded:
            out = {completion.uid for completion in self._done}
            for request in stranded:
                if request.uid in out:
                    self._retire(request)
                else:
                    self._fail(request, "an interrupted step", KeyboardInterrupt("the request was cut off by it"))

    def _release_driver_if_idle(self) -> None:
        if not self._running:
            self._driver = None

    def _touches_generator_here(self) -> bool:
        """Whether the calling thread may change mlx-lm's running batch now (the lock held): it steps the
        engine, or no live thread does."""
        return self._driver is None or self._driver is threading.current_thread() or not self._driver.is_alive()

    def _step(self) -> None:
        """One batched model step, under the engine's lock; its completions are appended to ``_done``."""
        if self._out_of_step or self._generator.resets != self._resets_known:
            self._start_over()
        self._end_stranded()
        while self._cancels:  # running requests another thread cancelled
            if self._cancels[-1] in self._by_uid:
                self.cancel(self._cancels[-1])
            self._cancels.pop()  # only once done: an interrupt must not lose a cancel
        try:
            self._admit()
            if self._running:
                self._step_generator()
        finally:
            self._release_driver_if_idle()
            self._close_generator_if_asked()

    def _step_generator(self) -> None:
        try:
            events = self._generator.next()
        except adapter.StepFailed as failure:
            self._resets_known = self._generator.resets
            self._recover(failure)
            return
        except BaseException:  # interrupted (KeyboardInterrupt): keep the engine usable, then stop
            self._out_of_step = True
            self._resets_known = self._generator.resets
            self._restart(list(self._running.values()))  # also as next() returned: its tokens were not taken
            raise
        # Requests an interrupt may have left out of step with mlx-lm (a token it generated and they lack): run
        # again from what they have, as after an interrupted next().
        interrupt, unsettled = None, []
        try:
            for event in events:  # every finished request is stored or failed, even after an interrupt
                request = self._running.get(event.uid)
                try:
                    self._on_event(event)
                except BaseException as exc:
                    self._out_of_step = True
                    interrupt = interrupt or exc
                    unsettled.append(request)
        except BaseException:  # between two events: which ones reached their requests is not known
            self._out_of_step = True
            unsettled = None  # all of them (no call here: a second interrupt cannot leave a partial list)
            raise
        finally:
            if self._out_of_step:
                self._restart(list(self._running.values()) if unsettled is None else
                              [r for r in unsettled if r is not None and self._running.get(r.generator_uid) is r])
        if interrupt is not None:
            raise interrupt

    def _close_generator_if_asked(self) -> None:
        """The generator's close that ``close()`` from another thread left to this one, once nothing runs
        (closing clears what mlx-lm and the adapter keep per running sequence)."""
        if self._close_requested and not self._running:
            self._close_requested = False
            self._generator.close()

    def generate(self, agent_id: str, prompt: Prompt, **kwargs) -> Completion:
        """Submit one request and run the engine until it finishes (other requests run along; their
        completions come with the next ``step()``, or to the step loop this is called in). Raises the
        request's ``RequestFailedError`` if it failed, ``PoolExhaustedError`` naming what holds the pool if
        it cannot get its blocks (the request is then cancelled), and ``InvalidRequestError`` while another
        thread steps the engine; never returns without a completion."""
        with self._lock:  # refused before the request is queued
            self._check_driver("generate()")
        uid = self.submit(agent_id, prompt, **kwargs)
        try:
            result = self.wait_for(uid)
        except InvalidRequestError:  # another thread took the engine between the check and the step
            with self._lock:  # that thread may have finished the request: its completion waits in _done
                result = next((c for c in self._done if c.uid == uid), None)
                if result is not None:
                    self._done.remove(result)
                elif uid in self._by_uid:
                    self.cancel(uid)
            if result is None:
                raise
        if result is None:
            with self._lock:
                request = self._by_uid.get(uid)
                if request is None:
                    raise UnknownRequestError(f"request {uid} was cancelled before it finished")
                self.cancel(uid)
                raise PoolExhaustedError(
                    request.new_blocks_bound, self.pool.available_blocks,
                    f"(request {uid} of agent {agent_id!r} was cancelled: the blocks it needs are "
                    f"{self._holders()}. Release some, or submit() and call step() again after releasing them)",
                )
        if result.error is not None:
            raise result.error
        return result

    def wait_for(self, uid: int, make_room: Optional[Callable[[], bool]] = None) -> Optional[Completion]:
        """Step until request ``uid`` finishes and return its completion; ``None`` if it still waits for blocks
        when nothing else runs and ``make_room`` (called then, if given) made none; ``UnknownRequestError`` if it
        ended without a completion (cancelled, the engine closed). Other requests' completions stay for the next
        ``step()`` (or the step loop this is called in); so does ``uid``'s if a step raises."""
        result, others = None, []
        try:
            while True:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", PoolPressureWarning)  # the caller's to report
                    for completion in self.step():
                        if completion.uid == uid:
                            result = completion
                        else:
                            others.append(completion)
                if result is not None:
                    return result
                with self._lock:
                    if uid not in self._by_uid:  # else make_room would be called for a request that never comes
                        raise UnknownRequestError(f"request {uid} is not in flight: cancelled (cancel() or close(), "
                                                  "perhaps from another thread) before it finished, or never submitted")
                if make_room is None or not make_room():
                    return None
        except BaseException:
            if result is not None:
                others.insert(0, result)
            raise
        finally:
            if others:
                with self._lock:
                    self._done.extend(others)

    def _holders(self) -> str:
        usage = self.pool.usage()
        per_agent = sorted(usage.per_agent.items(), key=lambda item: -item[1][0])
        shown = ", ".join(f"agent {agent!r} {blocks} blocks" for agent, (blocks, _) in per_agent[:10])
        more = f" and {len(per_agent) - 10} more agents" if len(per_agent) > 10 else ""
        held = f"held by handles you keep: {shown + more or 'none'}"
        if pinned := len(_pinned_by(self._waiting)):
            held += f" ({pinned} of these blocks are contexts that waiting requests resume, kept until they run)"
        if usage.reserved_blocks:
            held += f"; {usage.reserved_blocks} free blocks are reserved by requests in flight (another engine's)"
        return held

    def _recover(self, failure: adapter.StepFailed) -> None:
        """A batched step raised and the generator lost every sequence: fail the requests it is attributed
        to and restart the others. Unattributed failures (the shared forward pass) are re-run for each
        request alone; a request that fails alone is a culprit (see :meth:`_culprits_alone` for none)."""
        requests = list(self._running.values())
        self._running.clear()
        suspects = [r for r in requests if r.uid in set(failure.tags)]
        try:
            culprits = suspects if failure.attributed else self._culprits_alone(suspects)
        except BaseException:  # interrupted while probing: every request runs again, as before the failure
            self._restart(requests)
            raise
        interrupt = None
        try:
            for request in culprits:  # each failed, even after an interrupt while failing another
                request.generator_uid = None
                try:
                    self._fail(request, "decode" if request.generated else "prefill", failure.cause)
                except BaseException as exc:
                    interrupt = interrupt or exc
        finally:  # an interrupt while failing one must not lose the others
            self._restart([r for r in requests if r not in culprits])
        if interrupt is not None:
            raise interrupt

    def _culprits_alone(self, suspects: List[_Request]) -> List[_Request]:
        """The suspects to fail: those whose step fails alone; else those of the failing company that reached the
        bounded number of retries in a run of their own. The company's members that did not pass a probe together
        are kept apart from then on, unless the company is all the suspects and none of them failed before (a
        transient failure passes when retried together). A member reaching the bound is given one run alone
        first: it passed alone when probed, and its failures may each have come with another company. Such a
        run holds up the queue behind it for as long as it lasts (a request's ``max_tokens``), once per request."""
        culprits = [r for r in suspects if self._fails_together([r])]
        if culprits:
            return culprits
        # transient, or only in some company: retry, a bounded number of times, counting only the company found
        # to fail, so that the requests outside it are not failed with it
        parts = self._failing_company(suspects)
        company = [r for part in parts for r in part]
        keep_apart = len(company) < len(suspects) or any(r.unattributed_failures for r in company)
        for part in parts:
            for request in part:
                request.unattributed_failures += 1
                if keep_apart:
                    request.kept_apart_from.update(r.uid for other in parts if other is not part for r in other)
        for request in company:
            if request.unattributed_failures >= _MAX_UNATTRIBUTED_FAILURES:
                if request.runs_alone:
                    culprits.append(request)
                request.runs_alone = True
        return culprits

    def _failing_company(self, suspects: List[_Request]) -> List[List[_Request]]:
        """The smallest group that halving ``suspects`` finds failing together (each half probed as one batch; a
        half of one already passed alone), in parts: each member alone (each passed a probe step alone), or the
        group's two halves when neither fails (a transient failure, or one needing members of both) or they
        cannot be probed because a half's prefill would not fit in memory (the requests were admitted beside
        each other only as far as theirs did): kept apart, the halves then run in two batches."""
        group = suspects
        while len(group) > 2:
            half = len(group) // 2
            halves = [group[:half], group[half:]]
            probed = [part for part in halves if len(part) > 1]
            if not all(self._prefill_fits([r.prefill for r in part]) for part in probed):
                return halves
            failing = next((part for part in probed if self._fails_together(part)), None)
            if failing is None:
                return halves
            group = failing
        return [[r] for r in group]

    def _restart(self, requests: List[_Request]) -> None:
        """Run ``requests`` again from their prompts and what they generated: back to the head of the queue
        with their reservations (no other thread can take those blocks meanwhile), then admitted in order,
        so an interrupt between two leaves the rest waiting, not lost."""
        for request in reversed(requests):
            if self._running.pop(request.generator_uid, None) is request:  # still in mlx-lm, unless it was reset
                self._generator.remove(request.generator_uid)
            request.generator_uid = None
            self._waiting.appendleft(request)
        self._out_of_step = False
        self._admit()

    def _fails_together(self, requests: List[_Request]) -> bool:
        """Whether the next step of ``requests`` fails with no other request in the batch (a step prefills at
        most mlx-lm's prefill batch size of them: more are not all probed, and a half that large is
        counted whole if neither half fails)."""
        probe = self._generator.empty_copy()
        try:
            for request in requests:
                self._insert(request, probe)
            probe.next()
        except Exception:
            return True
        finally:
            probe.close()
        return False

    def _on_event(self, event: adapter.GenerationEvent) -> None:
        request = self._running.get(event.uid)
        if request is None:  # a sequence mlx-lm queued before an interrupt ended its request: stop it
            if event.finish_reason is None:
                self._generator.remove(event.uid)
            return
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        request.prefilling = False
        if event.finish_reason is None:
            request.generated.append(event.token)
            return
        try:  # finishing: its last token, its text, then its context stored (interrupted before, it runs again)
            del self._running[event.uid]
            request.generator_uid = None
            request.generated.append(event.token)
            text = self.tokenizer.decode(request.generated, skip_special_tokens=True)
            blocks = self._stamped(cache_to_blocks(
                self.pool, request.agent_id, event.cache, event.context_tokens, source=request.source,
                reused_tokens=request.reused_tokens, reservation=request.reservation,
            ))
        except BaseException as exc:  # out of _running, so it must end here: else its blocks stay reserved
            self._running.pop(event.uid, None)
            request.generator_uid = None
            self._fail(request, "store", exc)
            if not isinstance(exc, Exception):
                raise
            return
        try:  # the completion before retiring: delivered even if an interrupt comes then
            self._finished[request.uid] = blocks
            self._done.append(Completion(
                uid=request.uid, agent_id=request.agent_id, text=text,
                token_ids=list(request.generated), finish_reason=event.finish_reason, context_blocks=blocks,
                prompt_tokens=len(request.prompt_tokens), reused_tokens=request.reused_tokens,
                time_to_first_token=request.first_token_at - request.submitted_at,
            ))
        finally:  # and retired even if one comes while the completion is made
            self._retire(request)

    def _retire(self, request: _Request) -> None:
        """Forget the request and give back what it held: forgotten first, so an interrupt in between
        cannot leave it half-ended (pending forever, or cancelled a second time); its source is released
        even if cancelling its reservation was interrupted."""
        self._by_uid.pop(request.uid, None)
        reservation, source = request.reservation, request.source
        request.reservation = request.source = None
        try:
            if reservation is not None:
                _completed_through_interrupts(reservation.cancel)  # idempotent
        finally:
            try:
                if source is not None:
                    _completed_through_interrupts(lambda: None if source.released else source.release())
            finally:
                if reservation is not None:  # given back: no longer one another engine's thread waits for
                    self._holding -= 1

    def cancel(self, uid: int) -> None:
        """Drop a queued or running request and give back everything it held. From a thread other than the
        one stepping the engine, a running request is dropped at that thread's next step."""
        with self._lock:
            request = self._request(uid)
            if request.generator_uid is not None and not self._touches_generator_here():
                self._cancels.append(request.uid)
                return
            generator_uid, request.generator_uid = request.generator_uid, None
            try:  # out of the engine's queues first: an interrupt below must not leave a request no step ends
                if generator_uid is None:
                    if request in self._waiting:  # else in no queue: it was ending when an interrupt came
                        self._waiting.remove(request)
                else:
                    del self._running[generator_uid]
                    with mlx_threads.device_work():
                        # If interrupted: before mlx-lm's remove, the sequence's next event removes it; inside,
                        # the adapter dropped the batch and the next step starts it over.
                        self._generator.remove(generator_uid)
            finally:
                self._retire(request)
                if self._driver is threading.current_thread():
                    self._release_driver_if_idle()

    @property
    def pending(self) -> int:
        """Requests submitted whose completion ``step`` has not yet returned."""
        with self._lock:
            return len(self._by_uid) + len(self._done)

    def close(self) -> None:
        """Cancel everything in flight and release what it held (from a thread other than the one stepping
        the engine, running requests at that thread's next step)."""
        with self._lock, mlx_threads.device_work():
            failures = []
            for uid in list(self._by_uid):
                try:
                    self.cancel(uid)
                except BaseException as exc:  # the others are still cancelled; then the first failure is raised
                    failures.append(exc)
            self._done.clear()
            self._close_requested = True  # now if nothing runs any more, else at the stepping thread's next step
            self._close_generator_if_asked()
            if failures:
                raise failures[0]

    # ---- cache conversions ------------------------------------------------------------------------
    def _reconstruct_cache(self, agent_blocks: AgentBlocks, n_tokens: Optional[int] = None, prompt_tokens: int = 0,
                           generator: Optional[adapter.Generator] = None):
        """``agent_blocks`` (its first ``n_tokens`` tokens, default all) -> one evaluated mlx-lm cache
        per layer, as the model's own ``make_cache`` would hold them, with room for the ``prompt_tokens``
        that follow (see ``blocks_to_cache``) when mlx-lm will merge it alone, for insertion into
        ``generator`` (default: the engine's).

        Layers of one block are rebuilt as views of the pool (see ``blocks_to_cache``) where that costs
        nothing: where the pool writes its arrays in place (``BlockPool.writes_in_place``: CPU, and dense
        pools on CUDA). Elsewhere a live view makes MLX copy the whole pool array at the next store, so
        views are used only when mlx-lm merges (copies) the inserted cache at its next step, before that
        step's stores."""
        generator = generator or self._generator
        views = self.pool.writes_in_place or generator.merges_next_insert()
        # Room only for a cache mlx-lm will merge alone: merged with others, it is copied without its room.
        room = prompt_tokens if generator.merges_next_insert_alone() else 0
        return blocks_to_cache(self.pool, agent_blocks, n_tokens, views=views, room=room)

    def _extract_cache(self, uid: int) -> AgentBlocks:
        """The request's current context as a new handle, at any stage: waiting, prefilling, generating,
        or finished (while its completion's blocks are alive)."""
        with self._lock:
            finished = self._finished.get(_uid(uid))
            if finished is not None and not finished.released:
                return finished.share()
            request = self._request(uid)
            if request.generator_uid is not None:
                found = self._generator.extract(request.generator_uid)
                if found is not None:
                    caches, tokens = found
                    return self._stamped(cache_to_blocks(self.pool, request.agent_id, caches, tokens,
                                                         source=request.source, reused_tokens=request.reused_tokens))
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
            return self._stamped(builder.finish(request.context_tokens, ids))

    def _fits(self, fingerprint: str) -> bool:
        """Whether a store's ``fingerprint`` is this engine's model's (True for one that names no weights). The
        model's own are made at the first store context it is given: its weights hashed once (0.3-0.4 s for a
        111M-parameter model on this project's 2-core CPU)."""
        from semantic.persistence.fingerprint import fingerprints_of, names_weights  # persistence stays optional

        if not names_weights(fingerprint):
            return True
        if self._fingerprints is None:
            self._fingerprints = fingerprints_of(self.model, self.tokenizer)
        return fingerprint in self._fingerprints

    def _stamped(self, handle: AgentBlocks) -> AgentBlocks:
        handle.computed_by = self._model_ref
        return handle

    def _request(self, uid: int) -> _Request:
        request = self._by_uid.get(_uid(uid))
        if request is None:
            raise UnknownRequestError(
                f"no request {shown(uid)} in flight (finished requests are found only while their blocks are alive)"
            )
        return request


_ENGINES: "weakref.WeakKeyDictionary[BlockPool, weakref.WeakSet]" = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def _pinned_by(requests) -> set:
    """Blocks of the contexts that ``requests`` resume; one released meanwhile (cancelled on another thread)
    pins nothing."""
    pinned = set()
    for request in requests:
        source = request.source  # read once: a cancel sets it to None
        if source is not None:
            with contextlib.suppress(ReleasedHandleError):
                pinned.update(itertools.chain.from_iterable(source.all_block_ids))
    return pinned


def _add_engine(pool: BlockPool, engine: "BlockPoolBatchEngine") -> None:
    with _ENGINES_LOCK:
        _ENGINES.setdefault(pool, weakref.WeakSet()).add(engine)


def _engines_on(pool: BlockPool) -> List["BlockPoolBatchEngine"]:
    """The engines built on ``pool`` (and alive), listed under the lock: an engine built meanwhile on another
    thread would change the set while it is iterated."""
    with _ENGINES_LOCK:
        return list(_ENGINES.get(pool, ()))


def _completed_through_interrupts(step: Callable[[], None]) -> None:
    """``step()``, run again once if an interrupt (Ctrl-C) cut it short, then the interrupt raised: for
    steps that give back what a request held, which must not be skipped. ``step`` must be safe to repeat."""
    try:
        step()
    except Exception:
        raise
    except BaseException:
        step()
        raise


def _uid(uid) -> Optional[int]:
    """``uid`` as the int ``submit`` returned (NumPy and MLX integers too), or None: no request has it."""
    return int(uid) if is_int(uid) else None


def _geometry(spec: ModelCacheSpec):
    return (spec.n_layers, spec.n_kv_heads, spec.k_head_dim, spec.v_head_dim, spec.dtype, spec.block_size,
            spec.layer_windows)
