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
* one run at a time per output: ``<output>.neuroal-tmp/lock`` holds an exclusive ``flock`` for
  the whole run and names the holder (PID, host, start time, command). A lock file whose
  process is gone (same host) is stale and taken over with a warning.

The swap moves the old output aside into ``<output>.neuroal-tmp/previous``, moves the new one in,
then deletes the old one: at every instant one complete model is at or next to the path.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import re
import shutil
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroal import __version__
from neuroal.errors import OutputExistsError
from neuroal.logging import get_logger

log = get_logger(__name__)

MARKER = "neuroal_output.json"
LOCK_NAME = "lock"
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
# Files an earlier (marker-less) neuroal version wrote into an output directory.
LEGACY_FILES = re.compile(
    r"^(config|generation_config|report|plan|recovery|tokenizer|tokenizer_config|"
    r"special_tokens_map|added_tokens|chat_template|vocab|preprocessor_config)\.json$"
    r"|^model(-\d{5}-of-\d{5})?\.safetensors$|^model\.safetensors\.index\.json$"
    r"|^(plan|masks)\.safetensors$|^neuroal_config\.yaml$|^README\.md$|^merges\.txt$"
    r"|^(tokenizer|spiece)\.model$|^vocab\.txt$|^chat_template\.jinja$")


class UnsafeOutputError(OutputExistsError):
    """The output path may not be written or replaced (not neuroal's, an input, a link...)."""


class OutputLockedError(OutputExistsError):
    """Another run holds the output's lock."""


# --------------------------------------------------------------------------- describing paths


def describe(path: Path, limit: int = 8) -> str:
    """``'a directory with 3 entries: .ssh/, notes.txt, docs/'`` (directories end in ``/``)."""
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError as exc:
        return f"an unreadable directory ({exc.strerror})"
    names = [e.name + ("/" if e.is_dir(follow_symlinks=False) else "") for e in entries]
    if not names:
        return "an empty directory"
    shown = ", ".join(names[:limit]) + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")
    return f"a directory with {len(names)} entr{'y' if len(names) == 1 else 'ies'}: {shown}"


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker of a neuroal output, or None if absent or unreadable."""
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), list):
        return None
    return data


def write_marker(directory: Path, kind: str) -> None:
    """Record that neuroal wrote ``directory`` and which files it holds (written last)."""
    files = sorted(p.name for p in directory.iterdir() if p.name != MARKER)
    data = {"neuroal": __version__, "kind": kind,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "files": files}
    tmp = directory / (MARKER + ".part")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, directory / MARKER)


def _legacy_kind(path: Path) -> str | None:
    """``prune`` / ``recover`` for a marker-less output of an earlier neuroal, else None."""
    if (path / "report.json").is_file() and (path / "neuroal_config.yaml").is_file():
        return "prune"
    try:
        recovery = json.loads((path / "recovery.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(recovery, dict) and {"variant", "perp"} <= set(recovery) and \
            (path / "config.json").is_file():
        return "recover"
    return None


def replaceable(path: Path) -> tuple[bool, str]:
    """Whether ``--overwrite`` may replace the existing directory ``path``, and why (not).

    Empty directories and neuroal outputs holding only what neuroal wrote are replaceable.
    """
    try:
        entries = {e.name: e for e in os.scandir(path)}
    except OSError as exc:
        return False, f"it cannot be listed ({exc.strerror})"
    if not entries:
        return True, "empty"
    marker = read_marker(path)
    if marker is not None:
        foreign = sorted(set(entries) - set(marker["files"]) - {MARKER})
        if foreign:
            return False, (f"it is a neuroal output but also holds files neuroal did not write: "
                           f"{', '.join(foreign[:8])}")
        return True, f"a neuroal {marker.get('kind', 'output')} output"
    kind = _legacy_kind(path)
    if kind is None:
        return False, "it is not a neuroal output (no neuroal_output.json, report.json or recovery.json)"
    foreign = sorted(n for n, e in entries.items()
                     if e.is_dir(follow_symlinks=False) or e.is_symlink() or not LEGACY_FILES.match(n))
    if foreign:
        return False, (f"it looks like an output of an earlier neuroal but also holds entries "
                       f"neuroal does not write: {', '.join(foreign[:8])}")
    return True, f"a neuroal {kind} output of an earlier version"


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
    tmp = path.with_name(path.name + ".neuroal-tmp")
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
    for item in inputs:
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
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UnsafeOutputError(f"cannot create output {str(path)!r}: the directory "
                                f"{str(parent)!r} is not writable; choose another --output")


def check_file_output(path: str | Path, inputs: Iterable[str | Path] = ()) -> None:
    """Refuse a single-file output (e.g. ``plan.py --json``) that is a directory or a link, or
    that is or lies inside an input (a model directory), symbolic links resolved."""
    path = Path(os.path.abspath(path))
    if path.is_symlink() or path.is_dir():
        raise UnsafeOutputError(f"output file {str(path)!r} is "
                                f"{'a symbolic link' if path.is_symlink() else 'a directory'}; "
                                "pass a new file name")
    real = Path(os.path.realpath(path))
    for item in inputs:
        src = Path(os.path.realpath(item))
        if _within(real, src):
            raise UnsafeOutputError(f"output file {str(path)!r} {'is' if real == src else 'lies inside'} "
                                    f"the input {str(item)!r}; write it elsewhere")


# --------------------------------------------------------------------------- lock


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
    ``flock`` for the whole run and naming the holder (PID, host, start time, command)."""

    tmp: Path
    _fd: int | None = None
    _made: tuple[Path, ...] = ()  # directories acquire() created (removed again when empty)

    @property
    def file(self) -> Path:
        return self.tmp / LOCK_NAME

    @property
    def held(self) -> bool:
        return self._fd is not None

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
            fd, locked = self._open_locked()
            self._take(fd, locked)
        except BaseException:
            self._remove_tmp_if_empty()
            raise

    def _open_locked(self) -> tuple[int, bool]:
        """Open the lock file holding an exclusive ``flock`` on the inode still at the path;
        ``locked`` is False where the filesystem offers no ``flock`` (PID check only)."""
        import fcntl

        while True:
            try:
                fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as exc:
                raise UnsafeOutputError(f"cannot create the lock {str(self.file)!r} "
                                        f"({exc.strerror}); choose another --output") from exc
            locked = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_fd(fd)
                os.close(fd)
                raise OutputLockedError(
                    f"another run is writing {str(self.tmp.with_suffix(''))!r}: the lock "
                    f"{str(self.file)!r} is held by {_holder(holder)}; wait for it to finish or "
                    "choose another --output") from None
            except OSError:
                locked = False  # no flock here (some network filesystems): PID check only
            try:
                same = os.fstat(fd).st_ino == os.stat(self.file).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd, locked
            os.close(fd)  # the previous holder removed the file as we opened it: retry

    def _take(self, fd: int, locked: bool) -> None:
        old = _read_fd(fd)
        if old:
            stale, reason = _stale(old, locked)
            if not stale:
                os.close(fd)
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
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file and drop the lock; remove the temp dir if it is left empty."""
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.file.unlink()
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


__all__ = ["MARKER", "OutputExistsError", "OutputLock", "OutputLockedError", "UnsafeOutputError",
           "check_file_output", "check_output_path", "check_tmp", "clear_tmp", "describe", "read_marker",
           "replaceable", "swap_into_place", "write_marker"]
