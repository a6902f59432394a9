"""One way out of every entry point (``neuroal prune | plan | evaluate | recover`` and the
``launch/*.py`` scripts): SIGTERM is handled like Ctrl-C, and the failures hostile input or a
full disk cause end with one log line and an exit code, never a traceback.

Exit codes: 2 bad input or an environment that refuses the write (disk full, read-only,
name too long, a refused pickle), 130 interrupted (Ctrl-C or SIGTERM).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import pickle
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from neuroal.outputs.safety import free_bytes
from neuroal.runtime.errors import OutputExistsError
from neuroal.runtime.logging import get_logger

log = get_logger("neuroal.cli")

_OS_HINTS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.ENAMETOOLONG: "a file name is too long (at most 255 bytes per name)",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "it is a directory",
    errno.ENOTDIR: "a component of the path is not a directory",
}


class Terminated(KeyboardInterrupt):
    """SIGTERM, delivered to the main thread as an interrupt (handled like Ctrl-C)."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` (a KeyboardInterrupt) in the main
    thread, so a terminated run cleans up as after Ctrl-C: the output being written is removed
    and the resume state kept. Outside the main thread: no change."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        log.error("received SIGTERM (signal %d); stopping as after Ctrl-C", signum)
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _disk_full(exc: BaseException) -> bool:
    return getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or \
        "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc)


def explain(exc: BaseException) -> str | None:
    """The one-line message for an environment failure or refused input that escaped an entry
    point, or None for anything else (a bug: its traceback is shown)."""
    if _disk_full(exc):
        where = getattr(exc, "filename", None)
        place = Path(where).parent if where else Path.cwd()
        what = f" {where!r}" if where else ""
        return (f"disk full while writing{what}: {free_bytes(place) / 1e9:.2f} GB free now on "
                f"the file system of {str(place)!r}; free some space (or choose an "
                "--output on another disk) and rerun; an interrupted prune keeps its resume "
                "state: rerun the same command with --resume")
    if isinstance(exc, OutputExistsError):  # the write guard's refusals name the path
        return str(exc)
    if isinstance(exc, pickle.UnpicklingError):
        return ("refused to read a file holding pickled objects other than tensors (nothing in "
                f"it was run): {str(exc).splitlines()[0][:200]}; if it is a resume state, delete "
                "<output>.neuroal-tmp/state and start afresh with --overwrite; a token file must "
                "be saved with torch.save(tensor) or numpy.save")
    if isinstance(exc, OSError) and exc.errno in _OS_HINTS:
        target = exc.filename if exc.filename is not None else "a file"
        return (f"cannot write or read {str(target)[:300]!r}: {_OS_HINTS[exc.errno]} "
                f"({exc.strerror}); choose another path")
    if isinstance(exc, MemoryError):
        return "out of memory; reduce the input (YAML, text, model) or the run's sizes"
    return None


def guarded(main: Callable[..., int]) -> Callable[..., int]:
    """Wrap an entry point's ``main(argv) -> exit code``: SIGTERM like Ctrl-C, and the
    failures :func:`explain` knows logged as one line with exit code 2 (130 when interrupted)."""

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> int:
        try:
            with sigterm_as_interrupt():
                return main(*args, **kwargs)
        except KeyboardInterrupt:
            log.error("interrupted; no output was written")
            return 130
        except Exception as exc:
            message = explain(exc)
            if message is None:
                raise
            log.error("%s", message)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("details", exc_info=exc)
            return 2

    return wrapper


__all__ = ["Terminated", "explain", "guarded", "sigterm_as_interrupt"]
