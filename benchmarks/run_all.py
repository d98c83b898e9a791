"""Run the whole benchmark suite: the same as ``loralab bench`` (options are passed through).

python benchmarks/run_all.py                       # writes docs/benchmarks/results.md
python benchmarks/run_all.py --threads 1 --clock cpu   # steadier on a busy machine
"""

import sys

from loralab.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
