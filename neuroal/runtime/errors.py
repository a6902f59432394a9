"""The errors a user sees as "bad input" (exit code 2 from every CLI, never a traceback).

Leaf module (standard library only): every layer raises these and every entry point catches
them, so they live below all of them; the modules that define the rules re-export them
(``neuroal.config.build.ConfigError``, ``neuroal.models.loading.ModelSourceError``, ...).
"""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """One or more configuration errors, reported together."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"invalid configuration ({len(self.errors)} error(s)):\n{lines}")


class ModelSourceError(ValueError):
    """The model argument cannot be resolved; the message says what was tried and how to fix."""


class AdapterError(ValueError):
    """The model's architecture cannot be handled; the message says what was expected."""


class OutputExistsError(FileExistsError):
    """The output directory exists and ``--overwrite`` was not given."""


class PreflightError(ValueError):
    """The cluster cannot run the configured job (a device, a filesystem, disk space), found
    before any weight is loaded; every problem is listed with its fix."""

    def __init__(self, errors: Iterable[str]) -> None:
        self.errors = list(errors)
        lines = "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(f"preflight refused the run before loading ({len(self.errors)} "
                         f"problem(s)):\n{lines}")


USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, ModelSourceError, AdapterError,
                                                OutputExistsError, PreflightError)
"""What the entry points report as one log line and exit code 2."""


class ResumeMismatchError(ValueError):
    """``--resume`` found state written by a different configuration or model."""


class StateIntegrityError(ValueError):
    """A resume state file is corrupted, edited or inconsistent with its plan."""
