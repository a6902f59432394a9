"""Strict checks of user input at the edge (style rule 5): option types, sizes, sequence lengths.

Low module (standard library only): :mod:`neuroal.config.build`, the planner, the export and every
``launch/`` entry point share these checks, so one value is read the same way everywhere.
Every function returns error strings (``"key=value: expected ..."``) or raises ``ValueError``
naming the value; none of them prints or exits.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
from collections.abc import Iterable, Mapping
from decimal import Decimal
from pathlib import Path
from typing import Any

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
# Unit as typed (any case) -> (spelling accelerate reads as bytes, multiplier folded into the
# number). accelerate has no TB / TiB and no bare bytes: those become GB / GiB or an int.
_UNITS = {"KB": ("KB", 1), "MB": ("MB", 1), "GB": ("GB", 1), "TB": ("GB", 1000),
          "KIB": ("KiB", 1), "MIB": ("MiB", 1), "GIB": ("GiB", 1), "TIB": ("GiB", 1024)}
SIZE_HELP = "bytes or a number with a unit (B, KB, MB, GB, TB or KiB, MiB, GiB, TiB), e.g. 2GB"


def parse_size(value: int | float | str, label: str = "size") -> int:
    """The one size parser: ``"2GB"`` -> 2e9, ``"80GiB"`` -> 80 * 2^30, ``1.5e9`` -> bytes.

    Used for ``output.shard_size``, ``engine.memory_limit``, ``--gpu-memory`` and
    ``--shard-size`` alike. The conversion is accelerate's ``convert_file_size_to_int`` (what
    ``max_memory`` reads: ``KB`` = 1000, ``KiB`` = 1024); this wrapper first normalises what
    accelerate does not read: spaces, ``TB`` / ``TiB``, ``B`` and bare numbers (bytes), floats,
    and unit case. Every unit means bytes whatever its case: ``"2gb"`` is 2e9 bytes here,
    where accelerate would read a lower-case ``b`` as bits.

    Raises:
        ValueError: Not a positive size; the message names ``label`` and the value.
    """
    from accelerate.utils import convert_file_size_to_int

    normal = _accelerate_spelling(value)
    if normal is None:
        raise ValueError(f"{label}={value!r}: expected {SIZE_HELP}")
    try:
        number = convert_file_size_to_int(normal)
    except (ValueError, OverflowError):  # negative, or beyond a float ("1e300TB")
        number = 0
    if number < 1:
        raise ValueError(f"{label}={value!r}: expected a positive size, {SIZE_HELP}")
    return number


def _accelerate_spelling(value: object) -> int | str | None:
    """``value`` as accelerate's parser reads it with neuroal's meaning: an int of bytes or a
    ``"<number><KB|MB|GB|KiB|MiB|GiB>"`` string; 0 for a number that is not finite or below 1
    byte; None when ``value`` is no size at all."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value >= 1 else 0
    match = _SIZE.match(value)
    if match is None:
        return None
    text, unit = match.group(1), (match.group(2) or "B").upper()
    if not math.isfinite(float(text)):
        return 0
    if unit == "B":
        return _accelerate_spelling(float(text))
    spelling, factor = _UNITS[unit]
    if factor != 1:
        text = str(Decimal(text) * factor)  # exact: "1.5TB" -> "1500.0GB"
    return f"{text}{spelling}"


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


def file_kind(path: str | Path) -> str:
    """What ``path`` is, in words (``'missing'``, ``'a regular file'``, ``'a directory'``,
    ``'a FIFO (named pipe)'``, ``'a character device'``, ...); symbolic links not followed."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as exc:
        return f"unreadable ({exc.strerror})"
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "a special file"


def not_a_file(path: str | Path) -> str | None:
    """None when ``path`` (links followed) is a regular file, else what it is instead:
    ``'does not exist'``, ``'is a directory, not a regular file'``, ``'is a FIFO (named
    pipe), not a regular file'``... (never "does not exist" for something that exists)."""
    target = Path(os.path.expanduser(str(path)))
    try:
        real = os.path.realpath(target)
    except OSError:
        real = str(target)
    kind = file_kind(real)
    if kind == "a regular file":
        return None
    if kind == "missing":
        return "does not exist" + (" (a dangling symbolic link)" if os.path.islink(target) else "")
    return f"is {kind}, not a regular file"


# --------------------------------------------------------------------------- YAML

YAML_MAX_BYTES = 1 << 20  # a recipe is a few kB; 1 MiB leaves room and stops a flood early
YAML_MAX_ALIASES = 100  # aliases (*name) per document; recipes need none or a few
YAML_MAX_DEPTH = 32  # nesting of mappings / sequences
YAML_MAX_NODES = 100_000  # values after alias expansion, counted before building anything


class YAMLLimitError(ValueError):
    """A YAML text is over a size, depth, alias or expansion limit, or repeats a key."""


def _strict_loader(label: str) -> type:
    """A PyYAML ``SafeLoader`` subclass that refuses duplicate keys and counts aliases, depth
    and the nodes an alias expansion would make, before any Python object is constructed."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        aliases = 0

        def compose_node(self, parent: Any, index: Any) -> Any:  # noqa: ANN401
            if self.check_event(yaml.AliasEvent):
                StrictLoader.aliases += 1
                if StrictLoader.aliases > YAML_MAX_ALIASES:
                    mark = self.peek_event().start_mark
                    raise YAMLLimitError(
                        f"{label}: more than {YAML_MAX_ALIASES} YAML aliases (*name), line "
                        f"{mark.line + 1}; neuroal refuses it before expanding them (an alias "
                        "bomb); write the values out")
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:  # noqa: ANN401
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    hash(key)
                except TypeError:
                    continue  # unhashable: SafeLoader reports it
                if key in seen:
                    raise YAMLLimitError(
                        f"{label}: key {key!r} appears twice in one mapping (lines {seen[key]} "
                        f"and {key_node.start_mark.line + 1}); YAML would silently keep the "
                        "last one: keep one of them")
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep=deep)

    # YAML 1.2 booleans: only true / false. YAML 1.1 also reads yes/no/on/off as booleans, so
    # `log.progress=off` was refused and `trust_remote_code: yes` became True; here those stay
    # words (a boolean option then refuses them, naming true or false).
    bool_tag = "tag:yaml.org,2002:bool"
    StrictLoader.yaml_implicit_resolvers = {
        first: [(tag, rx) for tag, rx in resolvers if tag != bool_tag]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    StrictLoader.add_implicit_resolver(bool_tag, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                       list("tTfF"))
    return StrictLoader


def _expanded_size(node: Any, depth: int, label: str, memo: dict[int, int]) -> int:
    """Values ``node`` expands to (aliases counted as often as used), refusing deep nesting."""
    import yaml

    if depth > YAML_MAX_DEPTH:
        raise YAMLLimitError(f"{label}: YAML nested deeper than {YAML_MAX_DEPTH} levels "
                             f"(line {node.start_mark.line + 1}); a recipe needs a few")
    key = id(node)
    if key in memo:
        return memo[key]
    memo[key] = 1  # a recursive alias counts once while it is being measured
    if isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, depth + 1, label, memo) +
                       _expanded_size(v, depth + 1, label, memo) for k, v in node.value)
    elif isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(v, depth + 1, label, memo) for v in node.value)
    else:
        size = 1
    memo[key] = size
    if size > YAML_MAX_NODES:
        raise YAMLLimitError(f"{label}: the YAML expands to more than {YAML_MAX_NODES} values "
                             "(aliases repeat their anchors' values); neuroal refuses it before "
                             "expanding it (an alias bomb)")
    return size


def safe_yaml_load(text: str, label: str = "YAML") -> Any:
    """Parse one YAML document with PyYAML's safe loader, within limits: at most
    :data:`YAML_MAX_BYTES` of text, :data:`YAML_MAX_ALIASES` aliases, :data:`YAML_MAX_DEPTH`
    levels and :data:`YAML_MAX_NODES` values after expansion (all checked on the node graph,
    before anything is built), and no key twice in one mapping.

    Raises:
        YAMLLimitError: a limit or a duplicate key; the message names ``label`` and the line.
        yaml.YAMLError: the text is not YAML.
    """
    if len(text.encode("utf-8", "surrogatepass")) > YAML_MAX_BYTES:
        raise YAMLLimitError(f"{label}: {len(text)} characters of YAML, more than the "
                             f"{YAML_MAX_BYTES} bytes a recipe may have")
    loader = _strict_loader(label)(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, 0, label, {})
        return loader.construct_document(node)
    except RecursionError:
        raise YAMLLimitError(f"{label}: YAML nested too deeply to read; a recipe needs a few "
                             "levels") from None
    finally:
        loader.dispose()
