"""One write guard for every file neuroal writes (``--log-file``, ``--json``, outputs): never an
input or inside one (links followed), never an existing file neuroal did not write unless
``--allow-existing``, never a folder / FIFO / device, names within 255 bytes, and enough disk
space checked before loading."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from conftest import DATA_DIR, run_cli_logged

from neuroal.outputs.safety import (
    DiskFullError,
    UnsafeOutputError,
    check_file_output,
    check_free_space,
    check_output_path,
    input_closure,
    write_file,
    written_by_neuroal,
)


@pytest.fixture()
def box(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    """A copy of the tiny llama, a calibration text and a user's file."""
    shutil.copytree(tiny_models["llama"], tmp_path / "model")
    text = (DATA_DIR / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")[:20_000]
    (tmp_path / "calib.txt").write_text(text, encoding="utf-8")
    (tmp_path / "notes.txt").write_text("my notes\n")
    return tmp_path


def prune_argv(box: Path, *extra: str) -> list[str]:
    return ["--model", str(box / "model"), "--calib", f"text:{box / 'calib.txt'}", "--eval",
            "none", "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--output",
            str(box / "out"), *extra]


def digest(path: Path) -> bytes:
    return path.read_bytes()


# --------------------------------------------------------------------------- the guard itself


def test_a_file_inside_an_input_is_refused(box: Path) -> None:
    with pytest.raises(UnsafeOutputError, match="lies inside the input"):
        check_file_output(box / "model" / "config.json", [box / "model"])
    with pytest.raises(UnsafeOutputError, match="is the input"):
        check_file_output(box / "calib.txt", [box / "calib.txt"], allow_existing=True)


def test_a_file_a_model_links_to_is_an_input(box: Path) -> None:
    """A hub snapshot's shards are links into blobs/: the blobs are inputs too."""
    blobs = box / "blobs"
    blobs.mkdir()
    shard = next((box / "model").glob("model-*.safetensors"))
    shutil.move(shard, blobs / "blob1")
    shard.symlink_to(blobs / "blob1")
    assert str(blobs / "blob1") in input_closure([box / "model"])
    with pytest.raises(UnsafeOutputError, match="is the input"):
        check_file_output(blobs / "blob1", [box / "model"], allow_existing=True)


@pytest.mark.parametrize("kind", ["folder", "fifo", "device", "link"])
def test_non_regular_targets_are_named(kind: str, box: Path) -> None:
    target = {"folder": box / "logs", "fifo": box / "pipe", "device": Path("/dev/null"),
              "link": box / "link.json"}[kind]
    if kind == "folder":
        target.mkdir()
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "link":
        target.symlink_to(box / "notes.txt")
    expected = {"folder": "is a directory", "fifo": "FIFO", "device": "character device",
                "link": "symbolic link"}[kind]
    with pytest.raises(UnsafeOutputError, match=expected):
        check_file_output(target, flag="--log-file", kind="log")


def test_existing_files_neuroal_did_not_write_need_allow_existing(box: Path) -> None:
    with pytest.raises(UnsafeOutputError, match="did not write.*--allow-existing"):
        check_file_output(box / "notes.txt")
    assert check_file_output(box / "notes.txt", allow_existing=True) == box / "notes.txt"
    ours = box / "plan.json"
    write_file(ours, json.dumps({"neuroal": "0.1.0", "fits": True}))
    assert written_by_neuroal(ours, "json") and check_file_output(ours) == ours
    log = box / "run.log"
    log.write_text("08:00:01 INFO neuroal.cli: started\nmore\n")
    assert written_by_neuroal(log, "log") and not written_by_neuroal(box / "notes.txt", "log")
    (box / "empty.json").write_text("")
    assert check_file_output(box / "empty.json") == box / "empty.json"  # nothing to lose


def test_names_over_255_bytes_and_tilde(box: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UnsafeOutputError, match="300 bytes long.*255"):
        check_file_output(box / ("x" * 300))
    with pytest.raises(UnsafeOutputError, match="255 bytes per name"):
        check_output_path(box / ("é" * 130), overwrite=False)  # 260 bytes in UTF-8
    monkeypatch.setenv("HOME", str(box))
    assert check_file_output("~/new.json") == box / "new.json"


def test_an_unwritable_folder_is_refused_before_any_work(box: Path) -> None:
    with pytest.raises(UnsafeOutputError, match="does not exist"):
        check_file_output(box / "missing" / "plan.json")
    target = Path("/proc/neuroal-x/plan.json") if os.geteuid() == 0 else box / "ro" / "plan.json"
    if os.geteuid() != 0:
        target.parent.mkdir()
        target.parent.chmod(0o555)
    try:
        with pytest.raises(UnsafeOutputError, match="plan.json"):
            check_file_output(target)
            write_file(target, "{}")
    finally:
        if os.geteuid() != 0:
            target.parent.chmod(0o755)


def test_free_space_is_checked_with_both_sizes(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda p: type(real(p))(10**9, 10**9 - 5 * 10**6, 5 * 10**6))
    check_free_space(tmp_path, 4 * 10**6, "weights")
    with pytest.raises(DiskFullError, match=r"needs about 6.00 MB.*5.00 MB free"):
        check_free_space(tmp_path / "not-yet" / "out", 6 * 10**6, "weights")


# --------------------------------------------------------------------------- through the CLIs


def test_prune_log_file_into_the_model_is_refused(box: Path, no_loading: None,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    config = box / "model" / "config.json"
    before = digest(config)
    code, text = run_cli_logged(prune_argv(box, "--log-file", str(config)), caplog)
    assert code == 2 and "--log-file" in text and "lies inside the input" in text
    assert digest(config) == before and not (box / "out").exists()


@pytest.mark.parametrize("target", ["notes", "folder", "calib"])
def test_prune_log_file_refusals(target: str, box: Path, no_loading: None,
                                 caplog: pytest.LogCaptureFixture) -> None:
    path = {"notes": box / "notes.txt", "folder": box / "logs", "calib": box / "calib.txt"}[target]
    if target == "folder":
        path.mkdir()
    before = {p: digest(p) for p in (box / "notes.txt", box / "calib.txt")}
    code, text = run_cli_logged(prune_argv(box, "--log-file", str(path)), caplog)
    assert code == 2, text
    assert {"notes": "did not write", "folder": "is a directory", "calib": "input"}[target] in text
    assert {p: digest(p) for p in before} == before


def test_allow_existing_appends_to_a_foreign_log(box: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    code, _ = run_cli_logged(prune_argv(box, "--no-save", "--log-file", str(box / "notes.txt"),
                                        "--allow-existing"), caplog)
    assert code == 0
    text = (box / "notes.txt").read_text()
    assert text.startswith("my notes\n") and "neuroal" in text
    logging.getLogger("neuroal").handlers[:] = [
        h for h in logging.getLogger("neuroal").handlers if not isinstance(h, logging.FileHandler)]


def test_the_yaml_recipe_is_an_input_too(box: Path, no_loading: None,
                                         caplog: pytest.LogCaptureFixture) -> None:
    recipe = box / "recipe.yaml"
    recipe.write_text("sparsity: 0.5\n")
    code, text = run_cli_logged(["--config", str(recipe), *prune_argv(box),
                                 "--log-file", str(recipe), "--allow-existing"], caplog)
    assert code == 2 and "is the input" in text and recipe.read_text() == "sparsity: 0.5\n"


def test_evaluate_json_is_guarded(box: Path, no_loading: None,
                                  caplog: pytest.LogCaptureFixture) -> None:
    from neuroal.commands.evaluate import main

    config = box / "model" / "config.json"
    before = digest(config)
    for target, fragment in ((config, "lies inside the input"),
                             (box / "notes.txt", "did not write")):
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="neuroal"):
            logging.getLogger("neuroal").addHandler(caplog.handler)
            try:
                code = main([str(box / "model"), "--eval", f"text:{box / 'calib.txt'}",
                             "--windows", "2", "--seqlen", "16", "--device", "cpu",
                             "--json", str(target)])
            finally:
                logging.getLogger("neuroal").removeHandler(caplog.handler)
        assert code == 2 and fragment in caplog.text, caplog.text
    assert digest(config) == before and (box / "notes.txt").read_text() == "my notes\n"


def test_plan_json_replaces_only_its_own_file(box: Path, capsys: pytest.CaptureFixture) -> None:
    from neuroal.commands.plan import main

    argv = ["--model", "llama-2-7b", "--workers", "2"]
    assert main([*argv, "--json", str(box / "notes.txt")]) == 2
    assert "did not write" in capsys.readouterr().err
    assert (box / "notes.txt").read_text() == "my notes\n"
    out = box / "plan.json"
    assert main([*argv, "--json", str(out)]) in (0, 1)
    assert json.loads(out.read_text())["neuroal"]
    assert main([*argv, "--json", str(out)]) in (0, 1)  # its own file: replaced
    assert main([*argv, "--json", str(box / "notes.txt"), "--allow-existing"]) in (0, 1)
    assert json.loads((box / "notes.txt").read_text())["neuroal"]


def test_a_read_only_file_system_is_refused_even_for_root(box: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    real = os.statvfs

    class ReadOnly:
        def __init__(self, path: str) -> None:
            self.f_flag = real(path).f_flag | os.ST_RDONLY

    monkeypatch.setattr(os, "statvfs", ReadOnly)
    with pytest.raises(UnsafeOutputError, match="read-only file system"):
        check_file_output(box / "plan.json")
    with pytest.raises(UnsafeOutputError, match="read-only file system"):
        check_output_path(box / "out", overwrite=False)
