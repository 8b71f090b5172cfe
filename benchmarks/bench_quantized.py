"""Quantized blocks (q8, q4) against dense ones: bytes per agent, rebuild and store time, warm TTFT.

The copy ratios are against the same-run plain copy of the *dense* context's bytes, so the formats
compare on one scale: a format whose ratio is above dense's rebuilds (stores) faster than dense.
Agents a 1 GiB pool holds = 2**30 // ``track_bytes_per_agent`` (``docs/results/exp-014.md``).
Commits without block formats skip every format but dense.
"""

from .common import cases, median_of_runs

FORMATS = ("dense", "q8", "q4")
CAPACITY_TOKENS = 4096
COPY_CASE = ("smollm2-135m", 8, 30)  # the plan's 8 blocks x 30 layers
TTFT_MODEL, TTFT_TOKENS = "tiny-llama", 1024


def require_format(block_format: str) -> None:
    if block_format == "dense":
        return
    try:
        import semantic.domain.block_format  # noqa: F401
    except ImportError:
        raise NotImplementedError("this commit has no quantized blocks") from None


class QuantizedCapacity:
    """Bytes a 4,096-token agent takes at rest, per format (group scales and biases included)."""

    version = 1
    params = (list(FORMATS), ["smollm2-135m", "gemma3-12b-sliding"])
    param_names = ("block_format", "geometry")

    def setup(self, block_format, geometry):
        require_format(block_format)
        spec = cases.ModelCacheSpec.preset(cases.GEOMETRIES[geometry])
        self.bytes = cases.with_block_format(spec, block_format).bytes_per_agent(CAPACITY_TOKENS)

    def track_bytes_per_agent(self, block_format, geometry):
        return self.bytes

    track_bytes_per_agent.unit = "bytes"


class _QuantizedCopy:
    """8 blocks x 30 layers of smollm2-135m's geometry in blocks of each format (a base: asv skips it)."""

    version = 1
    params = (list(FORMATS),)
    param_names = ("block_format",)
    result = None

    def setup(self, block_format):
        require_format(block_format)
        geometry, blocks, layers = COPY_CASE
        self.ctx = cases.context(geometry, blocks, layers, blocks, block_format)
        self.dense_bytes = cases.spec_for(geometry, layers).bytes_per_agent(blocks * self.ctx.spec.block_size)

    def teardown(self, block_format):
        if getattr(self.result, "release", None) is not None:
            self.result.release()
        self.result = None


class QuantizedRebuild(_QuantizedCopy):
    """``blocks_to_cache``: dequantized into the cache layout the engine uses."""

    def time_rebuild(self, block_format):
        self.result = cases.reconstruct(self.ctx)
        cases.evaluate(self.result)

    def track_memcpy_ratio(self, block_format):
        """Plain copy of the dense context's bytes, same run, over the rebuild's time."""
        return cases.throughput(lambda: cases.reconstruct(self.ctx), self.dense_bytes, repeat=5)[2]

    track_memcpy_ratio.unit = "ratio"

    def track_bytes_at_rest(self, block_format):
        """Bytes of the context in the pool: what a rebuild reads (and a store writes)."""
        return self.ctx.handle.nbytes

    track_bytes_at_rest.unit = "bytes"


class QuantizedStore(_QuantizedCopy):
    """``cache_to_blocks`` of the whole context into new blocks: quantize once, write packed."""

    def time_store(self, block_format):
        self.result = cases.extract(self.ctx)

    def track_memcpy_ratio(self, block_format):
        return cases.throughput(lambda: cases.extract(self.ctx), self.dense_bytes, repeat=5)[2]

    track_memcpy_ratio.unit = "ratio"


class QuantizedWarmTTFT:
    """Warm time to first token (a stored 1,024-token context resumed, one new token) per pool format,
    tiny-llama (random weights)."""

    version = 1
    params = (list(FORMATS),)
    param_names = ("block_format",)
    timeout = 600

    def setup(self, block_format):
        require_format(block_format)
        self.engine = cases.engine(TTFT_MODEL, "bfloat16", block_format)
        self.ctx = cases.stored_context(TTFT_MODEL, TTFT_TOKENS, "bfloat16", block_format)
        self.new_token = cases.prompt_tokens(self.engine, 1, seed=1)

    def track_warm(self, block_format):
        return median_of_runs(lambda: cases.time_to_first_token(self.engine, self.new_token, cache=self.ctx), 9, 10.0)

    track_warm.unit = "seconds"
