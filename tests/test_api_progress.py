"""The Python API shows its log and progress by default (a script or notebook that set up no
logging sees the run), and leaves an application's own logging setup alone."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_api_run_prints_progress_without_any_logging_setup(tiny_models: dict[str, Path],
                                                           tmp_path: Path) -> None:
    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from conftest import tiny_cfg\n"
        "from pathlib import Path\n"
        "from neuroal.pipeline import run\n"
        f"run(tiny_cfg(Path({str(tiny_models['llama'])!r}), None))\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "block 2/2" in done.stderr  # the per-block log line reached the terminal


def test_an_application_logging_setup_is_left_alone() -> None:
    from neuroal.runtime.logging import ensure_visible

    logger = logging.getLogger("neuroal")
    before = list(logger.handlers)
    root = logging.getLogger()
    handler = logging.NullHandler()
    root.addHandler(handler)
    try:
        ensure_visible("INFO")
        assert logger.handlers == before
    finally:
        root.removeHandler(handler)
