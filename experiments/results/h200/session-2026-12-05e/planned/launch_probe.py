"""What one custom-kernel launch costs the CPU, by inputs and by whether the kernel reads their strides: a kernel
that writes one byte, N evaluated inputs [1, 3, 1024, 64] bf16. Medians (us) of: building the graph node (the
kernel call alone), that plus mx.async_eval, a whole call with synchronize, and a burst of 20 (per launch).
Usage: launch_probe.py OUT"""
import json, sys, time
import mlx.core as mx
import numpy as np


def med(fn, n=150, warm=20):
    s = []
    for i in range(n + warm):
        mx.synchronize(); t = time.perf_counter(); fn(); s.append(time.perf_counter() - t)
    return round(float(np.median(s[warm:])) * 1e6, 1)


def synced(fn, n=150, warm=20):
    s = []
    for i in range(n + warm):
        mx.synchronize(); t = time.perf_counter(); out = fn(); mx.eval(out); mx.synchronize(); s.append(time.perf_counter() - t)
    return round(float(np.median(s[warm:])) * 1e6, 1)


def burst(fn, k=20, n=15):
    s = []
    for i in range(n + 3):
        mx.synchronize(); t = time.perf_counter(); outs = [fn() for _ in range(k)]; mx.eval(outs); mx.synchronize()
        s.append((time.perf_counter() - t) / k)
    return round(float(np.median(s[3:])) * 1e6, 1)


results = {}
for n in (2, 8, 32, 64):
    arrays = [mx.zeros((1, 3, 1024, 64), mx.bfloat16) + i for i in range(n)]
    mx.eval(arrays)
    for strides in (False, True):
        body = " + ".join(f"in{i}_strides[2]" for i in range(n)) if strides else "1"
        source = f"if (threadIdx.x == 0 && blockIdx.x == 0) {{ done[0] = (uint8_t)({body}); }}"
        kernel = mx.fast.cuda_kernel(name=f"launch_probe_{n}_{int(strides)}", input_names=[f"in{i}" for i in range(n)],
                                     output_names=["done"], source=source, ensure_row_contiguous=False)
        call = lambda: kernel(inputs=arrays, template=[("T", mx.uint16)], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                              output_shapes=[(1,)], output_dtypes=[mx.uint8])[0]
        row = {"graph_only": med(call), "graph_and_async_eval": med(lambda: mx.async_eval(call())),
               "synced": synced(call), "burst": burst(call)}
        results[f"{n}_inputs_{'strides' if strides else 'pointers'}"] = row
        print(n, strides, row, flush=True)
# The store's launch also takes a description: a fresh mx.as_strided view (10 dims) per call, a graph node of
# its own. Its cost: 64 inputs plus such a view made per call, against the same view made and evaluated once.
arrays = [mx.zeros((1, 3, 1024, 64), mx.bfloat16) + i for i in range(64)]
base = mx.zeros((1,), mx.int32)
mx.eval(arrays, base)
kernel = mx.fast.cuda_kernel(name="launch_probe_desc", input_names=[f"in{i}" for i in range(64)] + ["desc"],
                             output_names=["done"], source="if (threadIdx.x == 0 && blockIdx.x == 0) { done[0] = (uint8_t)desc_strides[0]; }",
                             ensure_row_contiguous=False)
numbers = (7, 0, 0, 1024, 4, 0, 0, 1024, 4, 0)
made_once = mx.as_strided(base, (1,) * 10, numbers); mx.eval(made_once)
for name, desc in (("desc_fresh", lambda: mx.as_strided(base, (1,) * 10, numbers)), ("desc_made_once", lambda: made_once)):
    call = lambda: kernel(inputs=arrays + [desc()], template=[("T", mx.uint16)], grid=(32, 1, 1), threadgroup=(32, 1, 1),
                          output_shapes=[(1,)], output_dtypes=[mx.uint8])[0]
    row = {"graph_only": med(call), "graph_and_async_eval": med(lambda: mx.async_eval(call())),
           "synced": synced(call), "burst": burst(call)}
    results[name] = row
    print(name, row, flush=True)
one = mx.zeros((1,), mx.uint16); mx.eval(one)
results["sync_only"] = med(lambda: None)
results["copy_tiny_synced"] = synced(lambda: one | 0)
print(results["sync_only"], results["copy_tiny_synced"])
json.dump(results, open(f"{sys.argv[1]}/launch_probe.json", "w"), indent=1)
