"""Recipes ship as package data: ``--config smollm2/wanda-neuroal-60`` resolves to the shipped
file, ``neuroal recipes`` lists them, and a built wheel carries them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import REPO

from neuroal.config.build import load_config
from neuroal.config.recipes import RECIPES_DIR, recipe_path, recipes
from neuroal.runtime.errors import ConfigError


def test_recipe_names_resolve_to_the_shipped_files(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ folder here: only the package data can answer
    shipped = RECIPES_DIR / "smollm2" / "wanda-neuroal-60.yaml"
    for name in ("smollm2/wanda-neuroal-60", "smollm2/wanda-neuroal-60.yaml",
                 "configs/smollm2/wanda-neuroal-60.yaml"):
        assert recipe_path(name) == shipped, name
    assert load_config("smollm2/wanda-neuroal-60").allocation.name == "neuroal"
    mine = tmp_path / "smollm2" / "wanda-neuroal-60.yaml"
    mine.parent.mkdir()
    mine.write_text("sparsity: 0.55\n")
    assert recipe_path("smollm2/wanda-neuroal-60.yaml") == Path("smollm2/wanda-neuroal-60.yaml")
    with pytest.raises(ConfigError, match="neuroal recipes"):
        recipe_path("smollm2/no-such-recipe")


def test_recipes_command_lists_every_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    from neuroal.cli import main

    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = {line.split()[0] for line in lines}
    assert {"smollm2/quickstart", "llama-2-70b/wanda-neuroal-70"} <= names
    assert len(names) == len(recipes()) == len(list((REPO / "configs").rglob("*.yaml")))
    quick = next(line for line in lines if line.startswith("smollm2/quickstart "))
    assert "make quickstart" in quick


def test_wheel_carries_the_recipes(tmp_path: Path) -> None:
    """Built from a copy of the sources (a build writes build/ and *.egg-info beside them)."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("neuroal", "configs"):
        shutil.copytree(REPO / name, src / name, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheel = next(tmp_path.glob("neuroal-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "neuroal/configs/smollm2/quickstart.yaml" in names
    assert "neuroal/configs/llama-2-70b/wanda-neuroal-70.yaml" in names
