"""The ``deepshift`` command line: ``parser`` builds the arguments, ``commands`` runs them (thinly,
over the library)."""

from deepshift.cli.commands import main

__all__ = ["main"]
