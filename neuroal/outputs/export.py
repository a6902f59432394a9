"""Everything written to disk: atomic output directory, shards + index, config, tokenizer,
report, plan and model card (engine.md §8-9).

What lives here: the output directory and its staging, the shard index and config files, and
the export of a run's pruned weights (:func:`export_model`, :func:`write_weights`; the shards
themselves are written by the executor's workers, each for its own blocks).

What it may import: the ``outputs`` floor and below (models, config, runtime). The run's
config, prepared inputs, executor and plan arrive as arguments (type hints only under
``TYPE_CHECKING``): this module never imports the engine or the pipeline.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml

from neuroal.config.inputs import parse_size as parse
from neuroal.models.loading import ModelSource, source_dtype
from neuroal.outputs.card import prune_card
from neuroal.outputs.checkpoint import drain_state_writers
from neuroal.outputs.compat import make_loadable
from neuroal.outputs.plots import write_plots
from neuroal.outputs.safety import (
    OutputExistsError,  # noqa: F401 - re-exported: neuroal.outputs.export.OutputExistsError
    OutputLock,
    check_output_path,
    check_tmp,
    clear_tmp,
    swap_into_place,
    write_marker,
)
from neuroal.runtime.logging import get_logger

if TYPE_CHECKING:
    from neuroal.allocation import SparsityPlan
    from neuroal.config.build import PruneConfig
    from neuroal.engine.executor import Executor
    from neuroal.pipeline import Prepared

log = get_logger(__name__)


def parse_size(text: str | int) -> int:
    """``"2GB"`` -> 2_000_000_000 bytes, ``"2GiB"`` -> 2 * 2^30 (:func:`neuroal.config.inputs.parse_size`,
    the one size parser of ``output.shard_size`` and ``engine.memory_limit``)."""
    return parse(text, "output.shard_size")


@dataclass
class OutputDir:
    """The final output path and its sibling temporary directory ``<output>.neuroal-tmp``.

    The path is made absolute (``--output .`` and ``..`` name real directories). The safety
    rules (what may be written or replaced, the lock, the swap) live in :mod:`neuroal.outputs.safety`.
    """

    path: Path
    overwrite: bool = False
    lock: OutputLock = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.path = Path(os.path.abspath(os.path.expanduser(str(self.path))))
        self.lock = OutputLock(self.tmp)

    @property
    def tmp(self) -> Path:
        return self.path.with_name(self.path.name + ".neuroal-tmp")

    @property
    def staging(self) -> Path:
        return self.tmp / "model"

    @property
    def state(self) -> Path:
        return self.tmp / "state"

    def check(self, overwrite: bool, resume: bool = False, inputs: Iterable[str | Path] = ()) -> None:
        """Refuse, before any heavy work and without side effects, an output path that may not
        be written: an existing output without ``overwrite``, one neuroal did not write, a link,
        a file, an unwritable parent, or a path that is, contains or lies inside an input."""
        self.overwrite = overwrite
        check_output_path(self.path, overwrite, inputs)

    def acquire(self, overwrite: bool, resume: bool = False) -> None:
        """Take the output's lock (refused while another run holds it), then check what a
        previous run left in the temporary directory: reused with ``resume``, replaced with
        ``overwrite``. Release with :meth:`release` (``atomic`` does it on exit)."""
        self.overwrite = overwrite
        self.lock.acquire()
        try:
            check_tmp(self.tmp, self.path, overwrite, resume)
        except BaseException:
            self.lock.release()
            raise

    def release(self) -> None:
        self.lock.release()

    @contextmanager
    def atomic(self, keep_state: bool = False, kind: str = "prune") -> Iterator[Path]:
        """Yield the staging directory ``<tmp>/model``; move it to ``path`` only if the body
        completes (old output moved aside, new one moved in, old one deleted), then delete the
        temporary directory. Takes the lock if :meth:`acquire` has not, releases it on exit.

        On any failure, Ctrl-C included, ``model/`` is removed and nothing appears at ``path``;
        with ``keep_state`` the resume state ``<tmp>/state`` survives (engine.md §8).
        """
        if not self.lock.held:
            self.acquire(self.overwrite, resume=keep_state)
        try:
            clear_tmp(self.tmp, keep=("state",) if keep_state else ())
            self.staging.mkdir(parents=True)
            try:
                yield self.staging
            except BaseException:
                drain_state_writers()  # blocks computed before the failure stay resumable
                if keep_state and self.state.exists():
                    shutil.rmtree(self.staging, ignore_errors=True)
                    log.warning("run failed; resume state kept in %s (rerun with --resume)",
                                self.state)
                else:
                    clear_tmp(self.tmp, keep=())
                raise
            write_marker(self.staging, kind)
            swap_into_place(self.staging, self.path, self.overwrite)
            clear_tmp(self.tmp, keep=())
        finally:
            self.release()


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
        os.chmod(directory / final, regular_mode())  # safetensors writes 0600: servers run as others
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


def regular_mode() -> int:
    """The mode a plain ``open()`` gives a new file under the current umask (0644 under the
    usual 022): what every file of an output gets, shards included."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def causal_lm_architecture(config: Any) -> str | None:
    """The transformers causal-LM class name for ``config.model_type`` (``LlamaForCausalLM``),
    or None for a model type transformers does not map."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(getattr(config, "model_type", None))


def write_config(directory: Path, config: Any, dtype_name: str) -> None:
    """``config.json`` (with the exported dtype, and always with ``architectures``: configs
    converted from GGUF have none, and vLLM's registry refuses a model without it) and
    ``generation_config.json``."""
    from transformers import GenerationConfig

    config = config.__class__.from_dict(config.to_dict())
    config.dtype = dtype_name
    if not getattr(config, "architectures", None):
        arch = causal_lm_architecture(config)
        if arch is None:
            raise ValueError(f"model_type {getattr(config, 'model_type', None)!r} has no "
                             "transformers causal-LM class to name in config.json "
                             "'architectures'; set 'architectures' in the source config.json")
        config.architectures = [arch]
    for attr in ("quantization_config", "sparsity_config"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.save_pretrained(directory)
    GenerationConfig.from_model_config(config).save_pretrained(directory)
    make_loadable(directory)  # keys transformers 4.5x / vLLM need (neuroal.outputs.compat)


def write_run_files(directory: Path, report: dict[str, Any], resolved: dict[str, Any],
                    card: bool = True) -> None:
    """``report.json``, ``neuroal_config.yaml`` and, with ``card`` (the weights are there: a
    card describes a model, never a report alone), the model card ``README.md``."""
    write_json(directory / "report.json", report)
    (directory / "neuroal_config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    if card:
        (directory / "README.md").write_text(model_card(report))


def model_card(report: dict[str, Any]) -> str:
    """The model card ``README.md`` (engine.md §9), built by :func:`neuroal.outputs.card.prune_card`."""
    return prune_card(report)


def slug(text: str) -> str:
    """A file-name friendly version of a model name or option."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-").lower() or "model"


# --------------------------------------------------------------------------- a run's weights


def export_model(cfg: PruneConfig, prep: Prepared, executor: Executor, plan: SparsityPlan,
                 staging: Path, report: dict[str, Any], weights: bool = True) -> None:
    """Shards (written per worker; not when ``weights`` is False, e.g. already written by
    whole-model PERP), index, config, tokenizer, plan, report, model card."""
    if weights and cfg.output.save_model:
        write_weights(cfg, prep, executor, staging, report)
    plan.save(staging)
    if cfg.output.plots:
        report["plots"] = write_plots(staging, report)
    write_run_files(staging, report, cfg.to_dict(), card=cfg.output.save_model)


def write_weights(cfg: PruneConfig, prep: Prepared, executor: Executor, directory: Path,
                  report: dict[str, Any]) -> None:
    """Shards (written per worker), index, config and tokenizer; records ``export_dtype``."""
    dtype = _export_dtype(cfg, prep)
    files = executor.write_shards(str(directory), dtype, parse_size(cfg.output.shard_size))
    finalize_shards(directory, files)
    write_config(directory, prep.config, dtype)
    prep.tokenizer.save_pretrained(directory)
    make_loadable(directory)  # tokenizer_class older transformers can import
    report["export_dtype"] = dtype


def _export_dtype(cfg: PruneConfig, prep: Prepared) -> str:
    """``auto``: the source dtype (GGUF: the run dtype), else the configured one."""
    return export_dtype(cfg, prep.source, prep.config, prep.dtype)


def export_dtype(cfg: PruneConfig, source: ModelSource, config: Any, dtype: torch.dtype) -> str:
    """:func:`_export_dtype` before :class:`Prepared` exists (the free-space check)."""
    if cfg.output.dtype != "auto":
        return cfg.output.dtype
    return str(source_dtype(config, dtype) if source.kind != "gguf"
               else dtype).removeprefix("torch.")
