"""The performance benchmark of issue 7: ``python benchmarks/bench.py [--json] [--device cuda] [--quick] ...``.

The same as ``tensorgraph bench`` (options: ``--help``); the measurements live in
:mod:`tensorgraph.benchmark` so that the installed command has them too.
"""

import sys

from tensorgraph.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
