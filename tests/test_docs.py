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


PLAN_JSON = REPO / figures.PLAN_JSON


def test_plan_examples_are_recorded_as_listed() -> None:
    """The committed planner examples are the ones the script lists, each recorded without an
    error, so every quoted plan comes from a run of the planner."""
    import json

    recorded = json.loads(PLAN_JSON.read_text())
    assert {n: p["args"] for n, p in recorded["plans"].items()} == figures.PLAN_EXAMPLES, (
        "rerun: python launch/readme_figures.py --record-plans")
    assert recorded["refusal"]["args"] == figures.PRUNE_REFUSAL
    for name, plan in recorded["plans"].items():
        assert plan["exit"] in (0, 1) and "summary" in plan, (name, plan.get("error"))
    assert recorded["refusal"]["exit"] == 2 and "does not fit" in recorded["refusal"]["message"]


def test_plan_blocks_quote_the_recorded_output() -> None:
    """A rendered example quotes its plan's own verdict lines, and a changed figure changes it."""
    import copy
    import json

    recorded = json.loads(PLAN_JSON.read_text())
    text = figures.plan_onload_text(recorded)
    for name in ("70b-1x80", "70b-2x24", "70b-2x24-host64"):
        verdict = next(line for line in recorded["plans"][name]["output"].splitlines()
                       if line.startswith("verdict:"))
        assert f"# {verdict}" in text
    changed = copy.deepcopy(recorded)
    worker = changed["plans"]["llama-3.3-70b-4x80"]["summary"]["plan"]["workers"][0]
    worker["weights"] += 10**9
    assert figures.plan_table_text(changed) != figures.plan_table_text(recorded)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(figures.PLAN_EXAMPLES))
def test_plan_examples_match_the_current_planner(name: str, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """The committed example equals what the planner answers now (config only, offline), so a
    planner change that moves a quoted figure fails here until the examples are recorded again."""
    import json
    import shlex

    from neuroal.commands.plan import main as plan_main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recorded = json.loads(PLAN_JSON.read_text())["plans"][name]
    code = plan_main([*shlex.split(figures.PLAN_EXAMPLES[name]), "--json", "-"])
    summary = json.loads(capsys.readouterr().out)
    summary["time"].pop("provenance", None)
    assert (code, summary) == (recorded["exit"], recorded["summary"]), (
        "the planner changed: rerun python launch/readme_figures.py --record-plans, then --all")
