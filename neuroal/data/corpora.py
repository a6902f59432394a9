"""The published corpora of the papers: WikiText-2 and C4, local copy first, hub second.

* ``wikitext2``: calibration reads the word-level validation text (``wiki.valid.tokens``),
  evaluation the raw test text (``wiki.test.raw``).
* ``c4``: the first shard of ``allenai/c4`` (``en/c4-train.00000-of-01024.json.gz`` for
  calibration, ``en/c4-validation.00000-of-00008.json.gz`` for evaluation).
"""

from __future__ import annotations

import gzip
import itertools
import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from neuroal.config.inputs import file_sha256
from neuroal.data.files import (
    data_dir_with_origin,
    find_local,
    hub_load,
    load_dataset,
    read_text,
)
from neuroal.data.spec import SourceDocuments, SourceInfo, SourceText

WIKITEXT_HUB_ID = "wikitext"
WIKITEXT_TEST_FILE = "wiki.test.raw"
WIKITEXT_VALID_FILE = "wiki.valid.tokens"
C4_HUB_ID = "allenai/c4"
C4_TRAIN_FILE = "en/c4-train.00000-of-01024.json.gz"
C4_VALIDATION_FILE = "en/c4-validation.00000-of-00008.json.gz"
C4_EVAL_DOCUMENTS = 1100
"""Number of C4 validation documents joined for evaluation (the reference loaders' choice)."""

# --------------------------------------------------------------------------- wikitext2


def _wikitext_local(data_dir: str | Path | None, filename: str) -> tuple[Path | None, list[str],
                                                                         str]:
    """Look for a WikiText-2 file in ``<data_dir>/wikitext2/`` or ``<data_dir>/``."""
    root, origin = data_dir_with_origin(data_dir)
    found, tried = find_local(root, [f"wikitext2/{filename}", filename])
    return found, tried, origin


def wikitext2_calibration_text(data_dir: str | Path | None = None) -> SourceText:
    """The WikiText-2 word-level validation text (``wiki.valid.tokens``) for calibration.

    Without a local file, rebuilds it from the ``wikitext-2-v1`` validation rows: non-blank
    rows keep their ``"\\n"`` and blank rows become ``" \\n"``, the layout of the published file
    [reconstructed: row layout recalled, not checked against the hub here].

    Args:
        data_dir: Data directory, or ``None`` for :func:`~neuroal.data.files.resolve_data_dir`'s default.

    Returns:
        The text and its provenance.
    """
    found, tried, origin = _wikitext_local(data_dir, WIKITEXT_VALID_FILE)
    if found is not None:
        text = read_text(found)
        info = SourceInfo("wikitext2", "calibration", "local", str(found), file_sha256(found),
                          len(text), note="wiki.valid.tokens read as UTF-8")
        return SourceText(text, info)
    call = f"datasets.load_dataset({WIKITEXT_HUB_ID!r}, 'wikitext-2-v1', split='validation')"
    rows = hub_load("WikiText-2 calibration text not found", call,
                    lambda: load_dataset(WIKITEXT_HUB_ID, "wikitext-2-v1", split="validation"),
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
        data_dir: Data directory, or ``None`` for :func:`~neuroal.data.files.resolve_data_dir`'s default.

    Returns:
        The joined text and its provenance.
    """
    found, tried, origin = _wikitext_local(data_dir, WIKITEXT_TEST_FILE)
    if found is not None:
        text = "\n\n".join(read_text(found).splitlines(keepends=True))
        info = SourceInfo("wikitext2", "evaluation", "local", str(found), file_sha256(found),
                          len(text), note="universal newlines, splitlines(keepends=True), "
                                          "joined with '\\n\\n'")
        return SourceText(text, info)
    call = f"datasets.load_dataset({WIKITEXT_HUB_ID!r}, 'wikitext-2-raw-v1', split='test')"
    rows = hub_load("WikiText-2 test text not found", call,
                    lambda: load_dataset(WIKITEXT_HUB_ID, "wikitext-2-raw-v1", split="test"),
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
    root, origin = data_dir_with_origin(data_dir)
    found, tried = find_local(root, _c4_candidates(hub_file))
    if found is not None:
        texts = _iter_json_gz_texts(found)
        docs = list(itertools.islice(texts, limit))
        info = SourceInfo("c4", purpose, "local", str(found), file_sha256(found),
                          n_documents=len(docs))
        return SourceDocuments(docs, info)
    call = f"datasets.load_dataset({C4_HUB_ID!r}, data_files={{{split!r}: {hub_file!r}}}, " \
           f"split={split!r})"
    dataset = hub_load(f"C4 {purpose} shard not found", call,
                       lambda: load_dataset(C4_HUB_ID, data_files={split: hub_file}, split=split),
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
