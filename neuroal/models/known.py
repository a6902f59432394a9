"""Aliases of common large models, with their ``config.json`` shipped in the package.

An alias (``llama-2-70b``) resolves to its hub id for loading weights; its configuration is read
from ``neuroal/models/known/<alias>.json`` when the hub cannot be reached, so memory planning
(``launch/plan.py``, the pre-load check of the pipeline) works offline. The JSON files carry the
public configuration fields that shape the model (sizes, heads, vocabulary, tying, norm epsilon,
rotary settings, stored dtype).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

KNOWN_DIR = Path(__file__).resolve().parent / "known"

# alias -> (hub id, JSON file in KNOWN_DIR)
KNOWN: dict[str, tuple[str, str]] = {
    "llama-2-7b": ("meta-llama/Llama-2-7b-hf", "llama-2-7b.json"),
    "llama-2-13b": ("meta-llama/Llama-2-13b-hf", "llama-2-13b.json"),
    "llama-2-70b": ("meta-llama/Llama-2-70b-hf", "llama-2-70b.json"),
    "llama-70b": ("meta-llama/Llama-2-70b-hf", "llama-2-70b.json"),
    "llama-3-8b": ("meta-llama/Meta-Llama-3-8B", "llama-3-8b.json"),
    "llama-3-70b": ("meta-llama/Meta-Llama-3-70B", "llama-3-70b.json"),
    "llama-3.1-8b": ("meta-llama/Llama-3.1-8B", "llama-3.1-8b.json"),
    "llama-3.1-70b": ("meta-llama/Llama-3.1-70B", "llama-3.1-70b.json"),
    "mistral-7b": ("mistralai/Mistral-7B-v0.1", "mistral-7b.json"),
    "qwen2.5-7b": ("Qwen/Qwen2.5-7B", "qwen2.5-7b.json"),
    "qwen2.5-14b": ("Qwen/Qwen2.5-14B", "qwen2.5-14b.json"),
    "qwen2.5-32b": ("Qwen/Qwen2.5-32B", "qwen2.5-32b.json"),
    "qwen2.5-72b": ("Qwen/Qwen2.5-72B", "qwen2.5-72b.json"),
    "opt-13b": ("facebook/opt-13b", "opt-13b.json"),
    "opt-30b": ("facebook/opt-30b", "opt-30b.json"),
    "opt-66b": ("facebook/opt-66b", "opt-66b.json"),
    "phi-3-mini": ("microsoft/Phi-3-mini-4k-instruct", "phi-3-mini.json"),
    "llama-3.3-70b": ("meta-llama/Llama-3.3-70B-Instruct", "llama-3.3-70b.json"),
    "qwen3-8b": ("Qwen/Qwen3-8B", "qwen3-8b.json"),
    "qwen3-14b": ("Qwen/Qwen3-14B", "qwen3-14b.json"),
    "qwen3-32b": ("Qwen/Qwen3-32B", "qwen3-32b.json"),
    "qwen3-30b-a3b": ("Qwen/Qwen3-30B-A3B", "qwen3-30b-a3b.json"),
    "mixtral-8x7b": ("mistralai/Mixtral-8x7B-v0.1", "mixtral-8x7b.json"),
    "gemma-2-27b": ("google/gemma-2-27b", "gemma-2-27b.json"),
    # The hub checkpoint is multimodal (refused); the shipped file is its text model's config,
    # for planning. Prune the extracted language model (see docs/architectures.md).
    "gemma-3-27b": ("google/gemma-3-27b-pt", "gemma-3-27b.json"),
    "phi-4": ("microsoft/phi-4", "phi-4.json"),
    # Stored in FP8 with 128 x 128 block scales (de-quantized on load, neuroal.models.quant).
    "deepseek-v3": ("deepseek-ai/DeepSeek-V3", "deepseek-v3.json"),
}
MIXED_BLOCKS: frozenset[str] = frozenset({"deepseek-v3"})
"""Aliases whose blocks are not all alike (DeepSeek-V3: 3 dense blocks, then 58 MoE blocks):
the planner builds every block of their skeleton instead of repeating the first."""
# Licence of each family's weights (model cards carry it over; engine.md §9).
KNOWN_LICENSES: dict[str, str] = {
    "meta-llama/Llama-2": "llama2", "meta-llama/Meta-Llama-3": "llama3",
    "meta-llama/Llama-3.1": "llama3.1", "mistralai/": "apache-2.0", "Qwen/Qwen2.5-72B": "other",
    "Qwen/": "apache-2.0", "facebook/opt": "other", "microsoft/Phi-3": "mit",
    "meta-llama/Llama-3.3": "llama3.3", "google/gemma": "gemma", "microsoft/phi-4": "mit",
    "deepseek-ai/DeepSeek-V3": "other",
}


class UnknownModelAliasError(KeyError):
    """An alias that is not in :data:`KNOWN`; the message lists the known ones."""

    def __str__(self) -> str:
        return str(self.args[0])


def known_alias(name: str) -> str | None:
    """The alias for ``name`` (an alias or the hub id of one), or ``None``."""
    if name in KNOWN:
        return name
    return next((alias for alias, (hub, _) in KNOWN.items() if hub == name), None)


def known_license(hub_id: str) -> str | None:
    """The licence of a known hub id (longest matching prefix), or ``None``."""
    matches = [prefix for prefix in KNOWN_LICENSES if hub_id.startswith(prefix)]
    return KNOWN_LICENSES[max(matches, key=len)] if matches else None


@cache
def _known_fields(filename: str) -> dict[str, Any]:
    return json.loads((KNOWN_DIR / filename).read_text(encoding="utf-8"))


def known_config(alias: str) -> Any:
    """The shipped ``PretrainedConfig`` of ``alias`` (or of a known hub id); no network.

    Raises:
        UnknownModelAliasError: ``alias`` is not known.
    """
    from transformers import AutoConfig

    key = known_alias(alias)
    if key is None:
        raise UnknownModelAliasError(
            f"unknown model alias {alias!r}; known aliases: {', '.join(KNOWN)}")
    fields = dict(_known_fields(KNOWN[key][1]))
    model_type = fields.pop("model_type")
    config = AutoConfig.for_model(model_type, **fields)
    config.name_or_path = KNOWN[key][0]
    return config
