"""Calibration data: the built-in text sources and :func:`load_calibration`, the entry point.

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

The pieces live in their own modules, re-exported here under their old names:
:mod:`~neuroal.data.spec` (spec strings, the registry, the records a source returns),
:mod:`~neuroal.data.files` (data directory, local copies, hub fallback, UTF-8 reading),
:mod:`~neuroal.data.windows` (tokenisation and the window draws),
:mod:`~neuroal.data.self_sampling` (``self``) and :mod:`~neuroal.data.corpora` (WikiText-2, C4).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from neuroal.config.inputs import file_sha256
from neuroal.data.corpora import (
    C4_EVAL_DOCUMENTS,
    C4_HUB_ID,
    C4_TRAIN_FILE,
    C4_VALIDATION_FILE,
    WIKITEXT_HUB_ID,
    WIKITEXT_TEST_FILE,
    WIKITEXT_VALID_FILE,
    c4_calibration_documents,
    c4_evaluation_text,
    wikitext2_calibration_text,
    wikitext2_evaluation_text,
)
from neuroal.data.files import (
    ENV_DATA_DIR,
    DataNotFoundError,
    read_text,
    require_text_file,
    resolve_data_dir,
)
from neuroal.data.self_sampling import sample_self_windows
from neuroal.data.spec import (
    SOURCES,
    CalibrateFn,
    CalibrationData,
    DataSource,
    EvalTextFn,
    SourceDocuments,
    SourceInfo,
    SourceSpec,
    SourceText,
    TextTokenizer,
    parse_source,
    valid_source_specs,
)
from neuroal.data.windows import (
    calibration_starts,
    calibration_windows,
    check_sizes,
    document_calibration_windows,
    stream_calibration,
    tokenize_text,
)

__all__ = [
    "C4_EVAL_DOCUMENTS",
    "C4_HUB_ID",
    "C4_TRAIN_FILE",
    "C4_VALIDATION_FILE",
    "ENV_DATA_DIR",
    "SOURCES",
    "WIKITEXT_HUB_ID",
    "WIKITEXT_TEST_FILE",
    "WIKITEXT_VALID_FILE",
    "CalibrateFn",
    "CalibrationData",
    "DataNotFoundError",
    "DataSource",
    "EvalTextFn",
    "SourceDocuments",
    "SourceInfo",
    "SourceSpec",
    "SourceText",
    "TextTokenizer",
    "c4_calibration_documents",
    "c4_evaluation_text",
    "calibration_starts",
    "calibration_windows",
    "document_calibration_windows",
    "load_calibration",
    "parse_source",
    "resolve_data_dir",
    "sample_self_windows",
    "tokenize_text",
    "user_text",
    "valid_source_specs",
    "wikitext2_calibration_text",
    "wikitext2_evaluation_text",
]

logger = logging.getLogger(__name__)


def _calibrate_wikitext2(spec: SourceSpec, tokenizer: TextTokenizer, nsamples: int, seqlen: int,
                         seed: int, data_dir: Path | None) -> CalibrationData:
    return stream_calibration(wikitext2_calibration_text(data_dir), tokenizer, nsamples,
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
    path = require_text_file(str(spec.arg))
    text = read_text(path)
    info = SourceInfo(str(spec), purpose, "file", str(path.resolve()), file_sha256(path),
                      len(text), note="read as UTF-8 with universal newlines")
    return SourceText(text, info)


def _calibrate_text(spec: SourceSpec, tokenizer: TextTokenizer, nsamples: int, seqlen: int,
                    seed: int, data_dir: Path | None) -> CalibrationData:
    return stream_calibration(user_text(spec, "calibration"), tokenizer, nsamples, seqlen, seed)


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
    check_sizes(nsamples, seqlen)
    source = SOURCES.get(parsed.name)
    options = {"chat_template": chat_template} if chat_template else {}
    unsupported = sorted(set(options) - set(source.options))
    if unsupported:
        raise ValueError(f"calib.{unsupported[0]}=true does not apply to source {str(parsed)!r}; "
                         "it applies to hf:<dataset> sources")
    return source.calibrate(parsed, tokenizer, nsamples, seqlen, seed,
                            Path(data_dir) if data_dir is not None else None, **options)
