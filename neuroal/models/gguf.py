"""Lazy, per-tensor reading of GGUF checkpoints (engine.md §2.1).

A worker that owns decoder blocks ``[a, b)`` must de-quantise only the tensors of those blocks.
:class:`GGUFCheckpoint` opens the file memory-mapped with :class:`gguf.GGUFReader` (reading the
header and tensor directory only), maps GGUF tensor names such as ``blk.3.attn_q.weight`` to
Hugging Face state-dict names such as ``model.layers.3.self_attn.q_proj.weight``, and
de-quantises a tensor only when :meth:`GGUFCheckpoint.load` asks for it.

No architecture rule is written here. Both the name map and the per-architecture value fixes
(for Llama, the reverse of the q/k row permutation llama.cpp applies) come from transformers'
own GGUF loader, ``transformers.modeling_gguf_pytorch_utils``: ``get_gguf_hf_weights_map`` and
the ``TENSOR_PROCESSORS`` table. Each tensor goes through the same steps in the same order as in
``load_gguf_checkpoint``: ``gguf.quants.dequantize`` to a float32 numpy array, the processor,
``torch.from_numpy``, then one cast to the requested dtype. The result therefore equals
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)`` bit for bit.

Caveats:
    * These are transformers internals (checked with transformers 5.23 and gguf 0.19). If a
      release moves them, the import fails loudly rather than silently mapping wrong.
    * Architectures that transformers loads through its newer packed GGUF path
      (``transformers.integrations.gguf``, e.g. ``qwen35`` and ``lfm2``) use other kernels and
      conversions and are refused with ``NotImplementedError``.
    * Processors that fuse several GGUF tensors into one parameter by writing into a shared
      dictionary (some MoE experts) have GGUF names missing from the name map; such tensors are
      not offered by :meth:`GGUFCheckpoint.hf_names` (a log line names them).
    * Tied embeddings: files of tied models hold no ``output.weight``, so ``lm_head.weight`` is
      not in :meth:`GGUFCheckpoint.hf_names`; the caller loads the embedding for it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from neuroal.runtime.logging import get_logger

if TYPE_CHECKING:
    from gguf import GGUFReader
    from transformers import PretrainedConfig

logger = get_logger(__name__)

__all__ = ["GGUFCheckpoint", "load_gguf_config"]


def load_gguf_config(path: str | os.PathLike) -> PretrainedConfig:
    """Build a model config from a GGUF file's metadata, as transformers does.

    Args:
        path: The ``.gguf`` file.

    Returns:
        The config that ``AutoConfig.from_pretrained(folder, gguf_file=name)`` returns.
    """
    from transformers import AutoConfig

    path = Path(path)
    return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)


def _meta_skeleton(config: PretrainedConfig) -> torch.nn.Module:
    """A causal-LM built on the ``meta`` device: parameter names, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _architecture(reader: GGUFReader) -> str:
    field = reader.fields.get("general.architecture")
    if field is None:
        raise ValueError("the GGUF file has no 'general.architecture' metadata; not a model file?")
    return field.contents()


def _refuse_packed_path(architecture: str) -> None:
    """Refuse architectures that transformers does not load through its legacy GGUF loader."""
    try:
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
    except ImportError:  # older transformers: every GGUF goes through the legacy loader
        return
    if is_gguf_arch_supported(architecture):
        raise NotImplementedError(
            f"GGUF architecture {architecture!r} is loaded by transformers' packed GGUF path "
            "(transformers.integrations.gguf), whose conversions GGUFCheckpoint does not "
            "reproduce; convert the checkpoint to safetensors instead."
        )


_NAME_MAP_LOCK = threading.Lock()


@contextlib.contextmanager
def _memoised_tensor_name_map() -> Iterator[None]:
    """Build gguf's tensor-name table once per (architecture, block count) inside the block.

    transformers' ``get_gguf_hf_weights_map`` recurses into every submodule and rebuilds the
    whole table (all blocks) at each one: about 400 rebuilds and 7 s for a 30-block model,
    growing with the square of the depth. The table is read-only, so sharing it changes nothing
    but the time. transformers looks the function up on the ``gguf`` module at call time.
    """
    import gguf  # read on first use: importing neuroal (the engine, on a GPU image) needs no gguf

    with _NAME_MAP_LOCK:
        original = gguf.get_tensor_name_map
        cache: dict[tuple[object, int], gguf.TensorNameMap] = {}

        def cached(arch: gguf.MODEL_ARCH, n_blocks: int) -> gguf.TensorNameMap:
            if (arch, n_blocks) not in cache:
                cache[arch, n_blocks] = original(arch, n_blocks)
            return cache[arch, n_blocks]

        gguf.get_tensor_name_map = cached
        try:
            yield
        finally:
            gguf.get_tensor_name_map = original


class GGUFCheckpoint:
    """A GGUF file read tensor by tensor, under Hugging Face state-dict names.

    Opening reads the metadata and the tensor directory only (the data section is
    memory-mapped). Nothing is de-quantised before :meth:`load`.

    Args:
        path: The ``.gguf`` file.
        config: The model's config, e.g. from :func:`load_gguf_config`. Its head counts feed the
            architecture's tensor processor (the Llama q/k reverse permutation).
        model: Optional module whose ``state_dict`` names define the HF side of the name map,
            normally the caller's ``meta`` skeleton. Default: ``AutoModelForCausalLM`` built
            from ``config`` on ``meta``, the class ``from_pretrained`` would build.

    Example:
        >>> ckpt = GGUFCheckpoint(path, load_gguf_config(path))
        >>> ckpt.load(["model.layers.0.self_attn.q_proj.weight"], torch.float32)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        config: PretrainedConfig,
        *,
        model: torch.nn.Module | None = None,
    ) -> None:
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            TensorProcessor,
            get_gguf_hf_weights_map,
        )

        self.path = Path(path)
        self._reader = GGUFReader(self.path, "r")
        self.architecture = _architecture(self._reader)
        _refuse_packed_path(self.architecture)
        self._tensors = {tensor.name: tensor for tensor in self._reader.tensors}

        # transformers picks the processor by the file's architecture and hands it a config
        # dict; the Llama one reads `num_attention_heads` / `num_key_value_heads` from it.
        processor_class = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)
        self._processor = processor_class(config=config.to_dict())
        skeleton = model if model is not None else _meta_skeleton(config)
        # GGUF name -> HF name, over every parameter of the skeleton (also those not in the file).
        with _memoised_tensor_name_map():
            self._key_map: dict[str, str] = get_gguf_hf_weights_map(skeleton, self._processor)

        self._sources: dict[str, list[str]] = {}  # HF name -> GGUF names, in file order
        unmapped = []
        for gguf_name in self._tensors:
            hf_name = self._key_map.get(gguf_name)
            if hf_name is None:
                unmapped.append(gguf_name)
            else:
                self._sources.setdefault(hf_name, []).append(gguf_name)
        if unmapped:
            logger.info("%d GGUF tensors have no HF name and are ignored (as transformers "
                        "does): %s", len(unmapped), ", ".join(unmapped[:5]))
        logger.debug("opened %s: architecture %s, %d tensors", self.path, self.architecture,
                     len(self._tensors))

    def hf_names(self) -> list[str]:
        """HF state-dict names of the tensors this file holds, in file order."""
        return list(self._sources)

    def names(self) -> set[str]:
        """The same names as a set (the ``Checkpoint`` protocol of ``neuroal.models.loading``)."""
        return set(self._sources)

    def load(
        self,
        names: Iterable[str],
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ) -> dict[str, torch.Tensor]:
        """De-quantise the named tensors, and only those.

        Each tensor is de-quantised to float32, fixed by the architecture's processor (e.g. the
        Llama q/k reverse permutation), cast to ``dtype`` on the host, then moved to ``device``.

        Args:
            names: HF state-dict names, a subset of :meth:`hf_names`.
            dtype: Floating dtype of the returned tensors.
            device: Where the returned tensors live.

        Returns:
            ``{name: tensor}`` in the order of ``names``; shapes as in the HF model, e.g.
            ``(out_features, in_features)`` for a linear weight and ``(hidden,)`` for a norm.

        Raises:
            KeyError: Some names are not in the file (the message names them and a few
                available ones).
        """
        names = list(dict.fromkeys(names))
        unknown = [name for name in names if name not in self._sources]
        if unknown:
            available = self.hf_names()
            raise KeyError(
                f"{len(unknown)} tensor(s) not in {self.path.name}: {unknown[:5]}; "
                f"available ({len(available)}) include {available[:3] + available[-2:]}"
            )

        from gguf import quants as gguf_quants

        # Processors may write fused tensors here themselves, as in transformers' loader.
        parsed: dict[str, dict[str, torch.Tensor]] = {"tensors": {}}
        for name in names:
            for gguf_name in self._sources[name]:
                tensor = self._tensors[gguf_name]
                weights = gguf_quants.dequantize(tensor.data, tensor.tensor_type)
                result = self._processor.process(weights=weights, name=gguf_name,
                                                 tensor_key_mapping=self._key_map,
                                                 parsed_parameters=parsed)
                if result.name in self._key_map:
                    parsed["tensors"][self._key_map[result.name]] = _to_torch(result.weights)

        missing = [name for name in names if name not in parsed["tensors"]]
        if missing:
            raise RuntimeError(f"the {self.architecture!r} tensor processor produced no tensor "
                               f"for {missing[:5]}")
        # Cast on the host first (transformers' order), then move: identical bits on any device.
        return {name: parsed["tensors"][name].to(dtype).to(device) for name in names}


def _to_torch(weights: np.ndarray) -> torch.Tensor:
    """A float32 numpy result as a torch tensor; copies views of the read-only file map."""
    if not weights.flags.writeable or not weights.flags.c_contiguous:
        weights = np.array(weights, copy=True, order="C")
    return torch.from_numpy(weights)
