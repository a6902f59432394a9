"""Runtime services every floor uses: errors, logging, progress bars, plug-in registries, the
plain job types, file digests, process settings (seeds, determinism, devices, timings).

The lowest floor: modules here import no other neuroal group (``models`` only for type
checkers). ``neuroal.runtime.process.<name>`` of the former single module still resolves, with a
deprecation warning, to :mod:`neuroal.runtime.process`.
"""

from neuroal.runtime.moved import forward

__getattr__ = forward("neuroal.runtime.process", "neuroal.runtime.process", warn=True)
