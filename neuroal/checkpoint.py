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

Integrity: every state file ``F`` gets a sidecar ``F.sha256`` (``sha256sum`` format) written
before ``F`` is renamed into place; reading ``F`` verifies it and refuses a mismatch or a missing
digest, naming the file. ``meta.json`` also records a fingerprint of the model's weights
(:func:`neuroal.models.loading.weights_fingerprint`): ``--resume`` refuses a model that changed.
A replayed block is checked against its stored report and its plan (:func:`check_replayed`).

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

from neuroal.inputs import file_sha256
from neuroal.logging import get_logger

log = get_logger(__name__)

# Keys that do not change results (engine.md §8): output location, logging, resume flags, and
# the executor layout (results are bit-identical across executors, worker counts and the
# pipeline and data modes of the final prune, §3.5).
NON_SEMANTIC = ("output.dir", "output.overwrite", "log_level", "engine.executor", "engine.workers",
                "engine.devices", "engine.ray", "engine.dist", "engine.memory_limit", "engine.device",
                "output.resume", "output.keep_state", "output.save_model", "output.shard_size",
                "compare", "engine.onload", "engine.prefetch", "engine.parallel", "log",
                "output.push_to_hub",
                "output.plots")


FORMAT = 2  # 2: SHA-256 sidecars and the weights fingerprint


def fingerprint_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two :func:`neuroal.models.loading.weights_fingerprint`
    results (empty when
    they match). Hub sources compare id, revision and commit when both commits are known."""
    if old.get("kind") != new.get("kind"):
        return [f"model source kind {old.get('kind')} -> {new.get('kind')}"]
    if new.get("kind") == "hub":
        changes = [f"{key} {old.get(key)} -> {new.get(key)}" for key in ("id", "revision")
                   if old.get(key) != new.get(key)]
        if old.get("commit") and new.get("commit") and old["commit"] != new["commit"]:
            changes.append(f"commit {old['commit']} -> {new['commit']}")
        elif not (old.get("commit") and new.get("commit")):
            log.warning("resume: hub model %s is not fully cached; its weights cannot be "
                        "fingerprinted, only its id and revision are compared", new.get("id"))
        return changes
    a, b = old.get("files", {}), new.get("files", {})
    changes = [f"{name}: removed" for name in sorted(set(a) - set(b))]
    changes += [f"{name}: added" for name in sorted(set(b) - set(a))]
    for name in sorted(set(a) & set(b)):
        was, now = a[name], b[name]
        if was.get("size") != now.get("size"):
            changes.append(f"{name}: size {was.get('size')} -> {now.get('size')} bytes")
        elif was.get("sha256") != now.get("sha256"):
            changes.append(f"{name}: content differs")
        elif was.get("header") != now.get("header"):
            changes.append(f"{name}: tensor directory / metadata differs")
        elif was.get("sample") != now.get("sample"):
            changes.append(f"{name}: weight bytes differ")
    return changes


class ResumeMismatchError(ValueError):
    """``--resume`` found state written by a different configuration or model."""


class StateIntegrityError(ValueError):
    """A resume state file is corrupted, edited or inconsistent with its plan."""


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


def _digest_path(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _atomic_write(path: Path, write: Any) -> None:
    """Write through ``<path>.part``, record its SHA-256 in ``<path>.sha256``, then rename: a
    file at ``path`` always has its digest beside it."""
    tmp = path.with_name(path.name + ".part")
    write(tmp)
    side = _digest_path(path)
    side_tmp = side.with_name(side.name + ".part")
    side_tmp.write_text(f"{file_sha256(tmp)}  {path.name}\n")
    os.replace(side_tmp, side)
    os.replace(tmp, path)


def verified_bytes(path: str | Path) -> bytes:
    """The content of a (small) state file after checking it against its recorded SHA-256.

    Raises:
        StateIntegrityError: No digest recorded, or the content does not match it.
    """
    data = Path(path).read_bytes()
    verify_file(path, hashlib.sha256(data).hexdigest())
    return data


def verify_file(path: str | Path, actual: str | None = None) -> None:
    """Check a state file against its recorded SHA-256 (hashed in chunks unless ``actual``).

    Raises:
        StateIntegrityError: No digest recorded, or the content does not match it.
    """
    path = Path(path)
    side = _digest_path(path)
    try:
        expected = side.read_text().split()[0]
    except (OSError, IndexError):
        raise StateIntegrityError(
            f"resume state file {str(path)!r} has no recorded SHA-256 ({side.name} missing); it "
            "was not written by this neuroal run: drop --resume and pass --overwrite to start "
            "afresh") from None
    actual = actual or file_sha256(path)
    if actual != expected:
        raise StateIntegrityError(
            f"resume state file {str(path)!r} was modified or corrupted after it was written "
            f"(SHA-256 {actual[:16]}..., recorded {expected[:16]}...); refusing to use it: drop "
            "--resume and pass --overwrite to start afresh")


class RunState:
    """The resume state directory of one run.

    Args:
        root: ``<output>.neuroal-tmp/state``.
        canonical: The canonical config (see :func:`canonical_config`).
        resume: Reuse existing state (must match); otherwise any old state is discarded.
        weights: The model's :func:`~neuroal.models.loading.weights_fingerprint`; with
            ``resume`` it must match the stored one.

    Raises:
        ResumeMismatchError: ``resume`` and the stored config hash or weights differ; the
            message lists the differing keys and what changed in the model.
        StateIntegrityError: ``resume`` and a state file fails its SHA-256 (named).
    """

    def __init__(self, root: str | Path, canonical: Mapping[str, Any], resume: bool,
                 weights: Mapping[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.hash = config_hash(canonical)
        self.weights = dict(weights or {})
        meta = self.root / "meta.json"
        if resume and meta.exists():
            self._check_resume(meta, canonical)
            log.info("resuming from %s (config hash %s)", self.root, self.hash[:12])
        elif self.root.exists():
            import shutil

            shutil.rmtree(self.root)
        (self.root / "search").mkdir(parents=True, exist_ok=True)
        (self.root / "prune").mkdir(parents=True, exist_ok=True)
        _atomic_write(meta, lambda p: p.write_text(json.dumps(
            {"format": FORMAT, "hash": self.hash, "config": dict(canonical),
             "weights": self.weights}, indent=1, sort_keys=True)))

    def _check_resume(self, meta: Path, canonical: Mapping[str, Any]) -> None:
        """Same format, config and weights as the stored state, every state file intact."""
        old = json.loads(verified_bytes(meta))
        if old.get("format") != FORMAT:
            raise ResumeMismatchError(
                f"--resume: the state in {str(self.root)!r} was written by an earlier neuroal "
                "(no integrity digests, no weights fingerprint); drop --resume and pass "
                "--overwrite to start afresh")
        problems = []
        if old["hash"] != self.hash:
            keys = sorted(k for k in set(old["config"]) | set(canonical)
                          if old["config"].get(k) != canonical.get(k))
            problems.append(f"a different configuration (differing keys: {', '.join(keys)})")
        changes = fingerprint_changes(old.get("weights") or {}, self.weights)
        if changes:
            problems.append(f"a different model: its weights changed since the interrupted run "
                            f"({'; '.join(changes)})")
        if problems:
            raise ResumeMismatchError(
                f"--resume: the state in {str(self.root)!r} was written by "
                f"{' and by '.join(problems)}; rerun with the same settings and model, or drop "
                "--resume (with --overwrite) to start afresh")
        for path in sorted([*self.root.glob("search/*.pt"),
                            *self.root.glob("prune/*.safetensors")]):
            verify_file(path)

    # ------------------------------------------------------------------ search candidates

    def candidate_path(self, phase: str, ordinal: int) -> Path:
        return self.root / "search" / f"{phase}-{ordinal:03d}.pt"

    def save_candidate(self, phase: str, ordinal: int, value: float, score: float,
                       detail: list[dict[str, Any]], stopped_at_block: int | None = None) -> None:
        """One finished candidate; ``detail[b]`` = ``{"na": {name: float}, "delta": {name: (cols,)}}``.

        A candidate stopped early (exact early stopping) has ``detail`` up to
        ``stopped_at_block`` and its partial sum, the lower bound, as ``score``."""
        payload: dict[str, Any] = {"value": float(value), "score": float(score), "detail": detail}
        if stopped_at_block is not None:
            payload["stopped_at_block"] = int(stopped_at_block)
        _atomic_write(self.candidate_path(phase, ordinal), lambda p: torch.save(payload, p))

    def load_candidate(self, phase: str, ordinal: int, value: float) -> dict[str, Any] | None:
        """A finished candidate, or None (also when its grid value differs: never reuse)."""
        import io

        path = self.candidate_path(phase, ordinal)
        if not path.exists():
            return None
        payload = torch.load(io.BytesIO(verified_bytes(path)), weights_only=True)
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
    verify_file(path)  # streamed: a 70B block is ~1.7 GB
    with safe_open(str(path), framework="pt") as f:
        weights = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 - safe_open API
        report = json.loads((f.metadata() or {}).get("report", "{}"))
    return weights, report


def check_replayed(path: str | Path, weights: Mapping[str, torch.Tensor], report: Mapping[str, Any],
                   linears: Mapping[str, int], targets: Mapping[str, float] | None = None) -> None:
    """Check a stored block before it is replayed: every prunable linear is there, its zeros
    are the ones its report counts (at least the pruned count), and the report's targets are
    the plan's.

    Args:
        path: The block's state file (named in errors).
        weights: Stored tensors ``name -> (rows, cols)``.
        report: The stored :class:`~neuroal.engine.worker.BlockReport` as a dict.
        linears: ``linear name -> input columns`` of the block's prunable linears.
        targets: ``linear name -> mean planned ratio`` from the current plan (None: not checked).

    Raises:
        StateIntegrityError: Naming the file, the linear and the mismatch.
    """
    layers = {r["name"]: r for r in report.get("layers", [])}
    problems = [f"{n}: no stored weight" for n in sorted(set(linears) - set(weights))]
    problems += [f"{n}: not in the stored report" for n in sorted(set(linears) - set(layers))]
    for name in sorted(set(linears) & set(weights) & set(layers)):
        layer, weight = layers[name], weights[name]
        zeros = int((weight == 0).sum())
        if zeros != layer["zeros"] or weight.numel() != layer["numel"]:
            problems.append(f"{name}: {zeros} zeros of {weight.numel()} stored, the report says "
                            f"{layer['zeros']} of {layer['numel']}")
        elif zeros < layer["pruned"]:
            problems.append(f"{name}: {zeros} zeros but {layer['pruned']} pruned")
        if targets is not None and name in targets:
            target = targets[name]
            # the planned count is exact up to rounding per row (1 / columns) or group
            slack = 0.02 + 1.0 / max(1, linears[name])
            if abs(layer["target"] - target) > 1e-9:
                problems.append(f"{name}: stored target {layer['target']:.6f}, the plan says "
                                f"{target:.6f}")
            elif layer["pruned"] / max(1, layer["numel"]) < target - slack:
                problems.append(f"{name}: {layer['pruned'] / layer['numel']:.4f} pruned, the plan "
                                f"says {target:.4f}")
    if problems:
        raise StateIntegrityError(
            f"resume state file {str(path)!r} does not match its report or the plan "
            f"({'; '.join(problems)}); refusing to replay it: drop --resume and pass --overwrite "
            "to start afresh")


def state_bytes(block_params: int, dtype_bytes: int) -> int:
    """Disk bytes of a complete resume state (checked by preflight before loading): every
    block's pruned weights at the run dtype (an upper bound: only prunable linears are kept)."""
    return block_params * dtype_bytes
