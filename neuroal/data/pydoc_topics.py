"""``pydoc``: an out-of-domain English corpus that ships with every CPython.

WikiText-2 is the only corpus on the offline benchmark machine, so whole-model PERP (which
retrains on WikiText-2 validation windows) could only be evaluated in-domain (WikiText-2 test).
This source gives a second, differently styled text with no download: the Python standard
library's help topics, :data:`pydoc_data.topics.topics`, a dict of about 80 long English help
texts (the language reference chapters ``help()`` prints: statements, operators, data model),
reStructuredText prose with grammar and code excerpts.

Text: the values in **sorted key order**, each stripped of surrounding whitespace, joined with
``"\\n\\n"``. The order does not depend on the dict's insertion order, so one CPython version
always gives the same text; other CPython versions ship other texts (the source's
:class:`~neuroal.data.spec.SourceInfo` records the version, which the evaluation log line
names, and the SHA-256 of the joined text, so a figure can be matched to its text).

Licence: the texts are part of CPython's documentation, distributed with CPython under the
Python Software Foundation License (PSF-2.0); neuroal copies nothing, it reads the module of the
running interpreter.

Registered in :data:`neuroal.data.spec.SOURCES` for evaluation and, with the stream
protocol of ``text:<path>``, calibration.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

from neuroal.data.spec import (
    SOURCES,
    CalibrationData,
    DataSource,
    SourceInfo,
    SourceSpec,
    SourceText,
    TextTokenizer,
)
from neuroal.data.windows import stream_calibration

PYDOC_SEPARATOR = "\n\n"
"""Joins consecutive topics."""


def pydoc_topics_text() -> str:
    """The help topics of the running CPython, in sorted key order, joined with ``"\\n\\n"``.

    Raises:
        ValueError: The interpreter ships no ``pydoc_data`` (some stripped distributions).
    """
    try:
        from pydoc_data.topics import topics
    except ImportError as exc:  # pragma: no cover - every CPython build ships it
        raise ValueError("data source 'pydoc' needs the standard library's pydoc_data module, "
                         f"which this Python ({platform.python_version()}) lacks; evaluate on "
                         "wikitext2 or text:<path> instead") from exc
    return PYDOC_SEPARATOR.join(topics[key].strip() for key in sorted(topics))


def pydoc_text(purpose: str) -> SourceText:
    """The ``pydoc`` text and its provenance (``purpose``: calibration or evaluation)."""
    from pydoc_data.topics import topics

    text = pydoc_topics_text()
    info = SourceInfo("pydoc", purpose, "stdlib",
                      f"pydoc_data.topics.topics (CPython {platform.python_version()})",
                      hashlib.sha256(text.encode("utf-8")).hexdigest(), len(text),
                      n_documents=len(topics),
                      note="every topic in sorted key order, stripped, joined with '\\n\\n'; "
                           "PSF License")
    return SourceText(text, info)


def _calibrate_pydoc(spec: SourceSpec, tokenizer: TextTokenizer, nsamples: int, seqlen: int,
                     seed: int, data_dir: Path | None) -> CalibrationData:
    return stream_calibration(pydoc_text("calibration"), tokenizer, nsamples, seqlen, seed)


SOURCES.add("pydoc", DataSource("pydoc", False, _calibrate_pydoc,
                                lambda spec, d: pydoc_text("evaluation")))
