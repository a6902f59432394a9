"""Whole-model PERP retraining of a pruned causal LM (recovery.md §3.5, §4).

Two runners share one loop: :class:`TorchRunner` (plain PyTorch on one device: what tests and
single-GPU runs use) and :class:`AcceleratorRunner` (accelerate; under ``accelerate launch
--use_deepspeed --deepspeed_config_file configs/deepspeed/zero3.json`` this is DeepSpeed ZeRO-3).
Masks stay fixed the preferred way (§4.2 option 1): the pruned base weights are frozen, the
trainable subset is biases, norms and sparsity-preserving adapters, and the merge keeps every
zero. Every run checks it again (§4.4): zeros before ⊆ zeros after, per matrix.

Recipe (§3.5): AdamW (0.9, 0.999), eps 1e-8, weight decay 0; linear schedule with 10 % warm-up;
gradient-norm clipping at 1.0; fp32 trainables on 16-bit frozen weights with autocast (fp16 adds a
GradScaler); data are packed calibration windows (no padding, so every token counts).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

from neuroal.data import load_calibration, load_eval_windows
from neuroal.data.evaluation import perplexity
from neuroal.models.adapter import ModelAdapter
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
from neuroal.outputs.compat import make_loadable
from neuroal.outputs.export import OutputDir, parse_size, write_config, write_json
from neuroal.recovery.perp import (
    ParamCount,
    PerpOptions,
    PerpState,
    adamw,
    apply_perp,
    autocast_for,
    check_zeros_kept,
    linear_warmup_decay,
    merge_perp,
    merge_state_dict,
    trainable_parameters,
    warmup_steps,
    zero_masks,
)
from neuroal.recovery.remask import MaskKeeper
from neuroal.runtime.logging import RunLog, get_logger
from neuroal.runtime.process import load_tokenizer, pick_device
from neuroal.runtime.progress import Progress
from neuroal.runtime.registry import Registry

log = get_logger(__name__)


@dataclass(frozen=True)
class TrainOptions:
    """Optimisation settings (recovery.md §3.5; defaults are the reference code's debug ones).

    Attributes:
        lr: Peak AdamW learning rate.
        steps: Optimiser steps; ignored when ``tokens`` is set.
        tokens: Token budget; ``steps = ceil(tokens / (batch_size * grad_accum * T * ranks))``.
        batch_size: Windows per micro-batch (per rank).
        grad_accum: Micro-batches per optimiser step.
        warmup: Warm-up fraction of the linear schedule.
        max_grad_norm: Gradient-norm clipping.
        seed: Seed of the window order (reshuffled every epoch, as the Trainer does).
        gradient_checkpointing: Recompute block activations in the backward pass.
        eval_batch_size: Windows per forward when measuring perplexity.
    """

    lr: float = 5e-4
    steps: int = 20
    tokens: int | None = None
    batch_size: int = 1
    grad_accum: int = 2
    warmup: float = 0.1
    max_grad_norm: float = 1.0
    seed: int = 42
    gradient_checkpointing: bool = False
    eval_batch_size: int = 4

    def __post_init__(self) -> None:
        bad = [f"{k}={v}" for k, v in (("lr", self.lr), ("steps", self.steps),
                                         ("batch_size", self.batch_size),
                                         ("grad_accum", self.grad_accum),
                                         ("tokens", self.tokens or 1)) if v <= 0]
        if bad or not 0 <= self.warmup < 1:
            raise ValueError(f"training options {', '.join(bad) or f'warmup={self.warmup}'}: "
                             "expected positive lr/steps/sizes/tokens and 0 <= warmup < 1")

    def plan_steps(self, seqlen: int, ranks: int = 1) -> int:
        """Optimiser steps: ``steps``, or enough to spend the ``tokens`` budget."""
        if self.tokens is None:
            return self.steps
        return math.ceil(self.tokens / (self.batch_size * self.grad_accum * seqlen * ranks))


@dataclass
class TrainInfo:
    """What a retraining run did.

    Attributes:
        steps: Optimiser steps.
        tokens: Tokens trained on (all ranks; packed windows, so no padding).
        seconds: Wall time of the loop.
        count: Trainable parameters by group, total and fraction (the spec's formulas).
        losses: Mean training loss of every optimiser step (rank 0's micro-batches).
    """

    steps: int
    tokens: int
    seconds: float
    count: ParamCount | None = None
    losses: list[float] = field(default_factory=list)

    def loss_summary(self) -> dict[str, float]:
        """First, last, min and the means of the first and last 10 % of steps."""
        k = max(1, len(self.losses) // 10)
        return {"first": self.losses[0], "last": self.losses[-1], "min": min(self.losses),
                "head_mean": sum(self.losses[:k]) / k, "tail_mean": sum(self.losses[-k:]) / k}

    def to_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "tokens": self.tokens, "seconds": self.seconds,
                "params": self.count.to_dict() if self.count else None,
                "loss": self.loss_summary() if self.losses else None}


# --------------------------------------------------------------------------- maths of the loop


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``(B, T)`` ids (fp32 logits)."""
    logits = model(input_ids=ids, use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())


@torch.no_grad()
def window_nll(model: nn.Module, windows: torch.Tensor, batch_size: int,
               device: torch.device) -> torch.Tensor:
    """Mean next-token NLL per window, ``(k, T) -> (k,)`` float64 (evaluation protocol).

    Feed it to :func:`neuroal.data.evaluation.perplexity`. The model's mode is restored.
    """
    was_training = model.training
    model.eval()
    out = []
    for start in range(0, windows.shape[0], batch_size):
        ids = windows[start:start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits.float()
        nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), ids[:, 1:], reduction="none")
        out.append(nll.mean(1).double().cpu())
    model.train(was_training)
    return torch.cat(out)


def sample_order(n: int, count: int, seed: int) -> torch.Tensor:
    """``count`` window indices: a fresh seeded permutation of ``range(n)`` per epoch."""
    generator = torch.Generator().manual_seed(seed)
    epochs = -(-count // n)
    return torch.cat([torch.randperm(n, generator=generator) for _ in range(epochs)])[:count]


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the (frozen) token embedding: the model's working precision."""
    return ModelAdapter(model).embed.weight.dtype


def _schedule(optimizer: torch.optim.Optimizer, steps: int,
              warmup: float) -> torch.optim.lr_scheduler.LambdaLR:
    warm = warmup_steps(steps, warmup)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup_decay(s, steps, warm))


def _trainables(model: nn.Module) -> list[nn.Parameter]:
    params = list(trainable_parameters(model).values())
    if not params:
        raise RuntimeError("the model has no trainable parameter; call apply_perp(model, options) "
                           "before training")
    return params


@contextmanager
def _training_mode(model: nn.Module, checkpointing: bool) -> Iterator[None]:
    """``model.train()`` (dropout as in the reference) and optional gradient checkpointing."""
    was_training = model.training
    # transformers 5 renamed gradient_* to activation_checkpointing_*; 4.x has only the old names
    modern = hasattr(model, "activation_checkpointing_enable")
    if checkpointing and modern:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    try:
        yield
    finally:
        model.train(was_training)
        if checkpointing:
            (model.activation_checkpointing_disable if modern else model.gradient_checkpointing_disable)()


# --------------------------------------------------------------------------- runners


class Runner(Protocol):
    """One optimiser's view of a model: where to call forward, how to step.

    ``module`` is what forward is called on (a DeepSpeed engine, a DDP wrapper or the model);
    ``model`` the Hugging Face model inside it (modes, gradient checkpointing).
    """

    module: nn.Module
    model: nn.Module
    device: torch.device
    rank: int
    world: int
    is_main: bool
    zero_stage: int | None

    def micro(self) -> Any: ...

    def autocast(self) -> Any: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def merged_state_dict(self, state: PerpState) -> dict[str, torch.Tensor]: ...

    def barrier(self) -> None: ...


class TorchRunner:
    """Plain PyTorch on the model's device: AdamW, schedule, clipping, GradScaler for fp16."""

    def __init__(self, model: nn.Module, options: TrainOptions, steps: int) -> None:
        self.module = self.model = model
        self.options = options
        self.params = _trainables(model)
        self.optimizer = adamw(self.params, options.lr)
        self.schedule = _schedule(self.optimizer, steps, options.warmup)
        self.device = next(model.parameters()).device
        self.dtype = model_dtype(model)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        self.rank, self.world, self.is_main = 0, 1, True
        self.zero_stage: int | None = None
        self.keeper = MaskKeeper.for_model(model)  # perp-full only: re-mask around each step

    def micro(self) -> Any:
        return nullcontext()

    def autocast(self) -> Any:
        return autocast_for(self.device, self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss / self.options.grad_accum).backward()

    def step(self) -> None:
        self.scaler.unscale_(self.optimizer)
        self.keeper.zero_grads()
        torch.nn.utils.clip_grad_norm_(self.params, self.options.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.keeper.reapply()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)

    def merged_state_dict(self, state: PerpState) -> dict[str, torch.Tensor]:
        """Merge in place, then the model's state dict."""
        merge_perp(self.module, state)
        return dict(self.module.state_dict())

    def barrier(self) -> None:
        return None


class AcceleratorRunner:
    """accelerate (DeepSpeed ZeRO-3 under ``accelerate launch --use_deepspeed``).

    The DeepSpeed config's ``auto`` batch, accumulation and clipping entries are filled from
    the options; DeepSpeed keeps fp32 master copies of the trainables itself.
    """

    def __init__(self, accelerator: Any, model: nn.Module, options: TrainOptions, steps: int) -> None:
        self.accelerator = accelerator
        self.options = options
        self.params = _trainables(model)
        optimizer = adamw(self.params, options.lr)
        schedule = _schedule(optimizer, steps, options.warmup)
        plugin = accelerator.state.deepspeed_plugin
        self.deepspeed = plugin is not None
        self.zero_stage = int(plugin.zero_stage) if plugin is not None else None
        if plugin is not None:
            fill_deepspeed_auto(plugin.deepspeed_config, options)
        self.model = model
        self.dtype = model_dtype(model)
        self.module, self.optimizer, self.schedule = accelerator.prepare(model, optimizer, schedule)
        self.device = accelerator.device
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.is_main = accelerator.is_main_process
        self.keeper = MaskKeeper.for_model(model)  # after prepare: ZeRO-3 fragments are final

    def micro(self) -> Any:
        return self.accelerator.accumulate(self.module)

    def autocast(self) -> Any:
        """DeepSpeed casts the model itself; otherwise as :class:`TorchRunner`."""
        return nullcontext() if self.deepspeed else autocast_for(self.device, self.dtype)

    def backward(self, loss: torch.Tensor) -> None:
        if not (self.deepspeed and self.keeper):
            self.accelerator.backward(loss)
            return
        # accelerate's DeepSpeed backward runs engine.backward and engine.step back to back;
        # re-masking needs the gap between them, so the same two calls are made here.
        engine, sync = self.module, self.accelerator.sync_gradients
        engine.set_gradient_accumulation_boundary(is_boundary=sync)
        engine.backward(loss)
        if sync:
            self.keeper.zero_grads()
            engine.step()
            self.keeper.reapply()

    def step(self) -> None:
        if self.deepspeed:  # clips with the config's gradient_clipping; re-masks in backward
            self.optimizer.step()
        else:
            self.keeper.zero_grads()
            self.accelerator.clip_grad_norm_(self.params, self.options.max_grad_norm)
            self.optimizer.step()
            self.keeper.reapply()
        self.schedule.step()
        self.optimizer.zero_grad()

    def merged_state_dict(self, state: PerpState) -> dict[str, torch.Tensor]:
        """Gather the full 16-bit state dict on the main process (collective) and merge there."""
        full = self.accelerator.get_state_dict(self.module)
        if not self.is_main:
            return {}
        return merge_state_dict(self.accelerator.unwrap_model(self.module), full)

    def barrier(self) -> None:
        self.accelerator.wait_for_everyone()


def fill_deepspeed_auto(config: dict[str, Any], options: TrainOptions) -> None:
    """Replace ``auto`` micro-batch, accumulation and clipping entries of a DeepSpeed config."""
    values = {"train_micro_batch_size_per_gpu": options.batch_size,
              "gradient_accumulation_steps": options.grad_accum,
              "gradient_clipping": options.max_grad_norm}
    for key, value in values.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
    if config["gradient_accumulation_steps"] != options.grad_accum:
        raise ValueError(f"the DeepSpeed config sets gradient_accumulation_steps="
                         f"{config['gradient_accumulation_steps']} but the run asks for "
                         f"{options.grad_accum}; set it to \"auto\" in the config")


# --------------------------------------------------------------------------- the loop


def run_steps(runner: Runner, windows: torch.Tensor, options: TrainOptions, steps: int) -> TrainInfo:
    """Train the runner's trainable parameters for ``steps`` optimiser steps on ``windows``.

    Args:
        runner: A :class:`TorchRunner` or :class:`AcceleratorRunner`.
        windows: Calibration token ids ``(N, T)`` (every rank passes the same tensor; rank r
            takes its share of each global batch).
        options: Batch, accumulation, seed...
        steps: Optimiser steps (:meth:`TrainOptions.plan_steps`).

    Returns:
        Steps, tokens, seconds and the loss of every step (no parameter count).
    """
    per_step = options.batch_size * options.grad_accum * runner.world
    order = sample_order(windows.shape[0], steps * per_step, options.seed)
    losses = []
    t0 = time.perf_counter()
    shown = Progress(steps, "retraining", unit="step", mode=None if runner.is_main else "off")
    with _training_mode(runner.model, options.gradient_checkpointing), shown:
        for step in range(steps):
            total = 0.0
            for micro in range(options.grad_accum):
                start = step * per_step + (micro * runner.world + runner.rank) * options.batch_size
                ids = windows[order[start:start + options.batch_size]].to(runner.device)
                with runner.micro():
                    with runner.autocast():
                        loss = lm_loss(runner.module, ids)
                    runner.backward(loss)
                    if micro == options.grad_accum - 1:
                        runner.step()
                total += float(loss.detach())
            losses.append(total / options.grad_accum)
            log.debug("step %d/%d  loss %.4f", step + 1, steps, losses[-1])
            shown.update(status=f"loss {losses[-1]:.4f}")
    return TrainInfo(steps, steps * per_step * windows.shape[1], time.perf_counter() - t0, None, losses)


def train(model: nn.Module, windows: torch.Tensor, options: TrainOptions) -> TrainInfo:
    """Train ``model``'s trainable parameters in this process (plain PyTorch, one device).

    Args:
        model: A model prepared with :func:`neuroal.recovery.perp.apply_perp`.
        windows: Calibration token ids ``(N, T)``, int64.
        options: The recipe.
    """
    steps = options.plan_steps(windows.shape[1])
    return run_steps(TorchRunner(model, options, steps), windows, options, steps)


def retrain(model: nn.Module, windows: torch.Tensor, perp: PerpOptions,
            options: TrainOptions) -> tuple[TrainInfo, PerpState]:
    """PERP end to end in memory: select/wrap, train, merge, and check every zero is kept.

    Returns:
        The training info (with the parameter count) and the PERP state (already merged).

    Raises:
        RuntimeError: A pruned weight changed (must not happen).
    """
    before = zero_masks(model)
    state = apply_perp(model, perp)
    info = train(model, windows, options)
    info.count = state.count
    merge_perp(model, state)
    check_zeros_kept(before, zero_masks(model))
    log.info("PERP retraining: %d steps, %d tokens, loss %.4f -> %.4f, %.1f s", info.steps,
             info.tokens, info.losses[0], info.losses[-1], info.seconds)
    return info, state


# --------------------------------------------------------------------------- end to end (launch/recover.py)


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


def prunable_weight_names(model: nn.Module) -> list[str]:
    """``<block prefix><linear>.weight`` of every prunable block linear."""
    adapter = ModelAdapter(model)
    return [f"{adapter.block_prefix(i)}{name}.weight" for i, block in enumerate(adapter.blocks)
            for name in adapter.prunable_linears(block)]


def verify_saved_zeros(before: Path, after: Path, names: list[str]) -> dict[str, dict[str, int]]:
    """Zeros of every prunable weight in checkpoint ``before`` are zeros in ``after`` (§4.4).

    Reads one tensor at a time.

    Returns:
        ``name -> {"zeros", "numel"}`` of ``after``.

    Raises:
        RuntimeError: A weight lost zeros.
    """
    old, new = SafetensorsCheckpoint(before), SafetensorsCheckpoint(after)
    counts = {}
    for name in names:
        a = old.load([name], torch.float32, "cpu")[name] == 0
        b = new.load([name], torch.float32, "cpu")[name] == 0
        check_zeros_kept({name: a}, {name: b})
        counts[name] = {"zeros": int(b.sum()), "numel": b.numel()}
    return counts


def save_model(state_dict: Mapping[str, torch.Tensor], model: nn.Module, tokenizer: Any,
               directory: Path, dtype: torch.dtype, shard_size: str) -> None:
    """Safetensors shards + index, ``config.json`` (bias / tie flags as changed) and tokenizer."""
    from huggingface_hub import save_torch_state_dict

    adapter = ModelAdapter(model)
    tensors = {k: v.detach().to(device="cpu", dtype=dtype if v.is_floating_point() else v.dtype)
               for k, v in state_dict.items() if not adapter.export_skip(k)}
    save_torch_state_dict(tensors, directory, max_shard_size=parse_size(shard_size))
    write_config(directory, model.config, str(dtype).removeprefix("torch."))
    tokenizer.save_pretrained(directory)
    make_loadable(directory)


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


__all__ = ["BACKENDS", "AcceleratorRunner", "RecoverJob", "TorchRunner", "TrainInfo", "TrainOptions",
           "fill_deepspeed_auto", "lm_loss", "recover", "retrain", "run_steps", "sample_order",
           "train", "window_nll"]
