"""Output safety (engine.md §8): which paths a run may write, which directories ``--overwrite``
may replace, the per-output lock and the crash-safe swap of a finished output into place.

Rules, all checked before any weight is loaded:

* the output path must not be a symbolic link (dangling or not) nor an existing non-directory,
  and its nearest existing ancestor must be a writable directory;
* it must not be, contain or lie inside an input (the model directory or ``.gguf`` file, a
  tokenizer directory), symbolic links resolved;
* an existing output is replaced only with ``--overwrite`` and only if it is empty or was
  written by neuroal: it holds :data:`MARKER` and nothing but the files that marker lists, or
  it is a marker-less output of an earlier version (``report.json`` + ``neuroal_config.yaml``,
  or a recovery's ``recovery.json`` + ``config.json``) holding only files neuroal writes;
* one run at a time per output: ``<output>.neuroal-tmp/lock`` holds an exclusive
  ``filelock.FileLock`` for the whole run and names the holder (PID, host, start time,
  command). A lock file whose process is gone (same host) is stale and taken over with a
  warning.

The ownership marker and what ``--overwrite`` may replace live in :mod:`neuroal.outputs.marker`,
the lock in :mod:`neuroal.outputs.lock`; this module holds the checks, the temporary folder and
the swap, and re-exports both vocabularies. The swap moves the old output aside into
``<output>.neuroal-tmp/previous``, moves the new one in, then deletes the old one: at every
instant one complete model is at or next to the path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

from neuroal.config.inputs import file_kind
from neuroal.outputs.lock import LOCK_NAME, OutputLock, OutputLockedError  # noqa: F401  (re-exported)
from neuroal.outputs.marker import (  # noqa: F401  (re-exported: the write rules' vocabulary)
    CONFIG_SECTIONS,
    LEGACY_FILES,
    MARKER,
    MARKER_FORMAT,
    OUTPUT_NAMES,
    REPORT_KEYS,
    UnsafeOutputError,
    describe,
    read_marker,
    replaceable,
    write_marker,
)
from neuroal.runtime.errors import OutputExistsError
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

NAME_MAX = 255  # bytes per file name on Linux file systems
PREVIOUS = "previous"  # the replaced output while the swap runs (inside the temp dir)
# What a neuroal temporary directory may hold: lock, resume state, the output being written,
# the replaced output during a swap, whole-model PERP's scratch shards, atomic-write leftovers,
# the log of a failed run (neuroal.log, kept beside the resume state).
TMP_ENTRIES = re.compile(r"^(lock|state|model|model-perp|previous|neuroal\.log|onload)$|\.part$")
SPILL = "onload"  # onloading's disk spill files (neuroal.engine.onload), inside the temp dir


def spill_folder(output: str | Path) -> Path:
    """Where onloading's ``disk`` mode spills modified blocks: ``<output>.neuroal-tmp/onload``
    (the output's filesystem; cleared with the temporary folder)."""
    path = Path(os.path.abspath(os.path.expanduser(output)))
    return path.with_name(path.name + ".neuroal-tmp") / SPILL


class DiskFullError(UnsafeOutputError):
    """Not enough free disk space for what a run must write."""


# --------------------------------------------------------------------------- checks


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def check_output_path(path: Path, overwrite: bool, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse an output path that cannot or may not be written (no side effects).

    Args:
        path: The output directory, absolute.
        overwrite: ``--overwrite``: an existing neuroal output (or empty directory) may be replaced.
        inputs: Paths the run reads (model directory or file, tokenizer directory): the output
            may not be, contain or lie inside any of them, symbolic links resolved.

    Raises:
        OutputExistsError: The output exists and ``overwrite`` is off.
        UnsafeOutputError: Any other refusal; the message names the path and what is there.
    """
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    tmp = path.with_name(path.name + ".neuroal-tmp")
    _check_name_lengths(tmp, f"output {str(path)[:80]!r}")
    for candidate, role in ((path, "output"), (tmp, "temporary directory")):
        if candidate.is_symlink():
            target = os.readlink(candidate)
            state = "" if candidate.exists() else " (dangling: the target does not exist)"
            raise UnsafeOutputError(
                f"{role} {str(candidate)!r} is a symbolic link to {target!r}{state}; neuroal does "
                "not write through links: pass the real directory as --output")
    if path.exists() and not path.is_dir():
        raise UnsafeOutputError(f"output {str(path)!r} is an existing file, not a directory; "
                                "choose another --output")
    if tmp.exists() and not tmp.is_dir():
        raise UnsafeOutputError(f"{str(tmp)!r} (the run's temporary directory) is an existing "
                                "file; remove it or choose another --output")
    _check_inputs(path, tmp, inputs)
    _check_parent(path)
    if path.is_dir():
        if not overwrite:
            raise OutputExistsError(
                f"output directory {str(path)!r} already exists ({describe(path)}); choose "
                "another --output or pass --overwrite to replace it")
        ok, why = replaceable(path)
        if not ok:
            raise UnsafeOutputError(
                f"--overwrite refused: {str(path)!r} is {describe(path)}; {why}. neuroal only "
                "replaces an empty directory or one it wrote itself: choose another --output")


def _check_inputs(path: Path, tmp: Path, inputs: Iterable[str | Path]) -> None:
    out_real, tmp_real = Path(os.path.realpath(path)), Path(os.path.realpath(tmp))
    for item in input_closure(inputs):
        src = Path(os.path.realpath(item))
        for real, role in ((out_real, "output"), (tmp_real, "temporary directory")):
            if real == src:
                relation = "is"
            elif _within(real, src):
                relation = "lies inside"
            elif _within(src, real):
                relation = "contains"
            else:
                continue
            raise UnsafeOutputError(
                f"{role} {str(path if role == 'output' else tmp)!r} {relation} the input "
                f"{str(item)!r} (resolved: {str(src)!r}); writing there could destroy the input: "
                "choose an --output outside it")


def _check_parent(path: Path) -> None:
    """The nearest existing ancestor must be a writable, searchable directory."""
    parent = path.parent
    while not parent.exists() and not parent.is_symlink() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise UnsafeOutputError(f"cannot create output {str(path)!r}: {str(parent)!r} is not a "
                                "directory; choose another --output")
    if _read_only(parent):
        raise UnsafeOutputError(f"cannot create output {str(path)!r}: {str(parent)!r} is on a "
                                "read-only file system; choose another --output")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UnsafeOutputError(f"cannot create output {str(path)!r}: the directory "
                                f"{str(parent)!r} is not writable; choose another --output")


LOG_LINE = re.compile(rb"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR|CRITICAL) neuroal[\w.]*: ")
"""The first line of a log file neuroal wrote (:data:`neuroal.runtime.logging.FORMAT`)."""


def written_by_neuroal(path: Path, kind: str) -> bool:
    """Whether the existing regular file ``path`` is one neuroal wrote (or is empty): a log
    whose first line is a neuroal log line, or a JSON object carrying ``"neuroal"`` (the
    version that wrote it)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096)
    except OSError:
        return False
    if not head.strip():
        return True
    if kind == "log":
        return LOG_LINE.match(head) is not None
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("neuroal"), str)


def input_closure(inputs: Iterable[str | Path], limit: int = 10_000) -> list[str]:
    """The inputs and every file they link to: each path, plus, for a directory, the targets
    of the symbolic links inside it (a hub snapshot's shards link into ``blobs/``), resolved.
    An output may touch none of them."""
    out: dict[str, None] = {}
    for item in inputs:
        path = Path(os.path.expanduser(str(item)))
        out[str(path)] = None
        if not path.is_dir():
            continue
        seen = 0
        for dirpath, dirnames, filenames in os.walk(path):
            for name in dirnames + filenames:
                entry = Path(dirpath) / name
                if entry.is_symlink():
                    out[os.path.realpath(entry)] = None
            seen += len(dirnames) + len(filenames)
            if seen > limit:
                break
    return list(out)


def check_file_output(path: str | Path, inputs: Iterable[str | Path] = (),
                      allow_existing: bool = False, kind: str = "json",
                      flag: str = "--json") -> Path:
    """The write guard of every single file neuroal writes outside an output directory
    (``--json`` of every command, ``--log-file``); no side effects. Returns the path, ``~``
    expanded and made absolute.

    Refused: a directory, link, FIFO, device or other non-regular file; a path that is or lies
    inside an input (``inputs`` and what they link to, :func:`input_closure`); an existing file
    neuroal did not write (:func:`written_by_neuroal`) unless ``allow_existing``
    (``--allow-existing``); a name over 255 bytes; a missing or unwritable parent directory.

    Raises:
        UnsafeOutputError: naming the path, what is there and what to do.
    """
    path = Path(os.path.abspath(os.path.expanduser(str(path))))
    what = "log file" if kind == "log" else "output file"
    _check_name_lengths(path, f"{flag} {what}")
    found = file_kind(path)
    if found not in ("missing", "a regular file"):
        raise UnsafeOutputError(f"{flag} {str(path)!r} is {found}, not a file neuroal may "
                                f"write; pass the path of a new {what}")
    real = Path(os.path.realpath(path))
    for item in input_closure(inputs):
        src = Path(os.path.realpath(item))
        if _within(real, src):
            raise UnsafeOutputError(
                f"{flag} {str(path)!r} {'is' if real == src else 'lies inside'} the input "
                f"{str(item)!r}; writing there could corrupt the input: write it elsewhere")
    if found == "a regular file" and not allow_existing and not written_by_neuroal(path, kind):
        action = "append to" if kind == "log" else "replace"
        raise UnsafeOutputError(
            f"{flag} {str(path)!r} is an existing file that neuroal did not write; neuroal does "
            f"not {action} it unless you pass --allow-existing; or choose a new file name")
    parent = path.parent
    if not parent.is_dir():
        raise UnsafeOutputError(f"{flag} {str(path)!r}: the folder {str(parent)!r} "
                                f"{'is ' + file_kind(parent) if parent.exists() else 'does not exist'};"
                                " create it first or choose another path")
    if _read_only(parent):
        raise UnsafeOutputError(f"{flag} {str(path)!r}: the folder {str(parent)!r} is on a "
                                "read-only file system; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK) or \
            (found == "a regular file" and not os.access(path, os.W_OK)):
        which = "the file" if found != "missing" else f"the folder {str(parent)!r}"
        raise UnsafeOutputError(f"{flag} {str(path)!r}: {which} is not writable; choose "
                                "another path")
    return path


def _read_only(directory: Path) -> bool:
    """Whether ``directory`` lies on a file system mounted read-only (root included)."""
    try:
        return bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _check_name_lengths(path: Path, label: str) -> None:
    """Every component at most 255 bytes (NAME_MAX) and the whole path at most 4096."""
    for part in path.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise UnsafeOutputError(
                f"{label}: the name {part[:40]!r}... is {len(os.fsencode(part))} bytes long; "
                f"file systems allow at most {NAME_MAX} bytes per name: choose a shorter name")
    if len(os.fsencode(str(path))) > 4096:
        raise UnsafeOutputError(f"{label}: the path is {len(os.fsencode(str(path)))} bytes long "
                                "(at most 4096); choose a shorter path")


def write_file(path: str | Path, text: str, flag: str = "--json") -> None:
    """Write a checked single-file output through ``<path>.part`` and a rename; an OSError
    (read-only folder, disk full) becomes an :class:`UnsafeOutputError` naming the path."""
    path = Path(path)
    tmp = path.with_name(path.name + ".neuroal-part")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UnsafeOutputError(f"{flag}: cannot write {str(path)!r} ({exc.strerror}); "
                                "choose another path") from None


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds ``path`` (its nearest existing ancestor)."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_free_space(path: Path, needed: int, what: str) -> None:
    """Refuse, before writing, when the file system of ``path`` has fewer than ``needed`` free
    bytes for ``what``; the message names both sizes.

    Raises:
        DiskFullError: not enough room.
    """
    free = free_bytes(path)
    if free < needed:
        raise DiskFullError(
            f"not enough disk space for {what} in {str(path)!r}: it needs about "
            f"{_gb(needed)}, the file system has {_gb(free)} free; free some space or choose "
            "an --output on another disk")


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e7 else f"{n / 1e6:.2f} MB"


# --------------------------------------------------------------------------- temp dir and swap


def check_tmp(tmp: Path, path: Path, overwrite: bool, resume: bool) -> None:
    """Refuse a temporary directory that is not neuroal's, or whose leftovers need a decision.

    Called with the lock held, so nobody else is using ``tmp``.
    """
    entries = sorted(e.name for e in os.scandir(tmp)) if tmp.is_dir() else []
    foreign = [n for n in entries if not TMP_ENTRIES.search(n)]
    if foreign:
        raise UnsafeOutputError(
            f"{str(tmp)!r} is not a neuroal temporary directory (it holds "
            f"{', '.join(foreign[:8])}); remove or rename it, or choose another --output")
    if PREVIOUS in entries and not path.exists():
        raise UnsafeOutputError(
            f"an earlier run was interrupted while replacing {str(path)!r}: the previous output "
            f"is in {str(tmp / PREVIOUS)!r}" + (
                f" and the new, complete one in {str(tmp / 'model')!r}"
                if (tmp / "model" / MARKER).is_file() else "") +
            f"; move the one you want to {str(path)!r}, then delete {str(tmp)!r}")
    leftovers = [n for n in entries if n != LOCK_NAME]
    if leftovers and not (overwrite or resume):
        raise OutputExistsError(
            f"a previous run left {str(tmp)!r} ({', '.join(leftovers)}); pass --resume to "
            "continue it (same config), --overwrite to start afresh, or remove it")


def clear_tmp(tmp: Path, keep: Iterable[str]) -> None:
    """Delete every entry of the (locked) temporary directory except ``keep`` and the lock."""
    keep = {*keep, LOCK_NAME}
    for entry in tmp.iterdir() if tmp.is_dir() else []:
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def swap_into_place(new: Path, path: Path, overwrite: bool) -> None:
    """Move the complete directory ``new`` to ``path``, replacing an existing output safely.

    The old output is checked again (it may have changed during the run), moved aside to
    ``<tmp>/previous``, the new one moved in, then the old one deleted.

    Raises:
        OutputExistsError / UnsafeOutputError: ``path`` may not be replaced (any more); the new
            output stays in ``new`` and the message says so.
    """
    aside = new.parent / PREVIOUS
    if path.is_symlink() or path.exists():
        keep = f"; the new output is kept in {str(new)!r}"
        if path.is_symlink() or not path.is_dir():
            raise UnsafeOutputError(f"{str(path)!r} became a link or a file during the run{keep}")
        if not overwrite:
            raise OutputExistsError(f"{str(path)!r} appeared during the run and --overwrite "
                                    f"was not given{keep}")
        ok, why = replaceable(path)
        if not ok:
            raise UnsafeOutputError(f"--overwrite refused at the end of the run: {str(path)!r} is "
                                    f"{describe(path)}; {why}{keep}")
        if aside.exists():
            shutil.rmtree(aside)
        os.replace(path, aside)
    os.replace(new, path)
    if aside.exists():
        shutil.rmtree(aside)


__all__ = ["MARKER", "DiskFullError", "OutputExistsError", "OutputLock", "OutputLockedError",
           "UnsafeOutputError", "check_file_output", "check_free_space", "check_output_path",
           "check_tmp", "clear_tmp", "describe", "file_kind", "input_closure", "read_marker",
           "replaceable", "swap_into_place", "write_file", "write_marker", "written_by_neuroal"]
