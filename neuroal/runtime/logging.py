"""Loggers, the log file and driver-only progress (style rule 9)."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from neuroal.runtime.progress import track

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

            # the process's stderr now: it may have been replaced since configure() ran (a
            # notebook's or a test harness's capture), and the old one closed
            self.stream = sys.stderr
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


def ensure_visible(level: str = "INFO") -> None:
    """Library use (``neuroal.prune(...)`` in a script or notebook) shows progress and log lines
    by default: :func:`configure` when neither the ``neuroal`` logger nor the root logger has a
    handler (an application's own logging setup, or the CLI's, is left alone)."""
    if not logging.getLogger("neuroal").handlers and not logging.getLogger().handlers:
        configure(level)


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


class RunLog(logging.Handler):
    """The run's ``neuroal.log``. Attached to the ``neuroal`` logger for the whole run, it keeps
    every record in memory from the start (before the output directory exists), writes them to
    ``<staging>/neuroal.log`` once :meth:`attach` names the folder (the file then moves with the
    output), and can still save a failed run's log with :meth:`keep` after the staging folder
    was removed."""

    def __init__(self, max_lines: int = 200_000) -> None:
        super().__init__()
        self.setFormatter(_formatter())
        self.lines: list[str] = []
        self.max_lines = max_lines
        self.stream: Any = None
        self.path: Path | None = None
        logging.getLogger("neuroal").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            if len(self.lines) < self.max_lines:
                self.lines.append(line)
            if self.stream is not None:
                self.stream.write(line + "\n")
                self.stream.flush()
        except Exception:
            self.handleError(record)

    def attach(self, directory: Path) -> Path:
        """Start ``directory/neuroal.log`` with every record so far; returns its path."""
        self.path = Path(directory) / LOG_FILE
        self.stream = self.path.open("w", encoding="utf-8")
        self.stream.write("".join(line + "\n" for line in self.lines))
        self.stream.flush()
        return self.path

    def keep(self, destination: Path) -> Path:
        """Write the log so far to ``destination`` (a failed run's log beside its state)."""
        destination.write_text("".join(line + "\n" for line in self.lines), encoding="utf-8")
        return destination

    def close(self) -> None:
        """Detach from the logger and close the file (idempotent)."""
        logging.getLogger("neuroal").removeHandler(self)
        if self.stream is not None:
            self.stream.close()
            self.stream = None
        super().close()

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress(items: Iterable[T], desc: str, total: int | None = None,
             unit: str = "it") -> Iterator[T]:
    """Iterate with progress (:func:`neuroal.runtime.progress.track`): a tqdm bar on a terminal, a log
    line every ``log.interval`` seconds otherwise; silent with ``NEUROAL_PROGRESS=0``."""
    yield from track(items, desc, total, unit=unit)


class WarningBuffer(logging.Handler):
    """Keeps this process's warning and error records, ``neuroal`` ones and Python warnings,
    until :meth:`drain` hands them over: a Ray actor's, which its driver replays into the run's
    log with :func:`replay` (Ray's own forwarding reaches the driver's terminal at best, never
    the log file)."""

    def __init__(self, limit: int = 1000) -> None:
        super().__init__(logging.WARNING)
        self.records: list[tuple[int, str, str]] = []
        self.dropped = 0
        self.limit = limit

    def emit(self, record: logging.LogRecord) -> None:
        try:
            if len(self.records) < self.limit:
                self.records.append((record.levelno, record.name, record.getMessage()))
            else:
                self.dropped += 1
        except Exception:
            self.handleError(record)

    def drain(self) -> list[tuple[int, str, str]]:
        """The records kept since the last drain (``(level, logger name, message)``)."""
        out, self.records = self.records, []
        if self.dropped:
            out.append((logging.WARNING, "neuroal", f"{self.dropped} more warning(s) dropped"))
            self.dropped = 0
        return out


_BUFFER: WarningBuffer | None = None


def buffer_warnings() -> WarningBuffer:
    """Attach one :class:`WarningBuffer` to the ``neuroal`` logger and to Python's warnings
    (``logging.captureWarnings``) of this process, idempotent; returns it."""
    global _BUFFER
    if _BUFFER is None:
        _BUFFER = WarningBuffer()
        logging.getLogger("neuroal").addHandler(_BUFFER)
        logging.captureWarnings(True)
        logging.getLogger("py.warnings").addHandler(_BUFFER)
    return _BUFFER


def replay(records: Iterable[tuple[int, str, str]], origin: str) -> None:
    """Log records drained from another process here, each prefixed with ``[origin]``; records
    of foreign loggers (Python warnings) go to ``neuroal.worker``."""
    for level, name, message in records:
        logger = logging.getLogger(name if name.startswith("neuroal") else "neuroal.worker")
        logger.log(level, "[%s] %s", origin, message)
