"""lm-eval task YAMLs shipped with neuroal (always on the zero-shot include path) and the JSON
loader they use; see :mod:`neuroal.evaluation.zeroshot`."""
