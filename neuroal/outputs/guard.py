"""Checks of a run's inputs before any weight is loaded: what a run reads (so that nothing it
writes touches it), what the checkpoint holds against what its config declares, and where a
run would execute code from its inputs.

Every function reads headers and names only (never a weight) and raises the user errors of
:mod:`neuroal.runtime.errors` (exit code 2 from every entry point) or logs a warning where running is
right. The write rules themselves live in :mod:`neuroal.outputs.safety`.
"""

from __future__ import annotations

import json
import os
import re
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from neuroal.data import parse_source
from neuroal.models.loading import ModelSource, input_paths, resolve_model
from neuroal.outputs.safety import check_file_output, check_output_path
from neuroal.runtime.errors import AdapterError, ConfigError, ModelSourceError
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FN", "F8_E8M0")
"""safetensors dtypes neuroal prunes (the rest, I8 ... BOOL, would be cast silently)."""
ENCODER_HEADS = re.compile(r"(ForMaskedLM|ForPreTraining|ForSequenceClassification|"
                           r"ForTokenClassification|ForQuestionAnswering|ForMultipleChoice|"
                           r"ForNextSentencePrediction)$")
_HEADER_MAX = 100 * 2**20  # a safetensors header larger than this is corrupt


# --------------------------------------------------------------------------- what a run reads


def run_inputs(cfg: Any, source: ModelSource | None, extra: Iterable[str | Path] = ()) -> list[str]:
    """Every local path ``cfg`` reads: the model (folder or ``.gguf``), its tokenizer, the
    calibration and evaluation text or token files, the data folder, lm-eval's include path,
    an allocation file, plus ``extra`` (the YAML recipe). Links inside folders are followed by
    :func:`neuroal.outputs.safety.input_closure` where the output checks use them."""
    paths: list[str] = list(input_paths(source)) if source is not None else []
    for spec in [cfg.calib.source, *cfg.eval.datasets]:
        try:
            parsed = parse_source(spec)
        except (ValueError, OSError):
            continue
        if parsed.arg and parsed.name in ("text", "tokens"):
            paths.append(os.path.expanduser(str(parsed.arg)))
    for value in (cfg.model.tokenizer, cfg.calib.data_dir, cfg.eval.include_path,
                  (cfg.allocation.options or {}).get("path"), *extra):
        if isinstance(value, (str, Path)) and value and Path(os.path.expanduser(str(value))).exists():
            paths.append(os.path.expanduser(str(value)))
    return list(dict.fromkeys(paths))


def source_or_none(cfg: Any) -> ModelSource | None:
    """The resolved model source of ``cfg``, or None when it does not resolve (the run's own
    checks then say why)."""
    try:
        return resolve_model(cfg.model.name, cfg.model.revision)
    except ModelSourceError:
        return None


def check_log_file(cfg: Any, inputs: Iterable[str | Path]) -> None:
    """``log.file`` (``--log-file``) under the write guard of every single file neuroal writes:
    not an input, not a folder or device, not an existing file neuroal did not write unless
    ``log.allow_existing`` (``--allow-existing``)."""
    if cfg.log.file:
        check_file_output(cfg.log.file, inputs, allow_existing=cfg.log.allow_existing is True,
                          kind="log", flag="--log-file")


# --------------------------------------------------------------------------- the model


def check_decoder_lm(config: Any, name: str) -> None:
    """Refuse an encoder (BERT, RoBERTa, ...) that transformers also maps to a causal-LM class:
    its declared architectures are masked-LM / classification heads and it is no decoder."""
    archs = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    is_decoder = getattr(config, "is_decoder", False) is True
    if archs and not is_decoder and all(ENCODER_HEADS.search(a) for a in archs):
        raise AdapterError(
            f"model {name!r} (model_type {getattr(config, 'model_type', '?')!r}, architectures "
            f"{archs}) is not a decoder LM: it is an encoder with a masked-LM or classification "
            "head; neuroal prunes decoder-only causal language models (Llama, Mistral, Qwen, "
            "OPT, Phi, Gemma, ...)")


def check_source(source: ModelSource) -> None:
    """File-level checks of a local model before its config is read: a GGUF file's header and
    tensor directory (truncated or corrupt files named), a folder's index (``weight_map``
    entries must name files inside the folder)."""
    if source.kind == "gguf":
        check_gguf(Path(source.location) / str(source.gguf_file))
    elif source.kind == "hf_dir":
        _check_index(Path(source.location))


def check_gguf(path: Path) -> None:
    """A GGUF file whose magic, header and tensor directory can be read and whose tensors lie
    inside the file; raises ModelSourceError naming the file and what is wrong."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(24)
    if head[:4] != b"GGUF":
        raise ModelSourceError(f"model file {str(path)!r} is not a GGUF file (it starts with "
                               f"{head[:4]!r}, not b'GGUF'); give a .gguf file from llama.cpp's "
                               "convert script or the hub")
    if len(head) < 24:
        raise ModelSourceError(f"GGUF file {str(path)!r} is truncated: {size} bytes, shorter "
                               "than the 24-byte GGUF header; download it again")
    version, tensors, fields = struct.unpack("<IQQ", head[4:24])
    if version not in (1, 2, 3) or tensors > 10**7 or fields > 10**7:
        raise ModelSourceError(f"GGUF file {str(path)!r} has a corrupt header (version "
                               f"{version}, {tensors} tensors, {fields} metadata fields); "
                               "download it again")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse failure of a foreign file is corrupt input
        raise ModelSourceError(
            f"GGUF file {str(path)!r} is truncated or corrupt: its metadata or tensor directory "
            f"cannot be read ({type(exc).__name__}: {str(exc)[:160]}); {size} bytes on disk; "
            "download it again") from None
    for tensor in reader.tensors:
        end = int(tensor.data_offset) + int(tensor.n_bytes)
        if end > size:
            raise ModelSourceError(
                f"GGUF file {str(path)!r} is truncated: tensor {tensor.name!r} ends at byte "
                f"{end}, the file has {size} bytes; download it again")


def _check_index(directory: Path) -> None:
    index = directory / "model.safetensors.index.json"
    if not index.is_file():
        return
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        files = set(weight_map.values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelSourceError(f"{str(index)!r} is not a safetensors index (a JSON object with "
                               f"a weight_map of tensor -> file): {exc}") from None
    outside = sorted(f for f in files if not isinstance(f, str) or Path(f).is_absolute()
                     or ".." in Path(f).parts or "/" in f or "\\" in f)
    if outside:
        raise ModelSourceError(
            f"the index {str(index)!r} maps tensors to files outside the model folder "
            f"({', '.join(map(repr, outside[:4]))}); neuroal reads only the shards in "
            f"{str(directory)!r}: fix weight_map to name files in that folder")


def safetensors_dtypes(path: Path) -> dict[str, str]:
    """``tensor name -> safetensors dtype`` from a shard's header (no tensor data read)."""
    with path.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) < 8:
            raise ModelSourceError(f"shard {str(path)!r} is truncated ({len(raw)} bytes)")
        (length,) = struct.unpack("<Q", raw)
        if length > _HEADER_MAX:
            raise ModelSourceError(f"shard {str(path)!r} has a corrupt header (length {length})")
        header = json.loads(handle.read(length))
    return {k: v.get("dtype", "?") for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict)}


def check_checkpoint(source: ModelSource, config: Any, adapter: Any) -> None:
    """A local checkpoint against its config, from the shard headers: every block it holds is
    one the config declares, and every weight the model prunes is floating point.

    Raises:
        ModelSourceError: naming the tensors, the shard and what to fix.
    """
    if source.kind != "hf_dir":
        return
    directory = Path(source.location)
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"] if (directory / "model.safetensors").is_file() else []
    dtypes: dict[str, tuple[str, str]] = {}
    for fname in files:
        if (directory / fname).is_file():
            for name, dtype in safetensors_dtypes(directory / fname).items():
                dtypes[name] = (dtype, fname)
    _check_blocks(dtypes, adapter, config, source.name)
    if getattr(config, "quantization_config", None) is None:  # quantized formats pack ints
        _check_float(dtypes, adapter, source.name)


def _blocks_prefix(adapter: Any) -> str | None:
    first = adapter.blocks[0] if len(adapter.blocks) else None
    for name, module in adapter.model.named_modules():
        if module is first:
            return name.rsplit(".", 1)[0]
    return None


def _check_blocks(dtypes: dict[str, tuple[str, str]], adapter: Any, config: Any, name: str) -> None:
    prefix = _blocks_prefix(adapter)
    if prefix is None:
        return
    pattern = re.compile(rf"^{re.escape(prefix)}\.(\d+)\.")
    count = len(adapter.blocks)
    extra: dict[int, str] = {}
    for tensor in dtypes:
        match = pattern.match(tensor)
        if match and int(match.group(1)) >= count:
            extra.setdefault(int(match.group(1)), tensor)
    if extra:
        blocks = sorted(extra)
        raise ModelSourceError(
            f"model {name!r}: the checkpoint holds blocks {blocks[0]}-{blocks[-1]} (e.g. tensor "
            f"{extra[blocks[0]]!r}) but its config declares {count} blocks "
            f"(num_hidden_layers={getattr(config, 'num_hidden_layers', count)}); pruning would "
            "silently drop them: fix num_hidden_layers in config.json or use the matching "
            "checkpoint")


def _check_float(dtypes: dict[str, tuple[str, str]], adapter: Any, name: str) -> None:
    params = {n for n, _ in adapter.model.named_parameters()}
    bad = sorted((t, d, f) for t, (d, f) in dtypes.items()
                 if t in params and d not in FLOAT_DTYPES)
    if bad:
        tensor, dtype, fname = bad[0]
        raise ModelSourceError(
            f"model {name!r}: {len(bad)} weight(s) are stored as non-float types, e.g. "
            f"{tensor!r} as {dtype} in shard {fname!r}; neuroal prunes floating-point weights "
            f"({', '.join(FLOAT_DTYPES[:4])}, FP8) and will not cast integers silently: export "
            "the model in a float dtype")


def check_prunable(adapter: Any, name: str) -> None:
    """Refuse, before loading, a model whose blocks hold no ``nn.Linear`` to prune, naming the
    weight-bearing layer types found instead (GPT-2's ``Conv1D``)."""
    import torch.nn as nn

    if any(adapter.all_linears(block) for block in adapter.blocks):  # before any selection
        return
    found: dict[str, list[str]] = {}
    for block in adapter.blocks[:1]:
        for sub, module in block.named_modules():
            weight = getattr(module, "weight", None)
            if sub and not isinstance(module, nn.Linear) and getattr(weight, "dim", lambda: 0)() == 2:
                found.setdefault(type(module).__name__, []).append(sub)
    kinds = "; ".join(f"{k} ({', '.join(v[:4])})" for k, v in found.items()) or "none"
    raise AdapterError(
        f"model {name!r} (model_type {adapter.model_type!r}) has no prunable torch.nn.Linear "
        f"layers in its blocks; block 0 holds: {kinds}. neuroal prunes nn.Linear weights "
        "(GPT-2 style Conv1D layers, which store them transposed, are not supported)")


# --------------------------------------------------------------------------- data and code


def check_text_sources(cfg: Any) -> None:
    """A ``text:<path>`` calibration or evaluation file that holds only whitespace is refused
    (it would tokenise to nothing, or to a window of padding)."""
    errors = []
    for label, spec in [("calib.source", cfg.calib.source)] + [
            ("eval.datasets", d) for d in cfg.eval.datasets]:
        try:
            parsed = parse_source(spec)
        except (ValueError, OSError):
            continue
        if parsed.name == "text" and parsed.arg and _blank(Path(os.path.expanduser(parsed.arg))):
            errors.append(f"{label}: text file {parsed.arg!r} holds only whitespace; give a file "
                          "with text to calibrate or evaluate on")
    if errors:
        raise ConfigError(errors)


def _blank(path: Path) -> bool:
    try:
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                if chunk.strip():
                    return False
    except OSError:
        return False
    return True


def warn_code_execution(trust_remote_code: Any, source: ModelSource | None,
                        include_path: Any = None) -> list[str]:
    """Warn, naming the files, where a run will execute code from its inputs: the model
    folder's Python under ``trust_remote_code=true``, and the ``!function`` hooks (and Python
    files) of an lm-eval include path. Returns the warnings (also logged)."""
    warnings = []
    if trust_remote_code is True and source is not None:
        if source.kind == "hf_dir":
            files = sorted(p.name for p in Path(source.location).glob("*.py"))
            where = (f"the model folder {source.location!r}: {', '.join(files)}" if files
                     else f"the model folder {source.location!r} (no .py file there now)")
        else:
            where = f"the hub repository {source.location!r}"
        warnings.append(f"model.trust_remote_code=true: transformers will import and run Python "
                        f"code from {where}; only use it for a model whose code you trust")
    if include_path:
        root = Path(os.path.expanduser(str(include_path)))
        hooks = sorted(str(p.relative_to(root)) for p in root.rglob("*.y*ml")
                       if p.is_file() and "!function" in p.read_text(errors="replace"))
        code = sorted(str(p.relative_to(root)) for p in root.rglob("*.py"))
        if hooks or code:
            warnings.append(
                f"eval.include_path {str(root)!r}: lm-eval will run Python from it"
                + (f" (!function in {', '.join(hooks[:8])})" if hooks else "")
                + (f"; Python files: {', '.join(code[:8])}" if code else "")
                + "; only use task folders you trust")
    for text in warnings:
        log.warning("%s", text)
    return warnings


# --------------------------------------------------------------------------- disk space


def check_writes(cfg: Any, extra_inputs: Iterable[str | Path] = ()) -> None:
    """At the command line, before the pipeline: ``--output`` and ``--log-file`` against every
    input including the YAML recipe (``extra_inputs``), which the config does not record."""
    inputs = run_inputs(cfg, source_or_none(cfg), [p for p in extra_inputs if p])
    check_log_file(cfg, inputs)
    if cfg.output.dir:
        check_output_path(Path(cfg.output.dir), cfg.output.overwrite is True, inputs)
