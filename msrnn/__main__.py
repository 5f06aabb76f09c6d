"""`python -m msrnn ...`: the same command line as the `msrnn` command."""

import sys

from .cli import main

sys.exit(main())
