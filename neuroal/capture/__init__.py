"""Statistics capture: forward hooks that fold the inputs of every linear into the statistics
a criterion needs (Wanda norms, SparseGPT Hessians, RIA and refiner inputs), for dense blocks
(:mod:`~neuroal.capture.collector`) and routed experts (:mod:`~neuroal.capture.moe`).

Imports the criteria's statistic names and the model adapter's expert layout, nothing above.
``from neuroal.capture.collector import StatsCollector`` keeps working (names of ``collector``).
"""

from neuroal.runtime.moved import forward

__getattr__ = forward("neuroal.capture.collector", "neuroal.capture.collector", warn=False)
