"""Ctrl-C (KeyboardInterrupt) at every place of an operation where CPython can raise it, once or twice, for
tests that an interrupted operation leaves everything whole."""

import _thread
import dis
import functools
import gc
import signal
import sys
import time


@functools.lru_cache(maxsize=None)
def signal_points(code) -> frozenset:
    """The offsets in ``code`` where the tracer marks a SIGINT arrived: the instruction after each place where
    CPython (3.11, 3.12) checks for signals (a function's start or a generator's resume, a loop's jump back, a
    call). Marked there, the signal is raised at the next check, wherever that is."""
    instructions = list(dis.get_instructions(code))
    points = {i.offset for i in instructions if i.opname == "JUMP_BACKWARD"}
    # After RESUME, not at it: a tracer gets no opcode event for RESUME itself.
    points.update(after.offset for before, after in zip(instructions, instructions[1:])
                  if before.opname in ("CALL", "CALL_FUNCTION_EX", "RESUME"))
    return frozenset(points)


class _SigInt(int):
    """Reading ``.sent`` marks SIGINT arrived (``_thread.interrupt_main``) from C code: an attribute read is no
    place where CPython checks for signals, so the signal stays pending until the traced code's next check
    instead of being raised in the tracer, which would end tracing."""

    sent = property(_thread.interrupt_main)


class InterruptAt:
    """A trace function marking SIGINT arrived (what Python's C handler does when the OS delivers it) as the
    ``at``-th point (or each point in ``at``, a set) of the modules named by ``files`` (their ``__file__``)
    begins, where a signal is handled (never, for ``at=None``: it only counts them). CPython then raises
    KeyboardInterrupt where it next checks for signals, in whatever frame that is, as for a real Ctrl-C;
    tracing goes on, for a second interrupt."""

    def __init__(self, files, at=None):
        self.files, self.count, self.fired = files, 0, 0
        self.raised, self.seen = set(), False  # ids of the KeyboardInterrupts raised; one reached traced code
        self.done = False  # the operation has ended: a signal still pending is dropped
        self.at = frozenset() if at is None else frozenset([at] if isinstance(at, int) else at)
        self._signal = _SigInt(signal.SIGINT)

    def __call__(self, frame, event, arg):
        if frame.f_code.co_filename not in self.files:
            return None
        frame.f_trace_opcodes, frame.f_trace_lines = True, False
        return self.opcode

    def opcode(self, frame, event, arg):
        if event == "exception" and id(arg[1]) in self.raised:
            self.seen = True
        if event == "opcode" and frame.f_lasti in signal_points(frame.f_code):
            self.count += 1
            if self.count in self.at:
                self.fired += 1
                self._signal.sent
        return self.opcode

    def handle(self, signum, frame):
        """SIGINT's handler while tracing: KeyboardInterrupt, as Python's own; but a check inside the tracer
        (or what it calls) sends the signal again instead, to be raised at the traced code's next check."""
        if self.done:
            return
        while frame is not None:
            if frame.f_code in _TRACER_CODES:
                self._signal.sent
                return
            frame = frame.f_back
        raise self._interrupt()  # not through a local: it would keep the interrupted frames alive, in a cycle

    def _interrupt(self) -> KeyboardInterrupt:
        interrupt = KeyboardInterrupt()
        self.raised.add(id(interrupt))
        return interrupt

    def swallowed(self, interrupted: bool) -> bool:
        """Whether traced code caught an interrupt and went on as if none had come. One that a C extension
        swallows before any Python frame sees it (nanobind trying an MLX function's next overload when
        converting an argument raised) is not counted: a real Ctrl-C there is lost the same way."""
        return self.seen and not interrupted


_TRACER_CODES = frozenset(f.__code__ for f in (InterruptAt.__call__, InterruptAt.opcode))


def traced(operation, files, at=None):
    """``(result, interrupted, tracer)`` of ``operation()`` run under ``InterruptAt(files, at)``."""
    tracer = InterruptAt(files, at)
    previous = signal.signal(signal.SIGINT, tracer.handle)
    sys.settrace(tracer)
    try:
        result = operation()
        time.sleep(0)  # checks for signals, as the caller's code would soon: one sent at the last point is raised
        return result, False, tracer
    except KeyboardInterrupt:
        assert tracer.fired, "a KeyboardInterrupt that the test did not raise"
        return None, True, tracer
    finally:
        # Before the next check for signals (the call below): a second interrupt still to come would land in
        # the caller, which this helper stands for.
        tracer.done = True
        sys.settrace(None)
        signal.signal(signal.SIGINT, previous)


def at_every_point(run, minimum, stride=1, second=()):
    """``run(at)`` for ``at`` = every ``stride``-th point of the operation that ``run`` interrupts, and with
    ``second``, also ``(at, at + n)`` for each ``n`` in it: Ctrl-C pressed again while the first is handled.
    ``run`` returns its tracer's ``count``. It first runs twice uninterrupted (``at=None``), as the first trace
    session of Python 3.12 sees no opcode of code not run before, and the second counts the points: more than
    ``minimum``, else the test would check less than it claims."""
    run(None)
    count = run(None)
    assert count > minimum, f"only {count} points traced"
    gc.freeze()  # the collections after each run then scan only what the run made
    try:
        for at in range(1, count + 1, stride):
            run(at)
            for later in second:
                run((at, at + later))
    finally:
        gc.unfreeze()
