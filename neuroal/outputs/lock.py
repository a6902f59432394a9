"""One run at a time per output: the exclusive lock on ``<output>.neuroal-tmp/lock``.

The lock is :class:`filelock.FileLock` (an ``flock`` the kernel releases when the process dies);
the file names its holder (PID, host, start time, command), so a refusal says who holds it and a
lock left by a process that is gone (same host) is taken over with a warning. Used by
:mod:`neuroal.outputs.safety`.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from neuroal.outputs.marker import UnsafeOutputError
from neuroal.runtime.errors import OutputExistsError
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

LOCK_NAME = "lock"


class OutputLockedError(OutputExistsError):
    """Another run holds the output's lock."""


def _process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (Linux), to detect PID reuse."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class OutputLock:
    """An exclusive lock on ``<output>.neuroal-tmp``: the file ``lock`` inside it, held with
    :class:`filelock.FileLock` (an ``flock``, released by the kernel when the process dies) for
    the whole run, and naming the holder (PID, host, start time, command).

    ``FileLock`` rather than ``SoftFileLock``, also where the output folder is on NFS: Linux NFS
    clients carry ``flock`` to the server as a whole-file lock, so it excludes runs on other
    hosts too, and a run killed by the OOM killer or ``SIGKILL`` leaves no lock to delete by
    hand (a soft lock's file would block every later run, or expire under a long-running one).
    A filesystem that refuses ``flock`` outright keeps the holder record as the lock, checked by
    PID (:func:`_stale`).
    """

    tmp: Path
    _lock: FileLock | None = None  # while held
    _fd: int | None = None  # the record's descriptor where the filesystem has no flock
    _made: tuple[Path, ...] = ()  # directories acquire() created (removed again when empty)

    @property
    def file(self) -> Path:
        return self.tmp / LOCK_NAME

    @property
    def held(self) -> bool:
        return self._fd is not None or (self._lock is not None and self._lock.is_locked)

    def acquire(self) -> None:
        """Take the lock or refuse, naming the holder; a stale lock is taken over.

        Raises:
            OutputLockedError: A live run holds it (or one on another host may).
            UnsafeOutputError: The temporary directory cannot be created.
        """
        if self.held:
            return
        missing = [d for d in (self.tmp, *self.tmp.parents) if not d.exists()]
        try:
            self.tmp.mkdir(parents=True, exist_ok=True)
            self._made = tuple(missing)
        except OSError as exc:
            raise UnsafeOutputError(
                f"cannot create {str(self.tmp)!r} ({exc.strerror}); is its parent directory "
                "writable? choose another --output") from exc
        try:
            self._acquire_file_lock()
        except BaseException:
            self._remove_tmp_if_empty()
            raise

    def _acquire_file_lock(self) -> None:
        """One non-blocking :class:`filelock.FileLock` attempt (retried only when the holder
        released as we looked); the holder record is checked and written while it is held."""
        for _ in range(3):
            lock = FileLock(self.file, mode=0o644, thread_local=False, blocking=False,
                            on_acquired=lambda fd: self._take(fd, locked=True))
            try:
                lock.acquire()
            except Timeout:
                holder = _holder_record(self.file)
                if holder.get("missing"):
                    continue  # released and removed between the attempt and the read
                raise OutputLockedError(
                    f"another run is writing {str(self.tmp.with_suffix(''))!r}: the lock "
                    f"{str(self.file)!r} is held by {_holder(holder)}; wait for it to finish or "
                    "choose another --output") from None
            except OutputExistsError:
                raise  # the holder record named a live run (from _take)
            except OSError as exc:
                if exc.errno not in _NO_FLOCK:
                    raise UnsafeOutputError(f"cannot create the lock {str(self.file)!r} "
                                            f"({exc.strerror}); choose another --output") from exc
                self._record_without_flock()
                return
            self._lock = lock
            return
        raise OutputLockedError(f"the lock {str(self.file)!r} changed hands three times while "
                                "neuroal tried to take it; rerun, or choose another --output")

    def _record_without_flock(self) -> None:
        """No ``flock`` on this filesystem: the holder record alone is the lock (PID check)."""
        try:
            fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UnsafeOutputError(f"cannot create the lock {str(self.file)!r} "
                                    f"({exc.strerror}); choose another --output") from exc
        try:
            self._take(fd, locked=False)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _take(self, fd: int, locked: bool) -> None:
        """Check the record a previous holder left in the lock file, then write ours into it."""
        old = _read_fd(fd)
        if old:
            stale, reason = _stale(old, locked)
            if not stale:
                raise OutputLockedError(
                    f"another run may be writing {str(self.tmp.with_suffix(''))!r}: the lock "
                    f"{str(self.file)!r} is held by {_holder(old)}; {reason}")
            log.warning("taking over the stale lock %s of %s (%s)", self.file, _holder(old), reason)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "start": _process_start(os.getpid()),
              "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(me) + "\n").encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock; remove the temp dir if it is left empty."""
        if not self.held:
            return
        with contextlib.suppress(OSError):
            self.file.unlink()  # while still held: a waiter's flock on this inode is refused
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._remove_tmp_if_empty()

    def _remove_tmp_if_empty(self) -> None:
        """Remove the temp dir if empty, and the parents acquire() created if left empty."""
        for directory in (self.tmp, *(d for d in self._made if d != self.tmp)):
            try:
                directory.rmdir()
            except OSError:
                if directory == self.tmp:
                    return  # the run left something (resume state, output): stop here


# flock refused by the filesystem itself (not contention): the holder record is the lock.
_NO_FLOCK = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL})


def _holder_record(path: Path, tries: int = 20) -> dict[str, Any]:
    """The record of the run holding the lock ``path``; an empty file (a holder that has just
    taken the lock and is writing its record) is read again for up to a second."""
    for _ in range(tries):
        record = _read_path(path)
        if record:
            return record
        time.sleep(0.05)
    return record


def _read_path(path: Path) -> dict[str, Any]:
    """The holder record in the lock file ``path`` (``{"missing": True}`` if it is gone)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return {"missing": True}
    except OSError:
        return {"unreadable": True}
    try:
        return _read_fd(fd)
    finally:
        os.close(fd)


def _stale(old: dict[str, Any], locked: bool) -> tuple[bool, str]:
    """Whether the lock file content ``old`` (its ``flock`` already taken by us when ``locked``)
    belongs to a run that has ended, and why (or what to do when it may not have)."""
    if old.get("unreadable") or "pid" not in old:
        return (True, "unreadable lock file, not locked") if locked else \
            (False, "delete the lock file if no run is writing this output")
    if old.get("host") != socket.gethostname():
        return False, ("neuroal cannot check a process on another host: if that run has "
                       "ended, delete the lock file and rerun")
    pid = old["pid"]
    if not isinstance(pid, int) or not _alive(pid):
        return True, f"process {pid} is gone"
    start = _process_start(pid)
    if start is not None and old.get("start") is not None and start != old["start"]:
        return True, f"process {pid} is gone; its PID now belongs to another process"
    if locked:
        return True, f"process {pid} no longer holds the lock"
    return False, "wait for it to finish or choose another --output"


def _read_fd(fd: int) -> dict[str, Any]:
    try:
        data = os.pread(fd, 65536, 0)
        parsed = json.loads(data.decode() or "{}")
    except (OSError, ValueError):
        return {"unreadable": True}
    return parsed if isinstance(parsed, dict) else {"unreadable": True}


def _holder(info: dict[str, Any]) -> str:
    if info.get("unreadable") or "pid" not in info:
        return "an unknown process (unreadable lock file)"
    text = f"PID {info['pid']} on host {info.get('host', '?')}"
    if info.get("since"):
        text += f" since {info['since']}"
    if info.get("command"):
        text += f" ({info['command']})"
    return text
