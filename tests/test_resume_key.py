"""The resume key covers every input byte: full-file digests of the weight shards (cached by
file identity), the tokenizer files and the calibration source. A change anywhere refuses
``--resume`` naming the file; an unchanged input resumes bit-identically."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import run_cli_logged, save_tiny_model
from safetensors.torch import load_file, save_file

import neuroal.runtime.digests as digests
from neuroal.engine.worker import Worker
from neuroal.models.loading import ModelSource, weights_fingerprint
from neuroal.outputs.checkpoint import fingerprint_changes, input_changes

OLD_SAMPLE, OLD_SAMPLES = 64 * 1024, 4  # the sampled fingerprint this key replaces


def _old_sample_windows(span: int) -> list[tuple[int, int]]:
    return [((span - OLD_SAMPLE) * k // (OLD_SAMPLES - 1), (span - OLD_SAMPLE) * k
             // (OLD_SAMPLES - 1) + OLD_SAMPLE) for k in range(OLD_SAMPLES)]


def _flip_between_samples(path: Path) -> int:
    """Flip the low mantissa bit of one fp32/bf16 value in the middle of the data, outside
    every window the old 4 x 64 KiB fingerprint read; returns the offset."""
    data = bytearray(path.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    span = len(data) - header_end
    windows = _old_sample_windows(span)
    rel = (windows[0][1] + windows[1][0]) // 2 // 4 * 4  # between the first two windows
    assert all(not a <= rel < b for a, b in windows) and rel < span, (rel, windows)
    data[header_end + rel] ^= 0x01
    path.write_bytes(bytes(data))
    return header_end + rel


def test_an_edit_between_the_old_samples_is_seen(tmp_path: Path) -> None:
    shard = tmp_path / "model-00001-of-00001.safetensors"
    save_file({"w": torch.randn(512, 1024)}, str(shard))  # 2 MiB of data
    source = ModelSource("hf_dir", str(tmp_path), "x")
    before = weights_fingerprint(source, tmp_path / "cache")
    _flip_between_samples(shard)
    assert fingerprint_changes(before, weights_fingerprint(source, tmp_path / "cache")) == \
        [f"{shard.name}: weight bytes differ"]


def test_digests_are_cached_by_file_identity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [tmp_path / "a.bin", tmp_path / "b.bin"]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 100_000)
    hashed: list[str] = []
    original = digests.stream_sha256
    monkeypatch.setattr(digests, "stream_sha256",
                        lambda p: hashed.append(Path(p).name) or original(p))
    cache = tmp_path / "cache"
    first = digests.file_digests(files, cache)
    assert sorted(hashed) == ["a.bin", "b.bin"]
    assert digests.file_digests(files, cache) == first and len(hashed) == 2  # from the cache
    data = bytearray(files[1].read_bytes())
    data[50_000] ^= 0xFF  # same size, same inode
    files[1].write_bytes(bytes(data))
    again = digests.file_digests(files, cache)
    assert hashed[2:] == ["b.bin"] and again[str(files[0])] == first[str(files[0])]
    assert again[str(files[1])] != first[str(files[1])]
    (cache / digests.CACHE_NAME).write_text("{not json")  # a corrupt cache is ignored
    assert digests.file_digests(files, cache) == again and len(hashed) == 5


def test_input_changes_name_the_file() -> None:
    old = {"tokenizer": {"location": "/m", "files": {"tokenizer.json": {"size": 1, "sha256": "a"}}},
           "calibration": {"location": "/c.txt", "sha256": "x"}}
    new = json.loads(json.dumps(old))
    assert input_changes(old, new) == []
    new["tokenizer"]["files"]["tokenizer.json"]["sha256"] = "b"
    new["calibration"]["sha256"] = "y"
    assert input_changes(old, new) == ["tokenizer file tokenizer.json: content differs",
                                       "calibration file /c.txt: content differs"]


# --------------------------------------------------------------------------- end to end


class _CrashError(Exception):
    pass


@pytest.fixture()
def model(tmp_path: Path, tokenizer_dir: Path) -> Path:
    """A tiny Llama in one shard of ~400 kB (wider than the old fingerprint's samples)."""
    return save_tiny_model("llama", tmp_path / "model", tokenizer_dir, shard="10MB")


@pytest.fixture()
def calib(tmp_path: Path, small_text: Path) -> Path:
    return Path(shutil.copy(small_text, tmp_path / "calib.txt"))


def _argv(model: Path, out: Path, text: Path) -> list[str]:
    return ["--model", str(model), "--calib", f"text:{text}", "--eval", "none", "--nsamples", "4",
            "--seqlen", "32", "--device", "cpu", "--sparsity", "0.6", "--output", str(out)]


def _crash(argv: list[str], caplog: pytest.LogCaptureFixture,
           monkeypatch: pytest.MonkeyPatch) -> None:
    original = Worker.prune_one
    calls = {"n": 0}

    def wrapped(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls["n"] += 1
        if calls["n"] > 1:
            raise _CrashError("killed")
        return original(self, *args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(Worker, "prune_one", wrapped)
        with pytest.raises(_CrashError):
            run_cli_logged(argv, caplog)


def _edit(what: str, model: Path, calib: Path) -> str:
    """Change one input; returns the text the refusal must contain."""
    if what == "shard":
        shard = next(model.glob("model*.safetensors"))
        _flip_between_samples(shard)
        return f"{shard.name}: weight bytes differ"
    if what == "tokenizer":
        path = model / "tokenizer_config.json"
        text = path.read_text()
        assert "\n  " in text
        path.write_text(text.replace("\n  ", "\n\t ", 1))  # same size, still the same JSON
        return "tokenizer file tokenizer_config.json: content differs"
    calib.write_text(calib.read_text(encoding="utf-8") + " one more sentence.\n", encoding="utf-8")
    return f"calibration file {calib.resolve()}: content differs"


@pytest.mark.parametrize("what", ["shard", "tokenizer", "calibration"])
def test_resume_refuses_a_changed_input_naming_it(what: str, model: Path, calib: Path,
                                                  tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEUROAL_CACHE", str(tmp_path / "cache"))
    assert len(list(model.glob("model*.safetensors"))) == 1
    argv = _argv(model, tmp_path / "out", calib)
    _crash(argv, caplog, monkeypatch)
    expected = _edit(what, model, calib)
    code, text = run_cli_logged([*argv, "--resume"], caplog)
    assert code == 2 and "Traceback" not in text, text
    assert expected in text and "changed since" in text, text
    assert not (tmp_path / "out").exists()


def test_unchanged_inputs_resume_bit_identically(model: Path, calib: Path, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEUROAL_CACHE", str(tmp_path / "cache"))
    code, text = run_cli_logged(_argv(model, tmp_path / "ref", calib), caplog)
    assert code == 0, text
    argv = _argv(model, tmp_path / "out", calib)
    _crash(argv, caplog, monkeypatch)
    with caplog.at_level(logging.INFO, logger="neuroal"):
        code, text = run_cli_logged([*argv, "--resume"], caplog)
    assert code == 0, text
    a, b = ({k: v for f in sorted((tmp_path / d).glob("*.safetensors"))
             for k, v in load_file(str(f)).items()} for d in ("out", "ref"))
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
