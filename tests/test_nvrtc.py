"""Kernels compiled here by NVRTC and launched precompiled (CUDA only: elsewhere the rebuild never launches them)."""

import warnings

import mlx.core as mx
import numpy as np
import pytest

from semantic.adapters import nvrtc

pytestmark = pytest.mark.skipif(not (mx.default_device() == mx.gpu and mx.cuda.is_available()),
                                reason="CUDA kernels: a CUDA device only")

SCALE = """
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < N) y[i] = x[i] * (T)FACTOR;
"""


def scaled(kernel, x, factor):
    (y,) = kernel(inputs=[x], template=[("T", x.dtype), ("N", x.size), ("FACTOR", factor)], grid=(x.size, 1, 1),
                  threadgroup=(128, 1, 1), output_shapes=[x.shape], output_dtypes=[x.dtype])
    mx.eval(y)
    return np.array(y)


def test_a_precompiled_kernel_computes_what_its_body_says_for_each_dtype_and_template():
    kernel = nvrtc.PrecompiledKernel("scale_test", ["x"], ["y"], SCALE)
    for dtype, factor in ((mx.float32, 3), (mx.float32, 5), (mx.int32, 3), (mx.int16, 2)):
        x = mx.arange(1000).astype(dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # NVRTC compiled it: no fallback
            np.testing.assert_array_equal(scaled(kernel, x, factor), np.array(x) * factor)
    assert len(kernel._compiled) == 4 and all(v is not None for v in kernel._compiled.values())


def test_a_kernel_nvrtc_cannot_compile_is_compiled_by_mlx_with_a_warning(monkeypatch):
    def fail(name, source):
        raise nvrtc.NvrtcError(f"NVRTC could not compile {name}: cuda_bf16.h not found")
    monkeypatch.setattr(nvrtc, "compile_cuda", fail)
    kernel = nvrtc.PrecompiledKernel("scale_fallback_test", ["x"], ["y"], SCALE)
    x = mx.arange(300).astype(mx.float32)
    with pytest.warns(RuntimeWarning, match="MLX compiles scale_fallback_test instead"):
        np.testing.assert_array_equal(scaled(kernel, x, 7), np.array(x) * 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per variant
        np.testing.assert_array_equal(scaled(kernel, x + 1, 7), (np.array(x) + 1) * 7)
