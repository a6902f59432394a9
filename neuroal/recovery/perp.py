"""PERP: parameter-efficient retraining after pruning with the masks held fixed (recovery.md §3).

Zimmer, Andoni, Spiegel, Pokutta, "PERP: Rethinking the Prune-Retrain Paradigm in the Era of
LLMs", arXiv 2312.15230. After pruning, only a tiny subset is trained (§3.3): every bias, every
norm (LayerNorm / RMSNorm, final norm included), an optional standard LoRA on the head, and a
sparsity-preserving adapter on every prunable linear of the blocks (§3.4):

* ``mask_lora``: ``W_eff = W + s * (M * (B @ A))`` with ``M = 1[W != 0]`` and ``s = alpha / r``;
  merged as ``W <- W_eff``, so pruned entries stay exactly zero and train == inference.
* ``scale_lora``: ``W_eff = W * (u v^T)``; the authors' rank-r ``B A`` initialised to all ones
  stays rank one under Adam (§3.4), so it is implemented as the two vectors ``u`` (rows) and
  ``v`` (cols) initialised to one; merged as ``W <- W * (u v^T)``. The vectors are trained with
  lr and Adam's eps multiplied by ``sqrt(r)``: in the rank-r form ``u = sqrt(r) b`` while each
  entry of ``B`` sees the gradient ``dL/du / sqrt(r)``, and Adam's step does not scale with
  the gradient, so ``u`` moves ``sqrt(r)`` times faster than a vector trained at the same lr.
  With the factor the two forms are the same optimisation (gradient norms for clipping agree
  too: ``r`` copies of ``g / sqrt(r)``).

The base weights are frozen, so no optimiser ever writes a pruned entry (§4.2 option 1). The
module also holds the layer-wise reconstruction of one block (§3.6), which workers call on their
own blocks in stream order. Nothing here reads or writes files.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812 - the usual name
from torch import nn

from neuroal.models.adapter import ModelAdapter
from neuroal.models.loading import build_skeleton
from neuroal.runtime.logging import get_logger
from neuroal.runtime.registry import Registry

log = get_logger(__name__)

HALF_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class PerpOptions:
    """Which parameters PERP trains (recovery.md §3.3-3.4; defaults are the reference's).

    Attributes:
        adapter: Registered adapter for every prunable block linear (``mask_lora``,
            ``scale_lora``) or ``None`` for biases and norms only.
        rank: LoRA rank ``r`` (MaskLoRA and the head LoRA).
        alpha: LoRA ``alpha``; the update is scaled by ``alpha / rank``.
        biases: Train every existing bias of the model.
        norms: Train every norm's weight (and bias).
        lm_head_lora: A standard (dense, mergeable) LoRA on the head; a tied head is untied.
        add_biases: Add zero biases to the block linears that lack them, where the architecture
            has a config flag for them (e.g. ``attention_bias``), so the export still loads.
            Not in the reference (there Llama/Mistral simply have no biases).
        weights: Train the prunable block weights themselves, re-masked around every optimiser
            step (:mod:`neuroal.recovery.remask`; recovery.md §4.2 option 2, opt-in). Needs
            ``adapter=None``.
        seed: Seed of the adapters' initialisation.
    """

    adapter: str | None = "mask_lora"
    rank: int = 16
    alpha: float = 32.0
    biases: bool = True
    norms: bool = True
    lm_head_lora: bool = True
    add_biases: bool = False
    weights: bool = False
    seed: int = 42

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError(f"PERP rank={self.rank}, alpha={self.alpha}: expected rank >= 1 and "
                             "alpha > 0 (reference: rank 16, alpha 32)")
        if self.weights and self.adapter is not None:
            raise ValueError(f"PERP weights=true with adapter={self.adapter!r}: training the block "
                             "weights directly excludes an adapter on them; set adapter to null")
        if self.adapter is not None:
            ADAPTERS.canonical(self.adapter)

    @property
    def scale(self) -> float:
        """``alpha / rank`` (2 with the reference's r 16, alpha 32)."""
        return self.alpha / self.rank


@dataclass(frozen=True)
class ParamCount:
    """Trainable-parameter count by group and the model's total (tied tensors counted once).

    Attributes:
        groups: ``biases``, ``norms``, ``adapters`` (block linears), ``lm_head_lora`` and
            ``weights`` (the block weights themselves, ``weights=True``: every element, of
            which the pruned ones are held at zero).
        total: Parameters of the model before PERP changed it.
    """

    groups: dict[str, int]
    total: int

    @property
    def trainable(self) -> int:
        return sum(self.groups.values())

    @property
    def fraction(self) -> float:
        """``trainable / total`` (recovery.md §3.3 reports it in per cent)."""
        return self.trainable / self.total

    def to_dict(self) -> dict[str, Any]:
        return {"groups": dict(self.groups), "trainable": self.trainable, "total": self.total,
                "fraction": self.fraction}


# --------------------------------------------------------------------------- maths


def mask_lora_delta(keep: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                    scale: float) -> torch.Tensor:
    """``s * (M * (B @ A))`` in float32.

    Args:
        keep: ``M``, ``(rows, cols)`` bool, True where the weight is kept.
        a: ``A``, ``(r, cols)``.
        b: ``B``, ``(rows, r)``.
        scale: ``s = alpha / r``.
    """
    return (b.float() @ a.float()).mul(scale).mul(keep)


def mask_lora_merged(weight: torch.Tensor, keep: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """``W + s * (M * (B @ A))`` in ``weight``'s dtype; every pruned entry is exactly +0.0."""
    merged = (weight.float() + mask_lora_delta(keep, a, b, scale)).to(weight.dtype)
    return merged.masked_fill_(~keep, 0.0)


def scale_merged(weight: torch.Tensor, row: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """``W * (u v^T)`` in ``weight``'s dtype (``u``: ``(rows,)``, ``v``: ``(cols,)``); zeros stay
    +0.0 (a negative scale would otherwise give -0.0)."""
    merged = (weight.float() * row.float()[:, None] * col.float()[None, :]).to(weight.dtype)
    return merged.masked_fill_(weight == 0, 0.0)


def lora_merged(weight: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                scale: float) -> torch.Tensor:
    """``W + s * (B @ A)`` (dense; only for the unpruned head)."""
    return (weight.float() + (b.float() @ a.float()) * scale).to(weight.dtype)


def linear_warmup_decay(step: int, total: int, warmup: int) -> float:
    """LR factor: linear warm-up over ``warmup`` steps, then linear decay to 0 at ``total``
    (the HF Trainer's ``linear`` schedule, recovery.md §3.5-3.6)."""
    if step < warmup:
        return step / max(1, warmup)
    return max(0.0, (total - step) / max(1, total - warmup))


def warmup_steps(total: int, ratio: float) -> int:
    """``ceil(ratio * total)`` warm-up steps (the HF Trainer's ``warmup_ratio``, which the
    reference's whole-model retraining uses)."""
    return math.ceil(ratio * total)


def reconstruction_warmup_steps(total: int, ratio: float) -> int:
    """``floor(ratio * total)`` warm-up steps: the reference's layer-wise reconstruction builds
    its schedule itself and truncates (``int``), unlike the Trainer (e.g. 1, not 2, of 15)."""
    return int(ratio * total)


LR_SCALE = "_neuroal_lr_scale"
"""Attribute a parameter may carry: its lr (and Adam eps) factor, read by :func:`adamw`."""
ADAM_EPS = 1e-8


def adamw(params: list[nn.Parameter], lr: float) -> torch.optim.AdamW:
    """AdamW with the reference's settings: betas (0.9, 0.999), eps 1e-8, weight decay 0.

    Parameters tagged with :data:`LR_SCALE` (ScaleLoRA's vectors: ``sqrt(r)``) form their own
    group whose lr and eps are multiplied by the factor, so that they follow the authors'
    rank-r parametrisation step for step (module docstring).
    """
    groups: dict[float, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault(float(getattr(p, LR_SCALE, 1.0)), []).append(p)
    return torch.optim.AdamW([{"params": ps, "lr": lr * f, "eps": ADAM_EPS * f}
                              for f, ps in groups.items()],
                             lr=lr, betas=(0.9, 0.999), eps=ADAM_EPS, weight_decay=0.0)


# --------------------------------------------------------------------------- adapter modules


class AdaptedLinear(nn.Module):
    """Base of the adapter modules: takes over a linear's frozen ``weight`` and ``bias``.

    The parameters are registered on the adapter itself (same tensor objects as the replaced
    linear), so state-dict names of ``weight``/``bias`` do not change and ZeRO-3 gathers them
    with the adapter's own tensors when the adapter runs. :meth:`merge` writes the merged
    weight into the original linear and returns it.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.register_parameter("bias", linear.bias)
        object.__setattr__(self, "_linear", linear)  # not a submodule: no duplicate parameters

    def _bias(self, x: torch.Tensor) -> torch.Tensor | None:
        return None if self.bias is None else self.bias.to(x.dtype)

    def merged_weight(self) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """The replaced linear holding the merged weight (same dtype) and the current bias."""
        linear: nn.Linear = self._linear
        merged = self.merged_weight()
        self.weight.data = merged
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    @staticmethod
    def count(rows: int, cols: int, rank: int) -> int:
        """Trainable parameters the adapter adds to a ``rows x cols`` linear."""
        raise NotImplementedError


def lora_init(rank: int, cols: int, device: torch.device,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """LoRA's ``A`` ``(rank, cols)``: Kaiming-uniform (a = sqrt(5)) drawn on the generator's
    device, then moved to ``device``, so a CPU generator gives the same A on every device (a
    CUDA tensor cannot draw from a CPU generator); ``meta`` stays uninitialised."""
    if device.type == "meta":
        return torch.empty(rank, cols, device=device)
    draw = generator.device if generator is not None else device
    a = torch.empty(rank, cols, device=draw)
    nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
    return a.to(device)


class LoRALinear(AdaptedLinear):
    """Standard LoRA ``x W^T + s x A^T B^T`` (A Kaiming-uniform a=sqrt(5), B = 0); for the head."""

    def __init__(self, linear: nn.Linear, rank: int, alpha: float,
                 generator: torch.Generator | None = None) -> None:
        super().__init__(linear)
        self.scale = alpha / rank
        device = linear.weight.device
        self.lora_a = nn.Parameter(lora_init(rank, self.in_features, device, generator))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = F.linear(x, self.weight.to(x.dtype), self._bias(x))
        return base + F.linear(F.linear(x, self.lora_a.to(x.dtype)), self.lora_b.to(x.dtype)) * self.scale

    def merged_weight(self) -> torch.Tensor:
        return lora_merged(self.weight, self.lora_a, self.lora_b, self.scale)

    @staticmethod
    def count(rows: int, cols: int, rank: int) -> int:
        return rank * (rows + cols)


class MaskLoRALinear(LoRALinear):
    """MaskLoRA: ``x (W + s M*(B A))^T`` with ``M = 1[W != 0]`` (recovery.md §3.4).

    Args:
        linear: The pruned linear (frozen).
        rank: ``r``.
        alpha: ``alpha``; the update is scaled by ``alpha / r``.
        generator: RNG of A's initialisation.
        pruned: ``(rows, cols)`` bool, True where pruned. Default: recomputed as ``W == 0`` at
            every forward (nothing stored, as in the reference).
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float,
                 generator: torch.Generator | None = None, pruned: torch.Tensor | None = None) -> None:
        super().__init__(linear, rank, alpha, generator)
        if pruned is not None and tuple(pruned.shape) != tuple(linear.weight.shape):
            raise ValueError(f"mask of shape {tuple(pruned.shape)} for a weight of shape "
                             f"{tuple(linear.weight.shape)}")
        self.pruned = None if pruned is None else pruned.to(device=linear.weight.device, dtype=torch.bool)

    def keep(self) -> torch.Tensor:
        """``M``: True where the weight is kept."""
        return self.weight != 0 if self.pruned is None else ~self.pruned

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() + mask_lora_delta(self.keep(), self.lora_a, self.lora_b, self.scale)
        return F.linear(x, weight.to(x.dtype), self._bias(x))

    def merged_weight(self) -> torch.Tensor:
        return mask_lora_merged(self.weight, self.keep(), self.lora_a, self.lora_b, self.scale)


class ScaleLoRALinear(AdaptedLinear):
    """ScaleLoRA as its rank-one equivalent: ``x (W * u v^T)^T`` with ``u = v = 1`` at init.

    Computed as ``((x * v) W^T) * u`` (no dense rows x cols product). ``rank`` is the authors'
    ``r``: it sets the vectors' lr factor ``sqrt(r)`` (:data:`LR_SCALE`), which makes AdamW
    train them exactly as it trains the rank-r ``B A`` initialised to ones.
    """

    def __init__(self, linear: nn.Linear, rank: int = 1, alpha: float = 1.0,
                 generator: torch.Generator | None = None, pruned: torch.Tensor | None = None) -> None:
        super().__init__(linear)
        device = linear.weight.device
        self.row_scale = nn.Parameter(torch.ones(self.out_features, device=device))
        self.col_scale = nn.Parameter(torch.ones(self.in_features, device=device))
        for p in (self.row_scale, self.col_scale):
            setattr(p, LR_SCALE, math.sqrt(rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x * self.col_scale.to(x.dtype), self.weight.to(x.dtype)) * self.row_scale.to(x.dtype)
        bias = self._bias(x)
        return y if bias is None else y + bias

    def merged_weight(self) -> torch.Tensor:
        return scale_merged(self.weight, self.row_scale, self.col_scale)

    @staticmethod
    def count(rows: int, cols: int, rank: int) -> int:
        return rows + cols


ADAPTERS: Registry[type[AdaptedLinear]] = Registry("PERP adapter")
ADAPTERS.add("mask_lora", MaskLoRALinear, "masklora")
ADAPTERS.add("scale_lora", ScaleLoRALinear, "scalelora")

PERP_VARIANTS: Registry[PerpOptions] = Registry("PERP variant")
"""Named presets (variants are data): ``bias-norm`` trains biases and norms only (the
0.01-0.05 % setting of v3); ``masklora`` / ``scalelora`` add the adapter and the head LoRA."""
# aliases: the step names of prune's --recover (perp-masklora), the one spelling docs use
PERP_VARIANTS.add("bias-norm", PerpOptions(adapter=None, lm_head_lora=False), "bias_norm",
                  "perp-bias-norm")
PERP_VARIANTS.add("masklora", PerpOptions(adapter="mask_lora"), "mask_lora", "perp-masklora")
PERP_VARIANTS.add("scalelora", PerpOptions(adapter="scale_lora"), "scale_lora", "perp-scalelora")
PERP_VARIANTS.add("full", PerpOptions(adapter=None, lm_head_lora=False, weights=True), "perp-full")


# --------------------------------------------------------------------------- parameter selection


def is_norm(module: nn.Module) -> bool:
    """LayerNorm and every ``*Norm`` class with its own parameters (RMSNorm variants)."""
    if isinstance(module, nn.LayerNorm):
        return True
    return type(module).__name__.endswith("Norm") and any(True for _ in module.parameters(recurse=False))


def norm_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters of every norm under ``module``, by qualified name."""
    return {f"{m_name}.{p_name}".lstrip("."): p for m_name, m in module.named_modules() if is_norm(m)
            for p_name, p in m.named_parameters(recurse=False)}


def bias_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """Every ``bias`` parameter outside norms, by qualified name."""
    return {f"{m_name}.bias".lstrip("."): m.bias for m_name, m in module.named_modules()
            if not is_norm(m) and isinstance(getattr(m, "bias", None), nn.Parameter)}


def numel(param: torch.Tensor) -> int:
    """Elements of a parameter, also when ZeRO-3 has partitioned it (``ds_numel``)."""
    return int(getattr(param, "ds_numel", param.numel()))


def unique_numel(params: Mapping[str, nn.Parameter] | list[nn.Parameter]) -> int:
    """Elements of the distinct tensors (tied ones once); works on ``meta`` and under ZeRO-3."""
    values = params.values() if isinstance(params, Mapping) else params
    return sum(numel(p) for p in {id(p): p for p in values}.values())


@contextmanager
def gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """Full values of ZeRO-3-partitioned parameters for the body (read only; no-op otherwise)."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield


def total_parameters(model: nn.Module) -> int:
    """Parameters of the model, tied tensors counted once (meta skeletons work)."""
    return unique_numel(list(model.parameters()))


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Parameters with ``requires_grad``, by name (tied ones once)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _skeleton_parameters(config: Any) -> dict[str, tuple[str, int]]:
    """``name -> (owner class, numel)`` of a meta skeleton built from ``config``."""
    model = build_skeleton(config, torch.float32)
    return {name: (type(model.get_submodule(name.rpartition(".")[0])).__name__, p.numel())
            for name, p in model.named_parameters()}


def bias_config_flags(config: Any) -> tuple[dict[str, bool], dict[str, int]]:
    """Config flags that add biases to linears, and the bias tensors they add.

    Generic (no family names): every boolean config entry whose name contains ``bias`` and is
    False is switched on alone on a meta skeleton; it is accepted if every parameter it adds is
    the ``bias`` of an ``nn.Linear`` (so an export with the flag set loads in transformers).

    Returns:
        ``({flag: True}, {bias name: numel})``; empty when the architecture has no such flag.
    """
    base = _skeleton_parameters(config)
    flags: dict[str, bool] = {}
    added: dict[str, int] = {}
    for key, value in config.to_dict().items():
        if "bias" not in key.lower() or value is not False:
            continue
        trial = _skeleton_parameters(config.__class__.from_dict({**config.to_dict(), key: True}))
        new = {n: v for n, v in trial.items() if n not in base}
        if new and all(n.endswith(".bias") and cls == "Linear" for n, (cls, _) in new.items()):
            flags[key] = True
            added.update({n: numel for n, (_, numel) in new.items()})
    return flags, added


def add_zero_biases(model: nn.Module) -> list[str]:
    """Give linears zero biases where a config flag makes the export loadable; sets the flags.

    Returns:
        Names of the added biases (empty, with a warning, when the architecture has no flag).
    """
    flags, added = bias_config_flags(model.config)
    if not flags:
        lacking = sum(1 for m in model.modules() if isinstance(m, nn.Linear) and m.bias is None)
        if lacking:
            log.warning("model_type %r has no config flag for linear biases; %d linears keep "
                        "no bias (an export with extra biases would not load)",
                        getattr(model.config, "model_type", "?"), lacking)
        return []
    for name in added:
        owner = model.get_submodule(name.rpartition(".")[0])
        if owner.bias is None:
            weight = owner.weight
            owner.bias = nn.Parameter(torch.zeros(owner.out_features, dtype=weight.dtype,
                                                  device=weight.device), requires_grad=False)
    for key, value in flags.items():
        setattr(model.config, key, value)
    log.info("added %d zero biases; config flags set: %s", len(added), ", ".join(flags))
    return sorted(added)


def untie_head(adapter: ModelAdapter) -> bool:
    """Give a tied head its own copy of the embedding (peft #2018) and record it in the config.

    Returns:
        Whether the head was tied.
    """
    head = adapter.head
    if head.weight is not adapter.embed.weight and not adapter.tied:
        return False
    with gathered([head.weight]):
        copy = head.weight.detach().clone()
    head.weight = nn.Parameter(copy, requires_grad=False)
    adapter.config.tie_word_embeddings = False
    return True


# --------------------------------------------------------------------------- counting (formulas)


def count_perp_parameters(model: nn.Module, options: PerpOptions) -> ParamCount:
    """Trainable parameters PERP would add, from shapes only (meta skeletons of 70 B work).

    Formulas (recovery.md §3.3-3.4): biases and norms by their element counts (plus the zero
    biases ``add_biases`` would add), LoRA ``r (in + out)`` per block linear and on the head,
    ScaleLoRA ``in + out`` per block linear (its rank-one form).
    """
    adapter = ModelAdapter(model)
    groups = {"biases": 0, "norms": 0, "adapters": 0, "lm_head_lora": 0, "weights": 0}
    if options.biases:
        groups["biases"] = unique_numel(bias_parameters(model))
        if options.add_biases:
            groups["biases"] += sum(bias_config_flags(model.config)[1].values())
    if options.norms:
        groups["norms"] = unique_numel(norm_parameters(model))
    if options.adapter is not None:
        kind = ADAPTERS.get(options.adapter)
        groups["adapters"] = sum(kind.count(lin.out_features, lin.in_features, options.rank)
                                 for block in adapter.blocks
                                 for lin in adapter.prunable_linears(block).values())
    if options.weights:
        groups["weights"] = sum(numel(w) for w in block_weights(model).values())
    if options.lm_head_lora:
        head = adapter.head
        groups["lm_head_lora"] = LoRALinear.count(head.out_features, head.in_features, options.rank)
    total = total_parameters(model)
    if adapter.tied and adapter.head.weight is not adapter.embed.weight:
        total -= numel(adapter.head.weight)  # meta skeletons may leave a tied head untied
    return ParamCount(groups, total)


# --------------------------------------------------------------------------- whole-model PERP


@dataclass
class PerpState:
    """What :func:`apply_perp` changed, for :func:`merge_perp`.

    Attributes:
        wrapped: Module names now holding an :class:`AdaptedLinear`.
        dtypes: Original dtype of every upcast trainable parameter.
        added_biases: Names of zero biases added (``add_biases``).
        untied: Whether the head was untied.
        count: The formula count (total = the model before PERP).
    """

    options: PerpOptions
    wrapped: list[str] = field(default_factory=list)
    dtypes: dict[str, torch.dtype] = field(default_factory=dict)
    added_biases: list[str] = field(default_factory=list)
    untied: bool = False
    count: ParamCount | None = None


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, new)


def _wrap(root: nn.Module, linears: Mapping[str, nn.Linear], kind: type[AdaptedLinear],
          options: PerpOptions, generator: torch.Generator,
          masks: Mapping[str, torch.Tensor] | None = None) -> list[str]:
    """Replace each ``root.<name>`` linear by its adapter; returns the names."""
    for name, linear in linears.items():
        pruned = None if masks is None else masks.get(name)
        _replace_module(root, name, kind(linear, options.rank, options.alpha, generator, pruned))
    return list(linears)


def _upcast(params: Mapping[str, nn.Parameter]) -> dict[str, torch.dtype]:
    """Trainables to float32 (frozen tensors keep their 16-bit dtype); original dtypes."""
    dtypes = {}
    for name, p in params.items():
        if p.dtype in HALF_DTYPES:
            dtypes[name] = p.dtype
            p.data = p.data.float()
    return dtypes


def _cast_back(root: nn.Module, dtypes: Mapping[str, torch.dtype]) -> None:
    for name, dtype in dtypes.items():
        p = root.get_parameter(name)
        p.data = p.data.to(dtype)


def _select(root: nn.Module, options: PerpOptions) -> dict[str, nn.Parameter]:
    """Unfreeze biases / norms (and the block weights) per ``options``; returns every
    trainable parameter."""
    chosen = {**(bias_parameters(root) if options.biases else {}),
              **(norm_parameters(root) if options.norms else {}),
              **(block_weights(root) if options.weights else {})}
    for p in chosen.values():
        p.requires_grad_(True)
    return trainable_parameters(root)


def block_weights(model: nn.Module) -> dict[str, nn.Parameter]:
    """The weight of every prunable block linear, by qualified name."""
    adapter = ModelAdapter(model)
    return {f"{adapter.block_prefix(i)}{n}.weight": lin.weight
            for i, block in enumerate(adapter.blocks)
            for n, lin in adapter.prunable_linears(block).items()}


def apply_perp(model: nn.Module, options: PerpOptions, upcast: bool = True) -> PerpState:
    """Freeze the model, then make the PERP subset trainable (recovery.md §3.3).

    Adds zero biases (if asked), unties and wraps the head with LoRA, wraps every prunable block
    linear with the adapter, unfreezes biases and norms, and upcasts trainables to float32.

    Args:
        model: A ``*ForCausalLM`` with pruned (zeroed) block linears.
        options: What to train.
        upcast: Upcast 16-bit trainables (off under DeepSpeed, which keeps fp32 masters).

    Returns:
        The state :func:`merge_perp` needs.
    """
    state = PerpState(options, count=count_perp_parameters(model, options))
    for p in model.parameters():
        p.requires_grad_(False)
    if options.add_biases:
        state.added_biases = add_zero_biases(model)
    adapter = ModelAdapter(model)
    generator = torch.Generator().manual_seed(options.seed)
    if options.lm_head_lora:
        state.untied = untie_head(adapter)
        head_name = adapter.spec.head
        _replace_module(model, head_name, LoRALinear(adapter.head, options.rank, options.alpha, generator))
        state.wrapped.append(head_name)
    if options.adapter is not None:
        kind = ADAPTERS.get(options.adapter)
        for index, block in enumerate(adapter.blocks):
            prefix = adapter.block_prefix(index)
            names = _wrap(block, adapter.prunable_linears(block), kind, options, generator)
            state.wrapped += [prefix + n for n in names]
    trainable = _select(model, options)
    state.dtypes = _upcast(trainable) if upcast else {}
    log.info("PERP: %d trainable parameters (%.4f %% of %d)", unique_numel(trainable),
             100 * state.count.fraction, state.count.total)
    return state


def unwrap(root: nn.Module, names: list[str]) -> None:
    """Merge every adapter named in ``names`` and put the plain linear back."""
    for name in names:
        module = root.get_submodule(name)
        if isinstance(module, AdaptedLinear):
            _replace_module(root, name, module.merge())


def merge_perp(model: nn.Module, state: PerpState) -> None:
    """Cast trainables back to their dtype, merge the adapters and freeze the model."""
    _cast_back(model, state.dtypes)
    unwrap(model, state.wrapped)
    for p in model.parameters():
        p.requires_grad_(False)


def merge_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Merge adapters in a (gathered) state dict, e.g. the one ZeRO-3 consolidates on rank 0.

    Args:
        model: The (unwrapped) model still holding the adapter modules (only their kind and
            hyper-parameters are read, never their possibly partitioned tensors).
        state_dict: Full tensors by name, adapter tensors included.

    Returns:
        A new state dict with merged weights and without adapter tensors.
    """
    out = dict(state_dict)
    for name, module in model.named_modules():
        if not isinstance(module, AdaptedLinear):
            continue
        tensors = {k: out.pop(f"{name}.{k}") for k, _ in module.named_parameters(recurse=False)
                   if k not in ("weight", "bias")}
        weight = out[f"{name}.weight"]
        if isinstance(module, MaskLoRALinear):
            out[f"{name}.weight"] = mask_lora_merged(weight, weight != 0, tensors["lora_a"],
                                                     tensors["lora_b"], module.scale)
        elif isinstance(module, LoRALinear):
            out[f"{name}.weight"] = lora_merged(weight, tensors["lora_a"], tensors["lora_b"], module.scale)
        else:
            out[f"{name}.weight"] = scale_merged(weight, tensors["row_scale"], tensors["col_scale"])
    return out


# --------------------------------------------------------------------------- mask checks


def zero_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``full linear name -> (rows, cols) bool`` True where a prunable block weight is zero."""
    adapter = ModelAdapter(model)
    return {adapter.block_prefix(i) + name: (lin.weight.detach() == 0).cpu()
            for i, block in enumerate(adapter.blocks)
            for name, lin in adapter.prunable_linears(block).items()}


def check_zeros_kept(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> None:
    """Every zero before is still zero (recovery.md §4.4).

    Raises:
        RuntimeError: Naming the first layers that lost zeros and how many.
    """
    lost = {name: int((mask & ~after[name]).sum()) for name, mask in before.items()}
    bad = {k: v for k, v in lost.items() if v}
    if bad:
        raise RuntimeError(f"retraining changed pruned weights in {len(bad)} layer(s), e.g. "
                           f"{dict(list(bad.items())[:3])}; the masks must stay fixed")


# --------------------------------------------------------------------------- layer-wise (§3.6)


@dataclass(frozen=True)
class ReconstructOptions:
    """Layer-wise reconstruction of one block (recovery.md §3.6).

    Attributes:
        steps: Optimiser steps ``T`` (reference default 20, batch 1; paper values unknown).
        batch_size: Samples per step, cycled over the calibration set in fixed order.
        lr: AdamW learning rate (reference code default 5e-4).
        warmup: Warm-up fraction of the linear schedule (10 %; ``floor(warmup * steps)`` steps
            as in the reference's reconstruction loop).
        rank, alpha: MaskLoRA rank and alpha.
        biases, norms: Also train the block's biases / norms.
        measure: Compute the block MSE before and after (two extra passes).
        seed: Seed of A's initialisation.
    """

    steps: int = 20
    batch_size: int = 1
    lr: float = 5e-4
    warmup: float = 0.1
    rank: int = 16
    alpha: float = 32.0
    biases: bool = True
    norms: bool = True
    measure: bool = True
    seed: int = 42

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0:
            raise ValueError(f"reconstruction steps={self.steps}, batch_size={self.batch_size}, "
                             f"lr={self.lr}: expected positive values")


@dataclass
class ReconstructInfo:
    """Outcome of :func:`reconstruct_block` (MSE values are NaN when not measured)."""

    steps: int
    seconds: float
    trainable: int
    mse_before: float = float("nan")
    mse_after: float = float("nan")
    loss_first: float = float("nan")
    loss_last: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def autocast_for(device: torch.device, dtype: torch.dtype) -> Any:
    """Autocast to the model's 16-bit dtype (trainables are fp32); nothing for fp32 models."""
    if dtype in HALF_DTYPES:
        return torch.autocast(device.type, dtype=dtype)
    return nullcontext()


@torch.no_grad()
def block_mse(call_block_fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
              targets: torch.Tensor, batch_size: int, device: torch.device) -> float:
    """Mean squared error of the block's outputs against ``targets`` over all samples
    (micro-batches of ``batch_size`` moved to ``device``)."""
    total = 0.0
    for start in range(0, inputs.shape[0], batch_size):
        out = call_block_fn(inputs[start:start + batch_size].to(device)).float()
        diff = out - targets[start:start + batch_size].to(device).float()
        total += float(diff.pow(2).sum())
    return total / targets.numel()


@contextmanager
def _block_adapters(block: nn.Module, linears: Mapping[str, nn.Linear],
                    masks: Mapping[str, torch.Tensor], options: ReconstructOptions
                    ) -> Iterator[dict[str, nn.Parameter]]:
    """MaskLoRA on ``linears`` (+ block biases and norms) for the body; merged on exit.

    The block's previous ``requires_grad`` flags and dtypes are restored afterwards.
    """
    flags = {n: p.requires_grad for n, p in block.named_parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    perp = PerpOptions(adapter="mask_lora", rank=options.rank, alpha=options.alpha,
                       biases=options.biases, norms=options.norms, lm_head_lora=False, seed=options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    names = _wrap(block, linears, MaskLoRALinear, perp, generator, masks)
    dtypes: dict[str, torch.dtype] = {}
    try:
        trainable = _select(block, perp)
        dtypes = _upcast(trainable)
        yield trainable
    finally:
        _cast_back(block, dtypes)
        unwrap(block, names)
        for n, p in block.named_parameters():
            p.requires_grad_(flags.get(n, False))


@contextmanager
def _train_mode(block: nn.Module) -> Iterator[None]:
    """The block in training mode for the fit, as the reference (dropout active, e.g. OPT's
    0.1; the targets and the MSE passes keep the caller's mode); the mode is restored after."""
    modes = {name: m.training for name, m in block.named_modules()}
    block.train()
    try:
        yield
    finally:
        for name, m in block.named_modules():
            m.training = modes.get(name, m.training)


def _fit(call_block_fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor,
         targets: torch.Tensor, params: list[nn.Parameter], options: ReconstructOptions,
         device: torch.device, dtype: torch.dtype) -> list[float]:
    """AdamW + linear warm-up/decay + MSE on the dense targets; batches cycled in order."""
    optimizer = adamw(params, options.lr)
    warm = reconstruction_warmup_steps(options.steps, options.warmup)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: linear_warmup_decay(s, options.steps, warm))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    n = inputs.shape[0]
    losses = []
    for step in range(options.steps):
        index = torch.arange(step * options.batch_size, (step + 1) * options.batch_size) % n
        x, y = inputs[index].to(device), targets[index].to(device)
        with torch.enable_grad(), autocast_for(device, dtype):
            loss = F.mse_loss(call_block_fn(x).float(), y.float())
            scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


def _check_block_args(inputs: torch.Tensor, targets: torch.Tensor,
                      masks: Mapping[str, torch.Tensor], linears: Mapping[str, nn.Linear]) -> None:
    if inputs.shape != targets.shape or inputs.dim() != 3:
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must "
                         "both be (N, T, h) of the same shape")
    missing = sorted(set(linears) - set(masks))
    if missing:
        raise ValueError(f"no mask for the block linears {missing}; pass one bool (rows, cols) "
                         "mask per linear (True = pruned)")


def reconstruct_block(block: nn.Module, call_block_fn: Callable[[torch.Tensor], torch.Tensor],
                      inputs: torch.Tensor, targets: torch.Tensor, masks: Mapping[str, torch.Tensor],
                      linears: Mapping[str, nn.Linear],
                      options: ReconstructOptions | None = None) -> ReconstructInfo:
    """Fit MaskLoRA + the block's biases and norms to the dense block outputs, then merge.

    ``min mean ||f(X; W~) - Y||^2`` with ``W~ = M*W + s M*(B A)`` (recovery.md §3.6), where ``X``
    are the block's inputs after the already pruned (and reconstructed) blocks and ``Y`` is the
    **dense** block applied to those same inputs. The block is modified in place; afterwards it
    holds plain linears (the same objects as in ``linears``) whose pruned entries are exactly 0.

    Args:
        block: The decoder block; it is in training mode during the fit only (dropout as in
            the reference) and gets its modes back afterwards.
        call_block_fn: ``(B, T, h) -> (B, T, h)`` forward of ``block`` for any micro-batch; it
            must not disable autograd (the caller builds the block arguments).
        inputs: ``X``, ``(N, T, h)`` on any device (batches are moved to the block's).
        targets: ``Y``, ``(N, T, h)``.
        masks: ``name -> (rows, cols)`` bool, True where pruned, for every entry of ``linears``.
        linears: The block's prunable linears by relative name (``ModelAdapter.prunable_linears``).
        options: Steps, lr, rank...; defaults are the reference's.

    Returns:
        Steps, seconds, trainable count, MSE before/after (if measured), first/last loss.

    Raises:
        ValueError: Mismatched shapes or missing masks.
        RuntimeError: A pruned weight is non-zero after merging (must not happen).
    """
    options = options or ReconstructOptions()
    _check_block_args(inputs, targets, masks, linears)
    weight = next(iter(linears.values())).weight
    device, dtype = weight.device, weight.dtype
    t0 = time.perf_counter()
    info = ReconstructInfo(steps=options.steps, seconds=0.0, trainable=0)
    if options.measure:
        info.mse_before = block_mse(call_block_fn, inputs, targets, options.batch_size, device)
    with _train_mode(block), _block_adapters(block, linears, masks, options) as trainable:
        info.trainable = unique_numel(trainable)
        losses = _fit(call_block_fn, inputs, targets, list(trainable.values()), options, device, dtype)
    info.loss_first, info.loss_last = losses[0], losses[-1]
    check_zeros_kept({n: m.cpu() for n, m in masks.items()},
                     {n: (lin.weight.detach() == 0).cpu() for n, lin in linears.items()})
    if options.measure:
        info.mse_after = block_mse(call_block_fn, inputs, targets, options.batch_size, device)
    info.seconds = time.perf_counter() - t0
    return info

