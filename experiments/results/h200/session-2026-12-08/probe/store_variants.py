"""Which store variants does an engine launch? Records (n writes, described?) per store on CPU."""
import collections
from semantic.testing.local_models import load_local_model
from semantic.domain import services
from semantic.domain.services import BlockPool
from semantic.domain.value_objects import ModelCacheSpec
from semantic.application.batch_engine import BlockPoolBatchEngine
seen = collections.Counter()
orig = services.BlockPool._write_checked
def rec(self, writes, ids, one_run=False):
    d = services._described_writes(writes, ids, one_run) if ids else None
    seen[(self.spec.n_layers, len(writes), d is not None, len(d[1]) if d else None)] += 1
    return orig(self, writes, ids, one_run)
services.BlockPool._write_checked = rec
for preset in ("tiny-llama", "tiny-gemma3", "tiny-gemma3-w512"):
    model, tok = load_local_model(preset, dtype="float32")
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, total_blocks=spec.blocks_per_agent(4000) * 4)
    eng = BlockPoolBatchEngine(model, tok, pool)
    handles = {}
    for turn in range(4):
        for a in ("x", "y"):
            prompt = list(range(5, 5 + 150 * (turn + 1) + (7 if a == "y" else 0)))
            eng.submit(a, prompt[-150:] if a in handles else prompt, cache=handles.get(a), max_tokens=40)
        for c in eng.step():
            handles[c.agent_id] = c.blocks
    print(preset, dict(seen)); seen.clear()
