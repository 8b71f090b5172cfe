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
from typing import Iterator

import mlx.core as mx

from semantic.domain.errors import InvalidRequestError


class _SharedExclusiveLock:
    """Many shared holders or one exclusive. A thread already holding it shared enters again at once (a step
    inside a step); other threads wait while an exclusive holder runs or waits, so a thread ending behind a
    stream of steps still gets its turn."""

    def __init__(self) -> None:
        self._changed = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive_waiting = 0
        self._exclusive = False
        self._depth = threading.local()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        depth = getattr(self._depth, "n", 0)
        if depth == 0:
            with self._changed:
                while self._exclusive or self._exclusive_waiting:
                    self._changed.wait()
                self._shared += 1
        self._depth.n = depth + 1
        try:
            yield
        finally:
            self._depth.n = depth
            if depth == 0:
                with self._changed:
                    self._shared -= 1
                    if self._shared == 0:
                        self._changed.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        if getattr(self._depth, "n", 0):
            raise InvalidRequestError("end_thread() inside the engine's device work (a step, a cancel): a "
                                      "thread's streams are cleared after its last step, not during one")
        with self._changed:
            self._exclusive_waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._changed.wait()
            finally:
                self._exclusive_waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._changed:
                self._exclusive = False
                self._changed.notify_all()


_streams_in_use = _SharedExclusiveLock()


def device_work():
    """Context for work that evaluates on this thread's streams: no thread clears its streams meanwhile."""
    return _streams_in_use.shared()


def end_thread() -> None:
    """A thread's last MLX call: clears its streams (``mx.clear_streams()``) once no engine's device work
    runs on any thread. The thread cannot use MLX afterwards."""
    with _streams_in_use.exclusive():
        mx.clear_streams()
