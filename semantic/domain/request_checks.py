"""What a generation request may ask for, checked once when it is submitted.

Everything here runs before a request reserves a block, so a bad argument
raises ``InvalidRequestError`` and changes nothing. The ranges are those
mlx-lm's samplers accept; values outside them either crash the process (token
ids past the vocabulary index the embedding out of bounds) or fail inside a
batched step, where they would take other requests down with them.
"""

from __future__ import annotations

import array
import math
import numbers
import os
import pathlib
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, Optional, Sequence, Sized, TypeVar

import numpy as np

from semantic.domain.errors import InvalidRequestError

T = TypeVar("T")

_ARRAY_TYPES = ("mlx.core.array", "numpy.ndarray")


def is_int(value: Any) -> bool:
    """A real integer: Python, NumPy or a 0-d integer MLX/NumPy array; never a bool."""
    if type(value) is int:  # the usual case first: the ABC check below costs microseconds on every store
        return True
    if isinstance(value, (bool, np.bool_)):
        return False
    if isinstance(value, numbers.Integral):
        return True
    return _array_kind(value) == "int" and getattr(value, "ndim", None) == 0


def is_int_vector(value: Any) -> bool:
    """A 1-d integer NumPy or MLX array."""
    return _array_kind(value) == "int" and value.ndim == 1


def _array_kind(value: Any) -> Optional[str]:
    """``"int"`` / ``"other"`` for NumPy and MLX arrays, ``None`` for anything else."""
    name = f"{type(value).__module__}.{type(value).__qualname__}"
    if name not in _ARRAY_TYPES:
        return None
    if name == "numpy.ndarray":  # not a name test: a structured dtype can have a field named "int"
        integer = np.issubdtype(value.dtype, np.integer)
    else:
        integer = str(value.dtype).startswith(("mlx.core.int", "mlx.core.uint"))
    return "int" if integer else "other"


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def checked_int(name: str, value: Any, low: int, high: Optional[int] = None) -> int:
    """``value`` as a Python int in ``[low, high]``, or ``InvalidRequestError``."""
    if not is_int(value):
        raise InvalidRequestError(f"{name} must be an int, got {type(value).__name__} {shown(value)}")
    number = int(value)
    if number < low or (high is not None and number > high):
        bounds = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidRequestError(f"{name} must be {bounds}, got {shown(number)}")
    return number


def shown(value: Any) -> str:
    """``repr(value)`` for an error message, but a huge int by its size: ``str`` of an int of over 4,300 digits
    raises ValueError, as does ``repr`` of anything holding one (a list, a Fraction): those are named by type."""
    if type(value) is int and abs(value) >= 10**40:
        return f"an int of {value.bit_length()} bits"
    try:
        return repr(value)
    except ValueError:
        return f"a {type(value).__name__} holding an int too long to print"


def checked_real(name: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False) -> float:
    """``value`` as a finite float in ``[low, high]`` (``(low, high]`` with ``low_open``)."""
    if not _is_real(value):
        raise InvalidRequestError(f"{name} must be a number, got {type(value).__name__} {shown(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number) or number < low or number > high or (low_open and number == low):
        if high == math.inf:
            interval = f"> {low}" if low_open else f">= {low}"
        else:
            interval = f"in {'(' if low_open else '['}{low}, {high}]"
        raise InvalidRequestError(f"{name} must be a finite number {interval}, got {shown(value)}")
    return number


def plain_ints(items: Iterable) -> bool:
    """Whether every item is a plain ``int`` (not a bool or NumPy integer): passes in C, for the token and
    block id lists every store and request checks. Counting ``int`` in a list of the types took 40 us for a
    store's 4,096 token ids, a set of them 69 (CPU)."""
    types = list(map(type, items))
    return types.count(int) == len(types)


def all_non_negative(ints: Sequence[int]) -> bool:
    """Whether every one of ``ints`` (plain ints) is >= 0. An unsigned C array refuses a negative in one C pass,
    2.5x faster than ``min`` for a store's 4,096 token ids; ints too large for it fall back to ``min``."""
    try:
        array.array("Q", ints)
        return True
    except OverflowError:
        return min(ints, default=0) >= 0


def int_items(items: list, what: str) -> List[int]:
    """``items`` as Python ints (NumPy and 0-d array integers converted), or ``InvalidRequestError`` naming the
    first item that is not an int; ``what`` names the list."""
    if plain_ints(items):
        return items
    for item in items:
        if not is_int(item):  # a loop, not next(..., None): None itself is a bad item
            raise InvalidRequestError(
                f"{what} must be ints (Python, NumPy or MLX integers), got {type(item).__name__} {shown(item)}")
    return [int(item) for item in items]


def length(items: Sized, name: str) -> int:
    """``len(items)``, or ``InvalidRequestError`` for a range longer than ``len`` can say (``range(2**64)``
    raises ``OverflowError``)."""
    try:
        return len(items)
    except OverflowError:
        raise InvalidRequestError(f"{name} holds more than {sys.maxsize} items") from None


def check_text(name: str, text: str) -> None:
    """``InvalidRequestError`` unless ``text`` encodes as UTF-8 (tokenizers raise ``TypeError`` on a lone
    surrogate such as ``"\\ud800"``)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"the {name} is not valid Unicode text ({exc.reason}, a lone surrogate)") from None


def of_this_thread(evaluate: Callable[[], T], what: str) -> T:
    """``evaluate()``, whose MLX error for a lazy array built on another thread's stream (MLX streams belong to
    the thread that made them) becomes ``InvalidRequestError`` naming ``what``."""
    try:
        return evaluate()
    except RuntimeError as exc:
        if "in current thread" not in str(exc):  # MLX's "There is no Stream(cpu, 1) in current thread."
            raise
        raise InvalidRequestError(
            f"{what}: a lazy MLX array computed on another thread's stream, which this thread cannot run ({exc}); "
            "evaluate it (mx.eval) on the thread that made it before handing it over") from None


def token_ids(prompt: Any, vocab_size: int, max_tokens: Optional[int] = None) -> List[int]:
    """A prompt given as token ids -> a list of Python ints, each in ``[0, vocab_size)``; ``max_tokens``, if
    given, bounds its length.

    Accepts a sequence (list, tuple, range) of ints (Python, NumPy, 0-d integer
    arrays), or a 1-d integer NumPy / MLX array. ``bytes`` and bools are refused:
    both are ints to Python but never token ids a caller meant.
    """
    if _array_kind(prompt) is not None:
        if not is_int_vector(prompt):
            raise InvalidRequestError(
                f"a prompt array must be 1-d of an integer dtype, got shape {tuple(prompt.shape)} {prompt.dtype}"
            )
        _check_length(prompt.shape[0], max_tokens)  # a broadcast array of 10**12 ids takes no memory
        ids = [int(t) for t in of_this_thread(lambda: np.asarray(prompt).tolist(), "the prompt")]
    elif isinstance(prompt, (bytes, bytearray, memoryview)):
        raise InvalidRequestError(
            "the prompt is bytes; decode it to str (the tokenizer encodes text), or pass a list of token ids"
        )
    elif isinstance(prompt, (list, tuple, range)):
        _check_length(length(prompt, "the prompt"), max_tokens)  # range(10**12)
        ids = int_items(list(prompt), "token ids")
    else:
        raise InvalidRequestError(
            f"prompt must be a str, a sequence of token ids or a 1-d integer array, got {type(prompt).__name__}"
        )
    check_vocabulary(ids, vocab_size)
    return ids


def _check_length(n: int, max_tokens: Optional[int]) -> None:
    """Refuses a prompt longer than ``max_tokens`` before a list of its ids is made."""
    if max_tokens is not None and n > max_tokens:
        raise InvalidRequestError(f"the prompt has {n} tokens, more than the {max_tokens} every "
                                  "block of the pool could hold")


def check_vocabulary(ids: Sequence[int], vocab_size: int, whose: str = "",
                     fix: str = "encode prompts with this model's tokenizer") -> None:
    """``InvalidRequestError`` unless every id is in ``[0, vocab_size)``; ``whose`` names where they came from,
    ``fix`` what to do."""
    if ids and (min(ids) < 0 or max(ids) >= vocab_size):
        bad = next(t for t in ids if not 0 <= t < vocab_size)
        raise InvalidRequestError(
            f"{whose}token id {shown(bad)} is outside the model's vocabulary [0, {vocab_size}); {fix}")


GREEDY_BELOW_TEMPERATURE = 1e-30  # a positive temperature below this samples greedily, its limit
# A temperature above this samples as this one does: uniformly among the tokens top_k / top_p / min_p keep, its
# limit. mlx-lm scales float32 logits by 1/temperature, which rounds to 0 from ~1e46 (subnormals flush to 0
# on GPUs from ~1e38): the filtered-out logits became -inf * 0 = NaN, and the last token id came out.
UNIFORM_ABOVE_TEMPERATURE = 1e30
MIN_REPETITION_PENALTY = 1e-30  # mlx-lm divides positive logits by it: below, they overflow to inf, then NaN


@dataclass(frozen=True)
class SamplingParams:
    """mlx-lm's sampling options, each within the range mlx-lm's samplers accept. Greedy when
    ``temperature`` is 0; ``top_k`` 0 (or the whole vocabulary) keeps every token."""

    temperature: float = 0.0
    top_p: float = 0.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: Optional[float] = None

    @classmethod
    def checked(cls, vocab_size: int, *, temperature: Any = 0.0, top_p: Any = 0.0, top_k: Any = 0,
                min_p: Any = 0.0, repetition_penalty: Any = None) -> "SamplingParams":
        temperature = checked_real("temperature", temperature, 0.0)
        return cls(
            # mlx-lm scales float32 logits by 1/temperature: below this it overflows and samples at random.
            temperature=0.0 if temperature < GREEDY_BELOW_TEMPERATURE else min(temperature, UNIFORM_ABOVE_TEMPERATURE),
            top_p=checked_real("top_p", top_p, 0.0, 1.0),
            top_k=checked_int("top_k", top_k, 0, vocab_size),
            min_p=checked_real("min_p", min_p, 0.0, 1.0),
            repetition_penalty=None if repetition_penalty is None
            else checked_real("repetition_penalty", repetition_penalty, MIN_REPETITION_PENALTY),
        )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def checked_path(name: str, value: Any) -> pathlib.Path:
    """``value`` (a str or os.PathLike) as an absolute path, ``~`` expanded, or ``InvalidRequestError`` saying
    why not: another type, a NUL byte (no file system allows one), or ``~user`` of an unknown user."""
    if not isinstance(value, (str, os.PathLike)):
        raise InvalidRequestError(f"{name} must be a path (str or os.PathLike), got {value!r}")
    try:
        path = pathlib.Path(value).expanduser().absolute()
    except (TypeError, RuntimeError) as exc:  # a PathLike giving bytes; "Could not determine home directory"
        raise InvalidRequestError(f"{name} {value!r} cannot be used as a path: {exc}") from None
    if "\0" in str(path):
        raise InvalidRequestError(f"{name} {str(path)!r} contains a NUL byte; no file system allows one")
    return path
