"""Exports load in the oldest transformers the README claims.

An export is written with the current transformers (5.x), then loaded in a second venv holding
the oldest supported transformers (4.56) in a subprocess; its logits must match the current
version's. The venv is built on first use under the neuroal cache (``$NEUROAL_CACHE``, default
``~/.cache/neuroal``) with pip from the package registry (about 1.5 minutes), or taken from
``$NEUROAL_OLD_TRANSFORMERS_PYTHON``. The models carry a non-default RoPE base (and linear RoPE
scaling), which an old reader silently replaces by 10000 unless ``config.json`` has the
top-level keys; the GGUF-sourced export carries a GGUF tokenizer, which transformers 5 saves as
``TokenizersBackend``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA_DIR, VOCAB, tiny_cfg
from gguf_fixture import tiny_llama, write_tiny_llama_gguf

from neuroal.outputs.compat import legacy_config, legacy_rope_keys, legacy_tokenizer_config
from neuroal.pipeline import run

OLDEST = "4.56"  # the README's and pyproject's claim: transformers>=4.56
HELPER = Path(__file__).with_name("old_transformers_logits.py")
ROPE = {"rope_type": "linear", "factor": 2.0, "rope_theta": 50000.0}
BUILD_TIMEOUT_S = 900


def test_legacy_keys_are_added_not_overwritten() -> None:
    cfg = legacy_config({"rope_parameters": dict(ROPE), "dtype": "bfloat16"})
    assert cfg["rope_theta"] == 50000.0 and cfg["torch_dtype"] == "bfloat16"
    assert cfg["rope_scaling"] == {"rope_type": "linear", "type": "linear", "factor": 2.0}
    assert legacy_rope_keys({"rope_type": "default", "rope_theta": 1e6}) == {
        "rope_theta": 1e6, "rope_scaling": None}
    assert legacy_config({"rope_theta": 7.0, "rope_parameters": dict(ROPE)})["rope_theta"] == 7.0
    assert legacy_rope_keys({"full_attention": {"rope_theta": 1.0}}) == {}  # per-layer-type
    assert legacy_tokenizer_config({"tokenizer_class": "TokenizersBackend"})[
        "tokenizer_class"] == "PreTrainedTokenizerFast"
    assert legacy_tokenizer_config({"tokenizer_class": "LlamaTokenizer"})[
        "tokenizer_class"] == "LlamaTokenizer"


def _build_venv(target: Path) -> Path:
    """A venv with the current torch and transformers ``OLDEST``.*; returns its python."""
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    torch_version = torch.__version__.split("+")[0]
    steps = [[sys.executable, "-m", "venv", str(partial)],
             [str(partial / "bin" / "python"), "-m", "pip", "install", "-q",
              f"torch=={torch_version}", f"transformers=={OLDEST}.*", "safetensors"]]
    try:
        for cmd in steps:
            subprocess.run(cmd, check=True, timeout=BUILD_TIMEOUT_S, capture_output=True, text=True)
    except (subprocess.SubprocessError, OSError) as exc:
        shutil.rmtree(partial, ignore_errors=True)
        detail = getattr(exc, "stderr", "") or ""
        pytest.fail(f"could not build the transformers {OLDEST} venv at {target} ({exc}; "
                    f"{detail[-2000:]}); it needs the package registry once, or set "
                    "NEUROAL_OLD_TRANSFORMERS_PYTHON to a python with that version")
    os.replace(partial, target)
    return target / "bin" / "python"


@pytest.fixture(scope="module")
def old_python() -> Path:
    """A python with transformers ``OLDEST`` (cached venv, built on first use)."""
    given = os.environ.get("NEUROAL_OLD_TRANSFORMERS_PYTHON")
    if given:
        return Path(given)
    cache = Path(os.environ.get("NEUROAL_CACHE", Path.home() / ".cache" / "neuroal"))
    target = cache / f"venv-transformers-{OLDEST}"
    python = target / "bin" / "python"
    if not python.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        python = _build_venv(target)
    return python


def _old_logits(python: Path, directory: Path, ids: torch.Tensor, tmp: Path) -> dict:
    (tmp / "ids.json").write_text(json.dumps(ids.tolist()))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    proc = subprocess.run([str(python), str(HELPER), str(directory), str(tmp / "ids.json"),
                           str(tmp / "old.json")], capture_output=True, text=True, timeout=300,
                          env=env, cwd=tmp)
    assert proc.returncode == 0, f"old transformers could not load the export:\n{proc.stderr[-3000:]}"
    return json.loads((tmp / "old.json").read_text())


def _current_logits(directory: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _check(old_python: Path, out: Path, tmp: Path) -> dict:
    ids = torch.randint(3, VOCAB, (2, 48), generator=torch.Generator().manual_seed(0))
    old = _old_logits(old_python, out, ids, tmp)
    assert old["version"].startswith(OLDEST)
    assert old["rope_theta"] == 50000.0
    torch.testing.assert_close(torch.tensor(old["logits"]), _current_logits(out, ids),
                               rtol=1e-4, atol=1e-4)
    return old


def test_pruned_llama_export_loads_in_oldest_transformers(old_python: Path, tmp_path: Path,
                                                          tokenizer_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, rope_parameters=dict(ROPE),
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    src = tmp_path / "src"
    AutoModelForCausalLM.from_config(config).save_pretrained(src)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, src / f.name)
    out = tmp_path / "out"
    run(tiny_cfg(src, out))
    written = json.loads((out / "config.json").read_text())
    assert written["rope_theta"] == 50000.0 and written["rope_scaling"]["factor"] == 2.0
    _check(old_python, out, tmp_path)


def test_gguf_sourced_export_loads_in_oldest_transformers(old_python: Path, tmp_path: Path,
                                                         tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    (tmp_path / "g").mkdir()
    model = tiny_llama(seed=1, vocab_size=VOCAB,
                       rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    gguf_path = write_tiny_llama_gguf(tmp_path / "g" / "tiny.gguf", model,
                                      tokenizer_dir=tokenizer_dir)
    out = tmp_path / "out"
    run(tiny_cfg(gguf_path, out, calib={"data_dir": str(DATA_DIR)}))
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] \
        == "PreTrainedTokenizerFast"
    old = _check(old_python, out, tmp_path)
    current = AutoTokenizer.from_pretrained(out)
    assert old["tokens"] == current("Hello world, pruning.")["input_ids"]
