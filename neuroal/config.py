"""Typed, validated, frozen run configuration (style rule 5).

A config is built once at the edge (``cli.py`` or :func:`load_config`) from defaults, an optional
YAML file and ``key=value`` overrides, validated with every error collected, then frozen. Inside
the library only plain arguments taken from it travel.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from neuroal.errors import ConfigError
from neuroal.inputs import (
    is_int,
    is_number,
    output_name_error,
    parse_size,
    type_error,
    typed_fields,
)
from neuroal.jobs import NMPattern

DTYPES = ("auto", "float32", "bfloat16", "float16")
PATTERN_RE = re.compile(r"^(\d+):(\d+)$")
RAY_PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelConfig:
    """Which model to prune and in which dtype.

    ``name`` is a local HF directory, a hub id, a ``.gguf`` path or an alias (``smollm2-135m``).
    """

    name: str = "smollm2-135m"
    dtype: str = "auto"
    tokenizer: str | None = None  # a tokenizer dir / hub id overriding the model's own
    revision: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class CriterionConfig:
    """Weight-scoring criterion: registry name, comparison group and criterion options."""

    name: str = "wanda"
    group: str | None = None
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class AllocationConfig:
    """Allocation policy: registry name, clip range, strictness and policy options."""

    name: str = "uniform"
    clip: tuple[float, float] = (0.01, 0.99)
    strict: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class CalibConfig:
    """Calibration data (specs README, "Calibration")."""

    source: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    data_dir: str | None = None
    self_temperature: float = 1.0
    self_top_k: int | None = 50
    chat_template: bool = False  # hf: sources: render conversations with the tokenizer's template


@dataclass(frozen=True)
class EvalConfig:
    """Perplexity evaluation; ``datasets`` empty disables it. ``seqlen`` None = calib seqlen.

    ``tasks``: lm-eval zero-shot tasks scored through the workers (``neuroal.zeroshot``; needs
    the ``neuroal[eval]`` extra), with task YAMLs also read from ``include_path``; ``limit``
    keeps the first documents of each task, ``max_length`` the context window (None: model's).
    """

    datasets: tuple[str, ...] = ("wikitext2",)
    seqlen: int | None = None
    max_windows: int | None = 64
    dense: bool = True
    tasks: tuple[str, ...] = ()
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: int | None = None
    max_length: int | None = None


@dataclass(frozen=True)
class RayConfig:
    """``engine.ray``: options of the Ray executor only (engine.md §3.3)."""

    address: str | None = None  # "auto", "ray://host:10001"; None = $RAY_ADDRESS or local
    placement: str = "PACK"  # placement-group strategy of the worker bundles
    cpus: float = 1.0  # CPUs reserved per Ray actor
    max_restarts: int = 3  # restarts per Ray actor after it died (killed, OOM); then the run stops
    inflight: int = 0  # candidates / windows in flight (pipelined actors); 0 = one per worker


@dataclass(frozen=True)
class DistConfig:
    """``engine.dist``: options of the torch.distributed executor only (engine.md §3.4)."""

    # Ranks > 0 wait in a broadcast while rank 0 works alone (data, search bookkeeping, export);
    # torch's default 30 min collective timeout is too short at 70B.
    timeout: float = 14400.0  # seconds a collective may wait before the launch fails


@dataclass(frozen=True)
class EngineConfig:
    """Execution: executor, worker count, devices and micro-batching (engine.md §3); the
    options of one executor only live in its own section (``engine.ray``, ``engine.dist``)."""

    executor: str = "local"
    workers: int = 1
    device: str = "auto"
    devices: tuple[str, ...] = ()
    micro_batch: int = 8
    offload_activations: bool = False
    deterministic: bool = True
    threads: int | None = None  # intra-op threads of every process; None = each one's default
    memory_limit: int | str | None = None  # bytes per worker ("24GB", "80GiB"); None = device's
    onload: str = "auto"  # device | host | disk: where blocks live between uses; auto = planner
    prefetch: bool = True  # onloading: fetch the next block while one is in use
    ray: RayConfig = field(default_factory=RayConfig)
    dist: DistConfig = field(default_factory=DistConfig)


@dataclass(frozen=True)
class MaskConfig:
    """Mask selection rules (criteria.md §2)."""

    exact_count: bool = True


@dataclass(frozen=True)
class OutputConfig:
    """Where and how the pruned model is written (engine.md §8-9)."""

    dir: str | None = None
    overwrite: bool = False
    save_model: bool = True
    dtype: str = "auto"
    shard_size: int | str = "2GB"  # bytes or "2GB", "500MiB" (neuroal.inputs.parse_size)
    resume: bool = False  # continue from <dir>.neuroal-tmp/state (engine.md §8)
    keep_state: bool = True  # keep the resume state when a run fails
    push_to_hub: str | None = None  # hub repo id to upload the finished output to (network)
    plots: bool = True  # PNG plots beside report.json (needs matplotlib, extra [plots])


@dataclass(frozen=True)
class LogConfig:
    """Logging and progress (issue 15, item 2): ``interval`` seconds between progress lines
    when no terminal shows bars, ``progress`` mode (auto | bar | log | off), an extra log
    ``file`` (``--log-file``; every run also writes ``neuroal.log`` into its output)."""

    interval: float = 30.0
    progress: str = "auto"
    file: str | None = None


@dataclass(frozen=True)
class RecoverConfig:
    """Recovery steps after (or inside) pruning (recovery.md).

    ``steps`` run in order; names come from ``neuroal.recovery.RECOVERY_STEPS``. The order is
    fixed: at most one mask refiner (``dsnot``, ``r2dsnot``) and ``perp-reconstruct`` run inside
    the final prune, then at most one whole-model PERP variant (``perp-bias-norm``,
    ``perp-masklora``, ``perp-scalelora``) retrains the exported model.
    ``options[name]`` overrides a step's defaults (YAML: ``recover:
    {steps: [dsnot], dsnot: {max_cycles: 100}}``; override: ``recover.dsnot.max_cycles=100``).
    ``baseline: true`` also prunes once without the in-prune steps (a fresh model, same data and
    allocation, about doubling the run) so the report can give the perplexity before them.
    """

    steps: tuple[str, ...] = ()
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    baseline: bool = False


@dataclass(frozen=True)
class PruneConfig:
    """A complete, validated pruning run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    sparsity: float = 0.5
    pattern: str = "unstructured"
    criterion: CriterionConfig = field(default_factory=CriterionConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    calib: CalibConfig = field(default_factory=CalibConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    recover: RecoverConfig = field(default_factory=RecoverConfig)
    log: LogConfig = field(default_factory=LogConfig)
    compare: tuple[str, ...] = ()  # extra allocations pruned on the same data, side by side
    seed: int = 0
    log_level: str = "INFO"

    @property
    def nm(self) -> NMPattern | None:
        """The N:M pattern, or None for unstructured sparsity."""
        return parse_pattern(self.pattern)

    @property
    def target_sparsity(self) -> float:
        """The global target: ``sparsity`` or ``1 - N/M`` for N:M."""
        nm = self.nm
        return nm.sparsity if nm is not None else self.sparsity

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (JSON/YAML-able) of the resolved config."""
        return _plain(dataclasses.asdict(self))


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def parse_pattern(pattern: str) -> NMPattern | None:
    """``unstructured`` -> None; ``"2:4"`` -> NMPattern(2, 4) (N kept of every M)."""
    if pattern == "unstructured":
        return None
    match = PATTERN_RE.match(pattern)
    if match is None:
        raise ConfigError([f"pattern={pattern!r}: expected 'unstructured' or 'N:M' (e.g. 2:4)"])
    return NMPattern(int(match.group(1)), int(match.group(2)))


# --------------------------------------------------------------------------- building


_SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "criterion": CriterionConfig,
    "allocation": AllocationConfig,
    "calib": CalibConfig,
    "eval": EvalConfig,
    "engine": EngineConfig,
    "mask": MaskConfig,
    "output": OutputConfig,
    "log": LogConfig,
}
_OPEN_SECTIONS = {"criterion", "allocation"}  # unknown keys there are plug-in options
_SUBSECTIONS: dict[str, dict[str, type]] = {"engine": {"ray": RayConfig, "dist": DistConfig}}
# Flat keys of earlier releases -> their key now; still read (users have YAML files), with a
# warning naming the new key.
DEPRECATED_KEYS = {
    "engine.ray_address": "engine.ray.address",
    "engine.ray_placement": "engine.ray.placement",
    "engine.ray_cpus": "engine.ray.cpus",
    "engine.max_restarts": "engine.ray.max_restarts",
    "engine.inflight": "engine.ray.inflight",
}


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``a.b=value`` (value read as YAML) into ``("a.b", value)``."""
    if "=" not in text or text.startswith("="):
        raise ConfigError([f"override {text!r}: expected key=value, e.g. calib.nsamples=32"])
    key, raw = text.split("=", 1)
    if PATTERN_RE.match(raw.strip()):  # YAML 1.1 would read 2:4 as the base-60 integer 124
        return key.strip(), raw.strip()
    return key.strip(), yaml.safe_load(raw) if raw != "" else None


def set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    """Set ``tree[a][b] = value`` for ``key = "a.b"``, creating sections."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError([f"override {key!r}: {part!r} is a value, not a section"])
        node = child
    node[parts[-1]] = value


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML recipe; a missing or malformed file is a ConfigError naming it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file {str(p)!r} does not exist"])
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"config file {str(p)!r} is not valid YAML: {exc}"]) from exc
    if not isinstance(data, dict):
        raise ConfigError([f"config file {str(p)!r}: expected a mapping at top level"])
    return data


def merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Recursive dict merge, ``extra`` winning."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def build_config(tree: Mapping[str, Any]) -> PruneConfig:
    """Build and validate a :class:`PruneConfig` from a nested dict; raises ConfigError.

    Every error is collected: a malformed section or a value of the wrong type is reported and
    replaced by its default, so that the remaining checks still run and report theirs.
    """
    errors: list[str] = []
    kwargs: dict[str, Any] = {}
    top_fields = {f.name for f in dataclasses.fields(PruneConfig)}
    for key, value in tree.items():
        if key not in top_fields:
            errors.append(f"unknown key {key!r}; valid top-level keys: {', '.join(sorted(top_fields))}")
        elif key in _SECTIONS:
            section = _build_section(key, value, errors)
            if section is not None:
                kwargs[key] = section
        elif key == "compare":
            if value is not None and not isinstance(value, (str, list, tuple)):
                errors.append(f"compare={value!r}: expected a list of allocation names")
                continue
            kwargs[key] = tuple(_split_list(value) if isinstance(value, str) else value or ())
        elif key == "recover":
            recover = _build_recover(value, errors)
            if recover is not None:
                kwargs[key] = recover
        else:
            kwargs.update(typed_fields("", PruneConfig, {key: value}, errors, skip=("pattern",)))
    _match_sparsity(tree, kwargs, errors)
    cfg = PruneConfig(**kwargs)
    try:
        validate(cfg)
    except ConfigError as exc:
        errors += exc.errors
    if errors:
        raise ConfigError(errors)
    return cfg


def _match_sparsity(tree: Mapping[str, Any], kwargs: dict[str, Any], errors: list[str]) -> None:
    """With an N:M pattern the sparsity is ``1 - N/M``: a different explicit ``sparsity`` is an
    error (it would be ignored); an unset one takes that value, so the resolved config agrees."""
    pattern = kwargs.get("pattern")
    match = PATTERN_RE.match(pattern) if isinstance(pattern, str) else None
    if match is None or not 0 < int(match.group(1)) < int(match.group(2)):
        return
    implied = 1.0 - int(match.group(1)) / int(match.group(2))
    if "sparsity" not in tree:
        kwargs["sparsity"] = implied
    elif "sparsity" in kwargs and not math.isclose(kwargs["sparsity"], implied, abs_tol=1e-9):
        errors.append(f"sparsity={kwargs['sparsity']!r} conflicts with pattern={pattern!r}, which "
                      f"prunes exactly 1 - {match.group(1)}/{match.group(2)} = {implied:g} of every "
                      f"group; drop sparsity (or --sparsity) or set it to {implied:g}")


def _build_section(name: str, value: Any, errors: list[str]) -> Any:
    cls = _SECTIONS[name]
    named = name in ("model", "criterion", "allocation")
    if isinstance(value, str) and named:
        value = {"name": value}
    if not isinstance(value, Mapping):
        errors.append(f"{name}: expected a mapping{' or a name' if named else ''}, got {value!r}")
        return None
    fields = {f.name for f in dataclasses.fields(cls)}
    value = _renamed_keys(name, dict(value), errors)
    for k in ("datasets", "tasks"):
        if name == "eval" and isinstance(value.get(k), str):
            value[k] = _split_list(value[k])
    subsections = _SUBSECTIONS.get(name, {})
    known = typed_fields(f"{name}.", cls, {k: v for k, v in value.items()
                                           if k in fields and k not in subsections}, errors)
    for sub, sub_cls in subsections.items():
        if sub in value:
            built = _build_subsection(f"{name}.{sub}", sub_cls, value[sub], errors)
            if built is not None:
                known[sub] = built
    extra = {k: v for k, v in value.items() if k not in fields}
    if extra and name not in _OPEN_SECTIONS:
        for k in extra:
            errors.append(f"unknown key {name}.{k}; valid keys: {', '.join(sorted(fields))}")
        extra = {}
    if name in _OPEN_SECTIONS:
        known["options"] = {**dict(known.get("options") or {}), **extra}
    for k in ("clip", "datasets", "devices", "tasks"):
        if k in known and isinstance(known[k], list):
            known[k] = tuple(known[k])
    return cls(**known)


def _build_subsection(label: str, cls: type, value: Any, errors: list[str]) -> Any:
    """A nested section such as ``engine.ray``: a mapping of typed keys, nothing else."""
    if value is None:
        return None
    if not isinstance(value, Mapping):
        errors.append(f"{label}: expected a mapping of its keys (e.g. {label}.<key>=...), got "
                      f"{value!r}")
        return None
    fields = {f.name for f in dataclasses.fields(cls)}
    for k in value:
        if k not in fields:
            errors.append(f"unknown key {label}.{k}; valid keys: {', '.join(sorted(fields))}")
    return cls(**typed_fields(f"{label}.", cls, {k: v for k, v in value.items() if k in fields},
                              errors))


def _renamed_keys(section: str, value: dict[str, Any], errors: list[str]) -> dict[str, Any]:
    """Move the deprecated flat keys of ``section`` to their new place, logging a warning that
    names the new key; one key given under both names is an error."""
    for old, new in DEPRECATED_KEYS.items():
        old_section, _, old_key = old.partition(".")
        if old_section != section or old_key not in value:
            continue
        sub, key = new.split(".")[1:]
        moved = value.pop(old_key)
        nested = value.get(sub)
        nested = dict(nested) if isinstance(nested, Mapping) else {} if nested is None else nested
        if not isinstance(nested, dict):
            continue  # the malformed subsection is reported by _build_subsection
        if key in nested:
            errors.append(f"{old}={moved!r} and {new}={nested[key]!r} are both set; {old} is "
                          f"the deprecated name of {new}: drop {old}")
            continue
        log.warning("config key %s is deprecated; write %s (it reads the same value)", old, new)
        nested[key] = moved
        value[sub] = nested
    return value


def _build_recover(value: Any, errors: list[str]) -> RecoverConfig | None:
    """``recover``: a step name, a comma list, a list of names, or a mapping with ``steps``,
    ``baseline`` and one option mapping per step name."""
    if value is None or isinstance(value, (str, list, tuple)):
        value = {"steps": value}
    if not isinstance(value, Mapping):
        errors.append(f"recover: expected a step list (e.g. [dsnot]) or a mapping with 'steps', "
                      f"got {value!r}")
        return None
    steps = value.get("steps")
    if steps is not None and not isinstance(steps, (str, list, tuple)):
        errors.append(f"recover.steps={steps!r}: expected a list of step names, e.g. [dsnot]")
        steps = None
    steps = _split_list(steps) if isinstance(steps, str) else tuple(steps or ())
    baseline = value.get("baseline", False)
    nested = value.get("options") or {}  # the resolved form written by to_dict()
    sections = dict(nested) if isinstance(nested, Mapping) else {"options": nested}
    sections.update({k: v for k, v in value.items() if k not in ("steps", "baseline", "options")})
    options: dict[str, Any] = {}
    for name, opts in sections.items():
        if not isinstance(opts, Mapping):
            errors.append(f"recover.{name}: expected the options of step {name!r} as a mapping "
                          f"(e.g. recover.{name}.max_cycles=100), got {opts!r}")
            continue
        options[name] = dict(opts)
    return RecoverConfig(steps=steps, options=options, baseline=baseline)


def _split_list(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none", "off", "false"):
        return ()
    return tuple(s.strip() for s in text.split(",") if s.strip())


def load_config(path: str | Path | None = None, overrides: Iterable[str] = (),
                extra: Mapping[str, Any] | None = None) -> PruneConfig:
    """Defaults <- YAML file <- ``extra`` (e.g. CLI flags) <- ``key=value`` overrides."""
    tree: dict[str, Any] = _expand_recover(read_yaml(path) if path is not None else {})
    if extra:
        tree = _expand_recover(merge(tree, extra))
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(tree, key, value)
        _expand_recover(tree)
    return build_config(tree)


def config_from_flags(values: Mapping[str, Any], flags: Mapping[str, str]) -> PruneConfig:
    """A validated config for another entry point (plan, evaluate, recover): ``values`` maps
    dotted keys to the flag values, ``flags`` dotted keys to flag names, so each error names
    the flag too (``--windows: eval.max_windows=-1: expected a positive integer``)."""
    from neuroal.inputs import label_flags

    tree: dict[str, Any] = {}
    for key, value in values.items():
        set_dotted(tree, key, value)
    try:
        return build_config(tree)
    except ConfigError as exc:
        raise ConfigError(label_flags(exc.errors, flags)) from None


def _expand_recover(tree: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the shorthand ``recover: dsnot`` / ``[dsnot]`` as ``{steps: ...}`` in place, so
    later ``recover.<step>.<option>=...`` overrides and flags can merge into it."""
    if isinstance(tree.get("recover"), (str, list)):
        tree["recover"] = {"steps": tree["recover"]}
    return tree


# --------------------------------------------------------------------------- validation


def validate(cfg: PruneConfig) -> None:
    """Check every rule that needs no model; raise one ConfigError listing all failures."""
    errors: list[str] = []
    errors += _check_sparsity(cfg)
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
    from neuroal.progress import MODES

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
    from neuroal.allocation import ALLOCATIONS
    from neuroal.criteria import CRITERIA

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
    from neuroal.data import SOURCES, parse_source

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


def _check_tasks(ev: EvalConfig) -> list[str]:
    """Zero-shot settings; whether the task names exist is checked by the pipeline (it needs
    lm-eval's task index)."""
    import importlib.util

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
    return errors


def _check_engine(cfg: PruneConfig) -> list[str]:
    errors = []
    eng = cfg.engine
    from neuroal.engine import EXECUTORS

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
    from neuroal.engine.onload import ONLOAD_CHOICES

    if eng.onload not in ONLOAD_CHOICES:
        errors.append(f"engine.onload={eng.onload!r}: expected one of {', '.join(ONLOAD_CHOICES)} "
                      "(device: weights stay on the device; host / disk: one block at a time is "
                      "brought to the device; auto: chosen by the memory planner)")
    if not isinstance(eng.prefetch, bool):
        errors.append(f"engine.prefetch={eng.prefetch!r}: expected true or false")
    if eng.memory_limit is not None:
        try:
            parse_size(eng.memory_limit, "engine.memory_limit")
        except ValueError as exc:
            errors.append(f"{exc} (the memory each worker may use)")
    return errors


def _check_ray(ray: RayConfig) -> list[str]:
    """``engine.ray.*`` (the Ray executor's options)."""
    errors = []
    if not is_int(ray.inflight) or ray.inflight < 0:
        errors.append(f"engine.ray.inflight={ray.inflight!r}: expected an integer >= 0 (0 = one "
                      "per worker)")
    if ray.placement not in RAY_PLACEMENTS:
        errors.append(f"engine.ray.placement={ray.placement!r}: expected one of "
                      f"{', '.join(RAY_PLACEMENTS)} (STRICT_SPREAD needs one node per worker)")
    if not is_number(ray.cpus) or ray.cpus <= 0:
        errors.append(f"engine.ray.cpus={ray.cpus!r}: expected a number > 0 (CPUs per actor)")
    if not is_int(ray.max_restarts) or ray.max_restarts < 0:
        errors.append(f"engine.ray.max_restarts={ray.max_restarts!r}: expected an integer >= 0 "
                      "(restarts per Ray actor after it died; 0 = stop at the first death)")
    if ray.address is not None and not isinstance(ray.address, str):
        errors.append(f"engine.ray.address={ray.address!r}: expected 'auto', "
                      "'ray://host:port' or 'host:port'")
    return errors


def _check_recover(cfg: PruneConfig) -> list[str]:
    """Step names, chain rules and each step's options (recovery.md)."""
    from neuroal.recovery import RECOVERY_STEPS, chain_errors, resolved_options

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
