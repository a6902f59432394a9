"""Reuse a plan written by an earlier run (``allocation: {name: file, path: <dir>}``).

A NeuroAL search costs far more than the prune it decides, and its result does not depend on
what runs after the masks: search once, then prune with the same ratios under other recovery
steps, export dtypes or engines. The earlier run's output directory (or any directory) holds
``plan.json`` and, for row-wise plans, ``plan.safetensors`` (:meth:`SparsityPlan.save`).

The plan must have been made for the same target sparsity and pattern; the pipeline validates
its linear names, row counts and ratios against the model like any other plan.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from neuroal.allocation.base import PlanRequest, option_errors
from neuroal.allocation.plan import SparsityPlan

FILE_RULES = {"path": (lambda v: isinstance(v, str) and bool(v),
                       "the directory of an earlier run's plan.json (its output directory)")}


def _plan_file(path: str) -> Path:
    """``path``/plan.json, or ``path`` itself when it names the file."""
    p = Path(path).expanduser()
    return p if p.name == "plan.json" else p / "plan.json"


class FilePolicy:
    """The plan stored by an earlier run, unchanged (trail and policy kept as its source)."""

    name = "file"
    needs = "nothing"
    defaults: Mapping[str, Any] = {"path": None}
    nm_compatible = True

    def validate(self, cfg: Any) -> list[str]:
        """Before loading anything: the option, the file, and the plan's target and pattern."""
        options = cfg.allocation.options
        errors = option_errors(self.name, options, FILE_RULES)
        if errors:
            return errors
        if "path" not in options:
            return ["allocation 'file' needs allocation.path: the output directory of the run "
                    "whose plan to reuse (it holds plan.json)"]
        source = _plan_file(options["path"])
        try:
            data = json.loads(source.read_text())
        except (OSError, ValueError) as exc:
            return [f"allocation.path={options['path']!r}: cannot read {source} ({exc}); give "
                    "the output directory of an earlier run, which holds plan.json"]
        want = (float(cfg.target_sparsity), cfg.pattern)
        have = (float(data.get("target", -1.0)), data.get("pattern"))
        if abs(want[0] - have[0]) > 1e-9 or want[1] != have[1]:
            return [f"allocation.path={options['path']!r}: that plan targets sparsity {have[0]} "
                    f"with pattern {have[1]!r}, this run asks for {want[0]} with {want[1]!r}; "
                    "reuse a plan made for the same target, or set --sparsity / --pattern to "
                    "match it"]
        return []

    def plan(self, request: PlanRequest) -> SparsityPlan:
        source = _plan_file(str(request.options["path"]))
        loaded = SparsityPlan.load(source.parent)
        policy = {"name": self.name, "path": str(source.resolve()), "source": loaded.policy}
        if "mask_group" in loaded.policy:  # the mask rule the plan was searched with (NeuroAL)
            policy["mask_group"] = loaded.policy["mask_group"]
        return SparsityPlan(target=request.target, pattern=request.pattern, ratios=loaded.ratios,
                            policy=policy, trail={}, warnings=list(loaded.warnings))
