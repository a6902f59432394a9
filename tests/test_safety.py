"""Bad input through every entry point (input validation): exit code 2, a message
naming the value, no traceback, nothing loaded, and no file outside neuroal's output changed.

Each case runs ``main(argv)`` in-process inside a sandbox directory (the working directory, a
copy of a tiny random model, calibration files); a few run as real subprocesses to prove that
stderr holds no traceback.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import DATA_DIR, REPO

from neuroal import cli
from neuroal.commands import evaluate as evaluate_mod
from neuroal.config.build import ConfigError, load_config
from neuroal.engine import executor as executor_mod

BLOCK1 = "model.layers.1.mlp.down_proj.weight"
NORM = "model.norm.weight"  # not pruned: a non-finite value there used to reach the output


def _launch(name: str):
    spec = importlib.util.spec_from_file_location(f"launch_{name}", REPO / "launch" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plan_mod, recover_mod = _launch("plan"), _launch("recover")


# --------------------------------------------------------------------------- sandbox


def snapshot(root: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``root`` (directories as ``dir``), except
    neuroal's own temporary directories ``*.neuroal-tmp`` (a failed run may keep its state)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if any(part.endswith(".neuroal-tmp") for part in Path(rel).parts):
            continue
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _shard_of(model: Path, key: str) -> Path:
    index = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    return model / index[key]


@pytest.fixture()
def sandbox(tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working directory: a tiny model (clean, NaN, truncated), text files, a precious file."""
    from safetensors.torch import load_file, save_file

    root = tmp_path / "sandbox"
    root.mkdir()
    model = root / "model"
    shutil.copytree(tiny_models["llama"], model)
    for name, key, value in (("nan", BLOCK1, float("nan")), ("inf", NORM, float("inf"))):
        shutil.copytree(model, root / name)
        shard = _shard_of(root / name, key)
        tensors = load_file(str(shard))
        tensors[key].view(-1)[3] = value
        save_file(tensors, str(shard), metadata={"format": "pt"})
    shutil.copytree(model, root / "trunc")
    shard = _shard_of(root / "trunc", BLOCK1)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    text = (DATA_DIR / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")[:20_000]
    (root / "small.txt").write_text(text, encoding="utf-8")
    ascii_300 = b"plain text line\n" * 18 + b"twelve bytes"
    (root / "binary.txt").write_bytes(ascii_300 + b"\x00\x01\x02PNG" + bytes(range(3, 40)))
    (root / "latin1.txt").write_bytes(ascii_300 + "café".encode("latin-1"))
    (root / "afile").write_text("not a model")
    (root / "precious.txt").write_text("mine")
    (root / "trc.yaml").write_text(f"model: {{name: {model}, trust_remote_code: \"false\"}}\n")
    (root / "many.yaml").write_text("model: 42\nsparsity: 2\ncalib: {nsamples: 0}\n"
                                    "criterion: nope\n")
    monkeypatch.chdir(root)
    return root


@pytest.fixture()
def no_model_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail if weights would be loaded: a worker (prune, evaluate) or from_pretrained (recover)."""
    from transformers import AutoModelForCausalLM

    def refuse(*_args, **_kwargs):
        raise AssertionError("weights were loaded before the input was rejected")

    monkeypatch.setattr(executor_mod, "Worker", refuse)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


def _capture(main: Callable[[list[str]], int], argv: list[str], caplog: pytest.LogCaptureFixture,
             capsys: pytest.CaptureFixture) -> tuple[int, str]:
    """Exit code and everything said (neuroal's logs and stderr); an exception fails the test."""
    logger = logging.getLogger("neuroal")
    caplog.clear()
    capsys.readouterr()
    for handler in logger.handlers:  # neuroal's own stderr handler: this test's stderr
        if type(handler) is logging.StreamHandler:
            handler.stream = sys.stderr
    with caplog.at_level(logging.ERROR, logger="neuroal"):
        logger.addHandler(caplog.handler)
        try:
            code = main(argv)
        finally:
            logger.removeHandler(caplog.handler)
    return code, caplog.text + capsys.readouterr().err


def _prune(extra: list[str]) -> list[str]:
    return ["--model", "model", "--calib", "text:small.txt", "--eval", "none", "--nsamples", "2",
            "--seqlen", "16", "--device", "cpu", "--output", "out", *extra]


def _evaluate(extra: list[str], model: str = "model") -> list[str]:
    return [model, "--eval", "text:small.txt", "--device", "cpu", "--seqlen", "16",
            "--windows", "2", *extra]


def _recover(extra: list[str], model: str = "model") -> list[str]:
    return [model, "--output", "rec", "--calib", "text:small.txt", "--nsamples", "2", "--seqlen",
            "16", "--eval", "text:small.txt", "--eval-windows", "2", "--device", "cpu",
            "--steps", "1", "--allow-unpruned", *extra]  # the sandbox models are dense


def _resolve(fragments: list[str], sandbox: Path) -> list[str]:
    """``TRUNC_SHARD`` stands for the name of the truncated shard file."""
    shard = _shard_of(sandbox / "trunc", BLOCK1).name
    return [shard if f == "TRUNC_SHARD" else f for f in fragments]


PLAN = ["--model", "llama-2-7b", "--workers", "2"]
MAINS = {"prune": cli.main, "evaluate": evaluate_mod.main, "plan": plan_mod.main,
         "recover": recover_mod.main}

CASES = [
    # item 6: strict booleans / integers / floats
    ("prune", ["--config", "trc.yaml", *_prune([])[2:]],
     ["model.trust_remote_code='false'", "true or false"]),
    ("prune", _prune(["model.trust_remote_code=1"]), ["model.trust_remote_code=1", "true or false"]),
    ("prune", _prune(["calib.nsamples=true"]), ["calib.nsamples=True", "integer"]),
    ("prune", _prune(["calib.seqlen=true"]), ["calib.seqlen=True", "integer"]),
    ("prune", _prune(["engine.workers=true"]), ["engine.workers=True", "integer"]),
    ("prune", _prune(["eval.dense='no'"]), ["eval.dense='no'", "true or false"]),
    ("prune", _prune(["engine.deterministic='false'"]), ["engine.deterministic='false'"]),
    ("prune", _prune(["engine.offload_activations=1"]), ["engine.offload_activations=1"]),
    ("prune", _prune(["allocation.strict='yes'"]), ["allocation.strict='yes'"]),
    ("prune", _prune(["mask.exact_count=maybe"]), ["mask.exact_count='maybe'"]),
    ("prune", _prune(["calib.seed=1.5"]), ["calib.seed=1.5", "integer"]),
    ("prune", _prune(["seed=true"]), ["seed=True", "integer"]),
    # item 7: accepted without a word
    ("prune", _prune(["--seqlen", "300"]), ["calib.seqlen=300", "max_position_embeddings=256"]),
    ("prune", _prune(["--sparsity", "0.3", "--pattern", "2:4"]), ["sparsity=0.3", "'2:4'", "0.5"]),
    # item 8: truncated shard, named, before loading
    ("prune", ["--model", "trunc", *_prune([])[2:]], ["TRUNC_SHARD", "truncated"]),
    # item 12: errors before loading that came after it
    ("prune", _prune(["output.shard_size=abc"]), ["output.shard_size='abc'", "GiB"]),
    ("prune", _prune(["--calib", "self", "calib.self_temperature=0"]),
     ["calib.self_temperature=0", "> 0"]),
    ("prune", _prune(["--calib", "self", "calib.self_top_k=0"]), ["calib.self_top_k=0", ">= 1"]),
    # item 13: unclear messages
    ("prune", _prune(["--calib", "text:binary.txt"]), ["binary.txt", "byte offset 300", "NUL"]),
    ("prune", _prune(["--calib", "text:latin1.txt"]), ["latin1.txt", "byte offset 303", "UTF-8"]),
    ("prune", _prune(["seed=x"]), ["seed='x'", "integer"]),
    ("prune", _prune(["--model", "afile"]), ["'afile'", "is a file"]),
    ("prune", _prune(["--output", ".", "--overwrite"]), ["output.dir='.'", "new directory"]),
    ("prune", _prune(["--output", "..", "--overwrite"]), ["output.dir='..'", "new directory"]),
    ("prune", ["--config", "many.yaml"],
     ["model: expected a mapping or a name, got 42", "sparsity=2", "calib.nsamples=0",
      "criterion='nope'"]),
    # item 11: the other entry points
    ("plan", PLAN + ["--seqlen", "-1"], ["--seqlen", "calib.seqlen=-1"]),
    ("plan", PLAN + ["--nsamples", "0"], ["--nsamples", "calib.nsamples=0"]),
    ("plan", PLAN + ["--micro-batch", "0"], ["--micro-batch", "engine.micro_batch=0"]),
    ("plan", ["--model", "llama-2-7b", "--workers", "0"], ["--workers", "engine.workers=0"]),
    ("plan", ["--model", "llama-2-7b", "--workers", "-2"], ["engine.workers=-2"]),
    ("plan", PLAN + ["--allocation", "neuroal", "--search-samples", "0"],
     ["allocation.search_samples=0"]),
    ("plan", PLAN + ["--eval-seqlen", "0"], ["eval.seqlen=0"]),
    ("plan", PLAN + ["--gpu-memory", "abc"], ["--gpu-memory", "'abc'"]),
    ("plan", PLAN + ["--seqlen", "8192"], ["--seqlen=8192", "max_position_embeddings=4096"]),
    ("evaluate", _evaluate(["--workers", "0"]), ["--workers", "engine.workers=0"]),
    ("evaluate", _evaluate(["--workers", "3"]), ["--workers", "engine.workers=3", "2 blocks"]),
    ("evaluate", _evaluate(["--windows", "-1"]), ["--windows", "eval.max_windows=-1"]),
    ("evaluate", _evaluate(["--seqlen", "0"]), ["--seqlen", "eval.seqlen=0"]),
    ("evaluate", _evaluate(["--seqlen", "300"]), ["--seqlen=300", "max_position_embeddings=256"]),
    ("evaluate", _evaluate(["--micro-batch", "0"]), ["engine.micro_batch=0"]),
    ("evaluate", _evaluate(["--dtype", "float64"]), ["model.dtype='float64'"]),
    ("evaluate", _evaluate(["--eval", "pile"]), ["'pile'", "wikitext2"]),
    ("evaluate", _evaluate(["--eval", "text:binary.txt"]), ["binary.txt", "byte offset 300"]),
    ("evaluate", _evaluate([], model="missing"), ["'missing'", "does not exist"]),
    ("evaluate", _evaluate([], model="afile"), ["'afile'", "is a file"]),
    ("evaluate", _evaluate([], model="trunc"), ["TRUNC_SHARD", "truncated"]),
    ("recover", _recover([], model="missing"), ["'missing'", "does not exist"]),
    ("recover", _recover(["--variant", "nope"]), ["--variant='nope'", "masklora"]),
    ("recover", _recover(["--steps", "0"]), ["--steps=0", ">= 1"]),
    ("recover", _recover(["--output", "model"]), ["sandbox/model'", "is the input"]),
    ("recover", _recover(["--output", "."]), ["--output", "output.dir='.'"]),
    ("recover", _recover(["--rank", "0"]), ["--rank=0"]),
    ("recover", _recover(["--batch-size", "0"]), ["--batch-size=0"]),
    ("recover", _recover(["--lr", "-1"]), ["--lr=-1.0"]),
    ("recover", _recover(["--nsamples", "0"]), ["--nsamples", "calib.nsamples=0"]),
    ("recover", _recover(["--seqlen", "300"]), ["--seqlen=300", "max_position_embeddings=256"]),
    ("recover", _recover(["--calib", "pile"]), ["--calib", "'pile'"]),
    ("recover", _recover(["--dtype", "float64"]), ["--dtype", "'float64'"]),
    ("recover", _recover(["--shard-size", "abc"]), ["--shard-size", "'abc'"]),
    ("recover", _recover(["--eval-windows", "-1"]), ["--eval-windows", "eval.max_windows=-1"]),
    ("recover", _recover([], model="trunc"), ["TRUNC_SHARD", "truncated"]),
]


@pytest.mark.parametrize(("entry", "argv", "expected"), CASES,
                         ids=[f"{c[0]}-{i}-{c[2][0]}"[:60] for i, c in enumerate(CASES)])
def test_bad_input_exits_2_before_loading(entry: str, argv: list[str], expected: list[str],
                                          sandbox: Path, no_model_loading: None,
                                          caplog: pytest.LogCaptureFixture,
                                          capsys: pytest.CaptureFixture) -> None:
    before = snapshot(sandbox.parent)
    code, text = _capture(MAINS[entry], argv, caplog, capsys)
    assert code == 2, text
    for fragment in _resolve(expected, sandbox):
        assert fragment in text, f"{fragment!r} not in {text!r}"
    assert "Traceback" not in text
    assert snapshot(sandbox.parent) == before  # nothing written, moved or deleted


@pytest.mark.parametrize(("model", "key", "criterion"), [("inf", NORM, "magnitude"),
                                                          ("nan", BLOCK1, "wanda")])
def test_nan_weight_is_named_while_loading(model: str, key: str, criterion: str, sandbox: Path,
                                           caplog: pytest.LogCaptureFixture,
                                           capsys: pytest.CaptureFixture) -> None:
    """NaN or Inf in a weight: refused as its block is loaded, tensor and shard named, nothing
    written (an Inf in the final norm used to be pruned around and written out)."""
    before = snapshot(sandbox)
    code, text = _capture(cli.main, ["--model", model, *_prune(["--criterion", criterion])[2:]],
                          caplog, capsys)
    assert code == 2, text
    shard = _shard_of(sandbox / model, key).name
    for fragment in (f"'{key}'", shard, "NaN or Inf"):
        assert fragment in text
    assert not (sandbox / "out").exists()
    assert snapshot(sandbox) == before


def test_nan_weight_in_evaluate_and_recover(sandbox: Path, caplog: pytest.LogCaptureFixture,
                                            capsys: pytest.CaptureFixture) -> None:
    before = snapshot(sandbox)
    for main, argv in ((evaluate_mod.main, _evaluate([], model="nan")),
                       (recover_mod.main, _recover([], model="nan"))):
        code, text = _capture(main, argv, caplog, capsys)
        assert code == 2 and BLOCK1 in text and "NaN or Inf" in text, text
    assert snapshot(sandbox) == before


def test_valid_sizes_use_one_parser() -> None:
    """``2GiB`` works for both sizes; every size setting reads the same units."""
    from neuroal.config.inputs import parse_size as parse
    from neuroal.outputs.export import parse_size
    from neuroal.planning import parse_bytes

    cfg = load_config(None, ["output.shard_size=2GiB", "engine.memory_limit=2GiB"])
    assert parse_size(cfg.output.shard_size) == parse_bytes(cfg.engine.memory_limit) == 2 * 2**30
    assert parse("500MB") == parse(500_000_000) == parse("5e8") == 500_000_000
    for bad in ("abc", "0", "-1GB", True, "2 GBs", float("nan")):
        with pytest.raises(ValueError, match="expected"):
            parse(bad, "x")


def test_trust_remote_code_only_for_the_boolean_true(monkeypatch: pytest.MonkeyPatch,
                                                     tiny_models: dict[str, Path]) -> None:
    """Even a config built without validation never passes a truthy string on."""
    from transformers import AutoConfig

    from neuroal.models.loading import load_model_config, resolve_model

    seen = []
    real = AutoConfig.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("trust_remote_code"))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoConfig, "from_pretrained", spy)
    source = resolve_model(str(tiny_models["llama"]))
    for value in ("false", "true", 1):
        load_model_config(source, value)  # type: ignore[arg-type]
    assert seen == [False, False, False]


def test_pattern_sets_sparsity_and_errors_are_collected() -> None:
    """An unset sparsity follows the N:M pattern (the resolved config reloads); a conflicting
    one is an error; a malformed section no longer hides the other errors."""
    cfg = load_config(None, ["pattern=1:4"])
    assert cfg.sparsity == 0.75 and cfg.target_sparsity == 0.75
    from neuroal.config.build import build_config

    assert build_config(cfg.to_dict()).sparsity == 0.75
    with pytest.raises(ConfigError) as info:
        load_config(None, ["model=42", "sparsity=2", "engine.workers=0", "eval.dense=maybe"])
    assert len(info.value.errors) == 4


# --------------------------------------------------------------------------- real processes


SUBPROCESS_CASES = [
    ("prune", _prune(["output.shard_size=abc", "model.trust_remote_code='false'"]),
     ["output.shard_size='abc'", "model.trust_remote_code='false'"]),
    ("plan", PLAN + ["--workers", "0"], ["engine.workers=0"]),
    ("evaluate", _evaluate([], model="trunc"), ["TRUNC_SHARD"]),
    ("recover", _recover(["--steps", "0", "--variant", "nope"]), ["--steps=0", "'nope'"]),
]


@pytest.mark.parametrize(("entry", "argv", "expected"), SUBPROCESS_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(SUBPROCESS_CASES)])
def test_no_traceback_in_a_real_process(entry: str, argv: list[str], expected: list[str],
                                        sandbox: Path) -> None:
    before = snapshot(sandbox.parent)
    env = {**os.environ, "PYTHONPATH": str(REPO), "NEUROAL_PROGRESS": "0", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "launch" / f"{entry}.py"), *argv],
                          cwd=sandbox, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    for fragment in _resolve(expected, sandbox):
        assert fragment in proc.stderr
    assert snapshot(sandbox.parent) == before


def test_sandbox_snapshot_sees_changes(tmp_path: Path) -> None:
    """The snapshot used above notices a changed, added or removed file."""
    (tmp_path / "a").write_text("1")
    before = snapshot(tmp_path)
    (tmp_path / "a").write_text("2")
    assert snapshot(tmp_path) != before
    (tmp_path / "a").unlink()
    assert snapshot(tmp_path) == {}
