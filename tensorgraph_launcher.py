"""The ``tensorgraph`` console script and ``python -m tensorgraph``: the command line, Ctrl-C included.

``tensorgraph.cli.main`` answers Ctrl-C with one line and exit status 130, but importing the
package (torch, several seconds) comes before it. This module sits outside the package so
that the console script can import it without importing torch, and catches a Ctrl-C during
that start-up too: one line and 130, never a traceback. (``python -m tensorgraph`` imports
the package before ``tensorgraph/__main__.py`` runs, so there the guard starts after it.)
"""

from __future__ import annotations

import sys


def main() -> int:
    """Import and run the command line; Ctrl-C at any point ends in ``tensorgraph: interrupted`` and 130."""
    try:
        from tensorgraph.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        print("tensorgraph: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
