"""The block pool's accounting: handing out and taking back blocks (no bytes copied)."""

from .common import cases

AGENT = "bench"


class PoolAllocate:
    """``pool.allocate(n, agent)`` of n free blocks."""

    version = 1
    params = (list(cases.POOL_OPERATION_BLOCKS),)
    param_names = ("blocks",)
    repeat = (20, 100, 2.0)  # microseconds per call: many cheap samples

    def setup(self, blocks):
        self.pool = cases.free_pool()
        self.held = []

    def time_allocate(self, blocks):
        self.held = self.pool.allocate(blocks, AGENT)

    def teardown(self, blocks):
        self.pool.release_blocks(self.held, AGENT)  # every sample starts from a free pool


class PoolRelease:
    """``pool.release_blocks(ids, agent)`` of n blocks, each referenced once."""

    version = 1
    params = (list(cases.POOL_OPERATION_BLOCKS),)
    param_names = ("blocks",)
    repeat = (20, 100, 2.0)

    def setup(self, blocks):
        self.pool = cases.free_pool()
        self.held = self.pool.allocate(blocks, AGENT)

    def time_release(self, blocks):
        self.pool.release_blocks(self.held, AGENT)
        self.held = []

    def teardown(self, blocks):
        self.pool.release_blocks(self.held, AGENT)  # empty unless setup ran without a sample after it
