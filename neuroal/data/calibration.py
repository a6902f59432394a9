"""Calibration data: named text sources, data-directory lookup and seeded token windows.

Sources are registered by name in :data:`SOURCES` (style rule 3) and chosen with a spec string:

* ``wikitext2``: WikiText-2. Calibration reads the word-level validation text
  (``wiki.valid.tokens``), evaluation the raw test text (``wiki.test.raw``).
* ``c4``: the first shard of ``allenai/c4`` (``en/c4-train.00000-of-01024.json.gz`` for
  calibration, ``en/c4-validation.00000-of-00008.json.gz`` for evaluation).
* ``text:<path>``: any UTF-8 text file.
* ``self``: data-free calibration; sequences are sampled from the model itself with
  :func:`sample_self_windows`, which the engine drives with its own next-token function.

Local files win; when no local copy exists the loaders fall back to ``datasets.load_dataset``
(network). Every loader returns a :class:`SourceInfo` saying where the text came from, for the
run report.

The calibration draw follows the shared evaluation protocol (specs README, "Calibration"):
tokenise the whole text once, call ``random.seed(seed)`` immediately before drawing, then draw
``start = random.randint(0, n - T - 1)`` per window. A draw of k windows is therefore the
prefix of a draw of more windows with the same seed.
"""

from __future__ import annotations

import gzip
import itertools
import json
import logging
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from neuroal.config.inputs import file_sha256, not_a_file
from neuroal.runtime.registry import Registry, UnknownNameError

logger = logging.getLogger(__name__)

ENV_DATA_DIR = "NEUROAL_DATA_DIR"
"""Environment variable naming the data directory when no explicit one is given."""

WIKITEXT_HUB_ID = "wikitext"
WIKITEXT_TEST_FILE = "wiki.test.raw"
WIKITEXT_VALID_FILE = "wiki.valid.tokens"
C4_HUB_ID = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_EVAL_DOCUMENTS = 1100
"""Number of C4 validation documents joined for evaluation (the reference loaders' choice)."""

_FIX_HINT = (
    "pass --data-dir DIR (or set {env}=DIR) to a folder that holds the file (the project "
    "keeps its copies in shared/data next to the repository), or allow network access so "
    "that datasets.load_dataset can download it"
)


class DataNotFoundError(FileNotFoundError):
    """Raised when a text source has no local file and cannot be downloaded."""


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
"""Text sources by name: ``wikitext2``, ``c4``, ``text`` and ``self``."""


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
        _require_text_file(str(parsed.arg))
    if source.check is not None:
        source.check(parsed)
    return parsed


def _require_text_file(path: str) -> Path:
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


def _resolve_data_dir_with_origin(data_dir: str | Path | None) -> tuple[Path | None, str]:
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
    return _resolve_data_dir_with_origin(data_dir)[0]


def _find_local(data_dir: Path | None, relative_paths: Sequence[str]) -> tuple[Path | None,
                                                                              list[str]]:
    """The first existing ``data_dir / p`` among ``relative_paths``, and every path tried."""
    if data_dir is None:
        return None, []
    tried = [data_dir / rel for rel in relative_paths]
    found = next((path for path in tried if path.is_file()), None)
    return found, [str(path) for path in tried]


def _hub_load(description: str, hub_call: str, load: Callable[[], Any], *, filename: str,
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


def _load_dataset(*args: Any, **kwargs: Any) -> Any:
    """``datasets.load_dataset``, looked up at call time (tests replace it)."""
    import datasets

    return datasets.load_dataset(*args, **kwargs)


def _read_text(path: Path) -> str:
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


# --------------------------------------------------------------------------- tokenisation


def tokenize_text(text: str, tokenizer: TextTokenizer) -> torch.Tensor:
    """Tokenise a whole text once with the tokenizer's default call.

    Args:
        text: The text.
        tokenizer: A Hugging Face tokenizer (or anything returning ``{"input_ids": (1, n)}``).

    Returns:
        Token ids, shape ``(n,)``, int64.
    """
    ids = torch.as_tensor(tokenizer(text, return_tensors="pt")["input_ids"])
    if ids.dim() == 2:
        ids = ids[0]
    return ids.to(torch.int64)


# --------------------------------------------------------------------------- window draws


def _check_sizes(nsamples: int, seqlen: int) -> None:
    """Reject non-positive window counts and lengths."""
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be positive integers "
                         f"(got nsamples={nsamples}, seqlen={seqlen})")


def _check_window_budget(n_tokens: int, nsamples: int, seqlen: int, source: str) -> None:
    """Refuse draws asking for more tokens than the stream holds (a product requirement)."""
    _check_sizes(nsamples, seqlen)
    if nsamples * seqlen > n_tokens or n_tokens <= seqlen:
        raise ValueError(
            f"calibration source {source!r} has {n_tokens} tokens, fewer than "
            f"nsamples * seqlen = {nsamples} * {seqlen} = {nsamples * seqlen} (and a window "
            f"start needs at least seqlen + 1 = {seqlen + 1} tokens); lower nsamples or seqlen, "
            "or use a larger text source"
        )


def calibration_starts(n_tokens: int, nsamples: int, seqlen: int, seed: int, *,
                       source: str = "token stream") -> list[int]:
    """Window start positions of the protocol draw.

    Calls ``random.seed(seed)`` and then ``random.randint(0, n_tokens - seqlen - 1)`` once per
    window, in order, with no other use of ``random`` in between.

    Args:
        n_tokens: Length ``n`` of the token stream.
        nsamples: Number of windows ``N``.
        seqlen: Window length ``T``.
        seed: Seed for Python's ``random``.
        source: Name of the stream, for error messages.

    Returns:
        ``N`` start positions in ``[0, n - T - 1]``.

    Raises:
        ValueError: ``N * T > n`` or ``n <= T``; the message says how to fix it.
    """
    _check_window_budget(n_tokens, nsamples, seqlen, source)
    random.seed(seed)
    return [random.randint(0, n_tokens - seqlen - 1) for _ in range(nsamples)]


def calibration_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, *,
                        source: str = "token stream") -> torch.Tensor:
    """The protocol draw of calibration windows from one token stream.

    Args:
        ids: Token stream, shape ``(n,)``, int64.
        nsamples: Number of windows ``N``.
        seqlen: Window length ``T``.
        seed: Seed for Python's ``random`` (set immediately before drawing).
        source: Name of the stream, for error messages.

    Returns:
        Windows ``ids[start : start + T]``, shape ``(N, T)``, int64.

    Raises:
        ValueError: ``ids`` is not 1-D, or ``N * T > n``.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D token stream, got shape {tuple(ids.shape)}")
    starts = calibration_starts(ids.numel(), nsamples, seqlen, seed, source=source)
    return torch.stack([ids[start:start + seqlen] for start in starts]).to(torch.int64)


def document_calibration_windows(documents: Sequence[str], tokenizer: TextTokenizer,
                                 nsamples: int, seqlen: int, seed: int, *,
                                 max_draws_per_window: int = 10_000) -> torch.Tensor:
    """The paper-protocol document draw (the C4 loader of Wanda, SparseGPT, OWL and NeuroAL).

    After ``random.seed(seed)``, for each window: draw a random document index with
    ``random.randint(0, len(documents) - 1)`` until the document tokenises to more than ``T``
    tokens, then draw ``start = random.randint(0, n_doc - T - 1)`` and take ``[start, start+T)``.

    Args:
        documents: The documents (C4 ``text`` fields).
        tokenizer: Tokenizer called once per drawn document (default call).
        nsamples: Number of windows ``N``.
        seqlen: Window length ``T``.
        seed: Seed for Python's ``random``.
        max_draws_per_window: Give up after this many too-short documents in a row (a guard
            only; it never changes a draw that succeeds).

    Returns:
        Windows, shape ``(N, T)``, int64.

    Raises:
        ValueError: No documents, bad sizes, or no long-enough document was found.
    """
    _check_sizes(nsamples, seqlen)
    if not documents:
        raise ValueError("document_calibration_windows needs at least one document")
    random.seed(seed)
    return torch.stack([
        _draw_document_window(documents, tokenizer, seqlen, max_draws_per_window)
        for _ in range(nsamples)
    ])


def _draw_document_window(documents: Sequence[str], tokenizer: TextTokenizer, seqlen: int,
                          max_draws: int) -> torch.Tensor:
    """One window of the document draw; shape ``(T,)``."""
    for _ in range(max_draws):
        ids = tokenize_text(documents[random.randint(0, len(documents) - 1)], tokenizer)
        if ids.numel() > seqlen:
            start = random.randint(0, ids.numel() - seqlen - 1)
            return ids[start:start + seqlen]
    raise ValueError(
        f"no document longer than seqlen={seqlen} tokens in {max_draws} random draws from "
        f"{len(documents)} documents; use a shorter seqlen or a source with longer documents"
    )


# --------------------------------------------------------------------------- self-sampling


def _row_uniforms(seed: int, first_row: int, count: int, seqlen: int) -> torch.Tensor:
    """Uniforms in ``[0, 1)`` for rows ``first_row ...``, shape ``(count, T)``, float64.

    Each row has its own CPU ``torch.Generator`` seeded from ``(seed, row)``, so a row's draw
    does not depend on the batch it is sampled in.
    """
    rows = []
    for row in range(first_row, first_row + count):
        row_seed = int(np.random.SeedSequence([seed, row]).generate_state(1, dtype=np.uint64)[0])
        generator = torch.Generator().manual_seed(row_seed)
        rows.append(torch.rand(seqlen, generator=generator, dtype=torch.float64))
    return torch.stack(rows)


def _restrict_top_k(logits: torch.Tensor, top_k: int | None) -> torch.Tensor:
    """Keep the ``top_k`` largest logits of each row (exactly k), others become ``-inf``."""
    if top_k is None or top_k >= logits.shape[-1]:
        return logits
    kept = torch.full_like(logits, float("-inf"))
    values, indices = torch.topk(logits, top_k, dim=-1)
    return kept.scatter(-1, indices, values)


def _sample_rows(logits: torch.Tensor, uniforms: torch.Tensor, temperature: float,
                 top_k: int | None) -> torch.Tensor:
    """Inverse-CDF sampling of one token per row.

    Args:
        logits: Shape ``(B, V)``.
        uniforms: One uniform in ``[0, 1)`` per row, shape ``(B,)``, float64.
        temperature: Softmax temperature (> 0).
        top_k: Restrict to the k most likely tokens, or ``None``.

    Returns:
        Token ids, shape ``(B,)``, int64.
    """
    scaled = _restrict_top_k(logits.to(torch.float64) / temperature, top_k)
    probs = torch.softmax(scaled, dim=-1)
    if not torch.isfinite(probs).all():
        raise ValueError("next_token_logits returned a row with no finite logit (NaN or all -inf)")
    cdf = torch.cumsum(probs, dim=-1)  # (B, V)
    targets = (uniforms * cdf[:, -1]).unsqueeze(1)  # (B, 1)
    # Zero-probability tokens never satisfy cdf[j-1] <= u < cdf[j], so top-k is respected.
    picked = torch.searchsorted(cdf, targets, right=True).squeeze(1)
    return picked.clamp_(max=logits.shape[-1] - 1)


def _check_self_args(nsamples: int, seqlen: int, vocab_size: int, batch_size: int,
                     temperature: float, top_k: int | None) -> None:
    """Validate the scalar arguments of :func:`sample_self_windows`."""
    _check_sizes(nsamples, seqlen)
    if vocab_size < 1 or batch_size < 1:
        raise ValueError(f"vocab_size and batch_size must be positive "
                         f"(got vocab_size={vocab_size}, batch_size={batch_size})")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be None or >= 1, got {top_k}")


def _check_first_tokens(first_tokens: torch.Tensor, nsamples: int, seqlen: int,
                        vocab_size: int) -> torch.Tensor:
    """Given starting tokens as a prefix of shape ``(N, p)``, int64, after validation."""
    if first_tokens.dim() not in (1, 2) or first_tokens.shape[0] != nsamples:
        raise ValueError(f"first_tokens must have shape (nsamples,) or (nsamples, p) with "
                         f"nsamples={nsamples}; got {tuple(first_tokens.shape)}")
    prefix = first_tokens.reshape(nsamples, -1).to(torch.int64).cpu()
    if not 1 <= prefix.shape[1] <= seqlen:
        raise ValueError(f"first_tokens holds a prefix of {prefix.shape[1]} tokens; it must "
                         f"hold between 1 and seqlen={seqlen}")
    if prefix.min() < 0 or prefix.max() >= vocab_size:
        raise ValueError(f"first_tokens must lie in [0, vocab_size={vocab_size})")
    return prefix


def _uniform_first_tokens(uniforms: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """One token per row, uniform over the vocabulary, from ``uniforms`` ``(B,)``; ``(B, 1)``."""
    tokens = torch.floor(uniforms * vocab_size).to(torch.int64)
    return tokens.clamp_(max=vocab_size - 1).unsqueeze(1)


def _sample_batch(next_token_logits: Callable[[torch.Tensor], torch.Tensor],
                  prefix: torch.Tensor, uniforms: torch.Tensor, vocab_size: int,
                  temperature: float, top_k: int | None) -> torch.Tensor:
    """Extend a batch prefix ``(B, p)`` to ``(B, T)`` using per-row uniforms ``(B, T)``."""
    batch, seqlen = uniforms.shape
    ids = torch.empty(batch, seqlen, dtype=torch.int64)
    ids[:, :prefix.shape[1]] = prefix
    for t in range(prefix.shape[1], seqlen):
        logits = next_token_logits(ids[:, :t])
        if logits.dim() != 2 or logits.shape[0] != batch or logits.shape[1] < vocab_size:
            raise ValueError(f"next_token_logits must return shape (B={batch}, >= vocab_size="
                             f"{vocab_size}); got {tuple(logits.shape)}")
        logits = logits[:, :vocab_size].detach().cpu()
        ids[:, t] = _sample_rows(logits, uniforms[:, t], temperature, top_k)
    return ids


def sample_self_windows(next_token_logits: Callable[[torch.Tensor], torch.Tensor],
                        nsamples: int, seqlen: int, seed: int, vocab_size: int, *,
                        batch_size: int, temperature: float = 1.0, top_k: int | None = None,
                        first_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Data-free calibration: sample ``nsamples`` sequences of ``seqlen`` tokens from a model.

    Row ``i`` owns a CPU ``torch.Generator`` seeded from ``(seed, i)`` (via numpy's
    ``SeedSequence``) that yields ``T`` uniforms ``u[0..T-1]``. The row starts from
    ``first_tokens[i]`` or, when not given, from the token ``floor(u[0] * vocab_size)`` (uniform
    over the vocabulary). Each next token ``t`` is drawn from ``softmax(logits / temperature)``
    (restricted to the ``top_k`` largest logits when given) by inverse-CDF sampling with
    ``u[t]``. The draw therefore does not depend on ``batch_size``, and a draw of k rows is the
    prefix of a larger draw with the same seed (given a model whose rows do not interact).

    The caller's ``next_token_logits(ids)`` receives the whole prefix ``ids`` of shape
    ``(B, t)`` (int64, CPU) and returns the logits of the next token, shape ``(B, V)`` with
    ``V >= vocab_size`` (extra columns, e.g. padded embedding rows, are ignored). It may cache
    state between calls; it is called for ``t = p, ..., T - 1`` in order for each batch.

    Args:
        next_token_logits: The model's next-token function (the engine's worker chain).
        nsamples: Number of sequences ``N``.
        seqlen: Sequence length ``T``.
        seed: Seed of the draw.
        vocab_size: Vocabulary size ``V``.
        batch_size: Rows per call to ``next_token_logits``.
        temperature: Softmax temperature (> 0).
        top_k: Sample among the ``top_k`` most likely tokens only; ``None`` for all.
        first_tokens: Starting tokens, shape ``(N,)`` or a prefix ``(N, p)`` with ``p <= T``.

    Returns:
        Token ids, shape ``(N, T)``, int64, on the CPU.

    Raises:
        ValueError: Bad sizes, temperature, top_k, first_tokens or logits shape.
    """
    _check_self_args(nsamples, seqlen, vocab_size, batch_size, temperature, top_k)
    given = None
    if first_tokens is not None:
        given = _check_first_tokens(first_tokens, nsamples, seqlen, vocab_size)
    batches = []
    for lo in range(0, nsamples, batch_size):
        rows = min(batch_size, nsamples - lo)
        uniforms = _row_uniforms(seed, lo, rows, seqlen)  # (B, T)
        prefix = (_uniform_first_tokens(uniforms[:, 0], vocab_size) if given is None
                  else given[lo:lo + rows])
        batches.append(_sample_batch(next_token_logits, prefix, uniforms, vocab_size,
                                     temperature, top_k))
        logger.debug("self-sampled rows %d-%d of %d", lo, lo + rows - 1, nsamples)
    return torch.cat(batches)


# --------------------------------------------------------------------------- wikitext2


def _wikitext_local(data_dir: str | Path | None, filename: str) -> tuple[Path | None, list[str],
                                                                         str]:
    """Look for a WikiText-2 file in ``<data_dir>/wikitext2/`` or ``<data_dir>/``."""
    root, origin = _resolve_data_dir_with_origin(data_dir)
    found, tried = _find_local(root, [f"wikitext2/{filename}", filename])
    return found, tried, origin


def wikitext2_calibration_text(data_dir: str | Path | None = None) -> SourceText:
    """The WikiText-2 word-level validation text (``wiki.valid.tokens``) for calibration.

    Without a local file, rebuilds it from the ``wikitext-2-v1`` validation rows: non-blank
    rows keep their ``"\\n"`` and blank rows become ``" \\n"``, the layout of the published file
    [reconstructed: row layout recalled, not checked against the hub here].

    Args:
        data_dir: Data directory, or ``None`` for :func:`resolve_data_dir`'s default.

    Returns:
        The text and its provenance.
    """
    found, tried, origin = _wikitext_local(data_dir, WIKITEXT_VALID_FILE)
    if found is not None:
        text = _read_text(found)
        info = SourceInfo("wikitext2", "calibration", "local", str(found), file_sha256(found),
                          len(text), note="wiki.valid.tokens read as UTF-8")
        return SourceText(text, info)
    call = f"datasets.load_dataset({WIKITEXT_HUB_ID!r}, 'wikitext-2-v1', split='validation')"
    rows = _hub_load("WikiText-2 calibration text not found", call,
                     lambda: _load_dataset(WIKITEXT_HUB_ID, "wikitext-2-v1", split="validation"),
                     filename=WIKITEXT_VALID_FILE, tried=tried, data_dir_origin=origin)["text"]
    text = "".join(row if row.strip() else " \n" for row in rows)
    info = SourceInfo("wikitext2", "calibration", "hub", call, None, len(text),
                      note="validation rows concatenated, blank rows as ' \\n' "
                           "(reconstruction of wiki.valid.tokens)")
    return SourceText(text, info)


def wikitext2_evaluation_text(data_dir: str | Path | None = None) -> SourceText:
    """The WikiText-2 raw test text for perplexity, joined as the protocol says.

    Local ``wiki.test.raw``: read with universal newlines, ``splitlines(keepends=True)``, joined
    with ``"\\n\\n"``. Hub fallback: the ``wikitext-2-raw-v1`` test rows joined with ``"\\n\\n"``
    (a slightly different stream; the report records which was used).

    Args:
        data_dir: Data directory, or ``None`` for :func:`resolve_data_dir`'s default.

    Returns:
        The joined text and its provenance.
    """
    found, tried, origin = _wikitext_local(data_dir, WIKITEXT_TEST_FILE)
    if found is not None:
        text = "\n\n".join(_read_text(found).splitlines(keepends=True))
        info = SourceInfo("wikitext2", "evaluation", "local", str(found), file_sha256(found),
                          len(text), note="universal newlines, splitlines(keepends=True), "
                                          "joined with '\\n\\n'")
        return SourceText(text, info)
    call = f"datasets.load_dataset({WIKITEXT_HUB_ID!r}, 'wikitext-2-raw-v1', split='test')"
    rows = _hub_load("WikiText-2 test text not found", call,
                     lambda: _load_dataset(WIKITEXT_HUB_ID, "wikitext-2-raw-v1", split="test"),
                     filename=WIKITEXT_TEST_FILE, tried=tried, data_dir_origin=origin)["text"]
    text = "\n\n".join(rows)
    info = SourceInfo("wikitext2", "evaluation", "hub", call, None, len(text),
                      note="test rows joined with '\\n\\n' (differs slightly from the local file)")
    return SourceText(text, info)


# --------------------------------------------------------------------------- c4


def _c4_candidates(hub_file: str) -> list[str]:
    """Relative paths tried for a local copy of a C4 shard."""
    name = hub_file.rsplit("/", 1)[-1]
    return [f"c4/{hub_file}", f"c4/{name}", hub_file, name]


def _iter_json_gz_texts(path: Path) -> Iterator[str]:
    """The ``text`` field of each line of a ``.json.gz`` (JSON lines) file."""
    with gzip.open(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)["text"]


def _c4_documents(data_dir: str | Path | None, hub_file: str, split: str, purpose: str,
                  limit: int | None) -> SourceDocuments:
    """C4 documents from a local shard copy, else from the hub by file name (wanda #23)."""
    root, origin = _resolve_data_dir_with_origin(data_dir)
    found, tried = _find_local(root, _c4_candidates(hub_file))
    if found is not None:
        texts = _iter_json_gz_texts(found)
        docs = list(itertools.islice(texts, limit))
        info = SourceInfo("c4", purpose, "local", str(found), file_sha256(found),
                          n_documents=len(docs))
        return SourceDocuments(docs, info)
    call = f"datasets.load_dataset({C4_HUB_ID!r}, data_files={{{split!r}: {hub_file!r}}}, " \
           f"split={split!r})"
    dataset = _hub_load(f"C4 {purpose} shard not found", call,
                        lambda: _load_dataset(C4_HUB_ID, data_files={split: hub_file},
                                              split=split),
                        filename=hub_file.rsplit("/", 1)[-1], tried=tried,
                        data_dir_origin=origin)
    if limit:
        dataset = dataset.select(range(min(limit, len(dataset))))
    docs = list(dataset["text"])
    return SourceDocuments(docs, SourceInfo("c4", purpose, "hub", call, n_documents=len(docs)))


def c4_calibration_documents(data_dir: str | Path | None = None) -> SourceDocuments:
    """The documents of ``en/c4-train.00000-of-01024.json.gz`` (paper-protocol calibration).

    Args:
        data_dir: Data directory holding a local copy (``c4/en/…``, ``c4/…`` or directly).

    Returns:
        The documents and their provenance.
    """
    return _c4_documents(data_dir, C4_TRAIN_FILE, "train", "calibration", None)


def c4_evaluation_text(data_dir: str | Path | None = None) -> SourceText:
    """The first 1,100 documents of the C4 validation shard joined with ``" "``.

    This is the reference loaders' C4 perplexity text; they keep its first ``256 * T`` tokens,
    i.e. ``eval_windows(ids, T, max_windows=256)``.

    Args:
        data_dir: Data directory holding a local copy of the validation shard.

    Returns:
        The joined text and its provenance.
    """
    loaded = _c4_documents(data_dir, C4_VALIDATION_FILE, "validation", "evaluation",
                           C4_EVAL_DOCUMENTS)
    text = " ".join(loaded.documents)
    info = replace(loaded.info, n_chars=len(text),
                   note=f"first {C4_EVAL_DOCUMENTS} validation documents joined with ' '")
    return SourceText(text, info)


# --------------------------------------------------------------------------- registered sources


def _stream_calibration(loaded: SourceText, tokenizer: TextTokenizer, nsamples: int,
                        seqlen: int, seed: int) -> CalibrationData:
    """Tokenise a whole text once and apply the protocol window draw."""
    ids = tokenize_text(loaded.text, tokenizer)
    windows = calibration_windows(ids, nsamples, seqlen, seed, source=loaded.info.spec)
    logger.info("calibration: %d windows of %d tokens from %s (%d tokens, %s)", nsamples, seqlen,
                loaded.info.spec, ids.numel(), loaded.info.location)
    return CalibrationData(windows, replace(loaded.info, n_tokens=ids.numel()))


def _calibrate_wikitext2(spec: SourceSpec, tokenizer: TextTokenizer, nsamples: int, seqlen: int,
                         seed: int, data_dir: Path | None) -> CalibrationData:
    return _stream_calibration(wikitext2_calibration_text(data_dir), tokenizer, nsamples,
                               seqlen, seed)


def _calibrate_c4(spec: SourceSpec, tokenizer: TextTokenizer, nsamples: int, seqlen: int,
                  seed: int, data_dir: Path | None) -> CalibrationData:
    loaded = c4_calibration_documents(data_dir)
    windows = document_calibration_windows(loaded.documents, tokenizer, nsamples, seqlen, seed)
    logger.info("calibration: %d windows of %d tokens from c4 (%d documents, %s)", nsamples,
                seqlen, len(loaded.documents), loaded.info.location)
    return CalibrationData(windows, replace(loaded.info, note="document draw (paper protocol)"))


def user_text(spec: SourceSpec, purpose: str) -> SourceText:
    """The text of a ``text:<path>`` source, read as UTF-8 with universal newlines."""
    path = _require_text_file(str(spec.arg))
    text = _read_text(path)
    info = SourceInfo(str(spec), purpose, "file", str(path.resolve()), file_sha256(path),
                      len(text), note="read as UTF-8 with universal newlines")
    return SourceText(text, info)


def _calibrate_text(spec: SourceSpec, tokenizer: TextTokenizer, nsamples: int, seqlen: int,
                    seed: int, data_dir: Path | None) -> CalibrationData:
    return _stream_calibration(user_text(spec, "calibration"), tokenizer, nsamples, seqlen, seed)


def _calibrate_self(spec: SourceSpec, tokenizer: TextTokenizer, nsamples: int, seqlen: int,
                    seed: int, data_dir: Path | None) -> CalibrationData:
    raise ValueError("calibration source 'self' samples from the model, so it has no text to "
                     "load; the engine draws it with neuroal.data.sample_self_windows")


def _no_self_evaluation(spec: SourceSpec, data_dir: Path | None) -> SourceText:
    raise ValueError("'self' is a calibration-only source; evaluate on wikitext2, c4 or "
                     "text:<path>")


SOURCES.add("wikitext2", DataSource(
    "wikitext2", False, _calibrate_wikitext2, lambda spec, d: wikitext2_evaluation_text(d)))
SOURCES.add("c4", DataSource("c4", False, _calibrate_c4, lambda spec, d: c4_evaluation_text(d)))
SOURCES.add("text", DataSource(
    "text:<path>", True, _calibrate_text, lambda spec, d: user_text(spec, "evaluation")))
SOURCES.add("self", DataSource("self", False, _calibrate_self, _no_self_evaluation))


def load_calibration(spec: str | SourceSpec, tokenizer: TextTokenizer, nsamples: int,
                     seqlen: int, seed: int, data_dir: str | Path | None = None, *,
                     chat_template: bool = False) -> CalibrationData:
    """Load a text source and draw calibration windows from it.

    ``wikitext2`` and ``text:<path>`` tokenise the whole text once and use the protocol draw
    (:func:`calibration_windows`); ``c4`` uses the document draw
    (:func:`document_calibration_windows`). ``self`` is drawn by the engine with
    :func:`sample_self_windows` and is refused here.

    Args:
        spec: Source spec string (``"wikitext2"``, ``"c4"``, ``"text:<path>"``).
        tokenizer: The model's tokenizer.
        nsamples: Number of windows ``N``.
        seqlen: Window length ``T``.
        seed: Seed of the draw.
        data_dir: Data directory, or ``None`` for :func:`resolve_data_dir`'s default.
        chat_template: Render conversations with the tokenizer's chat template (sources that
            take the option, ``hf:``).

    Returns:
        Windows of shape ``(N, T)`` (int64) and their provenance.

    Raises:
        UnknownNameError: Unknown source (the message lists the valid ones).
        DataNotFoundError: Missing file and no network.
        ValueError: Bad sizes, or the text is too short for ``N * T`` tokens.
    """
    parsed = parse_source(spec)
    _check_sizes(nsamples, seqlen)
    source = SOURCES.get(parsed.name)
    options = {"chat_template": chat_template} if chat_template else {}
    unsupported = sorted(set(options) - set(source.options))
    if unsupported:
        raise ValueError(f"calib.{unsupported[0]}=true does not apply to source {str(parsed)!r}; "
                         "it applies to hf:<dataset> sources")
    return source.calibrate(parsed, tokenizer, nsamples, seqlen, seed,
                            Path(data_dir) if data_dir is not None else None, **options)
