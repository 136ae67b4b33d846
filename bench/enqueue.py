"""`python bench/enqueue.py`: the enqueue benchmark, whose code is the package bench/enqueue/
(`python -m bench.enqueue` runs the same; `--help` lists every flag)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.enqueue.cli import main

if __name__ == "__main__":
    sys.exit(main())
