"""``python -m deepshift``: the same as the ``deepshift`` console script."""

import sys

from deepshift.cli import main

if __name__ == "__main__":  # importing this module (e.g. doctest collection) runs nothing
    sys.exit(main())
