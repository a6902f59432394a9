"""Loggers, the log file and driver-only progress (style rule 9; issue 15, item 2)."""

from __future__ import annotations

import logging
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from logging.handlers import MemoryHandler
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

LOG_FILE = "neuroal.log"
"""The log file written into every output directory."""

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_CONFIGURED = False


def get_logger(name: str) -> logging.Logger:
    """Module logger under the ``neuroal`` hierarchy."""
    return logging.getLogger(name)


class TqdmHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stderr handler writing through ``tqdm.write``, so log lines never cut a progress bar
    (tqdm clears the bars, prints the line, and redraws them)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm.auto import tqdm

            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except Exception:  # the logging module's own policy: report, never raise
            self.handleError(record)


def _formatter() -> logging.Formatter:
    return logging.Formatter(FORMAT, datefmt="%H:%M:%S")


def configure(level: str = "INFO", log_file: str | Path | None = None) -> None:
    """Attach one stderr handler (through tqdm) to the ``neuroal`` logger, idempotent; with
    ``log_file`` also append every record to that file (``--log-file``)."""
    global _CONFIGURED
    root = logging.getLogger("neuroal")
    root.setLevel(level.upper())
    if not _CONFIGURED:
        handler = TqdmHandler(sys.stderr)
        handler.setFormatter(_formatter())
        root.addHandler(handler)
        root.propagate = False
        _CONFIGURED = True
    if log_file is not None:
        add_log_file(log_file)


def add_log_file(path: str | Path, mode: str = "a") -> logging.FileHandler:
    """Write every ``neuroal`` record also to ``path`` (parent folders created); returns the
    handler (remove it with :func:`remove_handler`). Adding the same file twice is a no-op."""
    path = Path(path).expanduser().resolve()
    root = logging.getLogger("neuroal")
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == path:
            return handler
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode=mode, encoding="utf-8")
    handler.setFormatter(_formatter())
    root.addHandler(handler)
    return handler


def remove_handler(handler: logging.Handler) -> None:
    """Detach and close a handler added to the ``neuroal`` logger."""
    logging.getLogger("neuroal").removeHandler(handler)
    handler.close()


class RunLog:
    """The run's ``neuroal.log``: records are buffered from the start of the run (before the
    output directory exists) and written to the file once :meth:`attach` names its folder.

    Used as a context manager around a run; records below the logger's level are not kept.
    """

    def __init__(self) -> None:
        self.buffer = MemoryHandler(capacity=1 << 30, flushLevel=logging.CRITICAL + 1)
        self.file: logging.FileHandler | None = None
        logging.getLogger("neuroal").addHandler(self.buffer)

    def attach(self, directory: Path) -> Path:
        """Start ``directory/neuroal.log`` with every record so far; returns its path."""
        path = Path(directory) / LOG_FILE
        self.file = add_log_file(path, mode="w")
        self.buffer.setTarget(self.file)
        self.buffer.flush()
        logging.getLogger("neuroal").removeHandler(self.buffer)
        self.buffer.close()
        return path

    def keep(self, destination: Path) -> Path | None:
        """Copy the log so far to ``destination`` (e.g. beside the resume state of a failed
        run); None when no file was started."""
        if self.file is None:
            return None
        self.file.flush()
        shutil.copyfile(self.file.baseFilename, destination)
        return destination

    def close(self) -> None:
        """Detach the buffer or the file handler (idempotent)."""
        root = logging.getLogger("neuroal")
        if self.buffer in root.handlers:
            root.removeHandler(self.buffer)
            self.buffer.close()
        if self.file is not None:
            remove_handler(self.file)
            self.file = None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def run_log() -> Iterator[RunLog]:
    """A :class:`RunLog` detached when the body ends."""
    with RunLog() as handle:
        yield handle


def progress(items: Iterable[T], desc: str, total: int | None = None,
             unit: str = "it") -> Iterator[T]:
    """Iterate with progress (:func:`neuroal.progress.track`): a tqdm bar on a terminal, a log
    line every ``log.interval`` seconds otherwise; silent with ``NEUROAL_PROGRESS=0``."""
    from neuroal.progress import track

    yield from track(items, desc, total, unit=unit)
