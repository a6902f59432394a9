"""Hostile inputs: each silent accept and each traceback of the reliability catalogue becomes a
clear error before loading (or a warning where running is right), checked on the functions that
decide it; ``launch/bench.py reliability`` reruns the whole catalogue through the entry points."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import signal
import struct
from pathlib import Path

import pytest

from neuroal.commands.exits import explain, guarded
from neuroal.config.build import ConfigError, expand_paths, load_config
from neuroal.config.inputs import YAMLLimitError, not_a_file, safe_yaml_load
from neuroal.models.adapter import ModelAdapter
from neuroal.models.loading import (
    ModelSource,
    build_skeleton,
    embedded_gguf,
    load_model_config,
    resolve_model,
)
from neuroal.outputs.guard import (
    check_checkpoint,
    check_decoder_lm,
    check_gguf,
    check_prunable,
    check_source,
    check_text_sources,
    warn_code_execution,
)
from neuroal.runtime.errors import AdapterError, ModelSourceError

# --------------------------------------------------------------------------- YAML


def test_yaml_refuses_duplicate_keys_and_names_both_lines() -> None:
    with pytest.raises(YAMLLimitError, match=r"'sparsity' appears twice.*lines 1 and 3"):
        safe_yaml_load("sparsity: 0.5\ncriterion: wanda\nsparsity: 0.9\n", "r.yaml")
    with pytest.raises(YAMLLimitError, match="'nsamples' appears twice"):
        safe_yaml_load("calib:\n  nsamples: 2\n  nsamples: 3\n")


def test_yaml_alias_bomb_is_refused_before_expansion() -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    bomb = "\n".join(lines)
    assert len(bomb) < 500
    with pytest.raises(YAMLLimitError, match="alias bomb"):
        safe_yaml_load(bomb)
    many = "a: &a 1\nb: [" + ",".join(["*a"] * 150) + "]\n"
    with pytest.raises(YAMLLimitError, match="more than 100 YAML aliases"):
        safe_yaml_load(many)
    with pytest.raises(YAMLLimitError, match="deeper than 32"):
        safe_yaml_load("[" * 40 + "]" * 40)
    with pytest.raises(YAMLLimitError, match="nested too deeply|deeper than"):
        safe_yaml_load("[" * 5000 + "]" * 5000)
    with pytest.raises(YAMLLimitError, match="bytes a recipe may have"):
        safe_yaml_load("a: " + "x" * (2 << 20))


def test_ordinary_yaml_still_reads() -> None:
    text = "base: &b {nsamples: 2}\ncalib:\n  <<: *b\n  seqlen: 16\nlist: [*b, *b]\n"
    assert safe_yaml_load(text) == {"base": {"nsamples": 2}, "calib": {"nsamples": 2, "seqlen": 16},
                                    "list": [{"nsamples": 2}, {"nsamples": 2}]}


def test_malformed_override_and_sections(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"override 'calib.seed=\[1' is not valid YAML"):
        load_config(None, ["calib.seed=[1"])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("calib: 32\nengine: {ray: 3}\nsparsity: 0.5\n")
    with pytest.raises(ConfigError) as info:
        load_config(recipe, [], {"calib": {"nsamples": 4}, "engine": {"ray": {"cpus": 1}}})
    assert any(e.startswith("calib: expected a mapping, got 32 in config file") for e in
               info.value.errors)
    assert any(e.startswith("engine.ray: expected a mapping") for e in info.value.errors)


@pytest.mark.parametrize("kind", ["fifo", "folder", "device"])
def test_config_that_exists_is_never_said_not_to_exist(kind: str, tmp_path: Path) -> None:
    path = {"fifo": tmp_path / "r.yaml", "folder": tmp_path, "device": Path("/dev/null")}[kind]
    if kind == "fifo":
        os.mkfifo(path)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert "does not exist" not in text
    assert {"fifo": "FIFO", "folder": "directory", "device": "character device"}[kind] in text
    assert not_a_file(tmp_path / "missing") == "does not exist"


def test_tilde_is_expanded_in_every_path_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/u")
    tree = expand_paths({"output": {"dir": "~/out"}, "log": {"file": "~/run.log"},
                         "calib": {"source": "text:~/c.txt", "data_dir": "~/data"},
                         "eval": {"datasets": ["wikitext2", "text:~/e.txt"]}})
    assert tree["output"]["dir"] == "/home/u/out" and tree["log"]["file"] == "/home/u/run.log"
    assert tree["calib"] == {"source": "text:/home/u/c.txt", "data_dir": "/home/u/data"}
    assert tree["eval"]["datasets"] == ["wikitext2", "text:/home/u/e.txt"]


def test_api_booleans_are_type_checked(tmp_path: Path) -> None:
    import neuroal

    for bad in ({"overwrite": "no"}, {"save": 1}, {"keep_executor": "false"}):
        with pytest.raises(ConfigError, match="expected True or False"):
            neuroal.prune("smollm2-135m", output=str(tmp_path / "o"), **bad)
    assert not (tmp_path / "o").exists()


# --------------------------------------------------------------------------- the model


def test_encoders_are_not_decoder_lms() -> None:
    from transformers import BertConfig, LlamaConfig

    with pytest.raises(AdapterError, match="not a decoder LM"):
        check_decoder_lm(BertConfig(architectures=["BertForMaskedLM"]), "bert")
    check_decoder_lm(LlamaConfig(architectures=["LlamaForCausalLM"]), "llama")
    check_decoder_lm(BertConfig(architectures=["BertLMHeadModel"], is_decoder=True), "bert-dec")


def test_conv1d_models_are_refused_naming_the_layer_type() -> None:
    import torch
    from transformers import AutoConfig

    config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=64)
    adapter = ModelAdapter(build_skeleton(config, torch.float32))
    with pytest.raises(AdapterError, match=r"Conv1D \(.*c_attn") as info:
        check_prunable(adapter, "gpt2")
    assert "nn.Linear" in str(info.value)


def _source(model: Path) -> tuple[ModelSource, object, ModelAdapter]:
    import torch

    source = resolve_model(str(model))
    config = load_model_config(source)
    return source, config, ModelAdapter(build_skeleton(config, torch.float32))


def test_a_checkpoint_with_blocks_its_config_lacks_is_refused(tmp_path: Path,
                                                             tokenizer_dir: Path) -> None:
    from conftest import save_tiny_model

    model = save_tiny_model("llama", tmp_path / "m", tokenizer_dir, num_layers=4)
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelSourceError, match=r"blocks 2-3.*num_hidden_layers=2"):
        check_checkpoint(*_source(model))


def test_integer_weights_are_refused(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    model = shutil.copytree(tiny_models["llama"], tmp_path / "m")
    check_checkpoint(*_source(model))
    index = json.loads((model / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.q_proj.weight"
    tensors = load_file(model / index["weight_map"][name])
    tensors[name] = tensors[name].to(torch.int64)
    save_file(tensors, model / index["weight_map"][name])
    with pytest.raises(ModelSourceError, match=r"q_proj.weight' as I64"):
        check_checkpoint(*_source(model))


def test_a_weight_map_outside_the_folder_is_refused(tmp_path: Path,
                                                    tiny_models: dict[str, Path]) -> None:
    model = shutil.copytree(tiny_models["llama"], tmp_path / "m")
    index_path = model / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(iter(index["weight_map"]))
    index["weight_map"][key] = "../../other/model-00001-of-00008.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(ModelSourceError, match="outside the model folder"):
        check_source(ModelSource("hf_dir", str(model), "m"))


def test_gguf_truncated_or_corrupt_is_named(tmp_path: Path) -> None:
    with embedded_gguf().open("rb") as handle:
        head = handle.read(1 << 20)
    cases = {"header-only": head[:24], "short": head[:10], "cut": head,
             "bad-version": head[:4] + struct.pack("<I", 977) + head[8:4096],
             "not-gguf": b"{\"a\": 1}" + head[8:64]}
    expected = {"header-only": "truncated or corrupt", "short": "shorter than the 24-byte",
                "cut": "truncated", "bad-version": r"corrupt header \(version 977",
                "not-gguf": "not a GGUF file"}
    for name, data in cases.items():
        path = tmp_path / f"{name}.gguf"
        path.write_bytes(data)
        with pytest.raises(ModelSourceError, match=expected[name]):
            check_gguf(path)


# --------------------------------------------------------------------------- data and code


def test_whitespace_only_calibration_is_refused(tmp_path: Path) -> None:
    from conftest import tiny_cfg

    blank = tmp_path / "blank.txt"
    blank.write_text(" \n\t\n")
    cfg = tiny_cfg(tmp_path, None, calib={"source": f"text:{blank}"})
    with pytest.raises(ConfigError, match="holds only whitespace"):
        check_text_sources(cfg)


def test_pickled_token_files_are_refused_without_running(tmp_path: Path) -> None:
    from neuroal.data.sources import load_token_file

    class Boom:
        def __reduce__(self):  # noqa: ANN204
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    path = tmp_path / "ids.pt"
    path.write_bytes(pickle.dumps(Boom()))
    with pytest.raises(ValueError, match="nothing in it was run"):
        load_token_file(path)
    assert not (tmp_path / "pwned").exists()


def test_code_execution_is_announced_naming_the_files(tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "modeling_x.py").write_text("")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text("process_docs: !function utils.f\n")
    (tasks / "utils.py").write_text("")
    source = ModelSource("hf_dir", str(model), "m")
    with caplog.at_level(logging.WARNING, logger="neuroal"):
        warnings = warn_code_execution(True, source, str(tasks))
    assert "modeling_x.py" in warnings[0] and "t.yaml" in warnings[1] and "utils.py" in warnings[1]
    assert warn_code_execution("yes", source) == []  # only the boolean true runs code


# --------------------------------------------------------------------------- exits


def test_disk_full_and_pickles_end_in_a_message(tmp_path: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    full = OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x.safetensors"))
    assert "GB free now" in explain(full) and "--resume" in explain(full)
    assert "disk full" in explain(RuntimeError("Io error: No space left on device (os error 28)"))
    assert "nothing in it was run" in explain(pickle.UnpicklingError("Weights only load failed"))
    assert "255 bytes" in explain(OSError(errno.ENAMETOOLONG, "File name too long", "x" * 300))
    assert explain(RuntimeError("a bug")) is None

    @guarded
    def main(argv: list[str]) -> int:
        raise pickle.UnpicklingError("Weights only load failed: GLOBAL os.system")

    with caplog.at_level(logging.ERROR, logger="neuroal"):
        assert main([]) == 2
    assert "resume state" in caplog.text


def test_sigterm_is_handled_like_ctrl_c(caplog: pytest.LogCaptureFixture) -> None:
    done = []

    @guarded
    def main(argv: list[str]) -> int:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.sigtimedwait([], 0.1) if hasattr(signal, "sigtimedwait") else None
            return 0
        finally:
            done.append("cleanup ran")

    previous = signal.getsignal(signal.SIGTERM)
    with caplog.at_level(logging.ERROR, logger="neuroal"):
        assert main([]) == 130
    assert done == ["cleanup ran"] and "SIGTERM" in caplog.text
    assert signal.getsignal(signal.SIGTERM) == previous


def test_recover_refuses_a_dense_or_foreign_input(tmp_path: Path) -> None:
    from neuroal.commands.recover import check_pruned_input

    with pytest.raises(ConfigError, match="not an output of neuroal prune"):
        check_pruned_input(tmp_path, "m")
    (tmp_path / "report.json").write_text(json.dumps({"achieved_sparsity": 0.0}))
    with pytest.raises(ConfigError, match="achieved_sparsity=0.0.*--allow-unpruned"):
        check_pruned_input(tmp_path, "m")
    (tmp_path / "report.json").write_text(json.dumps({"achieved_sparsity": 0.5}))
    check_pruned_input(tmp_path, "m")


def test_a_fifo_as_model_is_named_not_called_missing(tmp_path: Path) -> None:
    import os

    from neuroal.models.loading import resolve_model
    from neuroal.runtime.errors import ModelSourceError

    fifo = tmp_path / "model"
    os.mkfifo(fifo)
    with pytest.raises(ModelSourceError, match=r"is a FIFO \(named pipe\), not a model"):
        resolve_model(str(fifo))
