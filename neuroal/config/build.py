"""Typed, validated, frozen run configuration (style rule 5).

A config is built once at the edge (``cli.py`` or :func:`load_config`) from defaults, an optional
YAML file and ``key=value`` overrides, validated with every error collected, then frozen. Inside
the library only plain arguments taken from it travel.

The schema (dataclasses, overrides, YAML, per-field types) is the leaf :mod:`neuroal.config.schema`,
re-exported here; this module adds the rules that need the plug-in registries (criteria,
allocations, executors, data sources, recovery steps), so it sits above them.
"""

from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from neuroal.allocation import ALLOCATIONS
from neuroal.config.inputs import is_int, is_number, label_flags, output_name_error, parse_size, type_error
from neuroal.config.recipes import recipe_path
from neuroal.config.schema import (  # noqa: F401  (re-exported: the config's public names)
    _SECTIONS,
    _SUBSECTIONS,
    DEPRECATED_KEYS,
    DTYPES,
    GENERATION_BACKENDS,
    LOG_LEVELS,
    PATTERN_RE,
    RAY_PLACEMENTS,
    RAY_TRANSPORTS,
    SPARSITY_SCOPES,
    AllocationConfig,
    CalibConfig,
    CriterionConfig,
    DistConfig,
    EngineConfig,
    EvalConfig,
    LogConfig,
    MaskConfig,
    ModelConfig,
    OutputConfig,
    PruneConfig,
    RayConfig,
    RecoverConfig,
    _expand_recover,
    assemble,
    merge,
    parse_override,
    parse_pattern,
    read_yaml,
    set_dotted,
)
from neuroal.criteria import CRITERIA
from neuroal.data import SOURCES, parse_source
from neuroal.engine import EXECUTORS
from neuroal.engine.data_parallel import PARALLEL_CHOICES
from neuroal.engine.onload import ONLOAD_CHOICES
from neuroal.models.selection import selection_errors
from neuroal.recovery import RECOVERY_STEPS, chain_errors, resolved_options
from neuroal.runtime.errors import ConfigError
from neuroal.runtime.progress import MODES


def build_config(tree: Mapping[str, Any]) -> PruneConfig:
    """Build and validate a :class:`PruneConfig` from a nested dict; raises ConfigError.

    Every error is collected: a malformed section or a value of the wrong type is reported and
    replaced by its default, so that the remaining checks still run and report theirs.
    """
    cfg, errors = assemble(expand_paths(tree))
    try:
        validate(cfg)
    except ConfigError as exc:
        errors += exc.errors
    if errors:
        raise ConfigError(errors)
    return cfg


PATH_KEYS = ("model.name", "model.tokenizer", "output.dir", "log.file", "calib.data_dir",
             "eval.include_path", "allocation.path")
"""Config keys holding a local path: a leading ``~`` is expanded (never a folder named ``~``)."""


def expand_paths(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``tree`` with ``~`` / ``~user`` expanded in every :data:`PATH_KEYS` value and in the path
    of ``text:~/...`` / ``tokens:~/...`` data sources."""
    out = {k: dict(v) if isinstance(v, Mapping) else v for k, v in tree.items()}
    for key in PATH_KEYS:
        section, _, name = key.partition(".")
        node = out.get(section)
        if isinstance(node, dict) and isinstance(node.get(name), str) and \
                node[name].startswith("~"):
            node[name] = os.path.expanduser(node[name])
    calib, ev = out.get("calib"), out.get("eval")
    if isinstance(calib, dict) and isinstance(calib.get("source"), str):
        calib["source"] = _expand_source(calib["source"])
    if isinstance(ev, dict) and isinstance(ev.get("datasets"), (list, tuple)):
        ev["datasets"] = [_expand_source(d) if isinstance(d, str) else d for d in ev["datasets"]]
    elif isinstance(ev, dict) and isinstance(ev.get("datasets"), str):
        ev["datasets"] = ",".join(_expand_source(d) for d in ev["datasets"].split(","))
    return out


def _expand_source(spec: str) -> str:
    name, sep, arg = spec.strip().partition(":")
    return f"{name}:{os.path.expanduser(arg)}" if sep and arg.startswith("~") else spec


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                extra: Mapping[str, Any] | None = None) -> PruneConfig:
    """Defaults <- YAML file <- ``extra`` (e.g. CLI flags) <- ``key=value`` overrides."""
    tree: dict[str, Any] = _expand_recover(read_yaml(recipe_path(path)) if path is not None
                                           else {})
    # malformed sections of the file are errors even where flags or overrides set their keys
    shape = section_shape_errors(tree, f"config file {str(path)!r}") if path is not None else []
    if extra:
        tree = _expand_recover(merge(tree, extra))
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
        _expand_recover(tree)
    try:
        cfg = build_config(tree)
    except ConfigError as exc:
        heads = tuple(e.split(":", 1)[0] + ":" for e in shape)
        raise ConfigError(shape + [e for e in exc.errors if not e.startswith(heads)]) from None
    if shape:
        raise ConfigError(shape)
    return cfg


def section_shape_errors(tree: Mapping[str, Any], origin: str) -> list[str]:
    """Sections of a YAML recipe that are not mappings (``calib: 5``), sub-sections included;
    reported even when flags or overrides set keys of that section (they would otherwise
    silently replace it)."""
    errors = []
    for name, value in tree.items():
        if name not in _SECTIONS or value is None:
            continue
        named = name in ("model", "criterion", "allocation")
        if not isinstance(value, Mapping) and not (named and isinstance(value, str)):
            errors.append(f"{name}: expected a mapping{' or a name' if named else ''}, got "
                          f"{value!r} in {origin} (flags and overrides do not replace a "
                          "malformed section: fix the file)")
            continue
        for sub in _SUBSECTIONS.get(name, {}):
            inner = value.get(sub) if isinstance(value, Mapping) else None
            if inner is not None and not isinstance(inner, Mapping):
                errors.append(f"{name}.{sub}: expected a mapping of its keys, got {inner!r} "
                              f"in {origin} (flags and overrides do not replace a malformed "
                              "section: fix the file)")
    return errors


def config_from_flags(values: Mapping[str, Any], flags: Mapping[str, str]) -> PruneConfig:
    """A validated config for another entry point (plan, evaluate, recover): ``values`` maps
    dotted keys to the flag values, ``flags`` dotted keys to flag names, so each error names
    the flag too (``--windows: eval.max_windows=-1: expected a positive integer``)."""
    tree: dict[str, Any] = {}
    for key, value in values.items():
        set_dotted(tree, key, value)
    try:
        return build_config(tree)
    except ConfigError as exc:
        raise ConfigError(label_flags(exc.errors, flags)) from None


# --------------------------------------------------------------------------- validation


def validate(cfg: PruneConfig) -> None:
    """Check every rule that needs no model; raise one ConfigError listing all failures."""
    errors: list[str] = []
    errors += _check_sparsity(cfg)
    errors += _check_selection(cfg)
    errors += _check_plugins(cfg)
    errors += _check_data(cfg)
    errors += _check_engine(cfg)
    errors += _check_recover(cfg)
    errors += _check_log(cfg)
    if cfg.model.dtype not in DTYPES:
        errors.append(f"model.dtype={cfg.model.dtype!r}: expected one of {', '.join(DTYPES)}")
    if cfg.output.dtype not in DTYPES:
        errors.append(f"output.dtype={cfg.output.dtype!r}: expected one of {', '.join(DTYPES)}")
    for key in ("resume", "keep_state", "overwrite", "save_model"):
        if not isinstance(getattr(cfg.output, key), bool):
            errors.append(f"output.{key}={getattr(cfg.output, key)!r}: expected true or false")
    if cfg.output.resume and not (cfg.output.save_model or cfg.output.dir):
        errors.append("output.resume=true needs an output directory for its state: pass --output")
    if isinstance(cfg.output.dir, str):
        errors += [e for e in [output_name_error("output.dir", cfg.output.dir)] if e]
    try:
        parse_size(cfg.output.shard_size, "output.shard_size")
    except ValueError as exc:
        errors.append(f"{exc} (the largest model shard file)")
    for label, seed in (("seed", cfg.seed), ("calib.seed", cfg.calib.seed)):
        if is_int(seed) and not 0 <= seed < 2**32:
            errors.append(f"{label}={seed}: expected an integer in [0, 2**32 - 1]")
    if isinstance(cfg.log_level, str) and cfg.log_level.upper() not in LOG_LEVELS:
        errors.append(f"log_level={cfg.log_level!r}: expected one of {', '.join(LOG_LEVELS)}")
    if errors:
        raise ConfigError(errors)


def _check_log(cfg: PruneConfig) -> list[str]:
    errors = []
    interval = cfg.log.interval
    if isinstance(interval, bool) or not isinstance(interval, (int, float)) or interval < 0:
        errors.append(f"log.interval={interval!r}: expected seconds >= 0 between progress lines")
    if cfg.log.progress not in MODES:
        errors.append(f"log.progress={cfg.log.progress!r}: expected one of {', '.join(MODES)}")
    if not isinstance(cfg.calib.chat_template, bool):
        errors.append(f"calib.chat_template={cfg.calib.chat_template!r}: expected true or false")
    repo = cfg.output.push_to_hub
    if repo is not None and not re.match(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$", str(repo)):
        errors.append(f"output.push_to_hub={repo!r}: expected a Hub repo id owner/name, e.g. "
                      "my-user/llama-2-7b-wanda-50")
    return errors


def _check_sparsity(cfg: PruneConfig) -> list[str]:
    errors = []
    if not isinstance(cfg.pattern, str):
        return [f"pattern={cfg.pattern!r}: expected 'unstructured' or an N:M string; quote it in "
                "YAML (pattern: \"2:4\"), which otherwise reads 2:4 as the number 124"]
    match = PATTERN_RE.match(cfg.pattern)
    if cfg.pattern != "unstructured" and match is None:
        return [f"pattern={cfg.pattern!r}: expected 'unstructured' or 'N:M' with N kept of "
                "every M, e.g. 2:4 or 4:8"]
    if match is not None:
        n, m = int(match.group(1)), int(match.group(2))
        if not 0 < n < m:
            errors.append(f"pattern={cfg.pattern!r}: N:M needs 0 < N < M (N weights kept in "
                          "every group of M), e.g. 2:4 or 4:8")
    elif not is_number(cfg.sparsity) or not 0.0 < float(cfg.sparsity) < 1.0:
        errors.append(f"sparsity={cfg.sparsity!r}: expected a fraction strictly between 0 and 1 "
                      "(e.g. 0.5 for 50 %)")
    clip = tuple(cfg.allocation.clip)
    numeric = all(is_number(v) for v in clip)
    if len(clip) != 2 or not numeric or not 0.0 <= clip[0] < clip[1] <= 1.0:
        errors.append(f"allocation.clip={list(cfg.allocation.clip)!r}: expected [lo, hi] with "
                      "0 <= lo < hi <= 1, e.g. [0.01, 0.99]")
    return errors


def _check_plugins(cfg: PruneConfig) -> list[str]:
    errors = []
    if cfg.criterion.name not in CRITERIA:
        errors.append(f"criterion={cfg.criterion.name!r} is unknown; available: "
                      f"{', '.join(CRITERIA.names())}")
    else:
        errors += _check_criterion(cfg, CRITERIA.get(cfg.criterion.name))
    for name in cfg.compare:
        if name not in ALLOCATIONS:
            errors.append(f"compare: allocation {name!r} is unknown; available: "
                          f"{', '.join(ALLOCATIONS.names())}")
        else:  # compared allocations run with their default options
            variant = replace(cfg, allocation=AllocationConfig(name=name, clip=cfg.allocation.clip))
            errors += [f"compare: {e}" for e in ALLOCATIONS.get(name).validate(variant)]
    if cfg.allocation.name not in ALLOCATIONS:
        errors.append(f"allocation={cfg.allocation.name!r} is unknown; available: "
                      f"{', '.join(ALLOCATIONS.names())}")
    else:
        policy = ALLOCATIONS.get(cfg.allocation.name)
        errors += policy.validate(cfg)
        if cfg.pattern != "unstructured" and not policy.nm_compatible:
            errors.append(f"allocation={cfg.allocation.name!r} gives non-uniform ratios, which "
                          f"cannot be combined with pattern={cfg.pattern!r} (N:M is uniform by "
                          "construction); use allocation=uniform or an unstructured pattern")
    return errors


def _check_criterion(cfg: PruneConfig, crit: Any) -> list[str]:
    errors = []
    unknown = sorted(set(cfg.criterion.options) - set(crit.defaults))
    if unknown:
        errors.append(f"criterion.{unknown[0]} is not an option of {crit.name!r}; valid options: "
                      f"{', '.join(sorted(crit.defaults)) or '(none)'}")
    for key, value in cfg.criterion.options.items():  # typed like the option's default
        kind = {bool: "bool", int: "int", float: "float"}.get(type(crit.defaults.get(key)))
        error = type_error(f"criterion.{key}", value, kind) if kind else None
        errors += [error] if error else []
    if cfg.criterion.group is not None and cfg.criterion.group not in crit.groups:
        errors.append(f"criterion.group={cfg.criterion.group!r} is not valid for {crit.name!r}; "
                      f"expected one of {', '.join(sorted(crit.groups))}")
    return errors


def _check_data(cfg: PruneConfig) -> list[str]:
    errors = []
    for label, spec in [("calib.source", cfg.calib.source)] + [
        ("eval.datasets", d) for d in cfg.eval.datasets
    ]:
        try:
            parsed = parse_source(spec)
        except (ValueError, FileNotFoundError) as exc:
            errors.append(f"{label}: {exc}")
            continue
        if label == "eval.datasets" and parsed.name == "self":
            errors.append("eval.datasets: 'self' is a calibration source only; evaluate on "
                          "wikitext2, c4 or text:<path>")
        elif label == "eval.datasets" and SOURCES.get(parsed.name).calibration_only:
            errors.append(f"eval.datasets: {spec!r} is a calibration source only; evaluate on "
                          "wikitext2, c4, text:<path> or hf:<dataset>")
        elif label == "calib.source" and cfg.calib.chat_template is True and \
                "chat_template" not in SOURCES.get(parsed.name).options:
            errors.append(f"calib.chat_template=true does not apply to calib.source={spec!r}; "
                          "it renders conversations of hf:<dataset> sources")
    for label, value in [("calib.nsamples", cfg.calib.nsamples), ("calib.seqlen", cfg.calib.seqlen),
                         ("eval.seqlen", cfg.eval.seqlen), ("eval.max_windows", cfg.eval.max_windows),
                         ("eval.limit", cfg.eval.limit), ("eval.max_length", cfg.eval.max_length)]:
        if value is not None and (not is_int(value) or value < 1):
            errors.append(f"{label}={value!r}: expected a positive integer")
    temperature, top_k = cfg.calib.self_temperature, cfg.calib.self_top_k
    if not is_number(temperature) or temperature <= 0:
        errors.append(f"calib.self_temperature={temperature!r}: expected a number > 0 (the "
                      "softmax temperature of calib=self sampling; 1.0 samples the model as is)")
    if top_k is not None and (not is_int(top_k) or top_k < 1):
        errors.append(f"calib.self_top_k={top_k!r}: expected an integer >= 1 (tokens kept per "
                      "step of calib=self sampling) or null for the full vocabulary")
    return errors + _check_tasks(cfg.eval)


def _check_selection(cfg: PruneConfig) -> list[str]:
    """``targets`` / ``ignore`` patterns and ``sparsity_scope``; whether they match the model is
    checked by the pipeline on its skeleton."""
    errors = selection_errors(cfg.targets, cfg.ignore)
    if cfg.sparsity_scope not in SPARSITY_SCOPES:
        errors.append(f"sparsity_scope={cfg.sparsity_scope!r}: expected one of "
                      f"{', '.join(SPARSITY_SCOPES)}")
    elif cfg.sparsity_scope == "model" and cfg.nm is not None:
        errors.append(f"sparsity_scope=model with pattern {cfg.pattern}: an N:M pattern fixes "
                      "each pruned linear's sparsity, so dense ignored linears cannot be made up "
                      "for; use sparsity_scope=targeted")
    return errors


def _check_tasks(ev: EvalConfig) -> list[str]:
    """Zero-shot settings; whether the task names exist is checked by the pipeline (it needs
    lm-eval's task index)."""
    errors = []
    if not isinstance(ev.tasks, tuple) or not all(isinstance(t, str) and t for t in ev.tasks):
        errors.append(f"eval.tasks={ev.tasks!r}: expected lm-eval task names, e.g. "
                      "hellaswag,arc_easy")
    elif ev.tasks and importlib.util.find_spec("lm_eval") is None:
        errors.append("eval.tasks needs lm-evaluation-harness, which is not installed; install "
                      "it with: pip install 'neuroal[eval]'")
    if ev.include_path is not None and not Path(str(ev.include_path)).is_dir():
        errors.append(f"eval.include_path={ev.include_path!r} is not a directory; give a folder "
                      "of lm-eval task YAML files")
    if ev.num_fewshot is not None and (not is_int(ev.num_fewshot) or ev.num_fewshot < 0):
        errors.append(f"eval.num_fewshot={ev.num_fewshot!r}: expected an integer >= 0")
    if ev.generation not in GENERATION_BACKENDS:
        errors.append(f"eval.generation={ev.generation!r}: expected one of "
                      f"{', '.join(GENERATION_BACKENDS)}")
    return errors


def _check_engine(cfg: PruneConfig) -> list[str]:
    errors = []
    eng = cfg.engine
    if eng.executor not in EXECUTORS:
        errors.append(f"engine.executor={eng.executor!r}: available executors: "
                      f"{', '.join(EXECUTORS.names())}")
    if not is_int(eng.workers) or eng.workers < 1:
        errors.append(f"engine.workers={eng.workers!r}: expected an integer >= 1")
    if eng.threads is not None and (not is_int(eng.threads) or eng.threads < 1):
        errors.append(f"engine.threads={eng.threads!r}: expected an integer >= 1 or null (each "
                      "process keeps its default thread count)")
    if not is_int(eng.micro_batch) or eng.micro_batch < 1:
        errors.append(f"engine.micro_batch={eng.micro_batch!r}: expected an integer >= 1")
    if eng.devices and is_int(eng.workers) and len(eng.devices) not in (1, eng.workers):
        errors.append(f"engine.devices has {len(eng.devices)} entries for {eng.workers} "
                      "workers: give one device, or one per worker")
    errors += _check_ray(eng.ray)
    timeout = eng.dist.timeout
    if not is_number(timeout) or timeout <= 0:
        errors.append(f"engine.dist.timeout={timeout!r}: expected seconds > 0 that a collective "
                      "may wait (ranks > 0 wait while rank 0 works alone), e.g. 14400")
    collective = eng.dist.collective_timeout
    if not is_number(collective) or collective <= 0:
        errors.append(f"engine.dist.collective_timeout={collective!r}: expected seconds > 0 that "
                      "a point-to-point stream transfer may wait (a hung GPU or a dead neighbour "
                      "is reported after it), e.g. 1800")
    if eng.onload not in ONLOAD_CHOICES:
        errors.append(f"engine.onload={eng.onload!r}: expected one of {', '.join(ONLOAD_CHOICES)} "
                      "(device: weights stay on the device; host / disk: one block at a time is "
                      "brought to the device; auto: chosen by the memory planner)")
    errors += _check_parallel(eng)
    if not isinstance(eng.prefetch, bool):
        errors.append(f"engine.prefetch={eng.prefetch!r}: expected true or false")
    if eng.memory_limit is not None:
        try:
            parse_size(eng.memory_limit, "engine.memory_limit")
        except ValueError as exc:
            errors.append(f"{exc} (the memory each worker may use)")
    return errors


def _check_parallel(eng: EngineConfig) -> list[str]:
    """``engine.parallel`` (neuroal.engine.data_parallel)."""
    if eng.parallel not in PARALLEL_CHOICES:
        return [f"engine.parallel={eng.parallel!r}: expected one of "
                f"{', '.join(PARALLEL_CHOICES)} (pipeline: each worker prunes its own blocks in "
                "turn; data: every worker calibrates every block on its share of the sequences; "
                "auto: data when several workers can share the prune)"]
    return []


def _check_ray(ray: RayConfig) -> list[str]:
    """``engine.ray.*`` (the Ray executor's options)."""
    errors = []
    if not is_int(ray.inflight) or ray.inflight < 0:
        errors.append(f"engine.ray.inflight={ray.inflight!r}: expected an integer >= 0 (0 = one "
                      "per worker)")
    if ray.placement not in RAY_PLACEMENTS:
        errors.append(f"engine.ray.placement={ray.placement!r}: expected one of "
                      f"{', '.join(RAY_PLACEMENTS)} (STRICT_SPREAD needs one node per worker)")
    if ray.transport not in RAY_TRANSPORTS:
        errors.append(f"engine.ray.transport={ray.transport!r}: expected one of "
                      f"{', '.join(RAY_TRANSPORTS)} (auto: nccl between CUDA actors, gloo between "
                      "CPU actors, else the object store)")
    if not is_number(ray.cpus) or ray.cpus <= 0:
        errors.append(f"engine.ray.cpus={ray.cpus!r}: expected a number > 0 (CPUs per actor)")
    if not is_int(ray.max_restarts) or ray.max_restarts < 0:
        errors.append(f"engine.ray.max_restarts={ray.max_restarts!r}: expected an integer >= 0 "
                      "(restarts per Ray actor after it died; 0 = stop at the first death)")
    if not is_number(ray.placement_timeout) or ray.placement_timeout <= 0:
        errors.append(f"engine.ray.placement_timeout={ray.placement_timeout!r}: expected seconds "
                      "> 0 to wait for the placement group and for a restarted actor to reload "
                      "its slice, e.g. 600")
    if ray.address is not None and not isinstance(ray.address, str):
        errors.append(f"engine.ray.address={ray.address!r}: expected 'auto', "
                      "'ray://host:port' or 'host:port'")
    return errors


def _check_recover(cfg: PruneConfig) -> list[str]:
    """Step names, chain rules and each step's options (recovery.md)."""
    rec = cfg.recover
    available = ", ".join(RECOVERY_STEPS.names())
    errors = []
    if not isinstance(rec.baseline, bool):
        errors.append(f"recover.baseline={rec.baseline!r}: expected true or false")
    for name in rec.steps:
        if name not in RECOVERY_STEPS:
            errors.append(f"recover: step {name!r} is unknown; available: {available}")
    for name in sorted({n for n in rec.steps if rec.steps.count(n) > 1}):
        errors.append(f"recover: step {name!r} is listed twice; list each step once")
    errors += chain_errors(rec.steps)
    for name, options in rec.options.items():
        if name not in RECOVERY_STEPS:
            errors.append(f"recover.{name}: {name!r} is not a recovery step; available: {available}")
            continue
        step = RECOVERY_STEPS.get(name)
        unknown = sorted(set(options) - set(step.defaults))
        for key in unknown:
            hint = (" (the initial mask is the criterion's: set criterion=<name>)"
                    if key == "initial" else "")
            errors.append(f"recover.{name}.{key} is not an option of {name!r}{hint}; valid "
                          f"options: {', '.join(sorted(step.defaults)) or '(none)'}")
    for name in dict.fromkeys(rec.steps):
        if name in RECOVERY_STEPS:
            errors += RECOVERY_STEPS.get(name).validate(resolved_options(name, rec.options), cfg)
    return errors
