"""Output safety end to end (Data loss, output edge cases, one run per output).

Every refusal goes through the real entry points (``launch/prune.py`` via ``neuroal.cli.main``,
``launch/recover.py`` via its ``main``) and asserts exit code 2, a message naming the value, no
traceback (``main`` returns instead of raising) and that no file outside neuroal's own output and
temporary directories changed (a snapshot of a sandbox tree before and after).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA_DIR, REPO, run_cli_logged

from neuroal.outputs.export import OutputDir, OutputExistsError

MARKER = "neuroal_output.json"  # neuroal.outputs.safety.MARKER (spelled out: the tests also run on old code)

# --------------------------------------------------------------------------- helpers


def snapshot(root: Path) -> dict[str, tuple]:
    """``relative path -> (kind, size, sha256 / link target)`` of everything under ``root``."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                out[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                out[rel] = ("dir",)
            else:
                out[rel] = ("file", path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


def changed(before: dict[str, tuple], after: dict[str, tuple], own: tuple[str, ...] = ()) -> list[str]:
    """Paths that differ, ignoring those under neuroal's own output / temp dirs ``own``."""
    keys = set(before) | set(after)
    return sorted(k for k in keys if before.get(k) != after.get(k)
                  and not any(k == o or k.startswith(o + "/") for o in own))


def prune_argv(model: Path, out: str | Path, *extra: str) -> list[str]:
    """A fast CLI run of the tiny model (calibration text beside it in the sandbox)."""
    return ["--model", str(model), "--calib", f"text:{model.parent / 'calib.txt'}", "--eval",
            "none", "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--output", str(out),
            *extra]


def recover_main():  # noqa: ANN201
    sys.path.insert(0, str(REPO / "launch"))
    try:
        from recover import main
    finally:
        sys.path.remove(str(REPO / "launch"))
    return main


def run_recover(argv: list[str], caplog: pytest.LogCaptureFixture) -> tuple[int, str]:
    logger = logging.getLogger("neuroal")
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="neuroal"):
        logger.addHandler(caplog.handler)
        try:
            code = recover_main()(argv)
        finally:
            logger.removeHandler(caplog.handler)
    return code, caplog.text


@pytest.fixture()
def sandbox(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    """A home-like directory with secrets, documents and a copy of a tiny model."""
    import shutil

    root = tmp_path / "sandbox"
    (root / "home" / ".ssh").mkdir(parents=True)
    (root / "home" / ".ssh" / "id_ed25519").write_text("PRIVATE KEY\n")
    (root / "home" / "notes.txt").write_text("my notes\n")
    (root / "home" / "docs").mkdir()
    (root / "home" / "docs" / "thesis.md").write_text("# thesis\n")
    (root / "work").mkdir()
    (root / "work" / "todo.txt").write_text("todo\n")
    shutil.copytree(tiny_models["llama"], root / "model")
    text = (DATA_DIR / "wikitext2" / "wiki.valid.tokens").read_text(encoding="utf-8")[:20_000]
    (root / "calib.txt").write_text(text, encoding="utf-8")
    return root


def assert_refused(code: int, text: str, *fragments: str) -> None:
    assert code == 2, text
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in text, f"{fragment!r} not in {text!r}"


# --------------------------------------------------------------------------- item 1: --overwrite


def test_overwrite_refuses_a_directory_neuroal_did_not_write(sandbox: Path, no_loading: None,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    before = snapshot(sandbox)
    out = sandbox / "home"
    code, text = run_cli_logged(prune_argv(sandbox / "model", out, "--overwrite"), caplog)
    assert_refused(code, text, str(out), ".ssh/", "notes.txt", "not a neuroal output")
    assert changed(before, snapshot(sandbox)) == []


def test_overwrite_of_the_parent_directory_is_refused(sandbox: Path, no_loading: None,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    """``--output .. --overwrite`` emptied the parent, working directory included."""
    monkeypatch.chdir(sandbox / "home" / "docs")
    before = snapshot(sandbox)
    code, text = run_cli_logged(prune_argv(sandbox / "model", "..", "--overwrite"), caplog)
    # refused by config validation (output.dir names no new directory) before the output check
    assert_refused(code, text, "output.dir='..'", "names no new directory")
    assert changed(before, snapshot(sandbox)) == []


def test_overwrite_replaces_neuroal_outputs_only(sandbox: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A marked output, an empty directory and a marker-less output of an earlier version are
    replaced; a neuroal output into which the user put a file is not."""
    out = sandbox / "out"
    assert run_cli_logged(prune_argv(sandbox / "model", out), caplog)[0] == 0
    marker = json.loads((out / MARKER).read_text())
    assert "report.json" in marker["files"] and "model.safetensors.index.json" in marker["files"]
    assert sorted(p.name for p in out.iterdir() if p.name != MARKER) == marker["files"]
    assert run_cli_logged(prune_argv(sandbox / "model", out, "--overwrite"), caplog)[0] == 0

    (out / "my-eval.txt").write_text("keep me\n")
    before = snapshot(sandbox)
    code, text = run_cli_logged(prune_argv(sandbox / "model", out, "--overwrite"), caplog)
    assert_refused(code, text, str(out), "my-eval.txt", "did not write")
    assert changed(before, snapshot(sandbox)) == []

    (out / "my-eval.txt").unlink()
    (out / MARKER).unlink()  # an output of an earlier neuroal: report.json + neuroal_config.yaml
    (out / "neuroal.log").unlink(missing_ok=True)  # (earlier versions wrote no log, no plots)
    shutil.rmtree(out / "plots", ignore_errors=True)
    assert run_cli_logged(prune_argv(sandbox / "model", out, "--overwrite"), caplog)[0] == 0
    assert (out / MARKER).is_file()

    empty = sandbox / "empty"
    empty.mkdir()
    assert run_cli_logged(prune_argv(sandbox / "model", empty, "--overwrite"), caplog)[0] == 0
    assert (empty / "report.json").is_file()
    assert not (sandbox / "out.neuroal-tmp").exists() and not (sandbox / "empty.neuroal-tmp").exists()


# --------------------------------------------------------------------------- item 2: output = input


@pytest.mark.parametrize("where", ["same", "inside", "contains", "link-to-model-parent"])
def test_prune_output_may_not_touch_the_model(where: str, sandbox: Path, no_loading: None,
                                              caplog: pytest.LogCaptureFixture) -> None:
    model = sandbox / "model"
    link = sandbox / "alias"
    link.symlink_to(sandbox)  # <alias>/model is the model through a symlinked parent
    out = {"same": model, "inside": model / "pruned", "contains": sandbox,
           "link-to-model-parent": link / "model"}[where]
    before = snapshot(sandbox)
    code, text = run_cli_logged(prune_argv(model, out, "--overwrite"), caplog)
    assert_refused(code, text, str(out))
    assert "input" in text or "not a neuroal output" in text
    assert changed(before, snapshot(sandbox)) == []


def test_recover_output_equal_to_its_input_is_refused(sandbox: Path, small_text: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    model = sandbox / "model"
    before = snapshot(sandbox)
    for out in (model, model / "perp"):
        code, text = run_recover([str(model), "--output", str(out), "--overwrite", "--steps", "1",
                                  "--calib", f"text:{small_text}", "--nsamples", "2", "--seqlen",
                                  "16", "--eval-windows", "0", "--device", "cpu"], caplog)
        assert_refused(code, text, str(out), "input")
    assert changed(before, snapshot(sandbox)) == []


def test_recover_refuses_a_foreign_directory_and_writes_a_marked_output(
        sandbox: Path, small_text: Path, caplog: pytest.LogCaptureFixture) -> None:
    args = ["--steps", "1", "--calib", f"text:{small_text}", "--nsamples", "2", "--seqlen", "16",
            "--eval-windows", "0", "--device", "cpu", "--variant", "bias-norm",
            "--allow-unpruned"]  # the sandbox model is dense (recover refuses it by default)
    before = snapshot(sandbox)
    code, text = run_recover([str(sandbox / "model"), "--output", str(sandbox / "home"),
                              "--overwrite", *args], caplog)
    assert_refused(code, text, str(sandbox / "home"), ".ssh/")
    assert changed(before, snapshot(sandbox)) == []
    out = sandbox / "perp"
    assert run_recover([str(sandbox / "model"), "--output", str(out), *args], caplog)[0] == 0
    assert json.loads((out / MARKER).read_text())["kind"] == "recover"
    assert run_recover([str(sandbox / "model"), "--output", str(out), "--overwrite", *args],
                       caplog)[0] == 0


# --------------------------------------------------------------------------- item 3: safe swap


def test_a_crash_during_the_swap_leaves_a_complete_model(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Crash right after the old output is moved aside: both the old and the new output still
    exist next to the path, and the next run says where they are instead of deleting one."""
    out = tmp_path / "out"
    with OutputDir(out).atomic() as staging:
        (staging / "report.json").write_text('{"v": "old"}')
        (staging / "neuroal_config.yaml").write_text("v: old\n")
    real_replace = os.replace

    def crash_on_move_in(src, dst):  # noqa: ANN001, ANN202
        if Path(dst) == out:
            raise KeyboardInterrupt("killed between the two moves")
        return real_replace(src, dst)

    output = OutputDir(out)
    output.check(overwrite=True)
    monkeypatch.setattr(os, "replace", crash_on_move_in)
    with pytest.raises(KeyboardInterrupt), output.atomic() as staging:
        (staging / "report.json").write_text('{"v": "new"}')
        (staging / "neuroal_config.yaml").write_text("v: new\n")
    monkeypatch.setattr(os, "replace", real_replace)
    reports = [json.loads(p.read_text())["v"] for p in tmp_path.rglob("report.json")]
    assert sorted(reports) == ["new", "old"], "one complete output must survive next to the path"
    again = OutputDir(out)
    again.check(overwrite=True)
    with pytest.raises(OutputExistsError, match="interrupted while replacing"):
        again.acquire(overwrite=True)
    assert sorted(json.loads(p.read_text())["v"] for p in tmp_path.rglob("report.json")) == ["new", "old"]


def test_swap_refuses_an_output_that_changed_during_the_run(tmp_path: Path) -> None:
    out = tmp_path / "out"
    output = OutputDir(out)
    output.check(overwrite=True)
    with pytest.raises(OutputExistsError, match="kept in"), output.atomic() as staging:
        (staging / "report.json").write_text("{}")
        out.mkdir()
        (out / "diary.txt").write_text("written meanwhile\n")
    assert (out / "diary.txt").read_text() == "written meanwhile\n"
    assert (tmp_path / "out.neuroal-tmp" / "model" / "report.json").is_file()


# --------------------------------------------------------------------------- item 9: path edge cases


def _unwritable_parent(tmp_path: Path) -> Path:
    if os.geteuid() == 0:  # root writes through chmod: use a filesystem nobody can write
        return Path("/proc/neuroal-test-parent")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    return parent


@pytest.mark.parametrize("case", ["file", "file-overwrite", "symlink", "dangling-symlink",
                                  "readonly-parent", "under-a-file"])
def test_output_path_edge_cases_are_refused_before_loading(case: str, sandbox: Path,
                                                           tmp_path: Path, no_loading: None,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    target = sandbox / "target"
    target.mkdir()
    out = sandbox / "out"
    extra: list[str] = []
    if case.startswith("file"):
        out.write_text("a file\n")
        extra = ["--overwrite"] if case == "file-overwrite" else []
        expected = [str(out), "existing file"]
    elif case == "symlink":
        out.symlink_to(target)
        extra, expected = ["--overwrite"], [str(out), "symbolic link"]
    elif case == "dangling-symlink":
        out.symlink_to(sandbox / "missing")
        expected = [str(out), "dangling"]
    elif case == "readonly-parent":
        out = _unwritable_parent(tmp_path) / "out"
        expected = [str(out.parent)]
    else:
        out = sandbox / "notes.bin" / "out"
        (sandbox / "notes.bin").write_text("data\n")
        expected = [str(sandbox / "notes.bin"), "not a directory"]
    before = snapshot(sandbox)
    try:
        code, text = run_cli_logged(prune_argv(sandbox / "model", out, *extra), caplog)
    finally:
        if case == "readonly-parent" and out.parent.is_relative_to(tmp_path):
            out.parent.chmod(0o755)
    assert_refused(code, text, *expected)
    assert changed(before, snapshot(sandbox)) == []


# --------------------------------------------------------------------------- item 10: lock

_HOLD = ("import sys, time; from pathlib import Path; from neuroal.outputs.safety import OutputLock; "
         "lock = OutputLock(Path(sys.argv[1])); lock.acquire(); print('locked', flush=True); "
         "time.sleep(120)")


def test_a_second_run_on_a_locked_output_is_refused(sandbox: Path, no_loading: None,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    out = sandbox / "out"
    tmp = sandbox / "out.neuroal-tmp"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        before = snapshot(sandbox)
        code, text = run_cli_logged(prune_argv(sandbox / "model", out), caplog)
        assert_refused(code, text, f"PID {holder.pid}", socket.gethostname(), str(tmp / "lock"))
        assert changed(before, snapshot(sandbox)) == []
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_of_a_dead_process_is_taken_over(sandbox: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A run killed with SIGKILL leaves its lock file; the next run sees the PID is gone."""
    out = sandbox / "out"
    tmp = sandbox / "out.neuroal-tmp"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp)], cwd=REPO,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    assert json.loads((tmp / "lock").read_text())["pid"] == holder.pid
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="neuroal"):
        logging.getLogger("neuroal").addHandler(caplog.handler)
        try:
            from neuroal import cli

            code = cli.main(prune_argv(sandbox / "model", out))
        finally:
            logging.getLogger("neuroal").removeHandler(caplog.handler)
    assert code == 0
    assert "stale lock" in caplog.text and f"process {holder.pid} is gone" in caplog.text
    assert (out / "report.json").is_file() and not tmp.exists()


def test_a_second_run_while_one_is_writing_is_refused(sandbox: Path,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Run A (``--overwrite``) is paused in the middle of its prune; run B starts on the same
    output with ``--overwrite``. Without a lock B deleted A's files and A crashed; now B exits 2
    naming A, and A completes."""
    import threading

    from neuroal import cli
    from neuroal.engine.worker import Worker

    out = sandbox / "out"
    argv = prune_argv(sandbox / "model", out, "--overwrite")
    paused, go = threading.Event(), threading.Event()
    original = Worker.prune_one
    result: dict[str, object] = {}

    def pause_run_a(self, *args, **kwargs):  # noqa: ANN001, ANN202
        if threading.current_thread().name == "run-a" and not paused.is_set():
            paused.set()
            go.wait(timeout=300)
        return original(self, *args, **kwargs)

    def run_a() -> None:
        try:
            result["a"] = cli.main(argv)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            result["a"] = exc

    monkeypatch.setattr(Worker, "prune_one", pause_run_a)
    thread = threading.Thread(target=run_a, name="run-a")
    thread.start()
    try:
        assert paused.wait(timeout=300), result
        before = snapshot(sandbox)
        code, text = run_cli_logged(argv, caplog)
    finally:
        go.set()
        thread.join(timeout=300)
    assert_refused(code, text, f"is held by PID {os.getpid()}", socket.gethostname(),
                   str(sandbox / "out.neuroal-tmp" / "lock"))
    assert changed(before, snapshot(sandbox), own=("out", "out.neuroal-tmp")) == []
    assert result["a"] == 0, result
    assert json.loads((out / "report.json").read_text())["achieved_sparsity"] > 0.4
    assert (out / MARKER).is_file() and not (sandbox / "out.neuroal-tmp").exists()


def test_lock_release_removes_only_what_it_created(tmp_path: Path) -> None:
    from neuroal.outputs.safety import OutputLock

    lock = OutputLock(tmp_path / "a" / "b" / "out.neuroal-tmp")
    lock.acquire()
    assert json.loads(lock.file.read_text())["pid"] == os.getpid()
    lock.release()
    assert list(tmp_path.iterdir()) == []


def test_plan_json_may_not_overwrite_the_model(sandbox: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    """``launch/plan.py --json`` is a writer too: it replaced the model's config.json."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_cli", REPO / "launch" / "plan.py")
    assert spec is not None and spec.loader is not None
    plan_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plan_cli)
    target = sandbox / "model" / "config.json"
    before = snapshot(sandbox)
    monkeypatch.setattr(sys, "argv", ["plan.py", "--model", str(sandbox / "model"), "--workers", "1",
                                      "--device-type", "cpu", "--seqlen", "128", "--json", str(target)])
    assert plan_cli.main() == 2
    assert str(target) in capsys.readouterr().err
    assert changed(before, snapshot(sandbox)) == []
