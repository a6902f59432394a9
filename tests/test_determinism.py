"""Every executor's processes apply the same determinism settings (engine.md §3.5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_cfg

from neuroal.config.build import ConfigError
from neuroal.engine.determinism import CUBLAS_WORKSPACE, apply_determinism, determinism_env
from neuroal.engine.ray_executor import actor_env
from neuroal.runtime.process import seed_everything


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_local_driver_sets_the_cublas_workspace_like_ray_and_dist(monkeypatch) -> None:
    """The local executor's process (``seed_everything``) sets CUBLAS_WORKSPACE_CONFIG, as the
    Ray actors and torch.distributed ranks do; a value set by the user is kept."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    seed_everything(0, True)
    import os

    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == CUBLAS_WORKSPACE
    assert torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    apply_determinism(True, None)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert actor_env(True, True, None)["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_actors_get_exactly_the_driver_settings() -> None:
    for cuda in (False, True):
        env = actor_env(cuda, True, 3)
        assert {k: env[k] for k in env if k != "PYTHONPATH"} == determinism_env(True, 3)
    assert determinism_env(False, None) == {}


def test_engine_threads_is_applied_and_validated(restore_threads, tmp_path: Path) -> None:
    cfg = tiny_cfg(tmp_path, None, engine={"threads": 1})
    seed_everything(cfg.seed, cfg.engine.deterministic, cfg.engine.threads)
    assert torch.get_num_threads() == 1
    for bad in (0, 1.5, True):
        with pytest.raises(ConfigError, match="engine.threads"):
            tiny_cfg(tmp_path, None, engine={"threads": bad})
