"""Mixture-of-experts blocks: each expert's matrices as prunable linears.

In transformers 5 the routed experts of a block are one module (``mlp.experts``) holding fused
3-D parameters used through grouped or batched matmuls, not ``nn.Linear`` modules:

* ``gate_up_proj``: ``(experts, 2 * inter, hidden)``, gate rows then up rows (``up_proj`` alone,
  ``(experts, inter, hidden)``, when the experts have no gate);
* ``down_proj``: ``(experts, hidden, inter)``;
* layout flags set by transformers' ``use_experts_implementation``: ``is_transposed`` (stored
  ``(experts, in, out)``), ``is_concatenated`` (False: gate and up rows interleaved),
  ``has_bias`` (``*_bias`` parameters, never pruned).

Here every expert's gate, up and down matrix is one prunable matrix with its own rows and columns,
named like the ``nn.Linear`` of a transformers-4 checkpoint: ``mlp.experts.3.gate_proj``,
``mlp.experts.3.up_proj``, ``mlp.experts.3.down_proj``. Gate and up are separate matrices (not one
``gate_up_proj`` slice) so that per-matrix groups (magnitude, RIA), SparseGPT's 128-column
blocks and the plan's per-linear ratios treat them as the reference code treats the dense MLP.
An :class:`ExpertLinear` quacks like ``nn.Linear`` for weight access: ``weight.data`` is a live
2-D view into the 3-D parameter, so masks and SparseGPT updates written in place land in the
fused tensor that the model uses and that export writes.

Routers are never pruned nor counted: transformers 5 routers are not ``nn.Linear`` (a ``weight``
parameter of a ``TopKRouter``), and any ``nn.Linear`` that is a direct child of a module holding
an experts module (Qwen2-MoE's ``shared_expert_gate``, older routers) is left out too. Shared
experts are ordinary MLPs (``mlp.shared_expert.gate_proj``...) and are pruned like any MLP.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

GATE, UP, DOWN = "gate_proj", "up_proj", "down_proj"


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` holds fused 3-D expert parameters (a transformers 5 ``*Experts``)."""
    down = getattr(module, DOWN, None)
    return (isinstance(down, nn.Parameter) and down.dim() == 3
            and isinstance(getattr(module, "num_experts", None), int))


def has_experts(block: nn.Module) -> bool:
    """Whether a decoder block holds a fused experts module."""
    return any(is_experts(m) for m in block.modules())


def _flag(experts: nn.Module, name: str, default: bool) -> bool:
    return bool(getattr(experts, name, default))


def _gated(experts: nn.Module) -> bool:
    return _flag(experts, "has_gate", True) and isinstance(getattr(experts, "gate_up_proj", None),
                                                           nn.Parameter)


class SliceWeight:
    """One expert's ``(rows, cols)`` matrix inside a fused parameter (``nn.Linear.weight``'s
    stand-in). ``data`` is a live view: in-place writes reach the 3-D tensor, and it follows
    the parameter when its ``.data`` is swapped (:func:`swapped_weights`)."""

    def __init__(self, param: nn.Parameter, expert: int, rows: slice, transposed: bool) -> None:
        self.param, self.expert, self.rows, self.transposed = param, expert, rows, transposed

    @property
    def data(self) -> torch.Tensor:
        matrix = self.param.data[self.expert]  # (out, in), or (in, out) when transposed
        return (matrix.t() if self.transposed else matrix)[self.rows]

    @property
    def shape(self) -> torch.Size:
        return self.data.shape

    @property
    def dtype(self) -> torch.dtype:
        return self.param.dtype

    @property
    def device(self) -> torch.device:
        return self.param.device

    def numel(self) -> int:
        return self.data.numel()


class ExpertLinear:
    """One expert's gate, up or down matrix as a prunable linear (see the module docstring).

    Attributes:
        experts: The fused experts module.
        expert: Expert index.
        kind: ``gate_proj``, ``up_proj`` or ``down_proj``.
        weight: The :class:`SliceWeight` view, ``(out_features, in_features)``.
    """

    bias = None

    def __init__(self, experts: nn.Module, expert: int, kind: str) -> None:
        self.experts, self.expert, self.kind = experts, expert, kind
        param_name = DOWN if kind == DOWN else ("gate_up_proj" if _gated(experts) else UP)
        param = getattr(experts, param_name)
        self.weight = SliceWeight(param, expert, _rows(experts, kind),
                                  _flag(experts, "is_transposed", False))
        self.out_features, self.in_features = (int(d) for d in self.weight.shape)


def _rows(experts: nn.Module, kind: str) -> slice:
    """Rows of ``kind`` inside the expert's (transposed-back) first or down matrix."""
    if kind == DOWN or not _gated(experts):
        return slice(None)
    param = experts.gate_up_proj
    both = int(param.shape[2] if _flag(experts, "is_transposed", False) else param.shape[1])
    if _flag(experts, "is_concatenated", True):
        return slice(0, both // 2) if kind == GATE else slice(both // 2, both)
    return slice(0, None, 2) if kind == GATE else slice(1, None, 2)


def kinds(experts: nn.Module) -> tuple[str, ...]:
    """The matrices of one expert, in execution order."""
    return (GATE, UP, DOWN) if _gated(experts) else (UP, DOWN)


def expert_linears(path: str, experts: nn.Module) -> dict[str, ExpertLinear]:
    """``"<path>.<e>.<kind>" -> ExpertLinear`` for every expert, in expert then execution order."""
    return {f"{path}.{e}.{kind}": ExpertLinear(experts, e, kind)
            for e in range(int(experts.num_experts)) for kind in kinds(experts)}


def with_experts(block: nn.Module, linears: Mapping[str, Any]) -> dict[str, Any]:
    """A block's prunable matrices: its ``linears`` (``name -> nn.Linear``) minus routing gates,
    plus every expert's matrices at the experts module's registration position.

    Dense blocks (no experts module) get ``linears`` back unchanged.
    """
    modules = list(block.named_modules())
    holders = {name for name, m in modules if any(is_experts(c) for c in m.children())}
    if not holders:
        return dict(linears)
    out: dict[str, Any] = {}
    for name, module in modules:
        if is_experts(module):
            out.update(expert_linears(name, module))
        elif name in linears and name.rpartition(".")[0] not in holders:
            out[name] = linears[name]
    return out


def routing_linears(block: nn.Module) -> list[str]:
    """``nn.Linear`` children of a module that holds experts (routers, shared-expert gates)."""
    return [f"{name}.{child}" if name else child for name, m in block.named_modules()
            if any(is_experts(c) for c in m.children())
            for child, c in m.named_children() if isinstance(c, nn.Linear)]


def expert_consumers(block: nn.Module) -> dict[str, str]:
    """NeuroAL's row-step map inside each expert: gate and up rows index down's input columns."""
    out: dict[str, str] = {}
    for name, module in block.named_modules():
        if is_experts(module):
            for e in range(int(module.num_experts)):
                for kind in kinds(module)[:-1]:
                    out[f"{name}.{e}.{kind}"] = f"{name}.{e}.{DOWN}"
    return out


# --------------------------------------------------------------------------- forward maths


def routed_tokens(args: tuple, kwargs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hidden (S, h), top_k_index (S, k))`` from an experts module's call arguments."""
    hidden = args[0] if args else kwargs["hidden_states"]
    index = args[1] if len(args) > 1 else kwargs["top_k_index"]
    return hidden, index


def _project(x: torch.Tensor, param: nn.Parameter, expert: int, bias: Any,
             transposed: bool) -> torch.Tensor:
    weight = param[expert]
    y = x @ weight if transposed else x @ weight.t()
    return y if bias is None else y + bias[expert]


def expert_parts(experts: nn.Module, expert: int, x: torch.Tensor,
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per matrix of one expert, its ``(input, output)`` on the routed tokens ``x`` (n, h).

    The same maths as transformers' experts forward (eager, batched or grouped): first matrix
    (plus bias), ``_apply_gate`` (activation of gate times up) or the activation alone, down
    matrix (plus bias); routing weights are applied after the expert, so they are not part of
    any matrix's output.
    """
    transposed = _flag(experts, "is_transposed", False)
    has_bias = _flag(experts, "has_bias", False)
    gated = _gated(experts)
    first = experts.gate_up_proj if gated else experts.up_proj
    first_bias = getattr(experts, ("gate_up_proj" if gated else UP) + "_bias", None) if has_bias else None
    y = _project(x, first, expert, first_bias, transposed)
    if gated:
        apply_gate = getattr(experts, "_apply_gate", None)
        if apply_gate is not None:
            inner = apply_gate(y)
        else:
            gate, up = y.chunk(2, dim=-1)
            inner = experts.act_fn(gate) * up
        parts = {GATE: (x, y[:, _rows(experts, GATE)]), UP: (x, y[:, _rows(experts, UP)])}
    else:
        inner = experts.act_fn(y)
        parts = {UP: (x, y)}
    down_bias = getattr(experts, DOWN + "_bias", None) if has_bias else None
    parts[DOWN] = (inner, _project(inner, experts.down_proj, expert, down_bias, transposed))
    return parts


def expert_positions(index: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """Flat token positions routed to each expert, ascending: ``(S, k)`` ids -> list of (n_e,).

    Ids outside ``[0, num_experts)`` (expert-parallel sentinels) are ignored.
    """
    tokens = torch.arange(index.shape[0], device=index.device).unsqueeze(1).expand_as(index)
    flat_ids, flat_tok = index.reshape(-1), tokens.reshape(-1)
    return [torch.sort(flat_tok[flat_ids == e]).values for e in range(num_experts)]


# --------------------------------------------------------------------------- weight swaps


@contextmanager
def swapped_weights(linears: Mapping[str, Any], weights: Mapping[str, torch.Tensor],
                    ) -> Iterator[None]:
    """Temporarily give each linear ``weights[name]`` (a masked copy), restoring the dense
    weights on exit, even on error.

    An ``nn.Linear``'s weight tensor is swapped; the experts' fused parameters are swapped for a
    copy into which the experts' matrices are written (the dense 3-D tensor is never modified).
    """
    restore: list[tuple[Any, torch.Tensor]] = []
    fused: dict[int, nn.Parameter] = {}
    try:
        for name, weight in weights.items():
            linear = linears[name]
            if isinstance(linear, ExpertLinear):
                param = linear.weight.param
                if id(param) not in fused:
                    fused[id(param)] = param
                    restore.append((param, param.data))
                    param.data = param.data.clone()
                linear.weight.data.copy_(weight)
            else:
                restore.append((linear.weight, linear.weight.data))
                linear.weight.data = weight
        yield
    finally:
        for param, data in reversed(restore):
            param.data = data

