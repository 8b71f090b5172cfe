"""The format blocks are kept in at rest: the model's dtype, or MLX affine quantization (8 or 4 bits).

A quantized block keeps, per token and head, the packed ``uint32`` words of its
keys (values likewise) plus one scale and one bias per ``group_size`` elements of
the head dimension, in the model's dtype (what ``mx.quantize`` returns for a
``[..., head_dim]`` array). Groups never span tokens, so every token row is
quantized on its own: a block's rows can be copied between blocks packed, and a
token is quantized exactly once, when it is first stored.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Tuple, Union

from semantic.domain.errors import InvalidRequestError
from semantic.domain.request_checks import checked_int

QUANTIZED_BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)  # what mx.quantize accepts
DEFAULT_GROUP_SIZE = 64
_PACKED_DTYPE = "uint32"
_NAME = re.compile(r"^q([0-9]{1,3})(?:g([0-9]{1,3}))?$")  # ASCII digits, a few: int() of 5,000 raised


@dataclass(frozen=True)
class StoredPart:
    """One array a block is stored as: ``name`` in files (``keys``, ``keys.scales``, ...), its dtype and
    the length of its last axis for one token of one head."""

    name: str
    dtype: str
    width: int


@dataclass(frozen=True)
class BlockFormat:
    """``bits=None``: blocks in the model's dtype (the default). ``bits=8`` / ``4``: affine-quantized
    along the head dimension in groups of ``group_size``. Parse names with :meth:`parse`."""

    bits: Optional[int] = None
    group_size: int = DEFAULT_GROUP_SIZE

    def __post_init__(self):
        # Plain ints only (NumPy's converted): 8.0 passed the membership tests below and failed inside MLX,
        # a NumPy int failed every JSON write of the persistence store.
        if self.bits is not None:
            object.__setattr__(self, "bits", checked_int("block format bits", self.bits, 0))
        object.__setattr__(self, "group_size", checked_int("block format group_size", self.group_size, 0))
        if self.bits is not None and self.bits not in QUANTIZED_BITS:
            raise InvalidRequestError(f"block format bits must be None (model dtype) or one of {QUANTIZED_BITS}, "
                                      f"got {self.bits!r}")
        if self.group_size not in GROUP_SIZES:
            raise InvalidRequestError(f"block format group_size must be one of {GROUP_SIZES}, got {self.group_size!r}")

    @classmethod
    def parse(cls, value: Union["BlockFormat", str, int, None]) -> "BlockFormat":
        """``"dense"`` (or ``None``): the model's dtype; ``"q8"``, ``"q4"``: 8/4 bits in groups of 64;
        ``"q4g32"``: 4 bits in groups of 32; an int: those bits in groups of 64."""
        if isinstance(value, BlockFormat):
            return value
        if value is None or (isinstance(value, str) and value == "dense"):  # == of a NumPy array is an array
            return DENSE
        if isinstance(value, int) and not isinstance(value, bool):
            return cls(value)
        match = _NAME.fullmatch(value) if isinstance(value, str) else None  # match took "q4\n" ($ before a \n)
        if match is None:
            raise InvalidRequestError(
                f"unknown block format {value!r}; use 'dense', 'q8', 'q4' or e.g. 'q4g32' (bits, group size)"
            )
        return cls(int(match.group(1)), int(match.group(2) or DEFAULT_GROUP_SIZE))

    @property
    def quantized(self) -> bool:
        return self.bits is not None

    @property
    def name(self) -> str:
        if not self.quantized:
            return "dense"
        suffix = "" if self.group_size == DEFAULT_GROUP_SIZE else f"g{self.group_size}"
        return f"q{self.bits}{suffix}"

    def check_head_dim(self, head_dim: int) -> None:
        """Raise unless a head dimension splits into whole groups and whole packed words."""
        if self.quantized and (head_dim % self.group_size or head_dim * self.bits % 32):
            raise InvalidRequestError(
                f"block format {self.name} needs a head dimension divisible by its group size {self.group_size}, "
                f"got {head_dim}; pick a group size dividing {head_dim} (e.g. 'q{self.bits}g32')"
            )

    def parts(self, dtype: str, k_head_dim: int, v_head_dim: int) -> Tuple[StoredPart, ...]:
        """The arrays a block is stored as, keys' parts first, in file order."""
        out = []
        for kind, dim in (("keys", k_head_dim), ("values", v_head_dim)):
            if not self.quantized:
                out.append(StoredPart(kind, dtype, dim))
                continue
            groups = dim // self.group_size
            out += [StoredPart(kind, _PACKED_DTYPE, dim * self.bits // 32),
                    StoredPart(f"{kind}.scales", dtype, groups), StoredPart(f"{kind}.biases", dtype, groups)]
        return tuple(out)

    def to_json(self):
        """What a file's geometry records of the format (nothing for dense: older files stay readable)."""
        return None if not self.quantized else {"bits": self.bits, "group_size": self.group_size}


def fitted(value, head_dim: int) -> BlockFormat:
    """``value`` (as :meth:`BlockFormat.parse` takes it) with its group size lowered, if needed, to the
    largest that divides ``head_dim``: ``"q4"`` on a model of head dim 32 is ``q4g32``."""
    fmt = BlockFormat.parse(value)
    if not fmt.quantized:
        return fmt
    fitting = [g for g in GROUP_SIZES if g <= fmt.group_size and head_dim % g == 0]
    if not fitting:
        fmt.check_head_dim(head_dim)  # raises, saying why
    return BlockFormat(fmt.bits, fitting[-1])


DENSE = BlockFormat()
Q8 = BlockFormat(8)
Q4 = BlockFormat(4)

_ITEM_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "uint32": 4}


def part_bytes(part: StoredPart) -> int:
    """Bytes of one token of one head of ``part``."""
    return part.width * _ITEM_BYTES[part.dtype]
