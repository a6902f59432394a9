"""Bad input: a clear error before any weight is loaded, and nothing left at the output path."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import DATA_DIR

from neuroal import cli
from neuroal.engine import executor as executor_mod


@pytest.fixture()
def small_file(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.txt"
    path.write_text((DATA_DIR / "wikitext2" / "wiki.valid.tokens").read_text()[:20_000])
    return path


def _run(caplog: pytest.LogCaptureFixture, argv: list[str]) -> tuple[int, str]:
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="neuroal"):
        logging.getLogger("neuroal").addHandler(caplog.handler)
        try:
            code = cli.main(argv)
        finally:
            logging.getLogger("neuroal").removeHandler(caplog.handler)
    return code, caplog.text


BAD_INPUTS = [
    (["--sparsity", "1.5"], ["sparsity=1.5", "between 0 and 1"]),
    (["--sparsity", "0"], ["sparsity=0", "between 0 and 1"]),
    (["--pattern", "4:4"], ["4:4", "0 < N < M"]),
    (["--pattern", "2:6"], ["not divisible by M=6", "64 input columns"]),
    (["--pattern", "two-four"], ["'two-four'", "N:M"]),
    (["--criterion", "wandaa"], ["'wandaa'", "magnitude", "sparsegpt", "wanda"]),
    (["--allocation", "owll"], ["'owll'", "uniform"]),
    (["--calib", "pile"], ["'pile'", "wikitext2", "c4", "text:<path>"]),
    (["--eval", "pile"], ["'pile'", "wikitext2"]),
    (["--nsamples", "100000", "--seqlen", "128"], ["nsamples", "100000", "128"]),
    (["--seqlen", "512"], ["calib.seqlen=512", "max_position_embeddings=256"]),
    (["--workers", "5"], ["workers=5", "2 blocks"]),
    (["engine.micro_batch=0"], ["engine.micro_batch=0"]),
    (["criterion.percdamp=0.1"], ["percdamp", "'wanda'"]),
    (["calib.nsampels=3"], ["calib.nsampels", "nsamples"]),
]


@pytest.mark.parametrize(("extra", "expected"), BAD_INPUTS)
def test_bad_input_is_rejected_before_loading(extra: list[str], expected: list[str],
                                              tiny_models: dict[str, Path], small_file: Path,
                                              tmp_path: Path, no_loading: None,
                                              caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    argv = ["--model", str(tiny_models["llama"]), "--calib", f"text:{small_file}",
            "--eval", "none", "--nsamples", "2", "--seqlen", "16", "--output", str(out)]
    code, text = _run(caplog, argv + extra)
    assert code == 2
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not in {text!r}"
    assert not out.exists() and not (tmp_path / "out.neuroal-tmp").exists()


def test_missing_and_non_causal_models(tmp_path: Path, no_loading: None,
                                       caplog: pytest.LogCaptureFixture) -> None:
    from transformers import AutoConfig

    code, text = _run(caplog, ["--model", str(tmp_path / "missing"), "--output",
                               str(tmp_path / "o")])
    assert code == 2 and "does not exist" in text
    vit = tmp_path / "vit"
    AutoConfig.for_model("vit").save_pretrained(vit)
    code, text = _run(caplog, ["--model", str(vit), "--output", str(tmp_path / "o")])
    assert code == 2 and "not a causal" in text and "'vit'" in text
    assert not (tmp_path / "o").exists()


def test_existing_output_needs_overwrite(tiny_models: dict[str, Path], tmp_path: Path,
                                         no_loading: None,
                                         caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, text = _run(caplog, ["--model", str(tiny_models["llama"]), "--output", str(out)])
    assert code == 2 and "already exists" in text and "--overwrite" in text
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_run_leaves_nothing(error: type[BaseException], tiny_models: dict[str, Path],
                                        small_file: Path, tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    def boom(*_args, **_kwargs):
        raise error("stop")

    monkeypatch.setattr(executor_mod.LocalExecutor, "run_final_prune", boom)
    out = tmp_path / "out"
    argv = ["--model", str(tiny_models["llama"]), "--calib", f"text:{small_file}", "--eval",
            "none", "--nsamples", "2", "--seqlen", "16", "--output", str(out)]
    if error is KeyboardInterrupt:
        assert _run(caplog, argv)[0] == 130
    else:
        with pytest.raises(RuntimeError):
            cli.main(argv)
    # nothing at the output and no half-written model; only the resume state survives
    assert not out.exists() and not (tmp_path / "out.neuroal-tmp" / "model").exists()
