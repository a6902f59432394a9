"""Everything written to disk: atomic output directory, shards + index, config, tokenizer,
report, plan and model card (engine.md §8-9)."""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from neuroal.compat import make_loadable
from neuroal.logging import get_logger

log = get_logger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?B)?\s*$", re.IGNORECASE)
_UNITS = {None: 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}


class OutputExistsError(FileExistsError):
    """The output directory exists and ``--overwrite`` was not given."""


def parse_size(text: str | int) -> int:
    """``"2GB"`` -> 2_000_000_000 bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.match(text)
    if match is None:
        raise ValueError(f"size {text!r}: expected a number with an optional unit, e.g. 2GB")
    unit = match.group(2).upper() if match.group(2) else None
    return int(float(match.group(1)) * _UNITS[unit])


@dataclass(frozen=True)
class OutputDir:
    """The final output path and its sibling temporary directory ``<output>.neuroal-tmp``."""

    path: Path

    @property
    def tmp(self) -> Path:
        return self.path.with_name(self.path.name + ".neuroal-tmp")

    @property
    def staging(self) -> Path:
        return self.tmp / "model"

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    def check(self, overwrite: bool, resume: bool = False) -> None:
        """Refuse an existing output (before any heavy work) unless ``overwrite``; a previous
        run's temporary directory is reused with ``resume`` and replaced with ``overwrite``."""
        if self.path.exists() and not overwrite:
            raise OutputExistsError(
                f"output directory {str(self.path)!r} already exists; choose another --output "
                "or pass --overwrite to replace it")
        if self.tmp.exists() and not (overwrite or resume):
            raise OutputExistsError(
                f"a previous run left {str(self.tmp)!r}; pass --resume to continue it (same "
                "config), --overwrite to start afresh, or remove it")

    @contextmanager
    def atomic(self, keep_state: bool = False) -> Iterator[Path]:
        """Yield the staging directory ``<tmp>/model``; move it to ``path`` only if the body
        completes, then delete the temporary directory.

        On any failure, Ctrl-C included, ``model/`` is removed and nothing appears at ``path``;
        with ``keep_state`` the resume state ``<tmp>/state`` survives (engine.md §8).
        """
        if self.staging.exists():
            shutil.rmtree(self.staging)
        if not keep_state and self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.staging.mkdir(parents=True)
        try:
            yield self.staging
        except BaseException:
            if keep_state and self.state.exists():
                shutil.rmtree(self.staging, ignore_errors=True)
                log.warning("run failed; resume state kept in %s (rerun with --resume)", self.state)
            else:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        if self.path.exists():
            shutil.rmtree(self.path)
        os.replace(self.staging, self.path)
        shutil.rmtree(self.tmp, ignore_errors=True)


def finalize_shards(directory: Path, files: list[dict[str, Any]]) -> dict[str, Any]:
    """Rename worker shards to ``model-XXXXX-of-YYYYY.safetensors`` and write the index.

    Args:
        directory: The staging directory holding ``worker*.safetensors`` files.
        files: Entries returned by the workers, in worker order.

    Returns:
        The index (``metadata.total_size`` and ``weight_map``).
    """
    total = len(files)
    weight_map: dict[str, str] = {}
    size = 0
    for i, entry in enumerate(files, start=1):
        final = f"model-{i:05d}-of-{total:05d}.safetensors"
        os.replace(directory / entry["file"], directory / final)
        for name in entry["names"]:
            if name in weight_map:
                raise RuntimeError(f"tensor {name!r} was written by two workers")
            weight_map[name] = final
        size += entry["bytes"]
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(directory / "model.safetensors.index.json", index)
    return index


def write_json(path: Path, data: Any) -> None:
    """Write JSON through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def write_config(directory: Path, config: Any, dtype_name: str) -> None:
    """``config.json`` (with the exported dtype) and ``generation_config.json``."""
    from transformers import GenerationConfig

    config = config.__class__.from_dict(config.to_dict())
    config.dtype = dtype_name
    for attr in ("quantization_config", "sparsity_config"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)
    make_loadable(directory)  # keys transformers 4.5x / vLLM need (neuroal.compat)


def write_run_files(directory: Path, report: dict[str, Any], resolved: dict[str, Any]) -> None:
    """``report.json``, ``neuroal_config.yaml`` and the model card ``README.md``."""
    write_json(directory / "report.json", report)
    (directory / "neuroal_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    (directory / "README.md").write_text(model_card(report))


def model_card(report: dict[str, Any]) -> str:
    """The model card ``README.md`` (engine.md §9), built by :func:`neuroal.card.prune_card`."""
    from neuroal.card import prune_card

    return prune_card(report)


def slug(text: str) -> str:
    """A file-name friendly version of a model name or option."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"
