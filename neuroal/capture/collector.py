"""Forward hooks that accumulate per-linear input (and output) statistics (criteria.md §1.2).

Statistics are fp32 running means over *sequences* (normaliser N, not N*T), updated per
micro-batch of ``b`` sequences as ``s <- s * n / (n + b) + sum_batch / (n + b)``, in place
(the same floating-point operations as the out-of-place formula, without its temporaries).
Linears that receive the very same input tensor in one forward (q/k/v, gate/up) share one
accumulator: a Hessian is formed, folded and kept once per distinct input (Llama-2-70B: 4.1 GB
per block instead of 4.9). Output-side statistics (``out_sq_norm``, the symmetric criteria's z)
are collected in the same pass, per linear.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from neuroal.capture.moe import ExpertStats
from neuroal.criteria.base import (
    INPUT_STATS,
    STAT_HESSIAN,
    STAT_MEAN,
    STAT_OUT_SQ_NORM,
    STAT_SQ_NORM,
    STAT_SQ_NORM_WINDOWED,
    STAT_VAR,
    LayerStats,
)


class _Accumulator:
    """Running statistics of one linear's input."""

    def __init__(self, needs: frozenset[str]) -> None:
        self.needs = needs
        self.n = 0
        self.sq_norm: torch.Tensor | None = None
        self.hessian: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.var: torch.Tensor | None = None
        self.out_sq_norm: torch.Tensor | None = None
        self.sq_norm_windowed: torch.Tensor | None = None

    def update(self, contrib: dict[str, torch.Tensor], batch: int, owned: bool = False) -> None:
        """Fold one micro-batch's sums (``sq_norm``: (cols,), ``hessian``: (cols, cols);
        ``sq_norm_windowed``: per-sequence sums (batch, cols), weighted here by ``2 / k``
        with ``k`` the sequence's 1-based position in the stream).

        The running statistics are updated in place: ``old.mul_(n / total).add_(value /
        total)`` is bit-identical to ``old * (n / total) + value / total`` with one temporary
        fewer. With ``owned`` the caller hands ``contrib`` over (it is not read again) and its
        tensors are divided in place too: no square beyond ``old`` and ``value``.
        """
        total = self.n + batch
        for key, value in contrib.items():
            if key == STAT_SQ_NORM_WINDOWED:
                k = torch.arange(self.n + 1, total + 1, dtype=value.dtype, device=value.device)
                value = (value * (2.0 / k).unsqueeze(1)).sum(dim=0)  # (batch, cols) -> (cols,)
            old = getattr(self, key)
            share = value.div_(total) if owned else value / total
            if old is None:
                setattr(self, key, share)
            else:
                old.mul_(self.n / total).add_(share)
        self.n = total

    def stats(self) -> LayerStats:
        return LayerStats(nsamples=self.n, sq_norm=self.sq_norm, hessian=self.hessian,
                          mean=self.mean, var=self.var, out_sq_norm=self.out_sq_norm,
                          sq_norm_windowed=self.sq_norm_windowed)


def new_accumulator(needs: frozenset[str]) -> _Accumulator:
    """A linear's running statistics, folded micro-batch by micro-batch with
    ``update(sums, sequences)`` and read with ``stats()``: a data-parallel solver folds the
    micro-batch sums it receives with it, in stream order, exactly as a collector does
    (neuroal.engine.data_parallel)."""
    return _Accumulator(needs)


def batch_sums(x: torch.Tensor, needs: frozenset[str], sequences: int | None = None,
               ) -> dict[str, torch.Tensor]:
    """Sums over the tokens of a micro-batch of linear inputs ``x`` of shape ``(B, T, cols)``
    (or ``(B*T, cols)`` where the architecture flattens, e.g. OPT's MLP: ``sequences`` = B).

    Returns ``sq_norm``: ``sum_tok x_j^2`` (cols,), ``hessian``: ``2 * sum_tok x x^T``
    (cols, cols), ``mean``: ``sum_tok x_j`` (cols,), ``var``: the sum over the ``B``
    sequences of each one's population variance over its ``T`` tokens (cols,) and
    ``sq_norm_windowed``: ``sum_tok x_j^2`` per sequence (B, cols), all fp32.
    """
    flat = x.reshape(-1, x.shape[-1]).to(torch.float32)  # (B*T, cols)
    out: dict[str, torch.Tensor] = {}
    if STAT_SQ_NORM in needs:
        out[STAT_SQ_NORM] = flat.pow(2).sum(dim=0)
    if STAT_HESSIAN in needs:  # (cols, cols); doubled in place: one square, not two
        out[STAT_HESSIAN] = (flat.t() @ flat).mul_(2.0)
    if STAT_MEAN in needs:
        out[STAT_MEAN] = flat.sum(dim=0)
    if STAT_VAR in needs:
        seq = flat.reshape(sequences or (x.shape[0] if x.dim() > 2 else 1), -1, x.shape[-1])
        out[STAT_VAR] = seq.var(dim=1, unbiased=False).sum(dim=0)
    if STAT_SQ_NORM_WINDOWED in needs:  # per sequence: (B, cols)
        seq = flat.reshape(sequences or (x.shape[0] if x.dim() > 2 else 1), -1, x.shape[-1])
        out[STAT_SQ_NORM_WINDOWED] = seq.pow(2).sum(dim=1)
    return out


def output_sums(y: torch.Tensor) -> dict[str, torch.Tensor]:
    """``out_sq_norm``: ``sum_tok y_i^2`` (rows,) of a linear's outputs ``(B, T, rows)``, fp32."""
    return {STAT_OUT_SQ_NORM: y.reshape(-1, y.shape[-1]).to(torch.float32).pow(2).sum(dim=0)}


class StatsCollector:
    """Hooks on the prunable linears of one block, accumulating the statistics they need.

    Args:
        linears: ``name -> nn.Linear`` of one block.
        needs: Statistics to collect (criterion's ``needs``).
    """

    def __init__(self, linears: dict[str, nn.Linear], needs: frozenset[str]) -> None:
        self.linears = linears
        self.needs = needs
        # input statistics; linears fed the same tensor share one accumulator (the same object)
        self.acc = {name: _Accumulator(needs) for name in linears}
        self._leader = {name: name for name in linears}  # the linear folding a shared input
        self._input_needs = frozenset(n for n in needs if n in INPUT_STATS)
        self._output = STAT_OUT_SQ_NORM in needs
        self._out = {name: _Accumulator(frozenset({STAT_OUT_SQ_NORM})) for name in linears}
        self._sequences: int | None = None
        self.order: list[str] = []  # execution order seen in the first forward
        self._last: tuple[torch.Tensor, str] | None = None  # last input and who folded it
        self._experts = _expert_stats(self, linears)  # MoE expert slices (capture_moe)

    def _hook(self, name: str):  # noqa: ANN202 - hook factory
        def hook(_module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0]
            if name not in self.order:
                self.order.append(name)
            batch = self._sequences or x.shape[0]
            if self._last is not None and self._last[0] is x:
                self._follow(name, self._last[1], x, batch)
            else:
                if self._leader[name] != name:
                    raise _sharing_changed(name, self._leader[name])
                self._fold_input(name, x, batch)
                self._last = (x, name)
            if self._output:
                self._out[name].update(output_sums(output), batch, owned=True)

        return hook

    def _fold_input(self, name: str, x: torch.Tensor, batch: int) -> None:
        """Fold the sums of input ``x`` into ``name``'s (possibly shared) accumulator."""
        self.acc[name].update(batch_sums(x, self._input_needs, self._sequences), batch,
                              owned=True)

    def _follow(self, name: str, previous: str, x: torch.Tensor, batch: int) -> None:
        """``name`` receives the input ``previous`` just folded: join its accumulator in the
        first micro-batch, nothing to do afterwards (folded once for the group)."""
        leader = self._leader[previous]
        if self._leader[name] == leader:
            return
        followers = [other for other, lead in self._leader.items() if lead == name != other]
        if self._leader[name] != name or followers:
            raise _sharing_changed(name, leader)
        if self.acc[name].n == 0 and self.acc[leader].n == batch:
            self.acc[name] = self.acc[leader]
            self._leader[name] = leader
        else:  # it did not share this input in earlier micro-batches: fold its own copy
            self._fold_input(name, x, batch)

    @contextmanager
    def attached(self) -> Iterator[StatsCollector]:
        """Register the hooks for the duration of the ``with`` body; always removed."""
        handles = [m.register_forward_hook(self._hook(n)) for n, m in self.linears.items()
                   if isinstance(m, nn.Module)]
        handles += self._experts.attach() if self._experts is not None else []
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._last = None

    def begin_batch(self, sequences: int) -> None:
        """Declare the number of sequences in the next micro-batch (the normaliser N counts
        sequences even where a block flattens ``(B, T, h)`` to ``(B*T, h)``)."""
        self._sequences = sequences

    def end_batch(self) -> None:
        """Forget the shared-input cache (call between micro-batches)."""
        self._last = None
        self._sequences = None

    def record_only(self) -> None:
        """Keep each micro-batch's sums as they come instead of folding them (a data-parallel
        worker sends them to each linear's solver, :mod:`neuroal.engine.data_parallel`); read
        them with :meth:`recorded`. For a collector that sees one micro-batch."""
        self.acc = {name: _Recorder() for name in self.linears}  # type: ignore[misc]
        self._out = {name: _Recorder() for name in self.linears}  # type: ignore[misc]

    def recorded(self) -> dict[str, tuple[dict[str, torch.Tensor], int] | None]:
        """Per linear, the micro-batch's input and output sums and its sequences (None: the
        linear saw no input), after :meth:`record_only`."""
        out: dict[str, tuple[dict[str, torch.Tensor], int] | None] = {}
        for name in self.linears:
            parts = [r.sums for r in (self.acc[name], self._out[name]) if r.sums is not None]
            out[name] = None if not parts else \
                ({k: v for sums, _ in parts for k, v in sums.items()}, parts[0][1])
        return out

    def routed_tokens(self) -> dict[str, int]:
        """Calibration tokens routed so far to each MoE expert matrix among the linears, 0
        included (empty for a dense block). A data-parallel worker sends its counts with its
        recorded sums; the sums over every micro-batch give the solver's
        :class:`~neuroal.capture.moe.RoutedStats` (:func:`~neuroal.capture.moe.routed_stats`)."""
        return dict(self._experts.tokens) if self._experts is not None else {}

    def stats(self) -> dict[str, LayerStats]:
        """Final statistics per linear name (linears sharing an input share its tensors)."""
        stats = {}
        for name, acc in self.acc.items():
            stats[name] = acc.stats()
            if self._out[name].out_sq_norm is not None:
                stats[name] = replace(stats[name], out_sq_norm=self._out[name].out_sq_norm)
        return self._experts.finish(stats) if self._experts is not None else stats


class _Recorder:
    """Stands in for an accumulator under :meth:`StatsCollector.record_only`: keeps the one
    micro-batch's sums unfolded (``n`` counts sequences, as an accumulator's does, so input
    sharing is detected the same way)."""

    def __init__(self) -> None:
        self.n = 0
        self.sums: tuple[dict[str, torch.Tensor], int] | None = None

    def update(self, contrib: dict[str, torch.Tensor], batch: int, owned: bool = False) -> None:
        self.sums = (dict(contrib), batch)
        self.n += batch


def _sharing_changed(name: str, leader: str) -> RuntimeError:
    return RuntimeError(
        f"statistics capture: linear {name!r} and {leader!r} shared their input in one "
        "micro-batch and not in another; the block's forward must call its linears the same "
        "way for every micro-batch (report this model to neuroal)")


def _expert_stats(collector: StatsCollector, linears: dict[str, nn.Linear]) -> Any:
    """Routed-token statistics for the linears that are MoE expert slices (not modules), or
    None for a dense block (neuroal.capture.moe)."""
    slices = {n: m for n, m in linears.items() if not isinstance(m, nn.Module)}
    if not slices:
        return None

    return ExpertStats(collector, slices, batch_sums, output_sums)
