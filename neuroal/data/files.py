"""Where source text lives: the data directory, local copies, the hub fallback, UTF-8 reading.

Local files win: :func:`resolve_data_dir` finds the data directory (argument, then
``$NEUROAL_DATA_DIR``, then a ``shared/data`` folder next to the repository) and
:func:`find_local` a file in it; without one, :func:`hub_load` runs a ``datasets.load_dataset``
call (network) and turns its failure into a :class:`DataNotFoundError` that says what was looked
for where and how to fix it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from neuroal.config.inputs import not_a_file

logger = logging.getLogger(__name__)

ENV_DATA_DIR = "NEUROAL_DATA_DIR"
"""Environment variable naming the data directory when no explicit one is given."""

_FIX_HINT = (
    "pass --data-dir DIR (or set {env}=DIR) to a folder that holds the file (the project "
    "keeps its copies in shared/data next to the repository), or allow network access so "
    "that datasets.load_dataset can download it"
)


class DataNotFoundError(FileNotFoundError):
    """Raised when a text source has no local file and cannot be downloaded."""


# --------------------------------------------------------------------------- user files


def require_text_file(path: str) -> Path:
    """The path of a ``text:<path>`` source, checked to be an existing file."""
    file = Path(path).expanduser()
    if not file.is_file() or not_a_file(file) is not None:
        what = not_a_file(file) or "is not a regular file"
        raise DataNotFoundError(
            f"text source file {path!r} {what} (resolved to {file.resolve()}); "
            "give the path of a UTF-8 text file as text:<path>"
        )
    return file


# --------------------------------------------------------------------------- data directory


def _candidate_data_dirs() -> list[Path]:
    """Where ``shared/data`` may sit when neither argument nor environment names a directory."""
    repo = Path(__file__).resolve().parents[2]
    cwd = Path.cwd()
    return [repo.parent / "shared" / "data", repo / "shared" / "data",
            cwd.parent / "shared" / "data", cwd / "shared" / "data"]


def data_dir_with_origin(data_dir: str | Path | None) -> tuple[Path | None, str]:
    """The data directory and a phrase saying how it was found (for error messages)."""
    if data_dir is not None:
        chosen, origin = Path(data_dir).expanduser(), "the data_dir argument (--data-dir)"
    elif os.environ.get(ENV_DATA_DIR):
        chosen, origin = Path(os.environ[ENV_DATA_DIR]).expanduser(), f"${ENV_DATA_DIR}"
    else:
        for candidate in _candidate_data_dirs():
            if candidate.is_dir():
                return candidate.resolve(), "the shared/data folder next to the repository"
        return None, "no --data-dir, no $" + ENV_DATA_DIR + ", no shared/data folder found"
    if not chosen.is_dir():
        raise DataNotFoundError(
            f"data directory {str(chosen)!r} from {origin} does not exist or is not a folder; "
            f"pass --data-dir DIR or set {ENV_DATA_DIR}=DIR to an existing folder"
        )
    return chosen.resolve(), origin


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """Find the data directory.

    Order: the explicit argument, else ``$NEUROAL_DATA_DIR``, else a ``shared/data`` folder next
    to the repository (``<repo>/../shared/data``, ``<cwd>/../shared/data``, ``<cwd>/shared/data``).

    Args:
        data_dir: An explicit directory, or ``None``.

    Returns:
        The resolved directory, or ``None`` when nothing was given and nothing was found.

    Raises:
        DataNotFoundError: An explicitly given directory (argument or environment) is missing.
    """
    return data_dir_with_origin(data_dir)[0]


def find_local(data_dir: Path | None,
               relative_paths: Sequence[str]) -> tuple[Path | None, list[str]]:
    """The first existing ``data_dir / p`` among ``relative_paths``, and every path tried."""
    if data_dir is None:
        return None, []
    tried = [data_dir / rel for rel in relative_paths]
    found = next((path for path in tried if path.is_file()), None)
    return found, [str(path) for path in tried]


def hub_load(description: str, hub_call: str, load: Callable[[], Any], *, filename: str,
             tried: list[str], data_dir_origin: str) -> Any:
    """Run a ``datasets.load_dataset`` fallback; on failure explain what was looked for where."""
    logger.info("no local %s found (tried %s); loading %s", filename, tried or "nothing",
                hub_call)
    try:
        return load()
    except Exception as err:  # any download/offline failure ends in the same helpful error
        where = ", ".join(tried) if tried else f"no data directory ({data_dir_origin})"
        raise DataNotFoundError(
            f"{description}: looked for {filename} in {where}; the network fallback "
            f"{hub_call} failed ({type(err).__name__}: {err}). Fix: "
            + _FIX_HINT.format(env=ENV_DATA_DIR)
        ) from err


def load_dataset(*args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset``, looked up at call time (tests replace it)."""
    import datasets

    return datasets.load_dataset(*args, **kwargs)


def read_text(path: Path) -> str:
    """A UTF-8 text file read with universal newlines (CRLF becomes LF).

    Raises:
        ValueError: The file is not UTF-8 text or holds NUL bytes (a binary file); the message
            names the file and the byte offset.
    """
    try:
        with path.open(encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError:
        try:
            path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:  # decoded whole: the offset is the file's
            bad = path.read_bytes()[exc.start:exc.start + 1].hex()
            raise ValueError(f"text file {str(path)!r} is not UTF-8 text: byte 0x{bad} at byte "
                             f"offset {exc.start} ({exc.reason}); give a UTF-8 text file "
                             "(convert it with iconv -t utf-8)") from None
        raise
    if "\x00" in text:
        offset = path.read_bytes().find(b"\x00")
        raise ValueError(f"text file {str(path)!r} holds a NUL byte at byte offset {offset}: it "
                         "looks like a binary file; give a UTF-8 text file")
    return text
