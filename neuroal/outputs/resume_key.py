"""The inputs of the resume key besides the config and the weights: tokenizer and calibration.

:class:`neuroal.outputs.checkpoint.RunState` stores what this module returns in ``meta.json`` and
refuses ``--resume`` when any of it changed (:func:`neuroal.outputs.checkpoint.input_changes` names the
file). The weights' part is :func:`neuroal.models.loading.weights_fingerprint`.

* Tokenizer: every tokenizer file (:data:`TOKENIZER_PATTERNS`) at the top of the folder the
  tokenizer is loaded from (``model.tokenizer`` when it is a local folder, else the model's
  folder), full-file SHA-256. A GGUF file carries its tokenizer (its full digest covers it); a
  hub tokenizer is keyed by its id (in the config) and the cached commit of the model.
* Calibration: the SHA-256 the calibration loader computed of the local source file
  (``text:<path>``, local WikiText-2 / C4); a hub dataset is keyed by its spec; ``self``
  calibration is sampled from the weights, which are keyed already.
"""

from __future__ import annotations

import fnmatch
import os
from pathlib import Path
from typing import Any

from neuroal.models.loading import ModelSource
from neuroal.runtime.digests import file_digests

TOKENIZER_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*",
                      "merges.txt", "*.tiktoken", "spiece.model", "sentencepiece*.model",
                      "chat_template*", "preprocessor_config.json")
"""File names (shell patterns) read by Hugging Face tokenizers from a model folder."""


def tokenizer_folder(source: ModelSource, override: str | None) -> Path | None:
    """The local folder the tokenizer is read from, or None (hub id, GGUF without override)."""
    if override:
        path = Path(os.path.expanduser(override))
        return path if path.is_dir() else None
    return Path(source.location) if source.kind == "hf_dir" else None


def tokenizer_files(folder: Path) -> list[Path]:
    """The tokenizer files at the top of ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and
                  any(fnmatch.fnmatch(p.name, pattern) for pattern in TOKENIZER_PATTERNS))


def tokenizer_fingerprint(source: ModelSource, override: str | None,
                          cache_dir: str | Path | None = None) -> dict[str, Any]:
    """``{"location", "files": {name: {size, sha256}}}`` of the tokenizer's local files
    (``files`` empty when the tokenizer is not a local folder)."""
    folder = tokenizer_folder(source, override)
    if folder is None:
        return {"location": override or source.location, "files": {}}
    files = tokenizer_files(folder)
    digests = file_digests(files, cache_dir)
    return {"location": str(folder.resolve()),
            "files": {p.name: {"size": p.stat().st_size, "sha256": digests[str(p)]}
                      for p in files}}


def calibration_fingerprint(calib: Any, spec: str) -> dict[str, Any]:
    """``{"location", "sha256"}`` of a loaded calibration source (``calib``: a
    :class:`~neuroal.data.calibration.CalibrationData`, or None for ``self``)."""
    info = getattr(calib, "source_info", None)
    if info is None:
        return {"location": spec, "sha256": None}
    return {"location": info.location, "sha256": info.sha256}


def resume_inputs(source: ModelSource, tokenizer: str | None, calib: Any, calib_spec: str,
                  cache_dir: str | Path | None = None) -> dict[str, Any]:
    """What :class:`~neuroal.outputs.checkpoint.RunState` keys on besides the config and the weights.

    Args:
        source: The resolved model.
        tokenizer: ``model.tokenizer`` (None: the model's own).
        calib: The loaded calibration data (None for ``self``).
        calib_spec: ``calib.source``.
        cache_dir: Where file digests are cached (:func:`neuroal.runtime.digests.file_digests`).
    """
    return {"tokenizer": tokenizer_fingerprint(source, tokenizer, cache_dir),
            "calibration": calibration_fingerprint(calib, calib_spec)}
