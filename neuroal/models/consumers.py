"""NeuroAL's producer -> consumer map, derived by running one block of a tiny twin.

NeuroAL's row step (arXiv 2411.07066; neuroal.md §A7) shifts the row ratios of a linear (the
*producer*) by the alignment delta measured at the input of the linear that reads its output rows
(the *consumer*), matching rows to input channels by index. Which linear that is depends on the
architecture (sequential or parallel attention/MLP, fused projections), so it is not written in a
table but derived:

1. the model's config is shrunk to a one-block twin with the same structure (same family, same
   query/KV head grouping, tiny sizes; :func:`shrink_config`) and built on CPU with random weights;
2. for every prunable linear P of the block, P's output is perturbed and the consumer is the first
   linear, in execution order, whose input changes (:func:`_consumer_of`);
3. the row alignment is checked one row at a time: perturbing row r of P must reach input channel
   m(r) of the consumer, with m(r) = r when rows == cols ("index", the reference's rule) or
   m(r) = r mod cols when rows = n x cols (fused ``gate_up_proj``, MHA ``qkv_proj``: "tiled",
   every segment aligned with the consumer's inputs). A producer whose rows reach other channels
   (per-head interleaved ``query_key_value`` of GPT-NeoX) loses its consumer: uniform rows,
   logged and recorded. Producers with rows != n x cols keep their consumer and are made uniform
   by the GQA guard of §A7.

The result is cached per structure (the shrunk config). If the twin cannot be built or run, the
whole map falls back to uniform rows (``source = "fallback"``), logged with the reason.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import cache
from typing import Any

import torch
from torch import nn

from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

TWIN_HEAD_DIM = 16
"""Head size of the twin (even after partial rotary factors 0.25 / 0.4 / 0.5)."""
TWIN_VOCAB = 128
TWIN_TOKENS = 8
SHRINK_HOOKS: list[Callable[[dict[str, Any]], None]] = []
"""Extra shrinking steps on the config dict (e.g. expert counts of mixture-of-experts models);
each edits the dict in place."""

_LAYERS = ("num_hidden_layers", "n_layer", "num_layers")
_HIDDEN = ("hidden_size", "n_embd", "d_model")
_HEADS = ("num_attention_heads", "n_head")
_KV = ("num_key_value_heads", "num_kv_heads")
_FFN = ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "moe_intermediate_size",
        "shared_expert_intermediate_size")
_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")
_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts")


@dataclass(frozen=True)
class ConsumerMap:
    """The row step's view of one block structure.

    Attributes:
        consumers: ``(producer, consumer)`` pairs, producers in registration order.
        tiles: ``(producer, n)`` for fused producers whose rows are n segments, each aligned
            with the consumer's input channels (delta repeated n times).
        fallbacks: ``(producer, reason)`` for producers whose rows stay uniform because their
            alignment with the consumer is not one-to-one.
        source: ``derived`` (probe ran) or ``fallback`` (every row uniform; see ``reason``).
        reason: Why the map fell back, else empty.
    """

    consumers: tuple[tuple[str, str], ...] = ()
    tiles: tuple[tuple[str, int], ...] = ()
    fallbacks: tuple[tuple[str, str], ...] = ()
    source: str = "derived"
    reason: str = ""

    def checked(self, blocks: Sequence[Mapping[str, tuple[int, int]]]) -> ConsumerMap:
        """The map restricted to pairs whose producer and consumer are linears of every block.

        The twin has one block; models whose blocks differ (DeepSeek's dense first blocks before
        MoE blocks) keep only the pairs every block has, the others become uniform rows
        (recorded in ``fallbacks``), so the row step can never miss a delta.
        """
        def everywhere(*names: str) -> bool:
            return all(n in layers for layers in blocks for n in names)

        kept = tuple((p, c) for p, c in self.consumers if everywhere(p, c))
        if len(kept) == len(self.consumers):
            return self
        dropped = [(p, c) for p, c in self.consumers if (p, c) not in kept]
        log.info("row-step map: %s not in every block; uniform rows there", dropped)
        why = tuple((p, f"{p!r} -> {c!r} is not in every block") for p, c in dropped)
        return replace(self, consumers=kept,
                       tiles=tuple((p, n) for p, n in self.tiles if everywhere(p)),
                       fallbacks=self.fallbacks + why)

    def describe(self, layers: Mapping[str, tuple[int, int]],
                 uniform: frozenset[str] = frozenset()) -> dict[str, Any]:
        """``report.json`` entry: source, map, and why each uniform-row linear is uniform.

        Args:
            layers: ``name -> (rows, cols)`` of one block (real sizes).
            uniform: Linears an architecture rule keeps uniform (Mistral q/k/v, §A7).
        """
        consumers, tiles = dict(self.consumers), dict(self.tiles)
        why = dict(self.fallbacks)
        for name, (rows, _cols) in layers.items():
            consumer = consumers.get(name)
            if name in uniform:
                why[name] = "architecture rule of the reference (neuroal.md §A7)"
            elif consumer is None:
                why.setdefault(name, self.reason or "no consumer inside the block (its rows "
                               "feed the residual stream)")
            elif rows != tiles.get(name, 1) * layers[consumer][1]:
                why[name] = (f"{rows} rows vs {layers[consumer][1]} input channels of "
                             f"{consumer!r} (GQA guard, neuroal.md §A7)")
        return {"source": self.source, **({"reason": self.reason} if self.reason else {}),
                "consumers": consumers, "tiles": tiles,
                "uniform_rows": {n: why[n] for n in layers if n in why}}


def derive_consumer_map(config: Any, adapter: Callable[[nn.Module], Any]) -> ConsumerMap:
    """The producer -> consumer map of ``config``'s architecture (cached per structure).

    ``adapter`` builds the twin's adapter (:class:`~neuroal.models.adapter.ModelAdapter`, passed
    in because the adapter itself asks for this map). Never raises: a twin that cannot be built
    or run gives a ``fallback`` map (uniform rows), logged as a warning with the reason.
    """
    try:
        key = twin_key(config)
    except Exception as exc:  # noqa: BLE001 - any failure becomes the documented fallback
        return _fallback(getattr(config, "model_type", "?"), f"no tiny twin ({exc})")
    return _derive_cached(key, adapter)


def twin_model(twin: Any, adapter_cls: Callable[[nn.Module], Any]
               ) -> tuple[nn.Module, dict[str, nn.Linear]]:
    """The one-block ``twin`` built with seed 0 (call inside ``torch.random.fork_rng``, so the
    caller's random stream is unchanged) and its block's prunable linear modules. MoE expert
    matrices are views into fused 3-D parameters (no module to hook): probes leave them to
    neuroal.models.moe."""
    from transformers import AutoModelForCausalLM  # lazy: transformers takes seconds to import

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(twin, dtype=torch.float32,
                                             attn_implementation="eager").eval()
    adapter = adapter_cls(model)
    return model, {n: m for n, m in adapter.prunable_linears(adapter.blocks[0]).items()
                   if isinstance(m, nn.Module)}


def twin_key(config: Any) -> str:
    """The tiny twin's config (:func:`shrink_config`) as a JSON cache key; raises when no
    twin can be built. Probes on the twin are cached per key (one per architecture)."""
    return json.dumps(shrink_config(config).to_dict(), sort_keys=True, default=str)


def twin_config(key: str) -> tuple[str, Any]:
    """``(model_type, config)`` of the twin a :func:`twin_key` describes."""
    from transformers import AutoConfig

    fields = json.loads(key)
    model_type = fields.pop("model_type")
    return model_type, AutoConfig.for_model(model_type, **fields)


@cache
def _derive_cached(key: str, adapter: Callable[[nn.Module], Any]) -> ConsumerMap:
    model_type = json.loads(key).get("model_type", "?")
    try:
        return probe(twin_config(key)[1], adapter)
    except Exception as exc:  # noqa: BLE001 - any failure becomes the documented fallback
        return _fallback(model_type, f"probe failed ({type(exc).__name__}: {exc})")


def _fallback(model_type: str, reason: str) -> ConsumerMap:
    log.warning("model_type %r: could not derive NeuroAL's row-step map (%s); every linear "
                "keeps uniform rows in the row step", model_type, reason)
    return ConsumerMap(source="fallback", reason=reason)


# --------------------------------------------------------------------------- tiny twin


def shrink_config(config: Any) -> Any:
    """A one-block config of the same architecture with tiny sizes.

    Keeps the family, flags and the query/KV grouping class (MHA, GQA with group G <= 4 kept,
    larger groups capped at 4, MQA); heads of :data:`TWIN_HEAD_DIM` channels; vocabulary
    :data:`TWIN_VOCAB`; long-context rotary scalings replaced by plain rotary (their factor
    lists are sized by the head size). :data:`SHRINK_HOOKS` run last.
    """
    d = copy.deepcopy(config.to_dict())
    heads = int(_first(d, _HEADS))
    kv = int(_first(d, _KV) or heads)
    if d.get("multi_query") and not d.get("new_decoder_architecture"):
        kv = 1
    real_head_dim = int(d.get("head_dim") or int(_first(d, _HIDDEN)) // heads)
    if kv >= heads:
        kv_t = heads_t = min(heads, 4)
    else:
        kv_t = min(kv, 2)
        heads_t = kv_t * min(heads // kv, 4)
    hidden = heads_t * TWIN_HEAD_DIM
    _put(d, _LAYERS, 1)
    _put(d, _HIDDEN, hidden)
    _put(d, _HEADS, heads_t)
    _put(d, _KV, kv_t)
    _put(d, _FFN, 2 * hidden)
    if d.get("head_dim"):
        d["head_dim"] = TWIN_HEAD_DIM
    if d.get("rotary_dim"):
        d["rotary_dim"] = max(2, int(d["rotary_dim"]) * TWIN_HEAD_DIM // real_head_dim // 2 * 2)
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = d["layer_types"][:1]
    d["vocab_size"] = TWIN_VOCAB
    for key in _TOKEN_IDS:
        if isinstance(d.get(key), int) and d[key] >= TWIN_VOCAB or isinstance(d.get(key), list):
            d[key] = None
    for key in ("rope_parameters", "rope_scaling"):
        if isinstance(d.get(key), dict):
            d[key] = _plain_rope(d[key])
    for key in _EXPERTS:
        if isinstance(d.get(key), int):
            d[key] = min(d[key], 4)
    if isinstance(d.get("num_experts_per_tok"), int):
        d["num_experts_per_tok"] = min(d["num_experts_per_tok"], 2)
    for hook in SHRINK_HOOKS:
        hook(d)
    d.pop("architectures", None)
    model_type = d.pop("model_type")
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **d)


def _mla_dims(d: dict[str, Any]) -> None:
    """Multi-head latent attention (DeepSeek-V2/V3 and kin): the rotary, no-position and value
    parts of a head, the latent ranks and the expert groups shrunk together (the config's
    ``head_dim`` is the rotary part, so it must follow ``qk_rope_head_dim``)."""
    if not isinstance(d.get("qk_rope_head_dim"), int):
        return
    half = TWIN_HEAD_DIM // 2
    d.update(qk_rope_head_dim=half, qk_nope_head_dim=half, v_head_dim=TWIN_HEAD_DIM,
             kv_lora_rank=2 * TWIN_HEAD_DIM)
    d["qk_head_dim"] = 2 * half if "qk_head_dim" in d else d.get("qk_head_dim")
    if d.get("head_dim") is not None:
        d["head_dim"] = half
    if isinstance(d.get("q_lora_rank"), int):
        d["q_lora_rank"] = 4 * TWIN_HEAD_DIM
    for key in ("n_group", "topk_group"):
        if isinstance(d.get(key), int):
            d[key] = 1


SHRINK_HOOKS.append(_mla_dims)


def _first(d: Mapping[str, Any], keys: Sequence[str]) -> Any:
    return next((d[k] for k in keys if d.get(k) is not None), None)


def _put(d: dict[str, Any], keys: Sequence[str], value: int) -> None:
    for key in keys:
        if d.get(key) is not None:
            d[key] = value


def _plain_rope(params: dict[str, Any]) -> dict[str, Any]:
    """Rotary settings without scalings whose parameters depend on the head size (LongRoPE)."""
    if "rope_type" not in params:  # per layer type (Gemma-3): one level down
        return {k: _plain_rope(v) if isinstance(v, dict) else v for k, v in params.items()}
    if params.get("rope_type") in ("longrope", "su"):
        keep = ("rope_theta", "partial_rotary_factor")
        return {"rope_type": "default", **{k: params[k] for k in keep if k in params}}
    return params


# --------------------------------------------------------------------------- probe


@torch.no_grad()
def probe(twin: Any, adapter_cls: Callable[[nn.Module], Any]) -> ConsumerMap:
    """Derive the map on a one-block ``twin`` config (see the module docstring); ``adapter_cls``
    wraps the twin (its blocks and prunable linears).

    Three forwards: the plain batch, one batch element per producer with that producer's output
    perturbed (which linear inputs move), and one batch element per output row of every
    candidate producer (where each row lands). The twin's random weights come from a forked RNG,
    so the caller's random stream is unchanged.
    """
    with torch.random.fork_rng(devices=[]):
        model, linears = twin_model(twin, adapter_cls)
        ids = torch.randint(3, TWIN_VOCAB, (1, TWIN_TOKENS))
        found = _consumers(model, linears, ids)
        aligned = _aligned(model, linears, ids, [(p, c) for p, c in found.items()
                                                 if c is not None and _multiple(linears, p, c)])
    consumers, tiles, fallbacks = [], [], []
    for name, consumer in found.items():
        if consumer is None:
            continue
        rows, cols = linears[name].out_features, linears[consumer].in_features
        if not aligned.get(name, True):
            fallbacks.append((name, f"its {rows} rows do not line up with the {cols} input "
                              f"channels of {consumer!r} (fused per-head layout)"))
            log.info("row-step map: %s -> %s is not one-to-one; uniform rows", name, consumer)
            continue
        consumers.append((name, consumer))  # rows != n x cols: the GQA guard makes them uniform
        if rows != cols and rows % cols == 0:
            tiles.append((name, rows // cols))
    return ConsumerMap(tuple(consumers), tuple(tiles), tuple(fallbacks))


def _multiple(linears: Mapping[str, nn.Linear], producer: str, consumer: str) -> bool:
    return linears[producer].out_features % linears[consumer].in_features == 0


Hook = Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]


def _inputs(model: nn.Module, linears: Mapping[str, nn.Linear], ids: torch.Tensor,
            hooks: Mapping[str, Hook]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Inputs of every linear of the block on ``ids`` (first call) as ``(B, T', cols)``, and
    their execution order; ``hooks[name]`` is a forward hook placed on linear ``name``."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    batch = ids.shape[0]

    def recorder(name: str) -> Callable[[nn.Module, tuple], None]:
        def hook(_m: nn.Module, args: tuple) -> None:
            if name not in seen:  # OPT flattens tokens: (B*T, cols) -> (B, T, cols)
                seen[name] = args[0].detach().reshape(batch, -1, args[0].shape[-1]).clone()
        return hook

    try:
        for name, lin in linears.items():
            handles.append(lin.register_forward_pre_hook(recorder(name)))
        for name, hook in hooks.items():
            handles.append(linears[name].register_forward_hook(hook))
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return seen, list(seen)


def _consumers(model: nn.Module, linears: Mapping[str, nn.Linear],
               ids: torch.Tensor) -> dict[str, str | None]:
    """For every linear, the first linear after it (execution order) whose input changes when
    its output does (batch element i perturbs linear i)."""
    names = list(linears)
    batch = ids.expand(len(names), -1)
    base, order = _inputs(model, linears, batch, {})
    gen = torch.Generator().manual_seed(1)

    def noise(i: int) -> Hook:
        def hook(_m: nn.Module, _a: Any, out: torch.Tensor) -> torch.Tensor:
            view = out.clone().reshape(len(names), -1, out.shape[-1])  # (B, T, rows)
            scale = float(view[i].abs().max()) + 1e-3
            view[i] += 0.1 * scale * torch.randn(view[i].shape, generator=gen)
            return view.reshape(out.shape)
        return hook

    moved, _ = _inputs(model, linears, batch, {n: noise(i) for i, n in enumerate(names)})
    found: dict[str, str | None] = {}
    for i, name in enumerate(names):
        found[name] = next((o for o in order if o != name and _changed(base[o][i], moved[o][i])),
                           None)
    return found


def _changed(ref: torch.Tensor, new: torch.Tensor) -> bool:
    return float((new - ref).abs().max()) > 1e-5 * (float(ref.abs().max()) + 1e-12)


def _aligned(model: nn.Module, linears: Mapping[str, nn.Linear], ids: torch.Tensor,
             pairs: Sequence[tuple[str, str]]) -> dict[str, bool]:
    """Whether perturbing output row r of each producer reaches input channel ``r mod cols`` of
    its consumer, for every row (one batch element per row of every producer)."""
    if not pairs:
        return {}
    sizes = [linears[p].out_features for p, _ in pairs]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    total = sum(sizes)

    def bump(start: int, rows: int) -> Hook:
        def hook(_m: nn.Module, _a: Any, out: torch.Tensor) -> torch.Tensor:
            view = out.clone().reshape(total, -1, rows)  # (B, T, rows)
            steps = torch.arange(1, view.shape[1] + 1, dtype=view.dtype) / view.shape[1]  # (T,)
            own = torch.arange(rows)
            # (rows, T) entries growing over tokens: a constant shift of a key row would
            # cancel in the softmax
            view[start + own, :, own] += (1.0 + 10.0 * float(view.abs().max())) * steps
            return view.reshape(out.shape)
        return hook

    hooks = {p: bump(st, n) for (p, _), st, n in zip(pairs, starts, sizes, strict=True)}
    base, _ = _inputs(model, linears, ids, {})
    moved, _ = _inputs(model, linears, ids.expand(total, -1), hooks)
    out = {}
    for (producer, consumer), start, rows in zip(pairs, starts, sizes, strict=True):
        cols = linears[consumer].in_features
        change = moved[consumer][start:start + rows] - base[consumer]  # (rows, T, cols)
        reach = change.abs().amax(dim=1)  # (rows, cols)
        peak = reach.amax(dim=1)  # (rows,)
        testable = peak > 1e-4 * float(peak.max())
        own = torch.arange(rows)
        hit = reach[own, own % cols] >= 1e-3 * peak
        out[producer] = bool(testable.float().mean() >= 0.5) and bool(hit[testable].all())
    return out
