"""CUDA kernels compiled here with NVRTC and launched by MLX as precompiled kernels.

MLX's ``mx.fast.cuda_kernel`` compiles its kernel in every process that launches it, with MLX's own device
headers, and keeps no copy on disk: on an H100 the first launch of a one-line kernel took 1.5-1.7 s in a fresh
process, and a fresh process's first rebuild 1.2-1.5 s, against ~1 ms for the next
(``experiments/results/h200/session-2026-12-07i/``). NVRTC called without those headers compiled the same
kernel in 0.02-0.05 s. So the kernels that read their inputs as whole rows (the rebuild's gathers) are
compiled here and launched with ``mx.fast.precompiled_cuda_kernel``. The store's kernels read strided views
through the ``{name}_strides`` MLX's own path passes, which Python cannot see, and stay on that path; an
engine has them compiled when it starts (``BlockPool.compile_kernels``).
"""

from __future__ import annotations

import ctypes
import functools
import glob
import hashlib
import os
import threading
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

_C_TYPES = {mx.bool_: "bool", mx.uint8: "unsigned char", mx.uint16: "unsigned short", mx.uint32: "unsigned int",
            mx.uint64: "unsigned long long", mx.int8: "signed char", mx.int16: "short", mx.int32: "int",
            mx.int64: "long long", mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float"}

HEADERS = "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
"""The only headers a kernel gets (MLX's own pull in most of libcu++, which is what makes its compile slow)."""

# NVRTC has no <cstdint>. Inside the kernels' namespace, so that no header's typedef of the same name can clash.
_TYPEDEFS = """namespace semantic_kernels {
typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef int int32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
typedef unsigned long long uintptr_t;
typedef unsigned long long size_t;
"""


def kernel_source(name: str, input_names: Sequence[str], input_dtypes: Sequence[mx.Dtype],
                  output_names: Sequence[str], output_dtypes: Sequence[mx.Dtype], template, body: str) -> str:
    """The whole source of kernel ``name`` as ``mx.fast.cuda_kernel`` would make it from ``body``: inputs as const
    pointers of their dtypes, then outputs, the template arguments as constants (``constexpr int``/``bool``, or
    ``using`` for a dtype) before the body; ``extern "C"``, so ``name`` is the symbol MLX looks up."""
    params = [f"    const {_C_TYPES[dtype]}* {arg}" for arg, dtype in zip(input_names, input_dtypes)]
    params += [f"    {_C_TYPES[dtype]}* {arg}" for arg, dtype in zip(output_names, output_dtypes)]
    constants = []
    for arg, value in template:
        if isinstance(value, mx.Dtype):
            constants.append(f"    using {arg} = {_C_TYPES[value]};")
        elif isinstance(value, bool):
            constants.append(f"    constexpr bool {arg} = {'true' if value else 'false'};")
        else:
            constants.append(f"    constexpr int {arg} = {int(value)};")
    return (HEADERS + _TYPEDEFS + f'extern "C" __global__ void {name}(\n' + ",\n".join(params) + ") {\n"
            + "\n".join(constants) + "\n" + body + "\n}\n}  // namespace semantic_kernels\n")


class PrecompiledKernel:
    """Called as the kernel ``mx.fast.cuda_kernel`` returns is (``inputs``, ``template``, ``grid``, ``threadgroup``,
    ``output_shapes``, ``output_dtypes``), for a ``body`` that reads every input as a row-contiguous array (no
    ``_shape``/``_strides``; inputs that are not are copied first, as MLX's default does). Each set of template
    arguments and dtypes is compiled once per process, by NVRTC; where NVRTC cannot be loaded or cannot compile
    it, MLX compiles the kernel instead (a slow first launch, the same results), with a warning."""

    def __init__(self, name: str, input_names: Sequence[str], output_names: Sequence[str], body: str):
        self._name, self._input_names, self._output_names, self._body = name, list(input_names), list(output_names), body
        self._compiled: Dict[tuple, Optional[Tuple[str, bytes]]] = {}  # None: NVRTC failed, MLX compiles it
        self._lock = threading.Lock()

    def __call__(self, *, inputs: List[mx.array], template, grid, threadgroup, output_shapes,
                 output_dtypes) -> List[mx.array]:
        key = (tuple(template), tuple(a.dtype for a in inputs), tuple(output_dtypes))
        compiled = self._compiled.get(key) or self._compile(key)
        if compiled is None:
            return self._mlx_kernel()(inputs=inputs, template=template, grid=grid, threadgroup=threadgroup,
                                      output_shapes=output_shapes, output_dtypes=output_dtypes)
        name, binary = compiled
        return mx.fast.precompiled_cuda_kernel(name=name, compiled_source=binary, inputs=inputs,
                                               output_shapes=output_shapes, output_dtypes=output_dtypes, scalars=[],
                                               grid=grid, threadgroup=threadgroup, ensure_row_contiguous=True)

    def _compile(self, key: tuple) -> Optional[Tuple[str, bytes]]:
        template, input_dtypes, output_dtypes = key
        with self._lock:
            if key in self._compiled:
                return self._compiled[key]
            if _nvrtc() is None:
                return None
            # Each compiled variant needs a name of its own: MLX keeps a process's kernels by name.
            variant = hashlib.sha1(repr((self._body, template, input_dtypes, output_dtypes)).encode()).hexdigest()[:16]
            name = f"semantic_{self._name}_{variant}"
            source = kernel_source(name, self._input_names, input_dtypes, self._output_names, output_dtypes, template,
                                   self._body)
            try:
                self._compiled[key] = (name, compile_cuda(name, source))
            except NvrtcError as error:  # e.g. CUDA's headers not where they were looked for: slow, not broken
                warnings.warn(f"semantic: {error}\nMLX compiles {self._name} instead (about 1.5 s at its first "
                              "launch in every process)", RuntimeWarning, stacklevel=3)
                self._compiled[key] = None
            return self._compiled[key]

    @functools.lru_cache(maxsize=None)
    def _mlx_kernel(self):
        return mx.fast.cuda_kernel(name=self._name, input_names=self._input_names, output_names=self._output_names,
                                   source=self._body)


class NvrtcError(RuntimeError):
    """NVRTC could not compile a kernel's source (the log says why: a header not found, or a bug in the source)."""


def compile_cuda(name: str, source: str) -> bytes:
    """``source`` compiled by NVRTC into a cubin for this process's GPU."""
    lib = _nvrtc()
    info = mx.device_info()
    major, minor = int(info["compute_capability_major"]), int(info["compute_capability_minor"])
    # As MLX compiles its own: with the architecture-specific features ("a") of the GPUs that have them.
    tag = "a" if major * 10 + minor in (90, 100, 121) else ""
    options = [f"--gpu-architecture=sm_{major}{minor}{tag}".encode()]
    options += [f"--include-path={path}".encode() for path in _include_paths()]
    program = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(program), source.encode(), f"{name}.cu".encode(), 0, None, None))
    try:
        if lib.nvrtcCompileProgram(program, len(options), (ctypes.c_char_p * len(options))(*options)) != 0:
            raise NvrtcError(f"NVRTC could not compile {name} ({b' '.join(options).decode()}):\n{_log(lib, program)}")
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetCUBINSize(program, ctypes.byref(size)))
        binary = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetCUBIN(program, binary))
        return binary.raw
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(program))


def _log(lib, program) -> str:
    size = ctypes.c_size_t()
    if lib.nvrtcGetProgramLogSize(program, ctypes.byref(size)) != 0 or size.value <= 1:
        return ""
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(program, log)
    return log.value.decode(errors="replace").strip()


def _check(lib, result: int) -> None:
    if result != 0:
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        raise NvrtcError(f"NVRTC: {lib.nvrtcGetErrorString(result).decode()}")


def _mlx_site() -> str:
    """The folder MLX is installed in (site-packages), where its wheel's CUDA libraries and headers are."""
    return os.path.dirname(os.path.dirname(mx.__file__))


@functools.lru_cache(maxsize=None)
def _nvrtc() -> Optional[ctypes.CDLL]:
    """NVRTC, which MLX's CUDA backend has loaded already (found by its name), else found beside MLX's wheel or
    CUDA's install; None, with a warning, where there is none."""
    candidates = ["libnvrtc.so.13", "libnvrtc.so.12"]
    for root in (os.path.join(_mlx_site(), "nvidia", "*", "lib"), os.path.join(_cuda_home(), "lib64")):
        candidates += sorted(glob.glob(os.path.join(root, "libnvrtc.so*")))
    for candidate in candidates:
        try:
            lib = ctypes.CDLL(candidate)
        except OSError:
            continue
        lib.nvrtcCreateProgram.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p, ctypes.c_char_p,
                                           ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        lib.nvrtcCompileProgram.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
        return lib
    warnings.warn("semantic: NVRTC not found; MLX compiles the rebuild's CUDA kernels instead (about 1.5 s at the "
                  "first launch of each in every process)", RuntimeWarning, stacklevel=2)
    return None


def _cuda_home() -> str:
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"


@functools.lru_cache(maxsize=None)
def _include_paths() -> Tuple[str, ...]:
    """Where ``cuda_bf16.h`` is: the CUDA headers of MLX's wheel (as MLX finds them), else of CUDA's install."""
    for pattern in (os.path.join(_mlx_site(), "nvidia", "*", "include"), os.path.join(_cuda_home(), "include")):
        for path in sorted(glob.glob(pattern)):
            if os.path.exists(os.path.join(path, "cuda_bf16.h")):
                return (path,)
    return ()
