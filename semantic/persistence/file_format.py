"""The agent cache file: a safetensors file whose header is versioned and checksummed.

The full specification, and what each check guarantees, is docs/persistence.md.
In short::

    u64 little-endian N | N bytes of JSON, space-padded to a multiple of 8 | tensor bytes

The JSON is ``{"__metadata__": {...}, "layers.<i>.keys": {...}, "layers.<i>.values": {...}, ...}``
with one key/value tensor pair per layer that holds blocks, each
``[n_kv_heads, blocks * block_size, head_dim]`` (whole blocks, as the pool holds
them). A pool of quantized blocks writes its blocks packed, six tensors per layer
(``keys``, ``keys.scales``, ``keys.biases``, then ``values...``; see
``ModelCacheSpec.stored_parts``), and its geometry records ``block_format``.
Metadata values are strings (safetensors requires it), some of them JSON.
``header_checksum`` is the SHA-256 of the canonical JSON of the header without
that field, so no part of the header can change unnoticed; ``tensorsha256_hex``
holds one SHA-256 per tensor. ``mx.load`` reads these files like any safetensors
file; this module writes them itself to control fsync and to hash while writing.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple

import mlx.core as mx
import numpy as np

from semantic.domain.block_format import BlockFormat
from semantic.domain.value_objects import ModelCacheSpec
from semantic.persistence.errors import (CacheCorruptionError, CacheWriteError, IncompatibleCacheFileError,
                                         read_error)

FORMAT = "semantic.agent_cache"
FORMAT_VERSION = 1
_DTYPES = {"bfloat16": ("BF16", 2), "float16": ("F16", 2), "float32": ("F32", 4), "uint32": ("U32", 4)}
_LOADED_DTYPES = {code: (size, getattr(mx, name)) for name, (code, size) in _DTYPES.items()}
_UINT_OF_SIZE = {1: mx.uint8, 2: mx.uint16, 4: mx.uint32, 8: mx.uint64}
_LENGTH = struct.Struct("<Q")
MAX_HEADER_BYTES = 100_000_000
"""safetensors' own limit on a header (its readers refuse longer ones). A reader trusting a file's length field
up to the file's size read a sparse file's claim of gigabytes whole (MemoryError, or the process killed). It
bounds a context to ~4.7 million tokens of the largest ids (19 digits and a comma each), 14 million of
six-digit ids."""
_ALIGNMENT = 8  # tensor data starts 8-byte aligned, as other safetensors writers do
_DIGEST_HEX = 64
# model_fingerprint() before it hashed every byte of every weight: "<label>:<32 hex>" (no scheme name).
_SAMPLED_FINGERPRINT = re.compile(r"^[\w.]+(-[\w.]+)*-\d+x\d+x\d+-\w+:[0-9a-f]{32}$")


def geometry_of(spec: ModelCacheSpec) -> Dict[str, Any]:
    """What a file records of the pool's geometry (everything but the cosmetic name). The block
    format only when quantized, so dense files read as before."""
    geometry = {
        "n_layers": spec.n_layers, "n_kv_heads": spec.n_kv_heads, "k_head_dim": spec.k_head_dim,
        "v_head_dim": spec.v_head_dim, "dtype": spec.dtype, "block_size": spec.block_size,
        "layer_windows": list(spec.layer_windows),
    }
    if spec.block_format.quantized:
        geometry["block_format"] = spec.block_format.to_json()
    return geometry


def _format_name(geometry: Dict[str, Any]) -> str:
    recorded = geometry.get("block_format")
    if recorded is None:
        return f"{geometry.get('dtype')} (dense)"
    try:
        return BlockFormat(**recorded).name
    except (TypeError, ValueError):
        return f"unknown-format {recorded!r}"


@dataclass(frozen=True)
class AgentCacheHeader:
    """What a file says about the context it holds (everything except the checksums)."""

    agent_id: str
    model_fingerprint: str
    geometry: Dict[str, Any]
    token_ids: Tuple[int, ...]
    layer_blocks: Tuple[int, ...]

    def tensor_table(self) -> Dict[str, Dict[str, Any]]:
        """The safetensors entries, in file order: layer by layer, keys then values (their stored parts)."""
        g = self.geometry
        block_format = BlockFormat(**g["block_format"]) if g.get("block_format") else BlockFormat()
        parts = block_format.parts(g["dtype"], g["k_head_dim"], g["v_head_dim"])
        table, offset = {}, 0
        for layer, blocks in enumerate(self.layer_blocks):
            if not blocks:
                continue
            for part in parts:
                dtype, itemsize = _DTYPES[part.dtype]
                shape = [g["n_kv_heads"], blocks * g["block_size"], part.width]
                end = offset + int(np.prod(shape)) * itemsize
                table[f"layers.{layer}.{part.name}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, end]}
                offset = end
        return table

    def to_json(self, tensor_digests: Dict[str, str]) -> Dict[str, Any]:
        """The whole header object, ``header_checksum`` included."""
        metadata = {
            "format": FORMAT,
            "format_version": str(FORMAT_VERSION),
            "agent_id": self.agent_id,
            "model_fingerprint": self.model_fingerprint,
            "geometry": _compact(self.geometry),
            "token_ids": _compact(list(self.token_ids)),
            "layer_blocks": _compact(list(self.layer_blocks)),
            "tensorsha256_hex": _compact(tensor_digests),
        }
        header = {"__metadata__": metadata, **self.tensor_table()}
        metadata["header_checksum"] = header_checksum(header)
        return header


MAX_TOKEN_ID = 2**63 - 1
"""The largest token id a file holds (int64's): Python's JSON writer refuses ints of over 4,300 digits."""


def _compact(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def header_checksum(header: Dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``header`` without its ``header_checksum`` field."""
    metadata = {k: v for k, v in header.get("__metadata__", {}).items() if k != "header_checksum"}
    return hashlib.sha256(_compact({**header, "__metadata__": metadata}).encode("utf-8")).hexdigest()


def encode_header(header: Dict[str, Any]) -> bytes:
    """The bytes before the tensor data: length, canonical JSON, padding."""
    body = _compact(header).encode("utf-8")
    body += b" " * (-(_LENGTH.size + len(body)) % _ALIGNMENT)
    return _LENGTH.pack(len(body)) + body


# ---- writing --------------------------------------------------------------------------------------
def write_agent_cache(fd: int, header: AgentCacheHeader, tensors: Sequence[mx.array]) -> None:
    """Write the whole file to ``fd`` (evaluated ``tensors`` in ``tensor_table`` order).

    Tensors are hashed on worker threads while this thread writes them after
    a placeholder-sized gap; the header, whose length does not depend on the
    digests, goes in last.
    """
    table = header.tensor_table()
    views = byte_views(tensors)
    sizes = [entry["data_offsets"][1] - entry["data_offsets"][0] for entry in table.values()]
    if [v.nbytes for v in views] != sizes:
        raise AssertionError("tensors do not match the header's layer_blocks")
    offset = len(encode_header(header.to_json({name: "0" * _DIGEST_HEX for name in table})))
    if offset - _LENGTH.size > MAX_HEADER_BYTES:
        raise CacheWriteError(
            f"agent {header.agent_id!r}: the header of its {len(header.token_ids)} tokens would take "
            f"{offset - _LENGTH.size} bytes, over the {MAX_HEADER_BYTES} safetensors reads; nothing was written: "
            "keep its context in the pool, or save a shorter one")
    digests = [checksum_pool().submit(sha256_hex, v) for v in views]
    for view in views:
        _write_all(fd, view, offset)
        offset += view.nbytes
    _write_all(fd, encode_header(header.to_json({name: d.result() for name, d in zip(table, digests)})), 0)


def _write_all(fd: int, data, offset: int) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


# ---- reading --------------------------------------------------------------------------------------
def read_agent_cache(file, *, agent_id: str, model_fingerprint: str, spec: ModelCacheSpec,
                     check_header: Callable[[AgentCacheHeader], None] = lambda header: None,
                     ) -> Tuple[AgentCacheHeader, List[mx.array]]:
    """Read and check a whole file: its header, that it belongs to this model, agent and geometry,
    that its size is exact, and every tensor's checksum. Returns the header and the tensors in
    ``tensor_table`` order, or raises ``CacheCorruptionError`` / ``IncompatibleCacheFileError``, or
    ``CacheReadError`` if reading the file fails (an I/O error says nothing about its content).
    ``check_header`` sees the checked header before any tensor is read (a file too large for the pool
    is refused before MLX tries to allocate its tensors)."""
    where = getattr(file, "name", "the cache file")
    try:
        return _read_checked(file, where, agent_id=agent_id, model_fingerprint=model_fingerprint,
                             spec=spec, check_header=check_header)
    except OSError as exc:
        raise read_error(where, exc) from exc


def _read_checked(file, where: str, *, agent_id: str, model_fingerprint: str, spec: ModelCacheSpec,
                  check_header: Callable[[AgentCacheHeader], None]) -> Tuple[AgentCacheHeader, List[mx.array]]:
    size = os.fstat(file.fileno()).st_size
    raw_header, data_start = _read_header_bytes(file, size, where)
    header_json = _parse_json(raw_header, where)
    try:  # both encode what parsed: a lone surrogate ("\ud800") cannot be, nor nesting near the recursion limit
        metadata = _check_envelope(header_json, where)
        canonical = encode_header(header_json)
    except (UnicodeError, RecursionError) as exc:
        raise CacheCorruptionError(f"{where} is damaged: its header cannot be encoded again ({exc})") from None
    if canonical != _LENGTH.pack(len(raw_header)) + raw_header:
        raise CacheCorruptionError(
            f"{where} is damaged: its header bytes are not the canonical encoding of its content "
            "(changed whitespace, key order or padding)"
        )
    header = _interpret(metadata, where, agent_id=agent_id, model_fingerprint=model_fingerprint, spec=spec)
    table = header.tensor_table()
    if {k: v for k, v in header_json.items() if k != "__metadata__"} != table:
        raise CacheCorruptionError(f"{where}: the tensor table does not match the header's layer_blocks")
    expected_size = data_start + (list(table.values())[-1]["data_offsets"][1] if table else 0)
    if size != expected_size:
        raise CacheCorruptionError(
            f"{where} is {size} bytes, its header describes {expected_size}: "
            f"{'truncated' if size < expected_size else 'unexpected bytes at the end'}"
        )
    check_header(header)
    digests = _field(metadata, "tensorsha256_hex", where, _digest_map)
    return header, _load_tensors(file, table, data_start, digests, where)


def _read_header_bytes(file, size: int, where: str) -> Tuple[bytes, int]:
    if size < _LENGTH.size:
        raise CacheCorruptionError(f"{where} is truncated: {size} bytes, not even the 8-byte header length")
    file.seek(0)
    (length,) = _LENGTH.unpack(_read_exactly(file, _LENGTH.size, where))
    if length > MAX_HEADER_BYTES:
        raise CacheCorruptionError(
            f"{where} is damaged or not an agent cache: its header length says {length} bytes, over the "
            f"{MAX_HEADER_BYTES} a header may take (safetensors' limit)")
    if length > size - _LENGTH.size:
        raise CacheCorruptionError(
            f"{where} is damaged or truncated: its header length says {length} bytes, "
            f"the file holds {size - _LENGTH.size} after the length"
        )
    return _read_exactly(file, length, where).tobytes(), _LENGTH.size + length


def _parse_json(raw: bytes, where: str) -> Dict[str, Any]:
    def unique_keys(pairs):
        keys = [k for k, _ in pairs]
        if len(keys) != len(set(keys)):
            raise ValueError("duplicate key")
        return dict(pairs)

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CacheCorruptionError(f"{where} is damaged: its header is not JSON ({exc})") from None
    if not isinstance(header, dict) or not all(_is_tensor_entry(v) for k, v in header.items() if k != "__metadata__"):
        raise CacheCorruptionError(f"{where} is damaged: its header is not a safetensors header")
    metadata = header.get("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CacheCorruptionError(f"{where} is damaged: its metadata is not a map of strings")
    return header


def _is_tensor_entry(entry) -> bool:
    return (
        isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}
        and isinstance(entry["dtype"], str) and isinstance(entry["shape"], list)
        and isinstance(entry["data_offsets"], list) and len(entry["data_offsets"]) == 2
    )


def _check_envelope(header: Dict[str, Any], where: str) -> Dict[str, str]:
    """The checks every format version shares: the file is ours, the header is intact, the version is known."""
    metadata = header.get("__metadata__", {})
    if "header_checksum" not in metadata and metadata.get("format") != FORMAT:
        raise IncompatibleCacheFileError(
            f"{where} is a safetensors file (format {metadata.get('format')!r}) but not an agent cache; "
            "move it out of the cache directory"
        )
    if metadata.get("header_checksum") != header_checksum(header):
        raise CacheCorruptionError(f"{where} is damaged: its header checksum does not match its header")
    if metadata.get("format") != FORMAT:
        raise IncompatibleCacheFileError(f"{where} is a {metadata.get('format')!r} file, not {FORMAT!r}")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise IncompatibleCacheFileError(
            f"{where} has format version {metadata.get('format_version')!r}; this build of semantic reads "
            f"version {FORMAT_VERSION}. Delete the file (the agent's context is prefilled again) or use the "
            "version that wrote it"
        )
    return metadata


def _interpret(metadata: Dict[str, str], where: str, *, agent_id: str, model_fingerprint: str,
               spec: ModelCacheSpec) -> AgentCacheHeader:
    written_for = metadata.get("model_fingerprint")
    if written_for != model_fingerprint and _SAMPLED_FINGERPRINT.match(str(written_for)):
        raise IncompatibleCacheFileError(
            f"{where} was written with an older model fingerprint ({written_for!r}) that sampled the weights "
            "instead of hashing all of them, so it cannot prove which model computed it. Delete the file "
            "(the agent's context is prefilled again)"
        )
    if written_for != model_fingerprint:
        raise IncompatibleCacheFileError(
            f"{where} was written for model {written_for!r}, this store serves {model_fingerprint!r}; "
            "a context only continues on the model that computed it. Delete the file or use that model"
        )
    geometry = _field(metadata, "geometry", where, json.loads)
    expected_geometry = geometry_of(spec)
    if isinstance(geometry, dict) and geometry != expected_geometry \
            and {**geometry, "block_format": None} == {**expected_geometry, "block_format": None}:
        raise IncompatibleCacheFileError(
            f"{where} holds {_format_name(geometry)} blocks, the pool keeps {_format_name(expected_geometry)} "
            "blocks; load it into a pool of that block format (ModelCacheSpec.with_format), or delete the file"
        )
    if geometry != expected_geometry:
        raise IncompatibleCacheFileError(
            f"{where} holds blocks of geometry {geometry}, the pool has {expected_geometry}; "
            "build the pool with ModelCacheSpec.from_model(model) of the fingerprinted model"
        )
    if metadata.get("agent_id") != agent_id:
        raise CacheCorruptionError(
            f"{where} holds agent {metadata.get('agent_id')!r}, not {agent_id!r}; was it renamed or copied?"
        )
    token_ids = _field(metadata, "token_ids", where, _int_list)
    layer_blocks = _field(metadata, "layer_blocks", where, _int_list)
    expected = list(spec.blocks_per_layer(len(token_ids)))
    if layer_blocks != expected:
        raise CacheCorruptionError(
            f"{where}: layer_blocks {layer_blocks} do not fit a context of {len(token_ids)} tokens ({expected})"
        )
    return AgentCacheHeader(agent_id, model_fingerprint, geometry, tuple(token_ids), tuple(layer_blocks))


def _field(metadata: Dict[str, str], key: str, where: str, parse):
    try:
        return parse(metadata[key])
    except (KeyError, ValueError, TypeError, RecursionError):  # RecursionError: JSON nested past Python's limit
        raise CacheCorruptionError(f"{where}: header field {key!r} is missing or malformed") from None


def _int_list(text: str) -> List[int]:
    values = json.loads(text)
    if not isinstance(values, list) or not all(type(v) is int and 0 <= v <= MAX_TOKEN_ID for v in values):
        raise ValueError(f"not a list of ints in [0, {MAX_TOKEN_ID}]")
    return values


def _digest_map(text: str) -> Dict[str, str]:
    digests = json.loads(text)
    if not isinstance(digests, dict):
        raise ValueError("not a map of tensor names to digests")
    return digests


def _load_tensors(file, table: Dict[str, Dict[str, Any]], data_start: int, expected: Dict[str, str],
                  where: str) -> List[mx.array]:
    """The tensors of ``table``, read by this thread and checked against their digests before they are returned.
    Not ``mx.load`` of the open file: MLX reads a Python file object on its own threads, which need the GIL for
    it, and ``mx.clear_cache()`` (mlx-lm's prefill calls it) holds the GIL while it waits for those threads: a
    load beside a stepping engine froze the whole process. Each tensor is copied into MLX as soon as it is read,
    while the checksum threads hash it; its host copy goes once both are done."""
    file.seek(data_start)
    tensors, digests = [], []
    for entry in table.values():
        start, end = entry["data_offsets"]
        data = _read_exactly(file, end - start, where)
        digests.append(checksum_pool().submit(sha256_hex, data))
        itemsize, dtype = _LOADED_DTYPES[entry["dtype"]]
        tensors.append(mx.array(data.view(f"u{itemsize}").reshape(entry["shape"])).view(dtype))
    for name, digest in zip(table, digests):
        if expected.get(name) != digest.result():
            raise CacheCorruptionError(
                f"{where} is damaged: tensor {name} does not match its checksum (a flipped bit or a torn write)"
            )
    return tensors


def _read_exactly(file, n: int, where: str) -> np.ndarray:
    buffer = np.empty(n, dtype=np.uint8)
    view, done = memoryview(buffer), 0
    while done < n:  # an unbuffered read may return less
        got = file.readinto(view[done:])
        if not got:
            raise CacheCorruptionError(f"{where} was cut short while it was read: {n - done} bytes missing")
        done += got
    return buffer


# ---- bytes ----------------------------------------------------------------------------------------
def unsigned_view(array: mx.array) -> mx.array:
    """The same bytes as unsigned ints of the same width (numpy has no bfloat16; integer sums are exact)."""
    return array.view(_UINT_OF_SIZE[array.itemsize])


def byte_views(arrays: Sequence[mx.array]) -> List[np.ndarray]:
    """Each array's bytes, without a copy when it is contiguous."""
    unsigned = [unsigned_view(a) for a in arrays]
    mx.eval(unsigned)  # once for all: np.asarray would evaluate each lazy view on its own
    return [np.asarray(u).reshape(-1).view(np.uint8) for u in unsigned]


def sha256_hex(data) -> str:
    return hashlib.sha256(data).hexdigest()  # releases the GIL: workers hash in parallel


@functools.lru_cache(maxsize=None)
def checksum_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="semantic-checksum")
