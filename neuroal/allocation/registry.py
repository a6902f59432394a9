"""The allocation policies' registry, filled by :mod:`neuroal.allocation` (its ``__init__``).

A module of its own so that a policy can look up another by name (NeuroAL's ``base: owl |
alpha``) without importing the package's ``__init__``, which imports every policy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from neuroal.runtime.registry import Registry

if TYPE_CHECKING:  # annotations only
    from neuroal.allocation.base import AllocationPolicy

ALLOCATIONS: Registry[AllocationPolicy] = Registry("allocation")
