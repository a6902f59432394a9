"""What the last worker computes from the final hidden states (engine.md §2.3 ``head_loss``):
per-window NLL, per-token log-probabilities, logits. Final norm and ``lm_head`` come from the
model adapter; logits are fp32 and made one sequence at a time where a loss is taken, so only
``(T, vocab)`` logits exist at once.
"""

from __future__ import annotations

import torch

from neuroal.models.adapter import ModelAdapter


@torch.no_grad()
def window_nll(adapter: ModelAdapter, device: torch.device, stream: torch.Tensor,
               ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy per window, fp32 logits: ``(B, T, h) -> (B,)`` float64;
    ``ids`` ``(B, T)`` are the windows' tokens."""
    out = torch.empty(stream.shape[0], dtype=torch.float64)
    for i in range(stream.shape[0]):
        logits = adapter.logits(stream[i : i + 1].to(device)).float()
        target = ids[i, 1:].to(logits.device)
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], target, reduction="mean")
        out[i] = loss.double()
    return out


@torch.no_grad()
def token_logprobs(adapter: ModelAdapter, device: torch.device, stream: torch.Tensor,
                   targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probability of ``targets[b, t]`` after position ``t``, and whether it is the argmax:
    ``(B, T, h), (B, T) -> (B, T)`` float64 and ``(B, T)`` bool, fp32 log-softmax."""
    logprobs = torch.empty(targets.shape, dtype=torch.float64)
    greedy = torch.empty(targets.shape, dtype=torch.bool)
    for i in range(stream.shape[0]):
        logits = adapter.logits(stream[i : i + 1].to(device)).float()[0]
        scores = torch.log_softmax(logits, dim=-1)
        target = targets[i].to(scores.device)
        logprobs[i] = scores.gather(-1, target[:, None])[:, 0].double().cpu()
        greedy[i] = (scores.argmax(-1) == target).cpu()
    return logprobs, greedy


@torch.no_grad()
def all_logits(adapter: ModelAdapter, device: torch.device, stream: torch.Tensor) -> torch.Tensor:
    """Full logits ``(B, T, h) -> (B, T, vocab)`` fp32 on the CPU."""
    return adapter.logits(stream.to(device)).float().cpu()


@torch.no_grad()
def last_logits(adapter: ModelAdapter, device: torch.device, stream: torch.Tensor) -> torch.Tensor:
    """Logits of the last position: ``(B, T, h) -> (B, vocab)`` fp32 on the CPU."""
    return adapter.logits(stream[:, -1:].to(device)).float()[:, -1].cpu()
