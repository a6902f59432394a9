"""The content of ``report.json`` (engine.md §9): the run's record, built from plain values.

What lives here: :func:`build_report` (the report's top level), its parts (the per-linear
table, the zero-shot section, the utilisation timings), the version and hardware records, and
the one-line formatting of perplexities the run logs.

What it may import: the ``outputs`` floor and below (models, criteria, runtime). The report is
built above the engine and the pipeline but must not import them: the executor and the
prepared run (:class:`neuroal.pipeline.Prepared`) arrive as duck-typed objects (type hints
only under ``TYPE_CHECKING``), and values that higher floors compute (the planned target of the
pruned linears, the workers' block slices, lm-eval's version) are passed in.
"""

from __future__ import annotations

import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

import neuroal
from neuroal.criteria import criterion_label
from neuroal.models.adapter import ModelAdapter
from neuroal.models.consumers import derive_consumer_map
from neuroal.models.loading import ALIAS_ORIGIN
from neuroal.models.quant import quantization_report
from neuroal.outputs.report_keys import DENSE, DENSE_PPL, MODEL, MODEL_PPL
from neuroal.runtime.jobs import BlockReport
from neuroal.runtime.process import Timings, peak_memory_bytes

if TYPE_CHECKING:
    from neuroal.allocation import SparsityPlan
    from neuroal.config.build import PruneConfig
    from neuroal.engine.executor import Executor
    from neuroal.pipeline import Prepared


def tasks_report(cfg: PruneConfig, dense: dict[str, Any], sparse: dict[str, Any],
                 lm_eval_version: str | None) -> dict[str, Any]:
    """``report["eval"]["tasks"]``: lm-eval's version (``lm_eval_version``, from
    :func:`neuroal.evaluation.zeroshot.lm_eval_version`) and settings, then per task its
    version, shots, documents and metrics of the dense model (``dense``, when measured) beside
    the evaluated one (``model``; keys: :mod:`neuroal.outputs.report_keys`)."""
    results = {}
    for name, row in sparse.items():
        results[name] = {"version": row["version"], "n_shot": row["n_shot"],
                         "samples": row["samples"],
                         DENSE: dense[name]["metrics"] if name in dense else None,
                         MODEL: row["metrics"]}
    return {"lm_eval_version": lm_eval_version, "tasks": list(cfg.eval.tasks),
            "include_path": cfg.eval.include_path, "num_fewshot": cfg.eval.num_fewshot,
            "limit": cfg.eval.limit, "results": results}


def layer_table(blocks: list[BlockReport],
                adapter_prefix: Callable[[int], str]) -> dict[str, dict[str, Any]]:
    """``full linear name -> {target, achieved, pruned, numel}`` in block and execution order."""
    table = {}
    for blk in blocks:
        for layer in blk.layers:
            table[adapter_prefix(blk.index) + layer.name] = {
                "target": layer.target, "achieved": layer.zeros / layer.numel,
                "pruned": layer.pruned, "zeros": layer.zeros, "numel": layer.numel,
                **({"info": layer.info} if layer.info else {}),
            }
    return table


def build_report(cfg: PruneConfig, prep: Prepared, plan: SparsityPlan, blocks: list[BlockReport],
                 dense: dict[str, float], sparse: dict[str, float], timings: Timings,
                 executor: Executor, command: str, *, planned_target: float,
                 slices: list[tuple[int, int]]) -> dict[str, Any]:
    """The ``report.json`` content (issue 2, item 9; engine.md §9).

    ``planned_target``: the target the allocation planned for the pruned linears
    (:func:`neuroal.planning.preflight.plan_target`); ``slices``: each worker's block range
    (:func:`neuroal.engine.executor.split_blocks`).
    """
    prefix = executor.block_prefix
    zeros = sum(r.zeros for b in blocks for r in b.layers)
    numel = sum(r.numel for b in blocks for r in b.layers)
    base_model, license_ = ALIAS_ORIGIN.get(cfg.model.name, (cfg.model.name, None))
    return {
        "model": cfg.model.name,
        "base_model": base_model,
        "license": license_,
        "model_type": getattr(prep.config, "model_type", None),
        "source": {"quantization": quantization_report(prep.config, prep.dtype)},
        "criterion": cfg.criterion.name,
        "criterion_label": criterion_label(cfg.criterion.name),
        "allocation": cfg.allocation.name,
        "pattern": cfg.pattern,
        "target_sparsity": cfg.target_sparsity,
        "planned_sparsity": plan.planned_global(prep.shape),
        "achieved_sparsity": zeros / numel,
        "selection": {**(prep.selection or {}), "sparsity_scope": cfg.sparsity_scope,
                      "planned_target": planned_target,
                      "achieved_sparsity_model":
                          zeros / (numel + (prep.selection or {}).get("ignored_numel", 0))},
        "layers": layer_table(blocks, prefix),
        "blocks": [{"index": b.index, "target": b.target, "achieved": b.achieved,
                    "seconds": b.seconds} for b in blocks],
        "eval": {k: {DENSE_PPL: dense.get(k), MODEL_PPL: sparse.get(k),
                     "windows": int(prep.evals[k].windows.shape[0]),
                     "seqlen": int(prep.evals[k].windows.shape[1])} for k in prep.evals},
        "calibration": {"source": cfg.calib.source, "nsamples": cfg.calib.nsamples,
                        "seqlen": cfg.calib.seqlen, "seed": cfg.calib.seed,
                        "origin": _origin(prep.calib)},
        "plan": {"granularity": plan.granularity, "policy": plan.policy,
                 "warnings": plan.warnings},
        "row_map": derive_consumer_map(prep.config, ModelAdapter).checked(prep.shape.blocks).describe(
            prep.shape.blocks[0], prep.shape.uniform_rows),
        "search": plan.trail if "candidates" in plan.trail else None,
        "timings": {**timings.phases, **utilisation_timings(executor)},
        "workers": executor.worker_info(),
        "slices": slices,
        # the final prune's mode that ran, and how streams crossed between workers (Ray:
        # engine.ray.transport resolved; None: in-process)
        "engine": {"parallel": getattr(executor, "parallel", "pipeline"),
                   "transport": getattr(executor, "transport_name", None)},
        "peak_memory_bytes": peak_memory_bytes(),
        "seeds": {"run": cfg.seed, "calibration": cfg.calib.seed},
        "versions": versions(),
        "hardware": hardware(prep.device),
        "command": command,
        "config": cfg.to_dict(),
    }


def utilisation_timings(executor: Executor) -> dict[str, Any]:
    """Pipeline overlap (engine.md §4): ``<phase>_utilisation`` = sum of the workers' busy
    seconds / (workers x wall seconds) for search, prune and eval; ``<phase>_busy`` per worker;
    ``workers_busy``: each worker's busy seconds over the whole run."""
    out: dict[str, Any] = {}
    for phase, use in executor.utilisation().items():
        out[f"{phase}_utilisation"] = use["utilisation"]
        out[f"{phase}_busy"] = use["busy"]
    out["workers_busy"] = [w["busy_seconds"] for w in executor.worker_info()]
    return out


def _origin(calib: Any) -> Any:
    info = getattr(calib, "source_info", None)
    return info.to_dict() if hasattr(info, "to_dict") else None


def versions() -> dict[str, str]:
    """Library versions and the git SHA of the neuroal checkout (when available)."""
    import transformers

    sha = None
    try:
        root = Path(__file__).resolve().parents[2]  # the checkout holding neuroal/
        sha = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"neuroal": neuroal.__version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "git_sha": sha or "unknown"}


def hardware(device: torch.device) -> dict[str, Any]:
    """CPU model, thread count and accelerator name."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "threads": torch.get_num_threads(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def format_ppl(values: dict[str, float]) -> str:
    """``{"wikitext2": 9.1234}`` -> ``"wikitext2 9.123"`` (the perplexities a run logs)."""
    return ", ".join(f"{k} {v:.3f}" for k, v in values.items())
