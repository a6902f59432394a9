"""Source spec strings and the registry of text sources.

A source is registered by name in :data:`SOURCES` (style rule 3) as a :class:`DataSource` and
chosen with a spec string (``wikitext2``, ``text:<path>``, ``hf:<id>``, ...) that
:func:`parse_source` checks before any loading. A source returns its text or windows with a
:class:`SourceInfo` saying where they came from, for the run report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from neuroal.data.files import require_text_file
from neuroal.runtime.registry import Registry, UnknownNameError


class TextTokenizer(Protocol):
    """What the loaders need from a tokenizer: the default Hugging Face call."""

    def __call__(self, text: str, **kwargs: Any) -> Any:
        """Tokenise ``text``; with ``return_tensors="pt"`` returns ``{"input_ids": (1, n)}``."""
        ...


@dataclass(frozen=True)
class SourceSpec:
    """A parsed source spec string.

    Attributes:
        name: Registered source name (``wikitext2``, ``c4``, ``text``, ``self``).
        arg: The argument after ``:`` (the path for ``text``), else ``None``.
    """

    name: str
    arg: str | None = None

    def __str__(self) -> str:
        return self.name if self.arg is None else f"{self.name}:{self.arg}"


@dataclass(frozen=True)
class SourceInfo:
    """Where a text came from, for the run report.

    Attributes:
        spec: The source spec string (``"wikitext2"``, ``"text:/x.txt"``, ...).
        purpose: ``"calibration"`` or ``"evaluation"``.
        origin: ``"local"`` (a file in the data directory), ``"hub"`` (``datasets.load_dataset``),
            ``"file"`` (a user file from ``text:<path>``), ``"model"`` (``self``) or ``"stdlib"``
            (``pydoc``: a text shipped with the interpreter).
        location: The file path, or the hub call that produced the text.
        sha256: SHA-256 of the local file's bytes; ``None`` for hub data.
        n_chars: Characters of the text used (the joined text for evaluation).
        n_documents: Documents available, for document-based sources (C4).
        n_tokens: Tokens in the tokenised stream, once known.
        note: How the text was assembled (joins, protocol caveats).
    """

    spec: str
    purpose: str
    origin: str
    location: str
    sha256: str | None = None
    n_chars: int | None = None
    n_documents: int | None = None
    n_tokens: int | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable copy."""
        return asdict(self)


@dataclass(frozen=True)
class SourceText:
    """A loaded text and its provenance."""

    text: str
    info: SourceInfo


@dataclass(frozen=True)
class SourceDocuments:
    """A loaded list of documents (C4) and its provenance."""

    documents: list[str]
    info: SourceInfo


@dataclass(frozen=True)
class CalibrationData:
    """Calibration windows and their provenance.

    Attributes:
        windows: Token ids, shape ``(nsamples, seqlen)``, int64.
        source_info: Where the text came from.
    """

    windows: torch.Tensor
    source_info: SourceInfo


CalibrateFn = Callable[[SourceSpec, TextTokenizer, int, int, int, Path | None], CalibrationData]
EvalTextFn = Callable[[SourceSpec, Path | None], SourceText]


@dataclass(frozen=True)
class DataSource:
    """A registered text source.

    Attributes:
        usage: How the source is written in a spec string (``"text:<path>"``).
        takes_arg: Whether the spec needs an argument after ``:``.
        calibrate: ``(spec, tokenizer, nsamples, seqlen, seed, data_dir) -> CalibrationData``.
        evaluation_text: ``(spec, data_dir) -> SourceText``, the text for perplexity.
        check: Validates a parsed spec before any loading (e.g. that a file exists).
        options: Keyword options ``calibrate`` accepts (``chat_template``).
        calibration_only: The source has no evaluation text.
    """

    usage: str
    takes_arg: bool
    calibrate: CalibrateFn
    evaluation_text: EvalTextFn
    check: Callable[[SourceSpec], None] | None = None
    options: tuple[str, ...] = ()
    calibration_only: bool = False


SOURCES: Registry[DataSource] = Registry("data source")
"""Text sources by name: ``wikitext2``, ``c4``, ``text`` and ``self`` (registered by
:mod:`neuroal.data.calibration`), ``hf`` and ``tokens`` (:mod:`neuroal.data.sources`) and
``pydoc`` (:mod:`neuroal.data.pydoc_topics`)."""


# --------------------------------------------------------------------------- spec parsing


def valid_source_specs() -> str:
    """The valid spec forms, comma-separated (``"c4, self, text:<path>, wikitext2"``)."""
    return ", ".join(SOURCES.get(name).usage for name in SOURCES.names())


def parse_source(spec: str | SourceSpec) -> SourceSpec:
    """Parse a source spec string such as ``"wikitext2"`` or ``"text:/data/my.txt"``.

    Args:
        spec: The spec string (or an already parsed spec, returned re-validated).

    Returns:
        The parsed :class:`SourceSpec`.

    Raises:
        UnknownNameError: The name is not registered; the message lists the valid specs.
        ValueError: A source that takes no argument got one, or ``text:`` has no path.
        DataNotFoundError: ``text:<path>`` names a file that does not exist.
    """
    raw = str(spec).strip()
    name, sep, arg = raw.partition(":")
    if name not in SOURCES:
        raise UnknownNameError(
            f"unknown data source {raw!r}; valid sources: {valid_source_specs()}"
        )
    source = SOURCES.get(name)
    if source.takes_arg and not arg:
        raise ValueError(f"data source {raw!r} needs an argument: write it as {source.usage}")
    if not source.takes_arg and sep:
        raise ValueError(f"data source {name!r} takes no argument (got {raw!r}); "
                         f"valid sources: {valid_source_specs()}")
    parsed = SourceSpec(SOURCES.canonical(name), arg if sep else None)
    if parsed.name == "text":
        require_text_file(str(parsed.arg))
    if source.check is not None:
        source.check(parsed)
    return parsed
