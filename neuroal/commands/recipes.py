"""``neuroal recipes``: the YAML recipes shipped with neuroal, by name."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from neuroal.config.recipes import recipes


def main(argv: Sequence[str] | None = None) -> int:
    """List the shipped recipes (``--verbose``: with what each one is and its file)."""
    p = argparse.ArgumentParser(prog="neuroal recipes",
                                description="The YAML recipes shipped with neuroal; run one "
                                            "with `neuroal prune --config NAME`.")
    p.add_argument("-v", "--verbose", action="store_true", help="also print each summary and file")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    found = recipes()
    width = max((len(r.name) for r in found), default=0)
    for recipe in found:
        sys.stdout.write(f"{recipe.name:<{width}}  {recipe.command}\n")
        if args.verbose:
            sys.stdout.write(f"{'':<{width}}  {recipe.summary}\n{'':<{width}}  {recipe.path}\n")
    return 0
