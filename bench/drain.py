"""`python bench/drain.py`: the drain benchmark, whose code is the package bench/drain/
(`python -m bench.drain` runs the same; `--help` lists every flag)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.drain.cli import main

if __name__ == "__main__":
    sys.exit(main())
