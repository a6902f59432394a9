"""The model as the memory planner sees it: parameter counts by ownership unit, from a meta
skeleton (no weights read).

:func:`layout_of` accepts a known alias (shipped configs, offline and cached), a model path or
hub id, a ``PretrainedConfig`` or a :class:`ModelLayout`; the memory model
(:mod:`neuroal.planning.memory`) and the time model (:mod:`neuroal.planning.walltime`, through
:class:`~neuroal.planning.walltime.Workload`) read nothing else of the model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from functools import cache, cached_property
from typing import Any

from neuroal.models.adapter import ModelAdapter
from neuroal.models.known import MIXED_BLOCKS, known_alias, known_config
from neuroal.models.loading import build_skeleton, load_model_config, resolve_model
from neuroal.models.moe import ExpertLinear


def input_leader_of(linears: Iterable[str], groups: Iterable[Iterable[str]]) -> dict[str, str]:
    """Each linear of one block's ``linears`` -> the linear that folds its input statistics:
    its input group's leader when that is present (``groups``: linears fed the very same
    tensor, leader first, :attr:`ModelLayout.input_groups`), else itself."""
    names = list(linears)
    out = {name: name for name in names}
    for group in groups:
        members = list(group)
        if members and members[0] in out:
            out.update({n: members[0] for n in members[1:] if n in out})
    return out


def input_leaders(linears: Mapping[str, Any], groups: Iterable[Iterable[str]]) -> list[str]:
    """The linears of one block whose input statistics are folded, in ``linears``' order: every
    linear but the followers of an input group (:func:`input_leader_of`), as the statistics
    collector does."""
    leader = input_leader_of(linears, groups)
    return [name for name in linears if leader[name] == name]


@dataclass(frozen=True)
class ModelLayout:
    """Parameter counts of a model by ownership unit, read from a meta skeleton.

    Attributes:
        name: Model name for reports.
        hidden: Hidden size ``h`` (stream width).
        vocab: Vocabulary size ``V`` (logits width).
        tied: Whether ``lm_head`` reads the embedding tensor.
        block_params: All parameters of each decoder block.
        linears: ``(rows, cols)`` of each prunable linear, per block.
        context_params: Parameters every worker loads (e.g. OPT's learned positions).
        embed_params: Token embedding (first worker).
        final_params: Modules after the last block (last worker).
        head_params: ``lm_head`` (last worker).
        fused_params: Per block, the weights of MoE experts held in fused 3-D parameters (part
            of ``linears``): a search candidate swaps in a masked copy of those tensors besides
            the per-matrix masked copies (``neuroal.models.moe.swapped_weights``).
        input_groups: Linears fed the very same input tensor (q/k/v, gate/up): one input
            statistic each group (``neuroal.models.sharing``); empty: every linear alone.
        block_tensors: Parameter tensors of each block (the host arena's alignment padding).
    """

    name: str
    hidden: int
    vocab: int
    tied: bool
    block_params: tuple[int, ...]
    linears: tuple[Mapping[str, tuple[int, int]], ...]
    context_params: int
    embed_params: int
    final_params: int
    head_params: int
    fused_params: tuple[int, ...] = ()
    input_groups: tuple[tuple[str, ...], ...] = ()
    block_tensors: tuple[int, ...] = ()

    @property
    def num_blocks(self) -> int:
        return len(self.block_params)

    @cached_property
    def block_kinds(self) -> tuple[int, ...]:
        """Per block, the index of the first block with the same linear shapes: a model's
        blocks mostly repeat, so per-block figures are computed once per kind (cached: the
        layout is immutable)."""
        first: dict[tuple[tuple[str, tuple[int, int]], ...], int] = {}
        return tuple(first.setdefault(tuple(b.items()), i) for i, b in enumerate(self.linears))

    @property
    def params(self) -> int:
        """Parameters of the model (a tied head counted once)."""
        head = 0 if self.tied else self.head_params
        return sum(self.block_params) + self.context_params + self.embed_params \
            + self.final_params + head

    @classmethod
    def from_adapter(cls, adapter: Any, name: str) -> ModelLayout:
        """Count parameters on an adapter's (meta) model, module by module."""
        def count(modules: Iterable[str]) -> int:
            return sum(p.numel() for _, p in adapter.named_owned_parameters(list(modules)))

        def tensors(modules: Iterable[str]) -> int:
            return sum(1 for _ in adapter.named_owned_parameters(list(modules)))

        shape = adapter.shape(row_map=False)
        return cls(
            name=name, hidden=adapter.hidden_size, vocab=int(adapter.config.vocab_size),
            tied=adapter.tied,
            block_params=tuple(count([adapter.block_prefix(i)[:-1]])
                               for i in range(adapter.num_blocks)),
            linears=tuple(dict(b) for b in shape.blocks),
            context_params=count(adapter.context_names()),
            embed_params=count([adapter.spec.embed]),
            final_params=count(adapter.final_names),
            head_params=count([adapter.spec.head]),
            fused_params=tuple(fused_numel(adapter.prunable_linears(b)) for b in adapter.blocks),
            input_groups=adapter.input_groups(),
            block_tensors=tuple(tensors([adapter.block_prefix(i)[:-1]])
                                for i in range(adapter.num_blocks)),
        )

    @classmethod
    def from_config(cls, model_config: Any, name: str | None = None,
                    repeat_block: bool = False) -> ModelLayout:
        """Build the meta skeleton of ``model_config`` (a ``PretrainedConfig``) and count it.

        ``repeat_block`` builds a single block and repeats its counts: exact, and about 50x
        faster at 80 blocks, for models whose blocks are all alike (every known alias).
        """
        import torch

        config = copy.deepcopy(model_config)  # from_config records the dtype on the config
        label = name or getattr(config, "name_or_path", "") or str(config.model_type)
        depth = int(config.num_hidden_layers)
        if repeat_block:
            config.num_hidden_layers = 1
            if isinstance(getattr(config, "layer_types", None), list):
                config.layer_types = config.layer_types[:1]
        layout = cls.from_adapter(ModelAdapter(build_skeleton(config, torch.float32)), label)
        if not repeat_block:
            return layout
        return replace(layout, block_params=layout.block_params * depth,
                       linears=layout.linears * depth, fused_params=layout.fused_params * depth,
                       block_tensors=layout.block_tensors * depth)

    def weight_params(self, start: int, stop: int, first: bool, last: bool) -> int:
        """Parameters a worker owning blocks ``[start, stop)`` loads (as ``materialise`` does)."""
        total = sum(self.block_params[start:stop]) + self.context_params
        if first:
            total += self.embed_params
        if last:
            total += self.final_params
            total += 0 if (self.tied and first) else self.head_params
        return total


@cache
def _known_layout(alias: str) -> ModelLayout:
    return ModelLayout.from_config(known_config(alias), alias,
                                   repeat_block=alias not in MIXED_BLOCKS)


def fused_numel(linears: Mapping[str, Any]) -> int:
    """Weights of the MoE expert matrices among a block's prunable linears."""
    return sum(m.weight.numel() for m in linears.values() if isinstance(m, ExpertLinear))


def layout_of(model: str | ModelLayout | Any) -> ModelLayout:
    """A layout from a known alias, a model path / hub id, a ``PretrainedConfig`` or a layout."""
    if isinstance(model, ModelLayout):
        return model
    if isinstance(model, str):
        alias = known_alias(model)
        if alias is not None:
            return _known_layout(alias)
        return ModelLayout.from_config(load_model_config(resolve_model(model), network=False), model)
    return ModelLayout.from_config(model)
