"""The YAML recipes shipped with neuroal (the repository's ``configs/``, installed as package
data under ``neuroal/configs``): ``--config smollm2/wanda-neuroal-60`` names one without a path,
and ``neuroal recipes`` lists them.

Each recipe opens with comment lines: the first gives the command that runs it, the next ones
say what it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from neuroal.runtime.errors import ConfigError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "configs"
SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class Recipe:
    """A shipped recipe: its name (``smollm2/quickstart``), file, command line and summary."""

    name: str
    path: Path
    command: str
    summary: str


def recipe_path(name: str | Path) -> Path:
    """``name`` itself when that file exists, else the shipped recipe of that name (with or
    without ``.yaml``, with or without a leading ``configs/``); a ConfigError naming both
    places and how to list the recipes when neither exists."""
    given = Path(name).expanduser()
    if given.exists():
        return given
    relative = Path(*given.parts[1:]) if given.parts[:1] == ("configs",) else given
    for candidate in (relative, *(relative.with_name(relative.name + s) for s in SUFFIXES)):
        shipped = RECIPES_DIR / candidate
        if not given.is_absolute() and shipped.is_file():
            return shipped
    raise ConfigError([f"config file {str(name)!r} does not exist, and no recipe of that name "
                       "ships with neuroal; give a YAML file's path or a recipe name from "
                       "`neuroal recipes` (e.g. smollm2/quickstart)"])


def recipes() -> list[Recipe]:
    """Every shipped recipe, sorted by name."""
    out = []
    for path in sorted(p for p in RECIPES_DIR.rglob("*") if p.suffix in SUFFIXES):
        comments = []
        for line in path.read_text().splitlines():
            if not line.startswith("#"):
                break
            comments.append(line.lstrip("#").strip())
        name = str(path.relative_to(RECIPES_DIR).with_suffix(""))
        out.append(Recipe(name, path, comments[0] if comments else "",
                          " ".join(comments[1:])))
    return out
