"""Data-free calibration (source ``self``): sequences sampled from the model itself.

:func:`sample_self_windows` draws token by token with the engine's next-token function and
per-row seeded uniforms, so a draw does not depend on the batch size and a draw of k rows is
the prefix of a larger one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch

from neuroal.data.windows import check_sizes

logger = logging.getLogger(__name__)


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
    check_sizes(nsamples, seqlen)
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
