"""Quantized blocks (q8, q4) against dense ones: agents per GiB, rebuild and store time, warm TTFT.

Every copy track is a ratio against the same-run plain copy of the *dense* context's bytes, so the
formats compare on one scale: a ratio above the dense one means the format rebuilds faster than dense.
Commits without block formats skip every format but dense.
"""

from .common import cases, median_of_runs

FORMATS = ("dense", "q8", "q4")
GIB = 1 << 30
CAPACITY_TOKENS = 4096
COPY_CASE = ("smollm2-135m", 8, 30)  # the plan's 8 blocks x 30 layers
TTFT_MODEL, TTFT_TOKENS = "tiny-llama", 1024


def _require_format(block_format: str) -> None:
    if block_format == "dense":
        return
    try:
        import semantic.domain.block_format  # noqa: F401
    except ImportError:
        raise NotImplementedError("this commit has no quantized blocks") from None


class QuantizedCapacity:
    """Agents of 4,096 tokens a 1 GiB pool holds, per format (scales and biases included)."""

    version = 1
    params = (list(FORMATS), ["smollm2-135m", "gemma3-12b-sliding"])
    param_names = ("block_format", "geometry")

    def setup(self, block_format, geometry):
        _require_format(block_format)
        spec = cases.ModelCacheSpec.preset(cases.GEOMETRIES[geometry])
        self.dense_bytes = spec.bytes_per_agent(CAPACITY_TOKENS)
        self.bytes = cases.with_block_format(spec, block_format).bytes_per_agent(CAPACITY_TOKENS)

    def track_agents_per_gib(self, block_format, geometry):
        return GIB // self.bytes

    track_agents_per_gib.unit = "agents"

    def track_agents_vs_dense(self, block_format, geometry):
        """Agents per byte against dense (before rounding down to whole agents)."""
        return self.dense_bytes / self.bytes

    track_agents_vs_dense.unit = "ratio"


class QuantizedCopies:
    """``blocks_to_cache`` (rebuild: dequantized into the cache layout) and ``cache_to_blocks`` (store:
    quantize and write) of 8 blocks x 30 layers of smollm2-135m's geometry, per format."""

    version = 1
    params = (list(FORMATS),)
    param_names = ("block_format",)
    result = None

    def setup(self, block_format):
        _require_format(block_format)
        geometry, blocks, layers = COPY_CASE
        tokens = blocks * cases.spec_for(geometry, layers).block_size
        self.ctx = cases.token_context(geometry, tokens, layers, spare_blocks=blocks, block_format=block_format)
        self.dense_bytes = cases.spec_for(geometry, layers).bytes_per_agent(tokens)

    def teardown(self, block_format):
        if getattr(self.result, "release", None) is not None:
            self.result.release()
        self.result = None

    def time_rebuild(self, block_format):
        self.result = cases.reconstruct(self.ctx)
        cases.evaluate(self.result)

    def time_store(self, block_format):
        self.result = cases.extract(self.ctx)

    def track_bytes_at_rest(self, block_format):
        """Bytes a rebuild reads from the pool (a store writes as many)."""
        return self.ctx.handle.nbytes

    track_bytes_at_rest.unit = "bytes"

    def track_rebuild_copy_ratio(self, block_format):
        """Plain copy of the dense context's bytes, same run, over the rebuild's time."""
        return cases.throughput(lambda: cases.reconstruct(self.ctx), self.dense_bytes, repeat=5)[2]

    track_rebuild_copy_ratio.unit = "ratio"

    def track_store_copy_ratio(self, block_format):
        return cases.throughput(lambda: cases.extract(self.ctx), self.dense_bytes, repeat=5)[2]

    track_store_copy_ratio.unit = "ratio"


class QuantizedWarmTTFT:
    """Warm time to first token (a stored 1,024-token context resumed, one new token) per pool format,
    tiny-llama (random weights)."""

    version = 1
    params = (list(FORMATS),)
    param_names = ("block_format",)
    timeout = 600

    def setup(self, block_format):
        _require_format(block_format)
        self.engine = cases.engine(TTFT_MODEL, "bfloat16", block_format)
        self.ctx = cases.stored_context(TTFT_MODEL, TTFT_TOKENS, "bfloat16", block_format)
        self.new_token = cases.prompt_tokens(self.engine, 1, seed=1)

    def track_warm(self, block_format):
        return median_of_runs(lambda: cases.time_to_first_token(self.engine, self.new_token, cache=self.ctx), 9, 10.0)

    track_warm.unit = "seconds"
