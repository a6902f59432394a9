"""The ``neuroal`` console script: subcommands, --version, flags and key=value
overrides in any order, help lists generated from the registries, evaluate's exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, run_cli_logged

from neuroal import __version__, cli

TASKS = REPO / "tests" / "tasks"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"neuroal {__version__}"
    for command in ("prune", "evaluate", "plan", "recover"):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([command, "--version"])
        assert exit_info.value.code == 0
        assert capsys.readouterr().out.strip() == f"neuroal {__version__}"


def test_help_lists_come_from_the_registries(capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroal.allocation import ALLOCATIONS
    from neuroal.criteria import CRITERIA
    from neuroal.engine import EXECUTORS
    from neuroal.recovery import RECOVERY_STEPS

    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside hyphenated names
    text = " ".join(cli.build_parser().format_help().split())
    for registry in (CRITERIA, ALLOCATIONS, EXECUTORS, RECOVERY_STEPS):
        for name in registry.names():
            assert name in text, f"{registry.kind} {name!r} missing from --help"
    assert "file" in text and "dist" in text and "perp-full" in text
    assert "%%" not in text and "50 %" in text
    assert cli.main(["--help"]) == 0
    top = capsys.readouterr().out
    assert all(name in top for name in ("prune", "plan", "evaluate", "recover"))


def test_flags_and_overrides_in_any_order(tiny_models: dict[str, Path], small_text: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["calib.nsamples=2", "--model", str(tiny_models["llama"]), "engine.device=cpu",
            "--calib", f"text:{small_text}", "eval.max_windows=2", "--eval", f"text:{small_text}",
            "--seqlen", "16", "engine.micro_batch=2", "--no-save", "--criterion", "magnitude"]
    assert cli.main(["prune", *argv]) == 0
    out = capsys.readouterr().out
    assert "magnitude + uniform" in out and "(2 windows x 16 tokens)" in out


def test_stray_word_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--sparsity", "0.5", "wanda"])
    assert exit_info.value.code == 2 and "key=value" in capsys.readouterr().err


def test_plan_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    code = cli.main(["plan", "--model", "llama-2-70b", "--workers", "8", "--gpu-memory", "80GB",
                     "--json"])
    summary = json.loads(capsys.readouterr().out)
    assert code == (0 if summary["fits"] else 1) and summary["limit_bytes"] == 80 * 10**9


def test_evaluate_subcommand(tiny_models: dict[str, Path], small_text: Path, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "eval.json"
    code = cli.main(["evaluate", str(tiny_models["llama"]), "--eval", f"text:{small_text}",
                     "engine.device=cpu", "--seqlen", "16", "--windows", "2", "--tasks",
                     "tiny_choice", "--include-path", str(TASKS), "--workers", "2",
                     "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "(2 windows x 16 tokens)" in text
    assert "tiny_choice: acc " in text and "(12 documents, 0-shot)" in text
    result = json.loads(out.read_text())
    assert result["tasks"]["results"]["tiny_choice"]["version"] == 2.0


@pytest.mark.parametrize(("extra", "expected"), [
    (["--workers", "0"], ["engine.workers=0"]),
    (["--eval", "pile"], ["'pile'", "wikitext2"]),
    (["--tasks", "tiny_choice", "--include-path", "/no/such/dir"], ["/no/such/dir", "not a directory"]),
    (["--tasks", "tiny_choice", "--limit", "0"], ["eval.limit=0"]),
])
def test_evaluate_bad_input_exits_2(extra: list[str], expected: list[str],
                                    tiny_models: dict[str, Path], no_loading: None,
                                    caplog: pytest.LogCaptureFixture) -> None:
    code, text = run_cli_logged(["evaluate", str(tiny_models["llama"]), *extra], caplog)
    assert code == 2
    for fragment in expected:
        assert fragment in text, f"{fragment!r} not in {text!r}"


def test_tasks_without_lm_eval_name_the_extra(tiny_models: dict[str, Path], no_loading: None,
                                              monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else real(name, *a))
    code, text = run_cli_logged(["evaluate", str(tiny_models["llama"]), "--tasks", "hellaswag"],
                                caplog)
    assert code == 2 and "neuroal[eval]" in text
