"""Unattended progress and the run log."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from conftest import tiny_cfg

from neuroal.allocation.search import Candidate, CandidateProgress
from neuroal.runtime.logging import LOG_FILE, TqdmHandler
from neuroal.runtime.progress import Progress, configure_progress, resolve_mode, track


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def records(caplog: pytest.LogCaptureFixture):
    logger = logging.getLogger("neuroal")
    logger.addHandler(caplog.handler)
    with caplog.at_level(logging.INFO, logger="neuroal"):
        yield caplog
    logger.removeHandler(caplog.handler)


def _progress_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Progress messages, each record once (the handler may see it through propagation too)."""
    unique = {id(r): r for r in caplog.records if r.name == "neuroal.runtime.progress"}
    return [r.getMessage() for r in unique.values()]


def test_log_mode_emits_a_line_per_interval_with_rate_and_eta(records) -> None:
    clock = FakeClock()
    bar = Progress(10, "pruning blocks", unit="block", interval=10.0, mode="log", clock=clock)
    for t in (3, 6, 9, 12, 15, 18, 21, 24):  # one block every 3 s
        clock.now = 100.0 + t
        bar.update()
    lines = _progress_lines(records)
    assert len(lines) == 2  # at t=12 (4 blocks) and t=24 (8 blocks)
    assert lines[0] == "pruning blocks: 4/10 (40%)  3.0 s/block  elapsed 12s  ETA 18s"
    assert lines[1].startswith("pruning blocks: 8/10 (80%)") and "ETA 6s" in lines[1]
    clock.now = 130.0
    bar.update(2, status="done")
    bar.close()
    lines = _progress_lines(records)
    assert len(lines) == 3 and lines[2].startswith("pruning blocks: 10/10 (100%)")
    assert "ETA 0s" in lines[2] and lines[2].endswith("done")


def test_short_phase_logs_nothing_and_fast_rates_read_per_second(records) -> None:
    clock = FakeClock()
    with Progress(100, "perplexity", unit="window", interval=30.0, mode="log", clock=clock) as bar:
        for _ in range(100):
            clock.now += 0.1
            bar.update()
        assert "10.00 window/s" in bar.line()
    assert _progress_lines(records) == []  # under one interval: no line at all


def test_track_iterates_and_off_mode_is_silent(records) -> None:
    assert list(track(range(5), "x", mode="off", interval=0.0)) == [0, 1, 2, 3, 4]
    assert _progress_lines(records) == []
    assert list(track([1, 2], "y", mode="log", interval=0.0)) == [1, 2]
    assert len(_progress_lines(records)) == 2


def test_mode_from_environment_and_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NEUROAL_PROGRESS", "0")
    assert resolve_mode() == "off"
    monkeypatch.setenv("NEUROAL_PROGRESS", "log")
    assert resolve_mode() == "log"
    monkeypatch.delenv("NEUROAL_PROGRESS")
    assert resolve_mode() == "log"  # pytest's stderr is not a terminal
    with pytest.raises(ValueError, match="expected one of"):
        configure_progress(mode="fancy")
    with pytest.raises(ValueError, match="seconds >= 0"):
        configure_progress(interval=-1)


def test_candidate_progress_logs_each_score(records) -> None:
    clock = FakeClock()
    cands = [Candidate("block", v, []) for v in (0.05, 0.1)]
    shown = CandidateProgress(cands, mode="log", clock=clock)
    clock.now += 4
    shown.done(1, 12.5)
    shown.close()
    lines = _progress_lines(records)
    assert lines[0] == "search, block step: 1/2 (50%)  4.0 s/candidate  elapsed 4s  ETA 4s  " \
                       "λ=0.100 score 12.5"


def test_log_records_go_through_tqdm_write(monkeypatch: pytest.MonkeyPatch) -> None:
    from tqdm.auto import tqdm

    written: list[str] = []
    monkeypatch.setattr(tqdm, "write", lambda s, file=None, end="\n", nolock=False: written.append(s))
    handler = TqdmHandler(io.StringIO())
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.emit(logging.LogRecord("neuroal.x", logging.INFO, __file__, 1, "hello %d", (3,), None))
    assert written == ["hello 3"]


def test_run_writes_neuroal_log_and_log_file(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from neuroal.pipeline import run

    out, extra = tmp_path / "out", tmp_path / "logs" / "run.log"
    extra.parent.mkdir()
    extra.write_text("earlier line\n")  # a user file is appended to, never replaced
    # an existing file neuroal did not write is appended to only when the user says so
    run(tiny_cfg(tiny_models["llama"], out, log={"file": str(extra), "interval": 0,
                                                 "allow_existing": True}))
    text = (out / LOG_FILE).read_text()
    assert "calibration: 4 windows of 32 tokens" in text  # logged before the output existed
    assert "block 2/2  target 0.500" in text
    assert "pruning blocks: 2/2" not in text or "block/s" in text
    assert extra.read_text().startswith("earlier line\n") and "block 2/2" in extra.read_text()
    assert not any(isinstance(h, logging.FileHandler) for h in logging.getLogger("neuroal").handlers)


def test_failed_run_keeps_its_log_beside_the_state(tiny_models: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroal import pipeline

    def boom(*_a, **_k):
        raise RuntimeError("simulated failure")

    monkeypatch.setattr(pipeline, "recovery_report", boom)
    out = tmp_path / "out"
    cfg = tiny_cfg(tiny_models["llama"], out, recover={"steps": ["dsnot"]})
    with pytest.raises(RuntimeError, match="simulated"):
        pipeline.run(cfg)
    assert not out.exists()
    kept = tmp_path / "out.neuroal-tmp" / LOG_FILE
    assert kept.is_file() and "block 2/2" in kept.read_text()


def test_log_config_is_validated() -> None:
    from neuroal.config.build import ConfigError, build_config

    with pytest.raises(ConfigError) as err:
        build_config({"log": {"interval": -5, "progress": "loud"},
                      "output": {"push_to_hub": "no-owner"}})
    assert "log.interval=-5" in str(err.value) and "log.progress='loud'" in str(err.value)
    assert "output.push_to_hub='no-owner'" in str(err.value)


def test_cli_flags_map_to_config() -> None:
    from neuroal.cli import build_parser, flags_to_tree

    args = build_parser().parse_args(["--log-file", "x.log", "--push-to-hub", "me/model"])
    tree = flags_to_tree(args)
    assert tree["log"]["file"] == "x.log" and tree["output"]["push_to_hub"] == "me/model"
