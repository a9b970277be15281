"""``python -m deepshift``: the same as the ``deepshift`` console script."""

import sys

from .cli import main

sys.exit(main())
