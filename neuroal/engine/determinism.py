"""Process-wide settings that decide whether two engines produce the same bits (engine.md §3.5).

Every process that runs a worker applies the same settings through :func:`apply_determinism`:
the driver of the local executor (``pipeline.seed_everything``), every Ray actor and every
torch.distributed rank. With ``deterministic`` it selects deterministic kernels and cuBLAS's
fixed workspace (``CUBLAS_WORKSPACE_CONFIG``, read when cuBLAS first starts in the process;
ignored on CPU). With ``threads`` it fixes the intra-op thread count, which CPU results depend
on (BLAS and LAPACK split their sums by thread: SparseGPT's Cholesky differs in the last bits
between 1 and 2 threads).

The exact condition for bit-identical results across executors is therefore: the same config
(``engine.deterministic`` on), the same device type and dtype, and on CPU the same thread count
in every process. ``engine.threads`` guarantees the last point; without it the local driver
uses torch's default, Ray actors copy the driver's count, and torch.distributed ranks use their
launcher's ``OMP_NUM_THREADS`` (torchrun sets 1), so a dist run then matches a local run only
when the local process also runs with that many threads.
"""

from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"


def determinism_env(deterministic: bool, threads: int | None) -> dict[str, str]:
    """Environment a fresh process needs before its first kernel (Ray ``runtime_env``)."""
    env = {}
    if deterministic:
        env["CUBLAS_WORKSPACE_CONFIG"] = os.environ.get("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def apply_determinism(deterministic: bool, threads: int | None) -> None:
    """Apply the settings of the module docstring to this process (idempotent).

    Args:
        deterministic: Deterministic kernels and cuBLAS workspace (``engine.deterministic``).
        threads: Intra-op threads (``engine.threads``); None leaves the process's count.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
        torch.use_deterministic_algorithms(True, warn_only=True)
    if threads is not None:
        torch.set_num_threads(threads)
