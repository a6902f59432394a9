"""What recovery adds to the memory plan (recovery.md §3): the ``reconstruct`` phase of every
worker under ``perp-reconstruct`` (:func:`recovery_phases`), and whole-model PERP retraining in
one process after the prune (:func:`retrain_memory`, the plan's ``retrain`` row).

The coefficients below are per-token and per-weight estimates of what autograd and the
optimiser keep; ``launch/bench_recover_memory.py`` checks them against real runs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from neuroal.planning.layout import ModelLayout
from neuroal.planning.memory import (
    DTYPE_BYTES,
    OVERHEAD_BYTES,
    MemoryRequest,
    WorkerMemory,
    device_host_streams,
    worker_phases,
)
from neuroal.recovery import RECOVERY_STEPS, STAGE_MODEL, resolved_options

RECONSTRUCT_STEP = "perp-reconstruct"
TRAIN_STATE_BYTES = 16  # per trainable parameter: fp32 value, gradient, two fp32 Adam moments
SAVED_TOKEN_H = 12  # per token, run-dtype values of width h autograd keeps in a block (estimate)
SAVED_TOKEN_I = 5  # per token, values of the MLP width (gate, up, activation, product; estimate)
LORA_TEMP_BYTES = 20  # per weight of the largest linear: fp32 B A, scaled, masked, W and sum
LORA_SAVED_BYTES = 1  # per weight kept for backward besides the effective weight: the bool mask
HOST_MASK_BYTES = 2  # per block weight: the zero masks before and after retraining (host)


def _recovery_options(name: str, request: MemoryRequest) -> Mapping[str, Any]:
    return resolved_options(name, request.recover_options)


def _block_saved_bytes(linears: Mapping[str, tuple[int, int]], hidden: int, tokens: int,
                       lora: bool, b: int) -> int:
    """What autograd keeps for one block's backward on ``tokens`` tokens: its activations and,
    under MaskLoRA, every linear's mask and effective weight."""
    widest = max(max(r, c) for r, c in linears.values())
    acts = tokens * (SAVED_TOKEN_H * hidden + SAVED_TOKEN_I * widest) * b
    numel = sum(r * c for r, c in linears.values())
    return acts + ((LORA_SAVED_BYTES + b) * numel if lora else 0)


def _lora_temp_bytes(linears: Mapping[str, tuple[int, int]]) -> int:
    """fp32 temporaries of one MaskLoRA linear (the largest) in its forward or backward."""
    return LORA_TEMP_BYTES * max(r * c for r, c in linears.values())


def _adapter_state_bytes(linears: Mapping[str, tuple[int, int]], rank: int) -> int:
    """MaskLoRA's A and B on every linear, with gradients and Adam moments."""
    return TRAIN_STATE_BYTES * rank * sum(r + c for r, c in linears.values())


def recovery_phases(layout: ModelLayout, request: MemoryRequest, rank: int, start: int,
                    stop: int) -> dict[str, WorkerMemory]:
    """The ``reconstruct`` phase of a worker when ``perp-reconstruct`` is in ``request.recover``
    (recovery.md §3.6): the prune phase plus the targets stream (3 streams instead of 2) and
    the fit of its costliest block (MaskLoRA rank and micro-batch from the step's options)."""
    if RECONSTRUCT_STEP not in request.recover:
        return {}
    prune = worker_phases(layout, request, rank, start, stop)["prune"]
    opts = _recovery_options(RECONSTRUCT_STEP, request)
    b = DTYPE_BYTES[request.dtype]
    device, host = device_host_streams(request, layout, request.nsamples, 3)
    tokens = int(opts["batch_size"]) * request.seqlen
    fit = max(_adapter_state_bytes(layout.linears[i], int(opts["rank"]))
              + _block_saved_bytes(layout.linears[i], layout.hidden, tokens, True, b)
              + _lora_temp_bytes(layout.linears[i]) for i in range(start, stop))
    return {"reconstruct": replace(prune, phase="reconstruct", activations=device,
                                   host_activations=host, transients=max(prune.transients, fit))}


def retrain_memory(layout: ModelLayout, request: MemoryRequest) -> WorkerMemory | None:
    """Whole-model PERP (recovery.md §3.3-3.5) in one process after the prune, or None when
    ``request.recover`` has no such step.

    The whole model in the run dtype (plus an untied head copy for the head LoRA); trainables
    with gradients and Adam moments (``full``: every block weight, upcast to fp32, and its
    packed mask); what autograd keeps for one micro-batch through every block (with gradient
    checkpointing: the block inputs plus one block); the logits with their fp32 copy and
    gradient; on CPU the zero masks checked before and after.
    """
    names = [s for s in request.recover if RECOVERY_STEPS.get(s).stage == STAGE_MODEL]
    if not names:
        return None
    step = RECOVERY_STEPS.get(names[-1])
    opts = _recovery_options(names[-1], request)
    perp, train = step.perp_options(opts), step.train_options(opts)  # type: ignore[attr-defined]
    b = DTYPE_BYTES[request.dtype]
    blocks = layout.linears
    numel = sum(r * c for blk in blocks for r, c in blk.values())
    small = sum(layout.block_params) - numel + layout.final_params  # norms, biases
    lora = perp.adapter == "mask_lora"
    per_adapter = {"mask_lora": perp.rank, "scale_lora": 1}.get(perp.adapter or "", 0)
    trainable = small + per_adapter * sum(r + c for blk in blocks for r, c in blk.values())
    weights = layout.params * b
    if perp.lm_head_lora:
        trainable += perp.rank * (layout.vocab + layout.hidden)
        weights += layout.head_params * b if layout.tied else 0  # untied copy
    extra = (TRAIN_STATE_BYTES - b) * numel + numel // 8 if perp.weights else 0
    tokens = train.batch_size * request.seqlen
    kept = [_block_saved_bytes(blk, layout.hidden, tokens, lora, b) for blk in blocks]
    saved = (tokens * layout.hidden * b * len(blocks) + max(kept) if train.gradient_checkpointing
             else sum(kept))
    temps = max(_lora_temp_bytes(blk) for blk in blocks) if lora else 0
    logits = max(tokens, train.eval_batch_size * request.seqlen) * layout.vocab * (b + 8)
    host = HOST_MASK_BYTES * numel if request.device_type == "cpu" else 0
    overhead = OVERHEAD_BYTES.get(request.device_type, OVERHEAD_BYTES["cuda"])
    return WorkerMemory(0, 0, layout.num_blocks, "retrain", weights, saved + logits, host,
                        TRAIN_STATE_BYTES * trainable + extra + temps, 0, overhead)
