"""All architecture knowledge of neuroal (style rule 2).

The adapter finds, on an HF causal-LM skeleton, the decoder blocks, the token embedding, the
modules applied after the last block (final norm, OPT's ``project_out``) and the head, the
prunable ``nn.Linear`` modules of a block, and how a block is called. Nothing else in the package
names ``layers``, ``decoder`` or a model family. Every path is discovered on the skeleton (issue
13); the few facts discovery cannot see are overrides keyed by ``model_type``
(:data:`OVERRIDES`); NeuroAL's row-step map is derived by :mod:`neuroal.models.consumers`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from neuroal.allocation.plan import ModelShape
from neuroal.models.consumers import ConsumerMap, derive_consumer_map
from neuroal.models.moe import expert_consumers, with_experts
from neuroal.models.selection import LayerSelection
from neuroal.models.sharing import Groups, derive_input_groups
from neuroal.runtime.errors import AdapterError


@dataclass(frozen=True)
class ArchSpec:
    """Dotted module paths of one model (relative to the CausalLM model), as resolved.

    Every field is found by discovery (:meth:`ModelAdapter._discover`); an :class:`ArchOverride`
    replaces a field where discovery needs help. ``consumers`` stays empty here: the map of a
    prunable linear to the linear whose input channels its output rows index (NeuroAL's row
    step, neuroal.md §A7) is derived on demand (:meth:`ModelAdapter.consumer_map`, in
    :meth:`ModelAdapter.shape`). ``uniform_rows`` lists linears whose rows the reference always
    keeps uniform.
    """

    blocks: str
    embed: str
    final: tuple[str, ...]
    head: str = "lm_head"
    consumers: tuple[tuple[str, str], ...] = ()
    uniform_rows: tuple[str, ...] = ()
    attention: str = "self_attn"  # the block's attention module (DSnoT's ``layers: attention``)


@dataclass(frozen=True)
class ArchOverride:
    """What discovery cannot see, keyed by ``model_type`` (None: keep what was discovered).

    ``final`` replaces the discovered final modules (e.g. OPT's ``project_out``, which is a
    linear, not a norm, applied after the final norm); ``uniform_rows`` is the reference's
    Mistral q/k/v rule (neuroal.md §A7).
    """

    final: tuple[str, ...] | None = None
    uniform_rows: tuple[str, ...] = ()


OVERRIDES: dict[str, ArchOverride] = {
    "mistral": ArchOverride(uniform_rows=("self_attn.q_proj", "self_attn.k_proj",
                                          "self_attn.v_proj")),
    "opt": ArchOverride(final=("model.decoder.final_layer_norm", "model.decoder.project_out")),
}
TESTED_ARCHS = ("llama", "mistral", "qwen2", "opt", "phi", "gpt_neox", "qwen3", "gemma2",
                "gemma3_text", "phi3", "gptj", "falcon")
"""Families with a tiny random-model test of discovery, pruning, export and NeuroAL."""
_NOT_TEXT_DECODER_FIELDS = ("vision_config", "audio_config", "vision_tower", "speech_config")


def check_text_decoder(config: Any, name: str) -> None:
    """Refuse, before anything is built, models that are not text-only decoders.

    Vision-language models (a ``vision_config`` or similar beside the text model) and
    encoder-decoders (``is_encoder_decoder``) have more than one block stack and inputs other
    than token ids; neuroal prunes one decoder stack driven by token ids.

    Raises:
        AdapterError: naming the model type, what was found and what to pass instead.
    """
    model_type = getattr(config, "model_type", "?")
    if getattr(config, "is_encoder_decoder", False):
        raise AdapterError(
            f"model {name!r} (model_type {model_type!r}) is an encoder-decoder model "
            "(is_encoder_decoder=true); neuroal prunes decoder-only causal language models "
            f"(tested: {', '.join(TESTED_ARCHS)})")
    found = [f for f in _NOT_TEXT_DECODER_FIELDS if getattr(config, f, None) is not None]
    if found:
        text = getattr(config, "text_config", None)
        hint = (f"; save its language model alone (model_type "
                f"{getattr(text, 'model_type', '?')!r}, e.g. with save_pretrained) and pass that "
                "directory") if text is not None else ""
        raise AdapterError(
            f"model {name!r} (model_type {model_type!r}) is a vision/audio-language model (its "
            f"config has {', '.join(found)}); neuroal prunes text-only decoder LMs{hint}")


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
        selection: Which prunable linears are pruned (``targets`` / ``ignore``); the others
            are not prunable for this adapter: absent from :meth:`prunable_linears` (called on
            the instance) and from :meth:`shape`, so they stay dense everywhere.
    """

    def __init__(self, model: nn.Module, selection: LayerSelection | None = None) -> None:
        self.model = model
        self.config = model.config
        self.model_type: str = getattr(self.config, "model_type", "?")
        self.blocks = self._find_blocks()
        self.spec = self._discover()
        self.head = self._module(self.spec.head, required=True)
        self.embed = self._module(self.spec.embed, required=True)
        self.final_names = tuple(n for n in self.spec.final if self._module(n) is not None)
        self.selection = selection or LayerSelection()
        if not self.selection.everything:
            # calls on this instance see only the selected linears; the class's static
            # method (every prunable linear of a block) stays available as ModelAdapter.all_linears
            self.prunable_linears = self._selected_linears  # type: ignore[method-assign]

    # ------------------------------------------------------------------ discovery

    def _module(self, path: str, required: bool = False) -> nn.Module | None:
        node: Any = self.model
        for part in path.split("."):
            node = getattr(node, part, None)
            if node is None:
                break
        if node is None and required:
            raise AdapterError(f"model_type {self.model_type!r}: no module at {path!r}; "
                               f"tested architectures: {', '.join(TESTED_ARCHS)}")
        return node

    def _name_of(self, module: nn.Module | None, what: str) -> str:
        """Dotted path of ``module`` inside the model, or an error naming ``what`` is missing."""
        for name, candidate in self.model.named_modules():
            if module is not None and candidate is module:
                return name
        raise AdapterError(f"model_type {self.model_type!r}: could not find the {what}; "
                           f"tested architectures: {', '.join(TESTED_ARCHS)}")

    def _find_blocks(self) -> nn.ModuleList:
        """The decoder block list: the ``ModuleList`` of a ``_no_split_modules`` class, else the
        longest ``ModuleList`` of one repeated class (llm-compressor's rule, style.md §1)."""
        wanted = set(getattr(self.model, "_no_split_modules", None) or [])
        lists = [m for m in self.model.modules() if isinstance(m, nn.ModuleList) and len(m)]
        tagged = [m for m in lists if type(m[0]).__name__ in wanted]
        repeated = [m for m in lists if len({type(x) for x in m}) == 1]
        pool = tagged or repeated
        if not pool:
            raise AdapterError(f"model_type {self.model_type!r}: could not find the decoder "
                               f"blocks (no ModuleList of {sorted(wanted)} nor of one repeated "
                               f"class); tested architectures: {', '.join(TESTED_ARCHS)}")
        return max(pool, key=len)

    def _discover(self) -> ArchSpec:
        """Resolve every path from the skeleton; :data:`OVERRIDES` only where discovery cannot."""
        override = OVERRIDES.get(self.model_type, ArchOverride())
        blocks = self._name_of(self.blocks, "decoder blocks")
        container = blocks.rsplit(".", 1)[0] if "." in blocks else ""
        embed = self._name_of(self.model.get_input_embeddings(), "token embedding")
        head = self._name_of(self.model.get_output_embeddings(), "output head")
        final = override.final if override.final is not None else self._final_norms(container)
        return ArchSpec(blocks=blocks, embed=embed, final=final, head=head,
                        uniform_rows=override.uniform_rows, attention=self._attention_name())

    def _final_norms(self, container: str) -> tuple[str, ...]:
        """Norm modules beside the blocks (``model.norm``, ``transformer.ln_f``...): applied to
        the last block's output before the head."""
        parent = self.model.get_submodule(container) if container else self.model
        prefix = f"{container}." if container else ""
        return tuple(prefix + name for name, child in parent.named_children()
                     if "norm" in type(child).__name__.lower() or name.startswith("ln_f"))

    def _attention_name(self) -> str:
        """The block child whose class is an attention module (``self_attn``, ``attn``...)."""
        for name, child in self.blocks[0].named_children():
            if "attention" in type(child).__name__.lower():
                return name
        return "self_attn"

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
        and shared-expert gates left out (neuroal.models.moe). On an adapter with a layer
        selection, only the selected ones (see ``__init__``)."""
        return with_experts(block, {n: m for n, m in block.named_modules()
                                    if isinstance(m, nn.Linear)})

    all_linears = prunable_linears

    def _selected_linears(self, block: nn.Module) -> dict[str, nn.Linear]:
        """The selected prunable linears of ``block`` (one of this adapter's blocks)."""
        index = next(i for i, b in enumerate(self.blocks) if b is block)  # the live list
        prefix = self.block_prefix(index)
        return {n: m for n, m in ModelAdapter.all_linears(block).items()
                if self.selection.selects(prefix + n, type(m).__name__)}

    def selection_report(self) -> dict[str, Any]:
        """The layer selection as ``report.json`` records it: the patterns, every linear kept
        dense (full name -> weights), their total, the patterns that matched nothing."""
        ignored: dict[str, int] = {}
        modules = []
        for i, block in enumerate(self.blocks):
            prefix = self.block_prefix(i)
            kept = self.prunable_linears(block)
            for name, lin in ModelAdapter.all_linears(block).items():
                modules.append((prefix + name, type(lin).__name__))
                if name not in kept:
                    ignored[prefix + name] = lin.out_features * lin.in_features
        return {"targets": list(self.selection.targets), "ignore": list(self.selection.ignore),
                "ignored": ignored, "ignored_numel": sum(ignored.values()),
                "unused_patterns": self.selection.unused(modules)}

    def all_linears_numel(self) -> int:
        """Weights of every prunable linear of every block, selected or not."""
        return sum(m.out_features * m.in_features for b in self.blocks
                   for m in ModelAdapter.all_linears(b).values())

    def consumer_map(self) -> ConsumerMap:
        """The derived producer -> consumer map of this architecture (cached per structure)."""
        return derive_consumer_map(self.config, type(self))

    def input_groups(self) -> Groups:
        """Linears of a block fed the very same input tensor (q/k/v, gate/up), derived on a
        tiny twin (cached per structure): the statistics they share (memory planning)."""
        return derive_input_groups(self.config, type(self))

    def shape(self, row_map: bool = True) -> ModelShape:
        """``(rows, cols)`` of every prunable linear of every block (works on meta), with the
        row-consumer map and attention geometry NeuroAL's row step needs.

        Args:
            row_map: Derive the row-step map (a probe on a tiny twin, cached per structure);
                False leaves it empty (memory planning needs only the sizes).
        """
        cfg = self.config
        heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
        blocks = tuple({n: (m.out_features, m.in_features)
                        for n, m in self.prunable_linears(b).items()} for b in self.blocks)
        cmap = self.consumer_map().checked(blocks) if row_map else ConsumerMap()
        consumers = {**dict(cmap.consumers),
                     **{k: v for b in self.blocks for k, v in expert_consumers(b).items()
                        if all(k in blk and v in blk for blk in blocks if k in blk)}}
        return ModelShape(
            blocks,
            consumers=consumers,
            uniform_rows=frozenset(self.spec.uniform_rows),
            heads=heads,
            kv_heads=int(getattr(cfg, "num_key_value_heads", None) or heads),
            row_tiles=dict(cmap.tiles),
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

    def stored_key(self, param_name: str, stored: set[str]) -> str:
        """Checkpoint tensor that fills ``param_name`` in a checkpoint holding ``stored``: the
        :meth:`checkpoint_key`, or its name in transformers' older layout where the class
        renamed a module on load (GPT-NeoX's ``embed_out`` is ``lm_head`` now)."""
        keys = self.checkpoint_keys(param_name)
        return next((k for k in keys if k in stored), keys[0])

    def checkpoint_keys(self, param_name: str) -> tuple[str, ...]:
        """:meth:`checkpoint_key`, then its older-layout name if transformers renamed it."""
        key = self.checkpoint_key(param_name)
        legacy = self._legacy_renamer()(key)
        return (key,) if legacy == key else (key, legacy)

    def _legacy_renamer(self) -> Any:
        """Model -> checkpoint name map of transformers' own renamings (identity if none)."""
        if not hasattr(self, "_renamer"):
            try:
                from transformers.conversion_mapping import get_model_conversion_mapping
                from transformers.core_model_loading import (
                    PrefixChange,
                    WeightRenaming,
                    apply_renamings,
                )

                found = get_model_conversion_mapping(self.model, add_legacy=False)
                back = [c.reverse_transform() for c in found[::-1]
                        if isinstance(c, WeightRenaming) and not isinstance(c, PrefixChange)]
                self._renamer = lambda key: apply_renamings(key, back)
            except (ImportError, AttributeError, TypeError):  # other transformers versions
                self._renamer = lambda key: key
        return self._renamer

    def export_skip(self, param_name: str) -> bool:
        """Whether a parameter is left out of the exported state dict (tied head)."""
        return self.tied and param_name == f"{self.spec.head}.weight"

    # ------------------------------------------------------------------ calls

    def base_model(self) -> nn.Module:
        return self.model.base_model

    def layer_type(self, index: int) -> str | None:
        """Attention type of block ``index`` (``config.layer_types``: sliding or full attention,
        e.g. Gemma-2/3, Qwen2/3), or None when all blocks are called alike."""
        types = getattr(self.config, "layer_types", None)
        if isinstance(types, (list, tuple)) and index < len(types) and len(set(types)) > 1:
            return str(types[index])
        return None

    def capture_block0(self, layer_type: str | None = None,
                       **inputs: Any) -> tuple[torch.Tensor, BlockCall]:
        """Run the base model until block 0 and return its hidden states and call arguments.

        Args:
            layer_type: Capture the arguments of a block of this attention type (its mask and
                rotary embedding; see :meth:`layer_type`) instead of block 0's own type.
            inputs: ``input_ids=(B, T)`` (first worker: real embeddings) or
                ``inputs_embeds=(B, T, h)`` (any worker: only the arguments matter).
        """
        if layer_type is not None:
            with self._as_layer_type(layer_type):
                return self.capture_block0(**inputs)
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

    @contextmanager
    def _as_layer_type(self, layer_type: str) -> Iterator[None]:
        """Every block reads as ``layer_type`` while the base model builds its arguments."""
        saved = self.config.layer_types
        self.config.layer_types = [layer_type] * len(saved)
        try:
            yield
        finally:
            self.config.layer_types = saved

    @staticmethod
    def call_block(block: nn.Module, hidden: torch.Tensor, call: BlockCall) -> torch.Tensor:
        """Forward one block; returns the output hidden states ``(B, T, h)``."""
        out = block(hidden, *call.args, **call.kwargs)
        return out[0] if isinstance(out, (tuple, list)) else out

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final modules then the head: ``(B, T, h) -> (B, T, vocab)``."""
        for name in self.final_names:
            hidden = self._module(name)(hidden)
        logits = self.head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:  # Gemma-2: tanh soft-capping of the logits, applied by the CausalLM forward
            logits = torch.tanh(logits / cap) * cap
        return logits

    def named_owned_parameters(self, module_names: list[str]) -> Iterator[tuple[str, nn.Parameter]]:
        """``(full name, parameter)`` for the given modules, tied duplicates included."""
        for mname in module_names:
            module = self._module(mname)
            if module is None:
                continue
            for pname, param in module.named_parameters(remove_duplicate=False):
                yield f"{mname}.{pname}", param
