"""`python -m pacofr ...`: the same as the `pacofr` command."""

import sys

from .cli import main

sys.exit(main())
