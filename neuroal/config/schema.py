"""The configuration schema: typed, frozen dataclasses and how a nested dict becomes one.

Leaf module (no higher neuroal import): the dataclasses, ``key=value`` overrides, YAML reading,
deprecated-key renames and per-field type checks. The rules that need the plug-in registries
(criterion, allocation, executor, data source and recovery step names) are
:func:`neuroal.config.build.validate`; :mod:`neuroal.config.build` is the front door that builds and
validates a config, and re-exports everything here.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from neuroal.config.inputs import YAML_MAX_BYTES, YAMLLimitError, not_a_file, safe_yaml_load, typed_fields
from neuroal.runtime.errors import ConfigError
from neuroal.runtime.jobs import NMPattern

DTYPES = ("auto", "float32", "bfloat16", "float16")
PATTERN_RE = re.compile(r"^(\d+):(\d+)$")
RAY_PLACEMENTS = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
GENERATION_BACKENDS = ("auto", "workers", "hf", "vllm")
SPARSITY_SCOPES = ("targeted", "model")
"""``eval.generation``: who answers lm-eval's generation requests."""
# how a stream crosses between Ray actors (docs/transport.md); auto = nccl (CUDA), gloo (CPU)
RAY_TRANSPORTS = ("auto", "object-store", "gloo", "nccl")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

log = logging.getLogger("neuroal.config.build")  # the warnings of the config, as before the split


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

    ``tasks``: lm-eval tasks scored through the workers (``neuroal.evaluation.zeroshot``; needs the
    ``neuroal[eval]`` extra), with task YAMLs also read from ``include_path``; ``limit`` keeps
    the first documents of each task, ``max_length`` the context window (None: model's).
    ``generation``: who answers generation (``generate_until``) requests: ``workers`` (greedy
    decoding through the executor), ``hf`` / ``vllm`` (lm-eval's backends on the model
    directory), or ``auto`` (``vllm`` when installed with CUDA, else ``hf``, for a model
    directory evaluated by ``neuroal evaluate``; the workers otherwise).
    ``apply_chat_template`` and ``log_samples`` are lm-eval's options of the same names.
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
    generation: str = "auto"
    apply_chat_template: bool = False
    log_samples: bool = False


@dataclass(frozen=True)
class RayConfig:
    """``engine.ray``: options of the Ray executor only (engine.md §3.3)."""

    address: str | None = None  # "auto", "ray://host:10001"; None = $RAY_ADDRESS or local
    placement: str = "PACK"  # placement-group strategy of the worker bundles
    cpus: float = 1.0  # CPUs reserved per Ray actor
    max_restarts: int = 3  # restarts per Ray actor after it died (killed, OOM); then the run stops
    inflight: int = 0  # candidates / windows in flight (pipelined actors); 0 = one per worker
    # seconds to wait for the placement group (at start and after a lost node) and for a
    # restarted actor to be placed and reload its slice; then the run stops (--resume continues)
    placement_timeout: float = 600.0
    transport: str = "auto"  # auto | object-store | gloo | nccl: streams between actors


@dataclass(frozen=True)
class DistConfig:
    """``engine.dist``: options of the torch.distributed executor only (engine.md §3.4)."""

    # Ranks > 0 wait in a broadcast while rank 0 works alone (data, search bookkeeping, export);
    # torch's default 30 min collective timeout is too short at 70B.
    timeout: float = 14400.0  # seconds a command's broadcast / gather may wait (long)
    # seconds a point-to-point stream transfer (and the stream group's collectives) may wait: a
    # hung GPU or a dead neighbour is reported after this, not after ``timeout``
    collective_timeout: float = 1800.0


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
    parallel: str = "auto"  # pipeline | data: how the final prune uses the workers; auto = rule
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
    shard_size: int | str = "2GB"  # bytes or "2GB", "500MiB" (neuroal.config.inputs.parse_size)
    resume: bool = False  # continue from <dir>.neuroal-tmp/state (engine.md §8)
    keep_state: bool = True  # keep the resume state when a run fails
    push_to_hub: str | None = None  # hub repo id to upload the finished output to (network)
    plots: bool = True  # PNG plots beside report.json (needs matplotlib, extra [plots])


@dataclass(frozen=True)
class LogConfig:
    """Logging and progress: ``interval`` seconds between progress lines
    when no terminal shows bars, ``progress`` mode (auto | bar | log | off), an extra log
    ``file`` (``--log-file``; every run also writes ``neuroal.log`` into its output)."""

    interval: float = 30.0
    progress: str = "auto"
    file: str | None = None
    allow_existing: bool = False  # --allow-existing: append to a log file neuroal did not write


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
    # layer selection (llm-compressor's spelling): prune the linears matching a target (none:
    # all) and no ignore pattern ('re:<regex>', a full module name or a class name)
    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    # the target applies to the pruned linears (targeted) or to every block linear (model)
    sparsity_scope: str = "targeted"
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
    return key.strip(), yaml_value(f"override {text!r}", raw) if raw != "" else None


def yaml_value(label: str, text: str) -> Any:
    """``text`` read as YAML within neuroal's limits (:func:`neuroal.config.inputs.safe_yaml_load`);
    malformed YAML is a ConfigError naming ``label`` and saying what to write instead."""
    try:
        return safe_yaml_load(text, label)
    except YAMLLimitError as exc:
        raise ConfigError([str(exc)]) from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError([f"{label} is not valid YAML{line}: {problem}; a value holding [ ] {{ }} : "
                           "or # must be quoted inside the override, e.g. key=\"'[1'\""]) from None


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
    p = Path(os.path.expanduser(str(path)))
    problem = not_a_file(p)
    if problem is not None:
        raise ConfigError([f"config file {str(path)!r} {problem}; --config takes a YAML recipe "
                           "file, e.g. configs/smollm2/wanda-uniform-50.yaml"])
    try:
        with p.open("rb") as handle:
            raw = handle.read(YAML_MAX_BYTES + 1)
        text = raw.decode("utf-8")
    except OSError as exc:
        raise ConfigError([f"config file {str(p)!r} cannot be read ({exc.strerror})"]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError([f"config file {str(p)!r} is not UTF-8 text (byte offset "
                           f"{exc.start}); give a YAML recipe"]) from None
    try:
        data = safe_yaml_load(text, f"config file {str(p)!r}") or {}
    except YAMLLimitError as exc:
        raise ConfigError([str(exc)]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([f"config file {str(p)!r} is not valid YAML: {exc}"]) from None
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


def assemble(tree: Mapping[str, Any]) -> tuple[PruneConfig, list[str]]:
    """A :class:`PruneConfig` from a nested dict and the structural errors found on the way.

    Every error is collected: a malformed section or a value of the wrong type is reported and
    replaced by its default, so that the remaining checks (:func:`neuroal.config.build.validate`)
    still run and report theirs.
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
        elif key in ("compare", "targets", "ignore"):
            if value is not None and not isinstance(value, (str, list, tuple)):
                what = "allocation names" if key == "compare" else "module name patterns"
                errors.append(f"{key}={value!r}: expected a list of {what}")
                continue
            kwargs[key] = tuple(_split_list(value) if isinstance(value, str) else value or ())
        elif key == "recover":
            recover = _build_recover(value, errors)
            if recover is not None:
                kwargs[key] = recover
        else:
            kwargs.update(typed_fields("", PruneConfig, {key: value}, errors, skip=("pattern",)))
    _match_sparsity(tree, kwargs, errors)
    return PruneConfig(**kwargs), errors


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


def _expand_recover(tree: dict[str, Any]) -> dict[str, Any]:
    """Rewrite the shorthand ``recover: dsnot`` / ``[dsnot]`` as ``{steps: ...}`` in place, so
    later ``recover.<step>.<option>=...`` overrides and flags can merge into it."""
    if isinstance(tree.get("recover"), (str, list)):
        tree["recover"] = {"steps": tree["recover"]}
    return tree
