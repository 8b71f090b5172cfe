"""An agent's turn as the cache sees it: blocks -> cache -> new blocks, without a model."""

from .common import CopyBenchmark, cases


class RoundTrip(CopyBenchmark):
    """``blocks_to_cache`` then ``cache_to_blocks`` of the result: twice the context's bytes."""

    spare_blocks = True
    copies = 2
    resident_copies = 4  # pool with room for two copies, source caches, rebuilt caches

    def operation(self):
        return cases.round_trip(self.ctx)

    def time_round_trip(self, *params):
        self.measure()

    def peakmem_round_trip(self, *params):
        self.measure_peak()
