"""Progress of long phases, attended or not (style rule 9).

One helper for every phase (loading, dense statistics, NeuroAL candidates, the final prune,
evaluation windows, retraining steps). How progress is shown depends on where the run lives:

* ``bar``: a tqdm bar on stderr (a terminal); log records are written through ``tqdm.write``
  (see :class:`neuroal.runtime.logging.TqdmHandler`) so that they never cut a bar;
* ``log``: no bar; one log line every ``interval`` seconds with count, rate, elapsed time and
  ETA (Ray jobs, ``nohup``, Slurm, notebooks, CI), and a closing line for phases that logged;
* ``off``: nothing.

The mode is ``auto`` by default (``bar`` when stderr is a terminal, else ``log``) and can be
forced with ``$NEUROAL_PROGRESS`` (``bar``, ``log``, ``off`` or ``0``) or
:func:`configure_progress` (the CLI passes ``log.interval`` and ``log.progress``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

MODES = ("auto", "bar", "log", "off")
ENV_PROGRESS = "NEUROAL_PROGRESS"

log = logging.getLogger("neuroal.runtime.progress")


@dataclass
class ProgressSettings:
    """Process-wide progress settings (set once at the edge, by the CLI)."""

    interval: float = 30.0
    mode: str = "auto"


SETTINGS = ProgressSettings()


def configure_progress(interval: float | None = None, mode: str | None = None) -> None:
    """Set the log-line interval in seconds and the mode (``auto``, ``bar``, ``log``, ``off``).

    Raises:
        ValueError: A negative interval or an unknown mode.
    """
    if interval is not None:
        if interval < 0:
            raise ValueError(f"progress interval {interval!r}: expected seconds >= 0")
        SETTINGS.interval = float(interval)
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"progress mode {mode!r}: expected one of {', '.join(MODES)}")
        SETTINGS.mode = mode


def resolve_mode(mode: str | None = None) -> str:
    """The effective mode: the argument, else ``$NEUROAL_PROGRESS``, else the settings; ``auto``
    becomes ``bar`` on a terminal and ``log`` otherwise."""
    env = os.environ.get(ENV_PROGRESS, "").strip().lower()
    chosen = mode or ({"0": "off", "1": "auto"}.get(env, env) if env in (*MODES, "0", "1")
                      else SETTINGS.mode)
    if chosen == "auto":
        return "bar" if sys.stderr.isatty() else "log"
    return chosen


def _duration(seconds: float) -> str:
    """``75.0`` -> ``1m15s``; ``3725`` -> ``1h02m05s``."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def _rate(done: float, elapsed: float, unit: str) -> str:
    """``2.50 block/s``, or ``4.0 s/block`` when slower than one per second."""
    if done <= 0 or elapsed <= 0:
        return f"? {unit}/s"
    per_second = done / elapsed
    return f"{per_second:.2f} {unit}/s" if per_second >= 1 else f"{1 / per_second:.1f} s/{unit}"


class Progress:
    """Progress of one phase: ``update()`` after each unit of work, ``close()`` at the end.

    Args:
        total: Units of work, or ``None`` when unknown (no ETA then).
        desc: What is being done (``"pruning blocks"``, ``"NeuroAL block step"``).
        unit: The unit's name (``"block"``, ``"candidate"``, ``"step"``).
        interval: Seconds between log lines in ``log`` mode (default: the settings'); ``0``
            logs every update.
        mode: Force a mode; default :func:`resolve_mode`.
        clock: Seconds since an arbitrary origin (tests pass a fake clock).
        logger: Where ``log`` mode writes (INFO).
    """

    def __init__(self, total: int | None, desc: str, *, unit: str = "it",
                 interval: float | None = None, mode: str | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger | None = None) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.mode = resolve_mode(mode)
        self.interval = SETTINGS.interval if interval is None else interval
        self.clock, self.logger = clock, logger or log
        self.done, self.status, self.lines, self.logged = 0, "", 0, 0
        self.start = self.last = clock()
        self.bar: Any = None
        if self.mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=desc, unit=unit, leave=False, file=sys.stderr,
                            dynamic_ncols=True)

    def update(self, n: int = 1, status: str | None = None) -> None:
        """Count ``n`` finished units; ``status`` (e.g. a candidate's score) is shown with them."""
        self.done += n
        if status is not None:
            self.status = status
        if self.bar is not None:
            if status is not None:
                self.bar.set_postfix_str(status, refresh=False)
            self.bar.update(n)
        elif self.mode == "log":
            now = self.clock()
            if now - self.last >= self.interval:
                self.last = now
                self._emit(now)

    def line(self, now: float | None = None) -> str:
        """``pruning blocks: 12/30 (40%)  0.52 block/s  elapsed 23s  ETA 35s  <status>``."""
        now = self.clock() if now is None else now
        elapsed = now - self.start
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        text = f"{self.desc}: {count}{pct}  {_rate(self.done, elapsed, self.unit)}  " \
               f"elapsed {_duration(elapsed)}"
        if self.total and self.done:
            text += f"  ETA {_duration(elapsed / self.done * (self.total - self.done))}"
        return text + (f"  {self.status}" if self.status else "")

    def _emit(self, now: float) -> None:
        self.lines, self.logged = self.lines + 1, self.done
        self.logger.info("%s", self.line(now))

    def close(self) -> None:
        """End the phase: close the bar, or (``log`` mode) say it finished if it ever logged."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.mode == "log" and self.lines and self.logged != self.done:
            self._emit(self.clock())
        self.mode = "closed"

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def track(items: Iterable[T], desc: str, total: int | None = None, *, unit: str = "it",
          **kwargs: Any) -> Iterator[T]:
    """Iterate ``items`` while reporting progress (:class:`Progress`); ``total`` defaults to
    ``len(items)`` when it has one."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with Progress(total, desc, unit=unit, **kwargs) as bar:
        for item in items:
            yield item
            bar.update()
