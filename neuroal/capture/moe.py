"""Per-expert statistics from the tokens routed to each expert.

The experts of an MoE block run as one module on fused 3-D parameters, so there is no per-expert
``nn.Linear`` to hook. A forward pre-hook on the experts module reads its inputs (all tokens of
the micro-batch and the router's top-k expert ids), and for every expert recomputes, on the
tokens routed to it only, each matrix's input and output (:func:`neuroal.models.moe.expert_parts`;
the same maths as the experts' forward, on the live weights). Those feed the usual running
statistics (criteria.md §1.2) with the usual normaliser N = calibration sequences: an expert's
``s_j = (1/N) sum_seq sum_{tok routed to it} x_j^2``; tokens routed elsewhere contribute nothing.
``var`` is the within-sequence variance over the tokens routed to the expert in that sequence.

An expert that receives no token in the whole stream has all-zero statistics and
``tokens == 0``; the worker then prunes it by magnitude (the documented fallback, logged and
recorded in the layer report).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch
from torch import nn

from neuroal.criteria.base import STAT_OUT_SQ_NORM, STAT_VAR, LayerStats
from neuroal.models.moe import ExpertLinear, expert_parts, expert_positions, routed_tokens


@dataclass(frozen=True)
class RoutedStats(LayerStats):
    """:class:`LayerStats` of one expert matrix plus the number of calibration tokens routed to
    the expert (0: no statistic is meaningful; the worker falls back to magnitude)."""

    tokens: int = 0


def routed_var(x: torch.Tensor, sequence: torch.Tensor, sequences: int) -> torch.Tensor:
    """Sum over sequences of the population variance of ``x`` (n, cols) over the tokens of each
    sequence (``sequence``: (n,) ids in ``[0, sequences)``); sequences without a routed token add
    0. Returns (cols,) fp32."""
    x = x.to(torch.float32)
    counts = torch.bincount(sequence, minlength=sequences).clamp_min(1).to(torch.float32)[:, None]
    sums = torch.zeros(sequences, x.shape[1], dtype=torch.float32, device=x.device)
    squares = torch.zeros_like(sums)
    sums.index_add_(0, sequence, x)
    squares.index_add_(0, sequence, x * x)
    mean = sums / counts
    return (squares / counts - mean * mean).clamp_min(0.0).sum(dim=0)


class ExpertStats:
    """Pre-hooks on the experts modules of one block feeding a collector's accumulators.

    Args:
        collector: The :class:`~neuroal.capture.collector.StatsCollector` (its ``acc``, ``order``,
            input needs and current micro-batch size are used).
        linears: ``name -> ExpertLinear`` of the block.
        batch_sums: ``capture.batch_sums``; ``output_sums``: ``capture.output_sums``.
    """

    def __init__(self, collector: Any, linears: dict[str, ExpertLinear],
                 batch_sums: Callable[..., dict[str, torch.Tensor]],
                 output_sums: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> None:
        self.collector = collector
        self.batch_sums, self.output_sums = batch_sums, output_sums
        self.tokens = dict.fromkeys(linears, 0)
        # per experts module: expert index -> {kind: linear name}
        self.groups: dict[int, tuple[nn.Module, dict[int, dict[str, str]]]] = {}
        for name, linear in linears.items():
            _, names = self.groups.setdefault(id(linear.experts), (linear.experts, {}))
            names.setdefault(linear.expert, {})[linear.kind] = name

    def attach(self) -> list[Any]:
        """Register one pre-hook per experts module; returns the handles."""
        return [experts.register_forward_pre_hook(self._hook(names), with_kwargs=True)
                for experts, names in self.groups.values()]

    def _hook(self, names: dict[int, dict[str, str]]):  # noqa: ANN202 - hook factory
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            hidden, index = routed_tokens(args, kwargs)
            sequences = self.collector._sequences or 1
            seqlen = max(1, hidden.shape[0] // sequences)
            for expert, pos in enumerate(expert_positions(index, int(module.num_experts))):
                if expert in names:
                    self._fold(module, expert, hidden[pos], pos // seqlen, sequences,
                               names[expert])

        return hook

    def _fold(self, experts: nn.Module, expert: int, x: torch.Tensor, sequence: torch.Tensor,
              sequences: int, wanted: dict[str, str]) -> None:
        """Fold one expert's routed tokens ``x`` (n, h) into its matrices' accumulators."""
        input_needs = self.collector._input_needs
        cache: dict[int, dict[str, torch.Tensor]] = {}
        for kind, (inp, out) in expert_parts(experts, expert, x).items():
            name = wanted.get(kind)
            if name is None:
                continue
            if name not in self.collector.order:
                self.collector.order.append(name)
            if id(inp) not in cache:  # gate and up share their input
                cache[id(inp)] = self.batch_sums(inp, input_needs - {STAT_VAR})
                if STAT_VAR in input_needs:
                    cache[id(inp)][STAT_VAR] = routed_var(inp, sequence, sequences)
            contrib = cache[id(inp)]
            if STAT_OUT_SQ_NORM in self.collector.needs:
                contrib = {**contrib, **self.output_sums(out)}
            self.collector.acc[name].update(contrib, sequences)
            self.tokens[name] += int(x.shape[0])

    def finish(self, stats: dict[str, LayerStats]) -> dict[str, LayerStats]:
        """``stats`` with every expert matrix's entry as :class:`RoutedStats`."""
        return routed_stats(stats, self.tokens)


def routed_stats(stats: Mapping[str, LayerStats], tokens: Mapping[str, int],
                 ) -> dict[str, LayerStats]:
    """``stats`` with the entry of every expert matrix named in ``tokens`` as
    :class:`RoutedStats` carrying its routed-token count (names absent from ``stats`` are
    skipped: a data-parallel solver holds only the statistics of the matrices it solves)."""
    out = dict(stats)
    for name, count in tokens.items():
        if name in stats:
            base = stats[name]
            out[name] = RoutedStats(**{f.name: getattr(base, f.name) for f in fields(base)},
                                    tokens=int(count))
    return out


def add_tokens(total: dict[str, int], part: Mapping[str, int]) -> dict[str, int]:
    """``total`` plus one share of routed-token counts (:meth:`StatsCollector.routed_tokens`),
    in place; integer sums, so the order of the shares does not matter."""
    for name, count in part.items():
        total[name] = total.get(name, 0) + int(count)
    return total
