"""Interrupts (KeyboardInterrupt) raised at every point of an operation where CPython can raise one for Ctrl-C,
for tests that an interrupted operation leaves everything whole."""

import dis
import functools
import gc
import signal
import sys


@functools.lru_cache(maxsize=None)
def signal_points(code) -> frozenset:
    """The offsets in ``code`` where CPython (3.11, 3.12) handles a pending signal: a function's start and a
    generator's resume (RESUME), a loop's jump back, and the instruction after a call (once the call returned).
    Raising elsewhere (inside an exception handler's own bytecodes, say) would make states no Ctrl-C can."""
    instructions = list(dis.get_instructions(code))
    points = {i.offset for i in instructions if i.opname == "JUMP_BACKWARD"}
    # A tracer sees no opcode event for RESUME itself: it raises at the next instruction, which finds the frame
    # as RESUME left it. (Until 2026-12-06 RESUME's own offset was listed, so no start or resume was tried.)
    points.update(after.offset for before, after in zip(instructions, instructions[1:])
                  if before.opname in ("CALL", "CALL_FUNCTION_EX", "RESUME"))
    return frozenset(points)


class InterruptAt:
    """A trace function raising KeyboardInterrupt at the ``at``-th point of the bytecode of the modules named by
    ``files`` (their ``__file__``) where a signal is handled (never, for ``at=None``: it only counts them)."""

    def __init__(self, files, at=None):
        self.files, self.at, self.count, self.fired = files, at, 0, False

    def __call__(self, frame, event, arg):
        if frame.f_code.co_filename not in self.files:
            return None
        frame.f_trace_opcodes, frame.f_trace_lines = True, False
        return self.opcode

    def opcode(self, frame, event, arg):
        if event == "opcode" and frame.f_lasti in signal_points(frame.f_code):
            self.count += 1
            if self.count == self.at:
                self.fired = True
                # A real SIGINT: Python's handler raises KeyboardInterrupt at the next point it checks for one
                # (here, as this call returns), unless the code interrupted holds interrupts back meanwhile.
                signal.raise_signal(signal.SIGINT)
        return self.opcode


def traced(operation, files, at=None):
    """``(result, interrupted, tracer)`` of ``operation()`` run under ``InterruptAt(files, at)``, with Python's own
    SIGINT handler (a process started in the background may have SIGINT ignored)."""
    tracer = InterruptAt(files, at)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.settrace(tracer)
    try:
        return operation(), False, tracer
    except KeyboardInterrupt:
        assert tracer.fired, "a KeyboardInterrupt that the test did not raise"
        return None, True, tracer
    finally:
        sys.settrace(None)
        signal.signal(signal.SIGINT, previous)


def at_every_point(run, minimum, stride=1):
    """``run(at)`` for ``at`` = every ``stride``-th point of the operation that ``run`` interrupts; ``run``
    returns its tracer's ``count``. It first runs twice uninterrupted (``at=None``), as the first trace session
    of Python 3.12 sees no opcode of code not run before, and the second counts the points: more than
    ``minimum``, else the test would check less than it claims."""
    run(None)
    count = run(None)
    assert count > minimum, f"only {count} points traced"
    gc.freeze()  # the collections after each run then scan only what the run made
    try:
        for at in range(1, count + 1, stride):
            run(at)
    finally:
        gc.unfreeze()
