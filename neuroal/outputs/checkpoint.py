"""Resume state: config hash, finished search candidates and finished pruned blocks (engine.md §8).

Layout under ``<output>.neuroal-tmp/state/``:

* ``meta.json``: the config hash and the canonical config it was computed from, and the
  digests of every input (weights, tokenizer files, calibration source; see below);
* ``search/<phase>-<nnn>.pt``: one file per finished NeuroAL candidate (grid value, score and
  the per-block alignment terms and delta vectors), written atomically (temp file + rename);
* ``prune/block_<b>.safetensors``: what a finished block needs to be rebuilt from the dense
  checkpoint, plus its report in the file's metadata. Where the criterion and the recovery steps
  only choose masks (``changes_values`` false: magnitude, Wanda, RIA, the symmetric family,
  DSnoT's swaps) that is one bit per weight (``kind: masks``, :func:`pack_mask`: 107 MB per
  Llama-2-70B block instead of 1.7 GB of bf16 weights); where values change (SparseGPT, a
  reconstruction) the weights themselves (``kind: weights``). The activation stream is not
  stored: resuming replays the finished pruned blocks on the calibration windows, which gives
  bit-identical inputs to the next block because the same micro-batches run through the same
  weights.

Block states are written off the critical path by a :class:`StateWriter` (one background
thread, a bounded queue); an error is raised at the next block or at :meth:`StateWriter.flush`.

Integrity: every state file ``F`` gets a sidecar ``F.sha256`` (``sha256sum`` format) written
before ``F`` is renamed into place; reading ``F`` verifies it and refuses a mismatch or a missing
digest, naming the file. A write killed half-way leaves only ``F.part`` (ignored) or a sidecar
without ``F`` (the block counts as not finished). ``meta.json`` also records the resume key's
inputs: a full-file SHA-256 of every weight shard (:func:`neuroal.models.loading.
weights_fingerprint`), of the tokenizer files and of the calibration source; ``--resume``
refuses any that changed, naming it. A replayed block is checked against its stored report and
its plan (:func:`check_replayed`).

Everything here is file I/O on plain tensors and dicts; the workers write and read their own
blocks (shared storage), the coordinator writes the search candidates.
"""

from __future__ import annotations

import hashlib
import json
import os
import queue
import threading
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuroal.config.inputs import file_sha256
from neuroal.runtime.errors import ResumeMismatchError, StateIntegrityError  # noqa: F401
from neuroal.runtime.logging import get_logger

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


FORMAT = 3  # 2: SHA-256 sidecars and the weights fingerprint; 3: full-file digests of every
#              input (shards, tokenizer, calibration), bit-packed mask states


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
    return file_changes(old.get("files", {}), new.get("files", {}))


def file_changes(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """``"<name>: <what>"`` for every file added, removed or changed between two
    ``{name: {size, sha256[, header]}}`` maps (a file with a ``header`` digest is a weight file:
    its directory and its weight bytes are told apart)."""
    changes = [f"{name}: removed" for name in sorted(set(a) - set(b))]
    changes += [f"{name}: added" for name in sorted(set(b) - set(a))]
    for name in sorted(set(a) & set(b)):
        was, now = a[name], b[name]
        if was.get("size") != now.get("size"):
            changes.append(f"{name}: size {was.get('size')} -> {now.get('size')} bytes")
        elif was.get("header") != now.get("header"):
            changes.append(f"{name}: tensor directory / metadata differs")
        elif was.get("sha256") != now.get("sha256"):
            what = "weight bytes differ" if "header" in now else "content differs"
            changes.append(f"{name}: {what}")
    return changes


def input_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What changed in the non-weight inputs of the resume key (:func:`neuroal.outputs.resume_key.
    resume_inputs`): tokenizer files and the calibration source, each named."""
    changes = []
    tok_a, tok_b = old.get("tokenizer") or {}, new.get("tokenizer") or {}
    if tok_a.get("location") != tok_b.get("location"):
        changes.append(f"tokenizer {tok_a.get('location')!r} -> {tok_b.get('location')!r}")
    else:
        changes += [f"tokenizer file {c}" for c in file_changes(tok_a.get("files") or {},
                                                               tok_b.get("files") or {})]
    cal_a, cal_b = old.get("calibration") or {}, new.get("calibration") or {}
    if cal_a.get("location") != cal_b.get("location"):
        changes.append(f"calibration source {cal_a.get('location')!r} -> "
                       f"{cal_b.get('location')!r}")
    elif cal_a.get("sha256") != cal_b.get("sha256"):
        changes.append(f"calibration file {cal_b.get('location')}: content differs")
    return changes


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
        inputs: The other inputs' digests (:func:`neuroal.outputs.resume_key.resume_inputs`: tokenizer
            files, calibration source); with ``resume`` they must match the stored ones.

    Raises:
        ResumeMismatchError: ``resume`` and the stored config hash, weights or inputs differ;
            the message lists the differing keys and names every changed file.
        StateIntegrityError: ``resume`` and a state file fails its SHA-256 (named).
    """

    def __init__(self, root: str | Path, canonical: Mapping[str, Any], resume: bool,
                 weights: Mapping[str, Any] | None = None,
                 inputs: Mapping[str, Any] | None = None) -> None:
        self.root = Path(root)
        self.hash = config_hash(canonical)
        self.weights = dict(weights or {})
        self.inputs = dict(inputs or {})
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
             "weights": self.weights, "inputs": self.inputs}, indent=1, sort_keys=True)))

    def _check_resume(self, meta: Path, canonical: Mapping[str, Any]) -> None:
        """Same format, config and weights as the stored state, every state file intact."""
        old = json.loads(verified_bytes(meta))
        if old.get("format") != FORMAT:
            raise ResumeMismatchError(
                f"--resume: the state in {str(self.root)!r} was written by an earlier neuroal "
                f"(state format {old.get('format')}, this one writes {FORMAT}: its key does not "
                "cover every input byte); drop --resume and pass --overwrite to start afresh")
        problems = []
        if old["hash"] != self.hash:
            keys = sorted(k for k in set(old["config"]) | set(canonical)
                          if old["config"].get(k) != canonical.get(k))
            problems.append(f"a different configuration (differing keys: {', '.join(keys)})")
        changes = fingerprint_changes(old.get("weights") or {}, self.weights)
        if changes:
            problems.append(f"a different model: its weights changed since the interrupted run "
                            f"({'; '.join(changes)})")
        changes = input_changes(old.get("inputs") or {}, self.inputs)
        if changes:
            problems.append(f"inputs that changed since the state was written "
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


KIND_MASKS = "masks"  # one bit per weight: True where the pruned weight is +0.0
KIND_WEIGHTS = "weights"  # the tensors themselves (values changed, or norms and biases)


_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def positive_zeros(weight: torch.Tensor) -> torch.Tensor:
    """``(rows, cols)`` bool, True where ``weight`` is exactly ``+0.0`` (on its device).

    Pruning writes ``+0.0`` (``masked_fill``), so ``dense.masked_fill(positive_zeros(w), 0)``
    rebuilds ``w`` bit for bit from its dense weights: a dense ``+0.0`` kept is ``+0.0`` either
    way, and a dense ``-0.0`` kept stays ``-0.0`` (it is not in the mask). ``+0.0`` is the
    all-zero bit pattern, so one integer comparison finds it."""
    return weight.view(_SAME_SIZE_INT[weight.element_size()]) == 0


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """``(rows, cols)`` bool -> ``(ceil(rows * cols / 8),)`` uint8, row-major, first element
    in the high bit (``numpy.packbits`` order): 1 bit per weight."""
    flat = mask.detach().to("cpu").reshape(-1).numpy()
    return torch.from_numpy(np.packbits(flat))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`pack_mask`: ``(bytes,)`` uint8 -> bool of ``shape``."""
    count = int(np.prod(shape))
    if packed.dtype != torch.uint8 or packed.numel() != (count + 7) // 8:
        raise StateIntegrityError(f"packed mask of {packed.numel()} {packed.dtype} bytes does not "
                                  f"hold a {tuple(shape)} mask ({(count + 7) // 8} uint8 bytes)")
    bits = np.unpackbits(packed.numpy(), count=count).astype(bool)
    return torch.from_numpy(bits).reshape(shape)


def block_state_path(root: str | Path, index: int) -> Path:
    return Path(root) / "prune" / f"block_{index:04d}.safetensors"


def _block_tensors(tensors: Mapping[str, torch.Tensor], kind: str,
                   ) -> tuple[dict[str, torch.Tensor], dict[str, list[int]]]:
    """The tensors a block state file holds and, for masks, each mask's shape."""
    if kind == KIND_WEIGHTS:
        return {n: w.detach().to("cpu").contiguous() for n, w in tensors.items()}, {}
    masks = {n: t if t.dtype == torch.bool else positive_zeros(t) for n, t in tensors.items()}
    return ({n: pack_mask(m) for n, m in masks.items()},
            {n: list(m.shape) for n, m in masks.items()})


def save_block_state(root: str | Path, index: int, tensors: Mapping[str, torch.Tensor],
                     report: Mapping[str, Any], kind: str = KIND_WEIGHTS) -> int:
    """Write a finished block's state and its report; returns the file's size in bytes.

    Args:
        root: The state directory.
        index: The block.
        tensors: ``kind="weights"``: ``name -> tensor`` stored as is. ``kind="masks"``:
            ``linear name -> (rows, cols)`` pruned weight (or its :func:`positive_zeros` mask),
            stored bit-packed.
        report: The block's report (JSON-able), kept in the file's metadata.
        kind: ``masks`` or ``weights``.
    """
    from safetensors.torch import save_file

    if kind not in (KIND_MASKS, KIND_WEIGHTS):
        raise ValueError(f"block state kind {kind!r}: expected {KIND_MASKS} or {KIND_WEIGHTS}")
    path = block_state_path(root, index)
    stored, shapes = _block_tensors(tensors, kind)
    metadata = {"report": json.dumps(report), "kind": kind}
    if shapes:
        metadata["shapes"] = json.dumps(shapes)
    _atomic_write(path, lambda p: save_file(stored, str(p), metadata=metadata))
    return path.stat().st_size


def load_block_state(root: str | Path, index: int,
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """A finished block's state and report, or None if the block is not finished.

    Returns weights ``name -> tensor`` (``kind: weights``; files without a kind are weights) or
    bool masks ``linear name -> (rows, cols)``, True where the pruned weight is ``+0.0``
    (``kind: masks``): apply them to the dense weights with ``masked_fill_(mask, 0.0)``.

    Raises:
        StateIntegrityError: The file fails its digest, or its kind or masks are malformed.
    """
    from safetensors import safe_open

    path = block_state_path(root, index)
    if not path.exists():
        return None
    verify_file(path)  # streamed: a 70B block is ~1.7 GB of weights, 107 MB of masks
    with safe_open(str(path), framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}  # noqa: SIM118 - safe_open API
        meta = f.metadata() or {}
    report = json.loads(meta.get("report", "{}"))
    kind = meta.get("kind", KIND_WEIGHTS)
    if kind == KIND_WEIGHTS:
        return tensors, report
    if kind != KIND_MASKS:
        raise StateIntegrityError(f"resume state file {str(path)!r} has an unknown kind {kind!r}; "
                                  "drop --resume and pass --overwrite to start afresh")
    shapes = json.loads(meta.get("shapes", "{}"))
    try:
        return {n: unpack_mask(t, tuple(shapes[n])) for n, t in tensors.items()}, report
    except (KeyError, StateIntegrityError) as exc:
        raise StateIntegrityError(f"resume state file {str(path)!r}: malformed masks ({exc}); "
                                  "drop --resume and pass --overwrite to start afresh") from None


class StateWriteError(ValueError):
    """Writing a block's resume state failed (disk full, permissions...); the CLI reports it
    as one line (exit code 2), the blocks written before stay resumable."""


_WRITERS: weakref.WeakSet[StateWriter] = weakref.WeakSet()


class StateWriter:
    """Writes block states in one background thread, off the critical path of the prune.

    :meth:`submit` queues a block (at most ``depth`` wait while one is being written; a full
    queue makes the caller wait, which :meth:`stats` counts); the first error is raised by the
    next :meth:`submit` or by :meth:`flush`, which waits for every queued block. Each file is
    written atomically (:func:`save_block_state`), so a process killed mid-write leaves either
    a complete, digested file or one that resume ignores.

    Args:
        depth: Blocks that may wait in the queue (host memory: one block state each).
    """

    def __init__(self, depth: int = 1) -> None:
        self._queue: queue.Queue[tuple[Any, ...] | None] = queue.Queue(maxsize=max(1, depth))
        self._thread: threading.Thread | None = None
        self._error: StateWriteError | None = None
        self.blocks = 0
        self.bytes = 0
        self.write_seconds = 0.0  # spent by the writer thread
        self.wait_seconds = 0.0  # the caller blocked on a full queue or a flush
        _WRITERS.add(self)

    def submit(self, root: str | Path, index: int, tensors: Mapping[str, torch.Tensor],
               report: Mapping[str, Any], kind: str) -> None:
        """Queue block ``index``'s state (:func:`save_block_state`'s arguments). The tensors
        must not change until written (CPU tensors are read by the thread as they are)."""
        self._raise()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="neuroal-state-writer",
                                            daemon=True)
            self._thread.start()
        t0 = time.perf_counter()
        self._queue.put((root, index, tensors, report, kind))
        self.wait_seconds += time.perf_counter() - t0

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            root, index, tensors, report, kind = item
            if self._error is None:
                t0 = time.perf_counter()
                try:
                    self.bytes += save_block_state(root, index, tensors, report, kind)
                    self.blocks += 1
                except Exception as exc:  # noqa: BLE001 - raised in the caller's thread
                    path = block_state_path(root, index)
                    self._error = StateWriteError(
                        f"writing the resume state of block {index} to {str(path)!r} failed "
                        f"({type(exc).__name__}: {exc}); free space or fix the permissions of "
                        f"{str(path.parent)!r}, then rerun with --resume")
                    self._error.__cause__ = exc
                self.write_seconds += time.perf_counter() - t0
            del item, tensors

    def flush(self) -> None:
        """Wait until every queued block is written; raise the first write error."""
        if self._thread is not None:
            t0 = time.perf_counter()
            self._queue.put(None)
            self._thread.join()
            self._thread = None
            self.wait_seconds += time.perf_counter() - t0
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def stats(self) -> dict[str, Any]:
        """Blocks and bytes written, seconds writing, seconds the caller waited."""
        return {"blocks": self.blocks, "bytes": self.bytes, "write_seconds": self.write_seconds,
                "wait_seconds": self.wait_seconds}


def drain_state_writers() -> None:
    """Finish every block state still queued in this process (a run failing after some blocks:
    what was computed is kept for ``--resume``); write errors are logged, not raised."""
    for writer in list(_WRITERS):
        try:
            writer.flush()
        except StateWriteError as exc:
            log.warning("%s", exc)


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
