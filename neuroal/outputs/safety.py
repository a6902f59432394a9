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

The swap moves the old output aside into ``<output>.neuroal-tmp/previous``, moves the new one in,
then deletes the old one: at every instant one complete model is at or next to the path.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from neuroal import __version__
from neuroal.config.inputs import file_kind, file_sha256
from neuroal.runtime.errors import OutputExistsError
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

MARKER = "neuroal_output.json"
NAME_MAX = 255  # bytes per file name on Linux file systems
MARKER_FORMAT = 2  # 2: every file at every depth with size and SHA-256, and a run id
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
# Relative paths a marked (format 2) output may list: the legacy names, the run's log, the
# plots, tokenizer files with the tokenizer extensions; never a hidden name, never deeper.
OUTPUT_NAMES = re.compile(
    LEGACY_FILES.pattern + r"|^neuroal\.log$|^recovery\.json$|^plots/[\w.-]+\.(png|svg|pdf)$"
    r"|^[\w-][\w.-]*\.(tiktoken|jinja|model)$|^[\w-][\w.-]*\.json$")
# What every prune report.json of neuroal holds (an earlier version's included) ...
REPORT_KEYS = frozenset({"model", "criterion", "allocation", "pattern", "target_sparsity",
                         "achieved_sparsity", "timings"})
# ... and the sections of its neuroal_config.yaml.
CONFIG_SECTIONS = frozenset({"model", "criterion", "allocation", "calib", "engine", "output"})


class UnsafeOutputError(OutputExistsError):
    """The output path may not be written or replaced (not neuroal's, an input, a link...)."""


class DiskFullError(UnsafeOutputError):
    """Not enough free disk space for what a run must write."""


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


def _walk(directory: Path) -> Iterator[tuple[str, os.DirEntry]]:
    """``(relative path, entry)`` of everything under ``directory``, links not followed."""
    stack = [("", directory)]
    while stack:
        prefix, folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = prefix + entry.name
                yield rel, entry
                if entry.is_dir(follow_symlinks=False):
                    stack.append((rel + "/", Path(entry.path)))


def _stamp_run_id(directory: Path, run_id: str) -> None:
    """Record ``run_id`` inside the output's ``report.json`` (or a recovery's ``recovery.json``),
    the second copy :func:`replaceable` compares with the marker's."""
    for name in ("report.json", "recovery.json"):
        path = directory / name
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            data["run_id"] = run_id
            tmp = path.with_name(name + ".part")
            tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
            os.replace(tmp, path)
            return


def write_marker(directory: Path, kind: str) -> None:
    """Record that neuroal wrote ``directory`` (written last): its top-level names (``files``)
    and, for every file at every depth, its size and SHA-256 (``entries``), with a fresh run id
    also stamped into ``report.json`` / ``recovery.json``. :func:`replaceable` later checks all
    of it against the files actually there."""
    run_id = uuid.uuid4().hex
    _stamp_run_id(directory, run_id)
    entries: dict[str, dict[str, Any]] = {}
    for rel, entry in _walk(directory):
        if rel == MARKER or not entry.is_file(follow_symlinks=False):
            continue
        entries[rel] = {"size": entry.stat(follow_symlinks=False).st_size,
                        "sha256": file_sha256(Path(entry.path))}
    files = sorted(p.name for p in directory.iterdir() if p.name != MARKER)
    data = {"neuroal": __version__, "format": MARKER_FORMAT, "kind": kind, "run_id": run_id,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "files": files, "entries": entries}
    tmp = directory / (MARKER + ".part")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, directory / MARKER)


def _run_id_in(path: Path) -> str | None:
    for name in ("report.json", "recovery.json"):
        try:
            data = json.loads((path / name).read_text())
        except (OSError, ValueError):
            continue
        return data.get("run_id") if isinstance(data, dict) else None
    return None


def _marked_refusal(path: Path, marker: dict[str, Any]) -> str | None:
    """Why the marked output ``path`` may not be replaced (None: every entry at every depth is
    one neuroal wrote, unchanged since). A marker alone proves nothing: its run id must be the
    one inside ``report.json`` / ``recovery.json``, every listed name one neuroal writes, and
    every file's size and SHA-256 those of the bytes there now."""
    entries = marker["entries"]
    if not isinstance(entries, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("sha256"), str) for v in entries.values()):
        return "its marker neuroal_output.json is malformed"
    run_id = marker.get("run_id")
    if not isinstance(run_id, str) or _run_id_in(path) != run_id:
        return ("its marker neuroal_output.json does not carry the run id stored in its "
                "report.json / recovery.json (edited or copied from another output)")
    odd = sorted(rel for rel in entries if not OUTPUT_NAMES.match(rel))
    if odd:
        return f"its marker lists entries neuroal never writes: {', '.join(odd[:8])}"
    listed_dirs = {rel.rsplit("/", 1)[0] for rel in entries if "/" in rel}
    foreign, changed_files = [], []
    for rel, entry in _walk(path):
        if rel == MARKER:
            continue
        if entry.is_symlink():
            foreign.append(rel + " (a symbolic link)")
        elif entry.is_dir(follow_symlinks=False):
            if rel not in listed_dirs:
                foreign.append(rel + "/")
        elif rel not in entries:
            foreign.append(rel)
        elif entry.stat(follow_symlinks=False).st_size != entries[rel].get("size") or \
                file_sha256(Path(entry.path)) != entries[rel]["sha256"]:
            changed_files.append(rel)
    missing = sorted(rel for rel in entries if not (path / rel).is_file())
    if foreign:
        return (f"it is a neuroal output but also holds files neuroal did not write: "
                f"{', '.join(foreign[:8])}")
    if changed_files or missing:
        return ("files neuroal wrote there were changed or removed since: "
                f"{', '.join((changed_files + missing)[:8])}")
    return None


def _legacy_report(path: Path) -> bool:
    """``report.json`` with the keys and types every neuroal prune report carries."""
    try:
        report = json.loads((path / "report.json").read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(report, dict) and REPORT_KEYS <= set(report)
            and isinstance(report.get("timings"), dict)
            and isinstance(report.get("achieved_sparsity"), (int, float))
            and isinstance(report.get("model"), str))


def _legacy_config(path: Path) -> bool:
    """``neuroal_config.yaml`` that is a resolved neuroal config (model, criterion, engine...)."""
    import yaml

    try:
        data = yaml.safe_load((path / "neuroal_config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and CONFIG_SECTIONS <= set(data) and \
        isinstance(data.get("model"), dict)


def _legacy_kind(path: Path) -> str | None:
    """``prune`` / ``recover`` for a marker-less output of an earlier neuroal, else None: a
    ``report.json`` with the report's schema beside a resolved ``neuroal_config.yaml``, or a
    recovery's ``recovery.json`` (variant, perp) beside ``config.json``."""
    if (path / "report.json").is_file() or (path / "neuroal_config.yaml").is_file():
        return "prune" if _legacy_report(path) and _legacy_config(path) else None
    try:
        recovery = json.loads((path / "recovery.json").read_text())
    except (OSError, ValueError):
        return None
    if isinstance(recovery, dict) and {"variant", "perp", "train"} <= set(recovery) and \
            (path / "config.json").is_file():
        return "recover"
    return None


def _by_hand(path: Path) -> str:
    return (f"if it is an old neuroal output you no longer need, delete it by hand "
            f"(rm -r {shlex.quote(str(path))}) or choose another --output")


def replaceable(path: Path) -> tuple[bool, str]:
    """Whether ``--overwrite`` may replace the existing directory ``path``, and why (not).

    Replaceable: an empty directory; a neuroal output whose marker's run id matches its report
    and whose every entry, at every depth, is listed with the size and SHA-256 it has now; a
    marker-less output of an earlier neuroal whose names are exactly ones it wrote and whose
    report and config have neuroal's schema.
    """
    try:
        with os.scandir(path) as scan:
            entries = {e.name: e for e in scan}
    except OSError as exc:
        return False, f"it cannot be listed ({exc.strerror})"
    if not entries:
        return True, "empty"
    marker = read_marker(path)
    if marker is not None and "entries" in marker:
        try:
            why = _marked_refusal(path, marker)
        except OSError as exc:
            return False, f"it cannot be read ({exc.strerror})"
        if why:
            return False, why
        return True, f"a neuroal {marker.get('kind', 'output')} output"
    kind = _legacy_kind(path)
    if kind is None:
        what = ("its neuroal_output.json lists names only (an earlier format, or hand-written) "
                "and it is not an exact output of an earlier neuroal" if marker is not None else
                "it is not a neuroal output (no neuroal_output.json, and no report.json / "
                "recovery.json of neuroal's schema)")
        return False, f"{what}; {_by_hand(path)}"
    foreign = sorted(n for n, e in entries.items()
                     if e.is_dir(follow_symlinks=False) or e.is_symlink()
                     or not (LEGACY_FILES.match(n) or n == MARKER))
    if foreign:
        return False, (f"it looks like an output of an earlier neuroal but also holds entries "
                       f"neuroal does not write: {', '.join(foreign[:8])}; {_by_hand(path)}")
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
