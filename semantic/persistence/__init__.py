"""Agents' KV contexts kept across process restarts: a crash-safe, checked on-disk store with a memory tier.

See ``store`` for the tiers, ``file_format`` for the file, and docs/persistence.md for both.
"""

from semantic.persistence.errors import (
    CacheBudgetWarning,
    CacheCorruptionError,
    CacheLockTimeoutError,
    CachePersistenceError,
    CacheReadError,
    CacheSyncError,
    CacheWriteError,
    IncompatibleCacheFileError,
    InvalidAgentIdError,
    UnknownAgentError,
)
from semantic.persistence.fingerprint import model_fingerprint
from semantic.persistence.store import AgentCacheStore

__all__ = [
    "AgentCacheStore",
    "model_fingerprint",
    "CachePersistenceError",
    "CacheBudgetWarning",
    "CacheCorruptionError",
    "CacheLockTimeoutError",
    "CacheReadError",
    "CacheSyncError",
    "CacheWriteError",
    "IncompatibleCacheFileError",
    "InvalidAgentIdError",
    "UnknownAgentError",
]
