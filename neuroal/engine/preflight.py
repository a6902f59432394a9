"""Preflight: what every worker can see and do, checked before any weight is loaded.

A run on a cluster fails late for reasons that are knowable at the start: the driver (a Ray
head node without a GPU) resolves ``--device auto`` to the CPU while the workers have GPUs; the
workers write their shards into a directory the driver cannot see (node-local disks); a relative
``--output`` under ``ray job submit`` lands in Ray's temporary working directory; the disk fills
up after hours of pruning. Each worker (a Ray task in its placement-group bundle, a
torch.distributed rank) therefore reports :class:`NodeFacts` (its device type and free device
memory, the host memory its cgroup allows, the free disk at the output) and writes a probe file
into the output's temporary folder (``<output>.neuroal-tmp/preflight``); in a second round every
worker, and the driver, reads every probe back. The pure checks below turn the reports into one
list of problems, each naming the value, what was expected and the fix; the plumbing that
collects the reports lives in :mod:`neuroal.engine.ray_preflight` (Ray),
:mod:`neuroal.engine.dist` (command ``preflight``) and :mod:`neuroal.engine.cluster` (driver).

Everything here is plain Python on paths and numbers: no Ray, no process group, no config object.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from neuroal.runtime.process import host_available

PROBE_DIR = "preflight"
"""Subfolder of the output's temporary folder holding the probe files (removed afterwards)."""

DRIVER = "driver"
"""Probe name of the driver (the process that renames the staged output into place)."""

RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
"""Set by ``ray job submit`` in the entrypoint's environment (JSON: runtime_env, metadata)."""


@dataclass(frozen=True)
class NodeFacts:
    """What one worker (or the driver, ``rank`` -1) reported.

    Attributes:
        rank: Worker rank; -1 for the driver.
        host: Host name.
        node: Ray node id, or the host name.
        device: The device the worker was asked to use, as named there (``cuda:0``, ``cpu``).
        device_error: Why that device cannot be used, or None.
        device_free: Free bytes of that device (CUDA), None on the CPU.
        host_available: Host bytes this process may still use (cgroup-aware), or None.
        disk_free: Free bytes at the output's temporary folder, or None (no output).
        probe_error: Why the probe file could not be written and read back, or None.
        seen: Probe names (:func:`probe_name`) this worker could read in the second round.
    """

    rank: int
    host: str
    node: str
    device: str
    device_error: str | None = None
    device_free: int | None = None
    host_available: int | None = None
    disk_free: int | None = None
    probe_error: str | None = None
    seen: tuple[str, ...] = ()

    @property
    def who(self) -> str:
        """``worker 3 on host h (node n)`` / ``the driver on host h`` for messages."""
        name = DRIVER if self.rank < 0 else f"worker {self.rank}"
        node = f" (node {self.node[:12]})" if self.node and self.node != self.host else ""
        return f"{'the ' if self.rank < 0 else ''}{name} on host {self.host}{node}"


def probe_name(rank: int) -> str:
    """File name of a worker's probe (``driver`` for rank -1)."""
    return DRIVER if rank < 0 else f"worker-{rank}"


def probe_root(tmp: str | Path) -> Path:
    """The probe folder inside the output's temporary folder ``tmp``."""
    return Path(tmp) / PROBE_DIR


# --------------------------------------------------------------------------- one worker


def nearest_existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (free space is measured there)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path(path.anchor or "/")


def disk_free(path: str | Path) -> int | None:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing ancestor)."""
    try:
        return int(shutil.disk_usage(nearest_existing(Path(path))).free)
    except OSError:
        return None


def device_state(device: str) -> tuple[str | None, int | None]:
    """``(error, free bytes)`` of ``device`` in this process: an error when torch cannot use it
    (no CUDA, an index beyond the visible devices), the free memory of a CUDA device."""
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        return f"device {device!r} is not a device name ({exc})", None
    if dev.type == "cpu":
        return None, None
    if dev.type != "cuda":
        return f"device {device!r}: only cpu and cuda are supported", None
    if not torch.cuda.is_available():
        return (f"device {device!r} was requested but torch sees no CUDA device here "
                f"(torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'})"), None
    index = dev.index or 0
    if index >= torch.cuda.device_count():
        return (f"device {device!r} but only {torch.cuda.device_count()} CUDA device(s) are "
                "visible here"), None
    try:
        return None, int(torch.cuda.mem_get_info(index)[0])
    except RuntimeError as exc:  # a GPU in a bad state (ECC error, lost from the bus)
        return f"device {device!r} does not answer ({exc})", None


def write_probe(root: Path, name: str, nonce: str) -> str | None:
    """Write ``root/name`` holding ``nonce`` and read it back; the error text, or None."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        path = root / name
        part = root / f".{name}.part"
        part.write_text(nonce)
        os.replace(part, path)
        if path.read_text() != nonce:
            return f"{str(path)!r} read back different bytes than were written"
    except OSError as exc:
        return f"cannot write and read back a probe file in {str(root)!r} ({exc})"
    return None


def read_probes(root: Path, names: Iterable[str], nonce: str) -> tuple[str, ...]:
    """The probe names under ``root`` that exist and hold ``nonce`` (this run's)."""
    seen = []
    for name in names:
        try:
            if (root / name).read_text() == nonce:
                seen.append(name)
        except OSError:
            continue
    return tuple(seen)


def gather_facts(rank: int, device: str, tmp: str | Path | None, nonce: str,
                 node: str = "") -> NodeFacts:
    """This process's :class:`NodeFacts`; writes its probe into ``tmp``'s probe folder (first
    round). Never raises: every failure becomes a field the driver reports."""
    error, free = device_state(device)
    host = socket.gethostname()
    facts = NodeFacts(rank, host, node or host, device, error, free, host_available())
    if tmp is None:
        return facts
    root = probe_root(tmp)
    return replace(facts, disk_free=disk_free(Path(tmp)),
                   probe_error=write_probe(root, probe_name(rank), nonce))


def see_probes(facts: NodeFacts, tmp: str | Path | None, names: Sequence[str],
               nonce: str) -> NodeFacts:
    """``facts`` with the probes this process can read (second round, after every write)."""
    if tmp is None:
        return facts
    return replace(facts, seen=read_probes(probe_root(tmp), names, nonce))


def remove_probes(tmp: str | Path | None) -> None:
    """Delete the probe folder (the driver, after the second round)."""
    if tmp is not None:
        shutil.rmtree(probe_root(tmp), ignore_errors=True)


# --------------------------------------------------------------------------- checks


def cluster_device_type(requested: str, gpus: float) -> tuple[str, list[str]]:
    """The device type a Ray cluster's workers run on, from the cluster's GPU count, never from
    the driver's own devices (a head node often has none): ``auto`` is ``cuda`` when the
    cluster has a GPU, else ``cpu``; an explicit ``cuda`` needs one. Returns the type and
    errors."""
    try:
        kind = "auto" if requested == "auto" else torch.device(requested).type
    except RuntimeError as exc:
        return "cpu", [f"engine.device={requested!r}: {exc}; expected cpu, cuda, cuda:N or auto"]
    if kind == "auto":
        return ("cuda" if gpus > 0 else "cpu"), []
    if kind == "cuda" and gpus <= 0:
        return kind, [f"engine.device={requested!r} but the Ray cluster has no GPU (its "
                      "resources list GPU: 0); start GPU nodes, connect to the right cluster "
                      "(engine.ray.address / RAY_ADDRESS), or use --device cpu"]
    return kind, []


def device_errors(facts: Sequence[NodeFacts], device_type: str) -> list[str]:
    """Every worker must be able to use a device of ``device_type`` (engine.md §3.5: one
    device type for all workers)."""
    errors = []
    for f in facts:
        if f.rank < 0:
            continue
        if f.device_error is not None:
            errors.append(f"{f.who}: {f.device_error}; fix the node's CUDA setup, or run on "
                          "--device cpu")
        elif torch.device(f.device).type != device_type:
            errors.append(f"{f.who} would run on {f.device!r} but the run needs {device_type} "
                          "on every worker (identical results need one device type)")
    return errors


def filesystem_errors(facts: Sequence[NodeFacts], tmp: str | Path) -> list[str]:
    """Every worker and the driver must see every probe: the workers write their shards and
    resume state into ``tmp`` and the driver renames the staged output into place."""
    names = [probe_name(f.rank) for f in facts]
    errors = [f"{f.who}: {f.probe_error}; the output must be writable from every worker"
              for f in facts if f.probe_error is not None]
    written = {probe_name(f.rank) for f in facts if f.probe_error is None}
    blind = [(f, sorted(written - set(f.seen), key=names.index)) for f in facts
             if f.probe_error is None and written - set(f.seen)]
    if blind:
        detail = "; ".join(f"{f.who} cannot see {', '.join(missing)}" for f, missing in blind)
        errors.append(f"the output's temporary folder {str(tmp)!r} is not on a filesystem every "
                      f"worker shares: {detail}. Workers write their shards and resume state "
                      "there and the driver moves them into place; put --output on storage "
                      "every node mounts at the same path (NFS, Lustre, a shared volume)")
    return errors


def disk_errors(facts: Sequence[NodeFacts], needed: int, detail: str,
                tmp: str | Path) -> list[str]:
    """Free space at the output for ``needed`` bytes (``detail``: what they are made of)."""
    if needed <= 0:
        return []
    short = [f for f in facts if f.disk_free is not None and f.disk_free < needed]
    if not short:
        return []
    worst = min(short, key=lambda f: f.disk_free or 0)
    return [f"not enough disk space at {str(tmp)!r} ({worst.who}): this run needs about "
            f"{gb(needed)} there ({detail}), only {gb(worst.disk_free or 0)} free; free space, "
            "choose an --output on a larger filesystem, or pass --no-save if you need no model "
            "files"]


def gb(value: int | float) -> str:
    """Bytes as ``12.3 GB``."""
    return f"{value / 1e9:.1f} GB"


def disk_needed(export_bytes: int, state_bytes: int, existing_state: int = 0) -> tuple[int, str]:
    """Bytes a run still writes at its output (resume state + export; on ``--resume`` the state
    already written counts as written) and the breakdown for messages."""
    state = max(state_bytes - existing_state, 0)
    parts = [f"resume state {gb(state)}" if state else "", f"export {gb(export_bytes)}"
             if export_bytes else ""]
    return state + export_bytes, " + ".join(p for p in parts if p)


def folder_bytes(path: str | Path) -> int:
    """Total size of the files under ``path`` (0 when it does not exist)."""
    root = Path(path)
    if not root.is_dir():
        return 0
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def ray_job(environ: Mapping[str, str]) -> dict[str, str] | None:
    """``{"id", "working_dir"}`` when this process is the entrypoint of ``ray job submit``
    (Ray sets :data:`RAY_JOB_ENV`), else None."""
    raw = environ.get(RAY_JOB_ENV)
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        data = {}
    runtime_env = data.get("runtime_env") or {}
    metadata = data.get("metadata") or {}
    return {"id": str(metadata.get("job_submission_id", "?")),
            "working_dir": str(runtime_env.get("working_dir", ""))}


def relative_output_errors(output: str | Path | None, environ: Mapping[str, str],
                           option: str = "--output") -> list[str]:
    """A relative output under ``ray job submit`` resolves inside the job's temporary working
    directory (a copy Ray deletes, on the head node only): refuse it."""
    job = ray_job(environ)
    if output is None or job is None or Path(output).is_absolute():
        return []
    where = (f" (working_dir {job['working_dir']!r} is copied to a temporary folder)"
             if job["working_dir"] else "")
    return [f"{option}={str(output)!r} is a relative path, and this run is Ray job "
            f"{job['id']}{where}: it would be written into the job's temporary working "
            f"directory {os.getcwd()!r}, which Ray deletes and other nodes cannot see. Pass an "
            "absolute path on storage every node shares, e.g. --output /shared/outputs/"
            f"{Path(output).name}"]


def check_facts(facts: Sequence[NodeFacts], device_type: str, tmp: str | Path | None,
                needed: int = 0, detail: str = "") -> list[str]:
    """Every problem the reports show (device, shared filesystem, disk), in that order."""
    errors = device_errors(facts, device_type)
    if tmp is not None:
        errors += filesystem_errors(facts, tmp)
        errors += disk_errors(facts, needed, detail, tmp)
    return errors


def worker_budgets(facts: Sequence[NodeFacts]) -> tuple[int | None, int | None]:
    """``(device bytes, host bytes)`` each worker can count on: the smallest free device
    memory, and the smallest share of a host's available memory among the workers placed on
    it (None when no worker reported one)."""
    workers = [f for f in facts if f.rank >= 0]
    device = [f.device_free for f in workers if f.device_free is not None]
    per_host: dict[str, int] = {}
    for f in workers:
        per_host[f.node] = per_host.get(f.node, 0) + 1
    host = [f.host_available // per_host[f.node] for f in workers
            if f.host_available is not None]
    return (min(device) if device else None), (min(host) if host else None)
