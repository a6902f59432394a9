"""Perplexity data: evaluation text, token windows and the perplexity formula.

Follows the shared evaluation protocol (specs README, "Perplexity"): tokenise the evaluation
text once, cut the ids into ``floor(n / T)`` non-overlapping windows of ``T`` tokens in order
(dropping the remainder), score each window by the mean cross-entropy of its ``T - 1``
next-token predictions, and report ``exp(mean over windows of those means)``. The model call
itself lives in the engine; this module holds only the data side and the final formula.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from neuroal.data.spec import (
    SOURCES,
    SourceInfo,
    SourceSpec,
    SourceText,
    TextTokenizer,
    parse_source,
)
from neuroal.data.windows import tokenize_text

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalData:
    """Perplexity windows and their provenance.

    Attributes:
        windows: Token ids, shape ``(k, seqlen)``, int64.
        source_info: Where the text came from (``n_tokens`` is the full stream length).
    """

    windows: torch.Tensor
    source_info: SourceInfo


def eval_text(spec: str | SourceSpec, data_dir: str | Path | None = None) -> SourceText:
    """The text used for perplexity.

    ``wikitext2``: ``wiki.test.raw`` read with universal newlines, split with
    ``splitlines(keepends=True)`` and joined with ``"\\n\\n"`` (hub fallback: the
    ``wikitext-2-raw-v1`` test rows joined with ``"\\n\\n"``). ``c4``: the first 1,100 validation
    documents joined with ``" "``. ``text:<path>``: the file as read. ``pydoc``: the running
    CPython's help topics in sorted key order joined with ``"\\n\\n"``
    (:mod:`neuroal.data.pydoc_topics`).

    Args:
        spec: Source spec string (``"wikitext2"``, ``"c4"``, ``"text:<path>"``).
        data_dir: Data directory, or ``None`` for the default lookup
            (:func:`neuroal.data.files.resolve_data_dir`).

    Returns:
        The text and where it came from.

    Raises:
        UnknownNameError: Unknown source (the message lists the valid ones).
        DataNotFoundError: Missing file and no network.
        ValueError: ``self`` (calibration only).
    """
    parsed = parse_source(spec)
    return SOURCES.get(parsed.name).evaluation_text(
        parsed, Path(data_dir) if data_dir is not None else None)


def eval_token_ids(text: str, tokenizer: TextTokenizer) -> torch.Tensor:
    """Tokenise the evaluation text once with the tokenizer's default call.

    Args:
        text: The evaluation text (from :func:`eval_text`).
        tokenizer: The model's tokenizer.

    Returns:
        Token ids, shape ``(n,)``, int64.
    """
    return tokenize_text(text, tokenizer)


def eval_windows(ids: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Cut a token stream into the first ``k`` of its ``floor(n / T)`` non-overlapping windows.

    Args:
        ids: Token stream, shape ``(n,)``.
        seqlen: Window length ``T``.
        max_windows: Keep windows ``0 .. k-1`` with ``k = min(max_windows, floor(n / T))``;
            ``None`` keeps all.

    Returns:
        Windows ``ids[i*T : (i+1)*T]`` in order, shape ``(k, T)`` (a view of ``ids``).

    Raises:
        ValueError: ``ids`` is not 1-D, ``seqlen`` or ``max_windows`` is not positive, or the
            stream is shorter than one window.
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D token stream, got shape {tuple(ids.shape)}")
    if seqlen < 1 or (max_windows is not None and max_windows < 1):
        raise ValueError(f"seqlen and max_windows must be positive "
                         f"(got seqlen={seqlen}, max_windows={max_windows})")
    available = ids.numel() // seqlen
    if available == 0:
        raise ValueError(f"the evaluation stream has {ids.numel()} tokens, fewer than one window "
                         f"of seqlen={seqlen}; use a shorter seqlen or a longer text")
    count = available if max_windows is None else min(max_windows, available)
    if max_windows is not None and max_windows > available:
        logger.warning("asked for %d evaluation windows of %d tokens but the stream holds only "
                       "%d; using %d", max_windows, seqlen, available, available)
    return ids[:count * seqlen].view(count, seqlen)


def load_eval_windows(spec: str | SourceSpec, tokenizer: TextTokenizer, seqlen: int,
                      max_windows: int | None = None, data_dir: str | Path | None = None
                      ) -> EvalData:
    """Evaluation text → token ids → the first ``max_windows`` windows, with provenance.

    Args:
        spec: Source spec string.
        tokenizer: The model's tokenizer.
        seqlen: Window length ``T``.
        max_windows: Number of leading windows to keep (``None``: all).
        data_dir: Data directory, or ``None`` for the default lookup.

    Returns:
        Windows of shape ``(k, T)`` and their provenance.
    """
    loaded = eval_text(spec, data_dir)
    ids = eval_token_ids(loaded.text, tokenizer)
    windows = eval_windows(ids, seqlen, max_windows)
    logger.info("evaluation: %d windows of %d tokens from %s (%d tokens, %s)", windows.shape[0],
                seqlen, loaded.info.spec, ids.numel(), loaded.info.location)
    return EvalData(windows, replace(loaded.info, n_tokens=ids.numel()))


def perplexity(window_mean_nll: Sequence[float] | torch.Tensor) -> float:
    """Perplexity from per-window mean negative log-likelihoods.

    ``ppl = exp(mean_w nll_w)`` where ``nll_w`` is the mean cross-entropy (natural log) of the
    ``T - 1`` next-token predictions of window ``w``; the mean is taken in float64.

    Args:
        window_mean_nll: One mean NLL per window, shape ``(k,)``.

    Returns:
        The perplexity (``inf`` when the mean overflows ``exp``).

    Raises:
        ValueError: No windows, or a value is NaN.
    """
    values = torch.as_tensor(window_mean_nll, dtype=torch.float64).reshape(-1)
    if values.numel() == 0:
        raise ValueError("perplexity needs at least one window NLL")
    if torch.isnan(values).any():
        raise ValueError("perplexity got a NaN window NLL; check the model's logits")
    return float(torch.exp(values.mean()))
