"""Runners: one optimiser's view of a model, on one device or under accelerate / DeepSpeed.

:class:`TorchRunner` is plain PyTorch on the model's device (tests, single-GPU runs);
:class:`AcceleratorRunner` wraps accelerate, which under ``accelerate launch --use_deepspeed
--deepspeed_config_file configs/deepspeed/zero3.json`` is DeepSpeed ZeRO-3. Both build PERP's
AdamW and linear schedule (recovery.md §3.5), clip gradients, use a GradScaler for fp16, and
re-mask the block weights around every step when they are trained (``perp-full``,
:mod:`neuroal.recovery.remask`). The loop that drives them is in
:mod:`neuroal.recovery.train.loop`.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Protocol

import torch
from torch import nn

from neuroal.models.adapter import ModelAdapter
from neuroal.recovery.perp import (
    PerpState,
    adamw,
    autocast_for,
    linear_warmup_decay,
    merge_perp,
    merge_state_dict,
    trainable_parameters,
    warmup_steps,
)
from neuroal.recovery.remask import MaskKeeper
from neuroal.recovery.train.options import TrainOptions


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
