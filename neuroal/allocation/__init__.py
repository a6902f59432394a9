"""Allocation policies: how much to prune where (allocation.md)."""

from neuroal.allocation.alpha import AlphaPolicy
from neuroal.allocation.base import AllocationPolicy, PlanRequest
from neuroal.allocation.file import FilePolicy
from neuroal.allocation.neuroal import NeuroALPolicy
from neuroal.allocation.owl import OWLPolicy
from neuroal.allocation.plan import ModelShape, PlanError, SparsityPlan
from neuroal.allocation.registry import ALLOCATIONS
from neuroal.allocation.uniform import UniformPolicy

ALLOCATIONS.add("uniform", UniformPolicy())
ALLOCATIONS.add("owl", OWLPolicy())
ALLOCATIONS.add("alpha", AlphaPolicy(), "alphapruning")
ALLOCATIONS.add("neuroal", NeuroALPolicy(), "neuronal")
ALLOCATIONS.add("file", FilePolicy(), "plan")

__all__ = ["ALLOCATIONS", "AllocationPolicy", "ModelShape", "PlanError", "PlanRequest",
           "SparsityPlan"]
