"""Typed errors. Every error says what was wrong and what to do about it.

Whatever raises one of these has changed nothing: no block is leaked, no
reference count moved, no file half-written.
"""

import copy
import traceback


class SemanticError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidRequestError(SemanticError, ValueError):
    """A call's arguments are wrong (empty prompt, ``max_tokens <= 0``, ...)."""


class UnsupportedModelError(SemanticError):
    """The model's cache cannot be kept in blocks (unknown cache type, mixed head sizes, ...)."""


class IncompatibleCacheError(SemanticError, ValueError):
    """Blocks of another geometry, from another pool, or not matching a model."""


class PoolExhaustedError(SemanticError):
    """The pool cannot hold what was asked for; nothing was allocated."""

    def __init__(self, requested: int, available: int, detail: str = "", *, ever: bool = False):
        """``ever``: ``available`` is the most the pool could ever give (releasing handles cannot help)."""
        self.requested = requested
        self.available = available
        if ever:
            message = f"{requested} blocks needed, more than this pool could ever give ({available})."
        else:
            message = (
                f"block pool exhausted: {requested} blocks requested, {available} free. "
                "Release AgentBlocks you no longer need (AgentBlocks.release()), "
                "or create the pool with more total_blocks."
            )
        if detail:
            message = f"{message} {detail}"
        super().__init__(message)


class BlockOwnershipError(SemanticError, ValueError):
    """Blocks released twice, or released to a pool that does not hold them."""


class ReleasedHandleError(SemanticError, ValueError):
    """An ``AgentBlocks`` handle was used after it was released."""


class UnknownRequestError(SemanticError, KeyError):
    """A request id the engine never issued, or one it has already forgotten."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class RequestFailedError(SemanticError):
    """A request failed while the engine ran it (``stage``: admission, prefill, decode, store, or an interrupted
    step that left it in none of the engine's queues).

    Raised by ``generate`` and carried by the request's ``Completion.error``. The
    request's blocks and reservation are back in the pool; the other requests in the
    batch went on. ``__cause__`` is the original exception (a copy, for an interrupt), without its frames:
    ``cause_traceback`` is its traceback as text.
    """

    def __init__(self, uid: int, agent_id: str, stage: str, cause: BaseException):
        self.uid = uid
        self.agent_id = agent_id
        self.stage = stage
        super().__init__(
            f"request {uid} (agent {agent_id!r}) failed in {stage}: {type(cause).__name__}: {cause}. "
            "Its blocks and reservation went back to the pool and the other requests went on; "
            "fix the request (or the model) and submit it again"
        )
        # The cause's traceback is kept as text (``cause_traceback``, and a note on the cause), not as frames: a
        # frame keeps its locals and, through f_back, its callers', so the completion carrying this error would
        # keep alive whatever the failed code held (a store's new blocks) and what its callers held (the
        # completions a loop had collected when an interrupt cut it short).
        self.cause_traceback = "".join(traceback.format_exception(cause)).rstrip()
        # An interrupt (KeyboardInterrupt) goes on up the stack after this (the engine raises it again): a copy.
        kept = cause if isinstance(cause, Exception) else copy.copy(cause)
        kept.__traceback__ = kept.__context__ = kept.__cause__ = None
        if hasattr(kept, "add_note"):  # Python 3.11+: printed with the cause
            kept.add_note(f"(the cause's traceback, kept as text)\n{self.cause_traceback}")
        self.__cause__ = kept
