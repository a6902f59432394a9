"""Every recipe under configs/ (recursively) loads and validates; each opens with a command."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from neuroal.config.build import ConfigError, load_config

CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def test_there_are_configs() -> None:
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(REPO)))
def test_config_validates(path: Path) -> None:
    cfg = load_config(path)
    assert 0 < cfg.target_sparsity < 1
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and ("launch/prune.py" in first or "make " in first)


def test_overrides_win_and_errors_are_collected(tmp_path: Path) -> None:
    cfg = load_config(REPO / "configs/smollm2/quickstart.yaml", ["sparsity=0.7", "calib.nsamples=4"])
    assert cfg.sparsity == 0.7 and cfg.calib.nsamples == 4
    with pytest.raises(ConfigError) as info:
        load_config(None, ["sparsity=2", "criterion.name=nope", "engine.workers=0"])
    assert len(info.value.errors) == 3
