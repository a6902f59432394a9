"""Deterministic kernels and thread counts (engine.md §3.5): see :mod:`neuroal.runtime.process`, where
the settings live (a leaf module, so that every process applies them without importing the
engine); re-exported here under their historical names."""

from neuroal.runtime.process import CUBLAS_WORKSPACE, apply_determinism, determinism_env  # noqa: F401
