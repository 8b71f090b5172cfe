"""The store's directory: one file per agent, replaced atomically, under a per-agent lock.

Names. An agent id is escaped into a file name that is safe on every file
system the package runs on: ``[a-z0-9_-]`` stay as they are, every other byte
of the id's UTF-8 becomes ``%XX`` (upper-case hex). Upper-case letters are
escaped too, so two ids never collide on a case-insensitive file system (macOS),
and non-ASCII is escaped, so Unicode normalisation cannot rename a file. ``/``,
``\\`` and ``.`` are escaped like any other byte, so ``team/alice``, URLs and
``..`` name files inside the directory.

No file is opened through a symbolic link (``O_NOFOLLOW``): a link planted in
the directory cannot make a save or a lock create or read a file elsewhere.

Files, for an agent whose escaped name is ``NAME``:

* ``NAME.safetensors``: the agent's context (see ``file_format``).
* ``.NAME.lock``: the advisory lock (``fcntl.flock``) every writer holds; it is
  left only beside an agent's file (or while a writer holds it).
* ``.NAME.<random>.tmp``: a save in progress; it exists only while its writer
  holds the lock, so one whose lock is free was abandoned by a killed process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import pathlib
import re
import secrets
import stat
import time
import unicodedata
from typing import Callable, Iterator, List, Optional

from semantic.domain.request_checks import checked_path, shown
from semantic.persistence.errors import (
    CacheLockTimeoutError,
    CacheReadError,
    CacheSyncError,
    CacheWriteError,
    IncompatibleCacheFileError,
    InvalidAgentIdError,
    UnknownAgentError,
    read_error,
)

CACHE_SUFFIX = ".safetensors"
MAX_NAME_BYTES = 200  # escaped; leaves room for the lock/temp decorations under the usual 255-byte limit
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_")
_LOCK_POLL_SECONDS = 0.005
_TEMP_BYTES = 6
# A save's temp file: ``.NAME.<12 hex>.tmp``, NAME an escaped agent id (``agent_id_from_name`` checks it; it
# holds no dot). Only names of this exact shape are ever removed.
_TEMP_NAME = re.compile(r"\.([^.]+)\.[0-9a-f]{" + str(2 * _TEMP_BYTES) + r"}\.tmp")


def check_agent_id(agent_id) -> str:
    """``agent_id`` escaped into a file name, or ``InvalidAgentIdError`` for an id that could leave the directory."""
    if not isinstance(agent_id, str) or not agent_id:
        raise InvalidAgentIdError(f"an agent id must be a non-empty string, got {shown(agent_id)}")
    if any(unicodedata.category(c) in ("Cc", "Cs") for c in agent_id):
        raise InvalidAgentIdError(
            f"agent id {agent_id!r} contains a control character (NUL, newline, ...) or a lone surrogate; "
            "use printable characters"
        )
    name = "".join(c if c in _PLAIN else "".join(f"%{b:02X}" for b in c.encode("utf-8")) for c in agent_id)
    if len(name) > MAX_NAME_BYTES:
        raise InvalidAgentIdError(
            f"agent id {agent_id[:40]!r}... is too long: its file name would be {len(name)} bytes, at most "
            f"{MAX_NAME_BYTES} are allowed (characters other than a-z 0-9 _ - take 3 bytes per UTF-8 byte)"
        )
    return name


def agent_id_from_name(name: str) -> Optional[str]:
    """The agent id a file name (without suffix) escapes, or ``None`` if this store did not write it."""
    raw, i = bytearray(), 0
    while i < len(name):
        if name[i] == "%":
            try:
                raw.append(int(name[i + 1 : i + 3], 16))
            except ValueError:
                return None
            i += 3
        else:
            try:
                raw.extend(name[i].encode("utf-8"))
            except UnicodeEncodeError:  # a byte that was not UTF-8 on disk (Python's surrogate escape)
                return None
            i += 1
    try:
        agent_id = raw.decode("utf-8")
        return agent_id if check_agent_id(agent_id) == name else None
    except (UnicodeDecodeError, InvalidAgentIdError):
        return None


def _not_a_file(path) -> IncompatibleCacheFileError:
    return IncompatibleCacheFileError(
        f"{path} is not a regular file (a directory, a FIFO, ...); the store reads only its own files. Move it away"
    )


class CacheDirectory:
    """A directory of agent cache files; see the module docstring for its layout."""

    def __init__(self, path, lock_timeout: float, wait: Callable[[float], object] = time.sleep):
        """``wait(seconds)`` pauses between attempts at a lock another process holds; the store passes one
        that lets go of its own lock meanwhile, so waiting for one agent does not stop calls on the others."""
        self.path = checked_path("directory", path)
        self.lock_timeout = lock_timeout
        self._wait = wait
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise CacheWriteError(f"cannot create the cache directory {self.path}: {exc.strerror}") from exc
        self.remove_abandoned_temp_files()

    def file_for(self, agent_id: str) -> pathlib.Path:
        return self.path / (check_agent_id(agent_id) + CACHE_SUFFIX)

    def has_file(self, agent_id: str) -> bool:
        """Whether the agent has a cache file: a regular file at its name, not a link, as :meth:`agent_ids` counts
        them (``OSError`` where the directory cannot be searched)."""
        try:
            return stat.S_ISREG(os.lstat(self.file_for(agent_id)).st_mode)
        except (FileNotFoundError, NotADirectoryError):
            return False

    def agent_ids(self) -> List[str]:
        """Agents with a cache file (regular files, not links), in no particular order; foreign files are
        ignored."""
        found = []
        try:
            with os.scandir(self.path) as entries:
                for entry in entries:
                    if (entry.name.endswith(CACHE_SUFFIX) and not entry.name.startswith(".")
                            and entry.is_file(follow_symlinks=False)):
                        agent_id = agent_id_from_name(entry.name[: -len(CACHE_SUFFIX)])
                        if agent_id is not None:
                            found.append(agent_id)
        except OSError as exc:  # the directory removed or replaced while the store is open
            raise CacheReadError(f"cannot list the cache directory {self.path}: {exc.strerror}") from exc
        return found

    @contextlib.contextmanager
    def open_for_reading(self, agent_id: str) -> Iterator[io.FileIO]:
        """The agent's file, opened unbuffered: one open file stays one version even if a save replaces it."""
        path = self.file_for(agent_id)
        try:
            # O_NONBLOCK: opening a FIFO planted under the name would otherwise wait for a writer forever.
            file = open(path, "rb", buffering=0,
                        opener=lambda name, flags: os.open(name, flags | os.O_NOFOLLOW | os.O_NONBLOCK))
        except FileNotFoundError:
            raise UnknownAgentError(f"no cache file for agent {agent_id!r} in {self.path}") from None
        except IsADirectoryError:
            raise _not_a_file(path) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise IncompatibleCacheFileError(
                    f"{path} is a symbolic link; the store reads only its own files. Remove the link"
                ) from None
            raise CacheReadError(f"cannot open {path}: {exc.strerror}") from exc
        try:
            try:
                regular = stat.S_ISREG(os.fstat(file.fileno()).st_mode)
            except OSError as exc:
                raise read_error(path, exc) from exc
            if not regular:
                raise _not_a_file(path)
            yield file
        finally:
            with contextlib.suppress(OSError):  # only read through: an error closing it loses nothing
                file.close()

    # ---- writing ----------------------------------------------------------------------------------
    def replace(self, agent_id: str, write: Callable[[int], None],
                replaced: Callable[[], object] = lambda: None) -> None:
        """Make the agent's file hold what ``write(fd)`` writes, atomically and durably.

        The data goes to a temp file beside the target, is fsynced, renamed over
        the target, and the directory is fsynced, so a crash at any point leaves
        the old file or the new one, never a mix; a failure removes the temp file
        (or, if even that fails, the next store that opens the directory does).
        ``replaced()`` runs as soon as the new file is in place, before the directory
        sync, even when an interrupt comes with the rename: what its caller keeps in
        memory about the file then agrees with the disk whatever happens next.
        """
        name = check_agent_id(agent_id)
        target = self.path / (name + CACHE_SUFFIX)
        with self.lock(agent_id):
            temp = self.path / f".{name}.{secrets.token_hex(_TEMP_BYTES)}.tmp"
            renaming = False
            try:
                fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    write(fd)
                    os.fsync(fd)
                except BaseException:
                    with contextlib.suppress(OSError):  # the first failure is the one to report
                        os.close(fd)
                    raise
                os.close(fd)  # an error here can mean lost writes (network file systems): a failed save
                renaming = True
                os.replace(temp, target)
            except BaseException as exc:
                # An interrupt is raised as os.replace returns, after the rename: then the temp file is gone (the
                # lock keeps other savers off its name) and the new file is in place.
                if renaming and not os.path.lexists(temp):
                    replaced()
                    raise
                _discard_temp(temp)
                if isinstance(exc, OSError):
                    raise CacheWriteError(
                        f"could not save agent {agent_id!r} to {target}: {exc.strerror or exc}; "
                        "its previous file, if any, is unchanged"
                    ) from exc
                raise
            replaced()
            try:
                self._sync_directory()
            except OSError as exc:  # after the rename: the new file is the one readers see now
                raise CacheSyncError(
                    f"saved agent {agent_id!r} to {target}, but syncing the directory failed "
                    f"({exc.strerror or exc}): a crash of the machine now could bring back its previous file; "
                    "save again to make it durable"
                ) from exc

    def remove(self, agent_id: str, removed: Callable[[], object] = lambda: None) -> bool:
        """Delete the agent's file (and lock file); whether there was one. ``removed()`` runs as soon as the
        file is gone, before the directory sync, even when an interrupt comes with the unlink (see ``replace``)."""
        name = check_agent_id(agent_id)
        path = self.path / (name + CACHE_SUFFIX)
        with self.lock(agent_id):
            try:
                os.unlink(path)
            except FileNotFoundError:
                existed = False
            except OSError as exc:
                raise CacheWriteError(f"could not delete the cache file of agent {agent_id!r}: {exc.strerror}") from exc
            except BaseException:  # an interrupt, raised as os.unlink returns: the file may be gone already
                if not os.path.lexists(path):
                    removed()
                raise
            else:
                existed = True
                removed()
                try:
                    self._sync_directory()
                except OSError as exc:
                    raise CacheSyncError(
                        f"deleted the cache file of agent {agent_id!r}, but syncing the directory failed "
                        f"({exc.strerror or exc}): a crash of the machine now could bring it back; delete again"
                    ) from exc
        return existed

    def remove_abandoned_temp_files(self) -> None:
        """Delete temp files whose writer died mid-save: their agent's lock is free. Nothing to do in a
        directory this process cannot write (read-only file system or permissions): it can only read."""
        if not os.access(self.path, os.W_OK | os.X_OK):
            return
        for temp in self.path.glob(".*.tmp"):
            match = _TEMP_NAME.fullmatch(temp.name)  # another program's ``.notes.tmp`` is not ours to delete
            agent_id = agent_id_from_name(match.group(1)) if match else None
            if agent_id is None or not temp.is_file() or temp.is_symlink():  # only files a save of ours left
                continue
            try:
                with self.lock(agent_id, timeout=0):
                    _discard_temp(temp)
            except (CacheLockTimeoutError, CacheWriteError):
                pass  # a live writer's file, or a lock path this store cannot use: that agent's problem alone

    def _sync_directory(self) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---- locking ----------------------------------------------------------------------------------
    def _lock_path(self, name: str) -> pathlib.Path:
        return self.path / f".{name}.lock"

    @contextlib.contextmanager
    def lock(self, agent_id: str, timeout: Optional[float] = None) -> Iterator[None]:
        """Hold the agent's advisory lock (across processes and threads), waiting up to ``timeout`` seconds.

        The lock file lives as long as the agent's file: released where the agent has none (a delete, a first
        save that failed, a leftover temp file cleared), it is removed while still held. A process waiting on
        it notices the unlink and locks a new one (see ``_acquired``)."""
        name = check_agent_id(agent_id)
        path, target = self._lock_path(name), self.path / (name + CACHE_SUFFIX)
        timeout = self.lock_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise CacheWriteError(
                        f"the lock file {path} is a symbolic link (not made by this store); remove it"
                    ) from None
                raise CacheWriteError(f"cannot create the lock file {path}: {exc.strerror}") from exc
            held = False
            try:
                held = self._acquired(fd, path, deadline, agent_id)
                if held:
                    yield
            finally:
                # Closing releases the flock. Inline, not through a function: an interrupt (Ctrl-C, a second one
                # while the first is handled) can come as a Python function starts, before its first line, and
                # a lock left open is held until the process ends.
                try:
                    if held:
                        os.lstat(target)  # not os.path.lexists: Python code, and it takes any error for "absent"
                except FileNotFoundError:  # no file left for the lock to guard
                    try:
                        os.unlink(path)
                    except OSError:  # advisory: one left behind holds nothing and the next save reuses it
                        pass
                except OSError:
                    pass
                finally:
                    try:
                        os.close(fd)
                    except OSError:  # the descriptor is freed even so (EIO on a network file system), and
                        pass  # nothing was written through it that could be lost
            if held:
                return
            # else the file was deleted under us: lock the new one

    def _acquired(self, fd: int, path: pathlib.Path, deadline: float, agent_id: str) -> bool:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise CacheWriteError(f"cannot lock {path}: {exc.strerror}") from exc
                if time.monotonic() >= deadline:
                    raise CacheLockTimeoutError(
                        f"another process holds the lock of agent {agent_id!r} ({path}); it is saving or "
                        f"deleting that agent. Retry later, or raise the store's lock_timeout ({self.lock_timeout} s)"
                    ) from None
                self._wait(_LOCK_POLL_SECONDS)
        try:
            return os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise CacheWriteError(f"cannot check the lock file {path}: {exc.strerror}") from exc


def _discard_temp(temp: pathlib.Path) -> None:
    """Remove a temp file of a save that did not finish. Errors are ignored: a temp file left behind is never
    read, and is removed when a store next opens the directory; the save's own outcome is what to report."""
    with contextlib.suppress(OSError):
        os.unlink(temp)
