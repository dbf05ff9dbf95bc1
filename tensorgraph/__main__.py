"""``python -m tensorgraph``: the command line of the ``tensorgraph`` console script.

Python imports the package (and torch) before this file runs, so a Ctrl-C in those first
seconds still shows a traceback here; the console script (``tensorgraph_launcher``) catches it.
"""

from __future__ import annotations

import sys

from tensorgraph.cli import main

if __name__ == "__main__":
    sys.exit(main())
