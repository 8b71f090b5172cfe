"""Storing an agent's mlx-lm cache as new pool blocks, after the agent spoke."""

from .common import CopyBenchmark, cases


class Extract(CopyBenchmark):
    """``cache_to_blocks`` of a whole context into fresh blocks (nothing shared with a source)."""

    spare_blocks = True

    def operation(self):
        return cases.extract(self.ctx)

    def time_extract(self, *params):
        self.measure()

    def peakmem_extract(self, *params):
        self.measure_peak()
