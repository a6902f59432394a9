"""The README and the mkdocs site in docs/: short, buildable, free of scratch paths and work
notes, every page reachable, every generated figure block matching its committed JSON."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs"
SCRIPT = REPO / "launch" / "readme_figures.py"
spec = importlib.util.spec_from_file_location("readme_figures", SCRIPT)
figures = importlib.util.module_from_spec(spec)
spec.loader.exec_module(figures)

PAGES = sorted([REPO / "README.md", *DOCS.glob("*.md")])
LEAK = re.compile(r"(^|[\s`(])/(tmp|work|home|root)/|\bissues? \d+\b|\bthis session\b|\bwas lent\b",
                  re.I | re.M)
MARKER = re.compile(r"<!-- ([\w-]+):begin -->")


def test_readme_is_short() -> None:
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move depth to docs/"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_no_machine_paths_or_work_notes(page: Path) -> None:
    hits = [m.group(0).strip() for m in LEAK.finditer(page.read_text())]
    assert not hits, f"{page.name}: {hits}"


def test_leak_pattern_can_fail() -> None:
    for bad in ("see /tmp/f2-bench", "after issue 16.2", "no device was lent", "in this session"):
        assert LEAK.search(bad), bad
    assert not LEAK.search("outputs/bench and the tissue 3 of docs/usage.md")


def test_every_page_is_in_the_nav() -> None:
    config = yaml.safe_load((REPO / "mkdocs.yml").read_text())

    def names(nav: object) -> set[str]:
        if isinstance(nav, str):
            return {nav}
        if isinstance(nav, list):
            return set().union(*(names(item) for item in nav))
        if isinstance(nav, dict):
            return set().union(*(names(item) for item in nav.values()))
        return set()

    listed = names(config["nav"])
    assert {p.name for p in DOCS.glob("*.md")} == listed


def test_mkdocs_builds_strict(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q",
                           "-f", str(REPO / "mkdocs.yml"), "-d", str(tmp_path / "site")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "site" / "index.html").is_file()


def test_every_figure_block_is_generated_and_current() -> None:
    """Each marker block belongs to a generator whose target is that page, and the page holds
    what the committed JSON generates."""
    for page in PAGES:
        for kind in MARKER.findall(page.read_text()):
            assert kind in figures.TARGETS, f"{page.name}: no generator for block {kind!r}"
            assert (REPO / figures.TARGETS[kind][1]).resolve() == page.resolve(), (kind, page)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--all", "--check"],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_check_detects_a_stale_block(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("<!-- results:begin -->\n| stale |\n<!-- results:end -->\n")
    code, message = figures.render("results", page=str(page), check=True)
    assert code == 1 and "results" in message
    assert figures.render("results", page=str(page))[0] == 0
    assert figures.render("results", page=str(page), check=True)[0] == 0
    assert "| Wanda 60 % |" in page.read_text()
