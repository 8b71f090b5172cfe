"""Engine driven from one worker thread, then the process exits: rc 134 ("terminate called without an active
exception") some of the time; argv[1] == "clear": the worker calls mx.clear_streams() before it ends."""
import sys, threading
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "tests"))
import semantic  # noqa
import mlx.core as mx
from conftest import make_engine
from semantic.testing.local_models import load_local_model
STORY = "the quick brown fox jumps over the lazy dog " * 10
def work():
    e = make_engine(load_local_model("tiny-llama", dtype="float32"), total_blocks=64)
    for _ in range(3):
        e.generate("a", STORY, max_tokens=8).blocks.release()
    if sys.argv[1] == "clear":
        mx.clear_streams()
t = threading.Thread(target=work); t.start(); t.join()
print("done", flush=True)
