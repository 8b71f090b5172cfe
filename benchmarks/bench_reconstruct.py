"""Rebuilding an agent's mlx-lm cache from pool blocks, before the agent speaks again."""

from .common import CopyBenchmark, cases, require_selected


class Reconstruct(CopyBenchmark):
    """``blocks_to_cache``: the whole context, one evaluated cache object per layer.

    A context of one block per layer (the 1-block cases) is rebuilt as views of the pool's arrays: no
    bytes move, so its ``track_`` ratios against a copy measure fixed costs only. The copy moved to
    mlx-lm's merge of the cache into its batch, which ``bench_engine.WarmResumeVsHotPath`` includes
    (as the hot path it is compared with pays the same merge)."""

    def operation(self):
        return cases.reconstruct(self.ctx)

    def time_reconstruct(self, *params):
        self.measure()

    def peakmem_reconstruct(self, *params):
        self.measure_peak()


class ReconstructPaddedVsBlocks:
    """612 tokens rebuilt from 3 blocks per layer, against copying each layer's monolithic cache
    padded to 768 slots in one piece: the same bytes, gathered vs copied layer by layer."""

    # Full-attention geometries (a padded KVCache buffer is what they hold), at their own layer count.
    version = 1
    params = (["smollm2-135m", "gemma3-12b-full"],)
    param_names = ("geometry",)

    def setup(self, geometry):
        require_selected(geometry, {"smollm2-135m"}, "padded vs blocks on")  # gemma3: 288 MiB a call
        self.ctx = cases.padded_context(geometry)

    def time_blocks(self, geometry):
        cases.evaluate(cases.reconstruct(self.ctx))

    def time_padded(self, geometry):
        cases.evaluate(cases.padded_reconstruct(self.ctx))
