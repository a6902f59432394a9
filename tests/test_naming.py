"""One name per concept across the commands (old spellings still work, with a warning), YAML
1.2 booleans (words such as ``off`` stay words), and the size parser (accelerate's, behind
neuroal's normalising wrapper: tests/test_libraries.py) agreeing with accelerate where accelerate
reads the spelling as bytes."""

from __future__ import annotations

import logging

import pytest

from neuroal.cli import build_parser, flags_to_tree, split_overrides
from neuroal.config.build import ConfigError, load_config
from neuroal.config.inputs import parse_size


def _tree(argv: list[str]) -> dict:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    split_overrides(parser, args)
    return flags_to_tree(args)


def test_prune_flags_share_evaluates_names(caplog: pytest.LogCaptureFixture) -> None:
    tree = _tree(["--tasks", "a,b", "--eval-windows", "3", "--eval-seqlen", "64",
                  "--ignore", "re:.*down_proj$", "--include_path", "x"])
    assert tree["eval"] == {"tasks": "a,b", "max_windows": 3, "seqlen": 64, "include_path": "x"}
    assert tree["ignore"] == "re:.*down_proj$"
    with caplog.at_level(logging.WARNING, logger="neuroal.cli"):
        old = _tree(["--eval-tasks", "a,b"])
    assert old["eval"] == {"tasks": "a,b"}
    assert "--eval-tasks is deprecated" in caplog.text and "--tasks" in caplog.text


def test_evaluate_flags_share_prunes_names(caplog: pytest.LogCaptureFixture) -> None:
    from neuroal.commands.evaluate import FLAG_KEYS
    from neuroal.commands.evaluate import build_parser as eval_parser

    args = eval_parser().parse_intermixed_args(["m", "--eval-windows", "2", "--eval-seqlen", "8"])
    assert (args.eval_windows, args.eval_seqlen) == (2, 8)
    with caplog.at_level(logging.WARNING, logger="neuroal.cli"):
        old = eval_parser().parse_intermixed_args(["m", "--windows", "2", "--seqlen", "8"])
    assert (old.eval_windows, old.eval_seqlen) == (2, 8)
    assert "--windows is deprecated" in caplog.text and "--seqlen is deprecated" in caplog.text
    assert FLAG_KEYS["eval_windows"] == "eval.max_windows" and "windows" not in FLAG_KEYS


def test_recover_takes_the_step_names() -> None:
    from neuroal.recovery.perp import PERP_VARIANTS

    for step in ("perp-masklora", "perp-scalelora", "perp-bias-norm", "perp-full"):
        assert PERP_VARIANTS.canonical(step) == step.removeprefix("perp-")


def test_yaml_words_stay_words() -> None:
    assert load_config(None, ["log.progress=off"]).log.progress == "off"
    with pytest.raises(ConfigError, match="trust_remote_code='yes': expected true or false"):
        load_config(None, ["model.trust_remote_code=yes"])
    assert load_config(None, ["model.trust_remote_code=true"]).model.trust_remote_code is True


@pytest.mark.parametrize("text", ["2GB", "500MB", "80GiB", "1.5GB", "10KB", "3MiB", "24GB"])
def test_size_parser_agrees_with_accelerate(text: str) -> None:
    from accelerate.utils import convert_file_size_to_int

    assert parse_size(text) == convert_file_size_to_int(text)


def test_size_parser_reads_what_accelerate_does_not() -> None:
    assert parse_size("1TB") == 10**12 and parse_size("2TiB") == 2 * 2**40
    assert parse_size("2gb") == 2 * 10**9  # accelerate: 2 gigabits
    assert parse_size("1000") == 1000


def test_plan_takes_prunes_engine_flag(caplog: pytest.LogCaptureFixture) -> None:
    from neuroal.commands.plan import build_parser as plan_parser

    assert plan_parser().parse_args(["--engine", "local"]).engine == "local"
    assert plan_parser().parse_args([]).engine == "ray"
    with caplog.at_level(logging.WARNING, logger="neuroal.cli"):
        old = plan_parser().parse_args(["--executor", "dist"])
    assert old.engine == "dist"
    assert "--executor is deprecated" in caplog.text and "--engine" in caplog.text
