"""Phase order of a run (style.md §3): resolve -> data -> load -> evaluate dense -> allocate ->
prune -> evaluate sparse -> recover -> export.

What lives here: :func:`run` and the order of its phases, the cheap phase before any weight
is loaded (:func:`prepare`, :class:`Prepared`), the prune itself (:func:`make_plan`,
:func:`prune_and_evaluate`) and the side runs beside it (``compare``, ``recover.baseline``).
Every check that needs no weights (config, model path, architecture, N:M divisibility, output
directory, calibration size, memory) runs before any weight is loaded; the checks themselves
live in :mod:`neuroal.planning.preflight`. The report is built by :mod:`neuroal.outputs.report`
(and :mod:`neuroal.recovery.report`), the weights written by :mod:`neuroal.outputs.export`,
whole-model retraining handed off to :mod:`neuroal.recovery.handoff`, the upload done by
:mod:`neuroal.outputs.hub`.

What it may import: every floor (the pipeline sits on top, beside the CLI and the commands).
"""

from __future__ import annotations

import hashlib
import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import neuroal
from neuroal.allocation import ALLOCATIONS, ModelShape, PlanRequest, SparsityPlan
from neuroal.config.build import AllocationConfig, PruneConfig
from neuroal.criteria import CRITERIA
from neuroal.data import load_calibration, parse_source, sample_self_windows
from neuroal.data.evaluation import load_eval_windows, perplexity
from neuroal.engine import EXECUTORS
from neuroal.engine.cluster import output_errors, resolve_device, run_preflight
from neuroal.engine.executor import Executor, split_blocks
from neuroal.engine.preflight import worker_budgets
from neuroal.evaluation.zeroshot import evaluate_tasks as run_tasks
from neuroal.evaluation.zeroshot import lm_eval_version, prepare_tasks, task_spec
from neuroal.models.adapter import ModelAdapter
from neuroal.models.loading import (
    ModelSource,
    SafetensorsCheckpoint,
    build_skeleton,
    load_model_config,
    resolve_dtype,
    resolve_model,
    weights_fingerprint,
)
from neuroal.outputs.checkpoint import RunState, canonical_config
from neuroal.outputs.export import OutputDir, export_model, slug
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
from neuroal.outputs.hub import push
from neuroal.outputs.report import build_report, format_ppl, tasks_report
from neuroal.outputs.report_keys import MODEL_PPL
from neuroal.outputs.resume_key import resume_inputs
from neuroal.planning.preflight import (
    check_experts,
    check_positions,
    check_selection,
    check_shape,
    disk_needs,
    memory_choice,
    plan_target,
    selection_of,
)
from neuroal.recovery import RECOVERY_STEPS, model_step, resolved_options
from neuroal.recovery.handoff import (
    baseline_variant,
    reconstruct_options,
    refine_steps,
    retrain_phase,
)
from neuroal.recovery.report import recovery_report
from neuroal.runtime.digests import default_cache_dir
from neuroal.runtime.errors import PreflightError
from neuroal.runtime.jobs import BlockReport, PruneJob
from neuroal.runtime.logging import RunLog, add_log_file, ensure_visible, get_logger, remove_handler
from neuroal.runtime.process import Timings, load_tokenizer, seed_everything
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
    data_fits: bool = True  # the memory plan's verdict on data mode (engine.parallel=auto)


# --------------------------------------------------------------------------- preparation


def default_output(cfg: PruneConfig) -> Path:
    """``outputs/<model>-<criterion>-<allocation>-<sparsity or N:M>``."""
    amount = cfg.pattern.replace(":", "of") if cfg.nm else f"{cfg.sparsity:g}"
    name = f"{Path(cfg.model.name).stem}-{cfg.criterion.name}-{cfg.allocation.name}-{amount}"
    name += "".join(f"-{step}" for step in cfg.recover.steps)
    return Path("outputs") / slug(name)


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
            onload, data_fits = memory_choice(cfg, config, adapter, device, dtype,
                                              worker_budgets(facts))
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
                    tasks, session, selection=selection, data_fits=data_fits)


def evaluate_tasks(cfg: PruneConfig, prep: Prepared, executor: Executor) -> dict[str, Any]:
    """Zero-shot results of the executor's current model (``{}`` without ``eval.tasks``)."""
    if prep.tasks is None:
        return {}

    return run_tasks(executor, prep.tokenizer, prep.config, task_spec(cfg), prep.tasks)


# --------------------------------------------------------------------------- run


def build_executor(cfg: PruneConfig, prep: Prepared) -> Executor:
    """The executor named by ``engine.executor`` (registry :data:`neuroal.engine.EXECUTORS`)."""
    devices = list(cfg.engine.devices) or [str(prep.device)]
    dtype_name = str(prep.dtype).removeprefix("torch.")
    if prep.onload != cfg.engine.onload:  # the planner's choice for engine.onload=auto
        cfg = replace(cfg, engine=replace(cfg.engine, onload=prep.onload))
    if prep.output is not None:  # the resolved output (onloading spills beside it)
        cfg = replace(cfg, output=replace(cfg.output, dir=str(prep.output.path)))
    executor = EXECUTORS.get(cfg.engine.executor)(cfg, source=prep.source,
                                                  num_blocks=prep.shape.num_blocks,
                                                  devices=devices, dtype=dtype_name,
                                                  session=prep.session)
    executor.data_fits = prep.data_fits  # engine.parallel=auto: data mode only where it fits
    return executor


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
        else nullcontext()
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
            log.info("dense perplexity: %s", format_ppl(dense))
        if cfg.eval.dense and prep.tasks is not None:
            with timings("eval_tasks_dense"):
                dense_tasks = evaluate_tasks(cfg, prep, executor)
        plan, blocks, sparse, calib = prune_and_evaluate(cfg, prep, executor, timings, state=state)
        if prep.tasks is not None:
            with timings("eval_tasks_sparse"):
                sparse_tasks = evaluate_tasks(cfg, prep, executor)
        timings.phases["total"] = time.perf_counter() - t_start
        report = build_report(cfg, prep, plan, blocks, dense, sparse, timings, executor, command,
                              planned_target=plan_target(cfg, prep.shape, prep.selection),
                              slices=split_blocks(prep.shape.num_blocks, cfg.engine.workers))
        if prep.tasks is not None:
            report["eval"]["tasks"] = tasks_report(cfg, dense_tasks, sparse_tasks,
                                                   lm_eval_version())
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
        log.info("pruned perplexity%s: %s", tag, format_ppl(sparse))
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


def recovery_baseline(cfg: PruneConfig, prep: Prepared, timings: Timings) -> dict[str, Any] | None:
    """With ``recover.baseline``: prune once more without the in-prune steps (refiners and
    ``perp-reconstruct``; fresh model, same data, same allocation, released afterwards) so the
    report can give the perplexity before them.

    Costs one more load, calibration, allocation, prune and evaluation. Returns a summary or
    None when not requested, when the chain has no in-prune step or when nothing is evaluated
    (:func:`neuroal.recovery.handoff.baseline_variant`).
    """
    variant = baseline_variant(cfg, bool(prep.evals))
    return None if variant is None else side_run(variant, prep, timings, "[no-recover]")[1]


__all__ = ["Prepared", "RunResult", "prepare", "run"]
