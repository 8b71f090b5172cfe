"""Entities: a block of one layer's KV cache, and an agent's whole context as blocks."""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Dict, List, Optional, Sequence, Tuple

from semantic.domain.errors import ReleasedHandleError
from semantic.domain.request_checks import checked_int

if TYPE_CHECKING:  # pragma: no cover
    import mlx.core as mx

    from semantic.domain.services import BlockPool
    from semantic.domain.value_objects import ModelCacheSpec


@dataclass(frozen=True)
class KVBlock:
    """One pool block as seen from one context: ``block_size`` token slots of one layer.

    ``index`` is the block's position in the sequence (it covers tokens
    ``[index * block_size, (index + 1) * block_size)``); ``first_token`` and
    ``token_count`` say which of those slots hold this context's tokens.
    """

    block_id: int
    layer: int
    index: int
    first_token: int
    token_count: int
    pool: "BlockPool"

    @property
    def k_data(self) -> "mx.array":
        """Keys of this block, ``[n_kv_heads, block_size, k_head_dim]`` (a view into the pool)."""
        return self.pool.block_keys(self.block_id)

    @property
    def v_data(self) -> "mx.array":
        return self.pool.block_values(self.block_id)


_MEMO_ENTRIES = 4


class AgentBlocks:
    """An agent's context held as pool blocks: per layer the blocks it can still see, plus its token ids.

    A handle owns one reference to each of its blocks. The blocks go back to the
    pool when the handle is released, explicitly with :meth:`release` (or a
    ``with`` block), or when the last Python reference to the handle is dropped.
    Blocks are immutable once written, so any number of handles may share them:
    a snapshot and its continuation, or two agents forked from one context.

    Create handles through the pool or the engine, never directly.
    """

    __slots__ = ("_pool", "_agent_id", "_token_ids", "_layer_block_ids", "_flat_ids", "_memo", "computed_by",
                 "vouched_for", "__weakref__")

    def __init__(
        self,
        pool: "BlockPool",
        agent_id: str,
        token_ids: Sequence[int],
        layer_block_ids: Sequence[Sequence[int]],
        *,
        normalized: bool = False,
    ):
        # Called by BlockPool with the references already taken on this handle's behalf.
        self._pool = pool
        self._agent_id = agent_id
        # ``normalized``: tuples of plain ints (another handle's, or a builder's checked lists), kept as
        # they are (a long context has thousands of tokens and ~1,000 blocks, and every resume shares
        # its source handle).
        if normalized:
            self._token_ids: Tuple[int, ...] = token_ids
            self._layer_block_ids: Optional[Tuple[Tuple[int, ...], ...]] = layer_block_ids
        else:
            self._token_ids = tuple(map(int, token_ids))
            self._layer_block_ids = tuple(map(tuple, layer_block_ids))
        # Every reference, one list: what the pool attributes to the agent and what it gives back on release
        # (or once the handle is collected: the pool watches it).
        self._flat_ids: Optional[List[int]] = list(itertools.chain.from_iterable(self._layer_block_ids))
        self._memo: Dict[object, object] = {}
        # A weak reference to the model whose engine computed these keys and values: another model's engine
        # on the same pool refuses them. None: not known (stored by hand, or read from a file).
        self.computed_by: Optional[weakref.ref] = None
        # The model fingerprint of the AgentCacheStore that handed these out (get, load) with computed_by
        # cleared: an engine whose model has another fingerprint refuses them.
        self.vouched_for: Optional[str] = None

    # ---- identity -----------------------------------------------------------------------------
    @property
    def pool(self) -> "BlockPool":
        return self._pool

    # Read-only: the pool finds a handle's references under its agent (an agent changed, a release gave back
    # nothing), and the engine checks the ids against the vocabulary once per handle.
    @property
    def agent_id(self) -> str:
        return self._agent_id

    @property
    def token_ids(self) -> Tuple[int, ...]:
        return self._token_ids

    @property
    def spec(self) -> "ModelCacheSpec":
        return self._pool.spec

    @property
    def released(self) -> bool:
        return self._layer_block_ids is None

    @property
    def num_tokens(self) -> int:
        """Tokens in this context; every one of them has its keys and values in the blocks."""
        return len(self.token_ids)

    total_tokens = num_tokens

    # ---- blocks -------------------------------------------------------------------------------
    def layer_block_ids(self, layer: int) -> Tuple[int, ...]:
        ids = self._checked()
        if type(layer) is not int or not 0 <= layer < len(ids):  # -1 would read the last layer
            layer = checked_int("layer", layer, 0, len(ids) - 1)
        return ids[layer]

    @property
    def all_block_ids(self) -> Tuple[Tuple[int, ...], ...]:
        return self._checked()

    @property
    def num_blocks(self) -> int:
        """Block references this handle holds, over all layers."""
        return sum(len(ids) for ids in self._checked())

    @property
    def nbytes(self) -> int:
        """Bytes of the blocks this handle refers to (shared blocks counted in full)."""
        return self.num_blocks * self.spec.bytes_per_block_per_layer

    @property
    def blocks(self) -> Dict[int, List[KVBlock]]:
        """Layer index -> that layer's blocks, oldest first."""
        spec, n = self.spec, self.num_tokens
        out: Dict[int, List[KVBlock]] = {}
        for layer, ids in enumerate(self._checked()):
            start, end = spec.visible_range(layer, n)
            first = spec.layer_block_range(layer, n)[0]
            layer_blocks = []
            for k, block_id in enumerate(ids):
                index = first + k
                lo = max(start, index * spec.block_size)
                hi = min(end, (index + 1) * spec.block_size)
                layer_blocks.append(KVBlock(block_id, layer, index, lo - index * spec.block_size, hi - lo, self._pool))
            out[layer] = layer_blocks
        return out

    def memo(self, key, make):
        """``make()``, computed once per ``key`` for this handle and its shares (the same blocks and tokens):
        what derives from them (e.g. a rebuild's row index) need not be recomputed on every resume. Keeps
        the last few keys."""
        self._checked()
        try:
            return self._memo[key]
        except KeyError:
            if len(self._memo) >= _MEMO_ENTRIES:
                self._memo.clear()
            value = self._memo[key] = make()
            return value

    # ---- lifetime -----------------------------------------------------------------------------
    def share(self, agent_id: Optional[str] = None) -> "AgentBlocks":
        """A new handle on the same blocks (reference counts +1), e.g. to fork this context to another agent."""
        return self._pool.share(self, agent_id)

    def release(self) -> None:
        """Give this handle's references back to the pool. Releasing twice raises ``ReleasedHandleError``."""
        self._pool.release(self)

    def __enter__(self) -> "AgentBlocks":
        return self

    def __exit__(self, *exc) -> None:
        if not self.released:
            self.release()

    def _checked(self) -> Tuple[Tuple[int, ...], ...]:
        ids = self._layer_block_ids
        if ids is None:
            raise ReleasedHandleError(
                f"AgentBlocks of agent {self.agent_id!r} was already released; "
                "keep a handle (or call .share()) for as long as you need the context"
            )
        return ids

    def __repr__(self) -> str:
        state = "released" if self.released else f"{self.num_blocks} blocks"
        return f"AgentBlocks(agent_id={self.agent_id!r}, tokens={self.num_tokens}, {state})"
