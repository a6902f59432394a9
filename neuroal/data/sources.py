"""Calibration from any dataset and from pre-tokenised windows.

Two more registered sources (:data:`neuroal.data.spec.SOURCES`, style rule 3):

* ``hf:<dataset id or path>[:config][:split][:field]``: any dataset ``datasets.load_dataset``
  reads: a hub id (network), a local dataset folder (JSON / JSON lines / parquet / CSV files,
  or a folder written by ``save_to_disk``), or one data file. ``split`` defaults to ``train``;
  ``field`` to ``text`` (or, with ``calib.chat_template=true``, ``messages`` or
  ``conversations``). Empty parts keep their default: ``hf:./chats:::messages``.
  A field holding conversations (a list of ``{role, content}`` messages, or ShareGPT
  ``{from, value}`` turns) is rendered with the tokenizer's chat template, whether or not
  ``calib.chat_template=true`` asked for it, and the source's note says so; a field holding any
  other non-text value (a number, a list, a mapping) is refused, naming the field and the type,
  so no row is ever calibrated on its Python ``str()``.
  Calibration: rows are shuffled with the calibration seed and joined with ``"\\n\\n"`` until
  the text holds about ``CHARS_PER_TOKEN * N * T`` characters, then tokenised once and drawn
  with the stream protocol (:func:`calibration_windows`). Evaluation joins every row in order.
* ``tokens:<file.pt|.npy>``: token ids saved with ``torch.save`` (a tensor, or a dict with
  ``input_ids``) or ``numpy.save``. A 2-D array ``(n, L)`` holds windows: the first ``N`` rows,
  cut to their first ``T`` tokens, are used as they are; a 1-D array is a token stream drawn
  from with the stream protocol. Calibration only.
"""

from __future__ import annotations

import logging
import pickle
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuroal.config.inputs import file_sha256, not_a_file
from neuroal.data.files import DataNotFoundError, load_dataset
from neuroal.data.spec import (
    SOURCES,
    CalibrationData,
    DataSource,
    SourceInfo,
    SourceSpec,
    SourceText,
    TextTokenizer,
)
from neuroal.data.windows import calibration_windows, stream_calibration

logger = logging.getLogger(__name__)

HF_USAGE = "hf:<dataset id or path>[:config][:split][:field]"
TOKENS_USAGE = "tokens:<file.pt|.npy>"
TOKEN_SUFFIXES = (".pt", ".pth", ".npy")
DATA_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv",
                      ".txt": "text", ".arrow": "arrow"}
"""``datasets`` builder for a single local data file, by suffix."""
TEXT_FIELDS = ("text",)
CHAT_FIELDS = ("messages", "conversations")
CHARS_PER_TOKEN = 8
"""Characters gathered per needed token before tokenising (a generous bound: English BPE
averages about 4)."""
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


# --------------------------------------------------------------------------- hf: specs


@dataclass(frozen=True)
class HFSpec:
    """The parts of ``hf:<path>[:config][:split][:field]``."""

    path: str
    config: str | None = None
    split: str = "train"
    field: str | None = None

    @classmethod
    def parse(cls, arg: str) -> HFSpec:
        """Split the argument of an ``hf:`` spec; empty parts keep their defaults.

        Raises:
            ValueError: No dataset, or more than four parts.
        """
        parts = arg.split(":")
        if not parts[0] or len(parts) > 4:
            raise ValueError(f"data source 'hf:{arg}': expected {HF_USAGE}, e.g. "
                             "hf:./my_data::train:text or hf:allenai/c4:en:validation")
        parts += [""] * (4 - len(parts))
        return cls(parts[0], parts[1] or None, parts[2] or "train", parts[3] or None)

    def is_local(self) -> bool:
        """Whether the dataset names a local file or folder (it exists, or looks like a path)."""
        return Path(self.path).expanduser().exists() or self.path.startswith(("/", ".", "~"))


def _check_hf(spec: SourceSpec) -> None:
    """Validate an ``hf:`` spec before any loading: its syntax, and a local path's existence."""
    hf = HFSpec.parse(str(spec.arg))
    if hf.is_local() and not Path(hf.path).expanduser().exists():
        raise DataNotFoundError(f"dataset path {hf.path!r} of 'hf:{spec.arg}' does not exist "
                                f"(resolved to {Path(hf.path).expanduser().resolve()}); give a "
                                "dataset folder, a data file or a hub id")


def load_hf_rows(hf: HFSpec) -> tuple[Any, str]:
    """The rows of a dataset split and the ``datasets`` call that produced them.

    A single local file is read with the builder its suffix names (``json``, ``parquet``,
    ``csv``, ``text``); a folder written by ``Dataset.save_to_disk`` with ``load_from_disk``;
    any other folder or hub id with ``load_dataset(path, config, split=split)``.
    """
    path = Path(hf.path).expanduser()
    if path.is_file():
        builder = DATA_FILE_BUILDERS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"dataset file {hf.path!r}: unknown suffix {path.suffix!r}; expected "
                             f"one of {', '.join(sorted(DATA_FILE_BUILDERS))}")
        call = f"datasets.load_dataset({builder!r}, data_files={str(path)!r}, split='train')"
        return load_dataset(builder, data_files=str(path), split="train"), call
    if path.is_dir() and (path / "dataset_info.json").is_file():
        import datasets

        call = f"datasets.load_from_disk({str(path)!r})"
        loaded = datasets.load_from_disk(str(path))
        return (loaded[hf.split] if hasattr(loaded, "keys") else loaded), call
    target = str(path) if path.is_dir() else hf.path
    call = f"datasets.load_dataset({target!r}, {hf.config!r}, split={hf.split!r})"
    try:
        return load_dataset(target, hf.config, split=hf.split), call
    except Exception as err:  # offline, unknown id, missing split: one clear message
        raise DataNotFoundError(
            f"dataset 'hf:{hf.path}' could not be loaded with {call} ({type(err).__name__}: "
            f"{err}); check the id, config and split, or give a local folder or file") from err


def _pick_field(columns: list[str], hf: HFSpec, chat: bool) -> str:
    """The column holding the text (or the conversation with ``chat``); without ``chat`` a
    conversation field is taken when there is no text field."""
    if hf.field is not None:
        if hf.field not in columns:
            raise ValueError(f"dataset 'hf:{hf.path}' has no field {hf.field!r}; its fields: "
                             f"{', '.join(columns)}")
        return hf.field
    for name in CHAT_FIELDS if chat else TEXT_FIELDS + CHAT_FIELDS:
        if name in columns:
            return name
    wanted = "conversation field (messages, conversations)" if chat else "'text' field"
    raise ValueError(f"dataset 'hf:{hf.path}' has no {wanted}; its fields: {', '.join(columns)}; "
                     f"name one as {HF_USAGE}")


def _messages(turns: Any) -> list[dict[str, str]]:
    """``[{role, content}]`` from OpenAI-style messages or ShareGPT ``{from, value}`` turns."""
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ValueError("calib.chat_template=true needs each row's field to be a list of "
                         f"messages ({{role, content}} or {{from, value}}), got {turns!r:.80}")
    out = []
    for turn in turns:
        if "role" in turn:
            out.append({"role": turn["role"], "content": turn.get("content") or ""})
        else:
            out.append({"role": _SHAREGPT_ROLES.get(turn.get("from"), turn.get("from")),
                        "content": turn.get("value") or ""})
    return out


def _is_turn(value: Any) -> bool:
    return isinstance(value, dict) and ({"role", "content"} <= value.keys()
                                        or {"from", "value"} <= value.keys())


def field_kind(values: list[Any]) -> str:
    """``text`` (every non-null value a string), ``chat`` (every value a non-empty list of
    conversation turns), else the offending Python type's name."""
    present = [v for v in values if v is not None]
    if all(isinstance(v, str) for v in present):
        return "text"
    if all(isinstance(v, list) and v and all(_is_turn(t) for t in v) for v in present):
        return "chat"
    odd = next(v for v in present if not isinstance(v, str))
    return type(odd).__name__


def render_rows(rows: Any, field: str, tokenizer: TextTokenizer | None,
                chat: bool) -> tuple[list[str], bool]:
    """Each row's text, and whether the chat template rendered it: a text field as it is, a
    conversation field through the tokenizer's chat template (asked for or not). Any other
    value is refused rather than stringified."""
    values = list(rows[field])
    kind = field_kind(values)
    if kind == "text" and not chat:
        return [v for v in values if v is not None], False
    if kind not in ("text", "chat"):
        sample = next(v for v in values if v is not None and not isinstance(v, str))
        raise ValueError(f"dataset field {field!r} holds {kind} values (e.g. {sample!r:.60}), "
                         "neither text nor conversations ([{role, content}] or [{from, value}] "
                         f"turns); name a text field as {HF_USAGE}")
    template = getattr(tokenizer, "chat_template", None)
    if tokenizer is None or not template:
        why = "calib.chat_template=true" if chat else f"field {field!r} holds conversations"
        lacking = "the tokenizer has no chat template" if tokenizer is not None else \
            "an evaluation source is read without a tokenizer"
        raise ValueError(f"{why}, but {lacking} to render them; set model.tokenizer to one with "
                         f"a chat template, or name a text field as {HF_USAGE}")
    render = tokenizer.apply_chat_template
    return [render(_messages(v), tokenize=False) for v in values if v is not None], True


def _hf_texts(spec: SourceSpec, tokenizer: TextTokenizer | None, chat: bool,
              purpose: str) -> tuple[list[str], SourceInfo]:
    hf = HFSpec.parse(str(spec.arg))
    rows, call = load_hf_rows(hf)
    field = _pick_field(list(rows.column_names), hf, chat)
    rendered, templated = render_rows(rows, field, tokenizer, chat)
    texts = [t for t in rendered if t.strip()]
    if not texts:
        raise ValueError(f"dataset 'hf:{spec.arg}' field {field!r} holds no text")
    origin = "local" if hf.is_local() else "hub"
    note = f"field {field!r}"
    if templated:
        note += ", chat template applied" + ("" if chat else " (automatically: the field holds "
                                                            "conversations)")
        if not chat:
            logger.warning("calibration field %r of hf:%s holds conversations: rendering them "
                           "with the tokenizer's chat template", field, spec.arg)
    info = SourceInfo(str(spec), purpose, origin, call, None, n_documents=len(texts), note=note)
    return texts, info


def _calibrate_hf(spec: SourceSpec, tokenizer: TextTokenizer, nsamples: int, seqlen: int,
                  seed: int, data_dir: Path | None, *, chat_template: bool = False
                  ) -> CalibrationData:
    texts, info = _hf_texts(spec, tokenizer, chat_template, "calibration")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    budget, picked, chars = CHARS_PER_TOKEN * nsamples * seqlen, [], 0
    for i in order:
        picked.append(texts[i])
        chars += len(texts[i]) + 2
        if chars >= budget:
            break
    text = "\n\n".join(picked)
    note = f"{info.note}; {len(picked)} of {len(texts)} rows shuffled (seed {seed}), joined " \
           "with '\\n\\n'"
    loaded = SourceText(text, replace(info, n_chars=len(text), note=note))
    return stream_calibration(loaded, tokenizer, nsamples, seqlen, seed)


def _hf_evaluation_text(spec: SourceSpec, data_dir: Path | None) -> SourceText:
    texts, info = _hf_texts(spec, None, False, "evaluation")
    text = "\n\n".join(texts)
    return SourceText(text, replace(info, n_chars=len(text),
                                    note=f"{info.note}; every row in order, joined with '\\n\\n'"))


# --------------------------------------------------------------------------- tokens:


def _check_tokens(spec: SourceSpec) -> None:
    path = Path(str(spec.arg)).expanduser()
    if path.suffix.lower() not in TOKEN_SUFFIXES:
        raise ValueError(f"token file {spec.arg!r}: expected a {' or '.join(TOKEN_SUFFIXES)} file "
                         f"({TOKENS_USAGE})")
    if not_a_file(path) is not None:
        raise DataNotFoundError(f"token file {spec.arg!r} {not_a_file(path)} (resolved to "
                                f"{path.resolve()}); write one with torch.save or numpy.save")


def load_token_file(path: Path) -> torch.Tensor:
    """Token ids from a ``.pt`` (tensor or ``{"input_ids": tensor}``) or ``.npy`` file, int64.

    Raises:
        ValueError: Not 1-D or 2-D, not integers, or negative ids.
    """
    if path.suffix.lower() == ".npy":
        ids = torch.from_numpy(np.load(path, allow_pickle=False))
    else:
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise ValueError(f"token file {str(path)!r} cannot be read safely: it is not a plain "
                             "tensor file (torch.load with weights_only=True refused it, nothing "
                             f"in it was run: {str(exc).splitlines()[0][:200]}); save the ids "
                             "with torch.save(tensor) or numpy.save") from None
        ids = loaded["input_ids"] if isinstance(loaded, dict) else loaded
        ids = torch.as_tensor(ids)
    if ids.dim() not in (1, 2) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"token file {str(path)!r} holds a {tuple(ids.shape)} {ids.dtype} array; "
                         "expected integer token ids, 1-D (a stream) or 2-D (windows)")
    if ids.numel() and int(ids.min()) < 0:
        raise ValueError(f"token file {str(path)!r} holds negative token ids")
    return ids.to(torch.int64)


def _calibrate_tokens(spec: SourceSpec, tokenizer: TextTokenizer, nsamples: int, seqlen: int,
                      seed: int, data_dir: Path | None) -> CalibrationData:
    path = Path(str(spec.arg)).expanduser()
    ids = load_token_file(path)
    info = SourceInfo(str(spec), "calibration", "file", str(path.resolve()), file_sha256(path),
                      n_tokens=ids.numel())
    if ids.dim() == 1:
        windows = calibration_windows(ids, nsamples, seqlen, seed, source=str(spec))
        return CalibrationData(windows, replace(info, note="token stream, protocol draw"))
    rows, length = ids.shape
    if rows < nsamples or length < seqlen:
        raise ValueError(f"token file {spec.arg!r} holds {rows} windows of {length} tokens; "
                         f"calibration needs nsamples={nsamples} windows of seqlen={seqlen}; lower "
                         "them or save more / longer windows")
    logger.info("calibration: the first %d of %d pre-tokenised windows, %d tokens each, from %s",
                nsamples, rows, seqlen, path)
    return CalibrationData(ids[:nsamples, :seqlen].clone(),
                           replace(info, note=f"first {nsamples} rows, first {seqlen} tokens"))


def _no_tokens_evaluation(spec: SourceSpec, data_dir: Path | None) -> SourceText:
    raise ValueError("'tokens:' is a calibration-only source (no text to evaluate); evaluate on "
                     "wikitext2, c4, text:<path> or hf:<dataset>")


SOURCES.add("hf", DataSource(HF_USAGE, True, _calibrate_hf, _hf_evaluation_text,
                             check=_check_hf, options=("chat_template",)))
SOURCES.add("tokens", DataSource(TOKENS_USAGE, True, _calibrate_tokens, _no_tokens_evaluation,
                                 check=_check_tokens, calibration_only=True))
