"""Which linears are pruned: ``targets`` and ``ignore`` patterns on module names, written as
llm-compressor writes them.

A pattern is ``re:<regex>`` (matched with :func:`re.match` from the start of the full module
name, e.g. ``re:.*layers\\.0\\.`` or ``re:.*down_proj$``), or a plain string equal to the full
module name (``model.layers.3.mlp.down_proj``) or to the module's class name (``Linear``).
A prunable linear is pruned when it matches a target (no targets: every prunable linear) and no
ignore pattern; the others stay dense.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

REGEX = "re:"


def pattern_error(pattern: object) -> str | None:
    """Why ``pattern`` is not a usable pattern, or None."""
    if not isinstance(pattern, str) or not pattern.strip():
        return f"{pattern!r}: expected a module name, a class name or 're:<regex>'"
    if pattern.startswith(REGEX):
        try:
            re.compile(pattern[len(REGEX):])
        except re.error as exc:
            return f"{pattern!r}: not a valid regular expression ({exc})"
    return None


def matches(pattern: str, name: str, class_name: str) -> bool:
    """Whether ``pattern`` selects the module ``name`` of class ``class_name``."""
    if pattern.startswith(REGEX):
        return re.match(pattern[len(REGEX):], name) is not None
    return pattern in (name, class_name)


@dataclass(frozen=True)
class LayerSelection:
    """``targets`` (empty: every prunable linear) minus ``ignore``."""

    targets: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()

    @property
    def everything(self) -> bool:
        return not self.targets and not self.ignore

    def selects(self, name: str, class_name: str = "Linear") -> bool:
        """Whether the linear ``name`` (full module name) is pruned."""
        targeted = not self.targets or any(matches(p, name, class_name) for p in self.targets)
        return targeted and not any(matches(p, name, class_name) for p in self.ignore)

    def unused(self, modules: Iterable[tuple[str, str]]) -> list[str]:
        """The patterns that match none of ``modules`` (``(full name, class name)`` pairs)."""
        modules = list(modules)
        return [p for p in (*self.targets, *self.ignore)
                if not any(matches(p, n, c) for n, c in modules)]


def selection_errors(targets: Sequence[object], ignore: Sequence[object]) -> list[str]:
    """Config errors of the two pattern lists."""
    errors = []
    for key, patterns in (("targets", targets), ("ignore", ignore)):
        if not isinstance(patterns, (list, tuple)):
            errors.append(f"{key}={patterns!r}: expected a list of patterns, e.g. "
                          "[re:.*down_proj$, model.layers.0.self_attn.q_proj]")
            continue
        errors += [f"{key}: {why}" for why in map(pattern_error, patterns) if why]
    return errors
