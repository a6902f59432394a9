"""Which prunable linears of a block read the very same input tensor, derived on a tiny twin.

The statistics capture (``neuroal.capture.collector``) keeps one accumulator per distinct input: q/k/v
read the normalised hidden states, gate/up read them again after attention, so a Llama block
holds 4 input statistics for 7 linears (SparseGPT's Hessians: 4.1 GB at Llama-2-70B width, not
4.9). The memory planner needs the same grouping before any weight is loaded: it is derived,
not tabled, by one forward of the architecture's one-block twin
(:func:`neuroal.models.consumers.shrink_config`) with pre-hooks applying the capture's rule
(a linear whose input is the very tensor the previously called linear received joins its
group). Cached per structure; a twin that cannot be built or run gives no groups (every linear
counted alone: the planner errs on the safe side), logged.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from typing import Any

import torch
from torch import nn

from neuroal.models.consumers import TWIN_TOKENS, TWIN_VOCAB, twin_config, twin_key, twin_model
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

Groups = tuple[tuple[str, ...], ...]


def derive_input_groups(config: Any, adapter_cls: Callable[[nn.Module], Any]) -> Groups:
    """Groups (2 or more relative linear names, execution order) of one block's linears that
    receive the same input tensor; ``()`` when the twin cannot be built or run."""
    try:
        key = twin_key(config)
    except Exception as exc:  # noqa: BLE001 - any failure: no sharing assumed
        log.warning("model_type %r: no tiny twin to find shared linear inputs (%s); every "
                    "linear's statistics counted alone", getattr(config, "model_type", "?"), exc)
        return ()
    return _groups_cached(key, adapter_cls)


@cache
def _groups_cached(key: str, adapter_cls: Callable[[nn.Module], Any]) -> Groups:
    model_type = json.loads(key).get("model_type", "?")
    try:
        return probe_input_groups(twin_config(key)[1], adapter_cls)
    except Exception as exc:  # noqa: BLE001 - any failure: no sharing assumed
        log.warning("model_type %r: shared-input probe failed (%s: %s); every linear's "
                    "statistics counted alone", model_type, type(exc).__name__, exc)
        return ()


@torch.no_grad()
def probe_input_groups(twin: Any, adapter_cls: Callable[[nn.Module], Any]) -> Groups:
    """One forward of the one-block ``twin`` with a pre-hook on every prunable linear (MoE
    expert slices have no module: their gate/up sharing is handled by ``capture_moe``)."""
    with torch.random.fork_rng(devices=[]):
        model, linears = twin_model(twin, adapter_cls)
        groups: list[list[str]] = []
        last: list[Any] = [None]

        def recorder(name: str) -> Callable[[nn.Module, tuple], None]:
            def hook(_m: nn.Module, args: tuple) -> None:
                if any(name in g for g in groups):
                    return
                if last[0] is args[0]:
                    groups[-1].append(name)
                else:
                    groups.append([name])
                last[0] = args[0]
            return hook

        handles = [m.register_forward_pre_hook(recorder(n)) for n, m in linears.items()]
        try:
            model(input_ids=torch.randint(3, TWIN_VOCAB, (1, TWIN_TOKENS)), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
    return tuple(tuple(g) for g in groups if len(g) > 1)
