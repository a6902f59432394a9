"""The resume state sized to what changes (bit-packed masks where the criterion only chooses
masks, weights where values change), written by a background thread, and onloading's disk spill
beside the output. Each test can fail: round trips are compared bit for bit, sizes against the
dense bytes, errors by the file and block they name."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import run_cli_logged, save_tiny_model, tiny_cfg
from safetensors import safe_open
from safetensors.torch import load_file

import neuroal.outputs.checkpoint as checkpoint
from neuroal.engine.onload import BlockStore, SpillSpaceError
from neuroal.engine.worker import PruneJob, Worker, WorkerSpec
from neuroal.models.loading import resolve_model
from neuroal.outputs.checkpoint import (
    KIND_MASKS,
    KIND_WEIGHTS,
    StateWriteError,
    StateWriter,
    load_block_state,
    pack_mask,
    positive_zeros,
    save_block_state,
    unpack_mask,
)
from neuroal.pipeline import run

# --------------------------------------------------------------------------- format


@pytest.mark.parametrize("shape", [(3, 5), (8, 8), (1, 1), (7, 13)])
def test_mask_packing_round_trips_at_one_bit_per_weight(shape: tuple[int, int]) -> None:
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) < 0.4
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (mask.numel() + 7) // 8
    assert torch.equal(unpack_mask(packed, shape), mask)


def test_masks_rebuild_pruned_weights_bit_for_bit_signed_zeros_included() -> None:
    """Pruning writes +0.0; a dense -0.0 that was kept must stay -0.0 after the replay."""
    dense = torch.randn(6, 10, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    dense[0, 0], dense[1, 1], dense[2, 2] = -0.0, 0.0, -0.0
    pruned = dense.clone().masked_fill_(dense.abs() < 0.5, 0.0)
    pruned[2, 2] = -0.0  # kept (not pruned) dense -0.0
    rebuilt = dense.clone().masked_fill_(positive_zeros(pruned), 0.0)
    assert torch.equal(rebuilt.view(torch.int16), pruned.view(torch.int16))


def test_block_state_kinds_round_trip(tmp_path: Path) -> None:
    (tmp_path / "prune").mkdir()
    w = torch.randn(16, 24).masked_fill_(torch.rand(16, 24) < 0.5, 0.0)
    masks_bytes = save_block_state(tmp_path, 0, {"mlp.up_proj": w}, {"a": 1}, KIND_MASKS)
    weights_bytes = save_block_state(tmp_path, 1, {"mlp.up_proj": w}, {"a": 2}, KIND_WEIGHTS)
    masks, report = load_block_state(tmp_path, 0)
    assert report == {"a": 1} and masks["mlp.up_proj"].dtype == torch.bool
    assert torch.equal(masks["mlp.up_proj"], w == 0)
    weights, _ = load_block_state(tmp_path, 1)
    assert torch.equal(weights["mlp.up_proj"], w)
    payload = 16 * 24
    assert masks_bytes < weights_bytes - 3 * payload  # 1 bit vs 32 bits per weight
    with pytest.raises(ValueError, match="kind 'bits'"):
        save_block_state(tmp_path, 2, {"x": w}, {}, "bits")


def test_state_kind_follows_what_the_plug_ins_declare() -> None:
    """Decided by ``changes_values`` of the criterion and the refiners, not by names."""
    from neuroal.criteria import CRITERIA
    from neuroal.recovery import REFINERS

    assert Worker.state_kind(PruneJob("wanda")) == KIND_MASKS
    assert Worker.state_kind(PruneJob("magnitude", refine=(("dsnot", {}),))) == KIND_MASKS
    assert Worker.state_kind(PruneJob("sparsegpt")) == KIND_WEIGHTS
    assert Worker.state_kind(PruneJob("ria", reconstruct={"steps": 1})) == KIND_WEIGHTS
    for name in CRITERIA.names():
        expected = KIND_WEIGHTS if CRITERIA.get(name).changes_values else KIND_MASKS
        assert Worker.state_kind(PruneJob(name)) == expected
    assert not any(REFINERS.get(n).changes_values for n in REFINERS.names())


# --------------------------------------------------------------------------- writer


def test_writer_writes_in_the_background_and_raises_at_the_next_block(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "prune").mkdir()
    writer = StateWriter()
    w = torch.zeros(4, 8)
    writer.submit(tmp_path, 0, {"a": w}, {"i": 0}, KIND_MASKS)
    writer.flush()
    assert load_block_state(tmp_path, 0) is not None and writer.stats()["blocks"] == 1

    def full(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_block_state", full)
    writer.submit(tmp_path, 1, {"a": w}, {"i": 1}, KIND_MASKS)
    with pytest.raises(StateWriteError, match=r"block 1 .*block_0001\.safetensors.*No space left"):
        writer.flush()
    writer.submit(tmp_path, 2, {"a": w}, {"i": 2}, KIND_MASKS)  # the error was raised once
    deadline = time.monotonic() + 30
    while writer._error is None and time.monotonic() < deadline:  # noqa: SLF001 - the thread's
        time.sleep(0.01)
    with pytest.raises(StateWriteError, match="block 2"):  # raised by the next block's submit
        writer.submit(tmp_path, 3, {"a": w}, {"i": 3}, KIND_MASKS)
    writer.flush()
    assert load_block_state(tmp_path, 1) is None and load_block_state(tmp_path, 3) is None


def test_a_failing_state_write_stops_the_run_with_one_clear_line(
        tiny_models: dict[str, Path], small_text: Path, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def full(root, index, *_args, **_kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint, "save_block_state", full)
    out = tmp_path / "out"
    code, text = run_cli_logged(
        ["--model", str(tiny_models["llama"]), "--calib", f"text:{small_text}", "--eval", "none",
         "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--output", str(out)], caplog)
    assert code == 2 and "Traceback" not in text, text
    assert "resume state of block" in text and "No space left on device" in text
    assert not out.exists()


def _prune_run(model: Path, out: Path, text: Path, criterion: str, resume: bool = False):  # noqa: ANN202
    return run(tiny_cfg(model, out, calib={"source": f"text:{text}"}, sparsity=0.6,
                        criterion={"name": criterion},
                        output={"dir": str(out), "resume": resume, "save_model": True}))


class _CrashError(Exception):
    pass


def _crash_at_block(monkeypatch: pytest.MonkeyPatch, block: int) -> None:
    original = Worker.prune_one

    def wrapped(self, index, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if index == block:
            raise _CrashError(f"block {index}")
        return original(self, index, *args, **kwargs)

    monkeypatch.setattr(Worker, "prune_one", wrapped)


@pytest.mark.parametrize(("criterion", "kind"), [("wanda", KIND_MASKS), ("sparsegpt", KIND_WEIGHTS)])
def test_kill_mid_write_is_ignored_and_resume_is_bit_identical(
        criterion: str, kind: str, tiny_models: dict[str, Path], small_text: Path,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Block 0 finished; block 1's write was killed half-way (a ``.part`` file and a digest
    without its file): resume replays block 0 from its state, prunes block 1 again, and the
    output equals an uninterrupted run's byte for byte."""
    model = tiny_models["llama"]
    ref = _prune_run(model, tmp_path / "ref", small_text, criterion)
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _crash_at_block(m, 1)
        with pytest.raises(_CrashError):
            _prune_run(model, out, small_text, criterion)
    prune = tmp_path / "out.neuroal-tmp" / "state" / "prune"
    assert sorted(p.name for p in prune.iterdir()) == ["block_0000.safetensors",
                                                       "block_0000.safetensors.sha256"]
    with safe_open(str(prune / "block_0000.safetensors"), "pt") as f:
        assert f.metadata()["kind"] == kind
    (prune / "block_0001.safetensors.part").write_bytes(b"\x00" * 100)  # killed while writing
    (prune / "block_0001.safetensors.sha256").write_text("0" * 64 + "  block_0001.safetensors\n")
    res = _prune_run(model, out, small_text, criterion, resume=True)
    assert res.report["layers"] == ref.report["layers"]
    a = {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(str(f)).items()}
    b = {k: v for f in sorted((tmp_path / "ref").glob("*.safetensors"))
         for k, v in load_file(str(f)).items()}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_mask_state_is_a_32nd_of_the_fp32_weights(tiny_models: dict[str, Path], small_text: Path,
                                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  ) -> None:
    model = tiny_models["llama"]
    sizes = {}
    for criterion in ("wanda", "sparsegpt"):
        out = tmp_path / criterion
        with monkeypatch.context() as m:
            _crash_at_block(m, 1)
            with pytest.raises(_CrashError):
                _prune_run(model, out, small_text, criterion)
        sizes[criterion] = (tmp_path / f"{criterion}.neuroal-tmp" / "state" / "prune" /
                            "block_0000.safetensors").stat().st_size
    # tiny block: 64 x (64 + 16 + 16 + 64) + 3 x 64 x 128 weights
    numel = 64 * 160 + 3 * 64 * 128
    assert sizes["sparsegpt"] >= numel * 4
    assert sizes["wanda"] < numel / 8 + 4096  # bits plus the header and report


# --------------------------------------------------------------------------- onload spill


@pytest.fixture(scope="module")
def llama3(tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("spill") / "llama3", tokenizer_dir,
                           num_layers=3)


def test_disk_spill_goes_under_the_given_folder_and_checks_space(
        llama3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = resolve_model(str(llama3))
    root = tmp_path / "out.neuroal-tmp" / "onload"
    worker = Worker(WorkerSpec(source, 0, 3, 3, "cpu", "float32", 2, onload="disk",
                               spill_dir=str(root)))
    stream = worker.embed(torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0)))
    entries = {n: 0.5 for n in worker.adapter.prunable_linears(worker.adapter.blocks[0])}
    stream, _ = worker.prune_one(0, stream, entries, PruneJob("wanda"))
    assert worker.store.spill_dir.parent == root and worker.store.spilled == {0}
    block_bytes = worker.store._block_bytes(1)  # noqa: SLF001
    usage = shutil.disk_usage(root)
    monkeypatch.setattr(shutil, "disk_usage",
                        lambda _p: usage._replace(free=block_bytes // 2))
    with pytest.raises(SpillSpaceError, match=r"spilling 1 modified block\(s\) to .*onload.* "
                                              r"needs 0\.\d+ GB, only 0\.\d+ GB free"):
        worker.prune_one(1, stream, entries, PruneJob("wanda"))
    spill = worker.store.spill_dir
    worker.close()
    assert not spill.exists()


def test_first_spill_checks_the_whole_slice(llama3: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    source = resolve_model(str(llama3))
    worker = Worker(WorkerSpec(source, 0, 3, 3, "cpu", "float32", 2, onload="disk",
                               spill_dir=str(tmp_path / "spill")))
    store: BlockStore = worker.store
    one = store._block_bytes(0)  # noqa: SLF001
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda _p: usage._replace(free=2 * one))
    stream = worker.embed(torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0)))
    entries = {n: 0.5 for n in worker.adapter.prunable_linears(worker.adapter.blocks[0])}
    with pytest.raises(SpillSpaceError, match=r"spilling 3 modified block\(s\)"):
        worker.prune_one(0, stream, entries, PruneJob("wanda"))
    worker.close()


def test_pipeline_spills_beside_the_output(llama3: Path, small_text: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[Path] = []
    original = BlockStore._spill_path

    def spy(self, index):  # noqa: ANN001, ANN202
        path = original(self, index)
        seen.append(path)
        return path

    monkeypatch.setattr(BlockStore, "_spill_path", spy)
    out = tmp_path / "out"
    run(tiny_cfg(llama3, out, calib={"source": f"text:{small_text}"},
                 engine={"onload": "disk"}))
    assert seen and all(p.parent.parent == tmp_path / "out.neuroal-tmp" / "onload" for p in seen)
    assert out.is_dir() and not (tmp_path / "out.neuroal-tmp").exists()
    assert json.loads((out / "report.json").read_text())["achieved_sparsity"] > 0.4
