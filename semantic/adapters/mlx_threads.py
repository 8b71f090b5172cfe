"""Threads, and MLX's streams per thread.

MLX keeps each thread's work on streams of that thread. A thread that ran MLX must clear them before it ends
(``mx.clear_streams()``), else the process may abort at exit (README, "Threads"). On CUDA that clearing must
also not overlap another thread's evaluation: MLX records work into CUDA graphs by stream capture, and a
thread tearing its streams down while another thread captures invalidated that capture; MLX then aborted the
process ("cudaStreamEndCapture ... failed: operation failed due to a previous error during capture", MLX
0.32.4 on an H100, an engine's prefill while another engine's thread ended).

So the engine's device work runs inside :func:`device_work` (shared: engines on several threads still run
side by side), and :func:`end_thread` clears a thread's streams alone, once no such work runs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator

import mlx.core as mx

from semantic.domain.errors import InvalidRequestError


_POLL_S = 0.002  # a waiter's sleep between looks at the counts: waits are rare (a thread ending, or behind one)


class _SharedExclusiveLock:
    """Many shared holders or one exclusive. A thread already holding it shared enters again at once (a step
    inside a step); other threads wait while an exclusive holder runs or waits, so a thread ending behind a
    stream of steps still gets its turn.

    Ctrl-C anywhere leaves the counts right: they change only under a plain lock taken by ``with`` (its C
    ``__enter__`` and ``__exit__`` leave no point for an interrupt between taking the lock and the block that
    gives it back), each count is taken inside the ``try`` that gives it back, with the flag saying so set in the
    same run of bytecodes, and waiters poll instead of waiting on a ``Condition``, whose Python ``wait`` an
    interrupt can leave with its lock held."""

    def __init__(self) -> None:
        self._counts = threading.Lock()
        self._shared = 0
        self._exclusive_waiting = 0
        self._exclusive = False
        self._depth = threading.local()

    def is_free(self) -> bool:
        """No holder, no waiter, and the calling thread in no device work (for tests that an interrupted holder
        gave it back)."""
        with self._counts:
            held = self._shared or self._exclusive_waiting or self._exclusive
        return not held and getattr(self._depth, "n", 0) == 0

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._depth, "n", 0)
        counted = entered = False
        try:
            while depth == 0 and not counted:
                with self._counts:
                    if not (self._exclusive or self._exclusive_waiting):
                        self._shared += 1
                        counted = True
                if not counted:
                    time.sleep(_POLL_S)
            self._depth.n = getattr(self._depth, "n", 0) + 1
            entered = True
            yield
        finally:
            # Counted down, not set back to ``depth``: after an interrupt, an inner holder kept alive by the
            # traceback may end after the outer one.
            if entered:
                self._depth.n -= 1
            if counted:
                with self._counts:
                    self._shared -= 1

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        if getattr(self._depth, "n", 0):
            raise InvalidRequestError("end_thread() inside the engine's device work (a step, a cancel): a "
                                      "thread's streams are cleared after its last step, not during one")
        waiting = held = False
        try:
            with self._counts:
                self._exclusive_waiting += 1
                waiting = True
            while not held:
                with self._counts:
                    if not (self._exclusive or self._shared):
                        self._exclusive_waiting -= 1
                        waiting = False
                        self._exclusive = held = True
                if not held:
                    time.sleep(_POLL_S)
            yield
        finally:
            with self._counts:
                if waiting:
                    self._exclusive_waiting -= 1
                if held:
                    self._exclusive = False


_streams_in_use = _SharedExclusiveLock()


def device_work():
    """Context for work that evaluates on this thread's streams: no thread clears its streams meanwhile."""
    return _streams_in_use.shared()


def end_thread() -> None:
    """A thread's last MLX call: clears its streams (``mx.clear_streams()``) once no engine's device work
    runs on any thread. The thread cannot use MLX afterwards."""
    with _streams_in_use.exclusive():
        mx.clear_streams()
