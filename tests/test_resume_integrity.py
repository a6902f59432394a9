"""Resume safety: the state is keyed on the model's weights, every state
file carries a SHA-256 checked when read, and a replayed block is checked against its report
and the plan. Each test crashes a tiny run, tampers with the model or the state, and resumes."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli_logged, save_tiny_model
from safetensors.torch import load_file, save_file

from neuroal.engine.worker import Worker
from neuroal.models.loading import ModelSource, resolve_model


class _CrashError(Exception):
    pass


def _crash_after(monkeypatch: pytest.MonkeyPatch, method: str, calls: int) -> None:
    original = getattr(Worker, method)
    count = {"n": 0}

    def wrapped(self, *args, **kwargs):  # noqa: ANN001, ANN202
        count["n"] += 1
        if count["n"] > calls:
            raise _CrashError(f"{method} call {count['n']}")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Worker, method, wrapped)


@pytest.fixture()
def model(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    return Path(shutil.copytree(tiny_models["llama"], tmp_path / "model"))


def _argv(model: Path, out: Path, text: Path, *extra: str) -> list[str]:
    return ["--model", str(model), "--calib", f"text:{text}", "--eval", "none", "--nsamples", "4",
            "--seqlen", "32", "--device", "cpu", "--sparsity", "0.6", "--output", str(out), *extra]


NEUROAL = ["--allocation", "neuroal", "allocation.block_grid=[0.05,0.1]",
           "allocation.row_grid=[0.0,0.05]", "allocation.search_samples=2"]


def _crashed_run(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, argv: list[str],
                 method: str = "prune_one", calls: int = 1) -> Path:
    """Run the CLI until ``Worker.<method>`` is called ``calls + 1`` times; return the state."""
    with monkeypatch.context() as m:
        _crash_after(m, method, calls)
        with pytest.raises(_CrashError):
            run_cli_logged(argv, caplog)
    out = Path(argv[argv.index("--output") + 1])
    state = out.with_name(out.name + ".neuroal-tmp") / "state"
    assert state.is_dir() and not out.exists()
    return state


def _resume(argv: list[str], caplog: pytest.LogCaptureFixture) -> tuple[int, str]:
    return run_cli_logged([*argv, "--resume"], caplog)


# --------------------------------------------------------------------------- item 4: weights


def test_resume_refuses_a_model_swapped_at_the_same_path(model: Path, small_text: Path,
                                                         tmp_path: Path, tokenizer_dir: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    argv = _argv(model, tmp_path / "out", small_text)
    _crashed_run(monkeypatch, caplog, argv)
    shutil.rmtree(model)
    save_tiny_model("llama", model, tokenizer_dir, seed=1)  # same architecture, other weights
    code, text = _resume(argv, caplog)
    assert code == 2 and "Traceback" not in text
    assert "weights changed" in text and "model-00001-of-" in text and "weight bytes differ" in text
    assert not (tmp_path / "out").exists()


def test_fingerprint_sees_size_header_and_weight_changes(model: Path, tmp_path: Path) -> None:
    from neuroal.models.loading import weights_fingerprint
    from neuroal.outputs.checkpoint import fingerprint_changes

    source = resolve_model(str(model))
    before = weights_fingerprint(source)
    assert fingerprint_changes(before, weights_fingerprint(source)) == []
    shard = sorted(model.glob("model-*.safetensors"))[0]
    tensors = load_file(str(shard))
    name = sorted(tensors)[0]
    tensors[name] = tensors[name] + 1  # same shapes, sizes and header: only the bytes differ
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert fingerprint_changes(before, weights_fingerprint(source)) == \
        [f"{shard.name}: weight bytes differ"]
    tensors[name] = tensors[name].double()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    assert "size" in fingerprint_changes(before, weights_fingerprint(source))[0]
    (model / "model-extra.safetensors").write_bytes(shard.read_bytes())
    assert "model-extra.safetensors: added" in fingerprint_changes(before, weights_fingerprint(source))


def test_gguf_and_hub_fingerprints(tmp_path: Path) -> None:
    from gguf_fixture import tiny_llama, write_tiny_llama_gguf

    from neuroal.models.loading import weights_fingerprint
    from neuroal.outputs.checkpoint import fingerprint_changes

    path = write_tiny_llama_gguf(tmp_path / "m.gguf", tiny_llama(seed=0))
    source = resolve_model(str(path))
    first = weights_fingerprint(source)
    assert first["kind"] == "gguf" and first["files"]["m.gguf"]["size"] == path.stat().st_size
    write_tiny_llama_gguf(path, tiny_llama(seed=1))
    assert fingerprint_changes(first, weights_fingerprint(source)) == ["m.gguf: weight bytes differ"]
    hub = weights_fingerprint(ModelSource("hub", "nobody/not-cached-model", "x"))
    assert hub["commit"] is None and "cannot be fingerprinted" in hub["note"]


# --------------------------------------------------------------------------- item 5: state files


@pytest.mark.parametrize("update_digest", [False, True])
def test_resume_refuses_an_edited_candidate_score(update_digest: bool, model: Path,
                                                  small_text: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    argv = _argv(model, tmp_path / "out", small_text, *NEUROAL)
    state = _crashed_run(monkeypatch, caplog, argv, "eval_candidate", 3)
    path = state / "search" / "block-001.pt"
    payload = torch.load(path, weights_only=True)
    payload["score"] = -1e9  # would make this lambda win
    torch.save(payload, path)
    if update_digest:  # a careful editor also rewrites the digest: the score no longer adds up
        import hashlib

        (state / "search" / "block-001.pt.sha256").write_text(
            f"{hashlib.sha256(path.read_bytes()).hexdigest()}  block-001.pt\n")
    code, text = _resume(argv, caplog)
    assert code == 2 and "Traceback" not in text
    assert str(path) in text
    assert ("not the sum of its alignment terms" if update_digest else "modified or corrupted") in text
    assert not (tmp_path / "out").exists()


def _dense_block(model: Path, names: list[str]) -> dict[str, torch.Tensor]:
    from neuroal.models.loading import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint(model)
    keys = {n: f"model.layers.0.{n}.weight" for n in names}
    loaded = ckpt.load(keys.values(), torch.float32, "cpu")
    return {n: loaded[k] for n, k in keys.items()}


@pytest.mark.parametrize("edit", ["weights", "weights+digest", "weights+report+digest", "digest-missing"])
def test_resume_refuses_an_edited_block(edit: str, model: Path, small_text: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """A dense layer smuggled into a stored block never reaches the output."""
    import hashlib

    argv = _argv(model, tmp_path / "out", small_text)
    state = _crashed_run(monkeypatch, caplog, argv)
    path = state / "prune" / "block_0000.safetensors"
    digest = path.with_name(path.name + ".sha256")
    if edit == "digest-missing":
        digest.unlink()
        expected = "no recorded SHA-256"
    else:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            report = json.loads(f.metadata()["report"])
            names = list(f.keys())  # noqa: SIM118 - safe_open API
        if "report" in edit:  # claim the dense weights are what was planned... but 0 pruned
            for layer in report["layers"]:
                layer["zeros"] = layer["pruned"] = 0
        save_file(_dense_block(model, names), str(path), metadata={"report": json.dumps(report)})
        if "digest" in edit:
            digest.write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
        expected = {"weights": "modified or corrupted", "weights+digest": "zeros of",
                    "weights+report+digest": "pruned, the plan says"}[edit]
    code, text = _resume(argv, caplog)
    assert code == 2 and "Traceback" not in text
    assert str(path) in text and expected in text, text
    assert not (tmp_path / "out").exists()


def test_state_of_an_earlier_version_is_refused(tmp_path: Path) -> None:
    from neuroal.outputs.checkpoint import FORMAT, RunState, StateIntegrityError

    state = tmp_path / "state"
    RunState(state, {"a": 1}, resume=False, weights={"kind": "hf_dir", "files": {}})
    meta = json.loads((state / "meta.json").read_text())
    assert meta["format"] == FORMAT and (state / "meta.json.sha256").is_file()
    del meta["format"], meta["weights"]
    (state / "meta.json").write_text(json.dumps(meta))
    (state / "meta.json.sha256").unlink()
    with pytest.raises(StateIntegrityError, match="meta.json"):
        RunState(state, {"a": 1}, resume=True)


def test_untouched_resume_still_matches(model: Path, small_text: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """The checks do not refuse an honest resume: it completes and its report is complete."""
    argv = _argv(model, tmp_path / "out", small_text)
    _crashed_run(monkeypatch, caplog, argv)
    with caplog.at_level(logging.INFO, logger="neuroal"):
        code, text = _resume(argv, caplog)
    assert code == 0, text
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["achieved_sparsity"] == pytest.approx(0.6, abs=0.02)
    assert not (tmp_path / "out.neuroal-tmp").exists()
