"""``--overwrite`` proves ownership, not names: the marker lists every file at every depth with
its size and SHA-256 and a run id that ``report.json`` repeats; a folder is replaced only if all
of it is what neuroal wrote, unchanged. Marker-less outputs of earlier versions must match the
legacy layout exactly (names and report schema); anything else is refused with a message saying
how to delete it by hand."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from neuroal.config.inputs import file_sha256
from neuroal.outputs.export import OutputDir
from neuroal.outputs.safety import MARKER, UnsafeOutputError, check_output_path, replaceable

REPORT = {"model": "m", "criterion": "wanda", "allocation": "uniform", "pattern": "unstructured",
          "target_sparsity": 0.5, "achieved_sparsity": 0.5, "timings": {"total": 1.0}}
CONFIG = {s: {} for s in ("criterion", "allocation", "calib", "engine", "output")} | {
    "model": {"name": "m"}}


def neuroal_output(path: Path) -> Path:
    """An output written through OutputDir.atomic (the marker written last), with plots."""
    with OutputDir(path).atomic() as staging:
        (staging / "report.json").write_text(json.dumps(REPORT))
        (staging / "neuroal_config.yaml").write_text(yaml.safe_dump(CONFIG))
        (staging / "model.safetensors").write_bytes(b"\0" * 64)
        (staging / "plots").mkdir()
        (staging / "plots" / "sparsity_per_block.png").write_bytes(b"png")
    return path


def test_the_marker_records_every_file_with_digests_and_a_run_id(tmp_path: Path) -> None:
    out = neuroal_output(tmp_path / "out")
    marker = json.loads((out / MARKER).read_text())
    assert marker["format"] == 2 and set(marker["entries"]) == {
        "report.json", "neuroal_config.yaml", "model.safetensors", "plots/sparsity_per_block.png"}
    entry = marker["entries"]["plots/sparsity_per_block.png"]
    assert entry == {"size": 3, "sha256": file_sha256(out / "plots" / "sparsity_per_block.png")}
    assert json.loads((out / "report.json").read_text())["run_id"] == marker["run_id"]
    assert replaceable(out) == (True, "a neuroal prune output")
    check_output_path(out, overwrite=True)


@pytest.mark.parametrize(("change", "fragment"), [
    ("user-file-in-plots", "plots/mine.png"),
    ("user-folder", "notes/"),
    ("edited-shard", "changed or removed since: model.safetensors"),
    ("same-size-edit", "changed or removed since: report.json"),
    ("removed-file", "changed or removed since: plots/sparsity_per_block.png"),
    ("symlink", "a symbolic link"),
    ("run-id", "run id"),
])
def test_anything_neuroal_did_not_write_blocks_the_replace(change: str, fragment: str,
                                                           tmp_path: Path) -> None:
    out = neuroal_output(tmp_path / "out")
    if change == "user-file-in-plots":
        (out / "plots" / "mine.png").write_bytes(b"mine")
    elif change == "user-folder":
        (out / "notes").mkdir()
    elif change == "edited-shard":
        (out / "model.safetensors").write_bytes(b"\1" * 64)
    elif change == "same-size-edit":
        text = (out / "report.json").read_text()
        (out / "report.json").write_text(text.replace('"wanda"', '"WANDA"'))
    elif change == "removed-file":
        (out / "plots" / "sparsity_per_block.png").unlink()
    elif change == "symlink":
        (out / "link").symlink_to(tmp_path)
    else:
        report = json.loads((out / "report.json").read_text())
        report["run_id"] = "0" * 32
        (out / "report.json").write_text(json.dumps(report))
    ok, why = replaceable(out)
    assert not ok and fragment in why, why
    with pytest.raises(UnsafeOutputError, match="--overwrite refused"):
        check_output_path(out, overwrite=True)


def home(tmp_path: Path) -> Path:
    root = tmp_path / "home"
    (root / ".ssh").mkdir(parents=True)
    (root / ".ssh" / "id_ed25519").write_text("KEY\n")
    (root / "Documents").mkdir()
    (root / "Documents" / "cv.md").write_text("cv\n")
    (root / "notes.txt").write_text("notes\n")
    return root


def test_a_hand_written_name_list_deletes_nothing(tmp_path: Path) -> None:
    root = home(tmp_path)
    (root / MARKER).write_text(json.dumps({"files": [".ssh", "Documents", "notes.txt"]}))
    ok, why = replaceable(root)
    assert not ok and "names only" in why and "rm -r" in why


def test_a_forged_marker_with_true_digests_deletes_nothing(tmp_path: Path) -> None:
    """Even with correct sizes, digests and a run id repeated in report.json, names neuroal
    never writes (hidden files, user folders, notes) block the replace."""
    root = home(tmp_path)
    (root / "report.json").write_text(json.dumps({**REPORT, "run_id": "a" * 32}))
    entries = {rel: {"size": (root / rel).stat().st_size, "sha256": file_sha256(root / rel)}
               for rel in (".ssh/id_ed25519", "Documents/cv.md", "notes.txt", "report.json")}
    (root / MARKER).write_text(json.dumps({"files": [], "entries": entries, "run_id": "a" * 32}))
    ok, why = replaceable(root)
    assert not ok and "never writes" in why and ".ssh/id_ed25519" in why


def legacy_output(path: Path) -> Path:
    path.mkdir()
    (path / "report.json").write_text(json.dumps(REPORT))
    (path / "neuroal_config.yaml").write_text(yaml.safe_dump(CONFIG))
    (path / "config.json").write_text("{}")
    (path / "README.md").write_text("# card\n")
    (path / "model.safetensors").write_bytes(b"\0" * 8)
    return path


def test_legacy_outputs_must_match_exactly(tmp_path: Path) -> None:
    out = legacy_output(tmp_path / "old")
    assert replaceable(out) == (True, "a neuroal prune output of an earlier version")
    (out / "notes.txt").write_text("mine\n")
    ok, why = replaceable(out)
    assert not ok and "notes.txt" in why and "rm -r" in why


@pytest.mark.parametrize("broken", ["report-schema", "config-schema", "no-config"])
def test_a_user_folder_with_neuroal_names_is_not_an_old_output(broken: str,
                                                               tmp_path: Path) -> None:
    out = legacy_output(tmp_path / "project")
    if broken == "report-schema":
        (out / "report.json").write_text('{"quarter": "Q3"}')
    elif broken == "config-schema":
        (out / "neuroal_config.yaml").write_text("note: mine\n")
    else:
        (out / "neuroal_config.yaml").unlink()
    ok, why = replaceable(out)
    assert not ok and "not a neuroal output" in why and "delete it by hand" in why


def test_input_shards_linking_into_the_output_are_refused(tmp_path: Path,
                                                          tiny_models: dict[str, Path]) -> None:
    out = neuroal_output(tmp_path / "out")
    model = shutil.copytree(tiny_models["llama"], tmp_path / "model")
    shard = next(model.glob("model-*.safetensors"))
    shutil.move(shard, out / "model.safetensors")
    shard.symlink_to(out / "model.safetensors")
    with pytest.raises(UnsafeOutputError, match="contains the input"):
        check_output_path(out, overwrite=True, inputs=[model])


def test_an_overwrite_through_the_cli_replaces_a_genuine_output_only(
        tmp_path: Path, tiny_models: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    from conftest import DATA_DIR, run_cli_logged

    text = tmp_path / "calib.txt"
    text.write_text((DATA_DIR / "wikitext2" / "wiki.valid.tokens").read_text()[:20_000])
    argv = ["--model", str(tiny_models["llama"]), "--calib", f"text:{text}", "--eval", "none",
            "--nsamples", "2", "--seqlen", "16", "--device", "cpu", "--output",
            str(tmp_path / "out")]
    assert run_cli_logged(argv, caplog)[0] == 0
    first = json.loads((tmp_path / "out" / MARKER).read_text())["run_id"]
    assert run_cli_logged([*argv, "--overwrite"], caplog)[0] == 0
    assert json.loads((tmp_path / "out" / MARKER).read_text())["run_id"] != first
    (tmp_path / "out" / "plots" / "mine.png").write_bytes(b"mine")
    code, log = run_cli_logged([*argv, "--overwrite"], caplog)
    assert code == 2 and "plots/mine.png" in log
    assert (tmp_path / "out" / "plots" / "mine.png").read_bytes() == b"mine"
