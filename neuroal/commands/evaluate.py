"""Evaluate any model (an exported pruned directory, a GGUF file, an alias) through the workers:
the streamed perplexity and lm-eval zero-shot tasks (``neuroal.evaluation.zeroshot``).

:func:`evaluate` is the Python API; :func:`main` the ``neuroal evaluate`` / ``launch/evaluate.py``
command. Both build a validated :class:`~neuroal.config.build.PruneConfig` (only its model, eval and
engine sections matter here), so the same errors come out for the same bad values.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from neuroal import __version__
from neuroal.cli import _names, deprecated_flag, split_overrides
from neuroal.commands.exits import guarded
from neuroal.config.build import ConfigError, load_config, set_dotted
from neuroal.config.inputs import label_flags, position_errors
from neuroal.data.evaluation import load_eval_windows, perplexity
from neuroal.engine.dist import coordinator, rank_info, serve
from neuroal.evaluation.zeroshot import (
    backend_results,
    executor_results,
    generation_backend,
    generation_tasks,
    lm_eval_version,
    merge_results,
    prepare_tasks,
    summarize_results,
    task_spec,
    write_lm_eval_output,
)
from neuroal.models.adapter import AdapterError, ModelAdapter
from neuroal.models.loading import (
    ModelSourceError,
    SafetensorsCheckpoint,
    build_skeleton,
    load_model_config,
    resolve_dtype,
    resolve_model,
)
from neuroal.outputs.guard import (
    check_checkpoint,
    check_decoder_lm,
    check_source,
    check_text_sources,
    run_inputs,
    source_or_none,
    warn_code_execution,
)
from neuroal.outputs.report import tasks_report, versions
from neuroal.outputs.report_keys import MODEL_PPL, model_ppl
from neuroal.outputs.safety import check_file_output, write_file
from neuroal.pipeline import Prepared, build_executor
from neuroal.planning.preflight import check_memory, check_shape
from neuroal.runtime.errors import OutputExistsError
from neuroal.runtime.logging import configure, ensure_visible, get_logger
from neuroal.runtime.process import Timings, load_tokenizer, pick_device

log = get_logger(__name__)

# evaluate flag -> dotted config key
FLAG_KEYS = {
    "eval": "eval.datasets", "eval_seqlen": "eval.seqlen", "eval_windows": "eval.max_windows",
    "tasks": "eval.tasks", "include_path": "eval.include_path", "limit": "eval.limit",
    "num_fewshot": "eval.num_fewshot", "max_length": "eval.max_length",
    "workers": "engine.workers", "engine": "engine.executor", "device": "engine.device",
    "dtype": "model.dtype", "micro_batch": "engine.micro_batch", "data_dir": "calib.data_dir",
    "generation": "eval.generation", "apply_chat_template": "eval.apply_chat_template",
    "log_samples": "eval.log_samples",
}

DEPRECATED_FLAGS = {"--seqlen": "--eval-seqlen", "--windows": "--eval-windows",
                    "--eval-tasks": "--tasks"}
"""Earlier spellings, still read (with a warning): one name per concept with ``prune``."""

PROTOCOL_KEYS = ("eval.seqlen", "eval.max_windows")
"""The perplexity protocol: a neuroal output is evaluated with the one its prune used."""


def prune_protocol(model: str) -> dict[str, Any]:
    """``{eval.seqlen, eval.max_windows}`` of the prune that wrote ``model`` (its
    ``report.json``), or ``{}`` for any other model."""
    report = Path(model).expanduser() / "report.json"
    try:
        data = json.loads(report.read_text())
        evaluation = data["config"]["eval"]
        seqlen = next(iter(data["eval"].values()))["seqlen"] if data.get("eval") else None
    except (OSError, ValueError, KeyError, TypeError, StopIteration, AttributeError):
        return {}
    return {"eval.seqlen": evaluation.get("seqlen") or seqlen,
            "eval.max_windows": evaluation.get("max_windows")}


def evaluation_config(model: str, overrides: Mapping[str, Any] | None = None,
                      config: str | Path | None = None, items: Sequence[str] = ()) -> Any:
    """The validated config of an evaluation: defaults <- YAML ``config`` <- ``overrides`` (a
    nested or dotted mapping) <- ``key=value`` ``items``; ``model`` always wins."""
    tree: dict[str, Any] = {}
    given = {key.replace("__", ".") for key in (overrides or {})} | \
        {item.split("=", 1)[0] for item in items}
    if not given & set(PROTOCOL_KEYS):  # the prune's own protocol, unless the user chose one
        protocol = prune_protocol(model)
        for key, value in protocol.items():
            set_dotted(tree, key, value)
        if protocol:
            log.info("perplexity protocol of the prune that wrote %s: %s", model,
                     ", ".join(f"{k}={v}" for k, v in protocol.items()))
    for key, value in (overrides or {}).items():
        set_dotted(tree, key.replace("__", "."), value)
    set_dotted(tree, "model.name", model)
    if tree.get("eval", {}).get("max_windows") == 0:  # 0 = every window
        tree["eval"]["max_windows"] = None
    cfg = load_config(config, items, tree)
    return cfg


EVALUATE_SECTIONS = ("model", "eval", "engine", "calib", "log_level", "seed")
"""Config sections an evaluation reads (``calib`` only for ``data_dir``)."""


def evaluate(model: str = "smollm2-135m", *, datasets: Sequence[str] | str = ("wikitext2",),
             tasks: Sequence[str] | str = (), windows: int | None = None,
             seqlen: int | None = None, limit: int | None = None, num_fewshot: int | None = None,
             include_path: str | None = None, workers: int | None = None,
             executor: str | None = None, device: str | None = None, dtype: str | None = None,
             config: str | Path | None = None, **overrides: Any) -> dict[str, Any]:
    """Perplexity and lm-eval task scores of ``model`` through the executor's workers.

    Args:
        model: Alias (``smollm2-135m``), local HF directory (e.g. a pruned output), ``.gguf``
            file or hub id.
        datasets: Perplexity sources (``wikitext2``, ``c4``, ``text:<path>``); ``()`` for none.
        tasks: lm-eval task names (needs ``neuroal[eval]``), e.g. ``["hellaswag", "arc_easy"]``.
        windows: First perplexity windows (``0`` = all; default: the protocol of the prune that
            wrote ``model``, else 64). ``seqlen``: tokens per window (likewise, else 512).
        limit, num_fewshot, include_path: lm-eval's options.
        workers, executor, device, dtype: how the model is spread and run.
        config: Optional YAML recipe whose ``model``, ``eval`` and ``engine`` sections apply.
        overrides: Other keys of those sections, as sections (``engine={"ray": {"cpus": 2}}``)
            or with ``__`` for dots (``eval__generation="hf"``).

    Returns:
        ``{"model", "perplexity": {source: ppl}, "eval": {source: {ppl, windows, seqlen}},
        "tasks": {...} (when tasks are given), "timings", "versions"}``.

    Raises:
        ConfigError: A bad value, before any weight is loaded.
    """
    unknown = sorted({k.split("__")[0] for k in overrides} - set(EVALUATE_SECTIONS))
    if unknown:
        raise ConfigError([f"neuroal.evaluate() got unknown argument(s) {', '.join(unknown)}; "
                           "it takes datasets, tasks, windows, seqlen, limit, num_fewshot, "
                           "include_path, workers, executor, device, dtype, config and the "
                           f"sections {', '.join(EVALUATE_SECTIONS)}"])
    tree: dict[str, Any] = {"eval": {"datasets": datasets, "tasks": tasks}}
    named = {"eval": {"max_windows": windows, "seqlen": seqlen, "limit": limit,
                      "num_fewshot": num_fewshot, "include_path": include_path},
             "engine": {"workers": workers, "executor": executor, "device": device},
             "model": {"dtype": dtype}}
    for section, values in named.items():
        tree.setdefault(section, {}).update({k: v for k, v in values.items() if v is not None})
    for key, value in overrides.items():
        if isinstance(value, Mapping):
            tree.setdefault(key, {}).update(value)
        else:
            tree[key] = value
    return run_evaluation(evaluation_config(model, _dotted(tree), config))


def _dotted(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def run_evaluation(cfg: Any, session: Any = None,
                   lm_eval_sink: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Resolve and check everything, load the model's slices on the workers, then score the
    perplexity sources and the lm-eval tasks of ``cfg.eval``; returns the result dict.
    ``session``: the open dist session (:func:`neuroal.engine.dist.coordinator`) or None;
    ``lm_eval_sink`` receives lm-eval's own result dict (for ``--output_path``)."""
    ensure_visible(cfg.log_level)
    timings, t0 = Timings(), time.perf_counter()
    with timings("resolve"):
        source = resolve_model(cfg.model.name, cfg.model.revision)
        check_source(source)  # GGUF header, index weight_map (neuroal.outputs.guard)
        check_text_sources(cfg)
        config = load_model_config(source, cfg.model.trust_remote_code)
        check_decoder_lm(config, cfg.model.name)
        warn_code_execution(cfg.model.trust_remote_code, source, cfg.eval.include_path)
        device = pick_device(cfg.engine.devices[0] if cfg.engine.devices else cfg.engine.device)
        dtype = resolve_dtype(cfg.model.dtype, config, device)
        adapter = ModelAdapter(build_skeleton(config, dtype))
        check_checkpoint(source, config, adapter)
        shape = adapter.shape(row_map=False)
        check_shape(cfg, shape)
        errors = position_errors(config, {"--seqlen": cfg.eval.seqlen or cfg.calib.seqlen},
                                 cfg.model.name)
        if errors:
            raise ConfigError(errors)
        if source.kind == "hf_dir":  # truncated / corrupt shards named before any loading
            SafetensorsCheckpoint(Path(source.location)).verify()
        onload = check_memory(cfg, config, adapter, device, dtype)
    with timings("data"):
        tokenizer = load_tokenizer(source, cfg.model.trust_remote_code, cfg.model.tokenizer)
        evals = {spec: load_eval_windows(spec, tokenizer, cfg.eval.seqlen or cfg.calib.seqlen,
                                         cfg.eval.max_windows, cfg.calib.data_dir)
                 for spec in cfg.eval.datasets}
        manager = prepare_tasks(cfg)
    prep = Prepared(source, config, shape, device, dtype, tokenizer, None, evals, None, onload,
                    manager, session)
    spec = task_spec(cfg)
    generating = generation_tasks(spec, manager) if manager is not None else []
    backend = generation_backend(cfg.eval.generation,
                                 source.location if source.kind == "hf_dir" else None,
                                 device.type == "cuda")
    on_workers = [t for t in spec.tasks if backend == "workers" or t not in generating]
    raw: dict[str, Any] = {}
    with timings("load"):
        executor = build_executor(cfg, prep)
    try:
        with timings("eval"):
            ppl = {spec: perplexity(executor.window_nll(data.windows)) for spec, data in evals.items()}
        with timings("eval_tasks"):
            if on_workers:
                raw = executor_results(executor, tokenizer, config, spec, manager, on_workers)
    finally:
        executor.shutdown()
    if backend != "workers" and generating:  # after the workers released their devices
        with timings("eval_generation"):
            raw = merge_results(raw, backend_results(
                backend, source.location, str(dtype).removeprefix("torch."), str(device), spec,
                manager, generating, torch.cuda.device_count() if device.type == "cuda" else 0))
    timings.phases["total"] = time.perf_counter() - t0
    result: dict[str, Any] = {
        "model": cfg.model.name, "perplexity": ppl,
        "eval": {spec: {MODEL_PPL: ppl[spec], "windows": int(data.windows.shape[0]),
                        "seqlen": int(data.windows.shape[1])} for spec, data in evals.items()},
        "timings": timings.phases, "versions": versions(),
        "engine": {"executor": cfg.engine.executor, "workers": cfg.engine.workers,
                   "device": str(device), "dtype": str(dtype).removeprefix("torch.")},
    }
    if manager is not None:
        result["tasks"] = tasks_report(cfg, {}, summarize_results(raw), lm_eval_version())
        result["tasks"]["generation"] = {"tasks": generating, "backend": backend}
        if lm_eval_sink is not None:
            lm_eval_sink.append(raw)
    return result


# --------------------------------------------------------------------------- command line


def build_parser(prog: str = "neuroal evaluate") -> argparse.ArgumentParser:
    """The ``evaluate`` argument parser; every flag maps onto one config key."""
    p = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Perplexity and lm-eval zero-shot accuracy of a model (e.g. a pruned "
                    "output directory), scored through the workers.",
        epilog="examples:\n"
               "  neuroal evaluate outputs/smollm2-135m-wanda-uniform-0.5\n"
               "  neuroal evaluate smollm2-135m --eval none --tasks neuroal_tiny_qa\n"
               "  neuroal evaluate ./Llama-2-70b-pruned --tasks hellaswag,arc_easy,arc_challenge "
               "--workers 8 --engine ray\n"
               "  neuroal evaluate ./model --tasks my_task --include-path ./my_tasks eval.limit=100\n"
               "\nkey=value overrides address any config key (e.g. engine.ray.cpus=2).")

    p.add_argument("--version", action="version", version=f"neuroal {__version__}")
    p.add_argument("model", help="local HF dir, .gguf file, alias (smollm2-135m) or hub id")
    p.add_argument("--eval", help=f"comma list of {_sources()}, or none (default wikitext2)")
    p.add_argument("--eval-seqlen", type=int, help="tokens per perplexity window (default: the "
                   "protocol of the prune that wrote the model, else 512)")
    p.add_argument("--eval-windows", type=int, help="first k perplexity windows (default: the "
                   "prune's protocol, else 64; 0 = all)")
    for old, new in DEPRECATED_FLAGS.items():
        deprecated_flag(p, old, new, **({"type": int} if new != "--tasks" else {}))
    p.add_argument("--tasks", help="comma list of lm-eval tasks, e.g. hellaswag,arc_easy,piqa "
                   "(needs pip install 'neuroal[eval]'); neuroal ships neuroal_tiny_qa")
    p.add_argument("--include-path", "--include_path", dest="include_path",
                   help="folder of extra lm-eval task YAMLs")
    p.add_argument("--limit", type=int, help="first k documents of each task")
    p.add_argument("--num-fewshot", "--num_fewshot", dest="num_fewshot", type=int,
                   help="few-shot examples (default: task's, else 0)")
    p.add_argument("--max-length", "--max_length", dest="max_length", type=int,
                   help="context window in tokens (default: model's)")
    p.add_argument("--generation", help="who answers generation tasks: auto | workers | hf | "
                   "vllm (auto: lm-eval's vllm or hf backend for a model directory)")
    p.add_argument("--apply-chat-template", "--apply_chat_template", dest="apply_chat_template",
                   action="store_true", default=None, help="lm-eval's option of the same name")
    p.add_argument("--log-samples", "--log_samples", dest="log_samples", action="store_true",
                   default=None, help="keep every document's prompt and answer (with "
                   "--output-path)")
    p.add_argument("--output-path", "--output_path", dest="output_path", metavar="DIR",
                   help="also write lm-eval's own results files (its schema) under DIR")
    p.add_argument("--workers", type=int, help="block slices (one worker each)")
    p.add_argument("--engine", help=f"executor: {_executors()}")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--dtype", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--micro-batch", type=int, help="sequences per forward call")
    p.add_argument("--data-dir", help="folder with wikitext2/ (and c4 json.gz) files")
    p.add_argument("--config", help="YAML recipe (its model/eval/engine sections)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON (an existing "
                   "file is replaced only if neuroal wrote it)")
    p.add_argument("--allow-existing", action="store_true",
                   help="let --json replace an existing file neuroal did not write")
    p.add_argument("--log-level", default=None, help="DEBUG | INFO | WARNING")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return p


def _sources() -> str:
    return _names("neuroal.data:SOURCES", ("self",))


def _executors() -> str:
    return _names("neuroal.engine:EXECUTORS")


@guarded
def main(argv: Sequence[str] | None = None) -> int:
    """``neuroal evaluate MODEL [--eval wikitext2] [--tasks hellaswag,...] [key=value ...]``."""
    parser = build_parser()
    args = parser.parse_intermixed_args(list(sys.argv[1:] if argv is None else argv))
    split_overrides(parser, args)
    configure(args.log_level or "INFO")
    flags = {key: getattr(args, flag) for flag, key in FLAG_KEYS.items()
             if getattr(args, flag) is not None}
    try:
        cfg = evaluation_config(args.model, flags, args.config, args.overrides)
        if args.json:  # the write guard of --json, before any work
            args.json = str(check_file_output(args.json, run_inputs(cfg, source_or_none(cfg),
                                                                    [args.config]),
                                              args.allow_existing))
        if args.log_level is None:
            configure(cfg.log_level)
        info = rank_info(cfg)  # torchrun / accelerate launch (None for one process)
        if info is not None and info.rank > 0:
            return serve(cfg)
        if cfg.eval.log_samples and not args.output_path:
            raise ConfigError(["--log-samples keeps the samples in lm-eval's files: give "
                               "--output-path DIR as well"])
        raw: list[dict[str, Any]] = []
        with coordinator(cfg) as session:
            result = run_evaluation(cfg, session, raw)
    except ConfigError as exc:  # each error names the flag that set its key, if any
        labels = {key: "--" + flag.replace("_", "-") for flag, key in FLAG_KEYS.items()}
        typed = {a.split("=", 1)[0] for a in (sys.argv[1:] if argv is None else argv)}
        for old, new in DEPRECATED_FLAGS.items():  # name the flag as the user typed it
            if old in typed:
                labels = {k: old if v == new else v for k, v in labels.items()}
        log.error("%s", ConfigError(label_flags(exc.errors, labels)))
        return 2
    except (ModelSourceError, AdapterError, FileNotFoundError, ValueError,
            OutputExistsError) as exc:
        log.error("%s", exc)
        return 2
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    sys.stdout.write("\n".join(summary_lines(result)) + "\n")
    if args.output_path and raw and raw[0]:
        for path in write_lm_eval_output(raw[0], args.output_path, cfg.model.name):
            sys.stdout.write(f"lm-eval results: {path}\n")
    if args.json:
        try:
            write_file(args.json, json.dumps({"neuroal": __version__, **result}, indent=2) + "\n")
        except OSError as exc:  # UnsafeOutputError: the message names the path
            log.error("%s", exc)
            return 2
    return 0


def summary_lines(result: dict[str, Any]) -> list[str]:
    """The headline numbers of :func:`run_evaluation` (stdout; logs go to stderr)."""
    lines = [f"{spec}: perplexity {model_ppl(ev):.3f} ({ev['windows']} windows x {ev['seqlen']} tokens)"
             for spec, ev in result["eval"].items()]
    for name, row in (result.get("tasks") or {}).get("results", {}).items():
        lines.append(f"{name}: {format_metrics(row['model'])} ({row['samples']} documents, "
                     f"{row['n_shot']}-shot)")
    return lines


def format_metrics(metrics: Mapping[str, float] | None) -> str:
    """``acc 0.425 ± 0.078, acc_norm 0.450`` (accuracy-like metrics first; n/a for None)."""
    if not metrics:
        return "n/a"
    parts = []
    for name, value in metrics.items():
        if name.endswith("_stderr"):
            continue
        err = metrics.get(f"{name}_stderr")
        parts.append(f"{name} {value:.3f}" + (f" ± {err:.3f}" if isinstance(err, float) else ""))
    return ", ".join(parts)
