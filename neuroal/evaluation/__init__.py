"""Evaluation beyond perplexity: lm-eval zero-shot and generation tasks
(:mod:`~neuroal.evaluation.zeroshot`) and the tasks neuroal ships
(:mod:`~neuroal.evaluation.tasks`). The streamed perplexity runs in the workers; the
``evaluate`` command that ties both to a model lives in :mod:`neuroal.commands.evaluate`.

``neuroal.commands.evaluate.evaluate`` and the former module's other names still resolve there, with a
deprecation warning.
"""

from neuroal.runtime.moved import forward

__getattr__ = forward("neuroal.commands.evaluate", "neuroal.commands.evaluate", warn=True)
