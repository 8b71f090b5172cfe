"""Typed errors of the on-disk agent cache store.

Like every ``SemanticError``: whatever raises one of these has changed nothing,
neither the pool (no block taken, no reference moved) nor any file.
"""

from semantic.domain.errors import IncompatibleCacheError, InvalidRequestError, SemanticError


class CachePersistenceError(SemanticError):
    """Base class of everything ``semantic.persistence`` raises on purpose."""


class InvalidAgentIdError(CachePersistenceError, InvalidRequestError):
    """An agent id that cannot name a file in the store's directory (``../x``, ``/abs``, NUL, too long, ...)."""


class UnknownAgentError(CachePersistenceError, KeyError):
    """The store holds no context for this agent, neither in memory nor on disk."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class CacheCorruptionError(CachePersistenceError):
    """A cache file is damaged: truncated, a flipped bit, a header that is not JSON, ..."""


class IncompatibleCacheFileError(CachePersistenceError, IncompatibleCacheError):
    """A sound file that this store cannot use: another model, another format version, not an agent cache."""


class CacheReadError(CachePersistenceError):
    """The agent's file exists but could not be opened or read (permissions, I/O error). Unlike
    ``CacheCorruptionError`` this says nothing about its content: the file is left as it is, and may read later."""


def read_error(where, exc: OSError) -> CacheReadError:
    """The error for an ``OSError`` raised reading the cache file ``where``."""
    return CacheReadError(
        f"could not read {where}: {exc.strerror or exc}; the file was left as it is (an I/O error, not damage "
        "found in it): retry once the cause is fixed"
    )


class CacheWriteError(CachePersistenceError):
    """Saving failed (disk full, permissions, ...); the agent's previous file, if any, is intact."""


class CacheSyncError(CacheWriteError):
    """The new file is in place (readers see it), but syncing the directory failed, so a crash of the
    machine could still bring back the previous one; saving again makes it durable."""


class CacheLockTimeoutError(CachePersistenceError):
    """Another process kept the agent's lock for longer than the store's ``lock_timeout``."""


class CacheBudgetWarning(UserWarning):
    """The store's memory budget is exceeded because agents it had to move to disk could not be written;
    they stay in the pool (nothing is lost), and the next eviction tries again."""
