"""The ownership marker of a neuroal output (``neuroal_output.json``) and what ``--overwrite``
may replace: an empty folder, or one whose every file the marker lists (format 2: size, SHA-256,
the run id), or a marker-less output of an earlier neuroal version holding only files neuroal
writes. The write rules that use it live in :mod:`neuroal.outputs.safety`.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import shlex
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from neuroal import __version__
from neuroal.config.inputs import file_sha256
from neuroal.runtime.errors import OutputExistsError
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

MARKER = "neuroal_output.json"
MARKER_FORMAT = 2  # 2: every file at every depth with size and SHA-256, and a run id
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
