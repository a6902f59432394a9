"""Strict checks of user input at the edge (style rule 5): option types, sizes, sequence lengths.

Low module (standard library only): :mod:`neuroal.config`, the planner, the export and every
``launch/`` entry point share these checks, so one value is read the same way everywhere.
Every function returns error strings (``"key=value: expected ..."``) or raises ``ValueError``
naming the value; none of them prints or exits.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
SIZE_HELP = "bytes or a number with a unit (B, KB, MB, GB, TB or KiB, MiB, GiB, TiB), e.g. 2GB"


def parse_size(value: int | float | str, label: str = "size") -> int:
    """The one size parser: ``"2GB"`` -> 2e9, ``"80GiB"`` -> 80 * 2^30, ``1.5e9`` -> bytes.

    Used for ``output.shard_size``, ``engine.memory_limit``, ``--gpu-memory`` and
    ``--shard-size`` alike (accelerate's ``convert_file_size_to_int`` reads the same units).

    Raises:
        ValueError: Not a positive size; the message names ``label`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"{label}={value!r}: expected {SIZE_HELP}")
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(f"{label}={value!r}: expected {SIZE_HELP}")
        number = float(match.group(1)) * _UNITS[(match.group(2) or "").upper()]
    else:
        number = float(value)
    if not math.isfinite(number) or number < 1:
        raise ValueError(f"{label}={value!r}: expected a positive size, {SIZE_HELP}")
    return int(number)


# --------------------------------------------------------------------------- option types


def is_int(value: Any) -> bool:
    """An integer, and not a boolean (YAML ``true`` is not 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, not a boolean."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


_EXPECTED = {
    "bool": (lambda v: isinstance(v, bool), "true or false (an unquoted YAML boolean)"),
    "int": (is_int, "an integer"),
    "float": (is_number, "a finite number"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "tuple[str, ...]": (lambda v: isinstance(v, (tuple, list)) and all(isinstance(s, str)
                                                                      for s in v),
                        "a list of strings"),
}


def type_error(label: str, value: Any, annotation: str) -> str | None:
    """The error of ``value`` against a dataclass field annotation such as ``"int | None"``.

    Only the plain scalar annotations (bool, int, float, str, their ``| None`` forms and
    ``tuple[str, ...]``) are checked; anything else returns None (checked elsewhere).
    """
    base = annotation.removesuffix(" | None")
    if base not in _EXPECTED:
        return None
    if value is None and annotation.endswith(" | None"):
        return None
    check, expected = _EXPECTED[base]
    if check(value):
        return None
    hint = ""
    if base == "bool" and isinstance(value, str):
        hint = "; write true or false without quotes"
    elif base in ("int", "float") and isinstance(value, bool):
        hint = "; a boolean is not a number"
    none = " or null" if annotation.endswith(" | None") else ""
    return f"{label}={value!r}: expected {expected}{none}{hint}"


def typed_fields(prefix: str, cls: type, values: Mapping[str, Any], errors: list[str],
                 skip: Iterable[str] = ()) -> dict[str, Any]:
    """``values`` without the fields of dataclass ``cls`` whose type is wrong (those become
    errors, the field keeps its default so that the other checks still run)."""
    import dataclasses

    annotations = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = {}
    skipped = set(skip)
    for key, value in values.items():
        error = None if key in skipped else type_error(f"{prefix}{key}", value,
                                                       annotations.get(key, ""))
        if error is None:
            out[key] = value
        else:
            errors.append(error)
    return out


def positive_int(label: str, value: Any, minimum: int = 1) -> list[str]:
    """``[error]`` unless ``value`` is an integer >= ``minimum``."""
    if is_int(value) and value >= minimum:
        return []
    return [f"{label}={value!r}: expected an integer >= {minimum}"]


def positive_number(label: str, value: Any) -> list[str]:
    """``[error]`` unless ``value`` is a finite number > 0."""
    if is_number(value) and value > 0:
        return []
    return [f"{label}={value!r}: expected a finite number > 0"]


# --------------------------------------------------------------------------- model and paths


def max_positions(model_config: Any) -> int | None:
    """The model's ``max_position_embeddings`` (or ``n_positions``), None when it has none."""
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model_config, attr, None)
        if is_int(value) and value > 0:
            return value
    return None


def position_errors(model_config: Any, seqlens: Mapping[str, int | None],
                    model_name: str) -> list[str]:
    """A window longer than the model's positions: errors naming each setting and the limit."""
    limit = max_positions(model_config)
    if limit is None:
        return []
    return [f"{label}={value} exceeds max_position_embeddings={limit} of model {model_name!r}; "
            f"use {limit} tokens or fewer per window"
            for label, value in seqlens.items() if is_int(value) and value > limit]


def output_name_error(label: str, path: str | Path) -> str | None:
    """An output path without a name of its own (``.``, ``..``, ``/``, ``dir/..``): neuroal
    writes a new directory and never into the current or a parent one."""
    p = Path(path)
    if p.name in ("", ".", ".."):
        return (f"{label}={str(path)!r} names no new directory (it is the current, a parent or "
                "the root directory); give a new directory name, e.g. outputs/pruned")
    return None


def label_flags(errors: Iterable[str], flags: Mapping[str, str]) -> list[str]:
    """Prefix each ``key=...`` error with the command-line flag that set ``key``."""
    out = []
    for error in errors:
        key = error.split("=", 1)[0].split(":", 1)[0].strip()
        flag = flags.get(key)
        out.append(f"{flag}: {error}" if flag else error)
    return out


def file_sha256(path: Path) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
