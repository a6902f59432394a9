"""Process-level runtime helpers: seeds, deterministic kernels, devices, tokenizer, timings.

Leaf module (no higher neuroal import): the pipeline, every executor's processes (driver, Ray
actors, torch.distributed ranks) and the ``launch/`` tools apply the same settings through
these functions.

Determinism (engine.md §3.5). Every process that runs a worker applies the same settings through
:func:`apply_determinism`: the driver of the local executor (:func:`seed_everything`), every Ray
actor and every torch.distributed rank. With ``deterministic`` it selects deterministic kernels and cuBLAS's
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
import random
import resource
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from neuroal.runtime.errors import ConfigError, ModelSourceError

if TYPE_CHECKING:  # annotations only
    from neuroal.models.loading import ModelSource

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


def seed_everything(seed: int, deterministic: bool, threads: int | None = None) -> None:
    """Seeds of the protocol (specs README), deterministic kernels and the thread count
    (engine.md §3.5; the same settings every executor's processes apply, see
    :func:`apply_determinism`)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover - numpy ships with torch wheels
        pass
    apply_determinism(deterministic, threads)


def pick_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device if present, else CPU; otherwise validated as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError([f"engine.device={name!r}: {exc}; expected cpu, cuda, cuda:N or auto"]) from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError([f"engine.device={name!r} but no CUDA device is available; use "
                           "--device cpu"])
    return device


def load_tokenizer(source: ModelSource, trust_remote_code: bool,
                   override: str | None = None) -> Any:
    """The model's tokenizer (directory, hub or GGUF file), or ``model.tokenizer`` if set."""
    from transformers import AutoTokenizer  # lazy: transformers takes seconds to import

    trust_remote_code = trust_remote_code is True  # never a truthy string such as "false"
    if override:
        return AutoTokenizer.from_pretrained(override, trust_remote_code=trust_remote_code)
    try:
        return AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code,
                                             **source.hf_kwargs())
    except (OSError, ValueError, KeyError) as exc:
        raise ModelSourceError(
            f"model {source.name!r}: no usable tokenizer ({exc}); set model.tokenizer=<dir or "
            "hub id> to use another one") from exc


CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_ROOT = Path("/proc")
_NO_LIMIT = 1 << 60  # cgroup v1 writes "no limit" as a huge page-aligned number


def _read_int(path: Path) -> int | None:
    """An integer file (``max``, a missing or unreadable file: None)."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _stat_value(path: Path, key: str) -> int:
    """One ``key value`` line of a cgroup ``memory.stat`` file (0 when absent)."""
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def _cgroup_dirs(mount: Path, relative: str) -> list[Path]:
    """The process's cgroup directory under ``mount`` and its ancestors up to ``mount`` (the
    path of ``/proc/self/cgroup`` is missing inside a container that mounts its own cgroup as
    the root: then only ``mount``)."""
    leaf = mount / relative.strip("/")
    if not leaf.is_dir():
        return [mount]
    return [leaf, *(p for p in leaf.parents if p == mount or mount in p.parents)]


def cgroup_available(root: Path = CGROUP_ROOT, proc: Path = PROC_ROOT) -> int | None:
    """Bytes this process's cgroup may still allocate, or None without a memory limit.

    cgroup v2 (``0::<path>`` in ``/proc/self/cgroup``): ``memory.max`` - ``memory.current``;
    v1 (``N:memory:<path>``): ``memory.limit_in_bytes`` - ``memory.usage_in_bytes``. Reclaimable
    page cache (``inactive_file`` of ``memory.stat``) counts as available, as the kernel frees
    it before killing; every ancestor's limit applies, so the smallest headroom wins.
    """
    try:
        lines = (proc / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    found: list[int] = []
    for line in lines:
        _, controllers, relative = line.split(":", 2)
        if controllers == "":  # v2 unified hierarchy
            mount, files = root, ("memory.max", "memory.current", "inactive_file")
            if not (root / "cgroup.controllers").exists() and (root / "unified").is_dir():
                mount = root / "unified"  # hybrid layout: v2 mounted beside v1
        elif "memory" in controllers.split(","):
            mount = root / "memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        for directory in _cgroup_dirs(mount, relative):
            limit, usage = _read_int(directory / files[0]), _read_int(directory / files[1])
            if limit is None or limit >= _NO_LIMIT or usage is None:
                continue
            cache = _stat_value(directory / "memory.stat", files[2])
            found.append(max(limit - max(usage - cache, 0), 0))
    return min(found) if found else None


def meminfo_available(proc: Path = PROC_ROOT) -> int | None:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (the node's view), else None."""
    try:
        for line in (proc / "meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def host_available(root: Path = CGROUP_ROOT, proc: Path = PROC_ROOT) -> int | None:
    """Host memory this process may still use, in bytes: the smaller of the node's
    ``MemAvailable`` and its cgroup's headroom (a container's limit, which ``/proc/meminfo``
    does not show; :func:`cgroup_available`); None when neither is known (not checked)."""
    known = [v for v in (meminfo_available(proc), cgroup_available(root, proc)) if v is not None]
    return min(known) if known else None


def peak_memory_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB), plus CUDA peaks: a Ray actor
    or a torch.distributed rank measures its own process, the local executor the driver's."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1024 if sys.platform != "darwin" else 1)
    if torch.cuda.is_available():
        rss += sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    return int(rss)


@dataclass
class Timings:
    """Wall seconds per phase."""

    phases: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.phases[phase] = self.phases.get(phase, 0.0) + time.perf_counter() - t0
