#!/usr/bin/env python
"""Reliability catalogue: hostile inputs against every entry point, one verdict per case.

    python launch/bench.py reliability                 # the catalogue, table + JSON
    python launch/bench.py reliability --only overwrite,yaml   # cases whose id or group matches

Each case builds what it needs in its own folder (tiny models from ``tests/conftest.py``, a
home-like folder, hand-made files), runs one command and judges the outcome:

* ``clear error before loading``: exit code 2 (or 130 for a signal), no traceback, the message
  names what it must name, no weight was loaded, nothing outside neuroal's own output changed;
* ``unclear``: refused before loading, but the message lacks what it must name;
* ``error after work``: refused, but only after weights were loaded;
* ``traceback``: an exception escaped the entry point (in-process) or a traceback was printed;
* ``silent``: exit code 0 where a refusal was expected;
* ``data loss``: a file neuroal did not write changed or disappeared;
* ``ran`` (expected for the cases where running is right, e.g. with a warning): exit code 0 and
  the expected text (a warning) logged.

The entry points run in this process (imports paid once; a case's "traceback" is an exception
leaving ``main``); the signal case runs ``launch/prune.py`` as a subprocess. Weight loading is
detected by wrapping the worker class and ``from_pretrained``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
_WORK: list[str] = []  # the work folder, hidden from the recorded messages
VERDICTS = ("clear error before loading", "unclear", "error after work", "traceback", "silent",
            "data loss", "ran")


@dataclass
class Case:
    """One hostile input: ``setup(folder) -> argv`` (or a callable for the API), the entry
    point, the expected verdict and the fragments its message must hold."""

    id: str
    group: str
    entry: str  # prune | plan | evaluate | recover | api | subprocess
    setup: Callable[[Path, Any], Any]
    expect: str = "clear error before loading"
    fragments: tuple[str, ...] = ()
    check: Callable[[Path], str | None] | None = None  # extra judgement after the run
    note: str = ""


@dataclass
class World:
    """What the cases share: the tiny models and texts built once."""

    root: Path
    llama: Path = field(init=False)
    gpt2: Path = field(init=False)
    bert: Path = field(init=False)
    text: Path = field(init=False)
    gguf: Path = field(init=False)
    pruned: Path = field(init=False)


# --------------------------------------------------------------------------- building


def build_world(root: Path) -> World:
    """Tiny llama / GPT-2 / BERT models, a calibration text, the head of a GGUF file and one
    pruned neuroal output."""
    sys.path.insert(0, str(REPO / "tests"))
    import conftest
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    world = World(root)
    tok = root / "tokenizer"
    tok.mkdir(parents=True)
    conftest.train_tokenizer(tok)
    world.llama = conftest.save_tiny_model("llama", root / "llama", tok)
    world.text = root / "calib.txt"
    text = (conftest.DATA_DIR / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")
    world.text.write_text(text[:20_000], encoding="utf-8")
    gpt2 = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=conftest.VOCAB, n_positions=256))
    world.gpt2 = root / "gpt2"
    gpt2.save_pretrained(world.gpt2)
    for f in tok.iterdir():
        shutil.copy(f, world.gpt2 / f.name)
    bert = AutoModelForMaskedLM.from_config(AutoConfig.for_model(
        "bert", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
        vocab_size=conftest.VOCAB, max_position_embeddings=256))
    world.bert = root / "bert"
    bert.save_pretrained(world.bert)
    for f in tok.iterdir():
        shutil.copy(f, world.bert / f.name)
    from neuroal.models.loading import embedded_gguf

    world.gguf = embedded_gguf()
    world.pruned = root / "pruned"
    code = _entry("prune")(_prune_args(world, world.llama, world.pruned))
    if code != 0:
        raise SystemExit("the reference prune of the tiny model failed")
    return world


def _prune_args(world: World, model: Path, out: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--calib", f"text:{world.text}", "--eval", "none",
            "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--output", str(out), *extra]


def _recover_args(world: World, model: Path, out: Path, *extra: str) -> list[str]:
    return [str(model), "--output", str(out), "--calib", f"text:{world.text}", "--nsamples", "2",
            "--seqlen", "16", "--eval-windows", "0", "--device", "cpu", "--steps", "1",
            "--variant", "bias-norm", *extra]


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


def _home(folder: Path) -> Path:
    home = folder / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "id_ed25519").write_text("PRIVATE KEY\n")
    (home / "Documents").mkdir()
    (home / "Documents" / "thesis.md").write_text("# thesis\n")
    (home / "notes.txt").write_text("my notes\n")
    return home


def _entry(name: str) -> Callable[[list[str]], int]:
    if name == "prune":
        from neuroal.commands.prune import main
    elif name == "plan":
        from neuroal.commands.plan import main
    elif name == "evaluate":
        from neuroal.commands.evaluate import main
    else:
        from neuroal.commands.recover import main
    return main


# --------------------------------------------------------------------------- cases: setups


def _forged_marker(folder: Path, w: World) -> list[str]:
    home = _home(folder)
    (home / "neuroal_output.json").write_text(json.dumps(
        {"neuroal": "0.1.0", "kind": "prune", "files": [".ssh", "Documents", "notes.txt"]}))
    return _prune_args(w, w.llama, home, "--overwrite")


def _forged_digests(folder: Path, w: World) -> list[str]:
    """A marker with true sizes and digests of the user's files and a report.json holding the
    same run id: the names are still ones neuroal never writes."""
    home = _home(folder)
    from neuroal.config.inputs import file_sha256

    entries = {rel: {"size": (home / rel).stat().st_size, "sha256": file_sha256(home / rel)}
               for rel in (".ssh/id_ed25519", "Documents/thesis.md", "notes.txt")}
    (home / "report.json").write_text(json.dumps({"run_id": "f" * 32}))
    entries["report.json"] = {"size": (home / "report.json").stat().st_size,
                              "sha256": file_sha256(home / "report.json")}
    (home / "neuroal_output.json").write_text(json.dumps(
        {"neuroal": "0.1.0", "format": 2, "kind": "prune", "run_id": "f" * 32,
         "files": sorted(p.name for p in home.iterdir()), "entries": entries}))
    return _prune_args(w, w.llama, home, "--overwrite")


def _plots_user_file(folder: Path, w: World) -> list[str]:
    out = _copy(w.pruned, folder / "out")
    (out / "plots").mkdir(exist_ok=True)
    (out / "plots" / "my-figure.png").write_bytes(b"my own figure")
    return _prune_args(w, w.llama, out, "--overwrite")


def _edited_shard(folder: Path, w: World) -> list[str]:
    out = _copy(w.pruned, folder / "out")
    shard = sorted(out.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    return _prune_args(w, w.llama, out, "--overwrite")


def _legacy_lookalike(folder: Path, w: World) -> list[str]:
    user = folder / "project"
    user.mkdir()
    (user / "README.md").write_text("# my project\n")
    (user / "config.json").write_text('{"lr": 0.1}\n')
    (user / "report.json").write_text('{"quarter": "Q3", "revenue": 12}\n')
    (user / "neuroal_config.yaml").write_text("note: I copied this name\n")
    return _prune_args(w, w.llama, user, "--overwrite")


def _symlinked_shards(folder: Path, w: World) -> list[str]:
    out = _copy(w.pruned, folder / "out")
    model = _copy(w.llama, folder / "model")
    for shard in model.glob("model-*.safetensors"):
        shard.unlink()
        shard.symlink_to(out / shard.name)
    return _prune_args(w, model, out, "--overwrite")


def _genuine_overwrite(folder: Path, w: World) -> list[str]:
    out = _copy(w.pruned, folder / "out")
    return _prune_args(w, w.llama, out, "--overwrite")


def _log_into_model(folder: Path, w: World) -> list[str]:
    model = _copy(w.llama, folder / "model")
    return _prune_args(w, model, folder / "out", "--log-file", str(model / "config.json"))


def _recover_log_into_model(folder: Path, w: World) -> list[str]:
    model = _copy(w.pruned, folder / "model")
    return _recover_args(w, model, folder / "out", "--log-file", str(model / "config.json"))


def _log_existing_foreign(folder: Path, w: World) -> list[str]:
    (folder / "notes.txt").write_text("my notes\n")
    return _prune_args(w, w.llama, folder / "out", "--log-file", str(folder / "notes.txt"))


def _log_folder(folder: Path, w: World) -> list[str]:
    (folder / "logs").mkdir()
    return _prune_args(w, w.llama, folder / "out", "--log-file", str(folder / "logs"))


def _log_into_calib(folder: Path, w: World) -> list[str]:
    text = folder / "calib.txt"
    shutil.copy(w.text, text)
    return ["--model", str(w.llama), "--calib", f"text:{text}", "--eval", "none", "--nsamples",
            "2", "--seqlen", "16", "--device", "cpu", "--output", str(folder / "out"),
            "--log-file", str(text)]


def _eval_json_into_model(folder: Path, w: World) -> list[str]:
    model = _copy(w.llama, folder / "model")
    return [str(model), "--eval", f"text:{w.text}", "--windows", "2", "--seqlen", "16",
            "--device", "cpu", "--json", str(model / "config.json")]


def _eval_json_foreign(folder: Path, w: World) -> list[str]:
    (folder / "results.json").write_text('{"mine": true}\n')
    return [str(w.llama), "--eval", f"text:{w.text}", "--windows", "2", "--seqlen", "16",
            "--device", "cpu", "--json", str(folder / "results.json")]


def _plan_json_foreign(folder: Path, w: World) -> list[str]:
    (folder / "notes.json").write_text('{"mine": true}\n')
    return ["--model", "llama-2-7b", "--workers", "2", "--json", str(folder / "notes.json")]


def _plan_json_readonly(folder: Path, w: World) -> list[str]:
    if os.geteuid() == 0:  # root writes through chmod: /proc refuses everyone
        return ["--model", "llama-2-7b", "--json", "/proc/neuroal-plan.json"]
    ro = folder / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    return ["--model", "llama-2-7b", "--json", str(ro / "plan.json")]


def _long_name(folder: Path, w: World) -> list[str]:
    return _prune_args(w, w.llama, folder / ("x" * 300))


def _tilde_output(folder: Path, w: World) -> list[str]:
    os.environ["HOME"] = str(folder)
    return _prune_args(w, w.llama, Path("~/tilde-out"), "--no-save")


def _check_tilde(folder: Path) -> str | None:
    if (Path.cwd() / "~").exists() or (folder / "~").exists():
        return "a folder literally named '~' was created"
    return None if (folder / "tilde-out" / "report.json").is_file() else "no output at ~/tilde-out"


def _fewer_layers(folder: Path, w: World) -> list[str]:
    sys.path.insert(0, str(REPO / "tests"))
    import conftest

    model = conftest.save_tiny_model("llama", folder / "model", w.root / "tokenizer", num_layers=4)
    config = json.loads((model / "config.json").read_text())
    config["num_hidden_layers"] = 2
    (model / "config.json").write_text(json.dumps(config))
    return _prune_args(w, model, folder / "out")


def _int_weights(folder: Path, w: World) -> list[str]:
    from safetensors.torch import load_file, save_file

    model = _copy(w.llama, folder / "model")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    name = "model.layers.0.mlp.down_proj.weight"
    shard = model / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = (tensors[name] * 100).to(__import__("torch").int64)
    save_file(tensors, shard, metadata={"format": "pt"})
    return _prune_args(w, model, folder / "out")


def _weight_map_outside(folder: Path, w: World) -> list[str]:
    other = _copy(w.llama, folder / "other" / "model")
    model = _copy(w.llama, folder / "model")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (model / first).unlink()
    index["weight_map"] = {k: (f"../other/model/{v}" if v == first else v)
                           for k, v in index["weight_map"].items()}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert other.is_dir()
    return _prune_args(w, model, folder / "out")


def _blank_calib(folder: Path, w: World) -> list[str]:
    (folder / "blank.txt").write_text("  \n\t\n   \n")
    return ["--model", str(w.llama), "--calib", f"text:{folder / 'blank.txt'}", "--eval", "none",
            "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--output",
            str(folder / "out")]


def _dup_yaml(folder: Path, w: World) -> list[str]:
    (folder / "r.yaml").write_text("sparsity: 0.5\ncriterion: wanda\nsparsity: 0.9\n")
    return ["--config", str(folder / "r.yaml"), *_prune_args(w, w.llama, folder / "out")]


def _malformed_section(folder: Path, w: World) -> list[str]:
    (folder / "r.yaml").write_text("calib: 32\nsparsity: 0.5\n")
    return ["--config", str(folder / "r.yaml"), *_prune_args(w, w.llama, folder / "out")]


def _alias_bomb(folder: Path, w: World) -> list[str]:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    (folder / "bomb.yaml").write_text("\n".join(lines) + "\n")
    return ["--config", str(folder / "bomb.yaml"), *_prune_args(w, w.llama, folder / "out")]


def _bad_override(folder: Path, w: World) -> list[str]:
    return [*_prune_args(w, w.llama, folder / "out"), "calib.seed=[1"]


def _conv1d(folder: Path, w: World) -> list[str]:
    return _prune_args(w, w.gpt2, folder / "out")


def _bert_prune(folder: Path, w: World) -> list[str]:
    return _prune_args(w, w.bert, folder / "out")


def _bert_plan(folder: Path, w: World) -> list[str]:
    return ["--model", str(w.bert), "--workers", "1"]


def _recover_dense(folder: Path, w: World) -> list[str]:
    return _recover_args(w, w.llama, folder / "out")


def _api_overwrite_no(folder: Path, w: World) -> Callable[[], Any]:
    out = _copy(w.pruned, folder / "out")
    import neuroal

    return lambda: neuroal.prune(str(w.llama), output=str(out), overwrite="no", save=True,
                                 calib={"source": f"text:{w.text}", "nsamples": 2, "seqlen": 16},
                                 eval={"datasets": []}, engine={"device": "cpu"})


def _trust_remote_code(folder: Path, w: World) -> list[str]:
    model = _copy(w.llama, folder / "model")
    (model / "modeling_custom.py").write_text("# custom code\n")
    return _prune_args(w, model, folder / "out", "--no-save", "model.trust_remote_code=yes")


def _include_path(folder: Path, w: World) -> list[str]:
    tasks = folder / "tasks"
    tasks.mkdir()
    (tasks / "hook.yaml").write_text("task: my_task\nprocess_docs: !function utils.process\n")
    (tasks / "utils.py").write_text("def process(d):\n    return d\n")
    return _prune_args(w, w.llama, folder / "out", "--no-save", "--include-path", str(tasks))


def _pickle_tokens(folder: Path, w: World) -> list[str]:
    import pickle

    class Boom:
        def __reduce__(self):  # noqa: ANN204 - what a hostile file would hold
            return (os.system, ("echo pwned > " + str(folder / "pwned"),))

    (folder / "ids.pt").write_bytes(pickle.dumps(Boom()))
    return ["--model", str(w.llama), "--calib", f"tokens:{folder / 'ids.pt'}", "--eval", "none",
            "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--output",
            str(folder / "out")]


def _check_not_pwned(folder: Path) -> str | None:
    return "the pickle ran code" if (folder / "pwned").exists() else None


def _gguf_head(folder: Path, w: World, corrupt: bool = False) -> list[str]:
    with w.gguf.open("rb") as handle:
        head = bytearray(handle.read(1 << 16))
    if corrupt:
        head[4:8] = struct.pack("<I", 977)  # version
    else:
        head = head[:24]
    path = folder / "model.gguf"
    path.write_bytes(bytes(head))
    return _prune_args(w, path, folder / "out")


def _gguf_truncated(folder: Path, w: World) -> list[str]:
    with w.gguf.open("rb") as handle:
        path = folder / "model.gguf"
        path.write_bytes(handle.read(1 << 20))
    return _prune_args(w, path, folder / "out")


def _fifo_config(folder: Path, w: World) -> list[str]:
    os.mkfifo(folder / "recipe.yaml")
    return ["--config", str(folder / "recipe.yaml"), *_prune_args(w, w.llama, folder / "out")]


def _folder_config(folder: Path, w: World) -> list[str]:
    (folder / "recipe").mkdir()
    return ["--config", str(folder / "recipe"), *_prune_args(w, w.llama, folder / "out")]


def _fifo_text(folder: Path, w: World) -> list[str]:
    os.mkfifo(folder / "calib.txt")
    return ["--model", str(w.llama), "--calib", f"text:{folder / 'calib.txt'}", "--eval", "none",
            "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--output",
            str(folder / "out")]


def _disk_nearly_full(folder: Path, w: World) -> list[str]:
    real = shutil.disk_usage

    def tiny(path: Any) -> Any:
        usage = real(path)
        return type(usage)(usage.total, usage.total - 1000, 1000)

    shutil.disk_usage = tiny  # restored by the runner
    return _prune_args(w, w.llama, folder / "out", "output.keep_state=true")


def _disk_full_at_export(folder: Path, w: World) -> list[str]:
    from neuroal.engine import worker

    def full(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "out.part"))

    worker.save_file = full  # restored by the runner
    return _prune_args(w, w.llama, folder / "out")


def _sigterm(folder: Path, w: World) -> list[str]:
    return [sys.executable, str(REPO / "launch" / "prune.py"), *_prune_args(
        w, w.llama, folder / "out", "--nsamples", "64", "--seqlen", "128", "--criterion",
        "sparsegpt", "output.keep_state=true")]


def _check_nothing_at_out(folder: Path) -> str | None:
    return "an output appeared" if (folder / "out").exists() else None


CASES = [
    # write guard
    Case("log-file-into-model", "write guard", "prune", _log_into_model,
         fragments=("--log-file", "config.json", "input")),
    Case("recover-log-file-into-model", "write guard", "recover", _recover_log_into_model,
         fragments=("--log-file", "input")),
    Case("log-file-foreign-existing", "write guard", "prune", _log_existing_foreign,
         fragments=("notes.txt", "did not write", "--allow-existing")),
    Case("log-file-folder", "write guard", "prune", _log_folder,
         fragments=("--log-file", "is a directory")),
    Case("log-file-into-calibration", "write guard", "prune", _log_into_calib,
         fragments=("calib.txt", "input")),
    Case("evaluate-json-into-model", "write guard", "evaluate", _eval_json_into_model,
         fragments=("--json", "config.json", "input")),
    Case("evaluate-json-foreign-existing", "write guard", "evaluate", _eval_json_foreign,
         fragments=("results.json", "did not write")),
    Case("plan-json-foreign-existing", "write guard", "plan", _plan_json_foreign,
         fragments=("notes.json", "did not write")),
    Case("plan-json-read-only", "write guard", "plan", _plan_json_readonly,
         fragments=("--json", "plan.json")),
    Case("output-name-over-255-bytes", "write guard", "prune", _long_name,
         fragments=("bytes", "255")),
    Case("output-tilde", "write guard", "prune", _tilde_output, expect="ran",
         check=_check_tilde),
    # overwrite ownership
    Case("forged-name-marker", "overwrite", "prune", _forged_marker,
         fragments=("--overwrite refused", "delete it by hand")),
    Case("forged-digest-marker", "overwrite", "prune", _forged_digests,
         fragments=("--overwrite refused",)),
    Case("user-file-in-plots", "overwrite", "prune", _plots_user_file,
         fragments=("plots/my-figure.png", "did not write")),
    Case("edited-shard", "overwrite", "prune", _edited_shard,
         fragments=("changed", ".safetensors")),
    Case("legacy-lookalike-folder", "overwrite", "prune", _legacy_lookalike,
         fragments=("--overwrite refused", "delete it by hand")),
    Case("input-shards-link-into-output", "overwrite", "prune", _symlinked_shards,
         fragments=("contains the input",)),
    Case("genuine-overwrite", "overwrite", "prune", _genuine_overwrite, expect="ran"),
    Case("api-overwrite-no", "overwrite", "api", _api_overwrite_no,
         fragments=("overwrite='no'", "True or False")),
    # silent accepts
    Case("checkpoint-has-more-layers", "model", "prune", _fewer_layers,
         fragments=("blocks 2-3", "num_hidden_layers=2")),
    Case("int64-weights", "model", "prune", _int_weights, fragments=("I64", "down_proj")),
    Case("weight-map-outside-folder", "model", "prune", _weight_map_outside,
         fragments=("outside the model folder", "../other")),
    Case("gpt2-conv1d", "model", "prune", _conv1d, fragments=("Conv1D", "nn.Linear")),
    Case("bert-prune", "model", "prune", _bert_prune, fragments=("not a decoder LM",)),
    Case("bert-plan", "model", "plan", _bert_plan, fragments=("not a decoder LM",)),
    Case("recover-dense-input", "model", "recover", _recover_dense,
         fragments=("not an output of neuroal prune", "--allow-unpruned")),
    Case("blank-calibration", "data", "prune", _blank_calib, fragments=("only whitespace",)),
    Case("fifo-as-config", "data", "prune", _fifo_config,
         fragments=("FIFO", "not a regular file")),
    Case("folder-as-config", "data", "prune", _folder_config, fragments=("is a directory",)),
    Case("fifo-as-text", "data", "prune", _fifo_text, fragments=("FIFO",)),
    Case("pickle-in-tokens", "data", "prune", _pickle_tokens,
         fragments=("ids.pt", "nothing in it was run"), check=_check_not_pwned),
    Case("trust-remote-code-yes", "code", "prune", _trust_remote_code, expect="ran",
         fragments=("trust_remote_code", "modeling_custom.py")),
    Case("include-path-function", "code", "prune", _include_path, expect="ran",
         fragments=("include_path", "hook.yaml", "utils.py"), note="warned before lm-eval runs"),
    # yaml and overrides
    Case("duplicate-yaml-key", "yaml", "prune", _dup_yaml,
         fragments=("'sparsity' appears twice",)),
    Case("malformed-section-with-flags", "yaml", "prune", _malformed_section,
         fragments=("calib: expected a mapping", "r.yaml")),
    Case("yaml-alias-bomb", "yaml", "prune", _alias_bomb, fragments=("alias",)),
    Case("malformed-override", "yaml", "prune", _bad_override,
         fragments=("calib.seed=[1", "not valid YAML")),
    # files and the environment
    Case("gguf-cut-to-header", "files", "prune", _gguf_head,
         fragments=("model.gguf",)),
    Case("gguf-corrupt-header", "files", "prune",
         lambda f, w: _gguf_head(f, w, corrupt=True), fragments=("corrupt header",)),
    Case("gguf-truncated", "files", "prune", _gguf_truncated,
         fragments=("truncated", "download it again")),
    Case("disk-nearly-full", "files", "prune", _disk_nearly_full,
         fragments=("not enough disk space", "needs about", "free")),
    Case("disk-fills-during-export", "files", "prune", _disk_full_at_export,
         expect="error after work", fragments=("disk full", "free now"),
         check=_check_nothing_at_out),
    Case("sigterm", "files", "subprocess", _sigterm, expect="clear error before loading",
         fragments=("SIGTERM", "interrupted"), check=_check_nothing_at_out,
         note="signal after the first block; judged as an interrupt (exit 130, message)"),
]
# the include-path case runs a prune whose lm-eval tasks are never loaded (no eval.tasks):
# neuroal warns as soon as the folder is named.


# --------------------------------------------------------------------------- running


def snapshot(root: Path, skip: tuple[str, ...]) -> dict[str, tuple]:
    """``relative path -> (kind, size, sha256 / link target)`` under ``root`` (not ``skip``)."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if rel.split("/")[0] in skip:
                continue
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",)
            elif path.is_file():
                out[rel] = ("file", path.stat().st_size,
                            hashlib.sha256(path.read_bytes()).hexdigest())
            else:
                out[rel] = ("special",)
    return out


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")


@contextlib.contextmanager
def _loading_probe() -> Any:
    """Record whether weights were loaded (a worker built, ``from_pretrained`` called)."""
    from transformers import AutoModelForCausalLM

    from neuroal.engine import executor as executor_mod

    flag = {"loaded": False}
    real_worker, real_fp = executor_mod.Worker, AutoModelForCausalLM.from_pretrained

    def worker(*args: Any, **kwargs: Any) -> Any:
        flag["loaded"] = True
        return real_worker(*args, **kwargs)

    def from_pretrained(*args: Any, **kwargs: Any) -> Any:
        flag["loaded"] = True
        return real_fp(*args, **kwargs)

    executor_mod.Worker = worker
    AutoModelForCausalLM.from_pretrained = from_pretrained
    try:
        yield flag
    finally:
        executor_mod.Worker = real_worker
        AutoModelForCausalLM.from_pretrained = real_fp


def run_case(case: Case, world: World, work: Path) -> dict[str, Any]:
    """Set up, run and judge one case; returns its row."""
    folder = work / case.id
    folder.mkdir(parents=True)
    saved = {"cwd": os.getcwd(), "home": os.environ.get("HOME"), "du": shutil.disk_usage}
    from neuroal.engine import worker as worker_mod

    saved["save_file"] = worker_mod.save_file
    os.chdir(folder)
    t0 = time.perf_counter()
    text, code, escaped = "", None, None
    try:
        target = case.setup(folder, world)
        before = snapshot(folder, ("out", "out.neuroal-tmp"))
        if case.entry == "subprocess":
            code, text, loaded = _run_signal(target)
        else:
            code, text, escaped, loaded = _run_inprocess(case, target)
    finally:
        os.chdir(saved["cwd"])
        shutil.disk_usage = saved["du"]
        worker_mod.save_file = saved["save_file"]
        if saved["home"] is not None:
            os.environ["HOME"] = saved["home"]
    after = snapshot(folder, ("out", "out.neuroal-tmp", "tilde-out", "tilde-out.neuroal-tmp"))
    lost = sorted(k for k in set(before) | set(after)
                  if before.get(k) != after.get(k) and not k.startswith(("tilde-out", "pwned"))
                  and k in before)
    verdict = judge(case, code, text, escaped, loaded, lost, folder)
    return {"id": case.id, "group": case.group, "entry": case.entry, "expected": case.expect,
            "verdict": verdict, "ok": verdict == case.expect, "exit_code": code,
            "seconds": round(time.perf_counter() - t0, 2), "lost": lost[:8],
            "message": _message(text, escaped), "note": case.note}


def _run_inprocess(case: Case, target: Any) -> tuple[int | None, str, str | None, bool]:
    capture = _Capture()
    logger = logging.getLogger("neuroal")
    logger.addHandler(capture)
    stderr, stdout = io.StringIO(), io.StringIO()
    code, escaped = None, None
    with _loading_probe() as probe, contextlib.redirect_stderr(stderr), \
            contextlib.redirect_stdout(stdout):
        try:
            if case.entry == "api":
                target()
                code = 0
            else:
                code = _entry(case.entry)(target)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 2
        except Exception as exc:  # noqa: BLE001 - what the case measures
            if case.entry == "api" and type(exc).__name__ == "ConfigError":
                code, capture.lines = 2, [*capture.lines, f"ERROR {exc}"]
            else:
                escaped = "".join(traceback.format_exception(exc))
        finally:
            logger.removeHandler(capture)
    return code, "\n".join(capture.lines) + "\n" + stderr.getvalue(), escaped, probe["loaded"]


def _run_signal(cmd: list[str]) -> tuple[int, str, bool]:
    """``launch/prune.py`` in a subprocess, SIGTERM once the first block is reported."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "NEUROAL_PROGRESS": "0"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env=env)
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if "owns blocks" in line or "block 1/" in line:
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            break
    _, rest = proc.communicate(timeout=300)
    text = "".join(lines) + (rest or "")
    return proc.returncode, text, False


def judge(case: Case, code: int | None, text: str, escaped: str | None, loaded: bool,
          lost: list[str], folder: Path) -> str:
    """The verdict of one run (see the module docstring)."""
    if lost:
        return "data loss"
    extra = case.check(folder) if case.check else None
    if escaped is not None or "Traceback (most recent call last)" in text:
        return "traceback"
    named = all(f in text for f in case.fragments)
    if code == 0:
        if case.expect == "ran":
            return "ran" if named and extra is None else "unclear"
        return "silent"
    if extra is not None:
        return "unclear"
    if case.entry == "subprocess":
        return "clear error before loading" if code == 130 and named else "unclear"
    if loaded:
        return "error after work" if named else "unclear"
    return "clear error before loading" if named else "unclear"


def _message(text: str, escaped: str | None) -> str:
    """The error / warning lines of a run, the work folder written as ``<work>``."""
    text = text.replace(_WORK[0], "<work>") if _WORK else text
    escaped = escaped.replace(_WORK[0], "<work>") if escaped and _WORK else escaped
    if escaped:
        return escaped.strip().splitlines()[-1][:300]
    errors = [line for line in text.splitlines() if "ERROR" in line or "WARNING" in line
              or line.startswith(("error", "  - "))]
    return " | ".join(errors)[:400]


def table(rows: list[dict[str, Any]]) -> str:
    """The verdict table: counts per verdict, then one line per case."""
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    lines = ["| verdict | cases |", "|---|---|"]
    lines += [f"| {v} | {n} |" for v, n in counts.items()]
    lines += ["", f"{sum(r['ok'] for r in rows)} of {len(rows)} cases got their expected verdict.",
              "", "| case | group | expected | verdict |", "|---|---|---|---|"]
    lines += [f"| {r['id']} | {r['group']} | {r['expected']} | {r['verdict']} |" for r in rows]
    return "\n".join(lines)


def run(only: str | None, work: Path) -> dict[str, Any]:
    """Build the world, run the (selected) cases, return the result dict."""
    os.environ.setdefault("NEUROAL_PROGRESS", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.perf_counter()
    _WORK[:] = [str(work)]
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    world = build_world(work / "world")
    keys = [k for k in (only or "").split(",") if k]
    rows = []
    for case in CASES:
        if keys and not any(k in case.id or k == case.group for k in keys):
            continue
        row = run_case(case, world, work / "cases")
        print(f"{row['id']:<34} {row['verdict']:<28} {row['seconds']:6.1f} s  {row['message'][:90]}",
              file=sys.stderr, flush=True)
        rows.append(row)
    return {"cases": rows, "summary": {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS},
            "expected_met": sum(r["ok"] for r in rows), "total": len(rows),
            "wall_s": round(time.perf_counter() - t0, 1),
            "command": "python launch/bench.py reliability" + (f" --only {only}" if only else "")}
