"""Subcommands of the ``neuroal`` console script beside ``prune`` (``neuroal.cli``) and
``evaluate`` (``neuroal.commands.evaluate``); ``launch/*.py`` are thin wrappers around them."""
