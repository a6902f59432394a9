"""Planning a run before anything is loaded: will it fit, and how long will it take.

* :mod:`~neuroal.planning.layout`: the model as parameter counts, from a meta skeleton.
* :mod:`~neuroal.planning.memory`: the memory model, each worker's bytes component by component.
* :mod:`~neuroal.planning.recovery`: what recovery (PERP) adds to the memory plan.
* :mod:`~neuroal.planning.plan`: the plan of every worker, and the searches over it (onload
  mode, fewest workers, largest model that fits).
* :mod:`~neuroal.planning.checks`: a config checked against its devices, with refusals that
  say what to change.
* :mod:`~neuroal.planning.walltime`: the time model, wall seconds per phase from the throughput
  figures in ``throughput.json``.
* :mod:`~neuroal.planning.present`: the summary and text ``neuroal plan`` prints.
* :mod:`~neuroal.planning.preflight`: the checks of a run before any weight is loaded (the
  pipeline's; import them from there).

The memory and time models each have a ``request_from_config`` (a ``MemoryRequest`` and a
``TimeRequest``): import it from :mod:`~neuroal.planning.checks` or
:mod:`~neuroal.planning.walltime`.
"""

from neuroal.planning.checks import MemoryBudgetError, check_fits, statistics_refusal
from neuroal.planning.layout import ModelLayout, layout_of
from neuroal.planning.memory import (
    COMPONENTS,
    GB,
    OVERHEAD_BYTES,
    MemoryRequest,
    WorkerMemory,
    parse_bytes,
)
from neuroal.planning.plan import MemoryPlan, choose_onload, largest_fit, min_workers, plan_memory
from neuroal.planning.present import format_prediction, format_seconds, format_summary, summarize
from neuroal.planning.walltime import (
    MODES,
    PHASES,
    THROUGHPUT_FILE,
    Throughput,
    TimeRequest,
    Workload,
    load_throughputs,
    measured_phases,
    predict,
    throughput,
)

__all__ = [
    "COMPONENTS",
    "GB",
    "MODES",
    "OVERHEAD_BYTES",
    "PHASES",
    "THROUGHPUT_FILE",
    "MemoryBudgetError",
    "MemoryPlan",
    "MemoryRequest",
    "ModelLayout",
    "Throughput",
    "TimeRequest",
    "WorkerMemory",
    "Workload",
    "check_fits",
    "choose_onload",
    "format_prediction",
    "format_seconds",
    "format_summary",
    "largest_fit",
    "layout_of",
    "load_throughputs",
    "measured_phases",
    "min_workers",
    "parse_bytes",
    "plan_memory",
    "predict",
    "statistics_refusal",
    "summarize",
    "throughput",
]
