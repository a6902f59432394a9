"""All architecture knowledge of neuroal (style rule 2).

The adapter finds, on an HF causal-LM skeleton, the decoder blocks, the token embedding, the
modules applied after the last block (final norm, OPT's ``project_out``) and the head, the
prunable ``nn.Linear`` modules of a block, and how a block is called. Nothing else in the package
names ``layers``, ``decoder`` or a model family. Quirks are data keyed by ``model_type``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuroal.allocation.plan import ModelShape
from neuroal.models.moe import expert_consumers, with_experts


@dataclass(frozen=True)
class ArchSpec:
    """Dotted module paths of one architecture family (relative to the CausalLM model).

    ``consumers`` maps a prunable linear (relative name) to the linear of the same block whose
    input channels are indexed by its output rows (NeuroAL's row step, neuroal.md §A7); a
    producer absent from the map has no consumer inside the block (uniform rows).
    ``uniform_rows`` lists linears whose rows the reference always keeps uniform.
    """

    blocks: str
    embed: str
    final: tuple[str, ...]
    head: str = "lm_head"
    consumers: tuple[tuple[str, str], ...] = ()
    uniform_rows: tuple[str, ...] = ()
    attention: str = "self_attn"  # the block's attention module (DSnoT's ``layers: attention``)


_LLAMA_CONSUMERS = (
    ("self_attn.q_proj", "self_attn.o_proj"), ("self_attn.k_proj", "self_attn.o_proj"),
    ("self_attn.v_proj", "self_attn.o_proj"), ("self_attn.o_proj", "mlp.gate_proj"),
    ("mlp.gate_proj", "mlp.down_proj"), ("mlp.up_proj", "mlp.down_proj"),
)
_LLAMA_LIKE = ArchSpec(blocks="model.layers", embed="model.embed_tokens", final=("model.norm",),
                       consumers=_LLAMA_CONSUMERS)
ARCHS: dict[str, ArchSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": ArchSpec(blocks="model.layers", embed="model.embed_tokens", final=("model.norm",),
                        consumers=_LLAMA_CONSUMERS,
                        uniform_rows=("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "phi": ArchSpec(blocks="model.layers", embed="model.embed_tokens",
                    final=("model.final_layernorm",),
                    consumers=(("self_attn.q_proj", "self_attn.dense"),
                               ("self_attn.k_proj", "self_attn.dense"),
                               ("self_attn.v_proj", "self_attn.dense"),
                               ("self_attn.dense", "mlp.fc1"), ("mlp.fc1", "mlp.fc2"))),
    "opt": ArchSpec(blocks="model.decoder.layers", embed="model.decoder.embed_tokens",
                    final=("model.decoder.final_layer_norm", "model.decoder.project_out"),
                    consumers=(("self_attn.k_proj", "self_attn.out_proj"),
                               ("self_attn.v_proj", "self_attn.out_proj"),
                               ("self_attn.q_proj", "self_attn.out_proj"),
                               ("self_attn.out_proj", "fc1"), ("fc1", "fc2"))),
}
TESTED_ARCHS = ("llama", "mistral", "qwen2", "opt", "phi")


class AdapterError(ValueError):
    """The model's architecture cannot be handled; the message says what was expected."""


class _Block0ReachedError(Exception):
    """Private: raised by the block-0 pre-hook to stop the base model's forward."""


@dataclass
class BlockCall:
    """The arguments block 0 was called with, minus the hidden states.

    ``args`` are the positional arguments after the hidden states; ``kwargs`` the keyword ones
    (attention mask or None, position ids, rotary ``position_embeddings``, cache flags...).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]


class ModelAdapter:
    """Architecture view of one HF causal-LM instance (usually a meta-device skeleton).

    Args:
        model: A ``*ForCausalLM`` module; parameters may live on the ``meta`` device.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.config = model.config
        self.model_type: str = getattr(self.config, "model_type", "?")
        self.spec = ARCHS.get(self.model_type, _LLAMA_LIKE)
        self.blocks = self._find_blocks()
        self.head = self._module(self.spec.head, required=True)
        self.embed = self._module(self.spec.embed, required=True)
        self.final_names = tuple(n for n in self.spec.final if self._module(n) is not None)

    # ------------------------------------------------------------------ discovery

    def _module(self, path: str, required: bool = False) -> nn.Module | None:
        node: Any = self.model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if node is None and required:
            raise AdapterError(f"model_type {self.model_type!r}: no module at {path!r}; "
                               f"supported architectures: {', '.join(TESTED_ARCHS)}")
        return node

    def _find_blocks(self) -> nn.ModuleList:
        blocks = self._module(self.spec.blocks)
        wanted = set(getattr(self.model, "_no_split_modules", None) or [])
        if not isinstance(blocks, nn.ModuleList):
            blocks = next((m for m in self.model.modules() if isinstance(m, nn.ModuleList)
                           and len(m) and type(m[0]).__name__ in wanted), None)
        if blocks is None or len(blocks) == 0:
            raise AdapterError(f"model_type {self.model_type!r}: could not find the decoder "
                               f"blocks (looked at {self.spec.blocks!r} and for a list of "
                               f"{sorted(wanted)}); supported: {', '.join(TESTED_ARCHS)}")
        return blocks

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def blocks_path(self) -> str:
        for name, module in self.model.named_modules():
            if module is self.blocks:
                return name
        raise AdapterError("decoder blocks are not registered in the model")

    def block_prefix(self, index: int) -> str:
        """State-dict prefix of block ``index`` (e.g. ``model.layers.3.``)."""
        return f"{self.blocks_path}.{index}."

    def attention_linears(self, block: nn.Module) -> frozenset[str]:
        """Relative names of the block's prunable linears inside its attention module (q/k/v
        and the output projection); the MLP's sit outside."""
        prefix = self.spec.attention + "."
        return frozenset(n for n in self.prunable_linears(block) if n.startswith(prefix))

    @staticmethod
    def prunable_linears(block: nn.Module) -> dict[str, nn.Linear]:
        """The block's ``nn.Linear`` modules by relative name, in registration order; in MoE
        blocks also every expert's matrices (``mlp.experts.3.gate_proj``: an
        :class:`~neuroal.models.moe.ExpertLinear` view into the fused 3-D parameter), routers
        and shared-expert gates left out (neuroal.models.moe)."""
        return with_experts(block, {n: m for n, m in block.named_modules()
                                    if isinstance(m, nn.Linear)})

    def shape(self) -> ModelShape:
        """``(rows, cols)`` of every prunable linear of every block (works on meta), with the
        row-consumer map and attention geometry NeuroAL's row step needs."""
        cfg = self.config
        heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
        return ModelShape(
            tuple({n: (m.out_features, m.in_features) for n, m in self.prunable_linears(b).items()}
                  for b in self.blocks),
            consumers={**(dict(self.spec.consumers) if self.model_type in ARCHS else {}),
                       **{k: v for b in self.blocks for k, v in expert_consumers(b).items()}},
            uniform_rows=frozenset(self.spec.uniform_rows),
            heads=heads,
            kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
        )

    @property
    def tied(self) -> bool:
        """Whether ``lm_head`` shares the embedding matrix."""
        return bool(getattr(self.config, "tie_word_embeddings", False))

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    # ------------------------------------------------------------------ ownership

    def context_names(self) -> list[str]:
        """Small modules every worker needs to rebuild block arguments (rotary, positions).

        Children of the base model other than the blocks, the token embedding and the final
        modules (e.g. ``model.rotary_emb``, OPT's ``model.decoder.embed_positions``).
        """
        skip = {self.spec.embed, self.blocks_path, *self.final_names}
        names = []
        container = self.blocks_path.rsplit(".", 1)[0]
        parent = self._module(container, required=True)
        for child, _ in parent.named_children():
            full = f"{container}.{child}"
            if full not in skip:
                names.append(full)
        return names

    def owned_module_names(self, start: int, stop: int, first: bool, last: bool) -> list[str]:
        """Module paths a worker owning blocks ``[start, stop)`` must materialise."""
        names = [self.block_prefix(i)[:-1] for i in range(start, stop)] + self.context_names()
        if first:
            names.append(self.spec.embed)
        if last:
            names += [*self.final_names, self.spec.head]
        return names

    def checkpoint_key(self, param_name: str) -> str:
        """Checkpoint tensor that fills ``param_name`` (tied heads read the embedding)."""
        if self.tied and param_name == f"{self.spec.head}.weight":
            return f"{self.spec.embed}.weight"
        return param_name

    def export_skip(self, param_name: str) -> bool:
        """Whether a parameter is left out of the exported state dict (tied head)."""
        return self.tied and param_name == f"{self.spec.head}.weight"

    # ------------------------------------------------------------------ calls

    def base_model(self) -> nn.Module:
        return self.model.base_model

    def capture_block0(self, **inputs: Any) -> tuple[torch.Tensor, BlockCall]:
        """Run the base model until block 0 and return its hidden states and call arguments.

        Args:
            inputs: ``input_ids=(B, T)`` (first worker: real embeddings) or
                ``inputs_embeds=(B, T, h)`` (any worker: only the arguments matter).
        """
        captured: dict[str, Any] = {}

        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            if args:
                captured["hidden"], captured["args"] = args[0], tuple(args[1:])
            else:
                captured["hidden"], captured["args"] = kwargs.pop("hidden_states"), ()
            captured["kwargs"] = dict(kwargs)
            raise _Block0ReachedError

        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            self.base_model()(**inputs, use_cache=False)
        except _Block0ReachedError:
            pass
        finally:
            handle.remove()
        if "hidden" not in captured:
            raise AdapterError(f"model_type {self.model_type!r}: block 0 was never called")
        return captured["hidden"], BlockCall(captured["args"], captured["kwargs"])

    @staticmethod
    def call_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
        """Forward one block; returns the output hidden states ``(B, T, h)``."""
        out = block(hidden, *call.args, **call.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final modules then the head: ``(B, T, h) -> (B, T, vocab)``."""
        for name in self.final_names:
            hidden = self._module(name)(hidden)
        return self.head(hidden)

    def named_owned_parameters(self, module_names: list[str]) -> Iterator[tuple[str, nn.Parameter]]:
        """``(full name, parameter)`` for the given modules, tied duplicates included."""
        for mname in module_names:
            module = self._module(mname)
            if module is None:
                continue
            for pname, param in module.named_parameters(remove_duplicate=False):
                yield f"{mname}.{pname}", param
