"""One ``neuroal recover`` / ``launch/recover.py`` run end to end (recovery.md §3.5, §4).

Load a pruned Hugging Face export, build the training backend (:data:`BACKENDS`: ``torch`` or
``accelerate``), read the calibration and evaluation windows, apply PERP, train, merge, then
write the model atomically with ``recovery.json``, the log and a model card, after checking the
saved zeros against the input. The output path is checked and locked first. This is machinery
(devices, data loading, I/O); the maths is in :mod:`neuroal.recovery.perp`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuroal.data import load_calibration, load_eval_windows
from neuroal.data.evaluation import perplexity
from neuroal.models.loading import (
    ModelSourceError,
    SafetensorsCheckpoint,
    check_finite,
    input_paths,
    load_model_config,
    resolve_dtype,
    resolve_model,
    source_dtype,
)
from neuroal.outputs.card import recovery_card
from neuroal.outputs.export import OutputDir, write_json
from neuroal.recovery.perp import PerpOptions, apply_perp
from neuroal.recovery.train.loop import run_steps
from neuroal.recovery.train.objective import window_nll
from neuroal.recovery.train.options import TrainOptions
from neuroal.recovery.train.runners import AcceleratorRunner, Runner, TorchRunner, model_dtype
from neuroal.recovery.train.save import prunable_weight_names, save_model, verify_saved_zeros
from neuroal.runtime.logging import RunLog
from neuroal.runtime.process import load_tokenizer, pick_device
from neuroal.runtime.registry import Registry


@dataclass(frozen=True)
class RecoverJob:
    """One ``launch/recover.py`` run (plain values; argparse stays in ``launch/``).

    Attributes:
        model: A pruned HF model directory (e.g. written by ``launch/prune.py``) or hub id.
        output: Directory for the retrained model (written atomically).
        variant: PERP variant name (:data:`neuroal.recovery.perp.PERP_VARIANTS`).
        perp: The variant's options (possibly overridden).
        train: The recipe.
        calib: Calibration source spec; ``nsamples`` windows of ``seqlen`` tokens, seed ``seed``.
        eval: Perplexity source spec; first ``eval_windows`` windows (0: no evaluation).
        backend: ``torch`` or ``accelerate`` (:data:`BACKENDS`).
    """

    model: str
    output: str
    variant: str
    perp: PerpOptions
    train: TrainOptions
    calib: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 512
    seed: int = 0
    eval: str = "wikitext2"
    eval_windows: int = 16
    data_dir: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    backend: str = "torch"
    shard_size: str = "2GB"
    overwrite: bool = False


def _torch_backend(job: RecoverJob) -> tuple[torch.device, Any]:

    return pick_device(job.device), None


def _accelerate_backend(job: RecoverJob) -> tuple[torch.device, Any]:
    """The Accelerator must exist before loading so that ZeRO-3 can partition at load time."""
    from accelerate import Accelerator

    accelerator = Accelerator(gradient_accumulation_steps=job.train.grad_accum)
    return accelerator.device, accelerator


BACKENDS: Registry[Any] = Registry("training backend")
BACKENDS.add("torch", _torch_backend)
BACKENDS.add("accelerate", _accelerate_backend, "deepspeed")


def _perplexity(runner: Runner, windows: torch.Tensor | None, batch: int) -> float | None:
    if windows is None:
        return None
    return perplexity(window_nll(runner.module, windows, batch, runner.device))


def _load(job: RecoverJob, device: torch.device) -> tuple[Any, nn.Module, Any]:
    """Source, model and tokenizer (HF directories and hub ids; not GGUF)."""
    from transformers import AutoModelForCausalLM

    source = resolve_model(job.model)
    if source.kind != "hf_dir":
        raise ModelSourceError(f"recover reads a local Hugging Face directory (a pruned export), got "
                               f"{job.model!r} ({source.kind}); prune it with launch/prune.py first")
    config = load_model_config(source)
    dtype = resolve_dtype(job.dtype, config, device)
    checkpoint = SafetensorsCheckpoint(Path(source.location))
    checkpoint.verify()  # a truncated or corrupt shard is named before loading
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype,
                                                 attn_implementation="sdpa", **source.hf_kwargs())
    for name, tensor in model.state_dict().items():
        check_finite(name, tensor, checkpoint)
    return source, model, load_tokenizer(source, False)


def _data(job: RecoverJob, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    calib = load_calibration(job.calib, tokenizer, job.nsamples, job.seqlen, job.seed, job.data_dir)
    evals = None
    if job.eval_windows:
        evals = load_eval_windows(job.eval, tokenizer, job.seqlen, job.eval_windows, job.data_dir).windows
    return calib.windows, evals


def _export(job: RecoverJob, source: Any, model: nn.Module, tokenizer: Any,
            merged: Mapping[str, torch.Tensor], names: list[str], report: dict[str, Any],
            output: Any = None, runlog: Any = None) -> None:
    """Write shards, config, tokenizer and ``recovery.json``; check the zeros before the output
    directory appears (atomic; ``output``: the checked, locked :class:`OutputDir`; ``runlog``:
    the run's :class:`~neuroal.runtime.logging.RunLog`, whose ``neuroal.log`` goes into the output)."""
    dtype = source_dtype(model.config, model_dtype(model))
    output = output if output is not None else OutputDir(Path(job.output), job.overwrite)
    with output.atomic(kind="recover") as staging:
        if runlog is not None:
            runlog.attach(staging)  # neuroal.log, every record of the run so far
        save_model(merged, model, tokenizer, staging, dtype, job.shard_size)
        layers = verify_saved_zeros(Path(source.location), staging, names)
        report["achieved_sparsity"] = (sum(v["zeros"] for v in layers.values())
                                       / max(1, sum(v["numel"] for v in layers.values())))
        report["layers"] = {k: v["zeros"] / v["numel"] for k, v in layers.items()}
        write_json(staging / "recovery.json", report)
        source_card = Path(source.location) / "README.md"
        (staging / "README.md").write_text(recovery_card(
            report, source_card.read_text() if source_card.is_file() else None))


def recover(job: RecoverJob) -> dict[str, Any]:
    """Load a pruned model, retrain it with PERP, write it to ``job.output`` atomically.

    Perplexity is measured before training and after it (adapters unmerged; the merge is exact
    up to float rounding). The saved zeros are checked against the input checkpoint before the
    output directory appears.

    The output path is checked first (neuroal.outputs.safety: not the input, not a directory neuroal
    did not write, ...) and locked by rank 0 for the whole job.

    Returns:
        The report (also written as ``recovery.json`` in the output); empty on other ranks.
    """
    import os

    output = OutputDir(Path(job.output))
    output.check(job.overwrite, inputs=input_paths(resolve_model(job.model)))
    if os.environ.get("RANK", "0") == "0":  # the process that exports (one per job)
        output.acquire(job.overwrite)
    try:
        with RunLog() as runlog:
            return _recover(job, output, runlog)
    finally:
        output.release()


def _recover(job: RecoverJob, output: Any, runlog: Any) -> dict[str, Any]:
    """:func:`recover` once the output is checked and locked."""
    t0 = time.perf_counter()
    device, accelerator = BACKENDS.get(job.backend)(job)
    source, model, tokenizer = _load(job, device)
    windows, evals = _data(job, tokenizer)
    names = prunable_weight_names(model)
    deepspeed = accelerator is not None and accelerator.state.deepspeed_plugin is not None
    state = apply_perp(model.to(device) if accelerator is None else model, job.perp,
                       upcast=not deepspeed)  # DeepSpeed keeps fp32 master copies itself
    ranks = 1 if accelerator is None else accelerator.num_processes
    steps = job.train.plan_steps(windows.shape[1], ranks)
    runner: Runner = (TorchRunner(model, job.train, steps) if accelerator is None
                      else AcceleratorRunner(accelerator, model, job.train, steps))
    ppl = {"spec": job.eval, "windows": job.eval_windows, "seqlen": job.seqlen,
           "before": _perplexity(runner, evals, job.train.eval_batch_size)}
    info = run_steps(runner, windows, job.train, steps)
    info.count = state.count
    ppl["after"] = _perplexity(runner, evals, job.train.eval_batch_size)
    merged = runner.merged_state_dict(state)
    report: dict[str, Any] = {}
    if runner.is_main:
        report = {"model": job.model, "variant": job.variant, "backend": job.backend,
                  "calib": job.calib,
                  "ranks": runner.world, "zero_stage": runner.zero_stage, "perp": asdict(job.perp),
                  "train_options": asdict(job.train), "train": info.to_dict(),
                  "added_biases": len(state.added_biases), "untied_head": state.untied,
                  "perplexity": ppl, "seconds": time.perf_counter() - t0}
        _export(job, source, model, tokenizer, merged, names, report, output, runlog)
    runner.barrier()
    return report
