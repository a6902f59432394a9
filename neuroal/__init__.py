"""neuroal: post-training pruning of large language models, streamed block by block.

Public API: :func:`prune` runs a job from a config; :func:`load_config` builds one; the
registries let plug-ins add criteria and allocation policies by name.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def load_config(*args: Any, **kwargs: Any) -> Any:
    """See :func:`neuroal.config.load_config`."""
    from neuroal.config import load_config as _load

    return _load(*args, **kwargs)


def prune(config: Any, **kwargs: Any) -> Any:
    """Run a pruning job (see :func:`neuroal.pipeline.run`)."""
    from neuroal.pipeline import run

    return run(config, **kwargs)


__all__ = ["__version__", "load_config", "prune"]
