"""Allocation policies: how much to prune where (allocation.md)."""

from neuroal.allocation.base import AllocationPolicy, PlanRequest
from neuroal.allocation.plan import ModelShape, PlanError, SparsityPlan
from neuroal.allocation.uniform import UniformPolicy
from neuroal.registry import Registry

ALLOCATIONS: Registry[AllocationPolicy] = Registry("allocation")
ALLOCATIONS.add("uniform", UniformPolicy())

__all__ = ["ALLOCATIONS", "AllocationPolicy", "ModelShape", "PlanError", "PlanRequest",
           "SparsityPlan"]
