"""Phase order of a run (style.md §3): resolve -> data -> load -> evaluate dense -> allocate ->
prune -> evaluate sparse -> export.

Every check that needs no weights (config, model path, architecture, N:M divisibility, output
directory, calibration size) runs before any weight is loaded.
"""

from __future__ import annotations

import logging
import platform
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import neuroal
from neuroal.allocation import ALLOCATIONS, ModelShape, PlanRequest, SparsityPlan
from neuroal.config.build import AllocationConfig, ConfigError, PruneConfig
from neuroal.config.inputs import position_errors
from neuroal.criteria import CRITERIA, criterion_label
from neuroal.data import load_calibration, parse_source, sample_self_windows
from neuroal.data.evaluation import load_eval_windows, perplexity
from neuroal.engine import EXECUTORS
from neuroal.engine.cluster import output_errors, resolve_device, run_preflight
from neuroal.engine.executor import Executor, split_blocks
from neuroal.engine.onload import resolved_onload
from neuroal.engine.preflight import disk_needed, folder_bytes, worker_budgets
from neuroal.evaluation.zeroshot import TaskSpec, lm_eval_version, load_tasks, task_manager
from neuroal.evaluation.zeroshot import evaluate_tasks as run_tasks
from neuroal.models.adapter import ModelAdapter
from neuroal.models.consumers import derive_consumer_map
from neuroal.models.loading import (
    ALIAS_ORIGIN,
    ModelSource,
    SafetensorsCheckpoint,
    build_skeleton,
    load_model_config,
    resolve_dtype,
    resolve_model,
    source_dtype,
    weights_fingerprint,
)
from neuroal.models.moe import has_experts
from neuroal.models.quant import quantization_report
from neuroal.models.selection import LayerSelection
from neuroal.outputs.checkpoint import RunState, canonical_config, state_bytes
from neuroal.outputs.compat import make_loadable
from neuroal.outputs.export import (
    OutputDir,
    finalize_shards,
    parse_size,
    slug,
    write_config,
    write_run_files,
)
from neuroal.outputs.guard import (
    check_checkpoint,
    check_decoder_lm,
    check_log_file,
    check_prunable,
    check_source,
    check_text_sources,
    run_inputs,
    source_or_none,
    warn_code_execution,
)
from neuroal.outputs.hub import push_output, upload_hint
from neuroal.outputs.plots import write_plots
from neuroal.outputs.report_keys import DENSE, DENSE_PPL, MODEL, MODEL_PPL
from neuroal.outputs.resume_key import resume_inputs
from neuroal.planning import ModelLayout, check_fits, parse_bytes
from neuroal.recovery import (
    RECONSTRUCT,
    RECOVERY_STEPS,
    REFINERS,
    RetrainStep,
    model_step,
    prune_steps,
    resolved_options,
)
from neuroal.recovery.perp import numel, total_parameters
from neuroal.recovery.train import prunable_weight_names, retrain, save_model, verify_saved_zeros, window_nll
from neuroal.runtime.digests import default_cache_dir
from neuroal.runtime.errors import PreflightError
from neuroal.runtime.jobs import BlockReport, PruneJob
from neuroal.runtime.logging import RunLog, add_log_file, ensure_visible, get_logger, remove_handler
from neuroal.runtime.process import (  # re-exported: tests and tools import them from here
    Timings,
    host_available,
    load_tokenizer,
    peak_memory_bytes,
    pick_device,  # noqa: F401 - re-exported (neuroal.commands.evaluate)
    seed_everything,
)
from neuroal.runtime.progress import configure_progress

log = get_logger(__name__)


@dataclass
class RunResult:
    """What :func:`run` returns: the report, the plan, the output path and the executor.

    ``executor`` is kept alive only when ``keep_executor=True`` (tests inspect masks).
    """

    report: dict[str, Any]
    plan: SparsityPlan
    output: Path | None
    executor: Executor | None = None


@dataclass
class Prepared:
    """Results of the cheap phase: everything resolved and checked, no weights loaded."""

    source: ModelSource
    config: Any
    shape: ModelShape
    device: torch.device
    dtype: torch.dtype
    tokenizer: Any
    calib: Any
    evals: dict[str, Any]
    output: OutputDir | None
    onload: str = "device"  # engine.onload as resolved by the memory planner (auto -> a mode)
    tasks: Any = None  # the lm-eval TaskManager of eval.tasks (neuroal.evaluation.zeroshot), or None
    session: Any = None  # the open dist session (neuroal.engine.dist.coordinator), or None
    selection: dict[str, Any] | None = None  # targets / ignore as report.json records them


# --------------------------------------------------------------------------- preparation


def default_output(cfg: PruneConfig) -> Path:
    """``outputs/<model>-<criterion>-<allocation>-<sparsity or N:M>``."""
    amount = cfg.pattern.replace(":", "of") if cfg.nm else f"{cfg.sparsity:g}"
    name = f"{Path(cfg.model.name).stem}-{cfg.criterion.name}-{cfg.allocation.name}-{amount}"
    name += "".join(f"-{step}" for step in cfg.recover.steps)
    return Path("outputs") / slug(name)


def check_shape(cfg: PruneConfig, shape: ModelShape) -> None:
    """N:M divisibility and worker count against the model (before loading weights)."""
    errors = []
    nm = cfg.nm
    if nm is not None:
        for b, blk in enumerate(shape.blocks):
            for name, (_rows, cols) in blk.items():
                if cols % nm.m:
                    errors.append(f"pattern {cfg.pattern}: block {b} {name} has {cols} input "
                                  f"columns, not divisible by M={nm.m}; choose an M dividing "
                                  "every layer's input size")
                    break
            if errors:
                break
    if cfg.engine.workers > shape.num_blocks:
        errors.append(f"engine.workers={cfg.engine.workers} exceeds the model's "
                      f"{shape.num_blocks} blocks")
    if errors:
        raise ConfigError(errors)


def selection_of(cfg: PruneConfig) -> LayerSelection:
    """The layer selection of ``cfg`` (``targets`` / ``ignore``)."""
    return LayerSelection(tuple(cfg.targets), tuple(cfg.ignore))


def check_selection(cfg: PruneConfig, adapter: ModelAdapter, shape: ModelShape) -> dict[str, Any]:
    """The selection must leave something to prune, and ``sparsity_scope: model`` a reachable
    target; patterns that match nothing are warned about (a typo keeps a layer pruned).
    Returns the selection's record for ``report.json``."""
    record = adapter.selection_report()
    if adapter.selection.everything:
        return record
    for pattern in record["unused_patterns"]:
        log.warning("layer selection: pattern %r matches no prunable linear of this model",
                    pattern)
    if shape.total_numel() == 0:
        raise ConfigError([f"targets={list(cfg.targets)} / ignore={list(cfg.ignore)} leave no "
                           "linear to prune; loosen the patterns"])
    target = plan_target(cfg, shape, record)
    if not 0.0 < target < max(cfg.allocation.clip):
        raise ConfigError([f"sparsity_scope=model: a model-wide {cfg.target_sparsity:g} with "
                           f"{record['ignored_numel']:,} weights kept dense needs "
                           f"{target:.3f} on the pruned linears, above allocation.clip's "
                           f"maximum {max(cfg.allocation.clip):g}; lower the sparsity, ignore "
                           "fewer linears or use sparsity_scope=targeted"])
    log.info("layer selection: %d linears stay dense (%s of the block weights); pruned at %.4f",
             len(record["ignored"]), f"{record['ignored_numel'] / adapter.all_linears_numel():.1%}",
             target)
    return record


def plan_target(cfg: PruneConfig, shape: ModelShape, selection: dict[str, Any] | None) -> float:
    """The target the allocation plans for the pruned linears: the global target, or under
    ``sparsity_scope: model`` the one that makes the mean over every block linear (the
    ignored ones dense) equal to it."""
    ignored = (selection or {}).get("ignored_numel", 0)
    if cfg.sparsity_scope != "model" or not ignored:
        return cfg.target_sparsity
    targeted = shape.total_numel()
    return cfg.target_sparsity * (targeted + ignored) / targeted


def check_positions(cfg: PruneConfig, config: Any) -> None:
    """Calibration and evaluation windows must fit the model's ``max_position_embeddings``."""
    seqlens = {"calib.seqlen": cfg.calib.seqlen}
    if cfg.eval.datasets and cfg.eval.seqlen:
        seqlens["eval.seqlen"] = cfg.eval.seqlen  # unset: evaluation uses calib.seqlen
    errors = position_errors(config, seqlens, cfg.model.name)
    if errors:
        raise ConfigError(errors)

def check_experts(cfg: PruneConfig, adapter: ModelAdapter) -> None:
    """PERP (block reconstruction, whole-model retraining) wraps ``nn.Linear`` modules; MoE
    experts are views into fused 3-D parameters (neuroal.models.moe): refuse before loading."""
    perp = [step for step in cfg.recover.steps if step not in REFINERS]
    if perp and any(has_experts(block) for block in adapter.blocks):
        raise ConfigError([f"recover.steps {perp}: PERP does not support mixture-of-experts "
                           f"models (model_type {adapter.model_type!r}, fused expert "
                           "parameters); use the mask refiners "
                           f"({', '.join(REFINERS.names())}) or no recovery"])


def check_memory(cfg: PruneConfig, config: Any, adapter: ModelAdapter, device: torch.device,
                 dtype: torch.dtype,
                 budgets: tuple[int | None, int | None] = (None, None)) -> str:
    """Refuse before loading when a worker's predicted peak exceeds its memory (engine.md §7);
    returns the onload mode to run with (``engine.onload: auto``: the planner's choice).

    Checked when ``engine.memory_limit`` is set (bytes per worker) or the device is CUDA: its
    free memory, shared equally by the workers the local executor places on it; under
    onloading on CUDA the node's available host memory bounds the blocks kept there.
    ``budgets``: the free device bytes and host bytes per worker the workers reported in
    preflight (:func:`~neuroal.engine.preflight.worker_budgets`; a Ray driver may have no GPU).
    """
    device_free, host_free = budgets
    shared = cfg.engine.workers if cfg.engine.executor == "local" and \
        len(cfg.engine.devices) <= 1 else 1
    if cfg.engine.memory_limit is not None:
        budget = parse_bytes(cfg.engine.memory_limit)
    elif device_free is not None:
        budget = device_free
    elif device.type == "cuda":
        budget = torch.cuda.mem_get_info(device)[0] // shared
    else:
        return resolved_onload(cfg.engine.onload)
    # whole-model PERP runs alone after the workers are released: the shared device is its own
    plan = check_fits(cfg, config, budget, dtype=str(dtype).removeprefix("torch."),
                      device_type=device.type,
                      layout=ModelLayout.from_adapter(adapter, cfg.model.name),
                      retrain_limit=budget * shared,
                      host_limit=(host_free if host_free is not None else host_available())
                      if device.type == "cuda" else None)
    log.info("memory plan: peak %.1f GB per worker (worker %d), limit %.1f GB, onload %s%s",
             plan.peak / 1e9, plan.peak_worker.rank, budget / 1e9, plan.request.onload,
             f", host {plan.host_total / 1e9:.1f} GB" if plan.host_total else "")
    return plan.request.onload


def prepare(cfg: PruneConfig, timings: Timings, session: Any = None) -> Prepared:
    """Resolve and check everything that needs no weights (preflight on the workers included,
    :mod:`neuroal.engine.cluster`); tokenise the data. ``session``: the open dist session."""
    with timings("resolve"):
        output = None
        source = resolve_model(cfg.model.name, cfg.model.revision)
        if cfg.output.save_model or cfg.output.dir:
            path = Path(cfg.output.dir) if cfg.output.dir else default_output(cfg)
            if output_errors(path):  # relative under `ray job submit`: before abspath
                raise PreflightError(output_errors(path))
            output = OutputDir(path)
            output.check(cfg.output.overwrite, cfg.output.resume, inputs=run_inputs(cfg, source))
        check_source(source)  # GGUF header, index weight_map (neuroal.outputs.guard)
        check_text_sources(cfg)
        config = load_model_config(source, cfg.model.trust_remote_code)
        check_decoder_lm(config, cfg.model.name)
        warn_code_execution(cfg.model.trust_remote_code, source, cfg.eval.include_path)
        if source.kind == "hf_dir":  # shard headers only: truncated files fail here, not later
            SafetensorsCheckpoint(Path(source.location)).verify()
        device = resolve_device(cfg)  # where the workers run (a Ray cluster's GPUs)
        dtype = resolve_dtype(cfg.model.dtype, config, device)
        adapter = ModelAdapter(build_skeleton(config, dtype), selection_of(cfg))
        check_prunable(adapter, cfg.model.name)
        check_checkpoint(source, config, adapter)
        shape = adapter.shape()
        check_shape(cfg, shape)
        selection = check_selection(cfg, adapter, shape)
        check_positions(cfg, config)
        check_experts(cfg, adapter)
        if output is not None:  # one run per output; released by OutputDir.atomic
            output.acquire(cfg.output.overwrite, cfg.output.resume)
    try:
        with timings("resolve"):
            facts = run_preflight(cfg, device.type, output.tmp if output else None,
                                  *disk_needs(cfg, adapter, config, source, dtype, output),
                                  session=session)
            onload = check_memory(cfg, config, adapter, device, dtype, worker_budgets(facts))
        with timings("data"):
            tokenizer = load_tokenizer(source, cfg.model.trust_remote_code, cfg.model.tokenizer)
            calib = None
            if parse_source(cfg.calib.source).name != "self":
                calib = load_calibration(cfg.calib.source, tokenizer, cfg.calib.nsamples,
                                         cfg.calib.seqlen, cfg.calib.seed, cfg.calib.data_dir,
                                         chat_template=cfg.calib.chat_template)
            evals = {spec: load_eval_windows(spec, tokenizer, cfg.eval.seqlen or cfg.calib.seqlen,
                                             cfg.eval.max_windows, cfg.calib.data_dir)
                     for spec in cfg.eval.datasets}
            tasks = prepare_tasks(cfg)
    except BaseException:
        if output is not None:
            output.release()
        raise
    return Prepared(source, config, shape, device, dtype, tokenizer, calib, evals, output, onload,
                    tasks, session, selection=selection)


def disk_needs(cfg: PruneConfig, adapter: ModelAdapter, config: Any, source: ModelSource,
               dtype: torch.dtype, output: OutputDir | None) -> tuple[int, str]:
    """Bytes the run still writes at the output (resume state + export) and their breakdown,
    from the meta skeleton's parameter counts (:func:`~neuroal.engine.preflight.disk_needed`)."""
    if output is None:
        return 0, ""
    total = total_parameters(adapter.model)
    blocks = sum(numel(p) for block in adapter.blocks for p in block.parameters())
    export = total * getattr(torch, export_dtype(cfg, source, config, dtype)).itemsize \
        if cfg.output.save_model else 0
    state = state_bytes(blocks, dtype.itemsize)
    existing = folder_bytes(output.state) if cfg.output.resume else 0
    return disk_needed(export, state, existing)


def task_spec(cfg: PruneConfig) -> Any:
    """The zero-shot settings of ``cfg.eval`` as plain values (:class:`neuroal.evaluation.zeroshot.TaskSpec`);
    one executor call scores ``4 x micro_batch x workers`` requests, so every worker is busy."""
    ev, eng = cfg.eval, cfg.engine
    return TaskSpec(tuple(ev.tasks), ev.include_path, ev.num_fewshot, ev.limit, ev.max_length,
                    batch_size=4 * eng.micro_batch * eng.workers,
                    apply_chat_template=ev.apply_chat_template, log_samples=ev.log_samples)


def prepare_tasks(cfg: PruneConfig) -> Any:
    """Check the task names and build every task once (documents read or downloaded) before
    any weight is loaded; returns the lm-eval TaskManager, or None without ``eval.tasks``."""
    if not cfg.eval.tasks:
        return None

    spec = task_spec(cfg)
    manager = task_manager(spec)
    load_tasks(spec, manager)
    return manager


def evaluate_tasks(cfg: PruneConfig, prep: Prepared, executor: Executor) -> dict[str, Any]:
    """Zero-shot results of the executor's current model (``{}`` without ``eval.tasks``)."""
    if prep.tasks is None:
        return {}

    return run_tasks(executor, prep.tokenizer, prep.config, task_spec(cfg), prep.tasks)


def tasks_report(cfg: PruneConfig, dense: dict[str, Any], sparse: dict[str, Any]) -> dict[str, Any]:
    """``report["eval"]["tasks"]``: lm-eval's version and settings, then per task its version,
    shots, documents and metrics of the dense model (``dense``, when measured) beside the
    evaluated one (``model``; keys: :mod:`neuroal.outputs.report_keys`)."""
    results = {}
    for name, row in sparse.items():
        results[name] = {"version": row["version"], "n_shot": row["n_shot"],
                         "samples": row["samples"],
                         DENSE: dense[name]["metrics"] if name in dense else None,
                         MODEL: row["metrics"]}
    return {"lm_eval_version": lm_eval_version(), "tasks": list(cfg.eval.tasks),
            "include_path": cfg.eval.include_path, "num_fewshot": cfg.eval.num_fewshot,
            "limit": cfg.eval.limit, "results": results}


# --------------------------------------------------------------------------- run


def build_executor(cfg: PruneConfig, prep: Prepared) -> Executor:
    """The executor named by ``engine.executor`` (registry :data:`neuroal.engine.EXECUTORS`)."""
    devices = list(cfg.engine.devices) or [str(prep.device)]
    dtype_name = str(prep.dtype).removeprefix("torch.")
    if prep.onload != cfg.engine.onload:  # the planner's choice for engine.onload=auto
        cfg = replace(cfg, engine=replace(cfg.engine, onload=prep.onload))
    if prep.output is not None:  # the resolved output (onloading spills beside it)
        cfg = replace(cfg, output=replace(cfg.output, dir=str(prep.output.path)))
    return EXECUTORS.get(cfg.engine.executor)(cfg, source=prep.source,
                                              num_blocks=prep.shape.num_blocks,
                                              devices=devices, dtype=dtype_name,
                                              session=prep.session)


def evaluate(executor: Executor, evals: dict[str, Any]) -> dict[str, float]:
    """Perplexity per evaluation source (protocol: exp of the mean per-window NLL)."""
    return {spec: perplexity(executor.window_nll(data.windows)) for spec, data in evals.items()}


def calibration_windows(cfg: PruneConfig, prep: Prepared, executor: Executor) -> Any:
    """The calibration ids ``(N, T)``; ``self`` samples them from the dense model."""
    if prep.calib is not None:
        return prep.calib.windows
    log.info("sampling %d x %d calibration tokens from the dense model", cfg.calib.nsamples,
             cfg.calib.seqlen)
    return sample_self_windows(executor.last_logits, cfg.calib.nsamples, cfg.calib.seqlen,
                               cfg.calib.seed, int(prep.config.vocab_size),
                               batch_size=cfg.engine.micro_batch,
                               temperature=cfg.calib.self_temperature, top_k=cfg.calib.self_top_k)


def criterion_options(cfg: PruneConfig) -> dict[str, Any]:
    """The criterion's options; a seeded criterion (stochRIA) defaults to the run seed."""
    seeded = {"seed": cfg.seed} if "seed" in CRITERIA.get(cfg.criterion.name).defaults else {}
    return {**seeded, **cfg.criterion.options}


def make_plan(cfg: PruneConfig, prep: Prepared, executor: Executor, calib: Any,
              state: RunState | None = None) -> SparsityPlan:
    """Ask the allocation policy for a plan and validate it against the model."""
    policy = ALLOCATIONS.get(cfg.allocation.name)
    request = PlanRequest(shape=prep.shape, target=plan_target(cfg, prep.shape, prep.selection),
                          pattern=cfg.pattern,
                          clip=tuple(cfg.allocation.clip), options=dict(cfg.allocation.options),
                          executor=executor, calibration=calib,
                          model_key=model_key(prep.source), cache_dir=cache_dir(),
                          criterion=cfg.criterion.name,
                          criterion_options=criterion_options(cfg), state=state,
                          exact_count=cfg.mask.exact_count)
    plan = policy.plan(request)
    plan.validate(prep.shape, tuple(cfg.allocation.clip), cfg.allocation.strict)
    return plan


def model_key(source: ModelSource) -> str:
    """Identity of the model's weights: location plus the names, sizes and mtimes of its files
    (hub ids: id and revision), hashed. Keys on-disk caches such as AlphaPruning's alphas."""
    import hashlib

    parts = [source.kind, source.location, str(source.gguf_file), str(source.revision)]
    if source.kind != "hub":
        root = Path(source.location)
        files = [root / source.gguf_file] if source.gguf_file else sorted(root.glob("*.safetensors"))
        parts += [f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}" for f in files]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def cache_dir() -> str:
    """``$NEUROAL_CACHE`` or ``~/.cache/neuroal`` (created on first use by the policies and
    the input digests)."""
    return str(default_cache_dir())


def run(cfg: PruneConfig, keep_executor: bool = False, command: str = "",
        session: Any = None) -> RunResult:
    """Run one pruning job end to end; returns the report (also written beside the model).

    Allocations listed in ``cfg.compare`` are pruned first on the same data (each with a fresh
    executor, released afterwards) and reported side by side under ``report["compare"]``; only
    the main allocation's model is exported. The log goes to ``<output>/neuroal.log`` (and
    ``log.file``); progress follows ``log.progress`` and ``log.interval``. ``session``: rank
    0's stage of a torchrun / accelerate launch (yielded by
    :func:`neuroal.engine.dist.coordinator`) for ``engine.executor=dist``, else None.
    """
    configure_progress(cfg.log.interval, cfg.log.progress)
    ensure_visible(cfg.log_level)
    logger = logging.getLogger("neuroal")
    unset = logger.level == logging.NOTSET  # library use without neuroal.runtime.logging.configure
    if unset:
        logger.setLevel(cfg.log_level.upper())
    if cfg.log.file:  # the write guard of --log-file, before anything is appended to it
        check_log_file(cfg, run_inputs(cfg, source_or_none(cfg)))
    user_file = add_log_file(cfg.log.file) if cfg.log.file else None
    runlog = RunLog()
    try:
        result = _run(cfg, keep_executor, command, runlog, session)
        if cfg.output.push_to_hub and result.output is not None:
            push(cfg.output.push_to_hub, result)
        return result
    except BaseException:
        keep_failed_log(cfg, runlog)
        raise
    finally:
        runlog.close()
        if user_file is not None:
            remove_handler(user_file)
        if unset:
            logger.setLevel(logging.NOTSET)


def push(repo_id: str, result: RunResult, api: Any = None) -> None:
    """Upload the finished output (``--push-to-hub``); a failed upload leaves the local output
    as it is and records ``report["hub"]["error"]`` (the CLI then exits with 1)."""
    try:
        url = push_output(result.output, repo_id, api=api)  # type: ignore[arg-type]
        result.report["hub"] = {"repo": repo_id, "url": url}
    except Exception as exc:  # network, token, permissions: the local output stays valid
        log.error("upload to the Hub repo %r failed (%s: %s); the output is complete in %s, "
                  "upload it later with `%s`", repo_id, type(exc).__name__, exc, result.output,
                  upload_hint(repo_id, result.output))
        result.report["hub"] = {"repo": repo_id, "error": f"{type(exc).__name__}: {exc}"}


def keep_failed_log(cfg: PruneConfig, runlog: Any) -> None:
    """A failed run whose resume state was kept gets its log beside the state
    (``<output>.neuroal-tmp/neuroal.log``). Only runs that got as far as their staging folder
    (so that the temporary folder is theirs) write it."""
    if runlog.path is None:
        return
    tmp = OutputDir(Path(cfg.output.dir) if cfg.output.dir else default_output(cfg)).tmp
    if tmp.is_dir():
        log.info("log of the failed run: %s", tmp / "neuroal.log")
        runlog.keep(tmp / "neuroal.log")


def _run(cfg: PruneConfig, keep_executor: bool, command: str, runlog: Any,
         session: Any = None) -> RunResult:
    """:func:`run` without the logging setup."""
    timings = Timings()
    t_start = time.perf_counter()
    seed_everything(cfg.seed, cfg.engine.deterministic, cfg.engine.threads)
    prep = prepare(cfg, timings, session)
    staging_ctx = prep.output.atomic(cfg.output.keep_state) if prep.output is not None \
        else _no_output()
    with staging_ctx as staging:
        if staging is not None:
            runlog.attach(staging)
        state = open_state(cfg, prep)
        compared = [compare_variant(cfg, name, prep, timings) for name in cfg.compare]
        for name in cfg.recover.steps:
            log.info("recovery: %s, options %s", RECOVERY_STEPS.get(name).label,
                     resolved_options(name, cfg.recover.options))
        baseline = recovery_baseline(cfg, prep, timings)
        with timings("load"):
            executor = build_executor(cfg, prep)
            if state is not None and hasattr(executor, "state_dir"):
                executor.state_dir = str(state.root)  # named in restart errors (Ray)
        dense, dense_tasks = {}, {}
        if cfg.eval.dense and prep.evals:
            with timings("eval_dense"):
                dense = evaluate(executor, prep.evals)
            log.info("dense perplexity: %s", _fmt(dense))
        if cfg.eval.dense and prep.tasks is not None:
            with timings("eval_tasks_dense"):
                dense_tasks = evaluate_tasks(cfg, prep, executor)
        plan, blocks, sparse, calib = prune_and_evaluate(cfg, prep, executor, timings, state=state)
        if prep.tasks is not None:
            with timings("eval_tasks_sparse"):
                sparse_tasks = evaluate_tasks(cfg, prep, executor)
        timings.phases["total"] = time.perf_counter() - t_start
        report = build_report(cfg, prep, plan, blocks, dense, sparse, timings, executor, command)
        if prep.tasks is not None:
            report["eval"]["tasks"] = tasks_report(cfg, dense_tasks, sparse_tasks)
        if compared:
            report["compare"] = compared
        if cfg.recover.steps:
            report["recovery"] = recovery_report(cfg, prep, blocks, sparse, baseline)
        step = model_step(cfg.recover.steps)
        if step is not None:  # releases the executor first unless it is kept
            retrain_phase(cfg, prep, executor, step, calib, staging, report, timings,
                          release=not keep_executor)
            report["timings"]["total"] = time.perf_counter() - t_start
        if staging is not None:
            with timings("export"):
                export_model(cfg, prep, executor, plan, staging, report,
                             weights=step is None and cfg.output.save_model)
    if not keep_executor and step is None:  # releases Ray actors and their placement group
        executor.shutdown()
    return RunResult(report, plan, prep.output.path if prep.output else None,
                     executor if keep_executor else None)


def open_state(cfg: PruneConfig, prep: Prepared) -> RunState | None:
    """The resume state under ``<output>.neuroal-tmp/state`` (engine.md §8), keyed by the hash
    of the semantic config plus library versions, device type and dtype, the full-file digests
    of the model's weights, of its tokenizer files and of the calibration source (any change is
    refused on resume, naming the file; docs/resume.md); None without output."""
    if prep.output is None:
        return None
    extra = {"neuroal": getattr(neuroal, "__version__", "0"), "torch": torch.__version__,
             "device_type": torch.device(prep.device).type, "dtype": str(prep.dtype)}
    inputs = resume_inputs(prep.source, cfg.model.tokenizer, prep.calib, cfg.calib.source,
                           cache_dir())
    return RunState(prep.output.state, canonical_config(cfg.to_dict(), extra), cfg.output.resume,
                    weights=weights_fingerprint(prep.source, cache_dir()), inputs=inputs)


def prune_and_evaluate(cfg: PruneConfig, prep: Prepared, executor: Executor, timings: Timings,
                       tag: str = "", state: RunState | None = None,
                       ) -> tuple[SparsityPlan, list[BlockReport], dict[str, float], Any]:
    """Calibrate, allocate, prune and (if configured) evaluate the pruned model; returns the
    plan, block reports, pruned perplexities and the calibration ids ``(N, T)``."""
    with timings(f"calibrate{tag}"):
        calib = calibration_windows(cfg, prep, executor)
    with timings(f"allocate{tag}"):
        plan = make_plan(cfg, prep, executor, calib, state)
    group = cfg.criterion.group or plan.policy.get("mask_group")
    job = PruneJob(cfg.criterion.name, criterion_options(cfg), cfg.nm, group,
                   cfg.mask.exact_count, refine=refine_steps(cfg),
                   reconstruct=reconstruct_options(cfg),
                   state_dir=str(state.root) if state is not None else None)
    with timings(f"prune{tag}"):
        blocks = executor.run_final_prune(plan, job, calib)
    sparse = {}
    if prep.evals:
        with timings(f"eval_sparse{tag}"):
            sparse = evaluate(executor, prep.evals)
        log.info("pruned perplexity%s: %s", tag, _fmt(sparse))
    return plan, blocks, sparse, calib


def compare_variant(cfg: PruneConfig, allocation: str, prep: Prepared,
                    timings: Timings) -> dict[str, Any]:
    """Prune with another allocation (default options) on the same data; a summary row."""
    variant = replace(cfg, allocation=AllocationConfig(name=allocation, clip=cfg.allocation.clip))
    plan, row = side_run(variant, prep, timings, f"[{allocation}]")
    return {"allocation": allocation, **row, "policy": plan.policy}


def side_run(variant: PruneConfig, prep: Prepared, timings: Timings,
             tag: str) -> tuple[SparsityPlan, dict[str, Any]]:
    """Prune ``variant`` on the same data with a fresh executor (released afterwards); its plan
    and a summary row (achieved sparsity, perplexity, seconds)."""
    t0 = time.perf_counter()
    with timings(f"load{tag}"):
        executor = build_executor(variant, prep)
    try:
        plan, blocks, sparse, _ = prune_and_evaluate(variant, prep, executor, timings, tag)
    finally:
        executor.shutdown()
    zeros = sum(r.zeros for b in blocks for r in b.layers)
    numel = sum(r.numel for b in blocks for r in b.layers)
    return plan, {"achieved_sparsity": zeros / numel, MODEL_PPL: sparse,
                  "seconds": time.perf_counter() - t0}


# --------------------------------------------------------------------------- recovery


def refine_steps(cfg: PruneConfig) -> tuple[tuple[str, dict[str, Any]], ...]:
    """``(name, resolved options)`` of the chain's block-wise mask refiners, for the PruneJob."""
    return tuple((name, resolved_options(name, cfg.recover.options))
                 for name in cfg.recover.steps if name in REFINERS)


def reconstruct_options(cfg: PruneConfig) -> dict[str, Any] | None:
    """Resolved options of ``perp-reconstruct`` for the PruneJob, or None if not chained."""
    if RECONSTRUCT.name not in cfg.recover.steps:
        return None
    return resolved_options(RECONSTRUCT.name, cfg.recover.options)


def recovery_baseline(cfg: PruneConfig, prep: Prepared, timings: Timings) -> dict[str, Any] | None:
    """With ``recover.baseline``: prune once more without the in-prune steps (refiners and
    ``perp-reconstruct``; fresh model, same data, same allocation, released afterwards) so the
    report can give the perplexity before them.

    Costs one more load, calibration, allocation, prune and evaluation. Returns a summary or
    None when not requested, when the chain has no in-prune step or when nothing is evaluated.
    """
    if not (cfg.recover.baseline and prune_steps(cfg.recover.steps)):
        return None
    if not prep.evals:
        log.warning("recover.baseline=true but eval.datasets is empty: nothing to compare")
        return None
    variant = replace(cfg, recover=replace(cfg.recover, steps=()))
    return side_run(variant, prep, timings, "[no-recover]")[1]


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


@contextmanager
def _weights_dir(cfg: PruneConfig, staging: Path | None) -> Iterator[Path]:
    """Where the pruned model is written for whole-model PERP: the staging directory when the
    model is saved, else a temporary directory removed afterwards (``--no-save``)."""
    import tempfile

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
    log.info("%s: perplexity %s -> %s", step.label, _fmt(before), _fmt(after))
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
    import os
    import shutil

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


@contextmanager
def _no_output() -> Iterator[None]:
    yield None


def _fmt(values: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in values.items())


def export_model(cfg: PruneConfig, prep: Prepared, executor: Executor, plan: SparsityPlan,
                 staging: Path, report: dict[str, Any], weights: bool = True) -> None:
    """Shards (written per worker; not when ``weights`` is False, e.g. already written by
    whole-model PERP), index, config, tokenizer, plan, report, model card."""
    if weights and cfg.output.save_model:
        write_weights(cfg, prep, executor, staging, report)
    plan.save(staging)
    if cfg.output.plots:
        report["plots"] = write_plots(staging, report)
    write_run_files(staging, report, cfg.to_dict(), card=cfg.output.save_model)


def write_weights(cfg: PruneConfig, prep: Prepared, executor: Executor, directory: Path,
                  report: dict[str, Any]) -> None:
    """Shards (written per worker), index, config and tokenizer; records ``export_dtype``."""
    dtype = _export_dtype(cfg, prep)
    files = executor.write_shards(str(directory), dtype, parse_size(cfg.output.shard_size))
    finalize_shards(directory, files)
    write_config(directory, prep.config, dtype)
    prep.tokenizer.save_pretrained(directory)
    make_loadable(directory)  # tokenizer_class older transformers can import
    report["export_dtype"] = dtype


def _export_dtype(cfg: PruneConfig, prep: Prepared) -> str:
    """``auto``: the source dtype (GGUF: the run dtype), else the configured one."""
    return export_dtype(cfg, prep.source, prep.config, prep.dtype)


def export_dtype(cfg: PruneConfig, source: ModelSource, config: Any, dtype: torch.dtype) -> str:
    """:func:`_export_dtype` before :class:`Prepared` exists (the free-space check)."""
    if cfg.output.dtype != "auto":
        return cfg.output.dtype
    return str(source_dtype(config, dtype) if source.kind != "gguf"
               else dtype).removeprefix("torch.")


# --------------------------------------------------------------------------- report


def layer_table(blocks: list[BlockReport], adapter_prefix: Any) -> dict[str, dict[str, Any]]:
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
                 executor: Executor, command: str) -> dict[str, Any]:
    """The ``report.json`` content (issue 2, item 9; engine.md §9)."""
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
                      "planned_target": plan_target(cfg, prep.shape, prep.selection),
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
        "slices": split_blocks(prep.shape.num_blocks, cfg.engine.workers),
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
        root = Path(__file__).resolve().parent.parent
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


__all__ = ["RunResult", "run", "prepare"]
