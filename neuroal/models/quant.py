"""Quantized checkpoints: read ``quantization_config`` first, de-quantize FP8, refuse the rest.

neuroal prunes dense weights. A checkpoint whose ``config.json`` carries a
``quantization_config`` is handled before any weight is read:

* **FP8 with scales** is de-quantized on load, tensor by tensor, in the run dtype:

  - ``quant_method: fp8`` with ``weight_block_size: [br, bc]`` (DeepSeek-V3/R1, Qwen3 FP8,
    transformers' fine-grained FP8): ``weight`` in ``float8_e4m3fn`` and ``weight_scale_inv`` of
    shape ``(ceil(rows / br), ceil(cols / bc))``, one scale per tile;
  - ``quant_method: fp8`` without a block size (AutoFP8): one ``weight_scale`` per tensor;
  - ``quant_method: compressed-tensors`` with ``format: float-quantized`` and 8-bit float weights
    (llm-compressor's FP8 / FP8-dynamic exports): ``weight_scale`` per channel ``(rows, 1)``, per
    tensor ``(1,)`` or per block tile (``strategy: block``).

  In every layout ``w = q * s`` with ``s`` broadcast over its tile, row or tensor; tensors that
  have no scale (embeddings, norms, routers, the head in ``ignore``) load as they are.
* **Every other method** (GPTQ, AWQ, bitsandbytes, packed integer compressed-tensors, HQQ,
  MXFP4, ...) is refused with :class:`QuantizationError`, naming the method: its weights are
  packed integers whose de-quantization neuroal does not implement, so the unquantized checkpoint
  of the model is what to prune.

The maths is :func:`dequantize` (a pure function); :class:`DequantizingCheckpoint` wraps a
:class:`neuroal.models.loading.SafetensorsCheckpoint` so that every executor's workers, which all
read weights through it, get dense tensors; :func:`quantization_report` is what ``report.json``
records under ``source.quantization``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from neuroal.runtime.errors import ModelSourceError
from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

SCALE_SUFFIXES = ("weight_scale_inv", "weight_scale")
"""Names of a weight's scale beside ``<module>.weight`` (the first present is used)."""
SKIPPED_SUFFIXES = ("input_scale", "k_scale", "v_scale", "weight_zero_point")
"""Activation / KV-cache scales of FP8 checkpoints: not weights; the dense model ignores them."""
FP8_STORED = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
"""safetensors dtype names of FP8 tensors."""
LAYOUTS = ("block", "channel", "tensor")


class QuantizationError(ModelSourceError):
    """A quantized checkpoint neuroal cannot load densely; the message names the method and
    says how to proceed."""


@dataclass(frozen=True)
class Fp8Scheme:
    """How an FP8 checkpoint stores its scales.

    Attributes:
        method: ``quant_method`` as written in ``config.json``.
        layouts: The scale layouts the config allows (``block``, ``channel``, ``tensor``).
        block: Tile ``(rows, cols)`` for ``block``; None otherwise.
        fmt: The FP8 format (``e4m3``).
    """

    method: str
    layouts: tuple[str, ...]
    block: tuple[int, int] | None = None
    fmt: str = "e4m3"


# --------------------------------------------------------------------------- config


def quantization_config(config: Any) -> dict[str, Any] | None:
    """The ``quantization_config`` of a ``PretrainedConfig`` as a dict (None when absent)."""
    qc = getattr(config, "quantization_config", None)
    if qc is None:
        return None
    if hasattr(qc, "to_dict"):
        qc = qc.to_dict()
    return dict(qc) if isinstance(qc, Mapping) and qc else None


def _block(value: Any, model: str, key: str) -> tuple[int, int]:
    if not (isinstance(value, list | tuple) and len(value) == 2
            and all(isinstance(v, int) and v > 0 for v in value)):
        raise QuantizationError(f"model {model!r}: quantization_config {key} is {value!r}; "
                                "expected two positive integers [rows, cols]")
    return int(value[0]), int(value[1])


def _hf_fp8(qc: Mapping[str, Any], model: str) -> Fp8Scheme:
    """``quant_method: fp8``: block tiles with ``weight_block_size``, else one scale a tensor."""
    fmt = str(qc.get("fmt", "e4m3"))
    if fmt != "e4m3":
        raise QuantizationError(f"model {model!r}: FP8 format {fmt!r} is not supported (e4m3 is); "
                                "use the unquantized checkpoint of this model")
    if qc.get("weight_block_size") is None:
        return Fp8Scheme("fp8", ("tensor",), None, fmt)
    return Fp8Scheme("fp8", ("block",), _block(qc["weight_block_size"], model,
                                               "weight_block_size"), fmt)




def _compressed_tensors(qc: Mapping[str, Any], model: str) -> Fp8Scheme:
    """``quant_method: compressed-tensors``: only ``float-quantized`` 8-bit float weights."""
    fmt = str(qc.get("format", ""))
    groups = dict(qc.get("config_groups") or {})
    weights = [dict(g.get("weights") or {}) for g in groups.values()]
    float8 = weights and all(w.get("type") == "float" and w.get("num_bits") == 8 for w in weights)
    if fmt != "float-quantized" or not float8:
        raise QuantizationError(_refusal(model, f"compressed-tensors ({fmt or 'no format'})"))
    sparsity = qc.get("sparsity_config") or {}
    if sparsity.get("format") not in (None, "dense"):
        raise QuantizationError(_refusal(model, "compressed-tensors with a compressed sparsity "
                                                f"format ({sparsity.get('format')})"))
    layouts, block = [], None
    for w in weights:
        strategy = str(w.get("strategy"))
        if strategy not in LAYOUTS:  # compressed-tensors' strategy names are our layouts
            raise QuantizationError(
                f"model {model!r}: compressed-tensors FP8 weight strategy {strategy!r} is not "
                f"supported (supported: {', '.join(LAYOUTS)}); use the unquantized "
                "checkpoint of this model")
        layouts.append(strategy)
        if strategy == "block":
            block = _block(w.get("block_structure"), model, "block_structure")
    return Fp8Scheme("compressed-tensors", tuple(dict.fromkeys(layouts)), block, "e4m3")


SUPPORTED: dict[str, Callable[[Mapping[str, Any], str], Fp8Scheme]] = {
    "fp8": _hf_fp8,
    "compressed-tensors": _compressed_tensors,
}
"""``quant_method`` -> parser of its config; every other method is refused."""
ELSEWHERE = frozenset({"gguf"})
"""Methods de-quantized by their own reader (GGUF files: :mod:`neuroal.models.gguf`)."""

_WHY = {  # what the refused formats store (for the message), by quant_method
    "gptq": "4/8-bit integers packed in qweight/qzeros with group scales",
    "awq": "4-bit integers packed in qweight/qzeros with group scales",
    "bitsandbytes": "NF4/FP4/int8 blocks of bitsandbytes",
    "hqq": "HQQ's packed integers", "aqlm": "additive codebooks", "eetq": "int8 weights",
    "mxfp4": "packed 4-bit MXFP4 blocks", "quanto": "optimum-quanto's packed weights",
    "torchao": "torchao tensor subclasses", "fbgemm_fp8": "fbgemm FP8 with its own layout",
}


def _refusal(model: str, method: str) -> str:
    what = _WHY.get(method.split(" ")[0])
    return (f"model {model!r} is quantized with {method}"
            + (f" ({what})" if what else "")
            + "; neuroal prunes dense weights and de-quantizes only FP8 checkpoints with scales "
            "(quant_method fp8, or compressed-tensors float-quantized 8-bit). Prune the "
            "unquantized (bf16/fp16) checkpoint of this model instead (usually the repository "
            "the quantized one was made from); nothing was loaded")


def quantization_scheme(config: Any, model: str) -> Fp8Scheme | None:
    """The FP8 scheme of a checkpoint's config, None for a dense one.

    Raises:
        QuantizationError: Any other ``quant_method`` (named in the message), or a malformed
            FP8 config; raised from the config alone, before any weight is read.
    """
    qc = quantization_config(config)
    if qc is None:
        return None
    method = str(qc.get("quant_method") or ("bitsandbytes" if qc.get("load_in_4bit")
                                            or qc.get("load_in_8bit") else "unknown")).lower()
    if method in ELSEWHERE:
        return None
    parse = SUPPORTED.get(method)
    if parse is None:
        raise QuantizationError(_refusal(model, method))
    return parse(qc, model)


def quantization_report(config: Any, dtype: torch.dtype) -> dict[str, Any] | None:
    """``report["source"]["quantization"]``: ``{method, layouts, block, format,
    dequantized_to}``, or None for a dense checkpoint."""
    scheme = quantization_scheme(config, str(getattr(config, "name_or_path", "") or "model"))
    if scheme is None:
        return None
    return {"method": scheme.method, "format": scheme.fmt, "layouts": list(scheme.layouts),
            "block": list(scheme.block) if scheme.block else None,
            "dequantized_to": str(dtype).removeprefix("torch.")}


# --------------------------------------------------------------------------- maths


def scale_layout(weight_shape: tuple[int, ...], scale_shape: tuple[int, ...],
                 block: tuple[int, int] | None) -> str:
    """Which layout a scale of ``scale_shape`` has for a weight of ``weight_shape`` (..., r, c).

    ``tensor``: one value; ``channel``: ``(..., r, 1)`` or ``(..., r)``; ``block``:
    ``(..., ceil(r / br), ceil(c / bc))``. Raises ValueError for any other shape.
    """
    *lead, rows, cols = weight_shape
    if math.prod(scale_shape) == 1:
        return "tensor"
    if block is not None and tuple(scale_shape) == (*lead, -(-rows // block[0]),
                                                    -(-cols // block[1])):
        return "block"
    if tuple(scale_shape) in ((*lead, rows, 1), (*lead, rows)):
        return "channel"
    raise ValueError(f"scale of shape {tuple(scale_shape)} fits no FP8 layout of a weight of "
                     f"shape {tuple(weight_shape)} (block {block})")


def dequantize(q: torch.Tensor, scale: torch.Tensor,
               block: tuple[int, int] | None = None) -> torch.Tensor:
    """FP8 values times their scales, in float32: ``w[i, j] = q[i, j] * s[tile(i, j)]``.

    Args:
        q: Quantized weight ``(..., r, c)`` (FP8, or any dtype holding its values).
        scale: ``()``/``(1,)`` per tensor, ``(..., r, 1)``/``(..., r)`` per row, or
            ``(..., ceil(r / br), ceil(c / bc))`` per ``block = (br, bc)`` tile (edge tiles
            partial).
        block: The tile size of block scales.

    Returns:
        The de-quantized weight ``(..., r, c)`` in float32.
    """
    w = q.to(torch.float32)
    s = scale.to(device=w.device, dtype=torch.float32)
    layout = scale_layout(tuple(q.shape), tuple(scale.shape), block)
    if layout == "tensor":
        return w.mul_(s.reshape(()))
    if layout == "channel":
        return w.mul_(s.reshape(*q.shape[:-1], 1))
    assert block is not None
    rows, cols = q.shape[-2:]
    tiles = s.repeat_interleave(block[0], dim=-2)[..., :rows, :]  # (..., r, ceil(c / bc))
    return w.mul_(tiles.repeat_interleave(block[1], dim=-1)[..., :cols])  # (..., r, c)


# --------------------------------------------------------------------------- checkpoints


def scale_key(name: str, stored: set[str] | Mapping[str, Any]) -> str | None:
    """The stored scale of weight ``name`` (``x.weight`` -> ``x.weight_scale_inv`` or
    ``x.weight_scale``), or None."""
    if not name.endswith(".weight"):
        return None
    stem = name[: -len("weight")]
    return next((stem + s for s in SCALE_SUFFIXES if stem + s in stored), None)


def _is_aux(name: str) -> bool:
    return name.rpartition(".")[2] in (*SCALE_SUFFIXES, *SKIPPED_SUFFIXES)


def with_scales(needed: Iterable[str], stored: Mapping[str, Any]) -> set[str]:
    """``needed`` plus the stored scales of its weights (a hub download fetches their shards)."""
    out = set(needed)
    out |= {k for k in (scale_key(n, stored) for n in needed) if k is not None}
    return out


class DequantizingCheckpoint:
    """A safetensors checkpoint whose FP8 weights load de-quantized (see the module docstring).

    ``names()`` hides the scales; ``load`` returns every asked tensor in ``dtype``: an FP8
    weight is read in float32 (exact), multiplied by its scale on ``device`` and cast, one
    tensor at a time (the transient is one float32 copy of the largest matrix). Other
    attributes (``where``, ``verify``, ``opened``, ``directory``...) are the wrapped reader's.
    """

    def __init__(self, inner: Any, scheme: Fp8Scheme) -> None:
        self.inner, self.scheme = inner, scheme
        self.dequantized = 0  # tensors de-quantized so far (tests and logs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def names(self) -> set[str]:
        return {n for n in self.inner.names() if not _is_aux(n)}

    def load(self, names: Iterable[str], dtype: torch.dtype,
             device: torch.device | str) -> dict[str, torch.Tensor]:
        names = list(names)
        stored = self.inner.names()
        scales = {n: k for n in names if (k := scale_key(n, stored)) is not None}
        self._check_fp8(names, scales)
        out = self.inner.load([n for n in names if n not in scales], dtype, device)
        for name, key in scales.items():  # one at a time: a single float32 copy is alive
            raw = self.inner.load([name, key], torch.float32, device)
            out[name] = self._dense(name, raw[name], raw[key]).to(dtype)
        return out

    def _dense(self, name: str, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        try:
            layout = scale_layout(tuple(q.shape), tuple(scale.shape), self.scheme.block)
        except ValueError as exc:
            raise ModelSourceError(f"tensor {name!r} in {self.where(name)}: {exc}; the "
                                   "checkpoint does not match its quantization_config") from exc
        if layout not in self.scheme.layouts:
            raise ModelSourceError(
                f"tensor {name!r} in {self.where(name)} has a {layout} scale, but the "
                f"quantization_config declares {', '.join(self.scheme.layouts)}; the checkpoint "
                "does not match its config")
        self.dequantized += 1
        return dequantize(q, scale, self.scheme.block)

    def _check_fp8(self, names: list[str], scales: Mapping[str, str]) -> None:
        """An FP8 tensor without a scale, or a scaled tensor that is not FP8, is refused."""
        dtypes = stored_dtypes(self.inner, names)
        for name in names:
            fp8 = dtypes.get(name) in FP8_STORED
            if fp8 != (name in scales):
                state = "is FP8 but has no scale" if fp8 else \
                    f"has a scale ({scales[name]!r}) but is stored as {dtypes.get(name)}"
                raise ModelSourceError(f"tensor {name!r} in {self.where(name)} {state}; the "
                                       "checkpoint is incomplete or not the FP8 format its "
                                       "config declares")

    def where(self, name: str) -> str:
        where = getattr(self.inner, "where", None)
        return where(name) if where is not None else "the checkpoint"


def stored_dtypes(checkpoint: Any, names: Iterable[str]) -> dict[str, str]:
    """safetensors dtype names (``BF16``, ``F8_E4M3``...) of ``names``, read from the headers."""
    from safetensors import safe_open

    by_file: dict[str, list[str]] = {}
    for name in names:
        if name in checkpoint.weight_map:
            by_file.setdefault(checkpoint.weight_map[name], []).append(name)
    out: dict[str, str] = {}
    for fname, tensors in by_file.items():
        with safe_open(str(checkpoint.directory / fname), framework="pt", device="cpu") as f:
            out.update({n: f.get_slice(n).get_dtype() for n in tensors})
    return out


def dequantizing(checkpoint: Any, config: Any, model: str) -> Any:
    """``checkpoint`` wrapped in a :class:`DequantizingCheckpoint` when ``config`` declares FP8;
    itself otherwise (non-FP8 methods were refused with the config)."""
    scheme = quantization_scheme(config, model)
    if scheme is None:
        return checkpoint
    log.info("model %r: FP8 checkpoint (%s, %s scales%s); weights are de-quantized as they load",
             model, scheme.method, "/".join(scheme.layouts),
             f" of {scheme.block[0]}x{scheme.block[1]} tiles" if scheme.block else "")
    return DequantizingCheckpoint(checkpoint, scheme)
