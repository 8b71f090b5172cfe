"""A bounded walk over a GGUF file's header, before anything else reads it.

``gguf.GGUFReader`` trusts every count in the header: one flipped bit in an array's type or length makes
it loop ~1e18 times, its memory growing until the machine runs out. MLX's own GGUF loader (``mx.load``)
asserts on a tensor of more than 8 dimensions, which aborts the process. This walk reads each count,
checks it against the bytes left in the file, and refuses tensors of more dimensions than llama.cpp
writes (4), so that both readers only ever see a header that fits its file. It also bounds the items of all
metadata arrays together (``gguf.GGUFReader`` builds ~700 bytes of NumPy views per item: a 2 MB file of
2,000,000 bools took 1.4 GiB), refuses big-endian files, and says whether ``mx.load`` reads the file as
written: MLX's reader takes float64 values (and arrays of arrays) for fewer bytes than they hold, and read on
misaligned (SIGSEGV).

Layout (GGUF v2 and v3, little-endian): magic ``GGUF``, version (u32), tensor count and metadata
count (u64); per metadata entry a key (u64 length + bytes), a value type (u32) and the value; per tensor
a name, its dimension count (u32), its dimensions (u64 each), its type (u32) and its data offset (u64).
"""

from __future__ import annotations

import mmap
import pathlib
import struct

MAX_TENSOR_DIMS = 4  # llama.cpp's GGML_MAX_DIMS
MAX_ARRAY_ITEMS = 2**20  # Gemma 3: 786,432 (262,144 tokens, their scores and types); Llama 3: ~540,000
_MAX_ARRAY_DEPTH = 8
_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType -> size
_STRING, _ARRAY, _FLOAT64 = 8, 9, 12
_MIN_BYTES = {**_SCALAR_BYTES, _STRING: 8, _ARRAY: 12}  # the least an item of each type takes


class GGUFHeaderError(ValueError):
    """The header does not fit its file; the message says where."""


class _Walk:
    def __init__(self, data):
        self.data, self.pos = data, 0
        self.array_items, self.mlx_reads_it = 0, True

    def take(self, fmt: str) -> int:
        size = struct.calcsize(fmt)
        if size > len(self.data) - self.pos:
            raise GGUFHeaderError(f"it ends inside its header (at byte {self.pos})")
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += size
        return value

    def skip(self, n_bytes: int, what: str) -> None:
        if n_bytes > len(self.data) - self.pos:
            raise GGUFHeaderError(f"{what} at byte {self.pos} claims {n_bytes} bytes, more than the file has left")
        self.pos += n_bytes

    def count(self, n_items: int, item_bytes: int, what: str) -> int:
        """``n_items``, refused if even items of ``item_bytes`` each could not fit in the bytes left."""
        self.skip(0, what)
        if n_items * item_bytes > len(self.data) - self.pos:
            raise GGUFHeaderError(f"{what} at byte {self.pos} claims {n_items} items, more than the file can hold")
        return n_items

    def string(self, what: str) -> None:
        self.skip(self.take("Q"), what)

    def value(self, kind: int, depth: int = 0) -> None:
        if kind == _FLOAT64 or (kind == _ARRAY and depth > 0):
            self.mlx_reads_it = False
        if kind in _SCALAR_BYTES:
            self.skip(_SCALAR_BYTES[kind], "a value")
        elif kind == _STRING:
            self.string("a string")
        elif kind == _ARRAY and depth < _MAX_ARRAY_DEPTH:
            item = self.take("I")
            if item not in _MIN_BYTES:
                raise GGUFHeaderError(f"an array at byte {self.pos} has items of unknown type {item}")
            n_items = self.count(self.take("Q"), _MIN_BYTES[item], "an array")
            self.array_items += n_items
            if self.array_items > MAX_ARRAY_ITEMS:
                raise GGUFHeaderError(f"its metadata arrays hold more than {MAX_ARRAY_ITEMS} items (at byte "
                                      f"{self.pos}), far more than a vocabulary's")
            if item == _FLOAT64:
                self.mlx_reads_it = False
            if item in _SCALAR_BYTES:
                self.skip(n_items * _SCALAR_BYTES[item], "an array")
            else:
                for _ in range(n_items):
                    self.value(item, depth + 1)
        else:
            raise GGUFHeaderError(f"a value at byte {self.pos} has unknown type {kind} (or arrays nested too deep)")


def check_gguf_header(path: pathlib.Path) -> bool:
    """``GGUFHeaderError`` unless ``path``'s header fits the file; else whether ``mx.load`` reads it as written
    (see the module docstring)."""
    with open(path, "rb") as f:
        if not f.seek(0, 2):
            raise GGUFHeaderError("the file is empty")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            walk = _Walk(data)
            _walk(walk)
            return walk.mlx_reads_it


def _walk(walk: _Walk) -> None:
    if bytes(walk.data[:4]) != b"GGUF":
        raise GGUFHeaderError("it does not start with GGUF")
    walk.pos = 4
    if walk.take("I") & 0xFFFF == 0:
        raise GGUFHeaderError("it is written big-endian; only little-endian files are read (MLX's loader read "
                              "one past its end, and the gguf package's dequantizers take tensor data as "
                              "little-endian): convert it to little-endian with llama.cpp")
    walk.pos = 4
    version = walk.take("I")
    if version not in (2, 3):
        raise GGUFHeaderError(f"GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_entries = walk.take("Q"), walk.take("Q")
    walk.count(n_entries, 8 + 4 + 1, "the metadata count")
    for _ in range(n_entries):
        walk.string("a metadata key")
        walk.value(walk.take("I"))
    walk.count(n_tensors, 8 + 4 + 4 + 8, "the tensor count")
    for _ in range(n_tensors):
        walk.string("a tensor name")
        n_dims = walk.take("I")
        if n_dims > MAX_TENSOR_DIMS:
            raise GGUFHeaderError(f"a tensor at byte {walk.pos} has {n_dims} dimensions (llama.cpp writes at most "
                           f"{MAX_TENSOR_DIMS})")
        walk.skip(8 * n_dims + 4 + 8, "a tensor's shape")
