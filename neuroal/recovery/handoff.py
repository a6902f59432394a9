"""The recovery chain's hand-offs with a run: options for the final prune, the baseline
prune, and whole-model retraining of the exported model.

What lives here: the chain's settings the PruneJob carries (:func:`refine_steps`,
:func:`reconstruct_options`), the config of the prune without the in-prune steps
(:func:`baseline_variant`, for ``recover.baseline``), and whole-model PERP after the final
prune (:func:`retrain_phase`): export the pruned weights, release the executor, retrain with
transformers, replace the shards in place (:func:`replace_shards`).

What it may import: the ``recovery`` floor and below (outputs, data, models, runtime). The
executor and the prepared run (:class:`neuroal.pipeline.Prepared`) arrive as duck-typed
arguments, type hints only under ``TYPE_CHECKING``; the pipeline runs the baseline prune.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from neuroal.data.evaluation import perplexity
from neuroal.outputs.export import write_weights
from neuroal.outputs.report import format_ppl
from neuroal.recovery import RECONSTRUCT, REFINERS, RetrainStep, prune_steps, resolved_options
from neuroal.recovery.train import prunable_weight_names, retrain, save_model, verify_saved_zeros, window_nll
from neuroal.runtime.logging import get_logger
from neuroal.runtime.process import Timings

if TYPE_CHECKING:
    from neuroal.config.build import PruneConfig
    from neuroal.engine.executor import Executor
    from neuroal.pipeline import Prepared

log = get_logger(__name__)


def refine_steps(cfg: PruneConfig) -> tuple[tuple[str, dict[str, Any]], ...]:
    """``(name, resolved options)`` of the chain's block-wise mask refiners, for the PruneJob."""
    return tuple((name, resolved_options(name, cfg.recover.options))
                 for name in cfg.recover.steps if name in REFINERS)


def reconstruct_options(cfg: PruneConfig) -> dict[str, Any] | None:
    """Resolved options of ``perp-reconstruct`` for the PruneJob, or None if not chained."""
    if RECONSTRUCT.name not in cfg.recover.steps:
        return None
    return resolved_options(RECONSTRUCT.name, cfg.recover.options)



def baseline_variant(cfg: PruneConfig, evaluated: bool) -> PruneConfig | None:
    """With ``recover.baseline``: the config of the same prune without the chain (so without
    the in-prune steps: refiners and ``perp-reconstruct``), whose perplexity the report gives
    as "before" them. None when not requested, when the chain has no in-prune step or when
    nothing is evaluated (``evaluated``: the run has evaluation sources)."""
    if not (cfg.recover.baseline and prune_steps(cfg.recover.steps)):
        return None
    if not evaluated:
        log.warning("recover.baseline=true but eval.datasets is empty: nothing to compare")
        return None
    return replace(cfg, recover=replace(cfg.recover, steps=()))


@contextmanager
def _weights_dir(cfg: PruneConfig, staging: Path | None) -> Iterator[Path]:
    """Where the pruned model is written for whole-model PERP: the staging directory when the
    model is saved, else a temporary directory removed afterwards (``--no-save``)."""
    if staging is not None and cfg.output.save_model:
        yield staging
        return
    with tempfile.TemporaryDirectory(prefix="neuroal-perp-") as tmp:
        yield Path(tmp)


def retrain_phase(cfg: PruneConfig, prep: Prepared, executor: Executor, step: RetrainStep,
                  calib: torch.Tensor, staging: Path | None, report: dict[str, Any],
                  timings: Timings, release: bool) -> None:
    """Whole-model PERP after the final prune: export the pruned weights, release the
    executor (``release``) so one process can hold the model, retrain, re-export in place and
    complete ``report["recovery"]`` and ``report["eval"][*]["recovered_ppl"]``."""
    with _weights_dir(cfg, staging) as directory:
        with timings("export"):
            write_weights(cfg, prep, executor, directory, report)
        if release:
            executor.shutdown()
        with timings(f"recover[{step.name}]"):
            entry = retrain_exported(cfg, prep, step, calib, directory, report["export_dtype"])
    target = next(e for e in report["recovery"]["steps"] if e["name"] == step.name)
    target.update(entry)
    for spec, ppl in entry["ppl_after"].items():
        report["eval"][spec]["recovered_ppl"] = ppl
    report["timings"].update(timings.phases)


def retrain_exported(cfg: PruneConfig, prep: Prepared, step: RetrainStep, calib: torch.Tensor,
                     directory: Path, dtype_name: str) -> dict[str, Any]:
    """Load the exported pruned model with transformers on the run device, measure its
    perplexity, retrain it with PERP on the calibration windows (masks fixed, merged), measure
    again with the same code and windows, and replace the shards in ``directory``.

    Returns the step's report facts (seconds, parameter counts, tokens, loss, perplexities).
    """
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    options = resolved_options(step.name, cfg.recover.options)
    train_options = step.train_options(options)
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=prep.dtype, attn_implementation="sdpa",
        trust_remote_code=cfg.model.trust_remote_code is True).to(prep.device)
    before = _hf_perplexity(model, prep, train_options.eval_batch_size)
    info, state = retrain(model, calib, step.perp_options(options), train_options)
    after = _hf_perplexity(model, prep, train_options.eval_batch_size)
    zeros = replace_shards(model, prep.tokenizer, directory, getattr(torch, dtype_name),
                           cfg.output.shard_size)
    log.info("%s: perplexity %s -> %s", step.label, format_ppl(before), format_ppl(after))
    count = info.count
    assert count is not None  # retrain() fills it
    return {"seconds": time.perf_counter() - t0, "train_seconds": info.seconds,
            "trainable": count.trainable, "trainable_fraction": count.fraction,
            "params": count.to_dict(), "tokens": info.tokens, "steps": info.steps,
            "loss": info.loss_summary(), "untied_head": state.untied,
            "added_biases": len(state.added_biases), "achieved_sparsity_after": zeros,
            "ppl_before": before, "ppl_after": after,
            "before": "the exported pruned model loaded with transformers; same windows and "
                      "evaluation code as after"}


def _hf_perplexity(model: Any, prep: Prepared, batch_size: int) -> dict[str, float]:
    """Perplexity of an in-memory HF model on every evaluation source (same protocol)."""
    return {spec: perplexity(window_nll(model, data.windows, batch_size, prep.device))
            for spec, data in prep.evals.items()}


def replace_shards(model: Any, tokenizer: Any, directory: Path, dtype: torch.dtype,
                   shard_size: str) -> float:
    """Write the retrained ``model`` beside ``directory``, check that every zero of the old
    shards is still zero in the new ones, then move the new shards, index and config into
    ``directory`` (the old shards removed). Returns the achieved sparsity of the new shards.
    """
    new = directory.with_name(directory.name + "-perp")
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    try:
        save_model(model.state_dict(), model, tokenizer, new, dtype, shard_size)
        counts = verify_saved_zeros(directory, new, prunable_weight_names(model))
        for old in [*directory.glob("*.safetensors"), *directory.glob("*.safetensors.index.json")]:
            old.unlink()
        for path in new.iterdir():
            os.replace(path, directory / path.name)
    finally:
        shutil.rmtree(new, ignore_errors=True)
    return sum(c["zeros"] for c in counts.values()) / max(1, sum(c["numel"] for c in counts.values()))
