"""The keys under which ``report.json`` (``neuroal prune``) and ``neuroal evaluate``'s JSON store
scores: one name per concept, whichever command wrote them.

* ``dense_ppl`` / ``dense``: the dense reference (a prune with ``eval.dense: true``);
* ``model_ppl`` / ``model``: the model the command evaluated (the pruned model in a prune,
  before any recovery; whatever model ``evaluate`` was given);
* ``recovered_ppl``: the model after a prune's recovery steps.

Perplexities sit under ``eval.<set>``, zero-shot metrics under
``eval.tasks.results.<task>`` (prune) or ``tasks.results.<task>`` (evaluate). Reports written
before this scheme used ``sparse_ppl`` / ``sparse`` (prune) and ``ppl`` (evaluate): the readers
below accept them, so plots, cards and benchmark renderers read old files unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DENSE_PPL = "dense_ppl"
MODEL_PPL = "model_ppl"
RECOVERED_PPL = "recovered_ppl"
DENSE = "dense"
MODEL = "model"
OLD_MODEL_PPL = ("sparse_ppl", "ppl")  # prune's and evaluate's names before MODEL_PPL
OLD_MODEL = ("sparse",)  # prune's task-metrics name before MODEL


def _first(entry: Mapping[str, Any] | None, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if entry and key in entry:
            return entry[key]
    return None


def model_ppl(entry: Mapping[str, Any] | None) -> Any:
    """The evaluated model's perplexity in ``entry`` (``eval.<set>`` of a report, or a
    ``compare`` row's per-set map), under the current key or an older one; None if absent."""
    return _first(entry, (MODEL_PPL, *OLD_MODEL_PPL))


def model_metrics(row: Mapping[str, Any] | None) -> Any:
    """The evaluated model's metrics in a task row (``...results.<task>``), current or older
    key; None if absent."""
    return _first(row, (MODEL, *OLD_MODEL))


def final_ppl(entry: Mapping[str, Any] | None) -> Any:
    """The perplexity of the model as written: after recovery if any, else :func:`model_ppl`."""
    recovered = _first(entry, (RECOVERED_PPL,))
    return recovered if recovered is not None else model_ppl(entry)
