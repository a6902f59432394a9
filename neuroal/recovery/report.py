"""``report["recovery"]``: what each step of the recovery chain did, summed over the model.

What lives here: :func:`recovery_report` (per step its name, label, options, time and
perplexity before and after) and the sums of the per-layer and per-block facts the refiners and
``perp-reconstruct`` record during the final prune. Whole-model PERP completes its entry later
(:func:`neuroal.recovery.handoff.retrain_phase`).

What it may import: the ``recovery`` floor and below (outputs, models, runtime). The prepared
run (:class:`neuroal.pipeline.Prepared`) arrives as a duck-typed argument (``config`` and
``dtype``), a type hint only under ``TYPE_CHECKING``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from neuroal.models.adapter import ModelAdapter
from neuroal.models.loading import build_skeleton
from neuroal.outputs.report_keys import MODEL_PPL
from neuroal.recovery import RECONSTRUCT, RECOVERY_STEPS, REFINERS, prune_steps, resolved_options
from neuroal.recovery.perp import numel, total_parameters
from neuroal.runtime.jobs import BlockReport

if TYPE_CHECKING:
    from neuroal.config.build import PruneConfig
    from neuroal.pipeline import Prepared


def refiner_totals(name: str, blocks: list[BlockReport]) -> dict[str, Any]:
    """Sum one refiner's per-layer facts (``info["recovery"][name]``) over the whole model."""
    facts = [layer.info["recovery"][name] for b in blocks for layer in b.layers
             if name in layer.info.get("recovery", {})]
    rows = sum(f["rows"] for f in facts) or 1
    return {"seconds": sum(f["seconds"] for f in facts), "layers_refined": len(facts),
            "swaps": sum(f["swaps"] for f in facts),
            **{key: sum(f[key] for f in facts)
               for key in ("rows", "rows_changed", "stopped_rows", "rows_worse")},
            "max_cycles_run": max((f["cycles"] for f in facts), default=0),
            "eps_before": sum(f["eps_before"] * f["rows"] for f in facts) / rows,
            "eps_after": sum(f["eps_after"] * f["rows"] for f in facts) / rows}


def reconstruct_totals(blocks: list[BlockReport], total: int) -> dict[str, Any]:
    """Sum the per-block facts of ``perp-reconstruct`` (``BlockReport.info``) over the model.

    ``trainable`` adds every block's trainables (each block is fitted alone); the fraction is
    of the ``total`` model parameters. MSEs are block means (NaN when ``measure`` is off).
    """
    facts = [{"index": b.index, **b.info[RECONSTRUCT.name]} for b in blocks
             if RECONSTRUCT.name in b.info]
    n = max(1, len(facts))
    trainable = sum(f["trainable"] for f in facts)
    return {"seconds": sum(f["seconds"] for f in facts), "blocks_reconstructed": len(facts),
            "trainable": trainable, "trainable_fraction": trainable / max(1, total),
            "tokens": sum(f["tokens"] for f in facts),
            "mse_before": sum(f["mse_before"] for f in facts) / n,
            "mse_after": sum(f["mse_after"] for f in facts) / n, "blocks": facts}


def recovery_report(cfg: PruneConfig, prep: Prepared, blocks: list[BlockReport],
                    sparse: dict[str, float], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """``report["recovery"]``: per step its name, label, options, time and perplexity before
    and after. Refiners and ``perp-reconstruct`` run inside the final prune, so "after" is the
    pruned model's perplexity and "before" that of the same prune without them, measured only
    with ``recover.baseline: true`` (null otherwise). A whole-model PERP step's entry is
    completed by :func:`retrain_phase`."""
    steps = []
    for name in cfg.recover.steps:
        step = RECOVERY_STEPS.get(name)
        entry: dict[str, Any] = {"name": name, "label": step.label, "stage": step.stage,
                                 "options": resolved_options(name, cfg.recover.options)}
        if name in REFINERS:
            entry.update(refiner_totals(name, blocks))
        elif name == RECONSTRUCT.name:
            entry.update(reconstruct_totals(blocks, model_parameters(prep)))
        if name in prune_steps([name]):
            entry["ppl_before"] = baseline[MODEL_PPL] if baseline else None
            entry["ppl_after"] = sparse
            entry["before"] = ("the same prune without the in-prune recovery steps "
                               "(recover.baseline)" if baseline
                               else "not measured; set recover.baseline=true (one more load, "
                               "allocation, prune and evaluation)")
        steps.append(entry)
    return {"steps": steps, "baseline": baseline}


def model_parameters(prep: Prepared) -> int:
    """Parameters of the model (tied tensors once), from a meta skeleton."""
    adapter = ModelAdapter(build_skeleton(prep.config, prep.dtype))
    total = total_parameters(adapter.model)
    if adapter.tied and adapter.head.weight is not adapter.embed.weight:
        total -= numel(adapter.head.weight)  # a meta skeleton may leave a tied head untied
    return total
