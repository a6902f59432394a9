"""Module paths that moved when the package was grouped by concern, kept importable for one
release with a :class:`DeprecationWarning`.

:data:`MOVED` maps every old dotted path to its new home. :func:`install` puts a finder on
``sys.meta_path`` (``import neuroal`` does it) so that ``import neuroal.safety`` or
``from neuroal.schema import PruneConfig`` still work: the old name becomes an alias of the
new module object (one module, two names), and the warning names the path to use instead.
Packages that took over a module's name (``neuroal.config``, ``neuroal.runtime``,
``neuroal.capture``, ``neuroal.evaluation``) forward the old module's attributes through
:func:`forward`. Standard library only: this module sits on the lowest floor.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Any

MOVED: dict[str, str] = {
    "neuroal.errors": "neuroal.runtime.errors",
    "neuroal.logging": "neuroal.runtime.logging",
    "neuroal.progress": "neuroal.runtime.progress",
    "neuroal.registry": "neuroal.runtime.registry",
    "neuroal.jobs": "neuroal.runtime.jobs",
    "neuroal.digests": "neuroal.runtime.digests",
    "neuroal.schema": "neuroal.config.schema",
    "neuroal.inputs": "neuroal.config.inputs",
    "neuroal.recipes": "neuroal.config.recipes",
    "neuroal.capture_moe": "neuroal.capture.moe",
    "neuroal.masking": "neuroal.criteria.masking",
    "neuroal.search": "neuroal.allocation.search",
    "neuroal.export": "neuroal.outputs.export",
    "neuroal.checkpoint": "neuroal.outputs.checkpoint",
    "neuroal.safety": "neuroal.outputs.safety",
    "neuroal.card": "neuroal.outputs.card",
    "neuroal.hub": "neuroal.outputs.hub",
    "neuroal.compat": "neuroal.outputs.compat",
    "neuroal.plots": "neuroal.outputs.plots",
    "neuroal.guard": "neuroal.outputs.guard",
    "neuroal.resume_key": "neuroal.outputs.resume_key",
    "neuroal.exits": "neuroal.commands.exits",
    "neuroal.zeroshot": "neuroal.evaluation.zeroshot",
    "neuroal.tasks": "neuroal.evaluation.tasks",
    "neuroal.tasks.local_json": "neuroal.evaluation.tasks.local_json",
    "neuroal.planner": "neuroal.planning",
    "neuroal.plan_time": "neuroal.planning.walltime",
}
"""Old dotted module path -> new one (removed in the release after next)."""


def _warn(old: str, new: str) -> None:
    warnings.warn(f"{old} moved to {new}; import it from there ({old} stops working in the "
                  f"next release)", DeprecationWarning, stacklevel=3)


class _Alias(importlib.abc.Loader):
    """Loads an old path as the module object of its new path."""

    def __init__(self, new: str) -> None:
        self.new = new

    def create_module(self, spec: Any) -> Any:
        _warn(spec.name, self.new)
        return importlib.import_module(self.new)

    def exec_module(self, module: Any) -> None:
        """Nothing to run: the new module is already executed."""


class _MovedFinder(importlib.abc.MetaPathFinder):
    """Finds the old paths of :data:`MOVED`, first: a stale copy of an old module left on the path
    (an older install, an editable checkout elsewhere) must not shadow the alias."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: Any = None) -> Any:
        new = MOVED.get(fullname)
        if new is None:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(new))


def install() -> None:
    """Put the finder of old paths on ``sys.meta_path`` once."""
    if not any(isinstance(f, _MovedFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedFinder())


def forward(package: str, target: str, warn: bool) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that answers names of ``target`` (the module
    that held them before ``package`` became a package), warning when ``warn``."""

    def __getattr__(name: str) -> Any:  # noqa: N807  (a module __getattr__, PEP 562)
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(importlib.import_module(target), name, _MISSING)
        if value is _MISSING:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        if warn:
            _warn(f"{package}.{name}", f"{target}.{name}")
        sys.modules[package].__dict__[name] = value  # answered once: no second warning
        return value

    return __getattr__


_MISSING = object()
