"""`python -m bench.drain`: the drain benchmark (as `python bench/drain.py`)."""

import sys

from bench.drain.cli import main

sys.exit(main())
