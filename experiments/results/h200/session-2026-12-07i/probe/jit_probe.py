"""Where a custom kernel's first launch goes in a fresh process: MLX's cuda_kernel vs our own NVRTC + precompiled."""
import ctypes, glob, json, os, site, sys, time
t0 = time.time()
import mlx.core as mx
mx.eval(mx.zeros(4) + 1); mx.synchronize()
res = {"start": round(time.time() - t0, 3), "info": str(mx.device_info())}
mode = sys.argv[1]
x = mx.arange(1024, dtype=mx.float32); mx.eval(x)
def timed(fn):
    t = time.perf_counter(); out = fn(); mx.eval(out); mx.synchronize(); return out, round(time.perf_counter() - t, 4)
if mode == "mlx":
    k = mx.fast.cuda_kernel(name="probe_twice", input_names=["x"], output_names=["out"],
                            source="int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < N) out[i] = x[i] * T(2);")
    call = lambda: k(inputs=[x], template=[("T", mx.float32), ("N", 1024)], grid=(1024, 1, 1), threadgroup=(256, 1, 1),
                     output_shapes=[(1024,)], output_dtypes=[mx.float32])[0]
    out, res["first"] = timed(call); _, res["second"] = timed(call)
elif mode in ("nvrtc", "nvrtc_bf16"):
    libs = sorted(glob.glob(site.getsitepackages()[0] + "/nvidia/**/libnvrtc.so*", recursive=True))
    res["libs"] = libs[:3]
    t = time.perf_counter()
    nv = ctypes.CDLL(libs[0])
    prog = ctypes.c_void_p()
    head = '#include <cuda_bf16.h>\n' if mode == "nvrtc_bf16" else ''
    src = (head + 'extern "C" __global__ void probe_twice(const float* x, float* out, int n) {'
           ' int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < n) out[i] = x[i] * 2.0f; }').encode()
    assert nv.nvrtcCreateProgram(ctypes.byref(prog), src, b"probe.cu", 0, None, None) == 0
    inc = [p for p in glob.glob(site.getsitepackages()[0] + "/nvidia/**/include", recursive=True) if os.path.exists(p + "/cuda_bf16.h")]
    res["inc"] = inc[:2]
    opts = [b"--gpu-architecture=sm_90"] + [f"--include-path={p}".encode() for p in inc[:1]]
    arr = (ctypes.c_char_p * len(opts))(*opts)
    rc = nv.nvrtcCompileProgram(prog, len(opts), arr)
    if rc:
        n = ctypes.c_size_t(); nv.nvrtcGetProgramLogSize(prog, ctypes.byref(n)); log = ctypes.create_string_buffer(n.value)
        nv.nvrtcGetProgramLog(prog, log); print("compile failed", rc, log.value.decode()[:2000]); sys.exit(1)
    size = ctypes.c_size_t(); assert nv.nvrtcGetCUBINSize(prog, ctypes.byref(size)) == 0
    buf = ctypes.create_string_buffer(size.value); assert nv.nvrtcGetCUBIN(prog, buf) == 0
    cubin = buf.raw; res["compile"] = round(time.perf_counter() - t, 4); res["cubin_bytes"] = len(cubin)
    call = lambda: mx.fast.precompiled_cuda_kernel(name="probe_twice", compiled_source=cubin, inputs=[x], output_shapes=[(1024,)],
                                                   output_dtypes=[mx.float32], scalars=[1024], grid=(1024, 1, 1), threadgroup=(256, 1, 1))[0]
    out, res["first"] = timed(call); _, res["second"] = timed(call)
res["correct"] = bool(mx.array_equal(out, x * 2).item())
res["total"] = round(time.time() - t0, 3)
print(mode, json.dumps(res))
