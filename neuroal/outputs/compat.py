"""Exports that older readers load.

transformers 5 writes the RoPE settings only as ``rope_parameters`` (``{"rope_type", "rope_theta",
"factor", ...}``); transformers 4.5x (the line many vLLM releases pin) reads the top-level
``rope_theta`` / ``rope_scaling`` keys instead and silently falls back to the default base of
10000 when they are missing. transformers 5 also saves fast tokenizers (those built from a GGUF
file included) as ``tokenizer_class: TokenizersBackend``, a class 4.5x does not have. These
pure functions add the keys older readers need to the dicts written as ``config.json`` and
``tokenizer_config.json`` without changing what the current version reads (the test compares
logits across versions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

GENERIC_TOKENIZER = "PreTrainedTokenizerFast"
"""A class every transformers release since 4.0 has; it loads ``tokenizer.json`` as is."""

NEW_ONLY_TOKENIZERS = frozenset({"TokenizersBackend"})
"""``tokenizer_class`` values written by transformers 5 that 4.5x cannot import."""


def legacy_rope_keys(rope: Any) -> dict[str, Any]:
    """``rope_theta`` and ``rope_scaling`` for a flat ``rope_parameters`` dict.

    Args:
        rope: ``config.json``'s ``rope_parameters`` (``{"rope_type": "linear", "factor": 2.0,
            "rope_theta": 50000.0}``), or something else (per-layer-type dicts, None).

    Returns:
        ``{"rope_theta": 50000.0, "rope_scaling": {"rope_type": "linear", "type": "linear",
        "factor": 2.0}}``; ``rope_scaling`` is None for the default rope type. Empty when
        ``rope`` is not a flat dict holding ``rope_theta``.
    """
    if not isinstance(rope, dict) or not isinstance(rope.get("rope_theta"), (int, float)):
        return {}
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return {"rope_theta": rope["rope_theta"], "rope_scaling": None}
    return {"rope_theta": rope["rope_theta"], "rope_scaling": {**scaling, "type": kind,
                                                              "rope_type": kind}}


def legacy_config(config: dict[str, Any]) -> dict[str, Any]:
    """``config.json`` content with the keys older readers need added (never overwritten):
    ``rope_theta`` / ``rope_scaling`` from ``rope_parameters`` and ``torch_dtype`` from
    ``dtype``. Nested text configs (``text_config``) are treated the same way."""
    out = dict(config)
    for key, value in legacy_rope_keys(out.get("rope_parameters")).items():
        if out.get(key) is None:
            out[key] = value
    if "dtype" in out and "torch_dtype" not in out:
        out["torch_dtype"] = out["dtype"]
    if isinstance(out.get("text_config"), dict):
        out["text_config"] = legacy_config(out["text_config"])
    return out


def legacy_tokenizer_config(config: dict[str, Any]) -> dict[str, Any]:
    """``tokenizer_config.json`` content whose ``tokenizer_class`` 4.5x can import."""
    out = dict(config)
    if out.get("tokenizer_class") in NEW_ONLY_TOKENIZERS:
        out["tokenizer_class"] = GENERIC_TOKENIZER
    return out


def _rewrite(path: Path, change: Any) -> None:
    if not path.is_file():
        return
    data = json.loads(path.read_text(encoding="utf-8"))
    new = change(data)
    if new != data:
        path.write_text(json.dumps(new, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def make_loadable(directory: str | Path) -> None:
    """Rewrite ``config.json`` and ``tokenizer_config.json`` of an export in place (when
    present) with :func:`legacy_config` and :func:`legacy_tokenizer_config`."""
    directory = Path(directory)
    _rewrite(directory / "config.json", legacy_config)
    _rewrite(directory / "tokenizer_config.json", legacy_tokenizer_config)
