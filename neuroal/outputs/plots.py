"""PNG plots beside ``report.json``; matplotlib is optional (extra ``plots``).

Each plot is a small function of the report alone, so any finished run can be re-plotted:

* ``sparsity_per_block.png``: target vs achieved sparsity of every block;
* ``sparsity_per_linear.png``: target vs achieved sparsity of every prunable linear;
* ``search_trail.png``: the NeuroAL search, score vs λ (block step) and vs μ (row step), the
  winner marked;
* ``alignment_per_block.png``: each step winner's neuron-alignment distance per block.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

from neuroal.runtime.logging import get_logger

log = get_logger(__name__)

PLOT_DIR = "plots"
"""Sub-folder of the output that holds the PNG files."""


def available() -> bool:
    """Whether matplotlib can be imported."""
    return importlib.util.find_spec("matplotlib") is not None


def _figure(width: float = 8.0, height: float = 4.0, ncols: int = 1) -> tuple[Any, Any]:
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, never a window
    from matplotlib import pyplot as plt

    fig, axes = plt.subplots(1, ncols, figsize=(width, height), dpi=100, squeeze=False)
    return fig, list(axes[0]) if ncols > 1 else axes[0][0]


def _save(fig: Any, path: Path) -> Path:
    from matplotlib import pyplot as plt

    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def sparsity_per_block(report: dict[str, Any], path: Path) -> Path | None:
    """Target vs achieved sparsity per block (``report["blocks"]``)."""
    blocks = report.get("blocks") or []
    if not blocks:
        return None
    fig, ax = _figure()
    index = [b["index"] for b in blocks]
    ax.plot(index, [b["target"] for b in blocks], "o-", label="target")
    ax.plot(index, [b["achieved"] for b in blocks], "x--", label="achieved")
    ax.axhline(report["target_sparsity"], color="grey", lw=0.8, ls=":", label="global target")
    ax.set(xlabel="block", ylabel="sparsity", title=f"{report['allocation']} allocation, "
           f"{report['criterion']}: sparsity per block")
    ax.legend()
    return _save(fig, path)


def sparsity_per_linear(report: dict[str, Any], path: Path) -> Path | None:
    """Target vs achieved sparsity of every prunable linear, in execution order."""
    layers = report.get("layers") or {}
    if not layers:
        return None
    fig, ax = _figure(10.0, 4.0)
    rows = list(layers.values())
    ax.plot(range(len(rows)), [r["target"] for r in rows], ".", label="target")
    ax.plot(range(len(rows)), [r["achieved"] for r in rows], "x", ms=3, label="achieved")
    ax.set(xlabel=f"linear (block order; {len(rows)} in all)", ylabel="sparsity",
           title="sparsity per linear")
    ax.legend()
    return _save(fig, path)


def search_trail(report: dict[str, Any], path: Path) -> Path | None:
    """Score vs grid value per search step, the chosen candidate marked with a star."""
    trail = (report.get("search") or {}).get("candidates") or []
    if not trail:
        return None
    phases = list(dict.fromkeys(e["phase"] for e in trail))
    fig, axes = _figure(5.0 * len(phases), 4.0, ncols=len(phases))
    axes = axes if len(phases) > 1 else [axes]
    symbols = {"block": "λ (block step)", "row": "μ (row step)"}
    for ax, phase in zip(axes, phases, strict=False):
        entries = sorted((e for e in trail if e["phase"] == phase), key=lambda e: e["value"])
        ax.plot([e["value"] for e in entries], [e["score"] for e in entries], "o-")
        for e in entries:
            if e.get("chosen"):
                ax.plot([e["value"]], [e["score"]], "r*", ms=14, label=f"chosen {e['value']:g}")
        ax.set(xlabel=symbols.get(phase, phase), ylabel="alignment score (lower is better)",
               title=f"NeuroAL search: {phase} step")
        ax.legend()
    return _save(fig, path)


def alignment_per_block(report: dict[str, Any], path: Path) -> Path | None:
    """Per block, the winning candidate's alignment distance of each search step."""
    alignment = (report.get("search") or {}).get("alignment") or {}
    if not any(alignment.values()):
        return None
    fig, ax = _figure()
    for phase, values in alignment.items():
        ax.plot(range(len(values)), values, "o-", label=f"{phase} step winner")
    ax.set(xlabel="block", ylabel="neuron alignment distance (sum over linears)",
           title="NeuroAL: alignment per block")
    ax.legend()
    return _save(fig, path)


PLOTS: dict[str, Callable[[dict[str, Any], Path], Path | None]] = {
    "sparsity_per_block.png": sparsity_per_block,
    "sparsity_per_linear.png": sparsity_per_linear,
    "search_trail.png": search_trail,
    "alignment_per_block.png": alignment_per_block,
}


def write_plots(directory: Path, report: dict[str, Any]) -> list[str]:
    """Write every plot the report has data for into ``directory/plots/``.

    Returns:
        The written files, relative to ``directory`` (empty, with one logged note, when
        matplotlib is not installed).
    """
    if not available():
        log.info("plots skipped: matplotlib is not installed (pip install 'neuroal[plots]')")
        return []
    folder = Path(directory) / PLOT_DIR
    folder.mkdir(exist_ok=True)
    written = []
    for name, plot in PLOTS.items():
        try:
            if plot(report, folder / name) is not None:
                written.append(f"{PLOT_DIR}/{name}")
        except Exception as exc:  # a plot never fails a finished run
            log.warning("plot %s skipped: %s: %s", name, type(exc).__name__, exc)
    log.info("plots (in the output directory): %s", ", ".join(written) or "none")
    return written
