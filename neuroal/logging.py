"""Loggers and driver-only progress bars (style rule 9)."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")

_CONFIGURED = False


def get_logger(name: str) -> logging.Logger:
    """Module logger under the ``neuroal`` hierarchy."""
    return logging.getLogger(name)


def configure(level: str = "INFO") -> None:
    """Attach one stderr handler to the ``neuroal`` logger (idempotent; called by the CLI)."""
    global _CONFIGURED
    root = logging.getLogger("neuroal")
    root.setLevel(level.upper())
    if not _CONFIGURED:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                               datefmt="%H:%M:%S"))
        root.addHandler(handler)
        root.propagate = False
        _CONFIGURED = True


def progress(items: Iterable[T], desc: str, total: int | None = None) -> Iterator[T]:
    """A tqdm bar on the driver only; silent when NEUROAL_PROGRESS=0 or stderr is no terminal."""
    disable = os.environ.get("NEUROAL_PROGRESS", "1") == "0" or not sys.stderr.isatty()
    yield from tqdm(items, desc=desc, total=total, disable=disable, leave=False)
