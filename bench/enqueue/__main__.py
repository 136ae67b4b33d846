"""`python -m bench.enqueue`: the enqueue benchmark (as `python bench/enqueue.py`)."""

import sys

from bench.enqueue.cli import main

sys.exit(main())
