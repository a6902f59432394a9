"""Resume state: config hash, finished search candidates and finished pruned blocks (engine.md §8).

Layout under ``<output>.neuroal-tmp/state/``:

* ``meta.json``: the config hash and the canonical config it was computed from;
* ``search/<phase>-<nnn>.pt``: one file per finished NeuroAL candidate (grid value, score and
  the per-block alignment terms and delta vectors), written atomically (temp file + rename);
* ``prune/block_<b>.safetensors``: the pruned (SparseGPT: updated) weights of every prunable
  linear of a finished block, plus its report in the file's metadata. The activation stream is
  not stored: resuming replays the finished pruned blocks on the calibration windows, which gives
  bit-identical inputs to the next block because the same micro-batches run through the same
  weights.

Everything here is file I/O on plain tensors and dicts; the workers write and read their own
blocks (shared storage), the coordinator writes the search candidates.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from neuroal.logging import get_logger

log = get_logger(__name__)

# Keys that do not change results (engine.md §8): output location, logging, resume flags, and
# the executor layout (results are bit-identical across executors and worker counts, §3.5).
NON_SEMANTIC = ("output.dir", "output.overwrite", "log_level", "engine.executor", "engine.workers",
                "engine.devices", "engine.ray_address", "engine.ray_placement", "engine.ray_cpus",
                "engine.inflight", "engine.memory_limit", "engine.device", "engine.max_restarts",
                "output.resume", "output.keep_state", "output.save_model", "output.shard_size",
                "compare", "log", "output.push_to_hub", "output.plots")


class ResumeMismatchError(ValueError):
    """``--resume`` found state written by a different configuration."""


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def canonical_config(config: Mapping[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    """Flat ``dotted.key -> value`` of the semantic part of a resolved config plus ``extra``
    (library versions, device type, dtype), JSON-normalised."""
    flat = {k: v for k, v in _flatten(config).items()
            if not any(k == n or k.startswith(n + ".") for n in NON_SEMANTIC)}
    flat.update({f"env.{k}": v for k, v in extra.items()})
    return json.loads(json.dumps(flat, sort_keys=True, default=str))


def config_hash(canonical: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON."""
    return hashlib.sha256(json.dumps(canonical, sort_keys=True).encode()).hexdigest()


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(path.name + ".part")
    write(tmp)
    os.replace(tmp, path)


class RunState:
    """The resume state directory of one run.

    Args:
        root: ``<output>.neuroal-tmp/state``.
        canonical: The canonical config (see :func:`canonical_config`).
        resume: Reuse existing state (must match); otherwise any old state is discarded.

    Raises:
        ResumeMismatchError: ``resume`` and the stored hash differs; the message lists the keys.
    """

    def __init__(self, root: str | Path, canonical: Mapping[str, Any], resume: bool) -> None:
        self.root = Path(root)
        self.hash = config_hash(canonical)
        meta = self.root / "meta.json"
        if resume and meta.exists():
            old = json.loads(meta.read_text())
            if old["hash"] != self.hash:
                keys = sorted(k for k in set(old["config"]) | set(canonical)
                              if old["config"].get(k) != canonical.get(k))
                raise ResumeMismatchError(
                    f"--resume: the state in {str(self.root)!r} was written by a different "
                    f"configuration (differing keys: {', '.join(keys)}); rerun with the same "
                    "settings, or drop --resume (with --overwrite) to start afresh")
            log.info("resuming from %s (config hash %s)", self.root, self.hash[:12])
        elif self.root.exists():
            import shutil

            shutil.rmtree(self.root)
        (self.root / "search").mkdir(parents=True, exist_ok=True)
        (self.root / "prune").mkdir(parents=True, exist_ok=True)
        _atomic_write(meta, lambda p: p.write_text(json.dumps(
            {"hash": self.hash, "config": dict(canonical)}, indent=1, sort_keys=True)))

    # ------------------------------------------------------------------ search candidates

    def candidate_path(self, phase: str, ordinal: int) -> Path:
        return self.root / "search" / f"{phase}-{ordinal:03d}.pt"

    def save_candidate(self, phase: str, ordinal: int, value: float, score: float,
                       detail: list[dict[str, Any]]) -> None:
        """One finished candidate; ``detail[b]`` = ``{"na": {name: float}, "delta": {name: (cols,)}}``."""
        payload = {"value": float(value), "score": float(score), "detail": detail}
        _atomic_write(self.candidate_path(phase, ordinal), lambda p: torch.save(payload, p))

    def load_candidate(self, phase: str, ordinal: int, value: float) -> dict[str, Any] | None:
        """A finished candidate, or None (also when its grid value differs: never reuse)."""
        path = self.candidate_path(phase, ordinal)
        if not path.exists():
            return None
        payload = torch.load(path, weights_only=True)
        return payload if payload["value"] == float(value) else None

    # ------------------------------------------------------------------ pruned blocks

    def block_path(self, index: int) -> Path:
        return block_state_path(self.root, index)


def block_state_path(root: str | Path, index: int) -> Path:
    return Path(root) / "prune" / f"block_{index:04d}.safetensors"


def save_block_state(root: str | Path, index: int, weights: Mapping[str, torch.Tensor],
                     report: Mapping[str, Any]) -> None:
    """Write a finished block's pruned weights ``name -> (rows, cols)`` and its report."""
    from safetensors.torch import save_file

    path = block_state_path(root, index)
    tensors = {n: w.detach().contiguous().cpu() for n, w in weights.items()}
    _atomic_write(path, lambda p: save_file(tensors, str(p),
                                            metadata={"report": json.dumps(report)}))


def load_block_state(root: str | Path, index: int,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """A finished block's weights and report, or None if the block is not finished."""
    from safetensors import safe_open

    path = block_state_path(root, index)
    if not path.exists():
        return None
    with safe_open(str(path), framework="pt") as f:
        weights = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 - safe_open API
        report = json.loads((f.metadata() or {}).get("report", "{}"))
    return weights, report
