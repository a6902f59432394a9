"""Executor-specific options live in their own config sections:
``engine.ray.*`` and ``engine.dist.*``, typed and validated like every other key; the flat keys
of earlier releases still work, with a warning naming the new key."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import pytest

from neuroal.config.build import DEPRECATED_KEYS, ConfigError, build_config, load_config


def test_ray_and_dist_sections_from_overrides() -> None:
    cfg = load_config(None, ["engine.ray.address=auto", "engine.ray.cpus=2",
                             "engine.ray.placement=SPREAD", "engine.ray.max_restarts=0",
                             "engine.ray.inflight=4", "engine.dist.timeout=60"])
    ray = cfg.engine.ray
    assert (ray.address, ray.cpus, ray.placement, ray.max_restarts, ray.inflight) == \
        ("auto", 2, "SPREAD", 0, 4)
    assert cfg.engine.dist.timeout == 60
    assert cfg.to_dict()["engine"]["ray"]["address"] == "auto"
    assert build_config(cfg.to_dict()) == cfg  # the resolved form reads back


@pytest.mark.parametrize(("old", "value"), [("ray_address", "auto"), ("ray_placement", "SPREAD"),
                                            ("ray_cpus", 2.0), ("max_restarts", 0),
                                            ("inflight", 5)])
def test_flat_keys_still_work_with_a_warning(old: str, value: object,
                                             caplog: pytest.LogCaptureFixture) -> None:
    new = DEPRECATED_KEYS[f"engine.{old}"]
    with caplog.at_level(logging.WARNING, logger="neuroal.config.build"):
        cfg = load_config(None, [f"engine.{old}={value}"])
    assert getattr(cfg.engine.ray, new.rsplit(".", 1)[1]) == value
    assert f"engine.{old} is deprecated" in caplog.text and new in caplog.text


def test_flat_key_from_yaml(tmp_path, caplog: pytest.LogCaptureFixture) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("engine:\n  executor: ray\n  ray_cpus: 3\n  ray:\n    placement: SPREAD\n")
    with caplog.at_level(logging.WARNING, logger="neuroal.config.build"):
        cfg = load_config(recipe)
    assert (cfg.engine.ray.cpus, cfg.engine.ray.placement) == (3, "SPREAD")
    assert "write engine.ray.cpus" in caplog.text


def test_bad_values_are_reported_with_key_and_fix() -> None:
    with pytest.raises(ConfigError) as err:
        load_config(None, ["engine.ray.cpus=0", "engine.ray.placement=NEAR",
                           "engine.ray.max_restarts=-1", "engine.ray.inflight=x",
                           "engine.ray.address=5", "engine.dist.timeout=0", "engine.ray.gpus=1",
                           "engine.dist.backend=nccl"])
    text = "\n".join(err.value.errors)
    for part in ("engine.ray.cpus=0: expected a number > 0",
                 "engine.ray.placement='NEAR': expected one of PACK",
                 "engine.ray.max_restarts=-1: expected an integer >= 0",
                 "engine.ray.inflight='x': expected an integer",
                 "engine.ray.address=5: expected a string or null",
                 "engine.dist.timeout=0: expected seconds > 0",
                 "unknown key engine.ray.gpus; valid keys: address, cpus",
                 "unknown key engine.dist.backend; valid keys: collective_timeout, timeout"):
        assert part in text, (part, text)
    with pytest.raises(ConfigError, match="engine.ray: expected a mapping"):
        load_config(None, ["engine.ray=auto"])


def test_old_and_new_name_together_is_an_error() -> None:
    with pytest.raises(ConfigError, match="engine.ray_cpus=2 and engine.ray.cpus=3 are both set"):
        load_config(None, ["engine.ray_cpus=2", "engine.ray.cpus=3"])


def test_dist_timeout_reaches_the_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroal.engine.dist import TIMEOUT, rank_info

    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    cfg = load_config(None, ["engine.executor=dist", "engine.workers=2", "engine.device=cpu",
                             "engine.dist.timeout=90"])
    info = rank_info(cfg)
    assert info is not None and info.timeout == datetime.timedelta(seconds=90)
    default = load_config(None, ["engine.executor=dist", "engine.workers=2", "engine.device=cpu"])
    assert rank_info(default).timeout == TIMEOUT == datetime.timedelta(hours=4)


def test_resume_ignores_executor_sections() -> None:
    from neuroal.outputs.checkpoint import canonical_config

    a = load_config(None, ["engine.ray.cpus=2", "engine.dist.timeout=5"]).to_dict()
    b = load_config(None, []).to_dict()
    assert canonical_config(a, {}) == canonical_config(b, {})


def test_prune_api_takes_sections() -> None:
    """``neuroal.prune(engine={"ray": {...}})`` builds the same tree as the overrides."""
    from neuroal.config.build import set_dotted

    tree: dict = {}
    set_dotted(tree, "engine.ray", {"cpus": 2})
    assert build_config(tree).engine.ray.cpus == 2


# --------------------------------------------------------------------------- executor state


def test_engine_mutates_no_module_globals() -> None:
    """No ``global`` statement in the engine (``dist._ACTIVE`` was one): the dist executor is
    built from the session the coordinator yields."""
    import ast
    from pathlib import Path

    import neuroal.engine

    for path in sorted(Path(neuroal.engine.__file__).parent.glob("*.py")):
        tree = ast.parse(path.read_text())
        assert not [n for n in ast.walk(tree) if isinstance(n, ast.Global)], path.name


def test_coordinator_yields_none_for_one_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from neuroal.engine import EXECUTORS
    from neuroal.engine.dist import coordinator

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    cfg = load_config(None, [])
    with coordinator(cfg) as session:
        assert session is None
    dist_cfg = load_config(None, ["engine.executor=dist", "engine.workers=2"])
    with pytest.raises(RuntimeError, match="session=session"):
        EXECUTORS.get("dist")(dist_cfg, source=None, num_blocks=3, devices=["cpu"],
                              dtype="float32", session=None)


def test_ray_executor_takes_a_template_and_options() -> None:
    """A handful of constructor arguments, and the actor device named in one helper."""
    import ast
    import inspect

    from neuroal.engine.ray import executor as ray_executor  # the module of RayExecutor
    from neuroal.engine.ray_executor import RayExecutor, RayOptions, actor_device

    params = list(inspect.signature(RayExecutor.__init__).parameters)[1:]
    assert params == ["template", "workers", "options", "transport", "state_dir", "parallel"]
    assert (actor_device("cuda"), actor_device("cpu")) == ("cuda:0", "cpu")
    cfg = load_config(None, ["engine.ray.cpus=3", "engine.ray.inflight=2"])
    assert RayOptions.from_config(cfg.engine.ray, False) == RayOptions(cpus=3, inflight=2,
                                                                       deterministic=False)
    package = Path(ray_executor.__file__).parent  # every module of the Ray executor
    literals = [(path.name, n.value) for path in sorted(package.glob("*.py"))
                for n in ast.walk(ast.parse(path.read_text()))
                if isinstance(n, ast.Constant) and isinstance(n.value, str)
                and n.value.startswith("cuda:")]
    assert all(name == "options.py" for name, _ in literals), literals  # actor_device only
