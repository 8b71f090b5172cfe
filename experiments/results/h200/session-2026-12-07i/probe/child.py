"""One crash-test child's steps, timed: python start to each step (s)."""
import json, os, sys, time
T0 = float(sys.argv[2]); marks = {"exec": time.time() - T0}
import mlx.core as mx
marks["import_mlx"] = time.time() - T0
mx.eval(mx.zeros(1)); marks["first_eval"] = time.time() - T0
import test_persistence_support as support
marks["import_support"] = time.time() - T0
store = support.open_store(sys.argv[1], support.CRASH_SPEC, support.CRASH_POOL_BLOCKS)
marks["open_store"] = time.time() - T0
prof = None
if os.environ.get("PROBE_PROFILE"):
    import cProfile; prof = cProfile.Profile(); prof.enable()
handles = [support.random_handle(store.pool, "agent", support.CRASH_TOKENS, s) for s in (2, 1)]
marks["handles"] = time.time() - T0
for i in range(4):
    store.save(handles[i % 2]); marks[f"save{i}"] = time.time() - T0
if prof:
    prof.disable(); import pstats, io; s = io.StringIO(); pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
    print(s.getvalue()[-3500:], file=sys.stderr)
print(json.dumps({k: round(v, 3) for k, v in marks.items()}), flush=True)
if os.environ.get("PROBE_WAIT"):
    os.write(1, b"ready\n"); time.sleep(60)
