"""neuroal: post-training pruning of large language models, streamed block by block.

Public API: :func:`prune` runs a job and returns a :class:`Result` (output path, report, plan);
:func:`evaluate` scores any model's perplexity and lm-eval zero-shot accuracy through the same
workers; :func:`load_config` builds a validated config; the registries let plug-ins add
criteria and allocation policies by name.

    >>> import neuroal
    >>> result = neuroal.prune("smollm2-135m", sparsity=0.6, allocation="owl",
    ...                        calib={"nsamples": 32}, eval={"tasks": ["neuroal_tiny_qa"]})
    >>> result.report["eval"]["wikitext2"]["model_ppl"], result.output
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from neuroal.config.schema import PruneConfig, set_dotted
from neuroal.runtime.errors import ConfigError
from neuroal.runtime.moved import install as _install_moved_paths

_install_moved_paths()  # old module paths (neuroal.outputs.safety, ...) import with a deprecation warning

__version__ = "0.1.0"

# The imports inside the functions below are lazy on purpose: `import neuroal` (the CLI's
# dispatcher, every plug-in) must not pay for torch, transformers and every registry.


def load_config(*args: Any, **kwargs: Any) -> Any:
    """See :func:`neuroal.config.build.load_config`."""
    from neuroal.config.build import load_config as _load  # lazy: imports every plug-in registry

    return _load(*args, **kwargs)


def prune(model: Any = "smollm2-135m", sparsity: float | None = None,
          criterion: str | None = None, allocation: str | None = None, *,
          pattern: str | None = None, config: str | None = None, output: str | None = None,
          overwrite: bool = False, save: bool = True, overrides: Sequence[str] = (),
          keep_executor: bool = False, session: Any = None, **sections: Any) -> Any:
    """Prune ``model`` and return a :class:`Result` (``output``, ``report``, ``plan``).

    Args:
        model: Alias (``smollm2-135m``), local HF directory, ``.gguf`` file or hub id; or a
            ready :class:`~neuroal.config.build.PruneConfig` (then every other argument is ignored).
        sparsity: Target fraction of zeros (default 0.5).
        criterion: ``wanda``, ``sparsegpt``, ``ria``, ... (default ``wanda``).
        allocation: ``uniform``, ``owl``, ``alpha``, ``neuroal``, ``file`` (default ``uniform``).
        pattern: ``unstructured`` or ``N:M`` such as ``2:4``.
        config: A YAML recipe; the arguments given here win over it.
        output: Output directory (default ``outputs/<model>-<recipe>``).
        overwrite: Replace an existing output that neuroal wrote.
        save: Write the pruned model (False: the report only, nothing on disk).
        overrides: ``key=value`` strings, applied last (as on the command line).
        keep_executor: Keep the workers alive in ``result.executor`` (inspection, tests).
        session: For ``engine.executor=dist`` on rank 0 of a torchrun / accelerate launch: the
            session yielded by ``neuroal.engine.dist.coordinator(cfg)``; otherwise None.
        sections: Any other config key, as a section mapping (``calib={"nsamples": 32}``,
            ``engine={"workers": 2}``), a plain top-level value (``seed=1``) or with ``__``
            for dots (``calib__nsamples=32``).

    Raises:
        ConfigError: A bad value, reported (all at once) before any weight is loaded.
    """
    from neuroal.pipeline import run  # lazy: the pipeline imports torch and transformers

    flags = {"overwrite": overwrite, "save": save, "keep_executor": keep_executor}
    wrong = [f"neuroal.prune({k}={v!r}): expected True or False" for k, v in flags.items()
             if not isinstance(v, bool)]
    if wrong:  # "no" is truthy: never let a string decide whether an output is replaced
        raise ConfigError(wrong)
    if isinstance(model, PruneConfig):
        return run(model, keep_executor=keep_executor, session=session)
    tree: dict[str, Any] = {}
    named = {"model.name": model, "sparsity": sparsity, "criterion.name": criterion,
             "allocation.name": allocation, "pattern": pattern, "output.dir": output}
    for key, value in named.items():
        if value is not None:
            set_dotted(tree, key, value)
    if overwrite:
        set_dotted(tree, "output.overwrite", True)
    if not save:
        set_dotted(tree, "output.save_model", False)
    for key, value in sections.items():
        if isinstance(value, Mapping):
            for sub, item in value.items():
                set_dotted(tree, f"{key}.{sub}", item)
        else:
            set_dotted(tree, key.replace("__", "."), value)
    cfg = load_config(config, overrides, tree)
    return run(cfg, keep_executor=keep_executor, command=f"neuroal.prune({model!r}, ...)",
               session=session)


def evaluate(model: str = "smollm2-135m", *, datasets: Sequence[str] | str = ("wikitext2",),
             tasks: Sequence[str] | str = (), windows: int | None = None,
             seqlen: int | None = None, limit: int | None = None, num_fewshot: int | None = None,
             include_path: str | None = None, workers: int | None = None,
             executor: str | None = None, device: str | None = None, dtype: str | None = None,
             config: str | Path | None = None, **sections: Any) -> dict[str, Any]:
    """Perplexity and lm-eval task scores of ``model`` through the workers; the arguments are
    :func:`neuroal.commands.evaluate.evaluate`'s (an unknown one raises ConfigError listing them)."""
    from neuroal.commands.evaluate import evaluate as _evaluate  # lazy: imports the pipeline

    return _evaluate(model, datasets=datasets, tasks=tasks, windows=windows, seqlen=seqlen,
                     limit=limit, num_fewshot=num_fewshot, include_path=include_path,
                     workers=workers, executor=executor, device=device, dtype=dtype,
                     config=config, **sections)


def __getattr__(name: str) -> Any:
    """``neuroal.Result`` (the pipeline's RunResult) without importing torch at ``import neuroal``."""
    if name == "Result":
        from neuroal.pipeline import RunResult  # lazy: the pipeline imports torch

        return RunResult
    raise AttributeError(f"module 'neuroal' has no attribute {name!r}")


__all__ = ["Result", "__version__", "evaluate", "load_config", "prune"]
