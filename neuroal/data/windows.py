"""Tokenisation and the seeded window draws of calibration.

The stream draw follows the shared evaluation protocol (specs README, "Calibration"): tokenise
the whole text once, call ``random.seed(seed)`` immediately before drawing, then draw
``start = random.randint(0, n - T - 1)`` per window. A draw of k windows is therefore the
prefix of a draw of more windows with the same seed. Document sources (C4) use the
paper-protocol document draw (:func:`document_calibration_windows`).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import replace

import torch

from neuroal.data.spec import CalibrationData, SourceText, TextTokenizer

logger = logging.getLogger(__name__)

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


def check_sizes(nsamples: int, seqlen: int) -> None:
    """Reject non-positive window counts and lengths."""
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be positive integers "
                         f"(got nsamples={nsamples}, seqlen={seqlen})")


def _check_window_budget(n_tokens: int, nsamples: int, seqlen: int, source: str) -> None:
    """Refuse draws asking for more tokens than the stream holds (a product requirement)."""
    check_sizes(nsamples, seqlen)
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
    check_sizes(nsamples, seqlen)
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


# --------------------------------------------------------------------------- text sources


def stream_calibration(loaded: SourceText, tokenizer: TextTokenizer, nsamples: int,
                       seqlen: int, seed: int) -> CalibrationData:
    """Tokenise a whole text once and apply the protocol window draw."""
    ids = tokenize_text(loaded.text, tokenizer)
    windows = calibration_windows(ids, nsamples, seqlen, seed, source=loaded.info.spec)
    logger.info("calibration: %d windows of %d tokens from %s (%d tokens, %s)", nsamples, seqlen,
                loaded.info.spec, ids.numel(), loaded.info.location)
    return CalibrationData(windows, replace(loaded.info, n_tokens=ids.numel()))
