"""Run configuration: the typed schema (:mod:`~neuroal.config.schema`), input parsing
(:mod:`~neuroal.config.inputs`), shipped recipes (:mod:`~neuroal.config.recipes`) and the
validated build of a config from YAML, overrides and the API (:mod:`~neuroal.config.build`).

``schema``, ``inputs`` and ``recipes`` sit on the second floor (they import only
``neuroal.runtime.process``); ``build`` checks names against every plug-in registry and engine choice
before any weight is loaded, so it imports those groups (the one module allowed to, see
``tests/test_imports.py``). ``from neuroal.config.build import load_config, PruneConfig`` keeps
working: names are looked up in ``build`` on first use, so importing ``neuroal.config.schema``
stays cheap.
"""

from neuroal.runtime.moved import forward

__getattr__ = forward("neuroal.config.build", "neuroal.config.build", warn=False)
